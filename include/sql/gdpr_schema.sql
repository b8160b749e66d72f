-- warehouse-gdpr control schema. Idempotent: every statement can run again on an installed warehouse.
-- Run by the DAGs (check_policy task) when gdpr.schema_version is missing or older than this file,
-- and by `make demo`. Needs a role that may create schemas and roles (the warehouse owner / a DBA).
--
-- Roles:
--   gdpr_engine          the role the DAGs act as (grant it to the login role of the Airflow connection)
--   gdpr_archive_reader  legal / accounting: may read the encrypted archive (still needs the key to decrypt)
--   gdpr_auditor         may read the audit log, nothing else
--   gdpr_list_reader     may read the suppression list (hashes only), nothing else: for import pipelines

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'gdpr_engine') THEN
        CREATE ROLE gdpr_engine NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'gdpr_archive_reader') THEN
        CREATE ROLE gdpr_archive_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'gdpr_auditor') THEN
        CREATE ROLE gdpr_auditor NOLOGIN;
    END IF;
END
$$;

CREATE SCHEMA IF NOT EXISTS gdpr;
CREATE SCHEMA IF NOT EXISTS gdpr_archive;

REVOKE ALL ON SCHEMA gdpr FROM PUBLIC;
REVOKE ALL ON SCHEMA gdpr_archive FROM PUBLIC;
GRANT USAGE ON SCHEMA gdpr TO gdpr_engine, gdpr_auditor;
GRANT USAGE ON SCHEMA gdpr_archive TO gdpr_engine, gdpr_archive_reader;

CREATE TABLE IF NOT EXISTS gdpr.schema_version (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Append-only audit log. No personal data: a person appears only as a keyed hash (subject_hash)
-- or as an internal id count; `details` holds counts and timings.
CREATE TABLE IF NOT EXISTS gdpr.audit_log (
    audit_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    logged_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    dag_id       text,
    run_id       text,
    task_id      text,
    rule         text,
    table_name   text,
    action       text NOT NULL,
    row_count    bigint NOT NULL DEFAULT 0,
    dry_run      boolean NOT NULL DEFAULT false,
    outcome      text NOT NULL,
    subject_hash text,
    details      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS audit_log_run_idx ON gdpr.audit_log (dag_id, run_id);

CREATE OR REPLACE FUNCTION gdpr.refuse_audit_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'gdpr.audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

DROP TRIGGER IF EXISTS audit_log_no_update_delete ON gdpr.audit_log;
CREATE TRIGGER audit_log_no_update_delete
    BEFORE UPDATE OR DELETE ON gdpr.audit_log
    FOR EACH ROW EXECUTE FUNCTION gdpr.refuse_audit_change();
DROP TRIGGER IF EXISTS audit_log_no_truncate ON gdpr.audit_log;
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON gdpr.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION gdpr.refuse_audit_change();
-- ALWAYS: fires even with session_replication_role = replica.
ALTER TABLE gdpr.audit_log ENABLE ALWAYS TRIGGER audit_log_no_update_delete;
ALTER TABLE gdpr.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;

REVOKE ALL ON gdpr.audit_log FROM PUBLIC;
-- INSERT on the descriptive columns only: the engine cannot choose audit_id or logged_at.
GRANT SELECT ON gdpr.audit_log TO gdpr_engine;
GRANT INSERT (dag_id, run_id, task_id, rule, table_name, action, row_count, dry_run, outcome, subject_hash, details)
    ON gdpr.audit_log TO gdpr_engine;
GRANT SELECT ON gdpr.audit_log TO gdpr_auditor;
GRANT SELECT ON gdpr.schema_version TO gdpr_engine, gdpr_auditor;

-- Encrypted originals of pseudonymised rows (done in Python; key id per row): to the archive's X25519
-- public key (an ephemeral ECDH per batch, AES-256-GCM; the ephemeral public key leads the ciphertext),
-- or, for rows of the earlier key layout, AES-256-GCM under a symmetric key.
-- AAD = source_table || '|' || source_pk || '|' || key_id, so a ciphertext cannot be moved to another row.
CREATE TABLE IF NOT EXISTS gdpr_archive.archived_row (
    archive_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_table text NOT NULL,
    source_pk    text NOT NULL,
    subject_id   text NOT NULL,
    rule         text NOT NULL,
    run_id       text,
    archived_at  timestamptz NOT NULL DEFAULT now(),
    purge_after  timestamptz NOT NULL,
    key_id       text NOT NULL,
    nonce        bytea NOT NULL,
    ciphertext   bytea NOT NULL,
    UNIQUE (source_table, source_pk)
);
CREATE INDEX IF NOT EXISTS archived_row_purge_idx ON gdpr_archive.archived_row (purge_after, archive_id);
-- v6: an erasure finds the person's archived originals by subject id.
CREATE INDEX IF NOT EXISTS archived_row_subject_idx ON gdpr_archive.archived_row (subject_id);

REVOKE ALL ON gdpr_archive.archived_row FROM PUBLIC;
GRANT SELECT, INSERT, DELETE ON gdpr_archive.archived_row TO gdpr_engine;
GRANT SELECT ON gdpr_archive.archived_row TO gdpr_archive_reader;

-- Suppression (opt-out / exclusion) list: keyed hashes of normalised emails, kept forever.
-- No grant of UPDATE or DELETE to anyone: an entry is permanent.
CREATE TABLE IF NOT EXISTS gdpr.suppression_list (
    email_hash  text PRIMARY KEY,
    key_id      text NOT NULL,
    reason      text NOT NULL CHECK (reason IN ('erasure', 'opt_out')),
    source      text NOT NULL,
    request_id  text,
    first_seen  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON gdpr.suppression_list FROM PUBLIC;
GRANT SELECT, INSERT ON gdpr.suppression_list TO gdpr_engine;
GRANT SELECT ON gdpr.suppression_list TO gdpr_auditor;

-- v3: an entry may change in two ways only, both checked below for everyone (the owner included):
--   re-keying after a pepper rotation: email_hash and key_id change, nothing else (see optout.py);
--   an opted-out person is erased later: reason 'opt_out' -> 'erasure' with the request id, nothing else.
-- DELETE and TRUNCATE are refused: an entry is permanent.
GRANT UPDATE (email_hash, key_id, reason, request_id) ON gdpr.suppression_list TO gdpr_engine;

CREATE OR REPLACE FUNCTION gdpr.guard_suppression_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.key_id IS DISTINCT FROM OLD.key_id AND NEW.email_hash IS DISTINCT FROM OLD.email_hash
           AND NEW.email_hash ~ '^[0-9a-f]{64}$'
           AND (NEW.reason, NEW.source, NEW.request_id, NEW.first_seen)
               IS NOT DISTINCT FROM (OLD.reason, OLD.source, OLD.request_id, OLD.first_seen) THEN
            RETURN NEW;  -- re-keyed
        END IF;
        IF OLD.reason = 'opt_out' AND NEW.reason = 'erasure' AND NEW.request_id IS NOT NULL
           AND (NEW.email_hash, NEW.key_id, NEW.source, NEW.first_seen)
               IS NOT DISTINCT FROM (OLD.email_hash, OLD.key_id, OLD.source, OLD.first_seen) THEN
            RETURN NEW;  -- opted out, then erased
        END IF;
    END IF;
    RAISE EXCEPTION 'gdpr.suppression_list is permanent: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'only re-keying (email_hash and key_id) and opt_out -> erasure (reason and request_id) are allowed';
END
$$;

DROP TRIGGER IF EXISTS suppression_list_guard ON gdpr.suppression_list;
CREATE TRIGGER suppression_list_guard
    BEFORE UPDATE OR DELETE ON gdpr.suppression_list
    FOR EACH ROW EXECUTE FUNCTION gdpr.guard_suppression_change();
DROP TRIGGER IF EXISTS suppression_list_no_truncate ON gdpr.suppression_list;
CREATE TRIGGER suppression_list_no_truncate
    BEFORE TRUNCATE ON gdpr.suppression_list
    FOR EACH STATEMENT EXECUTE FUNCTION gdpr.guard_suppression_change();
ALTER TABLE gdpr.suppression_list ENABLE ALWAYS TRIGGER suppression_list_guard;
ALTER TABLE gdpr.suppression_list ENABLE ALWAYS TRIGGER suppression_list_no_truncate;

-- v3: ingestion pipelines that check before import (optout.filter_suppressed / is_suppressed) read
-- the list and nothing else: GRANT gdpr_list_reader TO <the loader's login role>.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'gdpr_list_reader') THEN
        CREATE ROLE gdpr_list_reader NOLOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA gdpr TO gdpr_list_reader;
GRANT SELECT ON gdpr.suppression_list TO gdpr_list_reader;

-- v3: subjects found again after their erasure (re-imported) and quarantined instead of erased
-- (policy `optout.resurrection: quarantine`, or a legal hold applies now). A person appears only as
-- the subject's internal id and the list's keyed hash. A quarantined subject is not reported again;
-- a reviewer erases it (gdpr_subject_erasure) or keeps it, and the row stays as the record.
CREATE TABLE IF NOT EXISTS gdpr.quarantine (
    subject_table  text NOT NULL,
    subject_id     text NOT NULL,
    email_hash     text NOT NULL,
    request_id     text,
    reason         text NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject_table, subject_id)
);
REVOKE ALL ON gdpr.quarantine FROM PUBLIC;
GRANT SELECT, INSERT ON gdpr.quarantine TO gdpr_engine;
GRANT SELECT ON gdpr.quarantine TO gdpr_auditor;

-- Erasure requests (GDPR art. 17): one row per request id; the subject appears only as a keyed hash.
-- Versions 1-6 kept them in this table; version 7 moves its rows into gdpr.request (every kind of
-- request) and replaces it by a read-only view of the same name (see "v7: one request lifecycle").
CREATE TABLE IF NOT EXISTS gdpr.erasure_request (
    request_id    text PRIMARY KEY,
    subject_hash  text NOT NULL,
    received_at   date NOT NULL,
    due_date      date NOT NULL,
    status        text NOT NULL CHECK (status IN ('refused', 'not_found', 'pending_propagation', 'completed')),
    outcome       text NOT NULL CHECK (outcome IN ('erased', 'restricted', 'refused', 'not_found')),
    reason        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    deadline_warned_at timestamptz,
    details       jsonb NOT NULL DEFAULT '{}'::jsonb
);
REVOKE ALL ON gdpr.erasure_request FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON gdpr.erasure_request TO gdpr_engine;
GRANT SELECT ON gdpr.erasure_request TO gdpr_auditor;

-- Outbox of erasures to propagate downstream. The identifier a target needs is kept only
-- encrypted with the store key (AES-256-GCM, AAD = request_id|target|key_id) until the target acknowledged; then the
-- ciphertext is destroyed (set to NULL) and the destruction audited.
CREATE TABLE IF NOT EXISTS gdpr.erasure_propagation (
    request_id       text NOT NULL REFERENCES gdpr.erasure_request (request_id),
    target           text NOT NULL,
    status           text NOT NULL CHECK (status IN ('pending', 'acknowledged')),
    attempts         integer NOT NULL DEFAULT 0,
    key_id           text,
    nonce            bytea,
    identifier_ciphertext bytea,
    last_result      text,
    last_attempt_at  timestamptz,
    acknowledged_at  timestamptz,
    PRIMARY KEY (request_id, target),
    CHECK (status = 'pending' OR identifier_ciphertext IS NULL)
);
REVOKE ALL ON gdpr.erasure_propagation FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON gdpr.erasure_propagation TO gdpr_engine;
GRANT SELECT (request_id, target, status, attempts, last_result, last_attempt_at, acknowledged_at)
    ON gdpr.erasure_propagation TO gdpr_auditor;

-- Every version of the register of processing activities (GDPR art. 30) the sweep generated: the text
-- in force on a given day can be shown later, whatever happened to the worker that wrote the files.
-- No data subject's personal data: the register describes processing, not people. Append-only by
-- grants (a new text is a new row; the same text generated again keeps its first row).
CREATE TABLE IF NOT EXISTS gdpr.processing_register (
    sha256        text PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    generated_at  timestamptz NOT NULL DEFAULT now(),
    policy_file   text NOT NULL,
    activities    integer NOT NULL,
    markdown      text NOT NULL,
    html          text NOT NULL
);
REVOKE ALL ON gdpr.processing_register FROM PUBLIC;
GRANT SELECT, INSERT ON gdpr.processing_register TO gdpr_engine;
GRANT SELECT ON gdpr.processing_register TO gdpr_auditor;

-- v5: a claim (lease) on an outbox row while one worker calls its target, so that no transaction and no
-- row lock is held across the network call. A worker sets claimed_until and claimed_by in a short
-- committed transaction, calls the target, then records the answer in a second short transaction; another
-- worker skips a row whose claim has not expired. The claim of a worker that died mid-call expires by
-- itself. claimed_by names the DAG run and task (no personal data).
ALTER TABLE gdpr.erasure_propagation ADD COLUMN IF NOT EXISTS claimed_until timestamptz;
ALTER TABLE gdpr.erasure_propagation ADD COLUMN IF NOT EXISTS claimed_by text;
GRANT SELECT (claimed_until, claimed_by) ON gdpr.erasure_propagation TO gdpr_auditor;

-- v7: one request lifecycle. Every request a person makes (GDPR art. 15-21) is one row of gdpr.request,
-- whatever its kind; the subject appears only as a keyed hash. A request registered before it runs
-- (`warehouse-gdpr request new`) also holds the person's identifier (normalised email, or
-- 'subject_id:N'), encrypted with the store key (`store_keys` of the keys connection; the archive key of
-- the earlier key layout) (AES-256-GCM, AAD = request|request_id|kind|key_id);
-- the ciphertext is destroyed (set to NULL) once the request is complete, the keyed hash stays.
-- Rows are kept as proof, then purged by the weekly sweep (policy `requests.keep_for` after completion).
CREATE TABLE IF NOT EXISTS gdpr.request (
    request_id         text PRIMARY KEY,
    kind               text NOT NULL CHECK (kind IN ('access', 'portability', 'rectification', 'restriction',
                                                     'restriction_lift', 'erasure', 'objection')),
    subject_hash       text NOT NULL,
    received_at        date NOT NULL,
    due_date           date NOT NULL,          -- one month after receipt (art. 12(3))
    status             text NOT NULL CHECK (status IN ('registered', 'in_progress', 'pending_propagation',
                                                       'completed', 'refused', 'not_found')),
    outcome            text CHECK (outcome ~ '^[a-z_]{1,40}$'),
    reason             text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    deadline_warned_at timestamptz,
    -- art. 12(3): extended once, to at most three months after receipt, with the controller's reason
    extended_due_date  date,
    extension_reason   text CHECK (char_length(extension_reason) BETWEEN 1 AND 500),
    extended_at        timestamptz,
    -- what the article asks to keep as evidence: tables and counts, targets, holds (no personal data)
    details            jsonb NOT NULL DEFAULT '{}'::jsonb,
    key_id             text,
    nonce              bytea,
    identifier_ciphertext bytea,
    CONSTRAINT request_erasure_outcome CHECK (kind <> 'erasure' OR outcome IS NULL
                                              OR outcome IN ('erased', 'restricted', 'refused', 'not_found')),
    CONSTRAINT request_outcome_when_run CHECK (status IN ('registered', 'in_progress') OR outcome IS NOT NULL),
    CONSTRAINT request_completed_at CHECK ((completed_at IS NOT NULL) = (status IN ('completed', 'refused', 'not_found'))),
    CONSTRAINT request_extension CHECK (
        (extended_due_date IS NULL AND extension_reason IS NULL AND extended_at IS NULL)
        OR (extended_due_date IS NOT NULL AND extension_reason IS NOT NULL AND extended_at IS NOT NULL
            AND extended_due_date > due_date AND extended_due_date <= received_at + interval '3 months')),
    CONSTRAINT request_identifier CHECK ((key_id IS NULL) = (nonce IS NULL) AND (nonce IS NULL) = (identifier_ciphertext IS NULL))
);
CREATE INDEX IF NOT EXISTS request_completed_idx ON gdpr.request (completed_at, request_id);
CREATE INDEX IF NOT EXISTS request_open_idx ON gdpr.request (due_date) WHERE completed_at IS NULL;

-- Checked for everyone, the owner included: an extension is given once and never changed; a request
-- still open is never deleted (the sweep purges completed ones only).
CREATE OR REPLACE FUNCTION gdpr.guard_request_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.completed_at IS NULL THEN
            RAISE EXCEPTION 'gdpr.request: request % is not complete and may not be deleted', OLD.request_id
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN OLD;
    END IF;
    IF OLD.extended_due_date IS NOT NULL
       AND (NEW.extended_due_date, NEW.extension_reason, NEW.extended_at)
           IS DISTINCT FROM (OLD.extended_due_date, OLD.extension_reason, OLD.extended_at) THEN
        RAISE EXCEPTION 'gdpr.request: request % was already extended; an extension is given once', OLD.request_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS request_guard ON gdpr.request;
CREATE TRIGGER request_guard
    BEFORE UPDATE OR DELETE ON gdpr.request
    FOR EACH ROW EXECUTE FUNCTION gdpr.guard_request_change();
ALTER TABLE gdpr.request ENABLE ALWAYS TRIGGER request_guard;

-- The upgrade from an earlier version (1-6), in place: the erasure requests move into gdpr.request (kind 'erasure'),
-- the outbox's foreign key follows them, the old table is dropped. Nothing is lost: this runs in the
-- installer's one transaction. A DBA's own view on the old table stops the upgrade (DROP refuses),
-- rather than silently reading every kind of request.
DO $$
DECLARE
    fk name;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('gdpr.erasure_request')) = 'r' THEN
        INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome, reason,
                                  created_at, completed_at, deadline_warned_at, details)
        SELECT request_id, 'erasure', subject_hash, received_at, due_date, status, outcome, reason,
               created_at, completed_at, deadline_warned_at, details
        FROM gdpr.erasure_request;
        FOR fk IN SELECT conname FROM pg_constraint
                  WHERE conrelid = 'gdpr.erasure_propagation'::regclass AND confrelid = 'gdpr.erasure_request'::regclass
        LOOP
            EXECUTE format('ALTER TABLE gdpr.erasure_propagation DROP CONSTRAINT %I', fk);
        END LOOP;
        DROP TABLE gdpr.erasure_request;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'erasure_propagation_request_fkey'
                   AND conrelid = 'gdpr.erasure_propagation'::regclass) THEN
        ALTER TABLE gdpr.erasure_propagation ADD CONSTRAINT erasure_propagation_request_fkey
            FOREIGN KEY (request_id) REFERENCES gdpr.request (request_id);
    END IF;
END
$$;

-- For readers of versions 1-6 (reports, a DBA's queries): the erasure requests that ran, with the
-- columns they had (due_date is the extended one when extended). Read-only: the engine writes gdpr.request.
CREATE OR REPLACE VIEW gdpr.erasure_request AS
SELECT request_id, subject_hash, received_at, coalesce(extended_due_date, due_date) AS due_date, status, outcome,
       reason, created_at, completed_at, deadline_warned_at, details
FROM gdpr.request
WHERE kind = 'erasure' AND status IN ('refused', 'not_found', 'pending_propagation', 'completed');

REVOKE ALL ON gdpr.request FROM PUBLIC;
REVOKE ALL ON gdpr.erasure_request FROM PUBLIC, gdpr_engine, gdpr_auditor;
GRANT SELECT ON gdpr.erasure_request TO gdpr_engine, gdpr_auditor;
-- The engine cannot choose created_at, nor change a request's id, kind, receipt or first due date.
GRANT SELECT, DELETE ON gdpr.request TO gdpr_engine;
GRANT INSERT (request_id, kind, subject_hash, received_at, due_date, status, outcome, reason, completed_at, details,
              key_id, nonce, identifier_ciphertext)
    ON gdpr.request TO gdpr_engine;
GRANT UPDATE (subject_hash, status, outcome, reason, completed_at, deadline_warned_at, details,
              extended_due_date, extension_reason, extended_at, key_id, nonce, identifier_ciphertext)
    ON gdpr.request TO gdpr_engine;
GRANT SELECT (request_id, kind, subject_hash, received_at, due_date, status, outcome, reason, created_at,
              completed_at, deadline_warned_at, extended_due_date, extension_reason, extended_at, details)
    ON gdpr.request TO gdpr_auditor;

-- The sweep purges the outbox rows of the requests it purges; a pending row is never deleted.
GRANT DELETE ON gdpr.erasure_propagation TO gdpr_engine;
CREATE OR REPLACE FUNCTION gdpr.guard_propagation_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'pending' THEN
        RAISE EXCEPTION 'gdpr.erasure_propagation: the pending row of request % and target % may not be deleted',
            OLD.request_id, OLD.target USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN OLD;
END
$$;
DROP TRIGGER IF EXISTS erasure_propagation_no_pending_delete ON gdpr.erasure_propagation;
CREATE TRIGGER erasure_propagation_no_pending_delete
    BEFORE DELETE ON gdpr.erasure_propagation
    FOR EACH ROW EXECUTE FUNCTION gdpr.guard_propagation_delete();
ALTER TABLE gdpr.erasure_propagation ENABLE ALWAYS TRIGGER erasure_propagation_no_pending_delete;

INSERT INTO gdpr.schema_version (version) VALUES (1), (2), (3), (4), (5), (6), (7) ON CONFLICT (version) DO NOTHING;

-- ===================================================================================================
-- v8: the audit log is a hash chain (tamper evidence).
-- Every row carries chain_seq (its position: 1, 2, 3, ... without a gap), prev_hash (the row_hash of
-- the row before it; for position 1, a value derived from the chain's id) and row_hash = SHA-256 over a
-- canonical encoding of its position, prev_hash and every content column (gdpr.audit_row_hash below;
-- engine/auditchain.py recomputes it in Python, independently of this file). The database fills them
-- for every writer, at COMMIT: a deferred constraint trigger locks the one-row chain head
-- (gdpr.audit_chain_head, FOR UPDATE) only while the transaction commits, so the chain follows commit
-- order, two writers never share a position, and no lock is held while a transaction does its work.
-- `warehouse-gdpr audit verify` and each DAG's last task recompute the chain; the head each DAG run
-- exports outside the warehouse (policy `evidence.location`) shows a truncated tail.
-- A column added to gdpr.audit_log must be added to gdpr.audit_row_hash and to engine/auditchain.py.
ALTER TABLE gdpr.audit_log ADD COLUMN IF NOT EXISTS chain_seq bigint;
ALTER TABLE gdpr.audit_log ADD COLUMN IF NOT EXISTS prev_hash text;
ALTER TABLE gdpr.audit_log ADD COLUMN IF NOT EXISTS row_hash text;
CREATE UNIQUE INDEX IF NOT EXISTS audit_log_chain_seq_idx ON gdpr.audit_log (chain_seq);

-- The hash the chain starts from: derived from the chain's id, so that a chain cannot be passed off as
-- another warehouse's (and the exported heads of several warehouses never mix).
CREATE OR REPLACE FUNCTION gdpr.audit_chain_genesis(chain_id uuid) RETURNS text
LANGUAGE sql IMMUTABLE STRICT SET search_path = pg_catalog AS $$
    SELECT encode(sha256(convert_to('gdpr.audit_log/v1/genesis/' || chain_id::text, 'UTF8')), 'hex')
$$;

-- The canonical encoding: a version tag, then each field as `<UTF-8 byte length>:<text>` (NULL: `~`),
-- in a fixed order. Texts as PostgreSQL prints them, except logged_at (UTC, microseconds, ISO 8601)
-- and dry_run (`true`/`false`); details is jsonb's own text form.
CREATE OR REPLACE FUNCTION gdpr.audit_row_hash(seq bigint, prev text, r gdpr.audit_log) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT encode(sha256(convert_to('gdpr.audit_log/v1' || string_agg(
               CASE WHEN f IS NULL THEN '~' ELSE octet_length(convert_to(f, 'UTF8'))::text || ':' || f END,
               '' ORDER BY i), 'UTF8')), 'hex')
    FROM unnest(ARRAY[
        seq::text, prev, r.audit_id::text,
        to_char(r.logged_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
        r.dag_id, r.run_id, r.task_id, r.rule, r.table_name, r.action, r.row_count::text,
        CASE WHEN r.dry_run THEN 'true' WHEN NOT r.dry_run THEN 'false' END,
        r.outcome, r.subject_hash, r.details::text
    ]) WITH ORDINALITY AS u(f, i)
$$;

-- The chain head: the last chained row. One row, locked FOR UPDATE by each committing writer.
CREATE TABLE IF NOT EXISTS gdpr.audit_chain_head (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    chain_id   uuid NOT NULL,
    chain_seq  bigint NOT NULL CHECK (chain_seq >= 0),
    audit_id   bigint,
    row_hash   text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO gdpr.audit_chain_head (chain_id, chain_seq, row_hash)
SELECT id, 0, gdpr.audit_chain_genesis(id) FROM (SELECT gen_random_uuid() AS id) AS new_chain
ON CONFLICT (singleton) DO NOTHING;
REVOKE ALL ON gdpr.audit_chain_head FROM PUBLIC;
GRANT SELECT ON gdpr.audit_chain_head TO gdpr_engine, gdpr_auditor;

-- The append-only guard of gdpr.audit_log (defined above) as of v8: it also lets the chain trigger fill
-- the three chain columns of a row not chained yet, once, leaving every other column as it is.
CREATE OR REPLACE FUNCTION gdpr.refuse_audit_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF current_setting('gdpr.audit_chaining', true) = 'on'
           AND OLD.chain_seq IS NULL AND OLD.prev_hash IS NULL AND OLD.row_hash IS NULL
           AND to_jsonb(NEW) - ARRAY['chain_seq', 'prev_hash', 'row_hash']
               = to_jsonb(OLD) - ARRAY['chain_seq', 'prev_hash', 'row_hash'] THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'gdpr.audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

-- Runs at COMMIT for each row the transaction inserted, in insertion order, as the schema's owner
-- (the engine may insert audit rows but never update them).
CREATE OR REPLACE FUNCTION gdpr.chain_audit_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    head gdpr.audit_chain_head;
    digest text;
BEGIN
    IF NEW.chain_seq IS NOT NULL OR NEW.prev_hash IS NOT NULL OR NEW.row_hash IS NOT NULL THEN
        RAISE EXCEPTION 'gdpr.audit_log: chain_seq, prev_hash and row_hash are set by the database, not by an INSERT'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT * INTO head FROM gdpr.audit_chain_head FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'gdpr.audit_chain_head is empty: the audit chain has no head (run warehouse-gdpr schema install)'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    digest := gdpr.audit_row_hash(head.chain_seq + 1, head.row_hash, NEW);
    PERFORM set_config('gdpr.audit_chaining', 'on', true);
    UPDATE gdpr.audit_log SET chain_seq = head.chain_seq + 1, prev_hash = head.row_hash, row_hash = digest
    WHERE audit_id = NEW.audit_id;
    PERFORM set_config('gdpr.audit_chaining', '', true);
    UPDATE gdpr.audit_chain_head
    SET chain_seq = head.chain_seq + 1, audit_id = NEW.audit_id, row_hash = digest, updated_at = clock_timestamp();
    RETURN NULL;
END
$$;

-- The upgrade to v8 chains the rows already there, in audit_id order (one UPDATE). Only then: a row
-- inserted later with the trigger disabled is never chained by running this file again.
DO $$
DECLARE
    head gdpr.audit_chain_head;
    r gdpr.audit_log;
    ids bigint[] := '{}';
    seqs bigint[] := '{}';
    prevs text[] := '{}';
    digests text[] := '{}';
    seq bigint;
    prev text;
BEGIN
    IF EXISTS (SELECT 1 FROM gdpr.schema_version WHERE version = 8) THEN
        RETURN;
    END IF;
    SELECT * INTO head FROM gdpr.audit_chain_head FOR UPDATE;
    seq := head.chain_seq;
    prev := head.row_hash;
    FOR r IN SELECT * FROM gdpr.audit_log WHERE chain_seq IS NULL ORDER BY audit_id LOOP
        seq := seq + 1;
        ids := ids || r.audit_id;
        seqs := seqs || seq;
        prevs := prevs || prev;
        prev := gdpr.audit_row_hash(seq, prev, r);
        digests := digests || prev;
    END LOOP;
    IF seq > head.chain_seq THEN
        PERFORM set_config('gdpr.audit_chaining', 'on', true);
        UPDATE gdpr.audit_log AS a SET chain_seq = u.seq, prev_hash = u.prev, row_hash = u.digest
        FROM unnest(ids, seqs, prevs, digests) AS u(id, seq, prev, digest)
        WHERE a.audit_id = u.id;
        PERFORM set_config('gdpr.audit_chaining', '', true);
        UPDATE gdpr.audit_chain_head
        SET chain_seq = seq, audit_id = ids[array_upper(ids, 1)], row_hash = prev, updated_at = clock_timestamp();
    END IF;
END
$$;

DROP TRIGGER IF EXISTS audit_log_chain ON gdpr.audit_log;
CREATE CONSTRAINT TRIGGER audit_log_chain
    AFTER INSERT ON gdpr.audit_log
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION gdpr.chain_audit_row();
-- ALWAYS: rows inserted under session_replication_role = replica are chained too.
ALTER TABLE gdpr.audit_log ENABLE ALWAYS TRIGGER audit_log_chain;

-- v8: an archived original is deleted only once past its purge date (the sweep's purge, any role), or
-- earlier by an erasure through gdpr.erase_archived_rows, which writes the audit rows of what it destroys
-- in the same statement. Checked for the engine's role; the archive's owner (and a function it owns)
-- passes, as it could drop the trigger anyway.
CREATE OR REPLACE FUNCTION gdpr.guard_archive_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.purge_after <= now()
       OR current_user = (SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = TG_RELID) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'gdpr_archive.archived_row: archive row % is kept until %; only an erasure '
                    '(gdpr.erase_archived_rows, audited) may delete it earlier', OLD.archive_id, OLD.purge_after
        USING ERRCODE = 'insufficient_privilege';
END
$$;
DROP TRIGGER IF EXISTS archived_row_guard ON gdpr_archive.archived_row;
CREATE TRIGGER archived_row_guard
    BEFORE DELETE ON gdpr_archive.archived_row
    FOR EACH ROW EXECUTE FUNCTION gdpr.guard_archive_delete();
ALTER TABLE gdpr_archive.archived_row ENABLE ALWAYS TRIGGER archived_row_guard;

-- One person's archived originals that no legal obligation keeps: those of `p_subject_ids`, except the
-- rows of `p_kept_tables` whose purge date is ahead. One audit row per source table (action
-- erase_archive, outcome destroyed), in the same statement as the deletion. Returns rows per table.
CREATE OR REPLACE FUNCTION gdpr.erase_archived_rows(
    p_subject_ids text[], p_kept_tables text[], p_request_id text, p_subject_hash text,
    p_dag_id text, p_run_id text, p_task_id text)
RETURNS TABLE (source_table text, destroyed bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_request_id IS NULL OR p_subject_hash IS NULL THEN
        RAISE EXCEPTION 'gdpr.erase_archived_rows: an erasure names its request id and the subject''s hash'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH gone AS (
        DELETE FROM gdpr_archive.archived_row AS a
        WHERE a.subject_id = ANY(p_subject_ids)
          AND NOT (a.source_table = ANY(coalesce(p_kept_tables, '{}')) AND a.purge_after > now())
        RETURNING a.source_table
    ), counted AS (
        SELECT g.source_table AS tbl, count(*) AS n FROM gone AS g GROUP BY g.source_table
    ), audited AS (
        INSERT INTO gdpr.audit_log (dag_id, run_id, task_id, table_name, action, row_count, dry_run, outcome,
                                    subject_hash, details)
        SELECT p_dag_id, p_run_id, p_task_id, 'gdpr_archive.archived_row', 'erase_archive', c.n, false, 'destroyed',
               p_subject_hash, jsonb_build_object('request_id', p_request_id, 'source_table', c.tbl)
        FROM counted AS c ORDER BY c.tbl
        RETURNING 1
    )
    SELECT c.tbl, c.n FROM counted AS c ORDER BY c.tbl;
END
$$;
REVOKE ALL ON FUNCTION gdpr.erase_archived_rows(text[], text[], text, text, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION gdpr.erase_archived_rows(text[], text[], text, text, text, text, text) TO gdpr_engine;

-- v8: a suppression entry is never re-keyed in place. The database cannot check a re-keyed hash (that
-- needs the pepper, which it must never hold), so a re-keying inserts the entry under the new key and
-- keeps the old one; lookups hash under every key of the chain and find either. The old entry is only
-- marked (rekeyed_at, set once) so that the next sync does not hash it again. The engine's role may no
-- longer change email_hash or key_id; nobody may (the owner included, while the trigger is on).
ALTER TABLE gdpr.suppression_list ADD COLUMN IF NOT EXISTS rekeyed_at timestamptz;
REVOKE UPDATE (email_hash, key_id) ON gdpr.suppression_list FROM gdpr_engine;
GRANT UPDATE (reason, request_id, rekeyed_at) ON gdpr.suppression_list TO gdpr_engine;

CREATE OR REPLACE FUNCTION gdpr.guard_suppression_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.rekeyed_at IS NULL AND NEW.rekeyed_at IS NOT NULL
           AND (NEW.email_hash, NEW.key_id, NEW.reason, NEW.source, NEW.request_id, NEW.first_seen)
               IS NOT DISTINCT FROM (OLD.email_hash, OLD.key_id, OLD.reason, OLD.source, OLD.request_id, OLD.first_seen) THEN
            RETURN NEW;  -- re-keyed: the entry under the new key was inserted, this one stays
        END IF;
        IF OLD.reason = 'opt_out' AND NEW.reason = 'erasure' AND NEW.request_id IS NOT NULL
           AND (NEW.email_hash, NEW.key_id, NEW.source, NEW.first_seen, NEW.rekeyed_at)
               IS NOT DISTINCT FROM (OLD.email_hash, OLD.key_id, OLD.source, OLD.first_seen, OLD.rekeyed_at) THEN
            RETURN NEW;  -- opted out, then erased
        END IF;
    END IF;
    RAISE EXCEPTION 'gdpr.suppression_list is permanent: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'an entry is never deleted nor re-keyed in place; only opt_out -> erasure (reason and request_id) '
                     'and marking it re-keyed (rekeyed_at, once) are allowed';
END
$$;

INSERT INTO gdpr.schema_version (version) VALUES (8) ON CONFLICT (version) DO NOTHING;
-- end of v8 ==========================================================================================

-- v9: rectification and restriction of processing (GDPR art. 16 and 18) ----------------------------------------
-- The restrictions in force: one row per restricted person (the keyed hash of the normalised email, or of
-- 'subject-id:N' for a person known by id only), the subject rows it covers (their ids, as text), and the ids
-- whose do-not-contact flag the restriction set (cleared again at `lift`). Recorded here, not only in a CRM
-- column, so that it survives an import that rewrites the contact row: the opt-out sync flags the person again
-- (by id, and by the keyed hash of the email when the import gave the row a new id). `lift` deletes the row;
-- gdpr.request (kinds 'restriction' and 'restriction_lift') and the audit log keep the history. The retention
-- sweep holds these subjects (built-in hold `processing_restricted`); an erasure is not held by it.
CREATE TABLE IF NOT EXISTS gdpr.restriction (
    subject_hash   text PRIMARY KEY,
    by_email       boolean NOT NULL,       -- subject_hash is an email's keyed hash (the opt-out sync can match it)
    key_id         text NOT NULL,          -- the pepper's key id of subject_hash
    subject_table  text NOT NULL,
    subject_ids    text[] NOT NULL DEFAULT '{}',
    flagged_ids    text[] NOT NULL DEFAULT '{}',
    request_id     text NOT NULL,
    restricted_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS restriction_subject_ids_idx ON gdpr.restriction USING gin (subject_ids);
REVOKE ALL ON gdpr.restriction FROM PUBLIC;
GRANT SELECT, INSERT, DELETE ON gdpr.restriction TO gdpr_engine;
GRANT UPDATE (subject_hash, key_id, subject_ids, flagged_ids) ON gdpr.restriction TO gdpr_engine;
GRANT SELECT (by_email, key_id, subject_table, subject_ids, request_id, restricted_at) ON gdpr.restriction
    TO gdpr_auditor;

-- The database guard (policy `restriction.database_guard`): a trigger on each mapped table, installed by
-- `warehouse-gdpr schema install --policy POLICY` as the tables' owner, refuses UPDATE and DELETE of a
-- restricted person's rows (linked to them by the table's subject column) by every session whose login role
-- is not a member of gdpr_engine. Enabled ALWAYS, like the audit log's (session_replication_role = replica
-- does not skip it). The trigger's WHEN clause lets the engine's own statements through without a call.
-- Arguments: the subject table ('schema.table') and the table's column holding the subject's id.
CREATE OR REPLACE FUNCTION gdpr.refuse_restricted_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    subject_id text := to_jsonb(OLD) ->> TG_ARGV[1];
BEGIN
    IF subject_id IS NOT NULL AND EXISTS (
        SELECT 1 FROM gdpr.restriction r WHERE r.subject_table = TG_ARGV[0] AND r.subject_ids @> ARRAY[subject_id]
    ) THEN
        RAISE EXCEPTION 'processing of this person is restricted (GDPR art. 18): % on %.% refused',
            TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'only warehouse-gdpr (gdpr_engine) changes these rows until the restriction is lifted';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION gdpr.refuse_restricted_change() FROM PUBLIC;

INSERT INTO gdpr.schema_version (version) VALUES (9) ON CONFLICT (version) DO NOTHING;
-- end of v9 ==========================================================================================

-- v10: a record the engine cannot falsify: requests and outbox rows follow their lifecycle ==================
-- Checked for every role but the tables' owner (and the functions it owns), as the archive guard is: the
-- owner could drop these triggers anyway; the engine's role (gdpr_engine) cannot. A DBA reviews them here.
--
-- gdpr.request, before each change (guard_request_lifecycle):
--   INSERT        as 'registered' (warehouse-gdpr request new), or already run: 'pending_propagation' or a
--                 final status (a request triggered with the email), completed_at = now() when final;
--   registered -> registered            an extension (extended_*), or the deadline warning (deadline_warned_at);
--   registered -> pending_propagation | completed | refused | not_found
--                 the run: subject_hash, status, outcome, reason, completed_at (= now() when final), details;
--   pending_propagation -> pending_propagation   an extension, or the deadline warning (deadline_warned_at);
--   pending_propagation -> completed    no outbox row of the request pending; status and completed_at = now();
--   completed | refused | not_found     final: only the encrypted identifier may be destroyed (set to NULL);
--   DELETE        not granted: gdpr.purge_requests below, past the retention period, audited in its statement.
-- gdpr.erasure_propagation (the outbox), before each change (guard_outbox_lifecycle):
--   INSERT        'pending', never tried, for a request that is pending_propagation;
--   pending -> pending        a claim or an attempt (attempts + 1, last_result, last_attempt_at, claimed_*);
--   pending -> acknowledged   acknowledged_at = now(), the ciphertext destroyed, nothing else;
--   acknowledged              final (no change back);
--   DELETE        not granted: gdpr.purge_requests, with the request.
-- At COMMIT (deferred constraint triggers), each status change, insert and extension of a request, and each
-- acknowledgement, has its audit row written in the same transaction: an audit row naming the request (and
-- the target), with the action and outcome of that step (check_request_audited, check_outbox_audited).
-- The audit rows of the transaction are found through gdpr.audit_xact, which a trigger on gdpr.audit_log
-- fills (transaction id, request id, target, action, outcome of each audit row naming a request) and which
-- no other role may write: the engine cannot claim an audit row it did not write.
-- A certificate (action 'certificate', an erasure's) or a request's record (action 'request_record', the
-- other kinds) must say what gdpr.request and the outbox hold when it is written: request, kind, status,
-- outcome, subject, rows by table, targets and their statuses; for every role, the owner included.

CREATE OR REPLACE FUNCTION gdpr.acts_as_owner(rel regclass) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT current_user = (SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = rel)
$$;

-- Which request (and target) each audit row of a running transaction names. Transient: rows of finished
-- transactions are pruned by the next writer; unlogged (nothing to recover after a crash).
CREATE UNLOGGED TABLE IF NOT EXISTS gdpr.audit_xact (
    xact       xid8 NOT NULL,
    request_id text NOT NULL,
    target     text,
    action     text NOT NULL,
    outcome    text NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_xact_idx ON gdpr.audit_xact (xact, request_id);
REVOKE ALL ON gdpr.audit_xact FROM PUBLIC;

CREATE OR REPLACE FUNCTION gdpr.audit_rows_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    forged text;
BEGIN
    SELECT n.details->>'request_id' INTO forged
    FROM new_rows AS n
    LEFT JOIN gdpr.request AS r ON r.request_id = n.details->>'request_id'
    WHERE n.action IN ('certificate', 'request_record')
      AND NOT coalesce(
          (n.action = 'certificate') = (r.kind = 'erasure')
          AND n.outcome = r.status AND n.details->>'status' = r.status
          AND n.details->>'outcome' IS NOT DISTINCT FROM r.outcome
          AND n.subject_hash IS NOT DISTINCT FROM r.subject_hash
          AND (n.details->>'completed_at' IS NULL) = (r.completed_at IS NULL)
          AND n.details->'rows_by_table' = coalesce(r.details->'rows', '{}'::jsonb)
          AND jsonb_typeof(n.details->'targets') = 'array'
          AND (SELECT coalesce(jsonb_agg(jsonb_build_array(p.target, p.status) ORDER BY p.target), '[]')
               FROM gdpr.erasure_propagation AS p WHERE p.request_id = r.request_id)
              = (SELECT coalesce(jsonb_agg(jsonb_build_array(t->>'target', t->>'status') ORDER BY t->>'target'), '[]')
                 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(n.details->'targets') = 'array'
                                                THEN n.details->'targets' ELSE '[]' END) AS t),
          false)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'gdpr.audit_log: a certificate or record of request % must say what gdpr.request and the '
                        'outbox hold (kind, status, outcome, subject, rows, targets)', coalesce(forged, '(none)')
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO gdpr.audit_xact (xact, request_id, target, action, outcome)
    SELECT pg_current_xact_id(), n.details->>'request_id', n.details->>'target', n.action, n.outcome
    FROM new_rows AS n
    WHERE NOT n.dry_run AND n.details->>'request_id' IS NOT NULL;
    IF FOUND THEN  -- prune the marks of finished transactions, skipping those another writer prunes
        DELETE FROM gdpr.audit_xact WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM gdpr.audit_xact WHERE xact < pg_snapshot_xmin(pg_current_snapshot())
            FOR UPDATE SKIP LOCKED));
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS audit_log_rows_inserted ON gdpr.audit_log;
CREATE TRIGGER audit_log_rows_inserted
    AFTER INSERT ON gdpr.audit_log REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION gdpr.audit_rows_inserted();
ALTER TABLE gdpr.audit_log ENABLE ALWAYS TRIGGER audit_log_rows_inserted;

-- Whether this transaction wrote an audit row naming `request_id` (and `target`, when given) with one of
-- `actions` and the outcome `outcome`.
CREATE OR REPLACE FUNCTION gdpr.audited_in_this_transaction(request_id text, target text, actions text[],
                                                            outcome text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM gdpr.audit_xact AS m
                   WHERE m.xact = pg_current_xact_id() AND m.request_id = $1
                     AND ($2 IS NULL OR m.target = $2) AND m.action = ANY($3) AND m.outcome = $4)
$$;
REVOKE ALL ON FUNCTION gdpr.audited_in_this_transaction(text, text, text[], text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION gdpr.refuse_lifecycle(what text, id text, change text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% %: % refused', what, id, change
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'a request and its outbox rows change only along their lifecycle (see gdpr_schema.sql, v10)';
END
$$;

CREATE OR REPLACE FUNCTION gdpr.guard_request_lifecycle() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    final constant text[] := ARRAY['completed', 'refused', 'not_found'];
    o jsonb;
    n jsonb;
BEGIN
    IF gdpr.acts_as_owner(TG_RELID) THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NEW.status = 'in_progress' OR NEW.deadline_warned_at IS NOT NULL
           OR (NEW.status = ANY(final) AND NEW.completed_at IS DISTINCT FROM now()) THEN
            PERFORM gdpr.refuse_lifecycle('gdpr.request', 'request ' || NEW.request_id, 'inserting it as ' || NEW.status);
        END IF;
        RETURN NEW;
    END IF;
    o := to_jsonb(OLD);
    n := to_jsonb(NEW);
    IF OLD.status = ANY(final) THEN
        IF n - ARRAY['key_id', 'nonce', 'identifier_ciphertext'] = o - ARRAY['key_id', 'nonce', 'identifier_ciphertext']
           AND NEW.identifier_ciphertext IS NULL THEN
            RETURN NEW;  -- its encrypted identifier destroyed
        END IF;
    ELSIF OLD.status = 'registered' AND NEW.status = 'registered' THEN
        IF n - ARRAY['extended_due_date', 'extension_reason', 'extended_at', 'deadline_warned_at']
           = o - ARRAY['extended_due_date', 'extension_reason', 'extended_at', 'deadline_warned_at'] THEN
            RETURN NEW;  -- extended, or warned of its deadline
        END IF;
    ELSIF OLD.status = 'registered' AND NEW.status IN ('pending_propagation', 'completed', 'refused', 'not_found') THEN
        IF n - ARRAY['subject_hash', 'status', 'outcome', 'reason', 'completed_at', 'details']
           = o - ARRAY['subject_hash', 'status', 'outcome', 'reason', 'completed_at', 'details']
           AND (NEW.status = 'pending_propagation' OR NEW.completed_at = now()) THEN
            RETURN NEW;  -- run
        END IF;
    ELSIF OLD.status = 'pending_propagation' AND NEW.status = 'pending_propagation' THEN
        IF n - ARRAY['extended_due_date', 'extension_reason', 'extended_at', 'deadline_warned_at']
           = o - ARRAY['extended_due_date', 'extension_reason', 'extended_at', 'deadline_warned_at'] THEN
            RETURN NEW;  -- extended, or warned of its deadline
        END IF;
    ELSIF OLD.status = 'pending_propagation' AND NEW.status = 'completed' THEN
        IF n - ARRAY['status', 'completed_at'] = o - ARRAY['status', 'completed_at'] AND NEW.completed_at = now() THEN
            IF EXISTS (SELECT 1 FROM gdpr.erasure_propagation p
                       WHERE p.request_id = NEW.request_id AND p.status = 'pending') THEN
                PERFORM gdpr.refuse_lifecycle('gdpr.request', 'request ' || NEW.request_id,
                                              'completing it while a target is still pending');
            END IF;
            RETURN NEW;  -- every target acknowledged
        END IF;
    END IF;
    PERFORM gdpr.refuse_lifecycle('gdpr.request', 'request ' || NEW.request_id,
                                  CASE WHEN OLD.status = NEW.status THEN 'this change of a ' || OLD.status || ' request'
                                       ELSE OLD.status || ' -> ' || NEW.status END);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS request_lifecycle ON gdpr.request;
CREATE TRIGGER request_lifecycle
    BEFORE INSERT OR UPDATE ON gdpr.request
    FOR EACH ROW EXECUTE FUNCTION gdpr.guard_request_lifecycle();
ALTER TABLE gdpr.request ENABLE ALWAYS TRIGGER request_lifecycle;

-- At COMMIT: the audit row of each insert, run, completion and extension of a request.
CREATE OR REPLACE FUNCTION gdpr.check_request_audited() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    actions text[];
    wanted text;
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.status = 'pending_propagation' AND NEW.status = 'completed' THEN
        actions := ARRAY['certificate', 'request_record'];
        wanted := 'completed';
    ELSIF TG_OP = 'UPDATE' AND OLD.status = NEW.status THEN
        actions := ARRAY['extend_request'];
        wanted := 'extended';
    ELSIF NEW.status = 'registered' THEN
        actions := ARRAY['register_request'];
        wanted := 'registered';
    ELSE
        actions := ARRAY[CASE NEW.kind WHEN 'erasure' THEN 'erasure_request' WHEN 'access' THEN 'access_request'
                                       WHEN 'portability' THEN 'access_request'
                                       WHEN 'rectification' THEN 'rectification_request'
                                       WHEN 'restriction' THEN 'restrict' WHEN 'restriction_lift' THEN 'lift' END];
        wanted := NEW.outcome;
    END IF;
    IF NOT gdpr.audited_in_this_transaction(NEW.request_id, NULL, actions, wanted) THEN
        RAISE EXCEPTION 'gdpr.request: % of request % (%) has no audit row % with outcome % in its transaction',
            CASE WHEN TG_OP = 'INSERT' THEN 'the insert' ELSE 'the change ' || OLD.status || ' -> ' || NEW.status END,
            NEW.request_id, NEW.kind, array_to_string(actions, ' or '), coalesce(wanted, '(none)')
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS request_inserted_audited ON gdpr.request;
CREATE CONSTRAINT TRIGGER request_inserted_audited
    AFTER INSERT ON gdpr.request
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NOT gdpr.acts_as_owner('gdpr.request'))
    EXECUTE FUNCTION gdpr.check_request_audited();
ALTER TABLE gdpr.request ENABLE ALWAYS TRIGGER request_inserted_audited;
DROP TRIGGER IF EXISTS request_changed_audited ON gdpr.request;
CREATE CONSTRAINT TRIGGER request_changed_audited
    AFTER UPDATE ON gdpr.request
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN ((OLD.status IS DISTINCT FROM NEW.status OR OLD.extended_at IS DISTINCT FROM NEW.extended_at)
                       AND NOT gdpr.acts_as_owner('gdpr.request'))
    EXECUTE FUNCTION gdpr.check_request_audited();
ALTER TABLE gdpr.request ENABLE ALWAYS TRIGGER request_changed_audited;

CREATE OR REPLACE FUNCTION gdpr.guard_outbox_lifecycle() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    attempt constant text[] := ARRAY['attempts', 'last_result', 'last_attempt_at', 'claimed_until', 'claimed_by'];
    ack constant text[] := ARRAY['status', 'acknowledged_at', 'key_id', 'nonce', 'identifier_ciphertext',
                                 'claimed_until', 'claimed_by'];
    id text := 'row of request ' || NEW.request_id || ' and target ' || NEW.target;
BEGIN
    IF gdpr.acts_as_owner(TG_RELID) THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NEW.status = 'pending' AND NEW.attempts = 0 AND NEW.acknowledged_at IS NULL AND NEW.last_attempt_at IS NULL
           AND NEW.last_result IS NULL AND NEW.claimed_until IS NULL AND NEW.claimed_by IS NULL
           AND EXISTS (SELECT 1 FROM gdpr.request r WHERE r.request_id = NEW.request_id
                       AND r.status = 'pending_propagation') THEN
            RETURN NEW;
        END IF;
        PERFORM gdpr.refuse_lifecycle('gdpr.erasure_propagation', id,
                                      'inserting it other than pending, untried, for a request pending propagation');
    ELSIF OLD.status = 'pending' AND NEW.status = 'pending' THEN
        IF to_jsonb(NEW) - attempt = to_jsonb(OLD) - attempt AND NEW.attempts IN (OLD.attempts, OLD.attempts + 1) THEN
            RETURN NEW;  -- claimed, tried
        END IF;
        PERFORM gdpr.refuse_lifecycle('gdpr.erasure_propagation', id, 'this change of a pending row');
    ELSIF OLD.status = 'pending' AND NEW.status = 'acknowledged' THEN
        IF to_jsonb(NEW) - ack = to_jsonb(OLD) - ack AND NEW.acknowledged_at = now()
           AND NEW.key_id IS NULL AND NEW.nonce IS NULL AND NEW.identifier_ciphertext IS NULL THEN
            RETURN NEW;  -- acknowledged, its ciphertext destroyed
        END IF;
        PERFORM gdpr.refuse_lifecycle('gdpr.erasure_propagation', id, 'this acknowledgement');
    END IF;
    PERFORM gdpr.refuse_lifecycle('gdpr.erasure_propagation', id, OLD.status || ' -> ' || NEW.status);
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS outbox_lifecycle ON gdpr.erasure_propagation;
CREATE TRIGGER outbox_lifecycle
    BEFORE INSERT OR UPDATE ON gdpr.erasure_propagation
    FOR EACH ROW EXECUTE FUNCTION gdpr.guard_outbox_lifecycle();
ALTER TABLE gdpr.erasure_propagation ENABLE ALWAYS TRIGGER outbox_lifecycle;

-- At COMMIT: the audit row of each acknowledgement ('propagate', outcome 'acknowledged', request and target).
CREATE OR REPLACE FUNCTION gdpr.check_outbox_audited() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT gdpr.audited_in_this_transaction(NEW.request_id, NEW.target, ARRAY['propagate'], 'acknowledged') THEN
        RAISE EXCEPTION 'gdpr.erasure_propagation: the acknowledgement of request % target % has no audit row '
                        'propagate with outcome acknowledged in its transaction', NEW.request_id, NEW.target
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS outbox_acknowledged_audited ON gdpr.erasure_propagation;
CREATE CONSTRAINT TRIGGER outbox_acknowledged_audited
    AFTER UPDATE ON gdpr.erasure_propagation
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status AND NOT gdpr.acts_as_owner('gdpr.erasure_propagation'))
    EXECUTE FUNCTION gdpr.check_outbox_audited();
ALTER TABLE gdpr.erasure_propagation ENABLE ALWAYS TRIGGER outbox_acknowledged_audited;

-- A request (with its outbox rows) is deleted only here: completed more than `p_keep_for` (the policy's
-- requests.keep_for, at least one year) before `p_as_of` (not in the future), at most `p_limit` per call,
-- with one audit row per kind (and one for the outbox) in the same statement. Returns what it deleted.
REVOKE DELETE ON gdpr.request, gdpr.erasure_propagation FROM gdpr_engine;
CREATE OR REPLACE FUNCTION gdpr.purge_requests(p_keep_for text, p_as_of timestamptz, p_limit integer,
                                               p_dag_id text, p_run_id text, p_task_id text)
RETURNS TABLE (requests bigint, outbox bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    keep_for interval := p_keep_for::interval;
BEGIN
    IF keep_for < interval '1 year' OR p_as_of IS NULL OR p_as_of > now() OR NOT p_limit BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'gdpr.purge_requests: requests are kept at least one year after completion, measured up to '
                        'now at the latest (keep_for %, as of %, limit %)', p_keep_for, p_as_of, p_limit
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN QUERY
    WITH batch AS (
        SELECT r.request_id FROM gdpr.request AS r
        WHERE r.completed_at < p_as_of - keep_for
        ORDER BY r.completed_at, r.request_id LIMIT p_limit FOR UPDATE
    ), outbox_gone AS (
        DELETE FROM gdpr.erasure_propagation AS p USING batch AS b WHERE p.request_id = b.request_id RETURNING 1
    ), gone AS (
        DELETE FROM gdpr.request AS r USING batch AS b WHERE r.request_id = b.request_id RETURNING r.kind
    ), counted AS (
        SELECT 'gdpr.request' AS tbl, g.kind, count(*) AS n FROM gone AS g GROUP BY g.kind
        UNION ALL
        SELECT 'gdpr.erasure_propagation', NULL, count(*) FROM outbox_gone HAVING count(*) > 0
    ), audited AS (
        INSERT INTO gdpr.audit_log (dag_id, run_id, task_id, table_name, action, row_count, dry_run, outcome, details)
        SELECT p_dag_id, p_run_id, p_task_id, c.tbl, 'purge_requests', c.n, false, 'done',
               CASE WHEN c.kind IS NULL THEN jsonb_build_object('keep_for', p_keep_for)
                    ELSE jsonb_build_object('kind', c.kind, 'keep_for', p_keep_for) END
        FROM counted AS c ORDER BY c.tbl DESC, c.kind
        RETURNING 1
    )
    SELECT coalesce((SELECT sum(c.n) FROM counted AS c WHERE c.tbl = 'gdpr.request'), 0)::bigint,
           coalesce((SELECT sum(c.n) FROM counted AS c WHERE c.tbl = 'gdpr.erasure_propagation'), 0)::bigint;
END
$$;
REVOKE ALL ON FUNCTION gdpr.purge_requests(text, timestamptz, integer, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION gdpr.purge_requests(text, timestamptz, integer, text, text, text) TO gdpr_engine;

INSERT INTO gdpr.schema_version (version) VALUES (10) ON CONFLICT (version) DO NOTHING;
-- end of v10 =========================================================================================

-- v11: the journal, erasures replayed after a restore ==================================================
-- Every completed erasure, every suppression entry and every restriction (and its lift) is also one row of
-- gdpr.journal, written in the transaction that makes it true: by the triggers below for the suppression list
-- and the restrictions (every writer, set-based), by the erasure itself (engine/erasure.py, which knows the
-- subject ids). After COMMIT the DAGs copy the rows not yet there to the journal OUTSIDE the warehouse (append-only
-- JSON lines under the policy's evidence.location, engine/journal.py): a warehouse restored from a backup lacks
-- rows the outside journal has, the first task of every DAG sees it and refuses to run, and gdpr_restore_replay
-- re-applies them (inserting each replayed row with its original entry id). No personal data: keyed hashes, key
-- ids, request ids, internal subject ids. Append-only (no UPDATE, DELETE or TRUNCATE, for anyone while the
-- triggers are on). One row per (kind, subject hash, request id): the same change recorded twice is one entry.
CREATE TABLE IF NOT EXISTS gdpr.journal (
    entry_id     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind         text NOT NULL CHECK (kind IN ('erasure', 'suppression', 'restriction', 'restriction_lift')),
    request_id   text,
    subject_hash text NOT NULL,
    key_id       text,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    details      jsonb NOT NULL DEFAULT '{}'::jsonb,
    replayed_at  timestamptz            -- set on a row gdpr_restore_replay inserted again after a restore
);
CREATE UNIQUE INDEX IF NOT EXISTS journal_change_idx ON gdpr.journal (kind, subject_hash, coalesce(request_id, ''));

CREATE OR REPLACE FUNCTION gdpr.refuse_journal_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'gdpr.journal is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

DROP TRIGGER IF EXISTS journal_no_update_delete ON gdpr.journal;
CREATE TRIGGER journal_no_update_delete
    BEFORE UPDATE OR DELETE ON gdpr.journal
    FOR EACH ROW EXECUTE FUNCTION gdpr.refuse_journal_change();
DROP TRIGGER IF EXISTS journal_no_truncate ON gdpr.journal;
CREATE TRIGGER journal_no_truncate
    BEFORE TRUNCATE ON gdpr.journal
    FOR EACH STATEMENT EXECUTE FUNCTION gdpr.refuse_journal_change();
ALTER TABLE gdpr.journal ENABLE ALWAYS TRIGGER journal_no_update_delete;
ALTER TABLE gdpr.journal ENABLE ALWAYS TRIGGER journal_no_truncate;

REVOKE ALL ON gdpr.journal FROM PUBLIC;
GRANT SELECT, INSERT ON gdpr.journal TO gdpr_engine;
GRANT SELECT ON gdpr.journal TO gdpr_auditor;

-- A suppression entry added (an erasure, an opt-out collected, a re-keyed copy): one journal row each.
CREATE OR REPLACE FUNCTION gdpr.journal_suppression() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO gdpr.journal (kind, request_id, subject_hash, key_id, details)
    SELECT 'suppression', n.request_id, n.email_hash, n.key_id,
           jsonb_build_object('reason', n.reason, 'source', n.source, 'first_seen', n.first_seen)
    FROM new_rows AS n
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS suppression_list_journal ON gdpr.suppression_list;
CREATE TRIGGER suppression_list_journal
    AFTER INSERT ON gdpr.suppression_list
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION gdpr.journal_suppression();
ALTER TABLE gdpr.suppression_list ENABLE ALWAYS TRIGGER suppression_list_journal;

-- A restriction recorded (restrict) or ended (lift, or the person's erasure): one journal row each. A lift is
-- keyed by the request id of the restriction it ends.
CREATE OR REPLACE FUNCTION gdpr.journal_restriction() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO gdpr.journal (kind, request_id, subject_hash, key_id, details)
        SELECT 'restriction', n.request_id, n.subject_hash, n.key_id,
               jsonb_build_object('by_email', n.by_email, 'subject_table', n.subject_table,
                                  'subject_ids', to_jsonb(n.subject_ids))
        FROM new_rows AS n
        ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO gdpr.journal (kind, request_id, subject_hash, key_id, details)
        SELECT 'restriction_lift', o.request_id, o.subject_hash, o.key_id,
               jsonb_build_object('by_email', o.by_email, 'subject_table', o.subject_table,
                                  'flagged_ids', to_jsonb(o.flagged_ids))
        FROM old_rows AS o
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS restriction_journal_insert ON gdpr.restriction;
CREATE TRIGGER restriction_journal_insert
    AFTER INSERT ON gdpr.restriction
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION gdpr.journal_restriction();
DROP TRIGGER IF EXISTS restriction_journal_delete ON gdpr.restriction;
CREATE TRIGGER restriction_journal_delete
    AFTER DELETE ON gdpr.restriction
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION gdpr.journal_restriction();
ALTER TABLE gdpr.restriction ENABLE ALWAYS TRIGGER restriction_journal_insert;
ALTER TABLE gdpr.restriction ENABLE ALWAYS TRIGGER restriction_journal_delete;

-- An installed warehouse starts its journal with the suppression entries and restrictions it already holds (they
-- are then in every later backup's journal too); erasures completed before are covered by their suppression
-- entries. Only into an empty journal: once it has a row, every later change is journaled by the triggers above.
INSERT INTO gdpr.journal (kind, request_id, subject_hash, key_id, recorded_at, details)
SELECT kind, request_id, subject_hash, key_id, recorded_at, details FROM (
    SELECT 'suppression' AS kind, request_id, email_hash AS subject_hash, key_id, first_seen AS recorded_at,
           jsonb_build_object('reason', reason, 'source', source, 'first_seen', first_seen) AS details
    FROM gdpr.suppression_list
    UNION ALL
    SELECT 'restriction', request_id, subject_hash, key_id, restricted_at,
           jsonb_build_object('by_email', by_email, 'subject_table', subject_table, 'subject_ids', to_jsonb(subject_ids))
    FROM gdpr.restriction
) AS existing
WHERE NOT EXISTS (SELECT 1 FROM gdpr.journal)
ON CONFLICT DO NOTHING;

INSERT INTO gdpr.schema_version (version) VALUES (11) ON CONFLICT (version) DO NOTHING;
-- end of v11 =========================================================================================

-- v12: how much of its journal outside the warehouse this warehouse has seen ==============================
-- `journal.sync` records, after each successful read (and append) of `<evidence.location>/journal/<chain id>/`,
-- how many distinct entries that folder held. The folder only grows, so a later read with FEWER entries means
-- the location is not the one it was (a new bucket, a policy pointed at a new folder, a volume not mounted):
-- the sync then refuses, appends nothing, and every DAG's first task fails (docs/runbook.md, "The journal
-- outside the warehouse has fewer entries than the warehouse has seen"). A warehouse restored from a backup
-- carries the older, smaller count of the backup's time: it is still found behind the journal, as before.
-- The count never goes down (trigger, for every role); the owner deletes the row to start again from 0.
CREATE TABLE IF NOT EXISTS gdpr.journal_outside (
    chain_id     text PRIMARY KEY,          -- the audit chain id, which names the journal's folder
    entries_seen bigint NOT NULL CHECK (entries_seen >= 0),
    seen_at      timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION gdpr.refuse_journal_outside_lowered() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.chain_id IS DISTINCT FROM OLD.chain_id OR NEW.entries_seen < OLD.entries_seen THEN
        RAISE EXCEPTION 'gdpr.journal_outside: the count of entries seen outside the warehouse never goes down'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS journal_outside_never_lowered ON gdpr.journal_outside;
CREATE TRIGGER journal_outside_never_lowered
    BEFORE UPDATE ON gdpr.journal_outside
    FOR EACH ROW EXECUTE FUNCTION gdpr.refuse_journal_outside_lowered();
ALTER TABLE gdpr.journal_outside ENABLE ALWAYS TRIGGER journal_outside_never_lowered;

REVOKE ALL ON gdpr.journal_outside FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON gdpr.journal_outside TO gdpr_engine;  -- no DELETE: only the owner starts again
GRANT SELECT ON gdpr.journal_outside TO gdpr_auditor;

INSERT INTO gdpr.schema_version (version) VALUES (12) ON CONFLICT (version) DO NOTHING;
-- end of v12 =========================================================================================
