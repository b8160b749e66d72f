"""gdpr_subject_access under dag.test(): real PostgreSQL, the demo's real downstream services on 127.0.0.1, the
package unpacked with the real `warehouse-gdpr access unpack`; and its purge by gdpr_retention_sweep."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from helpers import add_activity, add_contact, add_invoice, new_id
from warehouse_gdpr.airflow.storage import ObjectStoragePackages
from warehouse_gdpr.engine import access
from warehouse_gdpr.engine.crypto import Keys

ROOT = Path(__file__).resolve().parents[2]
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
CONFIRMED = {"confirm_blast_radius": {"prospects_never_converted": 346, "leads_not_converted": 222}}
CRM = {"crm.contacts": "contact_id", "crm.activities": "activity_id", "crm.notes": "note_id",
       "crm.contracts": "contract_id", "crm.invoices": "invoice_id", "crm.support_tickets": "ticket_id"}


@pytest.fixture
def access_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo policy with its packages under this test's folder, and fast retries."""
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    data["erasure"]["retries"] = 1
    data["erasure"]["retry_delay_seconds"] = 1
    data["access"]["location"] = str(tmp_path / "packages")
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(path))
    return path


def _dag(dag_id: str = "gdpr_subject_access"):  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag(dag_id)


def _run(conf: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
         dag_id: str = "gdpr_subject_access"):
    """(the DagRun, everything logged): a failed task does not raise."""
    caplog.clear()
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        dag_run = _dag(dag_id).test(run_after=RUN_AFTER, logical_date=RUN_AFTER, run_conf=conf)
    out, err = capfd.readouterr()
    return dag_run, out + err + caplog.text


def _states(dag_run) -> dict[str, str]:  # type: ignore[no-untyped-def]
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(TaskInstance.task_id, TaskInstance.state).where(
            TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id)).all()
    return {task_id: str(state) for task_id, state in rows}


def _xcoms(dag_run) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """{task_id: return value} and the run's conf, as Airflow's metadata database keeps them."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        conf = session.query(DagRun.conf).filter(DagRun.id == dag_run.id).scalar()
        rows = session.query(XComModel.task_id, XComModel.key, XComModel.value).filter(
            XComModel.dag_run_id == dag_run.id).all()
    out: dict[str, Any] = {"conf": conf}
    for task_id, key, value in rows:
        try:
            out[f"{task_id}/{key}"] = json.loads(value) if isinstance(value, (str, bytes)) else value
        except ValueError:
            out[f"{task_id}/{key}"] = value
    return out


def _person(url: str) -> tuple[int, str, str]:
    """A fresh client with rows in the mapped tables and a support ticket found by email only."""
    with psycopg.connect(url) as conn:
        cid = add_contact(conn, "client", date(2024, 1, 10))
        email = str(conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0])  # type: ignore[index]
        add_activity(conn, cid, "email_open", date(2026, 1, 1))
        add_invoice(conn, cid, date(2025, 3, 1))
        conn.execute("INSERT INTO crm.notes (note_id, contact_id, author, body, created_at) VALUES"
                     " (%s, %s, 'Claire Martin', 'Prefers calls on Tuesdays', now())", (new_id(), cid))
        conn.execute("INSERT INTO crm.support_tickets (ticket_id, contact_id, requester_email, subject, body,"
                     " created_at) VALUES (%s, NULL, %s, 'Login problem', 'I cannot log in since Monday', now())",
                     (new_id(), email.upper()))
    return cid, email, "Testperson"


def _unpack(request_id: str, out: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_extra, "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT / 'demo'}"}
    return subprocess.run([sys.executable, "-m", "warehouse_gdpr.cli", "access", "unpack", request_id, "--out",
                           str(out)], env=env, capture_output=True, text=True, timeout=120)


def _no_personal_data(text: str, email: str, where: str) -> None:
    assert email.lower() not in text.lower(), where
    assert "Testperson" not in text and "Prefers calls" not in text and "cannot log in" not in text, where
    assert not re.search(r"[\w.+-]+@[\w-]+\.example", text), where


def test_params_have_titles_and_descriptions_and_no_pattern_that_would_echo_a_value(airflow_home: Path) -> None:
    dag = _dag()
    assert {"gdpr", "access"} <= set(dag.tags)
    assert set(dag.params.keys()) == set(access.PARAMS)
    for name in access.PARAMS:
        param = dag.params.get_param(name)
        assert param.schema.get("title") and param.description, name
        assert not {"pattern", "format", "minLength", "maxLength"} & set(param.schema), name
    assert [t.task_id for t in dag.topological_sort()] == ["validate_request", "targets_to_ask", "preflight", "answer",
                                                           "verify_audit_chain", "audit_chain_failed"]


def test_an_access_request_is_answered_with_a_package_that_unpacks_to_what_is_held(
    airflow_home: Path, airflow_conns: str, downstream, access_policy: Path, keys: Keys, tmp_path: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    cid, email, _ = _person(airflow_conns)
    downstream.add_person(email)

    dag_run, logs = _run({"email": f"  {email.upper()}\n", "request_id": "ACC-DAG-1"}, caplog, capfd)

    assert str(dag_run.state) == "success", logs[-4000:]
    assert _states(dag_run) == {"validate_request": "success", "targets_to_ask": "success", "preflight": "success",
                                "answer": "success", "verify_audit_chain": "success", "audit_chain_failed": "skipped"}
    stored = _xcoms(dag_run)
    answer = stored["answer/return_value"]
    assert set(answer) == {"request_id", "kind", "outcome", "rows", "location", "sha256"}
    assert answer["location"] == f"file://{tmp_path / 'packages'}/ACC-DAG-1.wgdpr"
    package = (tmp_path / "packages" / "ACC-DAG-1.wgdpr").read_bytes()
    assert answer["sha256"] == __import__("hashlib").sha256(package).hexdigest()

    out = tmp_path / "unpacked"
    unpacked = _unpack("ACC-DAG-1", out, {"AIRFLOW_CONN_GDPR_KEYS": os.environ["AIRFLOW_CONN_GDPR_KEYS"]})
    assert unpacked.returncode == 0, unpacked.stderr
    assert email not in unpacked.stdout
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} >= {
        "report.pdf", "data.json", "manifest.json", "csv/crm.contacts.csv", "csv/downstream.emailing.csv"}
    assert oct(out.stat().st_mode & 0o777) == "0o700" and oct((out / "data.json").stat().st_mode & 0o777) == "0o600"
    document = json.loads((out / "data.json").read_text())
    with psycopg.connect(airflow_conns) as conn:  # counted independently
        for table, pk in CRM.items():
            query = f"SELECT {pk} FROM {table} WHERE contact_id = %s"  # fixed names only
            if table == "crm.support_tickets":
                query += " OR lower(btrim(requester_email)) = lower(%s)"
            expected = {r[0] for r in conn.execute(query, (cid, email) if "%s)" in query else (cid,)).fetchall()}
            held = next(t for t in document["warehouse"] if t["table"] == table)
            assert {r[pk] for r in held["rows"]} == expected, table
            assert answer["rows"][table] == len(expected)
        audit_text = conn.execute("SELECT string_agg(a::text, ' ') FROM gdpr.audit_log a").fetchone()[0]  # type: ignore[index]
    downstream_rows = {a["target"]: a for a in document["downstream"]}
    assert downstream_rows["emailing"]["answer"]["email"] == email.lower()
    assert downstream_rows["support_desk"]["status"] == "holds data"
    assert answer["rows"]["downstream:support_desk"] == downstream.desk_rows(email) + 1  # the ticket and its message
    xcoms = {k: v for k, v in stored.items() if k != "conf"}  # the conf holds the email given as a param
    for where, text in (("logs", logs), ("XComs", json.dumps(xcoms)), ("audit", audit_text)):
        _no_personal_data(text, email, where)


def test_a_portability_request_gives_json_and_csv_of_the_provided_columns_only(
    airflow_home: Path, airflow_conns: str, access_policy: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    cid, email, _ = _person(airflow_conns)

    dag_run, logs = _run({"subject_id": cid, "request_id": "PORT-DAG-1", "portability": True}, caplog, capfd)

    assert str(dag_run.state) == "success", logs[-4000:]
    assert _states(dag_run)["preflight"] == "skipped"  # nothing is asked of the downstream systems
    out = tmp_path / "unpacked"
    assert _unpack("PORT-DAG-1", out, {"AIRFLOW_CONN_GDPR_KEYS": os.environ["AIRFLOW_CONN_GDPR_KEYS"]}).returncode == 0
    assert not (out / "report.pdf").exists()
    document = json.loads((out / "data.json").read_text())
    assert document["request"]["kind"] == "portability"
    contact = next(t for t in document["warehouse"] if t["table"] == "crm.contacts")["rows"][0]
    assert contact == {"email": email, "first_name": "Zoé", "last_name": "Testperson",
                       "direct_phone": "+33 6 00 00 00 00", "job_title": "CTO"}
    assert {t["table"] for t in document["warehouse"]} == {"crm.contacts", "crm.invoices", "crm.support_tickets"}
    _no_personal_data(logs, email, "logs")


@pytest.mark.parametrize(("conf", "message"), [
    ({"request_id": "ACC-BAD"}, "no request ACC-BAD is registered: register it first"),
    ({"email": "jane.doe@acme.example", "subject_id": 3, "request_id": "ACC-BAD"}, "give exactly one"),
    ({"emial": "jane.doe@acme.example", "request_id": "ACC-BAD"}, "unknown param(s) `emial`"),
    ({"email": "jane.doe@acme.example", "request_id": "ACC-BAD", "portabilty": True}, "unknown param(s) `portabilty`"),
    ({"email": "jané.doe@acme.example", "request_id": "ACC-BAD"}, "`email` is not a plain ASCII address"),
    ({"email": "jane.doe@acme.example", "request_id": "jane.doe@acme.example"}, "`request_id` must be 3-64"),
], ids=["neither-and-not-registered", "both", "typo-emial", "typo-portabilty", "look-alike", "request-id-an-email"])
def test_bad_input_fails_the_first_task_clearly_and_changes_nothing(
    airflow_home: Path, airflow_conns: str, access_policy: Path, tmp_path: Path, conf: dict, message: str,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    with psycopg.connect(airflow_conns) as conn:
        before = conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0]  # type: ignore[index]

    dag_run, logs = _run(conf, caplog, capfd)

    assert str(dag_run.state) == "failed"
    states = _states(dag_run)
    assert states["validate_request"] == "failed" and states["answer"] == "upstream_failed"
    assert message in logs
    assert "jane.doe" not in logs and "jané" not in logs
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0] == before  # type: ignore[index]
    assert not (tmp_path / "packages").exists()


def test_a_dry_run_counts_and_writes_no_package(
    airflow_home: Path, airflow_conns: str, access_policy: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    cid, email, _ = _person(airflow_conns)
    dag_run, logs = _run({"email": email, "request_id": "ACC-DRY-1", "dry_run": True}, caplog, capfd)
    assert str(dag_run.state) == "success", logs[-4000:]
    assert _xcoms(dag_run)["answer/return_value"]["outcome"] == "dry_run"
    assert not (tmp_path / "packages").exists()


def test_a_downstream_system_that_fails_its_preflight_stops_the_answer(
    airflow_home: Path, airflow_conns: str, downstream, access_policy: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _, email, _ = _person(airflow_conns)
    conn_json = json.loads(os.environ["AIRFLOW_CONN_TELEPHONY"])
    conn_json["extra"] = {"Authorization": "Bearer wrong-token"}
    monkeypatch.setenv("AIRFLOW_CONN_TELEPHONY", json.dumps(conn_json))

    dag_run, logs = _run({"email": email, "request_id": "ACC-PRE-1"}, caplog, capfd)

    assert str(dag_run.state) == "failed"
    assert _states(dag_run)["answer"] == "upstream_failed"
    assert "preflight of target telephony failed" in logs and "HTTP 401" in logs
    assert not (tmp_path / "packages").exists()  # no package that leaves a system out


def test_the_weekly_sweep_deletes_packages_past_keep_for_and_reports_it(
    airflow_home: Path, airflow_conns: str, access_policy: Path, keys: Keys, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    store = ObjectStoragePackages(str(tmp_path / "packages"), tmp_path)
    for request_id, days in (("ACC-OLD", 45), ("ACC-NEW", 3)):
        created = RUN_AFTER - timedelta(days=days)
        store.write(access.package_name(request_id), access.seal(
            {"data.json": b"{}", "manifest.json": b"{}"}, keys, request_id, "access", created,
            access.expiry(created, "P30D")))

    dag_run, logs = _run(CONFIRMED, caplog, capfd, dag_id="gdpr_retention_sweep")

    assert str(dag_run.state) == "success", logs[-4000:]
    assert store.names() == ["ACC-NEW.wgdpr"]
    report = _xcoms(dag_run)["report/return_value"]
    assert report["totals"]["-/purge_access_package/access_package"] == 1
    with psycopg.connect(airflow_conns) as conn:
        rows = conn.execute("SELECT outcome, details->>'request_id' FROM gdpr.audit_log"
                            " WHERE action = 'purge_access_package'").fetchall()
    assert rows == [("done", "ACC-OLD")]


# -- registered requests: `warehouse-gdpr request new` (identifier on stdin), then {"request_id": ID} alone ----


def _request_new(url: str, kind: str, request_id: str, identifier: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, as the README runs it: the identifier on stdin, never in argv."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    engine = url if os.environ.get("WAREHOUSE_TEST_URL") else make_conninfo(
        **{**conninfo_to_dict(url), "user": "gdpr_dag"})  # type: ignore[arg-type]
    env = {**os.environ, "WAREHOUSE_URL": engine, "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT / 'demo'}"}
    return subprocess.run([sys.executable, "-m", "warehouse_gdpr.cli", "request", "new", "--kind", kind,
                           "--request-id", request_id], input=identifier, env=env, capture_output=True, text=True,
                          timeout=120)


def _request_row(url: str, request_id: str) -> tuple[Any, ...]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT kind, status, outcome, completed_at IS NOT NULL, identifier_ciphertext IS NULL, key_id IS NULL,"
            " details FROM gdpr.request WHERE request_id = %s", (request_id,)).fetchone()
    assert row is not None
    return row


def test_a_registered_access_request_runs_from_its_id_alone_and_completes(
    airflow_home: Path, airflow_conns: str, downstream, access_policy: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    cid, email, _ = _person(airflow_conns)
    downstream.add_person(email)
    registered = _request_new(airflow_conns, "access", "ACC-REG-1", f"  {email.upper()}\n")
    assert registered.returncode == 0, registered.stderr
    assert "airflow dags trigger gdpr_subject_access --conf '{\"request_id\": \"ACC-REG-1\"}'" in registered.stdout
    assert email not in registered.stdout + registered.stderr

    dag_run, logs = _run({"request_id": "ACC-REG-1"}, caplog, capfd)

    assert str(dag_run.state) == "success", logs[-4000:]
    kind, status, outcome, completed, no_identifier, no_key, details = _request_row(airflow_conns, "ACC-REG-1")
    assert (kind, status, outcome, completed, no_identifier, no_key) == ("access", "completed", "answered", True,
                                                                          True, True)
    answer = _xcoms(dag_run)["answer/return_value"]
    assert details["package"]["sha256"] == answer["sha256"] and details["rows"] == answer["rows"]
    assert details["registered_by"] == "email" and details["rows"]["crm.support_tickets"] == 1  # found by email
    with psycopg.connect(airflow_conns) as conn:
        destroyed = conn.execute("SELECT count(*) FROM gdpr.audit_log WHERE action = 'destroy_identifier'"
                                 " AND details->>'request_id' = 'ACC-REG-1'").fetchone()[0]  # type: ignore[index]
        audit_text = conn.execute("SELECT string_agg(a::text, ' ') FROM gdpr.audit_log a").fetchone()[0]  # type: ignore[index]
    assert destroyed == 1
    out = tmp_path / "unpacked"
    assert _unpack("ACC-REG-1", out, {"AIRFLOW_CONN_GDPR_KEYS": os.environ["AIRFLOW_CONN_GDPR_KEYS"]}).returncode == 0
    document = json.loads((out / "data.json").read_text())
    assert document["request"]["kind"] == "access" and (out / "report.pdf").exists()
    assert {r["contact_id"] for r in document["warehouse"][0]["rows"]} == {cid}
    # The address never reached the run's conf, an XCom, a log or the audit log.
    for where, text in (("logs", logs), ("conf and XComs", json.dumps(_xcoms(dag_run))), ("audit", audit_text)):
        _no_personal_data(text, email, where)

    again, again_logs = _run({"request_id": "ACC-REG-1"}, caplog, capfd)  # its identifier is gone
    assert str(again.state) == "failed" and "its identifier was destroyed when it completed" in again_logs


def test_a_registered_portability_request_is_answered_as_one(
    airflow_home: Path, airflow_conns: str, access_policy: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    cid, email, _ = _person(airflow_conns)
    assert _request_new(airflow_conns, "portability", "PORT-REG-1", f"subject_id:{cid}").returncode == 0

    dag_run, logs = _run({"request_id": "PORT-REG-1"}, caplog, capfd)

    assert str(dag_run.state) == "success", logs[-4000:]
    assert _request_row(airflow_conns, "PORT-REG-1")[:5] == ("portability", "completed", "answered", True, True)
    out = tmp_path / "unpacked"
    assert _unpack("PORT-REG-1", out, {"AIRFLOW_CONN_GDPR_KEYS": os.environ["AIRFLOW_CONN_GDPR_KEYS"]}).returncode == 0
    assert not (out / "report.pdf").exists()
    assert json.loads((out / "data.json").read_text())["request"]["kind"] == "portability"


def test_an_access_request_given_by_email_is_recorded_and_its_id_cannot_be_reused(
    airflow_home: Path, airflow_conns: str, access_policy: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    cid, email, _ = _person(airflow_conns)
    dag_run, logs = _run({"subject_id": cid, "request_id": "ACC-ID-1", "portability": True}, caplog, capfd)
    assert str(dag_run.state) == "success", logs[-4000:]
    row = _request_row(airflow_conns, "ACC-ID-1")
    assert row[:4] == ("portability", "completed", "answered", True)
    package = (tmp_path / "packages" / "ACC-ID-1.wgdpr").read_bytes()
    with psycopg.connect(airflow_conns) as conn:
        before = conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0]  # type: ignore[index]

    again, again_logs = _run({"email": email, "request_id": "ACC-ID-1", "portability": True}, caplog, capfd)

    assert str(again.state) == "failed"
    assert "request ACC-ID-1 was already answered on" in again_logs and email not in again_logs
    assert (tmp_path / "packages" / "ACC-ID-1.wgdpr").read_bytes() == package
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0] == before  # type: ignore[index]
    other, other_logs = _run({"email": email, "request_id": "ACC-ID-1"}, caplog, capfd)  # as an access request
    assert str(other.state) == "failed" and "request ACC-ID-1 is of kind portability, not access" in other_logs


def test_an_erasure_request_id_is_refused_by_the_access_dag(
    airflow_home: Path, airflow_conns: str, access_policy: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _, email, _ = _person(airflow_conns)
    assert _request_new(airflow_conns, "erasure", "ERA-REG-1", email).returncode == 0
    with psycopg.connect(airflow_conns) as conn:
        before = conn.execute("SELECT count(*), max(audit_id) FROM gdpr.audit_log").fetchone()

    dag_run, logs = _run({"request_id": "ERA-REG-1"}, caplog, capfd)

    assert str(dag_run.state) == "failed"
    assert "request ERA-REG-1 is of kind erasure, not access" in logs
    assert _request_row(airflow_conns, "ERA-REG-1")[:2] == ("erasure", "registered")
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*), max(audit_id) FROM gdpr.audit_log").fetchone() == before
    assert not (tmp_path / "packages").exists()


def test_a_second_run_while_the_request_is_being_answered_fails_clearly_and_writes_nothing(
    airflow_home: Path, airflow_conns: str, downstream, access_policy: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another run holds the request (the request id's lock, tests/engine/test_access_concurrency.py): this run
    fails at once in `answer`, naming it, with no package and the request left to the other run. Failed on main:
    this run read the person's data and wrote the package, then waited on the lock to record it."""
    from helpers import as_role
    from warehouse_gdpr.engine import erasure

    monkeypatch.setattr(access, "ANSWER_LOCK_WAIT_SECONDS", 0.5, raising=False)
    _, email, _ = _person(airflow_conns)
    downstream.add_person(email)
    assert _request_new(airflow_conns, "access", "ACC-BUSY-1", email + "\n").returncode == 0
    engine = airflow_conns if os.environ.get("WAREHOUSE_TEST_URL") else as_role(airflow_conns, "gdpr_dag")
    with psycopg.connect(engine, autocommit=True, application_name="warehouse-gdpr access manual__first") as first:
        first.execute("SELECT pg_advisory_lock(%s, hashtext('ACC-BUSY-1'))", (erasure.REQUEST_LOCK_CLASS,))
        # On main the answer waited forever on the lock when recording: bound it for this run's connections.
        monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=10s")
        dag_run, logs = _run({"request_id": "ACC-BUSY-1"}, caplog, capfd)
        monkeypatch.delenv("PGOPTIONS")
    assert not (tmp_path / "packages").exists() or not list((tmp_path / "packages").iterdir())
    assert str(dag_run.state) == "failed"
    assert _states(dag_run)["answer"] == "failed"  # no retry: the other run is answering
    assert "request ACC-BUSY-1 is being answered by another run right now" in logs, logs[-4000:]
    assert "application_name 'warehouse-gdpr access manual__first'" in logs and "read and wrote nothing" in logs
    _no_personal_data(logs, email, "logs")
    kind, status, *_ = _request_row(airflow_conns, "ACC-BUSY-1")
    assert (kind, status) == ("access", "registered")

    dag_run, logs = _run({"request_id": "ACC-BUSY-1"}, caplog, capfd)  # the other run ended without answering
    assert str(dag_run.state) == "success", logs[-4000:]
    assert _request_row(airflow_conns, "ACC-BUSY-1")[1] == "completed"
    assert [p.name for p in (tmp_path / "packages").iterdir()] == ["ACC-BUSY-1.wgdpr"]
