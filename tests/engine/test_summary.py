"""engine/summary.py, what the GDPR page shows: open requests with their targets and DAG run, the last
sweeps per rule, the backlog now, the archive, the suppression list, rows per week; never personal data."""

from __future__ import annotations

import dataclasses
import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from helpers import AS_OF, AS_OF_DATE, schema_before_v8
from warehouse_gdpr.engine import audit, auditchain, requests, summary, sweep
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.policy import Policy, load_policy

ROOT = Path(__file__).resolve().parents[2]

NOW = datetime(2026, 6, 15, 9, 0, tzinfo=timezone.utc)  # the template's today


def _register(conn: psycopg.Connection, keys: Keys, request_id: str, kind: str, received: date,
              email: str) -> None:
    requests.register(conn, keys, RunContext("warehouse-gdpr", "cli__t", "request_new"), kind=kind,
                      request_id=request_id, identifier=email, received_at=received, today=AS_OF_DATE)


def _sweep(conn: psycopg.Connection, policy: Policy, keys: Keys, run_id: str, dry_run: bool = False) -> None:
    """The audit rows of a gdpr_retention_sweep run, written by the engine as the DAG's tasks write them."""
    ctx = RunContext("gdpr_retention_sweep", run_id, "plan", dry_run)
    plans = sweep.plan(conn, policy, list(policy.rules), AS_OF)
    with conn.transaction():
        audit.record(conn, RunContext("gdpr_retention_sweep", run_id, "check_policy", dry_run), action="check_policy",
                     outcome="ok")
        for p in plans:
            audit.record(conn, ctx, action="plan", outcome="ok", rule=p.rule, row_count=p.candidates - p.held,
                         details={"candidates": p.candidates, "held": p.held, "by_hold": p.by_hold})
    if not dry_run:
        apply = RunContext("gdpr_retention_sweep", run_id, "apply")
        for rule in policy.rules:
            sweep.apply_rule(conn, policy, rule, keys, apply, AS_OF, batch_size=200)
    with conn.transaction():
        audit.record(conn, RunContext("gdpr_retention_sweep", run_id, "report", dry_run), action="report",
                     outcome="ok")


def _seeded_personal_values(conn: psycopg.Connection) -> list[str]:
    values: list[str] = []
    for email, first, last in conn.execute("SELECT email, first_name, last_name FROM crm.contacts").fetchall():
        values += [email, f"{first} {last}"]
    conn.rollback()
    return values


def test_open_requests_with_targets_attempts_and_the_dag_run(conn: psycopg.Connection, keys: Keys) -> None:
    _register(conn, keys, "REQ-OPEN-1", "access", AS_OF_DATE - timedelta(days=5), "open.person@example.org")
    _register(conn, keys, "REQ-LATE-1", "erasure", AS_OF_DATE - timedelta(days=40), "late.person@example.org")
    _register(conn, keys, "REQ-DONE-1", "erasure", AS_OF_DATE - timedelta(days=3), "done.person@example.org")
    with conn.transaction():
        conn.execute("UPDATE gdpr.request SET status = 'completed', outcome = 'erased', completed_at = now()"
                     " WHERE request_id = 'REQ-DONE-1'")
        conn.execute("UPDATE gdpr.request SET status = 'pending_propagation', outcome = 'erased'"
                     " WHERE request_id = 'REQ-LATE-1'")
        conn.execute("INSERT INTO gdpr.erasure_propagation (request_id, target, status, attempts) VALUES"
                     " ('REQ-LATE-1', 'emailing', 'acknowledged', 1), ('REQ-LATE-1', 'telephony', 'pending', 4)")
        # The DAG run that last worked on it, and an older one: the newest wins.
        for run_id in ("manual__older", "scheduled__2026-06-15T08:00:00+00:00"):
            audit.record(conn, RunContext("gdpr_erasure_retry", run_id, "retry_pending"), action="propagate",
                         outcome="failed", details={"request_id": "REQ-LATE-1", "target": "telephony"})
        # The CLI's rows name the request too, but are no DAG run.
        audit.record(conn, RunContext("warehouse-gdpr", "cli__x", "request_extend"), action="extend_request",
                     outcome="extended", details={"request_id": "REQ-OPEN-1"})

    rows = summary.open_requests(conn, AS_OF_DATE)

    assert [r["request_id"] for r in rows] == ["REQ-LATE-1", "REQ-OPEN-1"]  # by due date; completed left out
    late, open_ = rows
    assert (late["overdue"], late["days_left"], late["status"]) == (True, -9, "pending_propagation")
    assert late["targets"] == {"emailing": {"status": "acknowledged", "attempts": 1},
                               "telephony": {"status": "pending", "attempts": 4}}
    assert late["dag_run"] == {"dag_id": "gdpr_erasure_retry", "run_id": "scheduled__2026-06-15T08:00:00+00:00"}
    assert (open_["overdue"], open_["days_left"], open_["kind"], open_["targets"], open_["dag_run"]) == (
        False, 25, "access", {}, None)


def test_a_run_triggered_by_the_page_is_the_link_until_the_run_writes(conn: psycopg.Connection, keys: Keys) -> None:
    _register(conn, keys, "REQ-UI-1", "erasure", AS_OF_DATE, "ui.person@example.org")
    with conn.transaction():
        audit.record(conn, RunContext("warehouse-gdpr-ui", "ui__t", "trigger_request"), action="trigger_request",
                     outcome="queued", details={"request_id": "REQ-UI-1", "triggered_dag_id": "gdpr_subject_erasure",
                                                "triggered_run_id": "manual__2026-06-15T09:00:00+00:00"})
    assert summary.open_requests(conn, AS_OF_DATE)[0]["dag_run"] == {
        "dag_id": "gdpr_subject_erasure", "run_id": "manual__2026-06-15T09:00:00+00:00"}
    with conn.transaction():
        audit.record(conn, RunContext("gdpr_subject_erasure", "manual__2026-06-15T09:00:00+00:00", "validate_request"),
                     action="erase", outcome="dry_run", details={"request_id": "REQ-UI-1"})
    assert summary.open_requests(conn, AS_OF_DATE)[0]["dag_run"]["dag_id"] == "gdpr_subject_erasure"


def test_last_sweeps_per_rule_from_the_audit_log(conn: psycopg.Connection, policy: Policy, keys: Keys) -> None:
    plans = {p.rule: p for p in sweep.plan(conn, policy, list(policy.rules), AS_OF)}
    subjects = conn.execute("SELECT count(*) FROM crm.contacts").fetchone()[0]  # type: ignore[index]
    conn.rollback()
    _sweep(conn, policy, keys, "scheduled__first")
    _sweep(conn, policy, keys, "manual__dry", dry_run=True)  # a dry run is no sweep of the page

    runs = summary.last_sweeps(conn)

    assert [r["run_id"] for r in runs] == ["scheduled__first"]
    rules = {r["rule"]: r for r in runs[0]["rules"]}
    assert set(rules) == {r.name for r in policy.rules}
    for name, plan in plans.items():
        r = rules[name]
        treated = plan.candidates - plan.held
        assert (r["deleted"] if plan.action == "delete" else r["pseudonymised"]) == treated, name
        assert r["held"] == plan.held and r["held_by_hold"] == plan.by_hold, name
        assert r["action"] == (plan.action if treated else None), name
    gone = subjects - conn.execute("SELECT count(*) FROM crm.contacts").fetchone()[0]  # type: ignore[index]
    assert sum(r["deleted"] for r in rules.values()) == gone
    archived = conn.execute("SELECT count(*) FROM gdpr_archive.archived_row").fetchone()[0]  # type: ignore[index]
    assert archived > 0 and sum(r["archived"] for r in rules.values()) == archived
    assert any(r["held"] for r in rules.values())  # the template has held subjects (litigation, contracts)
    assert runs[0]["seconds"] >= 0 and all(r["seconds"] >= 0 for r in rules.values())


def test_backlog_is_the_sweeps_plan_and_a_failure_is_reported(conn: psycopg.Connection, policy: Policy) -> None:
    got = summary.backlog(conn, policy, NOW)
    plans = sweep.plan(conn, policy, list(policy.rules), NOW.isoformat())
    assert got["error"] is None
    assert got["rules"] == [{"rule": p.rule, "action": p.action, "candidates": p.candidates, "held": p.held,
                             "held_by_hold": p.by_hold, "to_process": p.candidates - p.held} for p in plans]
    assert any(r["to_process"] for r in got["rules"])
    # The session is as it was: writable, no statement timeout left behind.
    assert conn.read_only is None or conn.read_only is False
    assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"  # type: ignore[index]
    conn.rollback()

    broken = policy.model_copy(update={"holds": [policy.holds[0].model_copy(update={"predicate": "s.no_such_column"})]})
    failed = summary.backlog(conn, broken, NOW)
    assert failed["rules"] == [] and "no_such_column" in failed["error"] and "SQLSTATE 42703" in failed["error"]


def test_archive_suppression_and_rows_per_week(conn: psycopg.Connection, policy: Policy, keys: Keys) -> None:
    assert summary.archive(conn) == {"rows": 0, "by_table": {}, "next_purge": None}
    _sweep(conn, policy, keys, "scheduled__first")
    _sweep(conn, policy, keys, "manual__dry", dry_run=True)
    with conn.transaction():
        conn.execute("INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source) VALUES"
                     " (repeat('a', 64), 'k', 'opt_out', 't'), (repeat('b', 64), 'k', 'opt_out', 't'),"
                     " (repeat('c', 64), 'k', 'erasure', 't')")
    archived = conn.execute("SELECT source_table, count(*), min(purge_after)::date FROM gdpr_archive.archived_row"
                            " GROUP BY 1").fetchall()
    conn.rollback()

    got = summary.archive(conn)
    assert got["rows"] == sum(n for _, n, _ in archived)
    assert got["by_table"] == {t: {"rows": n, "next_purge": d.isoformat()} for t, n, d in archived}
    assert got["next_purge"] == min(d for _, _, d in archived).isoformat()
    assert summary.suppression(conn) == {"entries": 3, "by_reason": {"erasure": 1, "opt_out": 2}}

    today = date.today()  # the audit rows were logged now
    weekly = summary.weekly(conn, today)
    assert len(weekly["weeks"]) == summary.CHART_WEEKS + 1
    assert weekly["weeks"][-1] == summary.week_start(today).isoformat()
    changed = dict(conn.execute(
        "SELECT action, sum(row_count) FROM gdpr.audit_log WHERE action = ANY(%s) AND NOT dry_run GROUP BY 1",
        (list(summary.CHART_ACTIONS),)).fetchall())
    conn.rollback()
    assert {a: weekly["actions"][a][-1] for a in changed} == changed  # this week; the dry run counts nothing
    assert all(n == 0 for a in summary.CHART_ACTIONS for n in weekly["actions"][a][:-1])


def test_summary_holds_no_personal_data(conn: psycopg.Connection, policy: Policy, keys: Keys) -> None:
    _register(conn, keys, "REQ-PII-1", "erasure", AS_OF_DATE - timedelta(days=40), "pii.person@example.org")
    _sweep(conn, policy, keys, "scheduled__first")
    personal = _seeded_personal_values(conn)
    hashes = [h for (h,) in conn.execute("SELECT subject_hash FROM gdpr.request").fetchall()]
    conn.rollback()

    text = json.dumps(summary.summary(conn, policy, NOW))

    assert "REQ-PII-1" in text
    leaked = [v for v in personal + hashes + ["pii.person@example.org"] if v.lower() in text.lower()]
    assert leaked == []


@pytest.mark.parametrize("day", [date(2026, 6, 15), date(2026, 6, 21), date(2026, 6, 22)])
def test_week_start_is_monday(day: date) -> None:
    assert summary.week_start(day).weekday() == 0 and 0 <= (day - summary.week_start(day)).days < 7


def test_the_backlog_is_bounded_in_time(conn: psycopg.Connection, policy: Policy,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan slower than BACKLOG_TIMEOUT_MS is cancelled by the server and reported; the page still renders."""
    monkeypatch.setattr(summary, "BACKLOG_TIMEOUT_MS", 50)
    slow = policy.model_copy(update={"holds": [policy.holds[0].model_copy(
        update={"predicate": "(SELECT count(*) FROM pg_sleep(0.01 + 0 * s.contact_id)) = 0"})]})
    got = summary.backlog(conn, slow, NOW)
    assert got["rules"] == [] and "SQLSTATE 57014" in got["error"], got
    assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"  # type: ignore[index]


# -- the audit chain ---------------------------------------------------------------------------------


def _write(conn: psycopg.Connection, n: int) -> None:
    with conn.transaction():
        for i in range(n):
            audit.record(conn, RunContext("gdpr_retention_sweep", "manual__chain", "apply"), action="delete",
                         outcome="done", rule="r", table="crm.contacts", row_count=i)


def test_the_audit_chain_holds_from_the_last_exported_head(conn: psycopg.Connection, tmp_path: Path) -> None:
    store = auditchain.PathHeadStore(tmp_path)
    _write(conn, 3)
    whole = summary.audit_chain(conn, store.latest)  # no head exported yet: from the first row
    assert whole is not None and whole["status"] == "holds" and whole["exported"] is None
    assert whole["rows_checked"] == whole["position"] > 0 and "from its first row" in whole["description"]

    head = auditchain.read_head(conn)
    conn.rollback()
    store.save(dataclasses.replace(head, exported_at="2026-06-15T08:00:00+00:00",
                                   exported_by="gdpr_retention_sweep/scheduled__x"))
    _write(conn, 2)
    got = summary.audit_chain(conn, store.latest)
    assert got is not None
    # recomputed: the exported head's row (it must still be there, unchanged) and the two after it
    assert (got["status"], got["rows_checked"], got["position"]) == ("holds", 3, head.chain_seq + 2)
    assert got["exported"] == {"position": head.chain_seq, "at": "2026-06-15T08:00:00+00:00",
                               "by": "gdpr_retention_sweep/scheduled__x"}
    assert ("since the head exported 2026-06-15T08:00:00+00:00 by gdpr_retention_sweep/scheduled__x"
            in got["description"])

    bounded = summary.audit_chain(conn, store.latest, max_rows=1)  # more rows than the page recomputes
    assert bounded is not None and (bounded["status"], bounded["rows_checked"]) == ("not_checked", 0)


def test_a_broken_chain_an_unreadable_store_and_an_unchained_log(conn: psycopg.Connection) -> None:
    _write(conn, 4)
    second = conn.execute("SELECT audit_id FROM gdpr.audit_log ORDER BY chain_seq DESC LIMIT 1 OFFSET 2"
                          ).fetchone()[0]  # type: ignore[index]
    conn.rollback()
    with conn.transaction():
        conn.execute("ALTER TABLE gdpr.audit_log DISABLE TRIGGER audit_log_no_update_delete")
        conn.execute("UPDATE gdpr.audit_log SET row_count = 99 WHERE audit_id = %s", (second,))
        conn.execute("ALTER TABLE gdpr.audit_log ENABLE ALWAYS TRIGGER audit_log_no_update_delete")
    broken = summary.audit_chain(conn, lambda chain_id: None)
    assert broken is not None and broken["status"] == "broken"
    assert f"audit id {second}" in broken["broken"] and "edited" in broken["description"]

    def unreachable(chain_id: str) -> None:
        raise PermissionError(13, "Permission denied", "/evidence")

    down = summary.audit_chain(conn, unreachable)
    assert down is not None and down["status"] == "unavailable" and "PermissionError" in down["description"]

    schema_before_v8(conn)
    assert summary.audit_chain(conn, lambda chain_id: None) is None
    assert "audit_chain" in summary.summary(conn, load_policy(ROOT / "include" / "policy.yaml"), NOW)
