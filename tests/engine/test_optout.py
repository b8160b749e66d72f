"""The hashed opt-out list at engine level (warehouse_gdpr.engine.optout), on a real PostgreSQL and real HTTP.

collect -> guard -> enforce -> share/export, key rotation (chained re-keying), is_suppressed and
filter_suppressed, and the permanence of gdpr.suppression_list. No email may reach the list, the
audit log, the quarantine, the export file or a share target.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from helpers import AS_OF, add_activity, add_contact, add_contract, new_id, table_checksum
from scripted_http import ScriptedServer, json_answer, redirect
from warehouse_gdpr.airflow.transport import AirflowTransport
from warehouse_gdpr.engine import erasure, optout
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import KeyConfigError, Keys, generate_extra
from warehouse_gdpr.engine.policy import Policy

CTX = RunContext("gdpr_optout_sync", "run-1", "test")
TRANSPORT = AirflowTransport()
ERASE = RunContext("gdpr_subject_erasure", "erase-1", "erase")
TODAY = date(2026, 6, 15)


# -- helpers ---------------------------------------------------------------------------------------


def _one(conn: psycopg.Connection, query: str, *params: object) -> Any:
    row = conn.execute(query, params).fetchone()
    conn.rollback()
    return row


def _count(conn: psycopg.Connection, query: str, *params: object) -> int:
    return int(_one(conn, query, *params)[0])


def _with(policy: Policy, **optout_changes: Any) -> Policy:
    return policy.model_copy(update={"optout": policy.optout.model_copy(update=optout_changes)})


def _rotated(extra: dict[str, Any], new_id_: str) -> tuple[dict[str, Any], Keys]:
    """The keys connection extra after a rotation: a new current pepper, the old one moved to the chain."""
    chain = [*extra.get("hmac_chain", []), {"key_id": extra["hmac_key_id"], "pepper": extra["hmac_pepper"]}]
    rotated = {**extra, "hmac_key_id": new_id_, "hmac_pepper": base64.b64encode(os.urandom(32)).decode(),
               "hmac_chain": chain}
    return rotated, Keys.from_extra(rotated)


def _erase(conn: psycopg.Connection, policy: Policy, keys: Keys, email: str, request_id: str) -> erasure.ErasureResult:
    request = erasure.parse_request({"email": email, "request_id": request_id}, today=TODAY)
    located = erasure.locate(conn, policy, keys, request)
    holds = erasure.holds_in_force(conn, policy, located, AS_OF)
    return erasure.erase(conn, policy, keys, ERASE, request, located, holds)


def _suppressed(conn: psycopg.Connection, keys: Keys, email: str, **kwargs: Any) -> bool:
    """is_suppressed runs in the caller's transaction: end it, as a caller would."""
    try:
        return optout.is_suppressed(conn, keys, email, **kwargs)
    finally:
        conn.rollback()


def _flag(conn: psycopg.Connection, contact_id: int) -> bool:
    return bool(_one(conn, "SELECT do_not_contact FROM crm.contacts WHERE contact_id = %s", contact_id)[0])


def _entry(conn: psycopg.Connection, email_hash: str) -> tuple[Any, ...] | None:
    return _one(conn, "SELECT key_id, reason, source, request_id FROM gdpr.suppression_list WHERE email_hash = %s",
                email_hash)


def _no_at(conn: psycopg.Connection) -> dict[str, int]:
    """Rows containing '@' anywhere, per control table (all must be 0)."""
    return {t: _count(conn, f"SELECT count(*) FROM {t} x WHERE position('@' in x::text) > 0")
            for t in ("gdpr.suppression_list", "gdpr.audit_log", "gdpr.quarantine", "gdpr.erasure_request")}


def _unsubscribed(conn: psycopg.Connection, email: str, status: str = "prospect") -> int:
    cid = add_contact(conn, status, date(2024, 1, 1), email=email)
    add_activity(conn, cid, "unsubscribe", date(2026, 5, 1))
    return cid


# -- collect ---------------------------------------------------------------------------------------


def test_collection_is_idempotent_and_matches_the_sources(conn, policy: Policy, keys: Keys) -> None:
    unsub = _unsubscribed(conn, "Unsub.Person@Example.example")
    both = add_contact(conn, "lead", date(2024, 1, 1), email="both.sources@example.example")
    conn.execute("UPDATE crm.contacts SET do_not_contact = true WHERE contact_id = %s", (both,))
    add_activity(conn, both, "unsubscribe", date(2026, 5, 1))
    conn.commit()
    emails = [r[0] for r in conn.execute(
        "SELECT email FROM crm.contacts c WHERE do_not_contact OR EXISTS (SELECT 1 FROM crm.activities a"
        " WHERE a.contact_id = c.contact_id AND a.kind = 'unsubscribe')").fetchall()]
    conn.rollback()
    expected = {keys.subject_hash(e) for e in emails}
    assert len(expected) > 20  # the seeded 2% do_not_contact, and ours

    first = optout.collect(conn, policy, keys, CTX, AS_OF)
    listed = {r[0] for r in conn.execute("SELECT email_hash FROM gdpr.suppression_list").fetchall()}
    conn.rollback()
    assert listed == expected
    assert first["added"] == len(expected)
    assert sum(first["by_source"].values()) == len(expected)
    assert _entry(conn, keys.subject_hash("unsub.person@example.example")) == (
        keys.hmac_key_id, "opt_out", "unsubscribe_activity", None)
    # the first source wins
    assert _entry(conn, keys.subject_hash("both.sources@example.example"))[2] == "do_not_contact_flag"

    checksum = table_checksum(conn, ["gdpr.suppression_list"])
    second = optout.collect(conn, policy, keys, CTX, AS_OF)
    assert second["added"] == 0 and second["subjects"] == first["subjects"]
    assert table_checksum(conn, ["gdpr.suppression_list"]) == checksum
    assert _count(conn, "SELECT count(*) FROM gdpr.audit_log WHERE action = 'collect'") == 2
    assert unsub  # the contact itself is untouched by collect
    assert _flag(conn, unsub) is False


@pytest.mark.parametrize(
    "variant",
    [
        "zoe.variant@example.example",
        "ZOE.VARIANT@EXAMPLE.EXAMPLE",
        "  Zoe.Variant@Example.Example \t",
        "\u00a0zoe.variant@example.example\u3000",  # no-break and ideographic spaces
        "ｚｏｅ.ｖａｒｉａｎｔ@ｅｘａｍｐｌｅ.ｅｘａｍｐｌｅ",  # fullwidth (NFKC)
        "ＺＯＥ.ＶＡＲＩＡＮＴ＠ＥＸＡＭＰＬＥ．ＥＸＡＭＰＬＥ",  # fullwidth @ and . too
    ],
)
def test_case_whitespace_and_nfkc_variants_hit_the_same_hash(conn, policy: Policy, keys: Keys, variant: str) -> None:
    opted_out = _unsubscribed(conn, variant)
    same_person = add_contact(conn, "client", date(2020, 1, 1), email="Zoe.Variant@example.example ")
    conn.commit()

    result = optout.collect(conn, policy, keys, CTX, AS_OF)
    assert _entry(conn, keys.subject_hash("zoe.variant@example.example"))[1] == "opt_out"
    assert _count(conn, "SELECT count(*) FROM gdpr.suppression_list WHERE source = 'unsubscribe_activity'") == 1
    assert result["by_source"]["unsubscribe_activity"] == 1

    optout.enforce(conn, policy, keys, CTX)
    assert _flag(conn, opted_out) and _flag(conn, same_person)
    for spelling in ("zoe.variant@example.example", variant, "ZOE.variant@EXAMPLE.example"):
        assert _suppressed(conn, keys, spelling)
    assert not _suppressed(conn, keys, "zoe.variant2@example.example")


def test_plus_tags_are_one_address_only_when_the_policy_says_so(conn, policy: Policy, keys: Keys) -> None:
    _unsubscribed(conn, "Tagged+News@Example.example")
    plain = add_contact(conn, "lead", date(2024, 1, 1), email="tagged@example.example")
    conn.commit()

    optout.collect(conn, policy, keys, CTX, AS_OF)  # default: tags kept
    optout.enforce(conn, policy, keys, CTX)
    assert not _flag(conn, plain)
    assert _suppressed(conn, keys, "tagged+news@example.example")
    assert not _suppressed(conn, keys, "tagged@example.example")

    stripping = _with(policy, strip_plus_tags=True)
    result = optout.collect(conn, stripping, keys, CTX, AS_OF)
    assert result["added"] >= 1
    assert _entry(conn, keys.subject_hash("tagged@example.example"))[1] == "opt_out"
    optout.enforce(conn, stripping, keys, CTX)
    assert _flag(conn, plain)
    for spelling in ("tagged@example.example", "TAGGED+other@example.example", "tagged+news@example.example"):
        assert _suppressed(conn, keys, spelling, strip_plus_tags=True)
    # the erasure engine hashes the same way under that policy
    request = erasure.parse_request({"email": "tagged+x@example.example", "request_id": "REQ-TAG"}, today=TODAY)
    assert erasure.locate(conn, stripping, keys, request).subject_hash == keys.subject_hash("tagged@example.example")


# -- enforce ---------------------------------------------------------------------------------------


def test_enforcement_marks_matches_whatever_their_status_and_again_after_an_import(
    conn, policy: Policy, keys: Keys
) -> None:
    _unsubscribed(conn, "leaver@old-job.example", status="client")
    copies = [add_contact(conn, s, date(2022, 1, 1), email="Leaver@Old-Job.example")
              for s in ("prospect", "lead", "former_client")]
    bystander = add_contact(conn, "lead", date(2024, 1, 1), email="bystander@example.example")
    conn.commit()
    optout.collect(conn, policy, keys, CTX, AS_OF)
    others = _one(conn, "SELECT md5(string_agg(contact_id || ':' || do_not_contact, ',' ORDER BY contact_id))"
                        " FROM crm.contacts WHERE lower(btrim(email)) <> 'leaver@old-job.example'")

    result = optout.enforce(conn, policy, keys, CTX)

    assert all(_flag(conn, c) for c in copies)
    assert not _flag(conn, bystander)
    assert result["flagged"] == 4 and result["listed"] >= 4
    assert _one(conn, "SELECT md5(string_agg(contact_id || ':' || do_not_contact, ',' ORDER BY contact_id))"
                      " FROM crm.contacts WHERE lower(btrim(email)) <> 'leaver@old-job.example'") == others

    # a later import makes one contactable again, and brings a new copy: both are marked again
    conn.execute("UPDATE crm.contacts SET do_not_contact = false WHERE contact_id = %s", (copies[0],))
    newcomer = add_contact(conn, "prospect", date(2026, 6, 1), email=" LEAVER@old-job.EXAMPLE")
    conn.commit()
    again = optout.enforce(conn, policy, keys, CTX)
    assert again["flagged"] == 2
    assert _flag(conn, copies[0]) and _flag(conn, newcomer)
    assert optout.enforce(conn, policy, keys, CTX)["flagged"] == 0


# -- resurrection guard ----------------------------------------------------------------------------


def _erased_then_reimported(conn: psycopg.Connection, policy: Policy, keys: Keys, request_id: str,
                            email: str = "phoenix.person@example.example") -> tuple[int, str]:
    first = add_contact(conn, "prospect", date(2024, 1, 1), email=email)
    add_activity(conn, first, "web_visit", date(2026, 1, 1))
    conn.commit()
    assert _erase(conn, policy, keys, email, request_id).outcome == "erased"
    again = add_contact(conn, "lead", date(2026, 6, 10), email="  " + email.upper())  # the re-import
    add_activity(conn, again, "form_submit", date(2026, 6, 11))
    conn.commit()
    return again, keys.subject_hash(email)


def test_reimported_erased_subject_is_erased_again_and_audited(conn, policy: Policy, keys: Keys) -> None:
    cid, email_hash = _erased_then_reimported(conn, policy, keys, "REQ-2026-0100")
    untouched = table_checksum(conn, ["crm.contracts", "crm.invoices"])

    result = optout.guard(conn, policy, keys, CTX, AS_OF)

    assert (result["found"], result["erased"], result["quarantined"]) == (1, 1, 0)
    assert result["rows"]["crm.contacts"] == 1 and result["rows"]["crm.activities"] == 1
    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = %s", cid) == 0
    assert _count(conn, "SELECT count(*) FROM crm.activities WHERE contact_id = %s", cid) == 0
    assert table_checksum(conn, ["crm.contracts", "crm.invoices"]) == untouched
    row = _one(conn, "SELECT outcome, subject_hash, table_name, details FROM gdpr.audit_log"
                     " WHERE action = 'resurrection'")
    assert row[:3] == ("erased", email_hash, "crm.contacts")
    assert row[3]["request_id"] == "REQ-2026-0100" and row[3]["subject_id"] == cid and row[3]["policy"] == "erase"
    assert _count(conn, "SELECT count(*) FROM gdpr.audit_log WHERE action = 'erase' AND outcome = 'resurrection'"
                        " AND table_name = 'crm.contacts' AND row_count = 1") == 1
    assert _no_at(conn) == dict.fromkeys(_no_at(conn), 0)

    assert optout.guard(conn, policy, keys, CTX, AS_OF)["found"] == 0  # nothing left to catch
    assert _count(conn, "SELECT count(*) FROM gdpr.audit_log WHERE action = 'resurrection'") == 1


def test_quarantine_policy_keeps_the_row_flags_it_and_reports_it_once(conn, policy: Policy, keys: Keys) -> None:
    cid, email_hash = _erased_then_reimported(conn, policy, keys, "REQ-2026-0101")
    quarantine = _with(policy, resurrection="quarantine")

    result = optout.guard(conn, quarantine, keys, CTX, AS_OF)

    assert (result["found"], result["erased"], result["quarantined"]) == (1, 0, 1)
    assert _flag(conn, cid) is True
    assert _one(conn, "SELECT subject_table, subject_id, email_hash, request_id, reason FROM gdpr.quarantine") == (
        "crm.contacts", str(cid), email_hash, "REQ-2026-0101", "resurrection")
    assert _one(conn, "SELECT outcome, details->>'request_id' FROM gdpr.audit_log WHERE action = 'resurrection'") == (
        "quarantined", "REQ-2026-0101")
    assert optout.guard(conn, quarantine, keys, CTX, AS_OF)["found"] == 0
    assert optout.guard(conn, policy, keys, CTX, AS_OF)["found"] == 0  # reviewed by a person, not erased behind them


def test_resurrected_subject_under_a_hold_is_quarantined_not_erased(conn, policy: Policy, keys: Keys) -> None:
    cid, _ = _erased_then_reimported(conn, policy, keys, "REQ-2026-0102")
    add_contract(conn, cid, date(2026, 6, 12), None)  # a client again: the contract must be kept
    conn.commit()

    result = optout.guard(conn, policy, keys, CTX, AS_OF)

    assert (result["found"], result["erased"], result["quarantined"], result["held"]) == (1, 0, 1, 1)
    assert _count(conn, "SELECT count(*) FROM crm.contracts WHERE contact_id = %s", cid) == 1
    assert _one(conn, "SELECT reason FROM gdpr.quarantine WHERE subject_id = %s", str(cid)) == (
        "resurrection; legal hold: active_contract",)
    assert _one(conn, "SELECT details->'holds' FROM gdpr.audit_log WHERE action = 'resurrection'") == (
        ["active_contract"],)


def test_refused_or_restricted_erasures_are_not_resurrections(conn, policy: Policy, keys: Keys) -> None:
    held = add_contact(conn, "client", date(2023, 1, 1), litigation=True, email="in.court@example.example")
    add_contract(conn, held, date(2023, 2, 1), None)
    conn.commit()
    assert _erase(conn, policy, keys, "in.court@example.example", "REQ-LIT-9").outcome == "refused"
    assert _entry(conn, keys.subject_hash("in.court@example.example"))[1:] == (
        "erasure", "erasure_request", "REQ-LIT-9")
    before = table_checksum(conn, ["crm.contacts", "crm.contracts"])

    assert optout.guard(conn, policy, keys, CTX, AS_OF)["found"] == 0
    assert table_checksum(conn, ["crm.contacts", "crm.contracts"]) == before


def test_opted_out_then_erased_entry_becomes_an_erasure_entry(conn, policy: Policy, keys: Keys) -> None:
    email = "first.out@example.example"
    _unsubscribed(conn, email)
    conn.commit()
    optout.collect(conn, policy, keys, CTX, AS_OF)
    email_hash = keys.subject_hash(email)
    first_seen = _one(conn, "SELECT first_seen FROM gdpr.suppression_list WHERE email_hash = %s", email_hash)

    assert _erase(conn, policy, keys, email, "REQ-2026-0103").outcome == "erased"

    assert _entry(conn, email_hash) == (keys.hmac_key_id, "erasure", "unsubscribe_activity", "REQ-2026-0103")
    assert _one(conn, "SELECT first_seen FROM gdpr.suppression_list WHERE email_hash = %s", email_hash) == first_seen
    assert _one(conn, "SELECT outcome FROM gdpr.audit_log WHERE action = 'suppress'") == ("opt_out_now_erasure",)
    back = add_contact(conn, "prospect", date(2026, 6, 14), email=email)
    conn.commit()
    assert optout.guard(conn, policy, keys, CTX, AS_OF)["erased"] == 1
    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = %s", back) == 0


# -- the list is permanent -------------------------------------------------------------------------


def _as_engine(warehouse: str) -> psycopg.Connection:
    params = conninfo_to_dict(warehouse)
    params["user"] = "gdpr_dag"
    return psycopg.connect(make_conninfo(**params))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("DELETE FROM gdpr.suppression_list", "permission denied for table suppression_list"),
        ("TRUNCATE gdpr.suppression_list", "permission denied for table suppression_list"),
        ("UPDATE gdpr.suppression_list SET source = 'x'", "permission denied for table suppression_list"),
        ("UPDATE gdpr.suppression_list SET reason = 'opt_out'", "gdpr.suppression_list is permanent: UPDATE refused"),
        # version 8: no grant to change a stored hash or its key (tests/engine/test_control_guards.py)
        ("UPDATE gdpr.suppression_list SET key_id = 'other'", "permission denied for table suppression_list"),
        ("UPDATE gdpr.suppression_list SET email_hash = 'not-a-hash', key_id = 'other'",
         "permission denied for table suppression_list"),
    ],
)
def test_the_engine_cannot_remove_or_alter_an_entry(
    conn, warehouse: str, policy: Policy, keys: Keys, statement: str, message: str
) -> None:
    _erased_then_reimported(conn, policy, keys, "REQ-PERM-1")
    with _as_engine(warehouse) as engine, pytest.raises(errors.InsufficientPrivilege) as info:
        engine.execute(statement)
    assert info.value.diag.message_primary == message
    assert _count(conn, "SELECT count(*) FROM gdpr.suppression_list WHERE reason = 'erasure'") == 1


@pytest.mark.parametrize("statement", ["DELETE FROM gdpr.suppression_list", "TRUNCATE gdpr.suppression_list"])
def test_even_the_owner_cannot_remove_an_entry(conn, policy: Policy, keys: Keys, statement: str) -> None:
    _erased_then_reimported(conn, policy, keys, "REQ-PERM-2")
    with pytest.raises(errors.InsufficientPrivilege) as info, conn.transaction():
        conn.execute(statement)
    assert info.value.diag.message_primary.startswith("gdpr.suppression_list is permanent")
    assert _count(conn, "SELECT count(*) FROM gdpr.suppression_list") == 1


# -- key rotation ----------------------------------------------------------------------------------


def test_rotation_keeps_lookups_working(conn, warehouse: str, policy: Policy, key_extra: dict[str, Any],
                                        keys: Keys) -> None:
    _unsubscribed(conn, "rot.optout@example.example")
    resurrect_email = "rot.erased@example.example"
    first = add_contact(conn, "prospect", date(2024, 1, 1), email=resurrect_email)
    conn.commit()
    optout.collect(conn, policy, keys, CTX, AS_OF)
    _erase(conn, policy, keys, resurrect_email, "REQ-ROT-1")
    assert first
    before = dict(conn.execute("SELECT key_id, count(*) FROM gdpr.suppression_list GROUP BY 1").fetchall())
    conn.rollback()
    total = sum(before.values())

    extra2, keys2 = _rotated(key_extra, "pepper-2")
    assert keys2.hmac_key_ids == [keys.hmac_key_id, "pepper-2"]
    assert keys2.subject_hash(resurrect_email) != keys.subject_hash(resurrect_email)
    # between the rotation and the next sync: entries are still under the old key, and still found
    for email in ("rot.optout@example.example", " ROT.Erased@example.example"):
        assert _suppressed(conn, keys2, email)
    assert optout.collect(conn, policy, keys2, CTX, AS_OF)["added"] == 0  # no duplicate under the new key

    result = optout.rekey(conn, keys2, CTX)

    assert (result["rekeyed"], result["superseded"]) == (total, 0)
    # Every old entry stays (the database refuses any change of a stored hash), marked re-keyed.
    assert dict(conn.execute("SELECT key_id, count(*) FROM gdpr.suppression_list GROUP BY 1").fetchall()) == {
        keys.hmac_key_id: total, "pepper-2": total}
    assert _count(conn, "SELECT count(*) FROM gdpr.suppression_list WHERE key_id = %s AND rekeyed_at IS NOT NULL",
                  keys.hmac_key_id) == total
    conn.rollback()
    assert _entry(conn, keys2.subject_hash(resurrect_email)) == ("pepper-2", "erasure", "erasure_request", "REQ-ROT-1")
    assert _entry(conn, keys.subject_hash(resurrect_email)) == (keys.hmac_key_id, "erasure", "erasure_request",
                                                                "REQ-ROT-1")
    assert _suppressed(conn, keys2, "rot.optout@example.example")
    assert optout.rekey(conn, keys2, CTX)["rekeyed"] == 0

    # every step works under the new key: collect adds nothing, the guard catches a re-import
    assert optout.collect(conn, policy, keys2, CTX, AS_OF)["added"] == 0
    back = add_contact(conn, "lead", date(2026, 6, 14), email=resurrect_email.upper())
    conn.commit()
    guarded = optout.guard(conn, policy, keys2, CTX, AS_OF)
    assert guarded["erased"] == 1
    assert _one(conn, "SELECT subject_hash, details->>'request_id' FROM gdpr.audit_log WHERE action = 'resurrection'"
                      " AND (details->>'subject_id')::bigint = %s", back) == (
        keys2.subject_hash(resurrect_email), "REQ-ROT-1")

    # a second rotation chains once more
    _, keys3 = _rotated(extra2, "pepper-3")
    assert optout.rekey(conn, keys3, CTX)["rekeyed"] == total
    assert _entry(conn, keys3.subject_hash(resurrect_email))[0] == "pepper-3"
    assert _suppressed(conn, keys3, "Rot.OptOut@example.example")
    # and the old audit rows stay findable through the chain's earlier forms
    assert _count(conn, "SELECT count(*) FROM gdpr.audit_log WHERE action = 'erasure_request' AND subject_hash = %s",
                  keys3.subject_hashes(resurrect_email)[keys.hmac_key_id]) == 1


def test_rekey_refuses_an_unknown_key_and_changes_nothing(conn, policy: Policy, keys: Keys) -> None:
    _unsubscribed(conn, "unknown.key@example.example")
    conn.commit()
    optout.collect(conn, policy, keys, CTX, AS_OF)
    checksum = table_checksum(conn, ["gdpr.suppression_list"])
    stranger = Keys.from_extra(generate_extra() | {"hmac_key_id": "pepper-9"})
    with pytest.raises(KeyConfigError) as info:
        optout.rekey(conn, stranger, CTX)
    assert keys.hmac_key_id in str(info.value) and "hmac_chain" in str(info.value)
    assert table_checksum(conn, ["gdpr.suppression_list"]) == checksum


def test_a_person_listed_under_both_keys_is_rekeyed_once(conn, policy: Policy, key_extra: dict[str, Any],
                                                         keys: Keys) -> None:
    email = "both.keys@example.example"
    _unsubscribed(conn, email)
    conn.commit()
    optout.collect(conn, policy, keys, CTX, AS_OF)
    _, keys2 = _rotated(key_extra, "pepper-2")
    # erased after the rotation, before the next sync: a new-key entry next to the old-key one
    _erase(conn, policy, keys2, email, "REQ-BOTH-1")
    assert _count(conn, "SELECT count(*) FROM gdpr.suppression_list") >= 2

    result = optout.rekey(conn, keys2, CTX)

    assert result["superseded"] == 1
    assert _entry(conn, keys2.subject_hash(email))[1:] == ("erasure", "erasure_request", "REQ-BOTH-1")
    assert _entry(conn, keys.subject_hash(email))[:2] == (keys.hmac_key_id, "opt_out")  # left as it was
    spool, count = optout.spool_list(conn, keys2)
    with spool:
        shared = spool.read().decode().split()
    assert keys.subject_hash(email) not in shared and keys2.subject_hash(email) in shared
    # Shared: one entry per person, under the current key (the old entries stay, re-keyed or superseded).
    assert count == len(shared) == _count(conn, "SELECT count(*) FROM gdpr.suppression_list WHERE key_id = 'pepper-2'")
    assert _count(conn, "SELECT count(*) FROM gdpr.suppression_list WHERE key_id <> 'pepper-2'"
                        " AND rekeyed_at IS NULL") == 0
    assert _suppressed(conn, keys2, email)


# -- for other pipelines ---------------------------------------------------------------------------


def test_filter_suppressed_drops_listed_people_from_a_staging_table(conn, policy: Policy, keys: Keys) -> None:
    _unsubscribed(conn, "no.thanks@example.example")
    _erased_then_reimported(conn, policy, keys, "REQ-STAGE-1", email="gone.for.good@example.example")
    optout.collect(conn, policy, keys, CTX, AS_OF)
    rows = ["No.Thanks@Example.example", " gone.for.good@EXAMPLE.example", "welcome@example.example",
            "ｎｏ.ｔｈａｎｋｓ@example.example", None, "not an email", "welcome2@example.example"]
    with conn.transaction():
        conn.execute("CREATE SCHEMA staging")
        conn.execute("CREATE TABLE staging.import (line int, email text)")
        with conn.cursor().copy("COPY staging.import (line, email) FROM STDIN") as copy:
            for i, email in enumerate(rows):
                copy.write_row((i, email))
        # the least privilege a loader needs: read the list (gdpr_list_reader), delete from its staging table
        conn.execute("GRANT USAGE ON SCHEMA staging TO gdpr_list_reader")
        conn.execute("GRANT SELECT, DELETE ON staging.import TO gdpr_list_reader")
    conn.execute("SET ROLE gdpr_list_reader")
    conn.commit()

    counts = optout.filter_suppressed(conn, keys, "staging.import", "email")

    conn.execute("RESET ROLE")
    conn.commit()
    assert counts == {"checked": 6, "dropped": 3}
    assert [r[0] for r in conn.execute("SELECT line FROM staging.import ORDER BY line").fetchall()] == [2, 4, 5, 6]
    conn.rollback()
    assert optout.filter_suppressed(conn, keys, "staging.import", "email", ctx=CTX) == {"checked": 3, "dropped": 0}
    assert _one(conn, "SELECT row_count, details FROM gdpr.audit_log WHERE action = 'filter_suppressed'") == (
        0, {"checked": 3, "dropped": 0})


# -- share and export ------------------------------------------------------------------------------


def test_share_pushes_hashes_only_in_batches_and_retries_cleanly(conn, policy: Policy, keys: Keys, downstream) -> None:  # type: ignore[no-untyped-def]
    for i in range(7):
        _unsubscribed(conn, f"share.{i}@example.example")
    conn.commit()
    optout.collect(conn, policy, keys, CTX, AS_OF)
    listed = {r[0] for r in conn.execute("SELECT email_hash FROM gdpr.suppression_list").fetchall()}
    conn.rollback()
    small = _with(policy, share_targets=[policy.optout.share_targets[0].model_copy(update={"batch_size": 10})])

    downstream.emailing.fail_next(1, 503)
    with pytest.raises(optout.ShareError) as info:
        optout.share(conn, small, keys, CTX, "emailing_blocklist", TRANSPORT)
    assert str(info.value) == "share target emailing_blocklist: batch 1 refused with HTTP 503"
    assert _one(conn, "SELECT outcome FROM gdpr.audit_log WHERE action = 'share'") == ("failed",)

    result = optout.share(conn, small, keys, CTX, "emailing_blocklist", TRANSPORT)

    assert result["hashes"] == len(listed) and result["batches"] == -(-len(listed) // 10)
    assert downstream.emailing.blocklist_hashes() == listed
    assert all("@" not in h for h in downstream.emailing.blocklist_hashes())


def test_share_never_follows_a_redirect(conn, policy: Policy, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 302 to a page that answers 200 is not an acknowledgement: the batch is refused and nothing is
    posted to the redirect's target (the share goes through the transport seam, which never follows one)."""
    _unsubscribed(conn, "share.redirect@example.example")
    conn.commit()
    optout.collect(conn, policy, keys, CTX, AS_OF)
    server = ScriptedServer([("POST", "/v3/contacts/blocklist", redirect("/elsewhere")),
                             ("POST", "/elsewhere", json_answer(200, {"ok": True}))])
    try:
        monkeypatch.setenv("AIRFLOW_CONN_REDIRECTING", server.connection())
        target = policy.optout.share_targets[0].model_copy(update={"connection_id": "redirecting"})
        with pytest.raises(optout.ShareError) as info:
            optout.share(conn, _with(policy, share_targets=[target]), keys, CTX, target.name, TRANSPORT)
        assert str(info.value) == f"share target {target.name}: batch 1 refused with HTTP 302"
        assert [path for _, path in server.requests] == [target.endpoint]
    finally:
        server.stop()
    assert _one(conn, "SELECT outcome FROM gdpr.audit_log WHERE action = 'share'") == ("failed",)


def test_blocklist_route_refuses_anything_but_hashes_and_needs_the_api_key(downstream) -> None:  # type: ignore[no-untyped-def]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(body: object, key: str = "test-api-key") -> int:
        request = urllib.request.Request(
            f"{downstream.emailing.base_url}/v3/contacts/blocklist/hashes", data=json.dumps(body).encode(),
            method="POST", headers={"Content-Type": "application/json", "api-key": key})
        try:
            with opener.open(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert post({"hashes": ["a" * 64]}) == 200
    assert post({"hashes": ["someone@example.example"]}) == 400
    assert post({"hashes": "a" * 64}) == 400
    assert post({"hashes": ["b" * 64]}, key="wrong") == 401
    assert downstream.emailing.blocklist_hashes() == {"a" * 64}


def test_export_writes_hashes_only_one_per_line(conn, policy: Policy, keys: Keys, tmp_path: Path) -> None:
    _erased_then_reimported(conn, policy, keys, "REQ-EXP-1")
    optout.collect(conn, policy, keys, CTX, AS_OF)
    path = tmp_path / "out" / "suppression.txt"

    result = optout.export(conn, keys, CTX, path)

    lines = path.read_text().splitlines()
    assert lines == sorted(r[0] for r in conn.execute("SELECT email_hash FROM gdpr.suppression_list").fetchall())
    conn.rollback()
    assert result["hashes"] == len(lines) and all(len(h) == 64 and "@" not in h for h in lines)
    assert optout.export_path(_with(policy, export_path="exports/list.txt"), tmp_path / "policy.yaml") == (
        tmp_path / "exports" / "list.txt")


# -- the whole sync --------------------------------------------------------------------------------


def test_dry_run_changes_nothing_and_says_what_it_would_do(conn, policy: Policy, keys: Keys, tmp_path: Path) -> None:
    cid, _ = _erased_then_reimported(conn, policy, keys, "REQ-DRY-2")
    _unsubscribed(conn, "dry.optout@example.example")
    conn.commit()
    tables = ["crm.contacts", "crm.activities", "gdpr.suppression_list", "gdpr.quarantine"]
    before = table_checksum(conn, tables)
    dry = RunContext("gdpr_optout_sync", "dry-1", "test", dry_run=True)

    result = optout.sync(conn, policy, keys, dry, AS_OF, export_to=tmp_path / "x.txt")

    assert table_checksum(conn, tables) == before
    assert not (tmp_path / "x.txt").exists()
    assert result.collect["added"] > 0 and result.guard["erased"] == 1 and result.enforce["flagged"] > 0
    rows = conn.execute("SELECT action, outcome, dry_run FROM gdpr.audit_log WHERE run_id = 'dry-1'"
                        " ORDER BY audit_id").fetchall()
    conn.rollback()
    assert rows == [(a, "dry_run", True) for a in ("rekey", "collect", "resurrection_guard", "enforce", "export")]
    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = %s", cid) == 1


def test_check_refuses_a_source_that_does_not_compile_or_no_flag_column(conn, policy: Policy) -> None:
    typo = policy.optout.sources[0].model_copy(update={"name": "typo", "predicate": "s.no_such"})
    bad = _with(policy, sources=[*policy.optout.sources, typo])
    with pytest.raises(optout.OptOutError) as info:
        optout.check(conn, bad)
    assert "optout.sources[2] (typo).predicate: does not compile" in str(info.value)
    no_flag = policy.model_copy(update={"subject": policy.subject.model_copy(update={"restriction_column": None})})
    with pytest.raises(optout.OptOutError, match="subject.restriction_column"):
        optout.check(conn, no_flag)
    assert optout.check(conn, policy) == []


class _CountingCursor(psycopg.Cursor):
    """Counts every statement sent through a cursor (execute, executemany per row, copy)."""

    calls = 0

    def execute(self, query, params=None, **kwargs):  # type: ignore[no-untyped-def, override]
        _CountingCursor.calls += 1
        return super().execute(query, params, **kwargs)

    def executemany(self, query, params_seq, **kwargs):  # type: ignore[no-untyped-def, override]
        params_seq = list(params_seq)
        _CountingCursor.calls += len(params_seq)
        return super().executemany(query, params_seq, **kwargs)

    def copy(self, statement, params=None, **kwargs):  # type: ignore[no-untyped-def, override]
        _CountingCursor.calls += 1
        return super().copy(statement, params, **kwargs)


def _counted(step, *args, **kwargs):  # type: ignore[no-untyped-def]
    """(statements sent, result) of one engine call on `args[0]` (the connection)."""
    conn = args[0]
    conn.cursor_factory = _CountingCursor
    _CountingCursor.calls = 0
    try:
        result = step(*args, **kwargs)
    finally:
        conn.cursor_factory = psycopg.Cursor
    return _CountingCursor.calls, result


def test_a_100k_entry_sync_is_set_based(conn, policy: Policy, key_extra: dict[str, Any], keys: Keys,
                                        downstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    n = 100_000
    export_to = tmp_path / "list.txt"
    # the seeded 1,500 contacts: a whole sync, then a re-keying after a rotation
    small_sync, _ = _counted(optout.sync, conn, policy, keys, CTX, AS_OF, export_to=export_to, transport=TRANSPORT)
    extra2, keys2 = _rotated(key_extra, "pepper-2")
    small_rekey, _ = _counted(optout.rekey, conn, keys2, CTX)

    base = new_id() * 10
    with conn.transaction():
        # 90% opted out by the flag, 10% by an unsubscribe activity (enforcement flags those)
        conn.execute(
            "INSERT INTO crm.contacts (contact_id, company_id, status, email, created_at, do_not_contact)"
            " SELECT %(base)s + g, (SELECT min(company_id) FROM crm.companies), 'prospect',"
            " 'Bulk.Person.' || g || '@Bulk.example', now(), g %% 10 <> 0 FROM generate_series(1, %(n)s) g",
            {"base": base, "n": n})
        conn.execute(
            "INSERT INTO crm.activities (activity_id, contact_id, kind, occurred_at)"
            " SELECT %(base)s + %(n)s + g, %(base)s + g, 'unsubscribe', now() FROM generate_series(1, %(n)s) g"
            " WHERE g %% 10 = 0", {"base": base, "n": n})
        conn.execute("ANALYZE crm.contacts")
        conn.execute("ANALYZE crm.activities")

    big_sync, result = _counted(optout.sync, conn, policy, keys2, CTX, AS_OF, export_to=export_to, transport=TRANSPORT)
    assert result.collect["added"] == n
    assert result.collect["by_source"] == {"do_not_contact_flag": n - n // 10, "unsubscribe_activity": n // 10}
    assert result.enforce["flagged"] == n // 10
    # (the entries of the first sync re-keyed to pepper-2 stay under pepper-1 too: not shared, not re-keyed again)
    listed = _count(conn, "SELECT count(*) FROM gdpr.suppression_list WHERE key_id = 'pepper-2'")
    assert listed > n
    assert result.share[0]["hashes"] == listed and result.share[0]["batches"] == -(-listed // 1000)
    assert len(downstream.emailing.blocklist_hashes()) >= listed
    assert result.export is not None and result.export["hashes"] == listed
    assert sum(1 for _ in export_to.open()) == listed

    _, keys3 = _rotated(extra2, "pepper-3")
    big_rekey, rekeyed = _counted(optout.rekey, conn, keys3, CTX)
    assert rekeyed["rekeyed"] == listed
    assert _entry(conn, keys3.subject_hash("bulk.person.77@bulk.example"))[:2] == ("pepper-3", "opt_out")

    # the number of statements does not grow with the number of rows
    assert big_sync == small_sync, (small_sync, big_sync)
    assert big_rekey == small_rekey, (small_rekey, big_rekey)
    assert big_sync < 50 and big_rekey < 10
    assert _no_at(conn) == dict.fromkeys(_no_at(conn), 0)
    assert "@" not in export_to.read_text()


def test_no_email_anywhere_after_a_full_sync(conn, policy: Policy, keys: Keys, downstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _erased_then_reimported(conn, policy, keys, "REQ-NOAT-1")
    _erased_then_reimported(conn, policy, keys, "REQ-NOAT-2", email="second.phoenix@example.example")
    held, _ = _erased_then_reimported(conn, policy, keys, "REQ-NOAT-3", email="third.phoenix@example.example")
    add_contract(conn, held, date(2026, 6, 12), None)
    _unsubscribed(conn, "plain.optout@example.example")
    conn.commit()

    result = optout.sync(conn, policy, keys, CTX, AS_OF, export_to=tmp_path / "list.txt", transport=TRANSPORT)

    assert (result.guard["erased"], result.guard["quarantined"]) == (2, 1)
    assert _no_at(conn) == dict.fromkeys(_no_at(conn), 0)
    assert "@" not in (tmp_path / "list.txt").read_text()
    assert all("@" not in h for h in downstream.emailing.blocklist_hashes())
    assert "@" not in json.dumps(result.as_dict())


def test_an_email_with_copy_escapes_is_hashed_as_python_hashes_it(conn, policy: Policy, keys: Keys) -> None:
    odd = "Odd\\Back\tslash@example.example"  # a backslash and a tab: escaped by COPY, decoded back
    _unsubscribed(conn, odd)
    conn.commit()
    optout.collect(conn, policy, keys, CTX, AS_OF)
    assert _entry(conn, keys.subject_hash(odd))[1] == "opt_out"
    assert optout._text(b"a\\\\b\\tc\\nd") == "a\\b\tc\nd"


# -- the key chain (crypto.Keys) -------------------------------------------------------------------


def test_a_chained_hash_is_hmac_of_the_previous_hash(key_extra: dict[str, Any], keys: Keys) -> None:
    import hashlib
    import hmac

    _, keys2 = _rotated(key_extra, "pepper-2")
    first = hmac.new(keys.pepper, b"john@example.com", hashlib.sha256).hexdigest()
    second = hmac.new(keys2.pepper, first.encode(), hashlib.sha256).hexdigest()
    assert keys2.subject_hashes(" John@Example.com ") == {keys.hmac_key_id: first, "pepper-2": second}
    assert keys2.subject_hash("john@example.com") == second == keys2.rekey(first, keys.hmac_key_id)
    assert keys2.rekey(second, "pepper-2") == second
    assert keys.subject_hash("john@example.com") == first  # one pepper: unchanged
    assert "pepper-1" in repr(keys2) and key_extra["hmac_pepper"] not in repr(keys2)
    with pytest.raises(KeyConfigError):
        keys2.rekey(first, "pepper-0")


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        ("pepper-0", "hmac_chain must be a list of {key_id, pepper}, oldest first"),
        ([{"pepper": "x"}], "hmac_chain[0].key_id is missing"),
        ([{"key_id": "pepper-1", "pepper": base64.b64encode(b"o" * 32).decode()}],
         "hmac key id 'pepper-1' appears twice (hmac_chain, hmac_key_id)"),
        ([{"key_id": "pepper-0", "pepper": base64.b64encode(b"short-old-secret").decode()}],
         "hmac_chain[0].pepper is 16 bytes, at least 32 are required"),
        ([{"key_id": "pepper-0", "pepper": "not base64 !! old secret"}], "hmac_chain[0].pepper is not valid base64"),
    ],
)
def test_a_bad_chain_is_refused_without_quoting_a_secret(key_extra: dict[str, Any], chain: Any, message: str) -> None:
    with pytest.raises(KeyConfigError) as info:
        Keys.from_extra({**key_extra, "hmac_chain": chain})
    assert str(info.value) == f"connection 'gdpr_keys': {message}"
    assert "secret" not in str(info.value)


def test_plus_tag_normalisation_keeps_a_tag_only_local_part() -> None:
    from warehouse_gdpr.engine.crypto import normalise_email

    assert normalise_email(" John+News@Example.COM ", strip_plus_tags=True) == "john@example.com"
    assert normalise_email("john+a+b@example.com", strip_plus_tags=True) == "john@example.com"
    assert normalise_email("+tag@example.com", strip_plus_tags=True) == "+tag@example.com"
    assert normalise_email("john+news@example.com") == "john+news@example.com"
