"""The Airflow layer's one error mapping (warehouse_gdpr.airflow.errors.task_errors): configuration errors
fail at once, transient ones retry, and warehouse errors reach no log and no exception with a value in
them. Under dag.test(): a CHECK violation during a pseudonymisation, a hold predicate failing at run
time, gdpr_erasure_retry isolating each request, and a policy that does not load logged at parse time."""

from __future__ import annotations

import json
import logging
import re
import threading
import traceback
from datetime import date, datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from helpers import CRM_TABLES, add_contact, add_contract, table_checksum
from warehouse_gdpr.airflow.errors import task_errors
from warehouse_gdpr.engine import erasure
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.errors import TransientError
from warehouse_gdpr.engine.policy import Policy, PolicyError
from warehouse_gdpr.engine.propagation import TargetNotAcknowledged

ROOT = Path(__file__).resolve().parents[2]
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+\.example")  # the seeded and scenario addresses
PERSON = "jane.doe+vip@acme.example"


def _rendered(exc: BaseException) -> str:
    """What Airflow prints for a failed task: the exception with its traceback and any chained exception."""
    return "".join(traceback.format_exception(exc))


# -- the decorator on real warehouse errors --------------------------------------------------------------


def test_a_value_in_a_warehouse_error_never_reaches_the_log_or_the_exception(
    conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    @task_errors
    def body() -> None:
        conn.execute("SELECT %s::int", (PERSON,))  # invalid input syntax for type integer: "<the email>"

    with caplog.at_level(logging.DEBUG), pytest.raises(AirflowFailException) as info:
        body()
    assert "InvalidTextRepresentation (SQLSTATE 22P02)" in str(info.value)
    assert PERSON not in caplog.text and PERSON not in _rendered(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None, "the original error is not chained"


def test_a_unique_violation_names_the_constraint_not_the_key(
    conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    conn.execute("CREATE TEMP TABLE people (email text CONSTRAINT people_email_key UNIQUE)")
    conn.execute("INSERT INTO people VALUES (%s)", (PERSON,))

    @task_errors
    def body() -> None:
        conn.execute("INSERT INTO people VALUES (%s)", (PERSON,))  # DETAIL: Key (email)=(<the email>) already exists

    with caplog.at_level(logging.DEBUG), pytest.raises(AirflowFailException) as info:
        body()
    message = str(info.value)
    assert "UniqueViolation (SQLSTATE 23505)" in message
    assert "table pg_temp" in message and "people" in message and "constraint people_email_key" in message
    assert PERSON not in caplog.text and PERSON not in _rendered(info.value)
    assert "already exists" not in message and "Key (" not in caplog.text


def test_a_lost_connection_is_retried(warehouse: str, conn: psycopg.Connection) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    victim = psycopg.connect(warehouse)
    conn.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,))
    conn.commit()

    @task_errors
    def body() -> None:
        victim.execute("SELECT 1")

    with pytest.raises(TransientError) as info:
        body()
    assert not isinstance(info.value, AirflowFailException)
    assert str(info.value).startswith("warehouse error ") and "terminating" not in str(info.value)
    victim.close()


def test_configuration_errors_fail_at_once_transient_ones_retry_others_pass_through() -> None:
    from airflow.sdk.exceptions import AirflowFailException

    @task_errors
    def raises(exc: Exception) -> None:
        raise exc

    with pytest.raises(AirflowFailException, match="tables\\[0\\]: bad"):
        raises(PolicyError("tables[0]: bad"))
    transient = TargetNotAcknowledged("target emailing did not acknowledge request R-1: HTTP 503")
    with pytest.raises(TargetNotAcknowledged) as info:
        raises(transient)
    assert info.value is transient
    with pytest.raises(ZeroDivisionError):
        raises(ZeroDivisionError("a bug keeps its own traceback"))


# -- under dag.test() ------------------------------------------------------------------------------------


def _dag(dag_id: str):  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag(dag_id)


def _run(dag, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO):
        # The template's first sweep is above the blast-radius limit: confirmed, as an operator would.
        conf = ({"confirm_blast_radius": {"prospects_never_converted": 10**6, "leads_not_converted": 10**6,
                                          "former_clients": 10**6}} if dag.dag_id == "gdpr_retention_sweep" else None)
        dag_run = dag.test(run_after=RUN_AFTER, logical_date=RUN_AFTER, run_conf=conf)
    out, err = capfd.readouterr()
    tis = {ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]": ti
           for ti in dag_run.get_task_instances()}
    return str(dag_run.state), tis, out + err + caplog.text


def _policy_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change) -> Path:  # type: ignore[no-untyped-def]
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text(encoding="utf-8"))
    change(data)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(path))
    return path


def test_a_check_violation_during_pseudonymisation_logs_no_personal_data(
    airflow_home: Path, airflow_conns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    # last_name is kept by pseudonymisation here, so the failing row psycopg describes holds it.
    _policy_copy(tmp_path, monkeypatch,
                 lambda d: d["tables"][0]["columns"].update(last_name={"pseudonymise": "keep"}))
    with psycopg.connect(airflow_conns) as conn:
        cid = add_contact(conn, "former_client", date(2015, 1, 1))
        add_contract(conn, cid, date(2015, 1, 1), date(2020, 1, 1))  # ended more than 3 years ago
        conn.execute("UPDATE crm.contacts SET last_name = 'Wojciechowska-Zyx' WHERE contact_id = %s", (cid,))
        email = conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0]  # type: ignore[index]
        # A constraint of the warehouse that the policy's fixed value 'redacted' violates for this person.
        conn.execute(f"ALTER TABLE crm.contacts ADD CONSTRAINT job_title_kept "
                     f"CHECK (job_title IS DISTINCT FROM 'redacted' OR contact_id <> {cid})")

    state, tis, logs = _run(_dag("gdpr_retention_sweep"), caplog, capfd)

    assert state == "failed"
    assert str(tis["apply"].state) == "failed" and tis["apply"].try_number == 1, "a constraint is not retried"
    assert "CheckViolation (SQLSTATE 23514) on table crm.contacts, constraint job_title_kept" in logs
    for value in ("Wojciechowska-Zyx", email, "Failing row contains"):
        assert value not in logs, f"{value!r} reached the task logs"
    assert not EMAIL_RE.search(logs), "an email address reached the logs"
    with psycopg.connect(airflow_conns) as conn:
        row = conn.execute("SELECT job_title, pseudonymised_at FROM crm.contacts WHERE contact_id = %s",
                           (cid,)).fetchone()
    assert row == ("CTO", None), "the failed batch changed nothing"


def test_a_hold_predicate_failing_at_run_time_logs_no_email(
    airflow_home: Path, airflow_conns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    # It compiles (check_policy's EXPLAIN accepts it) and fails on the first row: the server's message
    # is 'invalid input syntax for type integer: "<that contact's email>"'.
    _policy_copy(tmp_path, monkeypatch, lambda d: d["holds"].append(
        {"name": "email_as_number", "description": "a broken hold", "predicate": "s.email::int > 0",
         "blocks": ["delete"]}))
    with psycopg.connect(airflow_conns) as conn:
        emails = [r[0] for r in conn.execute("SELECT email FROM crm.contacts").fetchall()]
        before = table_checksum(conn, CRM_TABLES)

    state, tis, logs = _run(_dag("gdpr_retention_sweep"), caplog, capfd)

    assert state == "failed"
    assert str(tis["check_policy"].state) == "success"
    assert str(tis["plan"].state) == "failed" and tis["plan"].try_number == 1
    assert "InvalidTextRepresentation (SQLSTATE 22P02)" in logs
    assert "invalid input syntax" not in logs
    assert [e for e in emails if e in logs] == []
    with psycopg.connect(airflow_conns) as conn:
        assert table_checksum(conn, CRM_TABLES) == before


# -- gdpr_erasure_retry isolates each request --------------------------------------------------------------

TODAY = date(2026, 6, 15)


def _pending_request(url: str, policy: Policy, keys: Keys, downstream, request_id: str) -> str:  # type: ignore[no-untyped-def]
    """An erased prospect whose three targets are still to be told (the outbox rows are pending)."""
    with psycopg.connect(url) as conn:
        cid = add_contact(conn, "prospect", date(2025, 1, 1))
        email = str(conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0])  # type: ignore[index]
        conn.commit()
        request = erasure.parse_request({"email": email, "request_id": request_id}, today=TODAY)
        located = erasure.locate(conn, policy, keys, request)
        holds = erasure.holds_in_force(conn, policy, located, "2026-06-15T00:00:00+00:00")
        erasure.erase(conn, policy, keys, RunContext("test", "setup", "erase"), request, located, holds)
    downstream.add_person(email)
    return email


def _outbox(url: str) -> dict[tuple[str, str], str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT request_id, target, status FROM gdpr.erasure_propagation").fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


def _status(url: str, request_id: str) -> str:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT status FROM gdpr.erasure_request WHERE request_id = %s",
                            (request_id,)).fetchone()[0]  # type: ignore[index]


def test_erasure_retry_goes_on_after_an_undecryptable_row_and_names_it(
    airflow_home: Path, airflow_conns: str, downstream, policy: Policy, keys: Keys,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    first = _pending_request(airflow_conns, policy, keys, downstream, "REQ-ISO-A")
    second = _pending_request(airflow_conns, policy, keys, downstream, "REQ-ISO-B")
    with psycopg.connect(airflow_conns) as conn:  # the first row tried: its ciphertext altered
        conn.execute("UPDATE gdpr.erasure_propagation SET identifier_ciphertext = decode(repeat('00', 48), 'hex')"
                     " WHERE request_id = 'REQ-ISO-A' AND target = 'emailing'")

    state, tis, logs = _run(_dag("gdpr_erasure_retry"), caplog, capfd)

    assert state == "failed"
    assert str(tis["retry_pending"].state) == "failed" and tis["retry_pending"].try_number == 1
    assert str(tis["check_deadlines"].state) == "failed"  # after checking the deadlines: the run is red
    assert "retry_pending failed: its log names each request" in logs
    outbox = _outbox(airflow_conns)
    assert outbox.pop(("REQ-ISO-A", "emailing")) == "pending"
    assert set(outbox.values()) == {"acknowledged"}, outbox  # every other row, the other request's included
    assert _status(airflow_conns, "REQ-ISO-B") == "completed"
    assert _status(airflow_conns, "REQ-ISO-A") == "pending_propagation"
    assert not downstream.emailing.has_contact(second) and downstream.emailing.has_contact(first)
    assert "1 of 6 pending propagation(s) failed" in logs
    assert "request REQ-ISO-A, target emailing: InvalidTag" in logs
    assert first not in logs and second not in logs


class _Killer(BaseHTTPRequestHandler):
    """A telephony target that, on its first call, drops every connection to the warehouse database
    (as a failover or a restart would), then answers 204 as the real one does."""

    admin_url = ""
    killed = threading.Event()

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # the preflight (/company), and the lookup after a deletion: gone
        if self.path == "/company":
            self._json(200, {"name": "demo telephony"})
        else:
            self._json(404, {"error": "Not found"})

    def do_DELETE(self) -> None:
        if not self.killed.is_set():
            self.killed.set()
            with psycopg.connect(self.admin_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                              " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        self._json(200, {"deleted": True})

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_erasure_retry_goes_on_after_a_lost_connection(
    airflow_home: Path, airflow_conns: str, server_url: str, downstream, policy: Policy, keys: Keys,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _pending_request(airflow_conns, policy, keys, downstream, "REQ-LOST-A")
    _pending_request(airflow_conns, policy, keys, downstream, "REQ-LOST-B")
    params = conninfo_to_dict(server_url)
    params["dbname"] = conninfo_to_dict(airflow_conns)["dbname"]
    _Killer.admin_url = make_conninfo(**params)  # type: ignore[arg-type]
    _Killer.killed = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Killer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AIRFLOW_CONN_TELEPHONY", f'{{"conn_type": "http", "host": "127.0.0.1", '
                                                 f'"port": {server.server_address[1]}, "schema": "http"}}')
    dag = _dag("gdpr_erasure_retry")
    dag.get_task("retry_pending").retries = 0  # a lost connection is retried; dag.test() would wait minutes
    try:
        state, tis, logs = _run(dag, caplog, capfd)

        assert _Killer.killed.is_set()
        assert state == "failed" and str(tis["retry_pending"].state) == "failed", {
            k: str(v.state) for k, v in tis.items()}
        outbox = _outbox(airflow_conns)
        assert outbox.pop(("REQ-LOST-A", "telephony")) == "pending"  # its acknowledgement was lost with the connection
        assert set(outbox.values()) == {"acknowledged"}, outbox
        assert _status(airflow_conns, "REQ-LOST-B") == "completed"
        assert re.search(r"request REQ-LOST-A, target telephony: warehouse error \w+", logs)
        assert "Airflow retries the task with backoff" in logs  # transient: retried when retries are left

        # The lost worker's claim on the row is a lease: it expires by itself (claimed_until). An hour later
        # it has; the next run then tells the target again and completes the request.
        with psycopg.connect(airflow_conns) as conn:
            assert conn.execute("SELECT claimed_until > now() FROM gdpr.erasure_propagation"
                                " WHERE request_id = 'REQ-LOST-A' AND target = 'telephony'").fetchone()[0]
            conn.execute("UPDATE gdpr.erasure_propagation SET claimed_until = now() - interval '1 second'"
                         " WHERE request_id = 'REQ-LOST-A' AND target = 'telephony'")
        state, _, logs = _run(_dag("gdpr_erasure_retry"), caplog, capfd)
        assert state == "success", logs[-3000:]
        assert _status(airflow_conns, "REQ-LOST-A") == "completed"
    finally:
        server.shutdown()


# -- a policy that does not load, at parse time ----------------------------------------------------------------


def test_a_policy_that_does_not_load_is_logged_at_error_when_the_dags_are_built(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from warehouse_gdpr.dags import build_all

    broken = tmp_path / "policy.yaml"
    broken.write_text("version: 1\nsubject: {table: crm.contacts\n", encoding="utf-8")
    with caplog.at_level(logging.INFO):
        dags = build_all(broken)

    assert sorted(dags) == ["gdpr_erasure_retry", "gdpr_optout_sync", "gdpr_propagation_retry", "gdpr_restore_replay",
                            "gdpr_retention_sweep", "gdpr_subject_access", "gdpr_subject_erasure",
                            "gdpr_subject_rectification", "gdpr_subject_restriction"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(m.startswith("gdpr_retention_sweep is built with default settings") and "not valid YAML at line" in m
               for m in errors), errors
    assert any(m.startswith("gdpr_subject_access is built with default settings") for m in errors), errors
