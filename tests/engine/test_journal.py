"""The journal kept outside the warehouse and its replay after a restore (issue 15), engine level, on the real
database: a "backup" is a copy of the test's warehouse database taken before the changes (CREATE DATABASE ...
TEMPLATE, the same bytes as a restore of a dump would give; the DAG-level test uses pg_dump / pg_restore)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from helpers import as_role, capture_persons, pii_scan
from warehouse_gdpr.engine import erasure, journal, optout, propagation, requests, restriction
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.errors import ConfigurationError
from warehouse_gdpr.engine.policy import Policy

TODAY = date(2026, 6, 15)
AS_OF = "2026-06-15T12:00:00+00:00"
ERASE = RunContext("gdpr_subject_erasure", "run-1", "erase")
REPLAY = RunContext("gdpr_restore_replay", "run-r", "replay")


def _rotated(extra: dict, new_id: str) -> Keys:
    """The keys after a pepper rotation: a new current pepper, the old one in hmac_chain."""
    chain = [*extra.get("hmac_chain", []), {"key_id": extra["hmac_key_id"], "pepper": extra["hmac_pepper"]}]
    return Keys.from_extra({**extra, "hmac_key_id": new_id, "hmac_pepper": base64.b64encode(os.urandom(32)).decode(),
                            "hmac_chain": chain})


def _db(url: str, name: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = name
    return make_conninfo(**params)


@pytest.fixture
def backup(server_url: str, warehouse: str) -> Iterator[str]:
    """A copy of the warehouse as it is when the fixture runs (a backup), as its own database; its URL."""
    name = f"{conninfo_to_dict(warehouse)['dbname']}_backup"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(str(conninfo_to_dict(warehouse)["dbname"]))))
    try:
        yield _db(warehouse, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _chain_id(conn: psycopg.Connection) -> str:
    chain_id = conn.execute("SELECT chain_id::text FROM gdpr.audit_chain_head").fetchone()[0]  # type: ignore[index]
    conn.rollback()
    return str(chain_id)


def _store(tmp_path: Path, conn: psycopg.Connection) -> journal.PathJournalStore:
    return journal.PathJournalStore(tmp_path / "evidence", _chain_id(conn))  # type: ignore[arg-type]


def _prospects(conn: psycopg.Connection, n: int) -> list[tuple[int, str]]:
    rows = conn.execute(
        "SELECT contact_id, email FROM crm.contacts c WHERE status = 'prospect' AND NOT litigation_hold"
        " AND NOT EXISTS (SELECT 1 FROM crm.contracts x WHERE x.contact_id = c.contact_id)"
        " AND NOT EXISTS (SELECT 1 FROM crm.invoices x WHERE x.contact_id = c.contact_id)"
        " AND EXISTS (SELECT 1 FROM crm.activities a WHERE a.contact_id = c.contact_id)"
        " ORDER BY contact_id LIMIT %s", (n,)).fetchall()
    conn.rollback()
    assert len(rows) == n
    return [(int(r[0]), str(r[1])) for r in rows]


def _erase(conn: psycopg.Connection, policy: Policy, keys: Keys, email: str, request_id: str) -> str:
    request = erasure.parse_request({"email": email, "request_id": request_id}, today=TODAY)
    located = erasure.locate(conn, policy, keys, request)
    holds = erasure.holds_in_force(conn, policy, located, AS_OF)
    result = erasure.erase(conn, policy, keys, ERASE, request, located, holds, AS_OF)
    assert result.outcome == "erased"
    return located.subject_hash


def _rows(conn: psycopg.Connection, query: str, *params: object) -> list[tuple]:
    rows = conn.execute(query, params).fetchall()
    conn.rollback()
    return [tuple(r) for r in rows]


def _lines(store: journal.PathJournalStore) -> list[dict]:
    return [json.loads(line) for _, line in store.read()]


def test_an_erasure_is_journaled_outside_and_replayed_on_a_restored_warehouse(
    backup: str, warehouse: str, policy: Policy, keys: Keys, tmp_path: Path
) -> None:
    with psycopg.connect(backup) as old:
        before = capture_persons(old)
    with psycopg.connect(warehouse) as conn:
        [(cid, email), (other, _)] = _prospects(conn, 2)
        store = _store(tmp_path, conn)
        subject_hash = _erase(conn, policy, keys, email, "REQ-J-1")
        status = journal.sync(conn, store)
        assert status.missing == [] and status.appended == 2  # the erasure and its suppression entry
        lines = _lines(store)
        assert {(e["kind"], e["request_id"], e["subject_hash"], e["key_id"]) for e in lines} == {
            ("erasure", "REQ-J-1", subject_hash, keys.hmac_key_id),
            ("suppression", "REQ-J-1", subject_hash, keys.hmac_key_id)}
        assert [e["details"]["subject_ids"] for e in lines if e["kind"] == "erasure"] == [[str(cid)]]
        text = "".join(line for _, line in store.read())
        assert email not in text.lower() and before[cid].last_name not in text  # hashes and internal ids only
        assert journal.sync(conn, store).appended == 0  # nothing appended twice

    with psycopg.connect(backup) as restored:
        assert pii_scan(restored, [before[cid]])[0] != []  # the backup holds the person again
        status = journal.sync(restored, store)
        assert status.behind and status.counts() == {"erasure": 1, "suppression": 1}
        with pytest.raises(journal.WarehouseBehind) as info:
            journal.refuse_if_behind(status, "the evidence folder")
        assert "2 entries (1 erasure, 1 suppression) are missing" in str(info.value)
        assert journal.REPLAY_DAG_ID in str(info.value) and email not in str(info.value)

        result = journal.replay(restored, policy, keys, REPLAY, status.missing, AS_OF)

        assert result["erased_subjects"] == 1 and result["suppression_added"] == 1
        assert result["rows"]["crm.contacts"] == 1 and result["rows"]["crm.activities"] >= 1
        hits, looked_for = pii_scan(restored, [before[cid]], not_theirs=[p for i, p in before.items() if i != cid])
        assert hits == [] and looked_for["emails"] == 1
        assert _rows(restored, "SELECT count(*) FROM crm.contacts WHERE contact_id = %s", other) == [(1,)]
        assert _rows(restored, "SELECT key_id, reason, request_id FROM gdpr.suppression_list WHERE email_hash = %s",
                     subject_hash) == [(keys.hmac_key_id, "erasure", "REQ-J-1")]
        # The request is recorded again, its targets queued (the email read from the restored row, encrypted).
        assert _rows(restored, "SELECT status, outcome FROM gdpr.request WHERE request_id = 'REQ-J-1'") == [
            ("pending_propagation", "erased")]
        targets = sorted(t.name for t in policy.erasure.targets)
        assert _rows(restored, "SELECT target, status FROM gdpr.erasure_propagation WHERE request_id = 'REQ-J-1'"
                     " ORDER BY 1") == [(t, "pending") for t in targets]
        audited = _rows(restored, "SELECT subject_hash, details->>'request_id', details->>'kind'"
                        " FROM gdpr.audit_log WHERE action = 'restore_replay' ORDER BY 3")
        assert audited == [(subject_hash, "REQ-J-1", "erasure"), (subject_hash, "REQ-J-1", "suppression")]
        assert _rows(restored, "SELECT count(*) FROM gdpr.journal WHERE replayed_at IS NOT NULL") == [(2,)]
        # Replayed with their own entry ids: the warehouse is level with the journal again, nothing to append.
        again = journal.sync(restored, store)
        assert not again.behind and again.appended == 0
        # A second replay from the same (now stale) list, as a second run that read the journal before the first
        # committed: re-checked under the replay lock, it applies and audits nothing again.
        second = journal.replay(restored, policy, keys, REPLAY, status.missing, AS_OF)
        assert second["entries"] == 0 and second["suppression_added"] == 0 and second["requests_recorded"] == 0
        assert _rows(restored, "SELECT count(*) FROM gdpr.audit_log WHERE action = 'restore_replay'"
                     " AND outcome = 'replayed'") == [(2,)]
        assert _rows(restored, "SELECT count(*) FROM gdpr.erasure_propagation WHERE request_id = 'REQ-J-1'") == [
            (len(targets),)]


def test_a_commit_the_journal_missed_is_appended_by_the_next_sync(
    conn: psycopg.Connection, policy: Policy, keys: Keys, tmp_path: Path
) -> None:
    """A task that dies between its commit and the copy to the journal: the next sync (any DAG's first task)
    appends the committed entries, once."""
    [(_, email)] = _prospects(conn, 1)
    store = _store(tmp_path, conn)
    _erase(conn, policy, keys, email, "REQ-J-2")  # committed; no sync: the task "died" here
    conn.execute("INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source) VALUES (%s, %s, 'opt_out',"
                 " 'import')", ("a" * 64, keys.hmac_key_id))  # another writer: the trigger journals it too
    conn.commit()
    assert _lines(store) == []

    status = journal.sync(conn, store)

    assert not status.behind and status.appended == 3
    assert sorted(e["kind"] for e in _lines(store)) == ["erasure", "suppression", "suppression"]
    assert journal.sync(conn, store).appended == 0


def test_the_journal_is_append_only_and_a_damaged_line_is_named(
    conn: psycopg.Connection, keys: Keys, tmp_path: Path
) -> None:
    conn.execute("INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source) VALUES (%s, %s, 'opt_out',"
                 " 'import')", ("b" * 64, keys.hmac_key_id))
    conn.commit()
    for statement in ("UPDATE gdpr.journal SET subject_hash = repeat('c', 64)", "DELETE FROM gdpr.journal",
                      "TRUNCATE gdpr.journal"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="gdpr.journal is append-only"):
            conn.execute(statement)  # type: ignore[arg-type]
        conn.rollback()
    store = _store(tmp_path, conn)
    journal.sync(conn, store)
    [path] = list(store.folder.iterdir())  # type: ignore[attr-defined]
    path.write_text(path.read_text() + '{"format": "x"}\n')
    with pytest.raises(journal.JournalError, match=rf"{path.name}:2 is not a journal entry"):
        journal.sync(conn, store)


def test_a_write_cut_off_half_way_does_not_block_every_dag(
    conn: psycopg.Connection, keys: Keys, tmp_path: Path
) -> None:
    """A task killed (or a disk full) in the middle of its append leaves a file whose last line has no end: the
    next sync skips that line and appends its entry again from gdpr.journal, instead of refusing every DAG."""
    store = _store(tmp_path, conn)
    conn.execute("INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source) VALUES (%s, %s, 'opt_out',"
                 " 'import')", ("1" * 64, keys.hmac_key_id))
    conn.commit()
    assert journal.sync(conn, store).appended == 1
    conn.execute("INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source) VALUES (%s, %s, 'opt_out',"
                 " 'import')", ("2" * 64, keys.hmac_key_id))
    conn.commit()
    [entry] = _pending(conn)
    torn = store.folder / "20991231T235959999999-0123456789ab.jsonl"  # type: ignore[operator]
    torn.write_text(entry.line()[:40], encoding="utf-8")  # the write stopped here

    status = journal.sync(conn, store)

    assert not status.behind and status.appended == 1
    assert sorted(e["subject_hash"] for e in _lines(store)) == ["1" * 64, "2" * 64]
    assert journal.sync(conn, store).appended == 0


def _pending(conn: psycopg.Connection) -> list[journal.Entry]:
    """The rows of gdpr.journal of the test's last suppression entry, as the outside journal would have them."""
    rows = conn.execute(f"SELECT {journal._ROW} FROM gdpr.journal WHERE subject_hash = %s",  # noqa: S608
                        ("2" * 64,)).fetchall()
    conn.rollback()
    return [journal._entry(r) for r in rows]


def test_a_journal_file_that_is_not_text_is_named(conn: psycopg.Connection, tmp_path: Path) -> None:
    store = _store(tmp_path, conn)
    store.folder.mkdir(parents=True)  # type: ignore[attr-defined]
    bad = store.folder / "20260615T120000000000-0123456789ab.jsonl"  # type: ignore[operator]
    bad.write_bytes(b'{"entry_id": "\xff\xfe"}\n')
    with pytest.raises(journal.JournalError, match=rf"{bad.name} is not UTF-8 text"):
        journal.sync(conn, store)


def test_a_free_text_suppression_source_stays_in_the_warehouse(
    conn: psycopg.Connection, keys: Keys, tmp_path: Path
) -> None:
    """gdpr.suppression_list.source is free text for other writers (a loader, an owner by hand): what they
    typed there (an email, a name) is not copied to the journal outside the warehouse."""
    conn.execute("INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source) VALUES"
                 " (%s, %(k)s, 'opt_out', 'unsubscribe mail from Jane Doe <jane.doe@acme.example>'),"
                 " (%s, %(k)s, 'opt_out', 'crm_import')".replace("%(k)s", "%s"),
                 ("3" * 64, keys.hmac_key_id, "4" * 64, keys.hmac_key_id))
    conn.commit()
    store = _store(tmp_path, conn)

    journal.sync(conn, store)

    text = "".join(p.read_text() for p in store.folder.iterdir())  # type: ignore[attr-defined]
    assert "jane" not in text.lower() and "Doe" not in text
    assert {e["subject_hash"]: e["details"]["source"] for e in _lines(store)} == {"3" * 64: "other",
                                                                                 "4" * 64: "crm_import"}


def test_a_subject_id_given_to_another_person_since_the_restore_is_not_erased(
    backup: str, warehouse: str, policy: Policy, keys: Keys, tmp_path: Path
) -> None:
    """A contact created after the backup and erased; the restored warehouse gives its id to a new contact
    (the CRM's loaders do not stop while on-call restores): the replay finds nobody by the erasure's keyed hash,
    and must not erase, nor send downstream, the other person who now has the recorded id."""
    insert = ("INSERT INTO crm.contacts (contact_id, company_id, status, email, first_name, last_name, created_at)"
              " SELECT %s, min(company_id), 'prospect', %s, %s, 'Newcomer', now() FROM crm.companies")
    with psycopg.connect(warehouse) as conn:
        [(new_id,)] = _rows(conn, "SELECT max(contact_id) + 1 FROM crm.contacts")
        conn.execute(insert, (new_id, "ada.after-backup@example.org", "Ada"))
        conn.commit()
        store = _store(tmp_path, conn)
        _erase(conn, policy, keys, "ada.after-backup@example.org", "REQ-J-ID")
        journal.sync(conn, store)
    with psycopg.connect(backup) as restored:
        restored.execute(insert, (new_id, "bob.restored@example.org", "Bob"))
        restored.commit()
        status = journal.sync(restored, store)
        assert status.counts() == {"erasure": 1, "suppression": 1}

        result = journal.replay(restored, policy, keys, REPLAY, status.missing, AS_OF)

        assert result["erased_subjects"] == 0 and result["ids_reused"] == ["REQ-J-ID"]
        assert _rows(restored, "SELECT first_name FROM crm.contacts WHERE contact_id = %s", new_id) == [("Bob",)]
        assert _rows(restored, "SELECT count(*) FROM gdpr.erasure_propagation WHERE request_id = 'REQ-J-ID'") == [
            (0,)]  # Bob's email is not sent downstream as Ada's erasure
        assert not journal.sync(restored, store).behind


def test_replay_works_across_a_pepper_rotation(
    backup: str, warehouse: str, policy: Policy, keys: Keys, key_extra: dict, tmp_path: Path
) -> None:
    """Erased under pepper-1, restored, replayed after the pepper rotated to pepper-2: the person is found by the
    hash of their email under pepper-1 (every key of the chain is hashed), the entry keeps its key id, and the
    next opt-out sync re-keys it."""
    with psycopg.connect(backup) as old:
        before = capture_persons(old)
    with psycopg.connect(warehouse) as conn:
        [(cid, email)] = _prospects(conn, 1)
        store = _store(tmp_path, conn)
        subject_hash = _erase(conn, policy, keys, email, "REQ-J-3")
        journal.sync(conn, store)
    keys2 = _rotated(key_extra, "pepper-2")
    assert keys2.subject_hash(email) != subject_hash

    with psycopg.connect(backup) as restored:
        status = journal.sync(restored, store)
        assert [(e.kind, e.key_id) for e in status.missing] == [("suppression", "pepper-1"), ("erasure", "pepper-1")]
        result = journal.replay(restored, policy, keys2, REPLAY, status.missing, AS_OF)
        assert result["erased_subjects"] == 1
        assert pii_scan(restored, [before[cid]], not_theirs=[p for i, p in before.items() if i != cid])[0] == []
        assert _rows(restored, "SELECT key_id, reason FROM gdpr.suppression_list WHERE email_hash = %s",
                     subject_hash) == [("pepper-1", "erasure")]
        assert optout.is_suppressed(restored, keys2, email)
        restored.rollback()
        rekeyed = optout.rekey(restored, keys2, RunContext("gdpr_optout_sync", "run-s", "rekey"))
        assert rekeyed["rekeyed"] == 1
        assert _rows(restored, "SELECT key_id FROM gdpr.suppression_list WHERE email_hash = %s",
                     keys2.subject_hash(email)) == [("pepper-2",)]
        assert not journal.sync(restored, store).behind


def test_restrictions_and_lifts_are_replayed(
    backup: str, warehouse: str, policy: Policy, keys: Keys, tmp_path: Path
) -> None:
    """Restricted after the backup: restricted again by the replay (record, flag), its request recorded (a request
    the backup held registered is run) and its targets queued again. Restricted and lifted after the backup:
    nothing left in force; the lift's request re-sent, the restriction it ended recorded but not re-sent (the
    outbox has no order: downstream must end lifted). A person whose email the restored row no longer holds (it
    was corrected after the backup): only the sales team's webhook (internal ids) is re-sent. A target the
    restored outbox already holds a row for is not queued twice. Replayed as the DAGs' role: the lifecycle
    guards check every request row and outbox row, and their audit rows."""
    ctx = RunContext("gdpr_subject_restriction", "run-1", "apply")

    def apply(conn: psycopg.Connection, email: str, request_id: str) -> None:
        kind = restriction.kind_of(conn, {"request_id": request_id, "email": email})
        request = restriction.parse_request({"request_id": request_id, "email": email}, today=TODAY, kind=kind)
        located = restriction.locate(conn, policy, keys, request)
        restriction.apply(conn, policy, keys, ctx, request, located)

    with psycopg.connect(warehouse) as conn:
        people = _prospects(conn, 3)
        [(kept, kept_email), (lifted, lifted_email), (moved, moved_email)] = people
    ids = [kept, lifted, moved]
    for url in (warehouse, backup):
        with psycopg.connect(url) as db:
            db.execute("UPDATE crm.contacts SET do_not_contact = false WHERE contact_id = ANY(%s)", (ids,))
            db.commit()
            # Registered before the backup, run after it.
            requests.register(db, keys, ctx, kind="restriction", request_id="REQ-RS-A", identifier=kept_email,
                              received_at=date(2026, 6, 10), today=TODAY)
    with psycopg.connect(backup) as old:  # the backup: the older address; and (by hand) one outbox row
        old.execute("UPDATE crm.contacts SET email = 'old.' || email WHERE contact_id = %s", (moved,))
        old.execute("INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status,"
                    " outcome, reason) VALUES ('REQ-RL-B', 'restriction_lift', %s, %s, %s, 'pending_propagation',"
                    " 'lifted', 'lifted')", (keys.subject_hash(lifted_email), TODAY, TODAY))
        propagation.queue(old, keys, "REQ-RL-B", "restriction_lift", "sales_team", {"request_id": "REQ-RL-B"})
        old.commit()
    with psycopg.connect(warehouse) as conn:
        store = _store(tmp_path, conn)
        apply(conn, kept_email, "REQ-RS-A")
        apply(conn, lifted_email, "REQ-RS-B")
        apply(conn, moved_email, "REQ-RS-C")
        lift = restriction.parse_request({"request_id": "REQ-RL-B", "email": lifted_email}, today=TODAY,
                                         kind="restriction_lift")
        restriction.apply(conn, policy, keys, ctx, lift, restriction.locate(conn, policy, keys, lift))
        journal.sync(conn, store)
        assert sorted(e["kind"] for e in _lines(store)) == ["restriction"] * 3 + ["restriction_lift"]

    with psycopg.connect(as_role(backup, "gdpr_dag")) as restored:
        status = journal.sync(restored, store)
        assert status.counts() == {"restriction": 3, "restriction_lift": 1}
        result = journal.replay(restored, policy, keys, REPLAY, status.missing, AS_OF)
        assert (result["restricted"], result["lifted"]) == (2, 1)
        assert _rows(restored, "SELECT subject_ids, flagged_ids, request_id FROM gdpr.restriction ORDER BY 3") == [
            ([str(kept)], [str(kept)], "REQ-RS-A"), ([str(moved)], [str(moved)], "REQ-RS-C")]
        assert _rows(restored, "SELECT contact_id, do_not_contact FROM crm.contacts WHERE contact_id = ANY(%s)"
                     " ORDER BY 1", ids) == sorted([(kept, True), (lifted, False), (moved, True)])
        assert not journal.sync(restored, store).behind

        # The requests: recorded as run (the registered one keeps its date of receipt), the lift the backup
        # already held left as it was.
        assert _rows(restored, "SELECT request_id, kind, status, outcome, received_at FROM gdpr.request"
                     " WHERE request_id LIKE 'REQ-R_-_' ORDER BY 1") == [
            ("REQ-RL-B", "restriction_lift", "pending_propagation", "lifted", TODAY),
            ("REQ-RS-A", "restriction", "pending_propagation", "restricted", date(2026, 6, 10)),
            ("REQ-RS-B", "restriction", "completed", "restricted", TODAY),
            ("REQ-RS-C", "restriction", "pending_propagation", "restricted", TODAY)]
        assert _rows(restored, "SELECT details->>'request_id', action, outcome, details->>'status'"
                     " FROM gdpr.audit_log WHERE action IN ('restrict', 'lift') AND (details->>'replayed')::boolean"
                     " ORDER BY 1") == [("REQ-RS-A", "restrict", "restricted", "pending_propagation"),
                                        ("REQ-RS-B", "restrict", "restricted", "completed"),
                                        ("REQ-RS-C", "restrict", "restricted", "pending_propagation")]
        # The outbox: every target the restored outbox lacked, once; the sales team's row of the lift not twice;
        # the moved person's email targets not re-sent (the restored row holds another address).
        outbox = _rows(restored, "SELECT request_id, target, status, attempts FROM gdpr.erasure_propagation"
                       " WHERE request_id LIKE 'REQ-R_-_' ORDER BY 1, 2")
        assert outbox == [("REQ-RL-B", "emailing", "pending", 0), ("REQ-RL-B", "sales_team", "pending", 0),
                          ("REQ-RL-B", "telephony", "pending", 0),
                          ("REQ-RS-A", "emailing", "pending", 0), ("REQ-RS-A", "sales_team", "pending", 0),
                          ("REQ-RS-A", "telephony", "pending", 0),
                          ("REQ-RS-C", "sales_team", "pending", 0)]
        assert (result["requests_recorded"], result["requeued"], result["not_resent"]) == (3, 6, ["REQ-RS-C"])
        # What is sent: the email the restored row holds, encrypted; the subject ids of the record.
        [(key_id, nonce, ciphertext)] = _rows(
            restored, "SELECT key_id, nonce, identifier_ciphertext FROM gdpr.erasure_propagation"
            " WHERE request_id = 'REQ-RS-A' AND target = 'emailing'")
        sent = json.loads(keys.decrypt(key_id, nonce, ciphertext, propagation.outbox_aad_for(
            "restriction", "REQ-RS-A", "emailing", key_id)))
        assert sent == {"identifier": kept_email.lower(), "request_id": "REQ-RS-A", "subject_table": "crm.contacts",
                        "subject_ids": [str(kept)]}
        [(key_id, nonce, ciphertext)] = _rows(
            restored, "SELECT key_id, nonce, identifier_ciphertext FROM gdpr.erasure_propagation"
            " WHERE request_id = 'REQ-RL-B' AND target = 'telephony'")
        sent = json.loads(keys.decrypt(key_id, nonce, ciphertext, propagation.outbox_aad_for(
            "restriction_lift", "REQ-RL-B", "telephony", key_id)))
        assert sent == {"identifier": lifted_email.lower(), "request_id": "REQ-RL-B",
                        "subject_table": "crm.contacts", "subject_ids": [str(lifted)]}
        text = json.dumps(_rows(restored, "SELECT details FROM gdpr.audit_log")) + json.dumps(result)
        assert not any(e.lower() in text.lower() for _, e in people)


def test_a_restriction_lifted_and_made_again_after_the_backup_is_in_force_after_the_replay(
    backup: str, warehouse: str, policy: Policy, keys: Keys, tmp_path: Path
) -> None:
    """Restricted before the backup (REQ-RS-0), lifted (REQ-RL-0) and restricted again (REQ-RS-1) after it: the
    replay ends with the new restriction in force and flagged (the lift of the restored one first), and re-sends
    only the new restriction (the last state of the person), the lift recorded as superseded."""
    ctx = RunContext("gdpr_subject_restriction", "run-1", "apply")

    def apply(conn: psycopg.Connection, email: str, request_id: str, kind: str = "restriction") -> None:
        request = restriction.parse_request({"request_id": request_id, "email": email}, today=TODAY, kind=kind)
        restriction.apply(conn, policy, keys, ctx, request, restriction.locate(conn, policy, keys, request))

    with psycopg.connect(warehouse) as conn:
        [(cid, email)] = _prospects(conn, 1)
    for url in (warehouse, backup):
        with psycopg.connect(url) as db:
            db.execute("UPDATE crm.contacts SET do_not_contact = false WHERE contact_id = %s", (cid,))
            db.commit()
            apply(db, email, "REQ-RS-0")
    with psycopg.connect(warehouse) as conn:
        store = _store(tmp_path, conn)
        apply(conn, email, "REQ-RL-0", "restriction_lift")
        apply(conn, email, "REQ-RS-1")
        journal.sync(conn, store)

    with psycopg.connect(as_role(backup, "gdpr_dag")) as restored:
        status = journal.sync(restored, store)
        assert status.counts() == {"restriction": 1, "restriction_lift": 1}
        result = journal.replay(restored, policy, keys, REPLAY, status.missing, AS_OF)
        assert _rows(restored, "SELECT subject_ids, request_id FROM gdpr.restriction") == [([str(cid)], "REQ-RS-1")]
        assert _rows(restored, "SELECT do_not_contact FROM crm.contacts WHERE contact_id = %s", cid) == [(True,)]
        assert _rows(restored, "SELECT request_id, status, outcome FROM gdpr.request WHERE request_id LIKE 'REQ-R_-_'"
                     " ORDER BY 1") == [("REQ-RL-0", "completed", "lifted"), ("REQ-RS-0", "pending_propagation",
                                                                           "restricted"),
                                        ("REQ-RS-1", "pending_propagation", "restricted")]
        assert _rows(restored, "SELECT request_id, target FROM gdpr.erasure_propagation WHERE request_id LIKE"
                     " 'REQ-R_-_' AND status = 'pending' AND attempts = 0 ORDER BY 1, 2") == [
            ("REQ-RS-0", t) for t in ("emailing", "sales_team", "telephony")] + [
            ("REQ-RS-1", t) for t in ("emailing", "sales_team", "telephony")]
        assert (result["restricted"], result["lifted"], result["requeued"]) == (1, 1, 3)


def test_an_entry_is_one_line_of_json_with_hashes_and_ids_only() -> None:
    entry = journal.Entry(str(uuid.uuid4()), "erasure", "REQ-1", "d" * 64, "pepper-1", "2026-06-15T12:00:00+00:00",
                          {"outcome": "erased", "subject_ids": ["12"]})
    line = entry.line()
    assert "\n" not in line and journal.Entry.from_line(line, "f:1") == entry
    with pytest.raises(journal.JournalError, match="f:1 is not a journal entry"):
        journal.Entry.from_line(line.replace("d" * 64, "paul@example.com"), "f:1")


@pytest.mark.parametrize("version", [9, 10])  # 10: a warehouse that installed the lifecycle guards, not the journal
def test_the_upgrade_to_version_11_starts_the_journal_with_the_entries_already_there(
    conn: psycopg.Connection, keys: Keys, version: int
) -> None:
    from warehouse_gdpr.engine import schema

    older = (Path(__file__).parent / "data" / f"gdpr_schema_v{version}.sql").read_text(encoding="utf-8")
    with conn.transaction():
        conn.execute("DROP SCHEMA gdpr, gdpr_archive CASCADE")
        conn.execute(older)  # type: ignore[arg-type]
    assert _rows(conn, "SELECT max(version), to_regclass('gdpr.journal') FROM gdpr.schema_version") == [(version, None)]
    with conn.transaction():
        conn.execute("INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source, request_id)"
                     " VALUES (%s, %s, 'erasure', 'erasure_request', 'REQ-OLD')", ("e" * 64, keys.hmac_key_id))
        conn.execute("INSERT INTO gdpr.restriction (subject_hash, by_email, key_id, subject_table, subject_ids,"
                     " request_id) VALUES (%s, true, %s, 'crm.contacts', '{7}', 'REQ-RS-OLD')",
                     ("f" * 64, keys.hmac_key_id))
    assert schema.ensure_schema(conn) is True
    assert _rows(conn, "SELECT kind, request_id, subject_hash FROM gdpr.journal ORDER BY kind") == [
        ("restriction", "REQ-RS-OLD", "f" * 64), ("suppression", "REQ-OLD", "e" * 64)]
    current = (Path(__file__).parents[2] / "include" / "sql" / "gdpr_schema.sql").read_text(encoding="utf-8")
    with conn.transaction():
        conn.execute(current)  # type: ignore[arg-type]
    assert _rows(conn, "SELECT count(*) FROM gdpr.journal") == [(2,)]  # run again: nothing twice


# -- v12: the count of entries seen outside (an evidence location emptied, moved or not mounted) -------------


@contextlib.contextmanager
def _copy_of(server_url: str, url: str) -> Iterator[str]:
    """A copy of the database at `url` as it is now (a backup taken at this point: no session may be open on it)."""
    source = str(conninfo_to_dict(url)["dbname"])
    name = f"{source}_copy"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(source)))
    try:
        yield _db(url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _seen(conn: psycopg.Connection) -> list[tuple]:
    return _rows(conn, "SELECT chain_id, entries_seen FROM gdpr.journal_outside")


def test_an_evidence_location_emptied_or_moved_is_refused_and_nothing_is_appended_there(
    warehouse: str, policy: Policy, keys: Keys, tmp_path: Path
) -> None:
    """A missing journal folder used to read as empty: the sync appended every row of gdpr.journal to the new place
    and a later restore went unnoticed. The warehouse now knows how many entries it has seen outside."""
    with psycopg.connect(as_role(warehouse, "gdpr_dag")) as conn:  # as the DAGs connect
        [(_, first), (_, second)] = _prospects(conn, 2)
        store = _store(tmp_path, conn)
        _erase(conn, policy, keys, first, "REQ-M-1")
        assert journal.sync(conn, store).appended == 2
        for folder in ("moved", "unmounted"):  # a policy pointed at a new folder; a volume not mounted (a file: no dir)
            empty = journal.PathJournalStore(tmp_path / folder, store.folder.name)  # type: ignore[arg-type]
            if folder == "unmounted":
                (tmp_path / folder).mkdir()
            with pytest.raises(ConfigurationError) as info:  # main: no error, the whole journal appended there
                journal.sync(conn, empty)
            assert str(info.value) == (
                f"the journal outside the warehouse at {empty.folder} holds 0 entries, this warehouse has seen 2 "
                "there: the evidence location is not the one it was (emptied, moved, not mounted); nothing was "
                "changed, nothing was appended there. docs/runbook.md, 'The journal outside the warehouse has fewer "
                "entries than the warehouse has seen'")
            assert not empty.folder.exists()  # nothing appended
            assert isinstance(info.value, journal.JournalShrunk)  # a ConfigurationError: a person must act, no retry
        assert _seen(conn) == [(store.folder.name, 2)]
        # A commit since (not yet copied) is not appended to a location with fewer entries either.
        _erase(conn, policy, keys, second, "REQ-M-2")
        partial = journal.PathJournalStore(tmp_path / "partial", store.folder.name)  # type: ignore[arg-type]
        partial.append([next(line for _, line in store.read())])  # a folder holding only part of the journal
        with pytest.raises(journal.JournalShrunk, match="holds 1 entry, this warehouse has seen 2 there"):
            journal.sync(conn, partial)
        assert len(list(partial.read())) == 1 and _seen(conn) == [(store.folder.name, 2)]
        # The right location again: the sync goes on, and the count follows the journal.
        status = journal.sync(conn, store)
        assert status.appended == 2 and not status.behind and _seen(conn) == [(store.folder.name, 4)]
        # The count never goes down, and the engine cannot delete it.
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("UPDATE gdpr.journal_outside SET entries_seen = 0")
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("DELETE FROM gdpr.journal_outside")
    with psycopg.connect(warehouse) as owner:  # nor the owner lower it (the owner deletes the row to start again)
        with pytest.raises(psycopg.errors.InsufficientPrivilege), owner.transaction():
            owner.execute("UPDATE gdpr.journal_outside SET entries_seen = 1")
        with owner.transaction():
            owner.execute("DELETE FROM gdpr.journal_outside")
        assert journal.sync(owner, journal.PathJournalStore(tmp_path / "new", store.folder.name)).appended == 4  # type: ignore[arg-type]


def test_a_restored_warehouse_has_seen_fewer_entries_and_is_still_found_behind(
    server_url: str, warehouse: str, policy: Policy, keys: Keys, tmp_path: Path
) -> None:
    with psycopg.connect(warehouse) as conn:
        [(_, first), (_, second)] = _prospects(conn, 2)
        store = _store(tmp_path, conn)
        _erase(conn, policy, keys, first, "REQ-R-1")
        journal.sync(conn, store)
    with _copy_of(server_url, warehouse) as backup_url:  # the backup: it has seen 2 entries outside
        with psycopg.connect(warehouse) as conn:
            _erase(conn, policy, keys, second, "REQ-R-2")
            journal.sync(conn, store)
        with psycopg.connect(as_role(backup_url, "gdpr_dag")) as restored:
            # Pointed at an empty location, the restored warehouse is refused too (it had seen 2 there); main
            # appended its journal there and found nothing missing.
            with pytest.raises(ConfigurationError, match="holds 0 entries, this warehouse has seen 2 there"):
                journal.sync(restored, journal.PathJournalStore(tmp_path / "empty", store.folder.name))  # type: ignore[arg-type]
            assert _seen(restored) == [(store.folder.name, 2)]
            status = journal.sync(restored, store)  # the real location: behind, as before
            assert status.behind and status.counts() == {"erasure": 1, "suppression": 1}
            assert status.appended == 0 and _seen(restored) == [(store.folder.name, 4)]  # it has seen them now
            journal.replay(restored, policy, keys, REPLAY, status.missing, AS_OF)
            again = journal.sync(restored, store)
            assert not again.behind and again.appended == 0 and _seen(restored) == [(store.folder.name, 4)]
        with psycopg.connect(warehouse) as conn:
            assert _seen(conn) == [(store.folder.name, 4)]


def test_the_upgrade_from_version_11_starts_the_count_at_zero(
    conn: psycopg.Connection, keys: Keys, tmp_path: Path
) -> None:
    from warehouse_gdpr.engine import schema

    v11 = (Path(__file__).parent / "data" / "gdpr_schema_v11.sql").read_text(encoding="utf-8")
    with conn.transaction():
        conn.execute("DROP SCHEMA gdpr, gdpr_archive CASCADE")
        conn.execute(v11)  # type: ignore[arg-type]
    assert _rows(conn, "SELECT max(version), to_regclass('gdpr.journal_outside') FROM gdpr.schema_version") == [
        (11, None)]
    with conn.transaction():
        conn.execute("INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source, request_id)"
                     " VALUES (%s, %s, 'erasure', 'erasure_request', 'REQ-V11')", ("e" * 64, keys.hmac_key_id))
    store = _store(tmp_path, conn)
    assert journal.sync(conn, store).appended == 1  # a v11 warehouse syncs without the count
    assert schema.ensure_schema(conn) is True
    assert _seen(conn) == [] and journal.entries_seen(conn, store.folder.name) == 0
    conn.rollback()
    # Its first sync since the upgrade, even at a new (empty) location, starts from 0: no refusal.
    moved = journal.PathJournalStore(tmp_path / "moved", store.folder.name)  # type: ignore[arg-type]
    status = journal.sync(conn, moved)
    assert status.appended == 1 and not status.behind and _seen(conn) == [(store.folder.name, 1)]
