"""One legal-hold builder (issue 12): the sweep, erasure and the resurrection guard all ask
`candidates.holds_array` which holds are in force for a subject, so they cannot disagree. The case
where three hand-written builders would most easily drift: a hold whose predicate is NULL for a row
(a litigation with no end date), which holds it everywhere (fail-safe, issue 11.3)."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import psycopg
import yaml
from psycopg import sql

from helpers import AS_OF, THREE_YEARS_BEFORE, add_contact, candidates
from warehouse_gdpr.engine import candidates as engine_candidates
from warehouse_gdpr.engine import erasure, optout, sweep
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.policy import Policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]
SWEEP = RunContext("gdpr_retention_sweep", "run-1", "apply")
ERASE = RunContext("gdpr_subject_erasure", "erase-1", "erase")
GUARD = RunContext("gdpr_optout_sync", "run-1", "guard")


def _litigation_until(conn: psycopg.Connection) -> Policy:
    """The demo policy with a litigation hold that ends: `s.litigation_until >= :as_of::date`, NULL for
    an open-ended case."""
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    (litigation,) = [h for h in data["holds"] if h["name"] == "litigation"]
    litigation["predicate"] = "s.litigation_until >= :as_of::date"
    conn.execute("ALTER TABLE crm.contacts ADD COLUMN litigation_until date")
    conn.commit()
    return parse_policy(data, "variant")


def _contact(conn: psycopg.Connection, email: str, until: str | None, created: date) -> int:
    cid = add_contact(conn, "prospect", created, litigation=True, email=email)
    conn.execute("UPDATE crm.contacts SET litigation_until = %s WHERE contact_id = %s", (until, cid))
    conn.commit()
    return cid


def _erase(conn: psycopg.Connection, policy: Policy, keys: Keys, email: str, request_id: str) -> erasure.ErasureResult:
    request = erasure.parse_request({"email": email, "request_id": request_id}, today=date(2026, 6, 15))
    located = erasure.locate(conn, policy, keys, request)
    holds = erasure.holds_in_force(conn, policy, located, AS_OF)
    return erasure.erase(conn, policy, keys, ERASE, request, located, holds)


def _exists(conn: psycopg.Connection, cid: int) -> bool:
    found = conn.execute("SELECT count(*) FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()
    conn.rollback()
    return bool(found and found[0])


def test_a_null_hold_holds_in_the_sweep_in_erasure_and_in_the_resurrection_guard(conn, keys: Keys) -> None:
    policy = _litigation_until(conn)
    expired = THREE_YEARS_BEFORE - timedelta(days=400)
    open_ended = _contact(conn, "open.ended@example.example", None, expired)
    ended = _contact(conn, "case.closed@example.example", "2020-01-01", expired)

    # the sweep: the open-ended case is a held candidate and stays; the closed one goes
    rule = policy.rule("prospects_never_converted")
    found = candidates(conn, policy, rule.name)
    assert found[open_ended] == ["litigation"] and found[ended] == []
    sweep.apply_rule(conn, policy, rule, keys, SWEEP, AS_OF)
    assert _exists(conn, open_ended) and not _exists(conn, ended)

    # erasure: the same hold refuses the request (on_erasure: refuse), nothing is deleted
    result = _erase(conn, policy, keys, "open.ended@example.example", "REQ-NULL-1")
    assert (result.outcome, result.reason) == ("refused", "legal hold: litigation")
    assert _exists(conn, open_ended)

    # the resurrection guard: a person erased while no case was open comes back with an open-ended
    # case: the same hold keeps them (quarantined, not erased), and the guard says which hold
    first = _contact(conn, "phoenix@example.example", "2020-01-01", date(2024, 1, 1))
    assert _erase(conn, policy, keys, "phoenix@example.example", "REQ-NULL-2").outcome == "erased"
    again = _contact(conn, "phoenix@example.example", None, date(2026, 6, 10))
    guarded = optout.guard(conn, policy, keys, GUARD, AS_OF)
    assert (guarded["found"], guarded["held"], guarded["erased"], guarded["quarantined"]) == (1, 1, 0, 1)
    assert not _exists(conn, first) and _exists(conn, again)
    reason = conn.execute("SELECT reason FROM gdpr.quarantine WHERE subject_id = %s", (str(again),)).fetchone()
    conn.rollback()
    assert reason == ("resurrection; legal hold: litigation",)


def test_the_three_paths_evaluate_the_same_expression(conn, keys: Keys) -> None:
    """Row by row over every seeded subject: the names the sweep sees for a rule are the guard's names
    (all holds) restricted to the holds blocking that rule, and erasure's holds for a subject are the
    guard's names for it."""
    policy = _litigation_until(conn)
    conn.execute("UPDATE crm.contacts SET litigation_until = CASE WHEN contact_id % 3 = 0 THEN NULL"
                 " WHEN contact_id % 3 = 1 THEN date '2020-01-01' ELSE date '2030-01-01' END")
    conn.commit()
    rule = policy.rule("prospects_never_converted")
    rows = conn.execute(
        sql.SQL("SELECT s.contact_id, {every}, {blocking} FROM crm.contacts s ORDER BY 1").format(
            every=engine_candidates.holds_array(policy.holds),
            blocking=engine_candidates.holds_expression(policy, rule)),
        {"as_of": AS_OF},
    ).fetchall()
    conn.rollback()
    blocking = {h.name for h in policy.holds if rule.action in h.blocks}
    assert {n for _, every, _ in rows for n in every} == {h.name for h in policy.holds}
    for cid, every, for_rule in rows:
        assert for_rule == [n for n in every if n in blocking], cid
    for cid, every, _ in rows[:60]:
        located = erasure.Located(subject_ids=[cid], subject_hash="h", email=None)
        assert sorted(erasure.holds_in_force(conn, policy, located, AS_OF)) == sorted(every), cid


def test_the_package_builds_the_hold_check_in_one_place() -> None:
    """`(predicate) IS NOT FALSE` is written once, in candidates.holds_array."""
    package = ROOT / "plugins" / "warehouse_gdpr"
    places = [f"{p.relative_to(package)}:{n}" for p in sorted(package.rglob("*.py"))
              for n, line in enumerate(p.read_text().splitlines(), 1) if "IS NOT FALSE THEN" in line]
    assert len(places) == 1 and places[0].startswith("engine/candidates.py:"), places
