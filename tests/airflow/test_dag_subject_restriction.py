"""gdpr_subject_restriction (issue 14, GDPR art. 18) under dag.test(): the real warehouse, the demo's downstream
services over HTTP on 127.0.0.1 and the sales team's webhook; the retention sweep's plan and report show the
built-in hold."""

from __future__ import annotations

import json
import logging
import re
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from helpers import THREE_YEARS_BEFORE, add_contact
from warehouse_gdpr.engine import requests
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys

ROOT = Path(__file__).resolve().parents[2]
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
CLI = RunContext("warehouse-gdpr", "cli__test", "request_new")


def _dag(dag_id: str):  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag(dag_id)


def _run(dag_id: str, conf: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
         run_after: datetime = RUN_AFTER):
    caplog.clear()
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        dag_run = _dag(dag_id).test(run_after=run_after, logical_date=run_after, run_conf=conf)
    out, err = capfd.readouterr()
    return dag_run, out + err + caplog.text


def _xcoms(dag_run) -> str:  # type: ignore[no-untyped-def]
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        return " ".join(str(r[0]) for r in session.query(XComModel.value).filter(
            XComModel.dag_run_id == dag_run.id).all())


def _prospect(url: str) -> tuple[int, str]:
    """A prospect past its retention date: the next sweep would delete it."""
    with psycopg.connect(url) as conn:
        cid = add_contact(conn, "prospect", THREE_YEARS_BEFORE - timedelta(days=100))
        email = conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0]  # type: ignore[index]
    return cid, email


def test_restrict_then_lift_on_the_demo_services_and_the_sweep_shows_the_hold(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path, keys: Keys,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    cid, email = _prospect(airflow_conns)
    downstream.add_person(email)
    with psycopg.connect(airflow_conns) as conn:
        requests.register(conn, keys, CLI, kind="restriction", request_id="REQ-RESTRICT-1", identifier=email,
                          received_at=date(2026, 6, 12), today=date(2026, 6, 15))

    restricted, logs = _run("gdpr_subject_restriction", {"request_id": "REQ-RESTRICT-1"}, caplog, capfd)

    assert str(restricted.state) == "success", logs[-4000:]
    assert downstream.emailing.contact(email)["emailBlacklisted"] is True
    assert downstream.telephony.contact(email)["restricted"] is True
    assert downstream.webhook.notifications() == [{"event": "restricted", "request_id": "REQ-RESTRICT-1",
                                                   "subject_table": "crm.contacts", "subject_ids": [str(cid)]}]
    with psycopg.connect(airflow_conns) as conn:
        listed = {r["request_id"]: r for r in requests.listing(conn, date(2026, 6, 15))}
        flag = conn.execute("SELECT do_not_contact FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0]  # type: ignore[index]
    assert (listed["REQ-RESTRICT-1"]["kind"], listed["REQ-RESTRICT-1"]["status"]) == ("restriction", "completed")
    assert listed["REQ-RESTRICT-1"]["targets"] == {"emailing": "acknowledged", "sales_team": "acknowledged",
                                                   "telephony": "acknowledged"}
    assert flag is True

    sweep, sweep_logs = _run("gdpr_retention_sweep", {"dry_run": True, "rules": ["prospects_never_converted"]},
                             caplog, capfd, run_after=RUN_AFTER + timedelta(minutes=1))
    assert str(sweep.state) == "success", sweep_logs[-4000:]
    assert re.search(r"prospects_never_converted\s+processing_restricted\s+1", sweep_logs)
    with psycopg.connect(airflow_conns) as conn:
        by_hold = conn.execute("SELECT details->'by_hold' FROM gdpr.audit_log WHERE action = 'plan'").fetchone()[0]  # type: ignore[index]
        report = conn.execute("SELECT details->'held' FROM gdpr.audit_log WHERE action = 'report'").fetchone()[0]  # type: ignore[index]
    assert by_hold["processing_restricted"] == 1
    assert report["prospects_never_converted"]["processing_restricted"] == 1

    lifted, lift_logs = _run("gdpr_subject_restriction", {"email": email, "request_id": "REQ-LIFT-1",
                                                          "action": "lift"}, caplog, capfd,
                             run_after=RUN_AFTER + timedelta(minutes=2))

    assert str(lifted.state) == "success", lift_logs[-4000:]
    assert downstream.emailing.contact(email)["emailBlacklisted"] is False
    assert downstream.telephony.contact(email)["restricted"] is False
    assert downstream.webhook.notifications()[-1]["event"] == "lifted"
    with psycopg.connect(airflow_conns) as conn:
        kind, status, outcome = conn.execute("SELECT kind, status, outcome FROM gdpr.request"
                                             " WHERE request_id = 'REQ-LIFT-1'").fetchone()  # type: ignore[misc]
        left = conn.execute("SELECT count(*) FROM gdpr.restriction").fetchone()[0]  # type: ignore[index]
        audit_text = conn.execute("SELECT string_agg(a::text, ' ') FROM gdpr.audit_log a").fetchone()[0]  # type: ignore[index]
    assert (kind, status, outcome, left) == ("restriction_lift", "completed", "lifted", 0)
    stored = _xcoms(restricted) + _xcoms(lifted)
    for text in (logs, lift_logs, sweep_logs, audit_text, stored):
        assert email not in text.lower()
    assert "@" not in json.dumps(downstream.webhook.notifications())


def test_a_notification_that_cannot_be_delivered_stays_pending_and_the_retry_dag_delivers_it(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _, email = _prospect(airflow_conns)
    downstream.webhook.fail_next(10)

    dag_run, logs = _run("gdpr_subject_restriction", {"email": email, "request_id": "REQ-RESTRICT-2"}, caplog, capfd)

    assert str(dag_run.state) == "failed"
    assert "1 target(s) have not acknowledged: sales_team" in logs
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM gdpr.restriction").fetchone()[0] == 1  # type: ignore[index]
    downstream.webhook.fail_next(0)
    retry, retry_logs = _run("gdpr_propagation_retry", {}, caplog, capfd, run_after=RUN_AFTER + timedelta(hours=1))
    assert str(retry.state) == "success", retry_logs[-4000:]
    assert [n["event"] for n in downstream.webhook.notifications()] == ["restricted"]
    with psycopg.connect(airflow_conns) as conn:
        status = conn.execute("SELECT status FROM gdpr.request WHERE request_id = 'REQ-RESTRICT-2'").fetchone()[0]  # type: ignore[index]
    assert status == "completed"


def test_a_wrong_request_fails_the_first_task_and_changes_nothing(
    airflow_home: Path, airflow_conns: str, keys: Keys,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _, email = _prospect(airflow_conns)
    with psycopg.connect(airflow_conns) as conn:
        requests.register(conn, keys, CLI, kind="restriction_lift", request_id="REQ-LIFT-REG", identifier=email,
                          received_at=date(2026, 6, 12), today=date(2026, 6, 15))
        before = conn.execute("SELECT count(*), max(audit_id) FROM gdpr.audit_log").fetchone()
    for minutes, conf, message in (
        (0, {"request_id": "REQ-LIFT-REG", "action": "restrict"}, "is of kind restriction_lift, not restriction"),
        (1, {"email": email, "request_id": "REQ-RS-X", "acton": "lift"}, "unknown param(s) `acton`"),
    ):
        dag_run, logs = _run("gdpr_subject_restriction", conf, caplog, capfd,
                             run_after=RUN_AFTER + timedelta(minutes=minutes))
        states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
        assert states["validate_request"] == "failed" and states["apply"] == "upstream_failed"
        assert message in logs and email not in logs
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*), max(audit_id) FROM gdpr.audit_log").fetchone() == before
        assert conn.execute("SELECT count(*) FROM gdpr.restriction").fetchone()[0] == 0  # type: ignore[index]
