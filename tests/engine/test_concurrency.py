"""The sweep on a warehouse that others write to: real concurrent connections, on a real PostgreSQL.

Steps are ordered with row locks held by a test connection and by watching `pg_stat_activity` until
a worker's backend waits for a lock (wait_event_type 'Lock'): no sleeps, no timed assertion.

* two sweeps at once end exactly as one sweep alone (checksums, archive, audit counts);
* a change committed while the sweep waits for its row lock (litigation flag, new contract, the
  person's own reply, a pseudonymisation by someone else) is honoured: lock, then check;
* erasure and sweep on the same person both complete (one lock order);
* a second sweep stops with a clear message naming the lock's holder, and changes nothing.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date
from typing import Any

import psycopg
import pytest
from psycopg import sql

from helpers import (
    AS_OF,
    CRM_TABLES,
    Worker,
    add_activity,
    add_contact,
    add_contract,
    new_id,
    table_checksum,
    wait_for_lock_wait,
)
from warehouse_gdpr.engine import erasure, sweep
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys, archive_aad
from warehouse_gdpr.engine.policy import Policy

CRM_ALL = [*CRM_TABLES, "crm.support_tickets"]
LONG_AGO = date(2020, 1, 15)  # far beyond every rule's three years before AS_OF


# -- workers and ordering --------------------------------------------------------------------------


@pytest.fixture
def long_lock_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second sweep waits for the first however slow the machine is (ordering is done by locks)."""
    monkeypatch.setattr(sweep, "LOCK_WAIT_SECONDS", 600.0, raising=False)


@pytest.fixture
def reference(server_url: str, template_db: str) -> Iterator[str]:
    """A second fresh copy of the template: where the reference sweep runs alone."""
    from conftest import _with_db

    name = f"gdpr_ref_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                      sql.Identifier(template_db)))
    try:
        yield _with_db(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _count(conn: psycopg.Connection, query: str, *params: object) -> int:
    value = conn.execute(query, params).fetchone()[0]  # type: ignore[index]
    conn.rollback()
    return int(value)


def _run_rules(policy: Policy, keys: Keys, ctx: RunContext, names: list[str]) -> Callable[[psycopg.Connection], Any]:
    def body(conn: psycopg.Connection) -> list[sweep.RuleResult]:
        return [sweep.apply_rule(conn, policy, policy.rule(n), keys, ctx, AS_OF) for n in names]
    return body


# -- end state -------------------------------------------------------------------------------------


def end_state(conn: psycopg.Connection, keys: Keys) -> dict[str, Any]:
    """Every crm table (the marker's instant masked to set / not set), the archive (which rows, and an
    md5 of their decrypted originals) and the audit's row counts per action and table."""
    state: dict[str, Any] = table_checksum(conn, [t for t in CRM_ALL if t != "crm.contacts"])
    masked = ("(SELECT to_jsonb(c) - 'pseudonymised_at' AS contact, c.pseudonymised_at IS NOT NULL AS pseudonymised"
              " FROM crm.contacts c)")
    state |= table_checksum(conn, [masked])
    archive = conn.execute(
        "SELECT source_table, source_pk, subject_id, rule, purge_after, key_id, nonce, ciphertext"
        " FROM gdpr_archive.archived_row ORDER BY source_table, source_pk"
    ).fetchall()
    conn.rollback()
    digest = hashlib.md5()
    for table, pk, subject, rule, purge_after, key_id, nonce, ciphertext in archive:
        plain = keys.decrypt(key_id, nonce, ciphertext, archive_aad(table, pk, key_id))
        digest.update(f"{table}|{pk}|{subject}|{rule}|{purge_after.isoformat()}|".encode() + plain + b"\n")
    state["archive"] = (len(archive), digest.hexdigest())
    state["audit"] = {
        (a, t): int(n) for a, t, n in conn.execute(
            "SELECT action, coalesce(table_name, ''), sum(row_count) FROM gdpr.audit_log"
            " WHERE action IN ('delete', 'pseudonymise', 'archive') GROUP BY 1, 2"
        ).fetchall()
    }
    conn.rollback()
    return state


# -- 1. two sweeps at once -------------------------------------------------------------------------


def test_two_concurrent_sweeps_end_as_one(
    warehouse: str, reference: str, policy: Policy, keys: Keys, long_lock_wait: None
) -> None:
    rules = [r.name for r in policy.rules]
    with psycopg.connect(reference) as conn:
        alone = _run_rules(policy, keys, RunContext("test", "alone", "apply"), rules)(conn)
        expected = end_state(conn, keys)
    assert sum(r.pseudonymised for r in alone) > 0 and sum(r.deleted for r in alone) > 0

    with psycopg.connect(warehouse) as observer, psycopg.connect(warehouse) as blocker:
        # A note of a former client, locked: sweep A stops mid-batch, after it locked its subjects
        # and pseudonymised crm.contacts, before it commits.
        note = blocker.execute(
            "SELECT n.note_id FROM crm.notes n JOIN crm.contacts c USING (contact_id)"
            " WHERE c.status = 'former_client' AND c.pseudonymised_at IS NULL ORDER BY n.note_id LIMIT 1 FOR UPDATE"
        ).fetchone()
        assert note is not None
        first = Worker(warehouse, _run_rules(policy, keys, RunContext("test", "first", "apply"), ["former_clients"]))
        first.start()
        wait_for_lock_wait(observer, first)
        # Sweep B starts while A's batch is uncommitted: the same people look due to it.
        second = Worker(warehouse, _run_rules(policy, keys, RunContext("test", "second", "apply"), ["former_clients"]))
        second.start()
        second_waited_for = wait_for_lock_wait(observer, second)
        blocker.rollback()
        results = first.finish() + second.finish()
    with psycopg.connect(warehouse) as conn:
        # the delete rules, by one sweep, so that the whole end state compares with the reference
        _run_rules(policy, keys, RunContext("test", "rest", "apply"), rules[:2])(conn)
        got = end_state(conn, keys)

    done = next(r for r in alone if r.rule == "former_clients").pseudonymised
    assert sum(r.pseudonymised for r in results) == done, "each person pseudonymised once, by one of the sweeps"
    assert got == expected
    assert second_waited_for == "advisory", "the second sweep waits for the sweep lock, not for rows"


# -- 2. lock, then check ---------------------------------------------------------------------------


def _litigation(conn: psycopg.Connection, cid: int) -> None:
    conn.execute("UPDATE crm.contacts SET litigation_hold = true WHERE contact_id = %s", (cid,))


def _new_contract(conn: psycopg.Connection, cid: int) -> None:
    add_contract(conn, cid, date(2026, 6, 1), None)


def _own_reply(conn: psycopg.Connection, cid: int) -> None:
    add_activity(conn, cid, "email_reply", date(2026, 6, 10))


def _pseudonymised_by_someone_else(conn: psycopg.Connection, cid: int) -> None:
    conn.execute(
        "UPDATE crm.contacts SET email = 'pseudonym-set-elsewhere', pseudonymised_at = now() WHERE contact_id = %s",
        (cid,),
    )


REPEATABLE_READ = psycopg.IsolationLevel.REPEATABLE_READ


@pytest.mark.parametrize(
    ("status", "rule", "change", "isolation"),
    [
        ("prospect", "prospects_never_converted", _litigation, None),
        ("prospect", "prospects_never_converted", _new_contract, None),
        ("lead", "leads_not_converted", _own_reply, None),
        ("former_client", "former_clients", _litigation, None),
        ("former_client", "former_clients", _new_contract, None),
        ("former_client", "former_clients", _pseudonymised_by_someone_else, None),
        # a session whose default is REPEATABLE READ: the batch still re-checks in a fresh snapshot
        ("prospect", "prospects_never_converted", _new_contract, REPEATABLE_READ),
    ],
    ids=["delete-litigation", "delete-new-contract", "delete-own-reply", "pseudonymise-litigation",
         "pseudonymise-new-contract", "pseudonymise-marker-set-meanwhile", "repeatable-read-session"],
)
def test_a_change_committed_while_the_sweep_waits_is_honoured(
    warehouse: str, policy: Policy, keys: Keys, status: str, rule: str,
    change: Callable[[psycopg.Connection, int], None], isolation: psycopg.IsolationLevel | None,
) -> None:
    with psycopg.connect(warehouse) as conn:
        cid = add_contact(conn, status, LONG_AGO)
        if status == "former_client":
            add_contract(conn, cid, LONG_AGO, date(2021, 1, 31))
        conn.commit()

    with psycopg.connect(warehouse) as observer, psycopg.connect(warehouse) as other:
        change(other, cid)  # uncommitted: it holds a lock on the person's row
        after_change = other.execute("SELECT c::text FROM crm.contacts c WHERE contact_id = %s", (cid,)).fetchone()
        worker = Worker(warehouse, _run_rules(policy, keys, RunContext("test", "run-1", "apply"), [rule]))
        worker.conn.isolation_level = isolation
        worker.start()
        wait_for_lock_wait(observer, worker)  # selected the person, now waits for the row lock
        other.commit()
        [result] = worker.finish()

    with psycopg.connect(warehouse) as conn:
        row = conn.execute("SELECT c::text FROM crm.contacts c WHERE contact_id = %s", (cid,)).fetchone()
        conn.rollback()
        assert row is not None, "the person was deleted although the change made them ineligible"
        assert row == after_change, "the person was changed by the sweep after all"
        assert _count(conn, "SELECT count(*) FROM gdpr_archive.archived_row WHERE subject_id = %s", str(cid)) == 0
        if change is _new_contract:
            assert _count(conn, "SELECT count(*) FROM crm.contracts WHERE contact_id = %s AND end_date IS NULL",
                          cid) == 1
        assert result.changed_under_lock == 1
        # the audit counts what happened: the person is not among the rows changed
        action = "delete" if result.action == "delete" else "pseudonymise"
        audited = _count(
            conn, "SELECT coalesce(sum(row_count), 0) FROM gdpr.audit_log WHERE run_id = 'run-1'"
            " AND action = %s AND table_name = 'crm.contacts'", action,
        )
        assert audited == result.deleted + result.pseudonymised == result.candidates - result.held - 1
        batch = conn.execute(
            "SELECT sum((details->>'changed_under_lock')::int) FROM gdpr.audit_log WHERE run_id = 'run-1'"
            " AND action = 'batch'"
        ).fetchone()
        assert batch == (1,)


# -- 3. erasure and sweep on one person ------------------------------------------------------------


def test_erasure_and_sweep_on_one_person_both_complete(warehouse: str, policy: Policy, keys: Keys) -> None:
    with psycopg.connect(warehouse) as conn:
        person = add_contact(conn, "prospect", LONG_AGO)  # due for deletion, and asking for erasure
        add_activity(conn, person, "email_open", LONG_AGO)
        conn.execute(
            "INSERT INTO crm.notes (note_id, contact_id, author, body, created_at)"
            " VALUES (%s, %s, 'Rep', 'Called', now())",
            (new_id(), person),
        )
        email = conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (person,)).fetchone()[0]  # type: ignore[index]
        neighbour = add_contact(conn, "prospect", LONG_AGO)  # in the same sweep batch
        ticket = new_id()
        conn.execute(
            "INSERT INTO crm.support_tickets (ticket_id, contact_id, requester_email, subject, body, created_at)"
            " SELECT %s, contact_id, email, 'Question', 'Hello', now() FROM crm.contacts WHERE contact_id = %s",
            (ticket, neighbour),
        )
        conn.commit()

    def erase(conn: psycopg.Connection) -> erasure.ErasureResult:
        request = erasure.parse_request({"email": email, "request_id": "REQ-CONC-1"}, today=date(2026, 6, 15))
        located = erasure.locate(conn, policy, keys, request)
        holds = erasure.holds_in_force(conn, policy, located, AS_OF)
        return erasure.erase(conn, policy, keys, RunContext("test", "erase-1", "erase"), request, located, holds)

    with psycopg.connect(warehouse) as observer, psycopg.connect(warehouse) as blocker:
        # The neighbour's ticket, locked: the sweep stops after it locked its batch's subjects (the
        # person included), before it deletes their dependent rows.
        blocker.execute("SELECT 1 FROM crm.support_tickets WHERE ticket_id = %s FOR UPDATE", (ticket,))
        sweeper = Worker(warehouse, _run_rules(policy, keys, RunContext("test", "sweep-1", "apply"),
                                               ["prospects_never_converted"]))
        sweeper.start()
        wait_for_lock_wait(observer, sweeper)
        eraser = Worker(warehouse, erase)
        eraser.start()
        wait_for_lock_wait(observer, eraser)  # the erasure waits for the person's row, held by the sweep
        blocker.rollback()
        swept = sweeper.finish()
        erased = eraser.finish()

    assert erased.outcome == "erased" and swept[0].deleted > 0
    with psycopg.connect(warehouse) as conn:
        for table in CRM_ALL:
            assert _count(conn, f"SELECT count(*) FROM {table} WHERE contact_id = %s", person) == 0  # fixed names
        assert _count(conn, "SELECT count(*) FROM gdpr.erasure_request WHERE request_id = 'REQ-CONC-1'") == 1


# -- 4. the sweep lock -----------------------------------------------------------------------------


def test_a_second_sweep_stops_with_a_clear_message_and_changes_nothing(
    warehouse: str, policy: Policy, keys: Keys
) -> None:
    with psycopg.connect(warehouse) as holder, psycopg.connect(warehouse) as conn:
        before = table_checksum(conn, CRM_ALL)
        with sweep.sweep_lock(holder, RunContext("gdpr_retention_sweep", "scheduled__2026-06-15", "apply"), 0):
            for wait in (0, 0.2):  # no wait, and a bounded wait
                with pytest.raises(sweep.SweepLockBusy) as busy:
                    sweep.apply_rule(conn, policy, policy.rule("prospects_never_converted"), keys,
                                     RunContext("test", "second", "apply"), AS_OF, lock_wait_seconds=wait)
                message = str(busy.value)
                assert f"backend pid {holder.info.backend_pid}" in message
                assert "warehouse-gdpr sweep scheduled__2026-06-15" in message
                assert "changed nothing" in message and "@" not in message
            assert table_checksum(conn, CRM_ALL) == before
            assert _count(conn, "SELECT count(*) FROM gdpr.audit_log WHERE run_id = 'second' AND action = 'sweep_lock'"
                          " AND outcome = 'busy'") == 2
            assert _count(conn, "SELECT count(*) FROM gdpr.audit_log"
                                " WHERE run_id = 'second' AND action <> 'sweep_lock'") == 0
        # released: the sweep runs
        result = sweep.apply_rule(conn, policy, policy.rule("prospects_never_converted"), keys,
                                  RunContext("test", "third", "apply"), AS_OF, lock_wait_seconds=0)
        assert result.deleted > 0


def test_a_killed_holder_releases_the_lock(warehouse: str, policy: Policy, keys: Keys) -> None:
    holder = psycopg.connect(warehouse)
    with holder.transaction():
        holder.execute("SELECT pg_advisory_lock(%s, %s)", sweep.SWEEP_LOCK)
    with psycopg.connect(warehouse) as conn:
        with pytest.raises(sweep.SweepLockBusy):
            sweep.apply_rule(conn, policy, policy.rule("leads_not_converted"), keys,
                             RunContext("test", "blocked", "apply"), AS_OF, lock_wait_seconds=0)
        # what the runbook tells on-call to do with a holder whose task is gone
        conn.execute("SELECT pg_terminate_backend(%s)", (holder.info.backend_pid,))
        conn.commit()
        wait_free = time.monotonic() + 300
        while _count(conn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", holder.info.backend_pid):
            assert time.monotonic() < wait_free
            time.sleep(0.02)
        result = sweep.apply_rule(conn, policy, policy.rule("leads_not_converted"), keys,
                                  RunContext("test", "after-kill", "apply"), AS_OF, lock_wait_seconds=0)
        assert result.deleted > 0
    holder.close()


def test_the_lock_is_reentrant_and_released_after_each_rule(warehouse: str, policy: Policy, keys: Keys) -> None:
    """The DAG's apply task holds the lock around its rules; apply_rule takes it again (reentrant)."""
    with psycopg.connect(warehouse) as conn, psycopg.connect(warehouse) as other:
        ctx = RunContext("test", "run-1", "apply")
        with sweep.sweep_lock(conn, ctx, 0):
            sweep.apply_rule(conn, policy, policy.rule("leads_not_converted"), keys, ctx, AS_OF, lock_wait_seconds=0)
            # still held by the task after the rule: another session cannot take it
            assert other.execute("SELECT pg_try_advisory_lock(%s, %s)", sweep.SWEEP_LOCK).fetchone() == (False,)
            other.rollback()
        assert other.execute("SELECT pg_try_advisory_lock(%s, %s)", sweep.SWEEP_LOCK).fetchone() == (True,)
        other.execute("SELECT pg_advisory_unlock(%s, %s)", sweep.SWEEP_LOCK)
        other.rollback()


def test_a_connection_with_uncommitted_changes_is_refused(conn, policy: Policy, keys: Keys) -> None:
    """Each batch commits on its own: the sweep never commits (or silently drops) a caller's changes."""
    before = table_checksum(conn, CRM_ALL)
    cid = add_contact(conn, "prospect", LONG_AGO)  # not committed
    with pytest.raises(RuntimeError, match="uncommitted changes"):
        sweep.apply_rule(conn, policy, policy.rule("prospects_never_converted"), keys,
                         RunContext("test", "run-1", "apply"), AS_OF)
    assert conn.execute("SELECT count(*) FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone() == (1,)
    conn.rollback()
    assert table_checksum(conn, CRM_ALL) == before
    assert _count(conn, "SELECT count(*) FROM gdpr.audit_log WHERE run_id = 'run-1'") == 0
