"""Restriction of processing on request (issue 14, GDPR art. 18), engine level, on the real database and the demo's
real downstream services: the sweep's built-in hold, the opt-out machinery (flag re-applied after an import,
the shared list), the downstream calls and the sales team's webhook, the database guard, and erasure."""

from __future__ import annotations

import base64
import contextlib
import os
from datetime import date, timedelta
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from helpers import AS_OF, THREE_YEARS_BEFORE, add_activity, add_contact, candidates
from warehouse_gdpr.airflow.transport import AirflowTransport
from warehouse_gdpr.engine import erasure, optout, propagation, restriction, sweep
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.policy import Policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]
CTX = RunContext("gdpr_subject_restriction", "run-1", "apply")
SWEEP = RunContext("gdpr_retention_sweep", "run-1", "apply")
SYNC = RunContext("gdpr_optout_sync", "run-1", "enforce")
TODAY = date(2026, 6, 15)
EXPIRED = THREE_YEARS_BEFORE - timedelta(days=100)
RULE = "prospects_never_converted"


@pytest.fixture
def prospect(conn: psycopg.Connection) -> tuple[int, str]:
    """A prospect past its retention date (created long ago, no own interaction): the sweep deletes it."""
    cid = add_contact(conn, "prospect", EXPIRED)
    email = conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0]  # type: ignore[index]
    conn.commit()
    return cid, email


def _run(conn: psycopg.Connection, policy: Policy, keys: Keys, params: dict,
         request_id: str = "REQ-RS-1") -> restriction.RestrictionResult:
    kind = restriction.kind_of(conn, {"request_id": request_id, **params})
    request = restriction.parse_request({"request_id": request_id, **params}, today=TODAY, kind=kind)
    located = restriction.locate(conn, policy, keys, request)
    return restriction.apply(conn, policy, keys, CTX, request, located)


def _one(conn: psycopg.Connection, query: str, *params: object) -> tuple:
    row = conn.execute(query, params).fetchone()
    conn.rollback()
    assert row is not None
    return tuple(row)


def _exists(conn: psycopg.Connection, cid: int) -> bool:
    return bool(_one(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = %s", cid)[0])


def _flag(conn: psycopg.Connection, cid: int) -> bool:
    return bool(_one(conn, "SELECT do_not_contact FROM crm.contacts WHERE contact_id = %s", cid)[0])


def test_a_restricted_prospect_past_its_retention_survives_a_sweep_and_goes_with_the_first_sweep_after_lift(
    conn, policy: Policy, keys: Keys, prospect
) -> None:
    cid, email = prospect
    assert candidates(conn, policy, RULE)[cid] == []

    result = _run(conn, policy, keys, {"email": email, "action": "restrict"})

    assert (result.outcome, result.status) == ("restricted", "pending_propagation")
    assert result.targets == ["emailing", "telephony", "sales_team"]
    assert _flag(conn, cid)
    assert candidates(conn, policy, RULE)[cid] == ["processing_restricted"]  # a built-in hold
    (plan,) = sweep.plan(conn, policy, [policy.rule(RULE)], AS_OF)
    assert plan.by_hold.get("processing_restricted") == 1  # shown in the plan, with the policy's holds
    swept = sweep.apply_rule(conn, policy, policy.rule(RULE), keys, SWEEP, AS_OF)
    assert swept.held >= 1 and _exists(conn, cid)

    lifted = _run(conn, policy, keys, {"email": email, "action": "lift"}, "REQ-RS-2")

    assert (lifted.kind, lifted.outcome) == ("restriction_lift", "lifted")
    assert not _flag(conn, cid)  # the flag the restriction set is cleared
    assert _one(conn, "SELECT count(*) FROM gdpr.restriction")[0] == 0
    assert candidates(conn, policy, RULE)[cid] == []
    sweep.apply_rule(conn, policy, policy.rule(RULE), keys, RunContext("gdpr_retention_sweep", "run-2", "apply"),
                     AS_OF)
    assert not _exists(conn, cid)
    actions = conn.execute("SELECT action, outcome FROM gdpr.audit_log WHERE dag_id = %s ORDER BY audit_id",
                           (CTX.dag_id,)).fetchall()
    conn.rollback()
    assert ("restrict", "restricted") in actions and ("lift", "lifted") in actions
    assert email not in str(_one(conn, "SELECT string_agg(a::text, ' ') FROM gdpr.audit_log a")[0])


def test_a_crm_import_that_clears_the_flag_is_caught_by_the_optout_sync(
    conn, policy: Policy, keys: Keys, prospect
) -> None:
    cid, email = prospect
    _run(conn, policy, keys, {"email": email})  # `action` defaults to restrict
    with conn.transaction():  # an import rewrites the contact row and clears the flag...
        conn.execute("UPDATE crm.contacts SET do_not_contact = false, first_name = 'Imported' WHERE contact_id = %s",
                     (cid,))
    twin = add_contact(conn, "lead", date(2026, 5, 1), email=email.upper())  # ...and brings a duplicate record
    conn.commit()

    result = optout.enforce(conn, policy, keys, SYNC)

    assert result["restricted_reflagged"] == 2 and result["restricted_adopted"] == 1
    assert _flag(conn, cid) and _flag(conn, twin)
    ids = _one(conn, "SELECT subject_ids, flagged_ids FROM gdpr.restriction")
    assert ids == (sorted([str(cid), str(twin)]), sorted([str(cid), str(twin)]))
    assert candidates(conn, policy, RULE)[cid] == ["processing_restricted"]
    audited = _one(conn, "SELECT row_count, details FROM gdpr.audit_log WHERE action = 'restriction_reapplied'")
    assert audited == (2, {"reflagged": 2, "adopted": 1})
    assert optout.enforce(conn, policy, keys, SYNC)["restricted_reflagged"] == 0  # nothing left to catch

    _run(conn, policy, keys, {"email": email, "action": "lift"}, "REQ-RS-2")
    assert not _flag(conn, cid) and not _flag(conn, twin)


def test_after_a_pepper_rotation_the_sync_rekeys_the_restriction_and_still_catches_an_import(
    conn, policy: Policy, keys: Keys, key_extra: dict, prospect
) -> None:
    """A restriction recorded under the pepper that a rotation retires: the sync's first step brings it to the
    new key (chained, no plaintext), so a re-import under a new id is still adopted and flagged, the shared list
    carries the new key's hash, and the person can still be lifted by email."""
    cid, email = prospect
    _run(conn, policy, keys, {"email": email})
    chain = [*key_extra.get("hmac_chain", []), {"key_id": key_extra["hmac_key_id"], "pepper": key_extra["hmac_pepper"]}]
    keys2 = Keys.from_extra({**key_extra, "hmac_key_id": "pepper-2",
                             "hmac_pepper": base64.b64encode(os.urandom(32)).decode(), "hmac_chain": chain})

    rekeyed = optout.rekey(conn, keys2, SYNC)

    assert rekeyed["restrictions_rekeyed"] == 1
    assert _one(conn, "SELECT subject_hash, key_id FROM gdpr.restriction") == (keys2.subject_hash(email), "pepper-2")
    assert optout.rekey(conn, keys2, SYNC)["restrictions_rekeyed"] == 0
    twin = add_contact(conn, "lead", date(2026, 5, 1), email=email.upper())  # an import, under a new id
    conn.commit()
    assert optout.enforce(conn, policy, keys2, SYNC)["restricted_adopted"] == 1
    assert _flag(conn, twin)
    with optout.spool_list(conn, keys2)[0] as spool:
        assert keys2.subject_hash(email).encode() in spool.read()
    lifted = _run(conn, policy, keys2, {"email": email, "action": "lift"}, "REQ-RS-2")
    assert lifted.outcome == "lifted" and not _flag(conn, cid) and not _flag(conn, twin)


def test_a_restricted_person_is_kept_out_of_campaigns_by_the_next_optout_share(
    conn, policy: Policy, keys: Keys, prospect, downstream
) -> None:
    """The share pushes the hashes of the people no campaign may reach; a restricted person is one of them
    while the restriction is in force, and the first share after `lift` no longer carries them."""
    _, email = prospect
    person = keys.subject_hash(email)
    _run(conn, policy, keys, {"email": email})

    shared = optout.share(conn, policy, keys, SYNC, "emailing_blocklist", AirflowTransport())

    assert person in downstream.emailing.blocklist_hashes()
    with optout.spool_list(conn, keys)[0] as spool:
        assert person.encode() in spool.read()
    _run(conn, policy, keys, {"email": email, "action": "lift"}, "REQ-RS-2")
    spool, count = optout.spool_list(conn, keys)
    with spool:
        assert person.encode() not in spool.read() and count == shared["hashes"] - 1


def test_downstream_targets_and_the_sales_team_are_told_to_restrict_then_to_lift(
    conn, policy: Policy, keys: Keys, prospect, downstream
) -> None:
    cid, email = prospect
    downstream.add_person(email)
    transport = AirflowTransport()
    for action, request_id, kind in (("restrict", "REQ-RS-1", "restriction"), ("lift", "REQ-RS-2", "restriction_lift")):
        result = _run(conn, policy, keys, {"email": email, "action": action}, request_id)
        for target in ("emailing", "telephony"):
            propagation.preflight(conn, policy, CTX, target, transport)
        answers = {t: propagation.propagate(conn, policy, keys, CTX, request_id, t, transport) for t in result.targets}
        assert answers == {"emailing": "HTTP 204", "telephony": "HTTP 200", "sales_team": "HTTP 202"}
        assert downstream.emailing.contact(email)["emailBlacklisted"] is (action == "restrict")
        assert downstream.telephony.contact(email)["restricted"] is (action == "restrict")
        with conn.transaction():
            record = propagation.complete_if_acknowledged(conn, CTX, request_id)
        assert record is not None and (record["kind"], record["status"]) == (kind, "completed")
    notifications = downstream.webhook.notifications()
    assert notifications == [
        {"event": "restricted", "request_id": "REQ-RS-1", "subject_table": "crm.contacts", "subject_ids": [str(cid)]},
        {"event": "lifted", "request_id": "REQ-RS-2", "subject_table": "crm.contacts", "subject_ids": [str(cid)]},
    ]  # internal ids, never the email
    assert _one(conn, "SELECT count(*) FROM gdpr.erasure_propagation WHERE identifier_ciphertext IS NOT NULL")[0] == 0


def test_an_erasure_of_a_restricted_person_follows_the_erasure_rules(
    conn, policy: Policy, keys: Keys, prospect
) -> None:
    cid, email = prospect
    _run(conn, policy, keys, {"email": email})
    request = erasure.parse_request({"email": email, "request_id": "REQ-RS-ERASE"}, today=TODAY)
    located = erasure.locate(conn, policy, keys, request)
    assert erasure.holds_in_force(conn, policy, located, AS_OF) == {}  # a restriction is not a legal hold

    result = erasure.erase(conn, policy, keys, RunContext("gdpr_subject_erasure", "run-1", "erase"), request,
                           located, {})

    assert result.outcome == "erased" and not _exists(conn, cid)
    assert _one(conn, "SELECT count(*) FROM gdpr.restriction")[0] == 0  # ended with the data it restricted
    assert _one(conn, "SELECT outcome FROM gdpr.audit_log WHERE action = 'restriction_ended'") == ("erased",)


def test_lifting_nothing_a_dry_run_and_an_unknown_person_change_nothing(
    conn, policy: Policy, keys: Keys, prospect
) -> None:
    cid, email = prospect
    lifted = _run(conn, policy, keys, {"email": email, "action": "lift"})
    assert (lifted.outcome, lifted.status, lifted.targets) == ("not_restricted", "completed", [])
    dry = _run(conn, policy, keys, {"email": email, "dry_run": True}, "REQ-RS-2")
    assert dry.outcome == "restricted" and not _flag(conn, cid)
    assert _one(conn, "SELECT count(*) FROM gdpr.restriction")[0] == 0
    assert _one(conn, "SELECT count(*) FROM gdpr.request WHERE request_id = 'REQ-RS-2'")[0] == 0
    unknown = _run(conn, policy, keys, {"email": "nobody.here@example.example"}, "REQ-RS-3")
    assert (unknown.outcome, unknown.status, unknown.targets) == ("not_found", "not_found", [])
    with pytest.raises(restriction.RestrictionError, match="`action` must be `restrict` or `lift`"):
        _run(conn, policy, keys, {"email": email, "action": "freeze"}, "REQ-RS-4")


# -- the database guard ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crm_app(server_url: str) -> str:
    """A login role that is not a member of gdpr_engine (the CRM application), cluster-wide."""
    with psycopg.connect(server_url, autocommit=True) as admin, contextlib.suppress(errors.DuplicateObject):
        admin.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'crm_app') THEN "
                      "CREATE ROLE crm_app LOGIN; END IF; END $$")
    return "crm_app"


def _as(url: str, user: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(url), "user": user})  # type: ignore[arg-type]


def _guarded(conn: psycopg.Connection) -> Policy:
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    data["restriction"]["database_guard"] = True
    return parse_policy(data, "guarded")


def test_the_database_guard_refuses_an_update_by_a_plain_role_while_restricted(
    conn, warehouse: str, keys: Keys, prospect, crm_app: str
) -> None:
    cid, email = prospect
    add_activity(conn, cid, "call_attempt", date(2026, 1, 1))  # a rep's call: a dependent row of the person
    other = add_contact(conn, "prospect", date(2025, 1, 1))
    conn.execute("GRANT USAGE ON SCHEMA crm TO crm_app")
    conn.execute("GRANT SELECT, UPDATE, DELETE ON ALL TABLES IN SCHEMA crm TO crm_app")
    conn.commit()
    policy = _guarded(conn)
    with pytest.raises(restriction.RestrictionError, match="runs `warehouse-gdpr schema install --policy POLICY`"):
        restriction.require_guard(conn, policy)
    with psycopg.connect(_as(warehouse, "gdpr_dag")) as engine, pytest.raises(errors.InsufficientPrivilege):
        restriction.install_guard(engine, policy, CTX)  # the engine does not own the tables
    assert restriction.install_guard(conn, policy, CTX) == [t.table for t in policy.tables]
    restriction.require_guard(conn, policy)
    _run(conn, policy, keys, {"email": email})

    with psycopg.connect(_as(warehouse, crm_app)) as app:
        with pytest.raises(errors.InsufficientPrivilege) as info:
            app.execute("UPDATE crm.contacts SET direct_phone = '+33 6 11 11 11 11' WHERE contact_id = %s", (cid,))
        assert "processing of this person is restricted (GDPR art. 18): UPDATE on crm.contacts refused" in str(
            info.value)
        app.rollback()
        with pytest.raises(errors.InsufficientPrivilege, match="DELETE on crm.activities refused"):
            app.execute("DELETE FROM crm.activities WHERE contact_id = %s", (cid,))
        app.rollback()
        assert app.execute("UPDATE crm.contacts SET job_title = 'CFO' WHERE contact_id = %s", (other,)).rowcount == 1
        app.commit()
    with psycopg.connect(_as(warehouse, "gdpr_dag")) as engine:  # the engine itself is let through
        assert engine.execute("UPDATE crm.contacts SET job_title = 'CEO' WHERE contact_id = %s", (cid,)).rowcount == 1
        engine.commit()
    enabled = conn.execute("SELECT DISTINCT tgenabled FROM pg_trigger WHERE tgname = %s",
                           (restriction.GUARD_TRIGGER,)).fetchall()
    conn.rollback()
    assert enabled == [("A",)]  # ALWAYS: session_replication_role = replica does not skip it

    _run(conn, policy, keys, {"email": email, "action": "lift"}, "REQ-RS-2")
    with psycopg.connect(_as(warehouse, crm_app)) as app:
        assert app.execute("UPDATE crm.contacts SET direct_phone = NULL WHERE contact_id = %s", (cid,)).rowcount == 1
    installed = _one(conn, "SELECT row_count FROM gdpr.audit_log WHERE action = 'restriction_guard'")[0]
    assert installed == len(policy.tables)
    with conn.transaction():  # (clean up the cluster-wide role's grants in this database)
        conn.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA crm FROM crm_app"))
        conn.execute("REVOKE USAGE ON SCHEMA crm FROM crm_app")
