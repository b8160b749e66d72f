"""Apply, atomicity, idempotent rerun, archive encryption and purge, on a real PostgreSQL."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from cryptography.exceptions import InvalidTag

from helpers import (
    AS_OF,
    CRM_TABLES,
    THREE_YEARS_BEFORE,
    Worker,
    add_activity,
    add_contact,
    add_contract,
    as_role,
    candidates,
    new_id,
    table_checksum,
    ts,
    wait_for_lock_wait,
)
from warehouse_gdpr.cli import main
from warehouse_gdpr.engine import sweep
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import KeyConfigError, Keys, archive_aad
from warehouse_gdpr.engine.policy import Policy, parse_policy

CTX = RunContext("test_sweep", "run-1", "apply")
POLICY_FILE = Path(__file__).resolve().parents[2] / "include" / "policy.yaml"


def _count(conn: psycopg.Connection, query: str, *params: object) -> int:
    value = conn.execute(query, params).fetchone()[0]  # type: ignore[index]
    conn.rollback()
    return int(value)


def _audited(conn: psycopg.Connection, run_id: str, action: str, table: str) -> int:
    return _count(
        conn,
        "SELECT coalesce(sum(row_count), 0) FROM gdpr.audit_log WHERE run_id = %s AND action = %s AND table_name = %s",
        run_id, action, table,
    )


def test_delete_rule_removes_subject_and_dependents_keeps_held(conn, policy: Policy, keys: Keys) -> None:
    rule = policy.rule("prospects_never_converted")
    before = candidates(conn, policy, rule.name)
    held = {cid for cid, holds in before.items() if holds}
    doomed = [cid for cid in before if cid not in held]
    assert doomed and held, "the seeded template must exercise both paths"
    activities_of_doomed = _count(conn, "SELECT count(*) FROM crm.activities WHERE contact_id = ANY(%s)", doomed)

    result = sweep.apply_rule(conn, policy, rule, keys, CTX, AS_OF, batch_size=100)

    assert result.candidates == len(before) and result.held == len(held) and result.deleted == len(doomed)
    assert result.batches == -(-len(before) // 100)
    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = ANY(%s)", doomed) == 0
    for table in ("crm.activities", "crm.notes", "crm.contracts", "crm.invoices"):
        assert _count(conn, f"SELECT count(*) FROM {table} WHERE contact_id = ANY(%s)", doomed) == 0
    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = ANY(%s)", list(held)) == len(held)
    # the audit equals what happened
    assert _audited(conn, "run-1", "delete", "crm.contacts") == len(doomed)
    assert _audited(conn, "run-1", "delete", "crm.activities") == activities_of_doomed
    # rerun: nothing left to do but the held subjects
    again = sweep.apply_rule(conn, policy, rule, keys, RunContext("test_sweep", "run-2", "apply"), AS_OF,
                             batch_size=100)
    assert (again.deleted, again.held) == (0, len(held))


def test_pseudonymise_archives_encrypted_originals(conn, policy: Policy, keys: Keys, public_keys: Keys) -> None:
    """The sweep holds the keys connection only (the archive's public key); legal reads with the private key."""
    rule = policy.rule("former_clients")
    todo = [cid for cid, holds in candidates(conn, policy, rule.name).items() if not holds]
    originals = {
        r[0]: r[1]
        for r in conn.execute(
            "SELECT contact_id::text, to_jsonb(c) FROM crm.contacts c WHERE contact_id = ANY(%s)", (todo,)
        ).fetchall()
    }
    # What the accounting obligation keeps: the invoices issued less than 10 years before as_of.
    invoices = {
        r[0]: (r[1], r[2])
        for r in conn.execute(
            "SELECT invoice_id::text, to_jsonb(i), (issued_on::timestamptz + interval '10 years') FROM crm.invoices i"
            " WHERE contact_id = ANY(%s) AND issued_on > %s::date - interval '10 years'", (todo, AS_OF)
        ).fetchall()
    }
    conn.rollback()
    assert invoices, "the seeded template must give pseudonymised former clients recent invoices"

    result = sweep.apply_rule(conn, policy, rule, public_keys, CTX, AS_OF, batch_size=50)
    assert result.pseudonymised == len(todo)
    assert result.archived == len(invoices)

    rows = conn.execute(
        "SELECT contact_id::text, email, first_name, last_name, direct_phone, job_title, pseudonymised_at"
        " FROM crm.contacts WHERE contact_id = ANY(%s)", (todo,)
    ).fetchall()
    for cid, email, first, last, phone, title, marker in rows:
        assert email == keys.subject_hash(originals[cid]["email"]), "email becomes a stable keyed pseudonym"
        assert (first, last, phone, title) == (None, None, None, "redacted")
        assert marker is not None
    notes = conn.execute("SELECT DISTINCT body FROM crm.notes WHERE contact_id = ANY(%s)", (todo,)).fetchall()
    assert notes == [("[removed under GDPR retention policy]",)]

    archived = conn.execute(
        "SELECT source_table, source_pk, key_id, nonce, ciphertext, purge_after FROM gdpr_archive.archived_row"
    ).fetchall()
    conn.rollback()
    assert {r[0] for r in archived} == {"crm.invoices"}, "contacts, notes, activities, tickets keep no copy"
    assert {r[1] for r in archived} == set(invoices)
    for _table, source_pk, key_id, nonce, ciphertext, purge_after in archived:
        aad = archive_aad("crm.invoices", source_pk, key_id)
        original, until = invoices[source_pk]
        assert json.loads(keys.decrypt(key_id, nonce, ciphertext, aad)) == original
        assert purge_after == until, "10 years from the invoice's issue date"
        assert original["billing_name"].encode() not in ciphertext
        assert key_id == "archive-x1" and keys.archive_is_hybrid
        with pytest.raises(KeyConfigError, match="'gdpr_archive_private'"):  # what the sweep holds cannot read it
            public_keys.decrypt(key_id, nonce, ciphertext, aad)
        wrong_key = dataclasses.replace(keys, archive_private_keys={key_id: os.urandom(32)})
        with pytest.raises(InvalidTag):
            wrong_key.decrypt(key_id, nonce, ciphertext, aad)
        with pytest.raises(InvalidTag):  # a ciphertext cannot be replayed onto another row
            keys.decrypt(key_id, nonce, ciphertext, archive_aad("crm.invoices", source_pk + "0", key_id))
    assert _count(conn, "SELECT count(*) FROM crm.invoices WHERE contact_id = ANY(%s) AND billing_name IS NOT NULL",
                  todo) == 0, "every invoice is pseudonymised, archived or not"
    assert _audited(conn, "run-1", "archive", "gdpr_archive.archived_row") == len(invoices)
    # One ephemeral key per batch of 50 subjects, not one per row (nor one for the whole run).
    ephemerals = {bytes(r[4][:32]) for r in archived}
    assert 1 < len(ephemerals) <= -(-len(todo) // 50) < len(archived)
    # every pseudonymised subject leaves the candidate set: a rerun changes nothing
    again = sweep.apply_rule(conn, policy, rule, keys, RunContext("t", "run-2", "apply"), AS_OF)
    assert again.pseudonymised == 0 and again.archived == 0


def _former_client(conn: psycopg.Connection, email: str | None = None) -> int:
    """A former client whose last contract ended 3 years and 10 days before AS_OF, with an activity, a note,
    a linked support ticket and no invoice."""
    cid = add_contact(conn, "former_client", date(2015, 1, 1), email=email)
    add_contract(conn, cid, date(2015, 1, 1), THREE_YEARS_BEFORE - timedelta(days=10))
    add_activity(conn, cid, "email_open", THREE_YEARS_BEFORE - timedelta(days=20))
    conn.execute("INSERT INTO crm.notes (note_id, contact_id, author, body, created_at)"
                 " VALUES (%s, %s, 'Claire Martin', 'Renewal call', now())", (new_id(), cid))
    conn.execute("INSERT INTO crm.support_tickets (ticket_id, contact_id, requester_email, body, created_at)"
                 " SELECT %s, contact_id, email, 'Hello', now() FROM crm.contacts WHERE contact_id = %s",
                 (new_id(), cid))
    return cid


def _invoice(conn: psycopg.Connection, cid: int, issued: date) -> str:
    iid = new_id()
    conn.execute("INSERT INTO crm.invoices (invoice_id, contact_id, issued_on, amount_eur, billing_name)"
                 " VALUES (%s, %s, %s, 10, 'Zoé Testperson')", (iid, cid, issued))
    return str(iid)


def _archive_of(conn: psycopg.Connection, cid: int) -> dict[tuple[str, str], Any]:
    """{(source table, source pk): purge_after} of a subject's archive rows."""
    rows = conn.execute("SELECT source_table, source_pk, purge_after FROM gdpr_archive.archived_row"
                        " WHERE subject_id = %s", (str(cid),)).fetchall()
    conn.rollback()
    return {(t, pk): after for t, pk, after in rows}


def test_only_the_tables_a_legal_obligation_keeps_are_archived_until_their_own_date(
    conn, policy: Policy, keys: Keys
) -> None:
    """Issue 10 point 2: a former client's contact row, notes, activities and tickets are pseudonymised
    without an archive copy; their invoices are archived for 10 years from issue, and an invoice whose
    10 years have already passed is not archived at all."""
    cid = _former_client(conn)
    recent = _invoice(conn, cid, date(2022, 5, 1))
    expired = _invoice(conn, cid, date(2014, 3, 1))
    conn.commit()

    sweep.apply_rule(conn, policy, policy.rule("former_clients"), keys, CTX, AS_OF)

    archive = _archive_of(conn, cid)
    assert list(archive) == [("crm.invoices", recent)]
    assert archive["crm.invoices", recent] == ts(date(2032, 5, 1))
    assert expired not in {pk for _, pk in archive}
    assert _count(conn, "SELECT count(*) FROM crm.invoices WHERE contact_id = %s AND billing_name IS NULL", cid) == 2
    assert _count(conn, "SELECT count(*) FROM crm.notes WHERE contact_id = %s AND body LIKE '[removed%%'", cid) == 1


def test_an_obligation_without_from_counts_its_period_from_the_sweeps_as_of(conn, keys: Keys) -> None:
    data = yaml.safe_load(POLICY_FILE.read_text(encoding="utf-8"))
    del data["tables"][4]["archive"]["from"]
    policy = parse_policy(data, "variant.yaml")
    cid = _former_client(conn)
    old = _invoice(conn, cid, date(2014, 3, 1))
    conn.commit()
    sweep.apply_rule(conn, policy, policy.rule("former_clients"), keys, CTX, AS_OF)
    assert _archive_of(conn, cid) == {("crm.invoices", old): ts(date(2036, 6, 15))}  # AS_OF + P10Y


def test_a_hashed_email_column_holds_the_subject_hash_of_the_normalised_email(
    conn, policy: Policy, keys: Keys, airflow_conns: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 10 point 3: the pseudonym of an email column is what `warehouse-gdpr subject-hash` prints and the
    suppression list stores, whatever the spelling stored; a non-email hashed column hashes its raw value."""
    data = yaml.safe_load(POLICY_FILE.read_text(encoding="utf-8"))
    data["tables"][2]["columns"]["author"] = {"pseudonymise": "hash"}  # not an email column
    variant = parse_policy(data, "variant.yaml")
    cid = _former_client(conn, email="  Alice.Former@X.example ")
    conn.commit()

    sweep.apply_rule(conn, variant, variant.rule("former_clients"), keys, CTX, AS_OF)

    monkeypatch.setattr("sys.stdin", io.StringIO("alice.former@x.example\n"))
    assert main(["subject-hash", str(POLICY_FILE)]) == 0
    printed = capsys.readouterr().out.split("\t")[1].split()[0]
    stored = conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0]  # type: ignore[index]
    ticket = conn.execute("SELECT requester_email FROM crm.support_tickets WHERE contact_id = %s", (cid,)).fetchone()[0]  # type: ignore[index]
    author = conn.execute("SELECT author FROM crm.notes WHERE contact_id = %s", (cid,)).fetchone()[0]  # type: ignore[index]
    conn.rollback()
    assert stored == ticket == printed == keys.subject_hash("ALICE.former@x.EXAMPLE")
    assert author == keys.hash_value("Claire Martin")


def test_failure_mid_batch_leaves_nothing_half_done(conn, policy: Policy, keys: Keys) -> None:
    rule = policy.rule("former_clients")
    todo = sorted(cid for cid, holds in candidates(conn, policy, rule.name).items() if not holds)
    with_notes = [
        r[0] for r in conn.execute(
            "SELECT DISTINCT contact_id FROM crm.notes WHERE contact_id = ANY(%s) ORDER BY 1", (todo,)
        ).fetchall()
    ]
    victim = with_notes[len(with_notes) // 2]
    # A real server-side failure late in the batch: after the archive copy and the contacts update.
    conn.execute(
        "CREATE FUNCTION crm.fail_on_victim() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN IF NEW.contact_id = {victim} THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$"
    )
    conn.execute(
        "CREATE TRIGGER fail_on_victim BEFORE UPDATE ON crm.notes FOR EACH ROW EXECUTE FUNCTION crm.fail_on_victim()"
    )
    conn.commit()

    with pytest.raises(psycopg.errors.RaiseException):
        sweep.apply_rule(conn, policy, rule, keys, CTX, AS_OF, batch_size=20)
    conn.rollback()

    done = {
        r[0] for r in conn.execute(
            "SELECT contact_id FROM crm.contacts WHERE contact_id = ANY(%s) AND pseudonymised_at IS NOT NULL", (todo,)
        ).fetchall()
    }
    assert victim not in done and 0 < len(done) < len(todo)
    archived_subjects = {
        int(r[0]) for r in conn.execute("SELECT DISTINCT subject_id FROM gdpr_archive.archived_row").fetchall()
    }
    with_recent_invoices = {
        r[0] for r in conn.execute(
            "SELECT DISTINCT contact_id FROM crm.invoices WHERE contact_id = ANY(%s)"
            " AND issued_on > %s::date - interval '10 years'", (list(done), AS_OF)
        ).fetchall()
    }
    assert with_recent_invoices, "some processed subject must have an archived invoice"
    assert archived_subjects == with_recent_invoices, "archive copies exist only for the fully processed subjects"
    untouched_emails = conn.execute(
        "SELECT count(*) FROM crm.contacts WHERE contact_id = ANY(%s) AND pseudonymised_at IS NULL"
        " AND email LIKE '%%@%%'", (todo,)
    ).fetchone()[0]
    assert untouched_emails == len(todo) - len(done)
    assert _audited(conn, "run-1", "pseudonymise", "crm.contacts") == len(done)
    conn.rollback()

    conn.execute("DROP TRIGGER fail_on_victim ON crm.notes")
    conn.commit()
    rerun = sweep.apply_rule(conn, policy, rule, keys, RunContext("t", "run-2", "apply"), AS_OF, batch_size=20)
    assert rerun.pseudonymised == len(todo) - len(done)
    assert _count(
        conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = ANY(%s) AND pseudonymised_at IS NULL", todo
    ) == 0


def test_delete_failure_rolls_back_dependents(conn, policy: Policy, keys: Keys) -> None:
    rule = policy.rule("leads_not_converted")
    todo = sorted(cid for cid, holds in candidates(conn, policy, rule.name).items() if not holds)
    victim = todo[-1]
    acts = _count(conn, "SELECT count(*) FROM crm.activities WHERE contact_id = %s", victim)
    conn.execute(
        "CREATE FUNCTION crm.no_delete() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN IF OLD.contact_id = {victim} THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN OLD; END $$"
    )
    conn.execute("CREATE TRIGGER no_delete BEFORE DELETE ON crm.contacts FOR EACH ROW EXECUTE FUNCTION crm.no_delete()")
    conn.commit()
    with pytest.raises(psycopg.errors.RaiseException):
        sweep.apply_rule(conn, policy, rule, keys, CTX, AS_OF, batch_size=1000)
    conn.rollback()
    assert _count(conn, "SELECT count(*) FROM crm.activities WHERE contact_id = %s", victim) == acts
    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = ANY(%s)", todo) == len(todo)
    assert _count(conn, "SELECT count(*) FROM gdpr.audit_log WHERE run_id = 'run-1'") == 0


def test_plan_changes_nothing(conn, policy: Policy) -> None:
    before = table_checksum(conn, CRM_TABLES)
    plans = sweep.plan(conn, policy, policy.rules, AS_OF)
    assert [p.rule for p in plans] == [r.name for r in policy.rules]
    assert all(p.candidates > p.held >= 0 for p in plans)
    assert table_checksum(conn, CRM_TABLES) == before
    assert _count(conn, "SELECT count(*) FROM gdpr_archive.archived_row") == 0


def _advance(conn: psycopg.Connection, by: timedelta) -> datetime:
    """As if `by` had passed, for the archive: every purge date moved back by `by` (as the owner). Returns
    the database's now."""
    conn.execute("UPDATE gdpr_archive.archived_row SET purge_after = purge_after - %s", (by,))
    now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    conn.commit()
    return now  # type: ignore[no-any-return]


def test_purge_archive_after_its_own_period(conn, policy: Policy, keys: Keys) -> None:
    cid = _former_client(conn)
    invoice = _invoice(conn, cid, THREE_YEARS_BEFORE - timedelta(days=100))  # 2023-03-07: kept until 2033-03-07
    # An archive row written under the former policy (rules[].archive_for: the contact row, for as_of + P10Y):
    # it keeps its own purge date and stays decryptable.
    contact_json = conn.execute(
        "SELECT to_jsonb(c)::text FROM crm.contacts c WHERE contact_id = %s", (cid,)).fetchone()[0]  # type: ignore[index]
    key_id, nonce, ciphertext = keys.archive_encrypt(
        contact_json.encode(), archive_aad("crm.contacts", str(cid), keys.archive_key_id))
    conn.execute(
        "INSERT INTO gdpr_archive.archived_row (source_table, source_pk, subject_id, rule, run_id, purge_after, key_id,"
        " nonce, ciphertext) VALUES ('crm.contacts', %s, %s, 'former_clients', 'old-run', '2036-06-15T00:00:00+00:00',"
        " %s, %s, %s)", (str(cid), str(cid), key_id, nonce, ciphertext))
    conn.commit()
    sweep.apply_rule(conn, policy, policy.rule("former_clients"), keys, CTX, AS_OF)
    assert set(_archive_of(conn, cid)) == {("crm.invoices", invoice), ("crm.contacts", str(cid))}
    conn.execute("DELETE FROM gdpr_archive.archived_row WHERE subject_id <> %s", (str(cid),))  # the seeded ones
    conn.commit()

    purge_ctx = RunContext("test_sweep", "purge", "purge_archive")
    # The database's clock decides too (control schema v8): an as_of ahead of it purges nothing early.
    assert sweep.purge_archive(conn, policy, purge_ctx, "2099-01-01T00:00:00+00:00", 1000).purged == 0
    # Ten years on, as the database sees it: every purge date moved back until 2033-03-08 is now.
    today = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    now = _advance(conn, datetime(2033, 3, 8, tzinfo=timezone.utc) - today)
    assert sweep.purge_archive(conn, policy, purge_ctx, (now - timedelta(days=7)).isoformat(), 1000).purged == 0
    dry = RunContext("test_sweep", "purge-dry", "purge_archive", dry_run=True)
    assert sweep.purge_archive(conn, policy, dry, now.isoformat(), 1000).purged == 1
    assert len(_archive_of(conn, cid)) == 2
    assert sweep.purge_archive(conn, policy, purge_ctx, now.isoformat(), 100).purged == 1
    assert set(_archive_of(conn, cid)) == {("crm.contacts", str(cid))}
    row = conn.execute("SELECT key_id, nonce, ciphertext FROM gdpr_archive.archived_row"
                       " WHERE source_table = 'crm.contacts' AND source_pk = %s", (str(cid),)).fetchone()
    conn.rollback()
    assert row is not None
    assert json.loads(keys.decrypt(row[0], row[1], row[2], archive_aad("crm.contacts", str(cid), row[0]))) == (
        json.loads(contact_json))
    now = _advance(conn, datetime(2036, 6, 16, tzinfo=timezone.utc) - datetime(2033, 3, 8, tzinfo=timezone.utc))
    early = (now - timedelta(days=2)).isoformat()
    assert sweep.purge_archive(conn, policy, purge_ctx, early, 100).purged == 0  # not before its date
    assert sweep.purge_archive(conn, policy, purge_ctx, now.isoformat(), 100).purged == 1
    assert _archive_of(conn, cid) == {}
    assert _audited(conn, "purge", "purge_archive", "gdpr_archive.archived_row") == 2


def _restrict(conn: psycopg.Connection, cid: int, request_id: str) -> None:
    """A restriction of processing in force for the subject `cid` (as restriction.apply records it)."""
    conn.execute("INSERT INTO gdpr.restriction (subject_hash, by_email, key_id, subject_table, subject_ids,"
                 " request_id) VALUES (%s, false, 'k1', 'crm.contacts', %s, %s)",
                 (f"{cid:064x}", [str(cid)], request_id))


def test_purge_archive_keeps_the_archive_of_a_restricted_person_until_the_lift(
    conn, warehouse: str, policy: Policy, keys: Keys
) -> None:
    """Art. 18: "keep my invoices, I need them for a legal claim". The sweep neither deletes nor pseudonymises a
    restricted person; its archive purge does not delete their archived originals either, while in force."""
    restricted, other = _former_client(conn), _former_client(conn)
    for cid in (restricted, other):
        _invoice(conn, cid, THREE_YEARS_BEFORE - timedelta(days=100))
    conn.commit()
    sweep.apply_rule(conn, policy, policy.rule("former_clients"), keys, CTX, AS_OF)
    conn.execute("DELETE FROM gdpr_archive.archived_row WHERE subject_id <> ALL(%s)", ([str(restricted), str(other)],))
    _restrict(conn, restricted, "REQ-RS-KEEP")
    conn.commit()
    today = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    now = _advance(conn, datetime(2033, 3, 8, tzinfo=timezone.utc) - today)
    ctx = RunContext("test_sweep", "purge-held", "purge_archive")
    with psycopg.connect(as_role(warehouse, "gdpr_dag")) as engine:  # the DAGs' role
        dry = sweep.purge_archive(engine, policy, dataclasses.replace(ctx, run_id="purge-held-dry", dry_run=True),
                                  now.isoformat(), 1)
        assert (dry.purged, dry.kept_restricted) == (1, 1)
        done = sweep.purge_archive(engine, policy, ctx, now.isoformat(), 1)  # batches of one: keyset past the kept
    assert (done.purged, done.kept_restricted) == (1, 1)
    assert [t for t, _ in _archive_of(conn, restricted)] == ["crm.invoices"]
    assert _archive_of(conn, other) == {}
    assert _audited(conn, "purge-held", "purge_archive", "gdpr_archive.archived_row") == 1
    assert _audited(conn, "purge-held", "purge_archive_held", "gdpr_archive.archived_row") == 1
    conn.execute("DELETE FROM gdpr.restriction WHERE request_id = 'REQ-RS-KEEP'")  # lifted
    conn.commit()
    lifted = sweep.purge_archive(conn, policy, dataclasses.replace(ctx, run_id="purge-lifted"), now.isoformat(), 100)
    assert (lifted.purged, lifted.kept_restricted) == (1, 0)
    assert _archive_of(conn, restricted) == {}


def test_purge_archive_waits_for_a_restriction_being_recorded(conn, warehouse: str, policy: Policy,
                                                              keys: Keys) -> None:
    """Lock, then re-check: a restriction being recorded holds the person's subject row FOR UPDATE (as
    restriction.apply does) when the purge reaches it; the purge waits, then sees the restriction and keeps the
    row. Without the lock the purge's snapshot would miss the uncommitted restriction and delete it."""
    cid = _former_client(conn)
    _invoice(conn, cid, THREE_YEARS_BEFORE - timedelta(days=100))
    conn.commit()
    sweep.apply_rule(conn, policy, policy.rule("former_clients"), keys, CTX, AS_OF)
    conn.execute("DELETE FROM gdpr_archive.archived_row WHERE subject_id <> %s", (str(cid),))
    conn.commit()
    today = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    now = _advance(conn, datetime(2033, 3, 8, tzinfo=timezone.utc) - today)
    with psycopg.connect(warehouse) as restricting:
        restricting.execute("SELECT 1 FROM crm.contacts WHERE contact_id = %s FOR UPDATE", (cid,))
        _restrict(restricting, cid, "REQ-RS-RACE")  # not committed yet
        purging = Worker(as_role(warehouse, "gdpr_dag"), lambda engine: sweep.purge_archive(
            engine, policy, RunContext("test_sweep", "purge-race", "purge_archive"), now.isoformat(), 100))
        purging.start()
        wait_for_lock_wait(conn, purging)  # fails if the purge ends without waiting for the subject row
        restricting.commit()
        done = purging.finish()
    assert (done.purged, done.kept_restricted) == (0, 1)
    assert [t for t, _ in _archive_of(conn, cid)] == ["crm.invoices"]


def test_unmapped_foreign_key_gives_a_clear_error(conn, policy: Policy, keys: Keys) -> None:
    conn.execute(
        "CREATE TABLE crm.tickets (ticket_id bigint PRIMARY KEY, contact_id bigint REFERENCES crm.contacts)"
    )
    conn.commit()
    victim = next(cid for cid, holds in candidates(conn, policy, "leads_not_converted").items() if not holds)
    conn.execute("INSERT INTO crm.tickets VALUES (1, %s)", (victim,))
    conn.commit()
    with pytest.raises(RuntimeError, match="crm.tickets|tickets") as err:
        sweep.apply_rule(conn, policy, policy.rule("leads_not_converted"), keys, CTX, AS_OF)
    assert "does not map" in str(err.value)
    assert "@" not in str(err.value)


def test_select_rules_rejects_unknown_names(policy: Policy) -> None:
    assert [r.name for r in sweep.select_rules(policy, ["former_clients"])] == ["former_clients"]
    with pytest.raises(ValueError, match="unknown rule"):
        sweep.select_rules(policy, ["former_clients", "everyone"])


# -- a hold that cannot be decided holds (issue 11.3) ------------------------------------------------


def _open_ended_litigation(conn: psycopg.Connection) -> tuple[Policy, int, int]:
    """A litigation hold with an end date: NULL (an open-ended case) must hold, as a passed date must not.

    Returns (policy, the litigant whose predicate is NULL, one whose case ended), both expired prospects."""
    from pathlib import Path

    import yaml

    from warehouse_gdpr.engine.policy import parse_policy

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "include" / "policy.yaml").read_text())
    data["holds"][2]["predicate"] = "s.litigation_until >= :as_of::date"
    conn.execute("ALTER TABLE crm.contacts ADD COLUMN litigation_until date")
    created = THREE_YEARS_BEFORE - timedelta(days=400)
    litigant = add_contact(conn, "prospect", created, litigation=True)
    ended = add_contact(conn, "prospect", created, litigation=True)
    conn.execute("UPDATE crm.contacts SET litigation_until = '2020-01-01' WHERE contact_id = %s", (ended,))
    conn.commit()
    return parse_policy(data, "variant"), litigant, ended


def test_a_hold_whose_predicate_is_null_is_not_swept(conn, keys: Keys) -> None:
    policy, litigant, ended = _open_ended_litigation(conn)
    rule = policy.rule("prospects_never_converted")
    found = candidates(conn, policy, rule.name)
    assert found[litigant] == ["litigation"] and found[ended] == []

    sweep.apply_rule(conn, policy, rule, keys, CTX, AS_OF)

    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = %s", litigant) == 1
    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = %s", ended) == 0


def test_erasure_and_the_resurrection_guard_also_hold_on_null(conn, keys: Keys) -> None:
    from psycopg import sql

    from warehouse_gdpr.engine import candidates as engine_candidates
    from warehouse_gdpr.engine import erasure

    policy, litigant, ended = _open_ended_litigation(conn)
    for person, expected in ((litigant, {"litigation": "refuse"}), (ended, {})):
        located = erasure.Located(subject_ids=[person], subject_hash="h", email=None)
        assert erasure.holds_in_force(conn, policy, located, AS_OF) == expected
        holds = conn.execute(  # every hold, as the resurrection guard evaluates them
            sql.SQL("SELECT {h} FROM crm.contacts s WHERE s.contact_id = %(id)s").format(
                h=engine_candidates.holds_array(policy.holds)),
            {"id": person, "as_of": AS_OF},
        ).fetchone()[0]  # type: ignore[index]
        conn.rollback()
        assert holds == list(expected)


# -- the blast-radius limit's arithmetic (the apply task enforces it: test_dag_retention_sweep.py) -----


def test_blast_radius_names_the_rules_above_the_limit(conn, policy: Policy) -> None:
    rows = sweep.subject_rows(conn, policy)
    assert rows == _count(conn, "SELECT count(*) FROM crm.contacts") == 1500
    counts = {"a": 150, "b": 151, "c": 0}  # exactly 10 % is allowed, one more is not
    assert [(b.rule, b.percent, b.confirmed, b.allowed) for b in sweep.blast_radius(counts, rows, 10)] == [
        ("b", 10.1, None, False)
    ]
    # a confirmation is an upper bound: the planned count or more lets the rule run, less does not
    assert sweep.blast_radius(counts, rows, 10, {"b": 151})[0].allowed
    assert sweep.blast_radius(counts, rows, 10, {"b": 500})[0].allowed
    assert not sweep.blast_radius(counts, rows, 10, {"b": 150})[0].allowed
    assert sweep.blast_radius(counts, rows, 100) == [] and sweep.blast_radius(counts, 0, 10) == []
