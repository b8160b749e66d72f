"""The weekly retention sweep: plan, apply, purge the archive, report.

Apply works in keyset batches over the subject's primary key. Each batch is ONE transaction that
holds the encrypted archive copy, the pseudonymisation or deletion of the live rows (dependent rows
first) and the audit rows describing it. A crash at any instant leaves every subject either
untouched or fully processed, and a rerun finishes the job: candidates are re-evaluated, and a
pseudonymised subject carries the marker column so it is never selected twice.

The batch's subject ids never leave the server: they live in a temporary table for the length of
the transaction, and every statement is set-based over it. The rows of the batch's persons in each
mapped table are those `matcher.rows` selects (linked to them, or carrying their email), the same
definition erasure and the opt-out guard use. Only pseudonymisation brings rows to
Python, because encryption and keyed hashing happen here (the warehouse may lack pgcrypto).

Concurrency (a warehouse that others write to)
----------------------------------------------
* One sweep per warehouse: `apply_rule` (and the DAG's apply task, around all its rules) holds the
  session-level advisory lock `SWEEP_LOCK` = (1195659346, 1), i.e. ("GDPR" in ASCII, 1). Advisory
  locks are per database, so this is one lock per warehouse. A second sweep waits for it at most
  `LOCK_WAIT_SECONDS`, then stops before changing anything with `SweepLockBusy`, whose message names
  the holder (backend pid, application_name, since when; no personal data). The lock goes with the
  session: released at the end of the apply, or by the server when the holder's backend ends (a
  killed task's connection closes; a vanished host's only when TCP keepalive gives up, see the
  runbook). It is reentrant within a session. A holder shows in ``pg_locks`` as locktype 'advisory',
  classid 1195659346, objid 1, objsubid 2.
* Lock, then check: each batch is selected in one statement, its unheld subject rows are locked
  (``FOR UPDATE``, in primary-key order), and then ONE statement re-evaluates the rule on the locked
  rows (status, pseudonymised marker, clock, holds). Subjects no longer eligible (a contract, a
  litigation flag, the person's own reply or a pseudonymisation committed while the sweep waited for
  its lock) leave the batch untouched and are counted as ``changed_under_lock``. The batch runs
  READ COMMITTED, so that re-check takes a snapshot newer than every lock wait. ``FOR UPDATE``
  (not ``FOR NO KEY UPDATE``) because it conflicts with the ``FOR KEY SHARE`` lock a foreign-key
  check takes on the subject row: a concurrent insert of a contract or an activity either commits
  before the re-check (and is seen by it) or waits for the batch to commit (and then fails its
  foreign-key check if the subject was deleted). A dependent row written by a transaction that does
  not touch the subject row (no foreign key declared) is not covered by this. The re-check is also
  what keeps a subject from being treated twice if two sweeps ever run together anyway.
* Lock order, the same for every writer of the engine (sweep, erasure, opt-out guard and enforce):
  first the subject rows, ``FOR UPDATE`` ordered by primary key, in one statement; then the
  dependent tables in `Policy.dependent_tables` order; the subject rows themselves are changed last.
  Two writers therefore never wait for each other in a cycle.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from . import audit, candidates, matcher
from .audit import RunContext
from .crypto import Keys, archive_aad
from .errors import UnmappedForeignKey
from .policy import FixedColumn, HashColumn, KeepColumn, MappedTable, NullColumn, Policy, PolicyError, Rule

log = logging.getLogger(__name__)

BATCH_TABLE = sql.Identifier("_gdpr_batch")
UNHELD = sql.SQL("(SELECT subject_id FROM _gdpr_batch WHERE cardinality(holds) = 0)")

# The warehouse's sweep lock: pg_advisory_lock(int4, int4) with key ("GDPR" in ASCII, 1).
SWEEP_LOCK = (0x47445052, 1)
LOCK_WAIT_SECONDS = 60.0


@dataclass
class RulePlan:
    rule: str
    action: str
    candidates: int
    held: int
    by_hold: dict[str, int]
    seconds: float


@dataclass
class RuleResult:
    rule: str
    action: str
    candidates: int = 0
    held: int = 0
    archived: int = 0
    pseudonymised: int = 0
    deleted: int = 0
    changed_under_lock: int = 0
    rows_by_table: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_rules(policy: Policy, names: list[str] | None) -> list[Rule]:
    """The rules to run: all, or the named subset (unknown names are an error, nothing runs)."""
    if not names:
        return list(policy.rules)
    known = [r.name for r in policy.rules]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PolicyError(f"unknown rule(s) {', '.join(unknown)}; the policy defines: {', '.join(known)}")
    return [r for r in policy.rules if r.name in names]


def plan(conn: psycopg.Connection, policy: Policy, selected: list[Rule], as_of: str) -> list[RulePlan]:
    """Count each rule's candidates and held subjects: one set-based query per rule, no write."""
    plans = []
    for rule in selected:
        started = time.monotonic()
        row = conn.execute(candidates.plan_query(policy, rule), candidates.rule_params(policy, rule, as_of)).fetchone()
        conn.rollback()
        assert row is not None
        plans.append(RulePlan(rule.name, rule.action, row[0], row[1], dict(row[2]), time.monotonic() - started))
    return plans


# -- the warehouse's sweep lock ---------------------------------------------------------------


class SweepLockBusy(RuntimeError):
    """Another sweep holds the warehouse's sweep lock; this one changed nothing. The message names the
    holder by backend pid and application_name (no personal data)."""


def advisory_lock_holder(conn: psycopg.Connection, classid: int, objid: int) -> str:
    """Who holds the two-key advisory lock (classid, objid) in this database, from pg_locks and
    pg_stat_activity: backend pid, application_name, since when (no personal data). The sweep lock's and a
    request id's (`access.answering`) busy messages name it."""
    row = conn.execute(
        "SELECT l.pid, a.application_name, a.backend_start, a.state, a.state_change"
        " FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
        " AND l.classid = %s::int4::oid AND l.objid = %s::int4::oid"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1",
        (classid, objid),
    ).fetchone()
    if row is None:
        return "a session that released it meanwhile"
    pid, app, since, state, state_since = row
    return (f"backend pid {pid} (application_name {app or '(none)'!r}, connected since "
            f"{since.isoformat(timespec='seconds') if since else 'unknown'}, state {state or 'unknown'}"
            f"{' since ' + state_since.isoformat(timespec='seconds') if state_since else ''})")


def _acquire(conn: psycopg.Connection, wait_seconds: float, application_name: str) -> bool:
    with conn.transaction():
        if wait_seconds <= 0:
            got = bool(conn.execute("SELECT pg_try_advisory_lock(%s, %s)", SWEEP_LOCK).fetchone()[0])  # type: ignore[index]
        else:
            # lock_timeout bounds the wait (SET LOCAL: this transaction only).
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{max(1, round(wait_seconds * 1000))}ms",))
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_lock(%s, %s)", SWEEP_LOCK)
                got = True
            except psycopg.errors.LockNotAvailable:
                got = False
        if got:  # what another sweep's error message (and pg_stat_activity) will show of this one
            conn.execute("SELECT set_config('application_name', %s, false)", (application_name[:63],))
        return got


def _release(conn: psycopg.Connection) -> None:
    status = psycopg.pq.TransactionStatus
    try:
        if conn.closed or conn.broken:
            return
        if conn.info.transaction_status == status.INERROR:
            conn.rollback()
        idle = conn.info.transaction_status == status.IDLE
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", SWEEP_LOCK)  # immediate, not transactional
        if idle:
            conn.rollback()
    except psycopg.OperationalError:
        log.warning("The sweep lock could not be released: the connection is gone, and the server released "
                    "the lock with its session.")


@contextmanager
def sweep_lock(conn: psycopg.Connection, ctx: RunContext, wait_seconds: float | None = None) -> Iterator[None]:
    """Hold the warehouse's sweep lock (session-level advisory lock SWEEP_LOCK, see the module doc) for the
    block. Waits at most `wait_seconds` (default LOCK_WAIT_SECONDS; 0: do not wait), then raises
    SweepLockBusy naming the holder, after an audit row (action 'sweep_lock', outcome 'busy'). Reentrant
    on one connection. An open transaction that only read is rolled back; one that wrote is refused
    (each batch of the sweep commits on its own)."""
    status = psycopg.pq.TransactionStatus
    if conn.info.transaction_status == status.INTRANS:
        if conn.execute("SELECT pg_current_xact_id_if_assigned() IS NOT NULL").fetchone()[0]:  # type: ignore[index]
            raise RuntimeError("the sweep needs a connection without uncommitted changes: commit or roll back first")
        conn.rollback()
    if conn.info.transaction_status != status.IDLE:
        raise RuntimeError("the sweep needs a connection without an open transaction: roll back first")
    if wait_seconds is None:
        wait_seconds = LOCK_WAIT_SECONDS
    started = time.monotonic()
    if not _acquire(conn, wait_seconds, f"warehouse-gdpr sweep {ctx.run_id}"):
        waited = round(time.monotonic() - started, 1)
        holder = advisory_lock_holder(conn, *SWEEP_LOCK)
        conn.rollback()
        with conn.transaction():
            audit.record(conn, ctx, action="sweep_lock", outcome="busy", details={"waited_seconds": waited,
                         "holder": holder, "lock": list(SWEEP_LOCK)})
        raise SweepLockBusy(
            f"another retention sweep is running on this warehouse: its lock (advisory lock {SWEEP_LOCK[0]}, "
            f"{SWEEP_LOCK[1]}) is held by {holder}; waited {waited} s. This run changed nothing. Let that "
            "sweep finish, then clear this task (docs/runbook.md, 'The sweep lock is held')."
        )
    try:
        yield
    finally:
        _release(conn)


# -- apply ------------------------------------------------------------------------------------


def apply_rule(
    conn: psycopg.Connection,
    policy: Policy,
    rule: Rule,
    keys: Keys,
    ctx: RunContext,
    as_of: str,
    batch_size: int | None = None,
    lock_wait_seconds: float | None = None,
) -> RuleResult:
    """Delete or pseudonymise the rule's expired, unheld subjects, batch by batch, under the warehouse's
    sweep lock (see module doc; `lock_wait_seconds` and the connection's state as `sweep_lock`)."""
    with sweep_lock(conn, ctx, lock_wait_seconds):
        return _apply_rule_locked(conn, policy, rule, keys, ctx, as_of, batch_size)


def _apply_rule_locked(
    conn: psycopg.Connection,
    policy: Policy,
    rule: Rule,
    keys: Keys,
    ctx: RunContext,
    as_of: str,
    batch_size: int | None = None,
) -> RuleResult:
    batch_size = batch_size or policy.batch_size
    result = RuleResult(rule.name, rule.action)
    params: dict[str, Any] = {**candidates.rule_params(policy, rule, as_of), "limit": batch_size}
    started = time.monotonic()
    after: Any = None
    while True:
        batch_started = time.monotonic()
        with conn.transaction():
            # READ COMMITTED whatever the server's default: the re-check below needs a fresh snapshot.
            conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            query = candidates.batch_query(policy, rule, first=after is None)
            conn.execute(
                sql.SQL("CREATE TEMP TABLE {t} ON COMMIT DROP AS {q}").format(
                    t=BATCH_TABLE, q=sql.SQL("SELECT * FROM ({q}) b(subject_id, holds)").format(q=query)
                ),
                {**params, "after": after},
            )
            count, held, last = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE cardinality(holds) > 0), max(subject_id) FROM _gdpr_batch"
            ).fetchone()  # type: ignore[misc]
            if count == 0:
                break
            after = last
            # Lock, then check (module doc): lock the batch's unheld subjects in primary-key order, so
            # that concurrent writers (a new contract or activity references the subject) wait for this
            # transaction; then, in a new statement (a new snapshot), drop those the rule no longer selects.
            conn.execute(
                sql.SQL(
                    "SELECT count(*) FROM (SELECT 1 FROM {t} s WHERE s.{pk} IN {ids} ORDER BY s.{pk} FOR UPDATE) locked"
                ).format(t=candidates.qualified(policy.subject.table), pk=sql.Identifier(policy.subject.primary_key),
                         ids=UNHELD)
            )
            changed = conn.execute(
                sql.SQL("DELETE FROM {b} b WHERE cardinality(b.holds) = 0 AND NOT {now}").format(
                    b=BATCH_TABLE, now=candidates.selects_now(policy, rule, sql.SQL("b.subject_id"))
                ),
                params,
            ).rowcount
            if rule.action == "delete":
                counts = _delete_batch(conn, policy)
                result.deleted += counts.get(policy.subject.table, 0)
            else:
                counts, archived = _pseudonymise_batch(conn, policy, rule, keys, ctx, as_of)
                result.archived += archived
                result.pseudonymised += counts.get(policy.subject.table, 0)
            for table, n in counts.items():
                result.rows_by_table[table] = result.rows_by_table.get(table, 0) + n
                audit.record(conn, ctx, action=rule.action, outcome="done", rule=rule.name, table=table, row_count=n)
            if rule.action == "pseudonymise":
                audit.record(
                    conn, ctx, action="archive", outcome="done", rule=rule.name,
                    table="gdpr_archive.archived_row", row_count=archived,
                )
            audit.record(
                conn, ctx, action="batch", outcome="done", rule=rule.name, row_count=count - held - changed,
                details={"candidates": count, "held": held, "changed_under_lock": changed,
                         "seconds": round(time.monotonic() - batch_started, 3)},
            )
        result.candidates += count
        result.held += held
        result.changed_under_lock += changed
        result.batches += 1
    result.seconds = time.monotonic() - started
    return result


def _delete_batch(conn: psycopg.Connection, policy: Policy) -> dict[str, int]:
    """Delete the batch's unheld subjects and every row of theirs in the mapped tables, dependents first."""
    counts: dict[str, int] = {}
    persons = matcher.stage(conn, policy, UNHELD)  # their emails, read before anything is deleted
    for mapped in policy.dependent_tables:
        cur = conn.execute(
            sql.SQL("DELETE FROM {t} WHERE {m}").format(
                t=candidates.qualified(mapped.table), m=matcher.rows(policy, mapped, persons)
            ),
            persons.params or None,
        )
        counts[mapped.table] = cur.rowcount
    subject = policy.subject
    try:
        cur = conn.execute(
            sql.SQL("DELETE FROM {t} WHERE {pk} IN {ids}").format(
                t=candidates.qualified(subject.table), pk=sql.Identifier(subject.primary_key), ids=UNHELD
            )
        )
    except psycopg.errors.ForeignKeyViolation as exc:
        raise UnmappedForeignKey(
            f"deleting from {subject.table} is blocked by a foreign key from table {exc.diag.table_name!r}, "
            "which the policy does not map: add it to `tables` (with its subject_column) so its rows are handled"
        ) from None
    counts[subject.table] = cur.rowcount
    return counts


def _treatment_sql(mapped: MappedTable) -> tuple[list[str], list[sql.Composable]]:
    """(hash columns, SET clauses for null/fixed columns) of a mapped table."""
    hashed: list[str] = []
    sets: list[sql.Composable] = []
    for name, treatment in mapped.columns.items():
        if isinstance(treatment, HashColumn):
            hashed.append(name)
        elif isinstance(treatment, NullColumn):
            sets.append(sql.SQL("{c} = NULL").format(c=sql.Identifier(name)))
        elif isinstance(treatment, FixedColumn):
            sets.append(sql.SQL("{c} = {v}").format(c=sql.Identifier(name), v=sql.Literal(treatment.value)))
        else:
            assert isinstance(treatment, KeepColumn)
    return hashed, sets


def _pseudonymise_batch(
    conn: psycopg.Connection,
    policy: Policy,
    rule: Rule,
    keys: Keys,
    ctx: RunContext,
    as_of: str,
) -> tuple[dict[str, int], int]:
    """Archive the originals of the tables a legal obligation keeps (`tables[].archive`), encrypted, then
    overwrite personal columns. Other tables keep no copy. Returns (rows per table, rows archived)."""
    counts: dict[str, int] = {}
    archived = 0
    subject = policy.subject
    # The persons' emails are read now, before the subject's email column is hashed below: rows found
    # by email (never linked to the subject) are matched with the original address.
    persons = matcher.stage(conn, policy, UNHELD, owners=True)
    # Email columns hash the normalised email, chained over the peppers: the value `Keys.subject_hash`
    # gives, so erasure, the suppression list and `warehouse-gdpr subject-hash` find the person by it.
    email_hash = keys.hasher(policy.optout.strip_plus_tags)
    for mapped in policy.tables:
        hashed, sets = _treatment_sql(mapped)
        is_subject = mapped.table == subject.table
        if is_subject:
            sets.append(sql.SQL("{m} = now()").format(m=sql.Identifier(subject.pseudonymised_marker)))
        if not hashed and not sets:
            continue
        table = candidates.qualified(mapped.table)
        pk = sql.Identifier(mapped.primary_key)
        match = matcher.rows(policy, mapped, persons, alias="t")
        originals: list[tuple[str, str, str, datetime | None]] = []
        if mapped.archive or hashed:
            # Only rows to archive or to hash come to Python; other tables are updated in place.
            row: sql.Composable
            if mapped.archive:
                row, purge = sql.SQL("to_jsonb(t)"), _purge_after_sql(mapped, as_of)
            else:  # the hashed columns only
                row = sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
                    sql.SQL("{n}, t.{c}").format(n=sql.Literal(c), c=sql.Identifier(c)) for c in hashed))
                purge = sql.SQL("NULL::timestamptz")
            originals = conn.execute(
                sql.SQL("SELECT t.{pk}::text, ({owner})::text, {row}::text, {purge} FROM {t} t WHERE {m}").format(
                    pk=pk, owner=matcher.owner(policy, mapped, persons, "t"), row=row, purge=purge, t=table, m=match
                ),
                persons.params or None,
            ).fetchall()
            if not originals:
                continue
            kept = [(key, owner, doc, purge_at) for key, owner, doc, purge_at in originals if purge_at is not None]
            if kept:
                archived += _archive_rows(conn, mapped.table, kept, rule, keys, ctx)
        if hashed:
            emails = set(policy.hashed_email_columns(mapped))
            # Keyed hashes are computed here; they travel back through a typed temp table.
            conn.execute(
                sql.SQL("CREATE TEMP TABLE _gdpr_hash ON COMMIT DROP AS SELECT {cols} FROM {t} WITH NO DATA").format(
                    cols=sql.SQL(", ").join(sql.Identifier(c) for c in [mapped.primary_key, *hashed]), t=table
                )
            )
            with conn.cursor().copy(
                sql.SQL("COPY _gdpr_hash ({cols}) FROM STDIN").format(
                    cols=sql.SQL(", ").join(sql.Identifier(c) for c in [mapped.primary_key, *hashed])
                )
            ) as copy:
                for source_pk, _subject_id, row_json, _purge in originals:
                    values = json.loads(row_json)
                    copy.write_row((source_pk, *(
                        None if values[c] is None
                        else email_hash(str(values[c]))[-1] if c in emails
                        else keys.hash_value(str(values[c]))
                        for c in hashed
                    )))
            hash_sets = [sql.SQL("{c} = h.{c}").format(c=sql.Identifier(c)) for c in hashed]
            cur = conn.execute(
                sql.SQL("UPDATE {t} t SET {sets} FROM _gdpr_hash h WHERE t.{pk} = h.{pk}").format(
                    t=table, sets=sql.SQL(", ").join([*hash_sets, *sets]), pk=pk
                )
            )
            conn.execute("DROP TABLE _gdpr_hash")
        else:
            cur = conn.execute(
                sql.SQL("UPDATE {t} t SET {sets} WHERE {m}").format(t=table, sets=sql.SQL(", ").join(sets), m=match),
                persons.params or None,
            )
        if cur.rowcount:
            counts[mapped.table] = cur.rowcount
    return counts, archived


def _purge_after_sql(mapped: MappedTable, as_of: str) -> sql.Composable:
    """When the archived original of a row of `mapped` is destroyed: its obligation's period after `from`
    (else after `as_of`); NULL when that instant is not after `as_of` (the obligation has ended: no copy)."""
    assert mapped.archive is not None
    now = sql.SQL("{}::timestamptz").format(sql.Literal(as_of))
    start = (sql.SQL("coalesce(t.{c}::timestamptz, {now})").format(c=sql.Identifier(mapped.archive.from_), now=now)
             if mapped.archive.from_ else now)
    until = sql.SQL("({start} + {period}::interval)").format(start=start, period=sql.Literal(mapped.archive.for_))
    return sql.SQL("CASE WHEN {until} > {now} THEN {until} END").format(until=until, now=now)


ARCHIVE_COLUMNS = "source_table, source_pk, subject_id, rule, run_id, purge_after, key_id, nonce, ciphertext"


def _archive_rows(
    conn: psycopg.Connection,
    table: str,
    originals: list[tuple[str, str, str, datetime]],
    rule: Rule,
    keys: Keys,
    ctx: RunContext,
) -> int:
    """Encrypt (pk, subject id, row JSON, purge_after) originals into gdpr_archive.archived_row; returns rows added.

    A row archived before (e.g. restored from a backup and pseudonymised again) keeps its first
    archived original: ON CONFLICT DO NOTHING, through a staging table because COPY cannot.
    """
    conn.execute(
        "CREATE TEMP TABLE _gdpr_archive_stage ON COMMIT DROP AS"
        f" SELECT {ARCHIVE_COLUMNS} FROM gdpr_archive.archived_row WITH NO DATA"
    )
    with conn.cursor().copy(f"COPY _gdpr_archive_stage ({ARCHIVE_COLUMNS}) FROM STDIN") as copy:
        # One sealer per batch: with a public archive key, one ephemeral key and ECDH for the batch, a
        # fresh nonce per row (crypto.ArchiveSealer); no private key is needed to write the archive.
        sealer = keys.archive_sealer()
        key_id = sealer.key_id
        for source_pk, subject_id, row_json, purge_after in originals:
            nonce, ciphertext = sealer.seal(row_json.encode(), archive_aad(table, source_pk, key_id))
            copy.write_row((table, source_pk, subject_id, rule.name, ctx.run_id, purge_after, key_id, nonce,
                            ciphertext))
    cur = conn.execute(
        f"INSERT INTO gdpr_archive.archived_row ({ARCHIVE_COLUMNS}) SELECT {ARCHIVE_COLUMNS} FROM _gdpr_archive_stage"
        " ON CONFLICT (source_table, source_pk) DO NOTHING"
    )
    conn.execute("DROP TABLE _gdpr_archive_stage")
    return cur.rowcount


# -- archive purge ----------------------------------------------------------------------------


@dataclass
class ArchivePurge:
    """What `purge_archive` did: archive rows removed, and rows past their purge date kept because the person's
    processing is restricted (art. 18: a restriction in force in gdpr.restriction names their subject id)."""

    purged: int = 0
    kept_restricted: int = 0


# Archive rows past their purge date (by `as_of` and by the database's clock), after `last` in archive id order.
_EXPIRED = ("SELECT archive_id, subject_id FROM gdpr_archive.archived_row"
            " WHERE purge_after < least(%(as_of)s::timestamptz, now()) AND archive_id > %(last)s"
            " ORDER BY archive_id LIMIT %(limit)s")
# ... of them, those whose person's processing is not restricted (the check made under the subject rows' lock).
_UNRESTRICTED = ("NOT EXISTS (SELECT 1 FROM gdpr.restriction g CROSS JOIN LATERAL unnest(g.subject_ids) AS r(id)"
                 " WHERE r.id = a.subject_id)")


def purge_archive(conn: psycopg.Connection, policy: Policy, ctx: RunContext, as_of: str,
                  batch_size: int) -> ArchivePurge:
    """Delete archive rows whose own retention ended, in keyset batches (archive id), each with its audit rows.
    Ended by `as_of` and by the database's clock: the control schema refuses the engine's role the deletion of
    a row before its purge date (an erasure goes through gdpr.erase_archived_rows).

    A row of a person whose processing is restricted (art. 18, e.g. "keep my invoices: I need them for a legal
    claim") is kept while the restriction is in force, and counted (`kept_restricted`, audited as
    `purge_archive_held` / `processing_restricted`: no row changed); the first sweep after the lift purges it.
    Lock, then re-check: each batch locks the subject rows its archive rows belong to (``FOR KEY SHARE``, in
    primary-key order: the engine's one lock order, subject rows first), which a restriction being recorded holds
    ``FOR UPDATE``; the restriction check then runs on a snapshot newer than the lock, so a restriction either
    committed before and is honoured, or waits until the batch is purged. (The lock compares the subject's key
    as text, as the archive stores it: one scan of the subject table per batch, and the purge is a weekly trickle
    of rows reaching the end of their period.)"""
    subject = policy.subject
    lock = sql.SQL(
        "SELECT count(*) FROM (SELECT 1 FROM {t} s WHERE s.{pk}::text = ANY(%s) ORDER BY s.{pk} FOR KEY SHARE) l"
    ).format(t=candidates.qualified(subject.table), pk=sql.Identifier(subject.primary_key))
    result = ArchivePurge()
    if ctx.dry_run:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE " + _UNRESTRICTED + "), count(*) FILTER (WHERE NOT " + _UNRESTRICTED
            + ") FROM gdpr_archive.archived_row a WHERE purge_after < least(%s::timestamptz, now())", (as_of,)
        ).fetchone()
        assert row is not None
        result.purged, result.kept_restricted = row
        with conn.transaction():
            audit.record(conn, ctx, action="purge_archive", outcome="dry_run", table="gdpr_archive.archived_row",
                         row_count=result.purged, details={"kept_restricted": result.kept_restricted})
        return result
    last = 0
    while True:
        with conn.transaction():
            batch = conn.execute(_EXPIRED, {"as_of": as_of, "last": last, "limit": batch_size}).fetchall()
            if not batch:
                break
            last = batch[-1][0]
            conn.execute(lock, (sorted({b[1] for b in batch}),))
            rows = conn.execute(
                "DELETE FROM gdpr_archive.archived_row a WHERE a.archive_id = ANY(%s)"
                " AND a.purge_after < least(%s::timestamptz, now()) AND " + _UNRESTRICTED + " RETURNING a.rule",
                ([b[0] for b in batch], as_of),
            ).fetchall()
            by_rule: dict[str, int] = {}
            for (rule_name,) in rows:
                by_rule[rule_name] = by_rule.get(rule_name, 0) + 1
            for rule_name, n in sorted(by_rule.items()):
                audit.record(
                    conn, ctx, action="purge_archive", outcome="done", rule=rule_name,
                    table="gdpr_archive.archived_row", row_count=n,
                )
            if kept := len(batch) - len(rows):
                audit.record(conn, ctx, action="purge_archive_held", outcome="processing_restricted",
                             table="gdpr_archive.archived_row", row_count=kept)
        result.purged += len(rows)
        result.kept_restricted += kept
    if result.purged == 0 and result.kept_restricted == 0:
        with conn.transaction():
            audit.record(
                conn, ctx, action="purge_archive", outcome="nothing_to_purge", table="gdpr_archive.archived_row"
            )
    return result


# -- blast radius: a rule about to treat a large share of the subject table waits for a person -----


@dataclass
class BlastRadius:
    """A rule whose plan treats more than the policy's `blast_radius_percent` of the subject table."""

    rule: str
    to_process: int
    subject_rows: int
    confirmed: int | None  # the count the run confirmed for this rule (None: no confirmation)

    @property
    def percent(self) -> float:
        return round(100 * self.to_process / self.subject_rows, 1)

    @property
    def allowed(self) -> bool:
        """Confirmed for at least the planned count (a confirmation is an upper bound, never a quota)."""
        return self.confirmed is not None and self.to_process <= self.confirmed


def subject_rows(conn: psycopg.Connection, policy: Policy) -> int:
    """Rows of the subject table: what a rule's share is measured against (one count, no write)."""
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {t}").format(t=candidates.qualified(policy.subject.table))).fetchone()
    conn.rollback()
    return int(row[0]) if row else 0


def blast_radius(
    to_process: dict[str, int], rows: int, limit_percent: float, confirmed: dict[str, int] | None = None
) -> list[BlastRadius]:
    """The rules (name -> subjects the plan would treat) above `limit_percent` of `rows`, in order."""
    confirmed = confirmed or {}
    return [
        BlastRadius(rule, n, rows, confirmed.get(rule))
        for rule, n in to_process.items()
        if rows and n * 100 > limit_percent * rows
    ]


def blast_radius_message(over: list[BlastRadius], limit_percent: float, action: dict[str, str]) -> str:
    """Why the sweep stopped and the exact param that confirms it (counts and rule names only)."""
    lines = []
    for b in over:
        if b.allowed:
            continue
        verb = "delete" if action.get(b.rule) == "delete" else "pseudonymise"
        lines.append(
            f"  - {b.rule}: would {verb} {b.to_process} of {b.subject_rows} subjects ({b.percent} %)"
            + (f", more than the {b.confirmed} confirmed" if b.confirmed is not None else "")
        )
    confirm = json.dumps({"confirm_blast_radius": {b.rule: b.to_process for b in over}})
    return (
        f"blast-radius limit: these rules would treat more than blast_radius_percent ({limit_percent:g} %) of the "
        "subject table in one run; the sweep stopped before changing anything:\n" + "\n".join(lines) + "\n"
        "Check the plan (the plan task's log, or `warehouse-gdpr policy check`). If these counts are intended, "
        f"trigger the sweep again with the params {confirm} (docs/runbook.md, 'The blast-radius limit stopped "
        "the sweep')."
    )


# -- logs for on-call staff -------------------------------------------------------------------


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A small fixed-width table for task logs (counts and timings only)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=False)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
