"""gdpr_subject_rectification (issue 14, GDPR art. 16) under dag.test(): the real warehouse, the demo's real
downstream services (emailing and telephony over HTTP on 127.0.0.1, the support desk as a SQL database), and
gdpr_propagation_retry for a target that was down."""

from __future__ import annotations

import json
import logging
import re
from datetime import date, datetime, timezone
from pathlib import Path

import psycopg
import pytest

from warehouse_gdpr.engine import requests
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr_demo.services import start_telephony

ROOT = Path(__file__).resolve().parents[2]
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
NEW_PHONE = "+33 1 98 76 54 32"
CLI = RunContext("warehouse-gdpr", "cli__test", "request_new")


def _dag(dag_id: str):  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag(dag_id)


def _run(dag_id: str, conf: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    caplog.clear()
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        dag_run = _dag(dag_id).test(run_after=RUN_AFTER, logical_date=RUN_AFTER, run_conf=conf)
    out, err = capfd.readouterr()
    return dag_run, out + err + caplog.text


def _states(dag_run) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def _stored(dag_run) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """What Airflow's metadata database keeps of the run: its conf, and every XCom."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        conf = session.query(DagRun.conf).filter(DagRun.id == dag_run.id).scalar()
        xcoms = [r[0] for r in session.query(XComModel.value).filter(XComModel.dag_run_id == dag_run.id).all()]
    return json.dumps(conf), " ".join(str(x) for x in xcoms)


def _person(url: str) -> tuple[int, str, str]:
    """A seeded prospect with a phone number: (id, email, phone)."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT contact_id, email, direct_phone FROM crm.contacts WHERE status = 'prospect'"
                           " AND direct_phone IS NOT NULL ORDER BY contact_id LIMIT 1").fetchone()
    assert row is not None
    return row  # type: ignore[return-value]


def _one(url: str, query: str, *params: object) -> tuple:
    with psycopg.connect(url) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return tuple(row)


def _checksum(url: str) -> tuple:
    with psycopg.connect(url) as conn:
        return (conn.execute("SELECT md5(string_agg(c::text, '' ORDER BY contact_id)) FROM crm.contacts c").fetchone(),
                conn.execute("SELECT count(*) FROM gdpr.request").fetchone(),
                conn.execute("SELECT count(*) FROM gdpr.erasure_propagation").fetchone())


def test_a_rectified_phone_is_changed_in_the_warehouse_and_at_each_target_that_holds_it(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path, keys: Keys,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    contact_id, email, old_phone = _person(airflow_conns)
    downstream.add_person(email)

    dag_run, logs = _run("gdpr_subject_rectification",
                         {"email": email, "request_id": "REQ-RECT-1", "changes": {"direct_phone": NEW_PHONE}},
                         caplog, capfd)

    assert str(dag_run.state) == "success", logs[-4000:]
    assert _states(dag_run)["verify"] == "success"
    phone = _one(airflow_conns, "SELECT direct_phone FROM crm.contacts WHERE contact_id = %s", contact_id)[0]
    assert phone == NEW_PHONE
    assert downstream.emailing.contact(email)["attributes"]["SMS"] == NEW_PHONE
    assert downstream.telephony.contact(email)["phone"] == NEW_PHONE
    assert downstream.desk_rows(email) == 1  # the desk holds no phone: not told, untouched
    with psycopg.connect(airflow_conns) as conn:
        kind, status, outcome = conn.execute("SELECT kind, status, outcome FROM gdpr.request").fetchone()  # type: ignore[misc]
        rectified = conn.execute("SELECT table_name, row_count, details->>'column' FROM gdpr.audit_log"
                                 " WHERE action = 'rectify' AND outcome = 'done'").fetchall()
        record = conn.execute("SELECT details FROM gdpr.audit_log WHERE action = 'request_record'").fetchone()[0]  # type: ignore[index]
        audit_text = conn.execute("SELECT string_agg(a::text, ' ') FROM gdpr.audit_log a").fetchone()[0]  # type: ignore[index]
        outbox = conn.execute("SELECT target, status, identifier_ciphertext IS NULL FROM gdpr.erasure_propagation"
                              " ORDER BY 1").fetchall()
    assert (kind, status, outcome) == ("rectification", "completed", "rectified")
    assert rectified == [("crm.contacts", 1, "direct_phone")]  # the column and the count, never a value
    assert record["columns"] == ["direct_phone"] and [t["target"] for t in record["targets"]] == [
        "emailing", "telephony"]
    assert outbox == [("emailing", "acknowledged", True), ("telephony", "acknowledged", True)]
    # every effect visible in `warehouse-gdpr requests --json`
    with psycopg.connect(airflow_conns) as conn:
        (listed,) = requests.listing(conn, date(2026, 6, 15))
    assert (listed["kind"], listed["status"], listed["targets"]) == (
        "rectification", "completed", {"emailing": "acknowledged", "telephony": "acknowledged"})
    _, xcoms = _stored(dag_run)
    for where, text in (("logs", logs), ("audit", audit_text), ("XComs", xcoms)):
        for value in (NEW_PHONE, old_phone, "98 76 54 32"):
            assert value not in text, where
        assert email not in text.lower(), where


def test_a_registered_rectification_runs_from_its_id_alone_and_a_down_target_is_completed_by_the_retry_dag(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path, keys: Keys,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    contact_id, email, _ = _person(airflow_conns)
    downstream.add_person(email)
    new_email = f"renamed.{contact_id}@corrected.example"
    with psycopg.connect(airflow_conns) as conn:
        requests.register(conn, keys, CLI, kind="rectification", request_id="REQ-RECT-REG", identifier=email,
                          received_at=date(2026, 6, 10), today=date(2026, 6, 15), changes={"email": new_email})
    port, snapshot = downstream.telephony.port, downstream.telephony.contacts_snapshot()
    downstream.telephony.stop()

    dag_run, logs = _run("gdpr_subject_rectification", {"request_id": "REQ-RECT-REG"}, caplog, capfd)

    assert str(dag_run.state) == "failed"  # the telephony tool is down: its correction stays pending
    assert "1 target(s) have not acknowledged: telephony" in logs
    assert _one(airflow_conns, "SELECT email FROM crm.contacts WHERE contact_id = %s", contact_id)[0] == new_email
    assert downstream.emailing.has_contact(new_email) and downstream.desk_rows(new_email) == 1
    assert _one(airflow_conns, "SELECT status FROM gdpr.request")[0] == "pending_propagation"
    stored = " ".join(_stored(dag_run))  # the conf holds the request id alone

    downstream.telephony = start_telephony("test-token", port=port, contacts=snapshot)
    retry, retry_logs = _run("gdpr_propagation_retry", {}, caplog, capfd)

    assert str(retry.state) == "success", retry_logs[-4000:]
    assert downstream.telephony.has_contact(new_email) and not downstream.telephony.has_contact(email)
    status, held = _one(airflow_conns, "SELECT status, identifier_ciphertext IS NOT NULL FROM gdpr.request")
    assert (status, held) == ("completed", False)  # the encrypted identifier and changes are destroyed
    assert _one(airflow_conns, "SELECT count(*) FROM gdpr.erasure_propagation WHERE identifier_ciphertext IS NOT NULL"
                )[0] == 0
    for text in (logs, retry_logs, stored):
        assert email not in text.lower() and new_email not in text.lower()
        assert not re.search(r"[\w.+-]+@[\w-]+\.example", text)


def test_a_corrected_email_on_the_suppression_list_reaches_the_journal_outside_when_the_task_commits(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path, keys: Keys,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """The suppression entry a rectification adds under the new email's hash is copied to the journal outside the
    warehouse by the task that commits it (issue 15), not only by whichever DAG runs next: a restore before then
    would otherwise lose it."""
    contact_id, email, _ = _person(airflow_conns)
    downstream.add_person(email)
    new_email = f"renamed.{contact_id}@corrected.example"
    with psycopg.connect(airflow_conns) as conn:
        conn.execute("INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source) VALUES (%s, %s,"
                     " 'opt_out', 'newsletter')", (keys.subject_hash(email), keys.hmac_key_id))
        conn.commit()
        requests.register(conn, keys, CLI, kind="rectification", request_id="REQ-RECT-JRN", identifier=email,
                          received_at=date(2026, 6, 10), today=date(2026, 6, 15), changes={"email": new_email})
        chain_id = conn.execute("SELECT chain_id::text FROM gdpr.audit_chain_head").fetchone()[0]  # type: ignore[index]

    dag_run, logs = _run("gdpr_subject_rectification", {"request_id": "REQ-RECT-JRN"}, caplog, capfd)

    assert _states(dag_run)["rectify"] == "success", logs[-3000:]
    lines = [json.loads(line) for p in sorted((airflow_home / "gdpr_evidence" / "journal" / chain_id).glob("*.jsonl"))
             for line in p.read_text().splitlines()]
    assert ("suppression", keys.subject_hash(new_email), "rectification") in {
        (e["kind"], e["subject_hash"], e["details"]["source"]) for e in lines}


@pytest.mark.parametrize(("conf", "message"), [
    ({"changes": {"status": "client"}}, "names column(s) the policy does not let a person rectify: `status`"),
    ({"changes": {"direct_phone": "call me maybe"}}, "`changes.direct_phone` does not match the policy's pattern"),
    ({"changes": {"direct_phone": NEW_PHONE}, "chnages": {}}, "unknown param(s) `chnages`"),
    ({}, "`changes` must be an object of column -> new value"),
])
def test_a_refused_change_fails_the_first_task_and_changes_nothing(
    airflow_home: Path, airflow_conns: str, conf: dict, message: str,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _, email, _ = _person(airflow_conns)
    before = _checksum(airflow_conns)

    dag_run, logs = _run("gdpr_subject_rectification", {"email": email, "request_id": "REQ-RECT-BAD", **conf},
                         caplog, capfd)

    assert str(dag_run.state) == "failed"
    states = _states(dag_run)
    assert states["validate_request"] == "failed" and states["rectify"] == "upstream_failed"
    assert message in logs
    assert "call me maybe" not in logs and email not in logs
    assert _checksum(airflow_conns) == before


def test_the_rectification_params_have_titles_and_the_retry_dag_keeps_its_former_id(airflow_home: Path) -> None:
    dag = _dag("gdpr_subject_rectification")
    for name in ("email", "subject_id", "request_id", "received_at", "changes", "dry_run"):
        assert dag.params.get_param(name).schema.get("title"), name
    assert "pattern" not in json.dumps(dag.params.dump())
    old, new = _dag("gdpr_erasure_retry"), _dag("gdpr_propagation_retry")
    assert [t.task_id for t in old.tasks] == [t.task_id for t in new.tasks]
    assert old.is_paused_upon_creation is True and "deprecated" in old.tags


def test_an_overdue_rectification_with_a_target_pending_fails_the_retry_run(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path, keys: Keys, policy,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """gdpr_propagation_retry watches every kind's deadline, not only erasures'."""
    from datetime import timedelta

    from warehouse_gdpr.engine import rectification

    _, email, _ = _person(airflow_conns)
    downstream.add_person(email)
    received = date.today() - timedelta(days=40)
    with psycopg.connect(airflow_conns) as conn:
        request = rectification.parse_request({"email": email, "request_id": "REQ-RECT-LATE", "received_at":
                                               received.isoformat(), "changes": {"direct_phone": NEW_PHONE}},
                                              policy)
        rectification.apply(conn, policy, keys, CLI, request, rectification.locate(conn, policy, keys, request))
    downstream.telephony.stop()  # the emailing tool takes it; the telephony tool stays pending

    dag_run, logs = _run("gdpr_propagation_retry", {}, caplog, capfd)

    assert str(dag_run.state) == "failed"
    assert "1 request(s) past their due date and not answered: request REQ-RECT-LATE: target(s) telephony" \
        in logs
    assert "Rectification request REQ-RECT-LATE is OVERDUE" in logs
    assert downstream.emailing.contact(email)["attributes"]["SMS"] == NEW_PHONE
    assert NEW_PHONE not in logs and email not in logs
