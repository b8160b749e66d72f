"""A request registered with `warehouse-gdpr request new`, run by gdpr_subject_erasure from its id alone: the
identifier is decrypted in memory by the tasks and never reaches the run's conf, an XCom or a log."""

from __future__ import annotations

import json
import logging
import re
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from warehouse_gdpr.engine import requests
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys

ROOT = Path(__file__).resolve().parents[2]
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
CTX = RunContext("warehouse-gdpr", "cli__test", "request_new")


def _dag():  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag("gdpr_subject_erasure")


def _run(conf: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO):
        dag_run = _dag().test(run_after=RUN_AFTER, logical_date=RUN_AFTER, run_conf=conf)
    out, err = capfd.readouterr()
    return dag_run, out + err + caplog.text


def _stored(dag_run) -> str:  # type: ignore[no-untyped-def]
    """What Airflow's metadata database keeps of the run: its conf and every XCom."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        conf = session.query(DagRun.conf).filter(DagRun.id == dag_run.id).scalar()
        xcoms = [r[0] for r in session.query(XComModel.value).filter(XComModel.dag_run_id == dag_run.id).all()]
    assert xcoms, "the run's XComs were found"
    return json.dumps(conf) + " ".join(str(x) for x in xcoms)


def _erasable_person(url: str) -> tuple[int, str]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT contact_id, email FROM crm.contacts c WHERE status = 'prospect' AND NOT litigation_hold"
            " AND NOT EXISTS (SELECT 1 FROM crm.invoices i WHERE i.contact_id = c.contact_id)"
            " AND NOT EXISTS (SELECT 1 FROM crm.contracts x WHERE x.contact_id = c.contact_id)"
            " ORDER BY contact_id LIMIT 1"
        ).fetchone()
    assert row is not None
    return row  # type: ignore[return-value]


def _register(url: str, keys: Keys, request_id: str, identifier: str, kind: str = "erasure") -> None:
    with psycopg.connect(url) as conn:
        requests.register(conn, keys, CTX, kind=kind, request_id=request_id, identifier=identifier,
                          received_at=date(2026, 6, 1), today=date(2026, 6, 15))


def _state(url: str) -> tuple[object, ...]:
    with psycopg.connect(url) as conn:
        return (conn.execute("SELECT * FROM gdpr.request ORDER BY request_id").fetchall(),
                conn.execute("SELECT count(*) FROM crm.contacts").fetchone()[0],  # type: ignore[index]
                conn.execute("SELECT count(*) FROM gdpr.audit_log WHERE dag_id = 'gdpr_subject_erasure'").fetchone()[0],  # type: ignore[index]
                conn.execute("SELECT count(*) FROM gdpr.suppression_list").fetchone()[0])  # type: ignore[index]


def test_a_registered_request_runs_from_its_id_alone(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path, keys: Keys,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    contact_id, email = _erasable_person(airflow_conns)
    downstream.add_person(email)
    _register(airflow_conns, keys, "REQ-REG-1", f"  {email.upper()} ")

    dry_run, logs = _run({"request_id": "REQ-REG-1", "dry_run": True}, caplog, capfd)
    assert str(dry_run.state) == "success", logs[-4000:]
    stored = _stored(dry_run)  # before the next run of the same logical date replaces it
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT status, identifier_ciphertext IS NOT NULL FROM gdpr.request").fetchone() == (
            "registered", True)
        assert conn.execute("SELECT count(*) FROM crm.contacts WHERE contact_id = %s", (contact_id,)).fetchone()[0] == 1  # type: ignore[index]

    dag_run, run_logs = _run({"request_id": "REQ-REG-1"}, caplog, capfd)

    assert str(dag_run.state) == "success", run_logs[-4000:]
    assert not downstream.emailing.has_contact(email) and not downstream.telephony.has_contact(email)
    assert downstream.desk_rows(email) == 0
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM crm.contacts WHERE contact_id = %s", (contact_id,)).fetchone()[0] == 0  # type: ignore[index]
        row = conn.execute(
            "SELECT kind, status, outcome, received_at, due_date, subject_hash, key_id, identifier_ciphertext"
            " FROM gdpr.request WHERE request_id = 'REQ-REG-1'").fetchone()
        certificate = conn.execute("SELECT details FROM gdpr.audit_log WHERE action = 'certificate'").fetchone()[0]  # type: ignore[index]
        destroyed = conn.execute("SELECT count(*) FROM gdpr.audit_log WHERE action = 'destroy_identifier'"
                                 " AND table_name = 'gdpr.request'").fetchone()[0]  # type: ignore[index]
        audit_text = conn.execute("SELECT string_agg(a::text, ' ') FROM gdpr.audit_log a").fetchone()[0]  # type: ignore[index]
    assert row == ("erasure", "completed", "erased", date(2026, 6, 1), date(2026, 7, 1), keys.subject_hash(email),
                   None, None)
    assert certificate["received_at"] == "2026-06-01" and len(certificate["targets"]) == 3
    assert destroyed == 1
    stored += _stored(dag_run)
    for where, text in (("logs", logs + run_logs), ("conf and XComs", stored), ("audit", audit_text)):
        assert email.lower() not in text.lower(), where
        assert not re.search(r"[\w.+-]+@[\w-]+\.example", text), where


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"request_id": "REQ-REG-NONE"}, "no request REQ-REG-NONE is registered: register it first"),
        ({"request_id": "REQ-REG-ACCESS"}, "request REQ-REG-ACCESS is of kind access, not erasure"),
        ({"request_id": "REQ-REG-1", "subject_id": 3},
         'request REQ-REG-1 is registered with its identifier: trigger it with {"request_id": "REQ-REG-1"} alone'),
        ({"request_id": "REQ-REG-1", "received_at": "2026-06-02"},
         "request REQ-REG-1 was registered as received on 2026-06-01: leave `received_at` empty"),
        # a typo in a param's name is named as such, before any look-up of the request id
        ({"request_id": "REQ-REG-NEW", "emial": "jane.doe@acme.example"},
         "unknown param(s) `emial`: this DAG takes only `email`, `subject_id`"),
        ({"request_id": "REQ-REG-1", "dyr_run": True}, "unknown param(s) `dyr_run`"),
    ],
)
def test_a_wrong_request_id_fails_clearly_and_changes_nothing(
    airflow_home: Path, airflow_conns: str, keys: Keys, conf: dict, message: str,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _, email = _erasable_person(airflow_conns)
    _register(airflow_conns, keys, "REQ-REG-1", email)
    _register(airflow_conns, keys, "REQ-REG-ACCESS", email, kind="access")
    before = _state(airflow_conns)

    dag_run, logs = _run(conf, caplog, capfd)

    assert str(dag_run.state) == "failed"
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert states["validate_request"] == "failed" and states["erase"] == "upstream_failed"
    assert message in logs
    assert email not in logs and "jane.doe" not in logs
    assert _state(airflow_conns) == before


def test_an_extended_request_runs_with_its_extended_due_date(
    airflow_home: Path, airflow_conns: str, keys: Keys, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Registered 40 days ago and extended within its first month (art. 12(3)): past its first due date but
    not overdue. The run says so, and records and reports the extended due date."""
    _, email = _erasable_person(airflow_conns)
    today = date.today()  # the DAG's today (erasure.parse_request bounds received_at with the real date)
    received = today - timedelta(days=40)
    with psycopg.connect(airflow_conns) as conn:
        requests.register(conn, keys, CTX, kind="erasure", request_id="REQ-REG-EXT", identifier=email,
                          received_at=received, today=received)
        extended = requests.extend(conn, CTX, "REQ-REG-EXT", "twelve systems to search",
                                   today=received + timedelta(days=5))
    assert date.fromisoformat(extended["due_date"]) < today < date.fromisoformat(extended["extended_due_date"])

    dag_run, logs = _run({"request_id": "REQ-REG-EXT", "dry_run": True}, caplog, capfd)

    assert str(dag_run.state) == "success", logs[-4000:]
    assert "already past its due date" not in logs and "overdue" not in logs.lower(), logs[-4000:]
    assert f"due {extended['extended_due_date']}" in logs
    stored = _stored(dag_run)
    assert f'"due_date": "{extended["extended_due_date"]}"' in stored or \
        f"'due_date': '{extended['extended_due_date']}'" in stored
    assert extended["due_date"] not in stored
