"""gdpr_subject_erasure and gdpr_erasure_retry under dag.test(): real PostgreSQL, real HTTP targets."""

from __future__ import annotations

import json
import logging
import os
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from scripted_http import ScriptedServer
from warehouse_gdpr.airflow.tasks import erasure as erasure_tasks
from warehouse_gdpr.engine import erasure, requests
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.policy import load_policy
from warehouse_gdpr_demo.services import start_telephony

ROOT = Path(__file__).resolve().parents[2]
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)


def _dag(dag_id: str):  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag(dag_id)


def _erasable_person(url: str) -> tuple[int, str, str, str]:
    """A seeded prospect with no hold: (id, email, first name, last name)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT contact_id, email, first_name, last_name FROM crm.contacts c WHERE status = 'prospect'"
            " AND NOT litigation_hold AND first_name IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM crm.invoices i WHERE i.contact_id = c.contact_id)"
            " AND EXISTS (SELECT 1 FROM crm.notes n WHERE n.contact_id = c.contact_id)"
            " ORDER BY contact_id LIMIT 1"
        ).fetchone()
    assert row is not None
    return row  # type: ignore[return-value]


def _run(  # type: ignore[no-untyped-def]
    dag_id: str, conf: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
    run_after: datetime = RUN_AFTER,
):
    dag_run, logs = _run_dag(dag_id, conf, caplog, capfd, run_after=run_after)
    return str(dag_run.state), logs


def _run_dag(dag_id: str, conf: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
             run_after: datetime = RUN_AFTER, **test_kwargs):
    """(the DagRun, everything logged): dag.test() with this conf; a failed task does not raise."""
    caplog.clear()
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        dag_run = _dag(dag_id).test(run_after=run_after, logical_date=run_after, run_conf=conf, **test_kwargs)
    out, err = capfd.readouterr()
    return dag_run, out + err + caplog.text


def _states(dag_run) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """{task_id: state} of a finished dag.test() run (mapped tasks: the state of their last instance)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(TaskInstance.task_id, TaskInstance.state).where(
            TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id)).all()
    return {task_id: str(state) for task_id, state in rows}


def _request(url: str, request_id: str) -> tuple[str, str]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT status, outcome FROM gdpr.erasure_request WHERE request_id = %s", (request_id,)
        ).fetchone()
    assert row is not None
    return row  # type: ignore[return-value]


def test_params_have_titles_and_descriptions(airflow_home: Path) -> None:
    dag = _dag("gdpr_subject_erasure")
    for name in ("email", "subject_id", "request_id", "received_at", "dry_run"):
        param = dag.params.get_param(name)
        assert param.schema.get("title") and param.description, name
    assert _dag("gdpr_erasure_retry") is not None


def test_a_missing_request_id_is_refused_before_any_run(
    airflow_home: Path, airflow_conns: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError) as info:
        _dag("gdpr_subject_erasure").test(run_after=RUN_AFTER, logical_date=RUN_AFTER,
                                          run_conf={"email": "paul@example.com"})
    assert "paul" not in str(info.value)
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0] == 0  # type: ignore[index]


def test_the_trigger_form_checks_no_pattern_or_format_that_would_echo_a_value(airflow_home: Path) -> None:
    """Airflow's ParamValidationError quotes the refused value: the form only checks types, the first task
    checks the rules (and names the param, never the value)."""
    dag = _dag("gdpr_subject_erasure")
    for name in ("email", "request_id", "received_at"):
        schema = dag.params.get_param(name).schema
        assert not {"pattern", "format", "minLength", "maxLength"} & set(schema), (name, schema)
    from airflow.sdk.definitions.param import ParamValidationError

    for name, value in {"email": "  Alice@X.example \n", "request_id": "jane@x.example", "received_at": "1900"}.items():
        try:
            dag.params.get_param(name).resolve(value)
        except ParamValidationError as exc:  # the assertion says what went wrong
            raise AssertionError(f"the form refused a value the first task must judge: {exc}") from None


@pytest.mark.parametrize(
    ("conf", "field", "refused"),
    [
        ({"email": "x@", "request_id": "REQ-1"}, "email", "x@"),
        ({"email": "p\u0430ul@example.com", "request_id": "REQ-1"}, "email", "p\u0430ul"),  # Cyrillic look-alike
        ({"email": "'; drop table crm.contacts; --", "request_id": "REQ-1"}, "email", "drop table"),
        ({"email": "paul@example.com", "request_id": "jane.doe@acme.example"}, "request_id", "jane.doe"),  # pasted
        ({"email": "paul@example.com", "request_id": "REQ-1", "received_at": "1900-01-01"}, "received_at",
         "1900-01-01"),
        ({"email": "paul@example.com", "request_id": "REQ-1", "dyr_run": True}, "dyr_run", "paul@example.com"),
    ],
    ids=["email-x@", "email-cyrillic", "email-sql", "request_id-an-email", "received_at-1900", "typo-dyr_run"],
)
def test_a_refused_value_fails_the_first_task_naming_the_param_never_the_value(
    airflow_home: Path, airflow_conns: str, fast_retry_policy: Path, conf: dict, field: str, refused: str,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """Before any change: nothing is read or written but the refusal, which names the param and its rule."""
    with psycopg.connect(airflow_conns) as conn:
        contacts = conn.execute("SELECT count(*) FROM crm.contacts").fetchone()[0]  # type: ignore[index]
    dag_run, logs = _run_dag("gdpr_subject_erasure", conf, caplog, capfd)
    states = _states(dag_run)
    assert str(dag_run.state) == "failed"
    assert states["validate_request"] == "failed" and states["erase"] == "upstream_failed", states
    assert f"`{field}`" in logs and "refused before any change" in logs
    assert refused not in logs, "a refused value reached the task logs"
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0] == 0  # type: ignore[index]
        assert conn.execute("SELECT count(*) FROM crm.contacts").fetchone()[0] == contacts  # type: ignore[index]


def test_both_identifiers_fail_with_a_clear_status(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    state, logs = _run("gdpr_subject_erasure", {"email": "paul@example.com", "subject_id": 3, "request_id": "REQ-2"},
                       caplog, capfd)
    assert state == "failed"
    assert "give exactly one of `email` or `subject_id`" in logs
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM gdpr.erasure_request").fetchone()[0] == 0  # type: ignore[index]


def test_erasure_propagates_after_a_500_and_logs_no_personal_data(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    contact_id, email, first, last = _erasable_person(airflow_conns)
    downstream.add_person(email)
    downstream.emailing.fail_next(1, 500, method="DELETE")  # the erasure call, not the preflight

    state, logs = _run("gdpr_subject_erasure", {"email": email.upper(), "request_id": "REQ-2026-0001"}, caplog, capfd)

    assert state == "success", logs[-4000:]
    assert _request(airflow_conns, "REQ-2026-0001") == ("completed", "erased")
    assert not downstream.emailing.has_contact(email)
    assert not downstream.telephony.has_contact(email)
    assert downstream.desk_rows(email) == 0
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM crm.contacts WHERE contact_id = %s", (contact_id,)).fetchone()[0] == 0  # type: ignore[index]
        attempts = conn.execute(
            "SELECT attempts FROM gdpr.erasure_propagation WHERE request_id = 'REQ-2026-0001' AND target = 'emailing'"
        ).fetchone()[0]  # type: ignore[index]
        certificate = conn.execute(
            "SELECT details FROM gdpr.audit_log WHERE action = 'certificate' ORDER BY audit_id DESC LIMIT 1"
        ).fetchone()[0]  # type: ignore[index]
    assert attempts == 2, "the 500 was retried once"
    assert certificate["status"] == "completed" and len(certificate["targets"]) == 3
    assert all(t["acknowledged_at"] for t in certificate["targets"])
    for value in (email, email.upper(), f"{first} {last}"):
        assert value not in logs, "a personal value reached the task logs"
    assert "@" not in str(certificate)


def test_target_down_stays_pending_then_retry_dag_completes(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _, email, _, _ = _erasable_person(airflow_conns)
    downstream.add_person(email)
    port, snapshot = downstream.telephony.port, downstream.telephony.contacts_snapshot()
    downstream.telephony.stop()

    state, logs = _run("gdpr_subject_erasure", {"email": email, "request_id": "REQ-2026-0002"}, caplog, capfd)

    assert state == "failed"  # preflight[telephony] exhausted its retries: nothing was sent, the run says so
    assert "preflight of target telephony failed: GET /company answered no answer (ConnectionError)" in logs
    assert "1 target(s) have not acknowledged: telephony" in logs
    assert _request(airflow_conns, "REQ-2026-0002") == ("pending_propagation", "erased")

    downstream.telephony = start_telephony("test-token", port=port, contacts=snapshot)
    state, logs = _run("gdpr_erasure_retry", {}, caplog, capfd)

    assert state == "success", logs[-4000:]
    assert _request(airflow_conns, "REQ-2026-0002") == ("completed", "erased")
    assert not downstream.telephony.has_contact(email)
    assert email not in logs
    with psycopg.connect(airflow_conns) as conn:
        left = conn.execute(
            "SELECT count(*) FROM gdpr.erasure_propagation WHERE identifier_ciphertext IS NOT NULL"
        ).fetchone()[0]  # type: ignore[index]
    assert left == 0, "every acknowledged identifier is destroyed"


def _outbox(url: str, request_id: str) -> dict[str, tuple]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT target, status, attempts, identifier_ciphertext IS NOT NULL FROM gdpr.erasure_propagation"
            " WHERE request_id = %s ORDER BY target", (request_id,)
        ).fetchall()
    return {r[0]: r[1:] for r in rows}


def test_a_wrong_base_url_fails_the_preflight_and_the_erasure_stays_pending_until_fixed(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """A connection pointing at the wrong base URL gets 404 for every call. "404 = already gone" used to
    complete the request and destroy the identifier while the emailing tool kept the person."""
    _, email, first, last = _erasable_person(airflow_conns)
    downstream.add_person(email)
    right = os.environ["AIRFLOW_CONN_EMAILING"]
    wrong = ScriptedServer([])  # answers 404 to everything
    try:
        monkeypatch.setenv("AIRFLOW_CONN_EMAILING", wrong.connection(**{"api-key": "test-api-key"}))

        state, logs = _run("gdpr_subject_erasure", {"email": email, "request_id": "REQ-2026-0404"}, caplog, capfd)

        assert state == "failed"
        assert ("preflight of target emailing failed: GET /v3/account answered HTTP 404 (wrong base URL or "
                "endpoint?). The base URL or the credentials of its connection 'emailing' are not proven right, "
                "so nothing is sent to it and its erasures stay pending") in logs
        assert "1 target(s) have not acknowledged: emailing" in logs
        assert _request(airflow_conns, "REQ-2026-0404") == ("pending_propagation", "erased")
        assert _outbox(airflow_conns, "REQ-2026-0404") == {
            "emailing": ("pending", 0, True), "support_desk": ("acknowledged", 1, False),
            "telephony": ("acknowledged", 1, False)}
        assert wrong.requests == [("GET", "/v3/account")], "a configuration error is not retried; nothing sent"

        state, logs = _run("gdpr_erasure_retry", {}, caplog, capfd)

        assert state == "failed"
        assert "1 target(s) failed their preflight: preflight of target emailing failed" in logs
        assert _request(airflow_conns, "REQ-2026-0404") == ("pending_propagation", "erased")
        assert _outbox(airflow_conns, "REQ-2026-0404")["emailing"] == ("pending", 0, True)
        assert wrong.requests == [("GET", "/v3/account")] * 2
    finally:
        wrong.stop()
    assert downstream.emailing.has_contact(email)
    monkeypatch.setenv("AIRFLOW_CONN_EMAILING", right)  # on-call fixes the connection

    state, logs = _run("gdpr_erasure_retry", {}, caplog, capfd, run_after=RUN_AFTER + timedelta(hours=1))

    assert state == "success", logs[-4000:]
    assert _request(airflow_conns, "REQ-2026-0404") == ("completed", "erased")
    assert not downstream.emailing.has_contact(email)
    assert _outbox(airflow_conns, "REQ-2026-0404")["emailing"] == ("acknowledged", 1, False)
    for value in (email, f"{first} {last}"):
        assert value not in logs


def test_dry_run_changes_nothing(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    contact_id, email, _, _ = _erasable_person(airflow_conns)
    downstream.add_person(email)
    state, logs = _run("gdpr_subject_erasure", {"email": email, "request_id": "REQ-DRY-1", "dry_run": True},
                       caplog, capfd)
    assert state == "success", logs[-4000:]
    assert downstream.emailing.has_contact(email)
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM crm.contacts WHERE contact_id = %s", (contact_id,)).fetchone()[0] == 1  # type: ignore[index]
        for table in ("gdpr.erasure_request", "gdpr.suppression_list", "gdpr.erasure_propagation"):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table  # type: ignore[index]


def test_four_eyes_approval_sits_before_the_erasure(
    airflow_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    data["erasure"]["approval_required"] = True
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(path))
    dag = _dag("gdpr_subject_erasure")
    approve = dag.get_task("approve_erasure")
    assert type(approve).__name__ == "ApprovalOperator"
    assert approve.upstream_task_ids == {"validate_request"}
    assert "approve_erasure" in dag.get_task("erase").upstream_task_ids


# -- the operator path (issue 10 point 5, issue 11 point 4) ---------------------------------------------


def _policy_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **erasure_settings: object) -> Path:
    """The demo policy with fast retries and these erasure settings, as the DAGs' policy."""
    import yaml

    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    data["erasure"].update({"retries": 1, "retry_delay_seconds": 1, **erasure_settings})
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(path))
    return path


def _audit_rows(url: str, request_id: str) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute("SELECT count(*) FROM gdpr.audit_log WHERE details->>'request_id' = %s",
                                (request_id,)).fetchone()[0])  # type: ignore[index]


def test_an_email_with_capitals_spaces_and_a_newline_is_accepted_and_erased(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    key_extra: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """The runbook says case and surrounding spaces do not matter: the form must take "  Alice@X.example "."""
    contact_id, email, _, _ = _erasable_person(airflow_conns)
    downstream.add_person(email)
    spelled = "  " + email[0].upper() + email[1:].upper().replace("@", "@") + " \n"

    state, logs = _run("gdpr_subject_erasure", {"email": spelled, "request_id": "REQ-SPACES"}, caplog, capfd)

    assert state == "success", logs[-4000:]
    assert _request(airflow_conns, "REQ-SPACES") == ("completed", "erased")
    assert not downstream.emailing.has_contact(email) and downstream.desk_rows(email) == 0
    keys = Keys.from_extra(key_extra)
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM crm.contacts WHERE contact_id = %s", (contact_id,)).fetchone()[0] == 0  # type: ignore[index]
        assert conn.execute("SELECT subject_hash FROM gdpr.erasure_request WHERE request_id = 'REQ-SPACES'"
                            ).fetchone()[0] == keys.subject_hash(email)  # type: ignore[index]
        assert conn.execute("SELECT count(*) FROM gdpr.suppression_list WHERE email_hash = %s",
                            (keys.subject_hash(email),)).fetchone()[0] == 1  # type: ignore[index]
    assert email.lower() not in logs.lower()


def test_a_request_id_used_for_another_person_is_refused_by_validate_request_and_verify_never_runs(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _, email, _, _ = _erasable_person(airflow_conns)
    with psycopg.connect(airflow_conns) as conn:
        other_id, other_email = conn.execute(
            "SELECT contact_id, email FROM crm.contacts WHERE status = 'prospect' AND NOT litigation_hold"
            " AND lower(email) <> lower(%s) ORDER BY contact_id DESC LIMIT 1", (email,)).fetchone()  # type: ignore[misc]
    state, logs = _run("gdpr_subject_erasure", {"email": email, "request_id": "REQ-TWICE"}, caplog, capfd)
    assert state == "success", logs[-4000:]
    recorded = _audit_rows(airflow_conns, "REQ-TWICE")

    # the same id for another person: validate_request refuses it, nothing is written, nothing downstream runs
    dag_run, logs = _run_dag("gdpr_subject_erasure", {"email": other_email, "request_id": "REQ-TWICE"}, caplog, capfd)
    states = _states(dag_run)
    assert str(dag_run.state) == "failed"
    assert states["validate_request"] == "failed", states
    assert states["erase"] == states["verify"] == "upstream_failed", states
    assert "`request_id` REQ-TWICE was already used for another request" in logs
    assert other_email.lower() not in logs.lower() and email.lower() not in logs.lower()
    assert _audit_rows(airflow_conns, "REQ-TWICE") == recorded, "no audit row may be attached to the earlier request"

    # and should erase ever refuse (validate_request skipped here), verify does not run after it
    dag_run, logs = _run_dag("gdpr_subject_erasure", {"email": other_email, "request_id": "REQ-TWICE"}, caplog, capfd,
                             mark_success_pattern="validate_request")
    states = _states(dag_run)
    assert states["erase"] == "failed" and states["verify"] == "upstream_failed", states
    assert "still linked after erasure" not in logs
    assert _audit_rows(airflow_conns, "REQ-TWICE") == recorded
    assert _request(airflow_conns, "REQ-TWICE") == ("completed", "erased")
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM crm.contacts WHERE contact_id = %s", (other_id,)).fetchone()[0] == 1  # type: ignore[index]


def test_a_dry_run_for_an_unknown_email_says_it_would_add_a_suppression_entry(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """A request for an unknown email ends not_found AND suppresses the email for good: say it before it happens."""
    description = _dag("gdpr_subject_erasure").params.get_param("email").description
    assert "suppression list" in description and "dry run" in description
    state, logs = _run("gdpr_subject_erasure", {"email": "nobody.here@nowhere.example", "request_id": "REQ-NF-DRY",
                                                "dry_run": True}, caplog, capfd)
    assert state == "success", logs[-4000:]
    assert "NOT_FOUND" in logs and "would add a suppression entry (permanent" in logs
    assert "nobody.here" not in logs
    with psycopg.connect(airflow_conns) as conn:
        for table in ("gdpr.erasure_request", "gdpr.suppression_list", "gdpr.erasure_propagation"):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table  # type: ignore[index]


def _overdue_pending_request(url: str, keys: Keys, request_id: str) -> int:
    """A request erased 45 days after a received date, with its three targets pending: (days overdue)."""
    _, email, _, _ = _erasable_person(url)
    received = date.today() - timedelta(days=45)
    policy = load_policy(ROOT / "include" / "policy.yaml")
    with psycopg.connect(url) as conn:
        request = erasure.parse_request({"email": email, "request_id": request_id, "received_at": received.isoformat()})
        located = erasure.locate(conn, policy, keys, request)
        result = erasure.erase(conn, policy, keys, RunContext("setup", "setup", "erase"), request, located, {})
    assert result.status == "pending_propagation"
    return (date.today() - request.due_date).days


def test_an_overdue_request_with_a_pending_target_fails_the_retry_run(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    key_extra: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    late = _overdue_pending_request(airflow_conns, Keys.from_extra(key_extra), "REQ-LATE")
    assert late > 0
    downstream.telephony.stop()

    dag_run, logs = _run_dag("gdpr_erasure_retry", {}, caplog, capfd)

    states = _states(dag_run)
    assert str(dag_run.state) == "failed", "an overdue erasure must make a red run"
    # telephony is down: its preflight fails too (nothing is sent to it); the overdue request fails the run
    assert states == {"preflight": "failed", "retry_pending": "success", "check_deadlines": "failed",
                      "verify_audit_chain": "success", "audit_chain_failed": "skipped"}, states
    assert f"request REQ-LATE: target(s) telephony pending, {late} day(s) overdue" in logs
    assert _request(airflow_conns, "REQ-LATE") == ("pending_propagation", "erased")
    with psycopg.connect(airflow_conns) as conn:
        details = conn.execute("SELECT details FROM gdpr.audit_log WHERE action = 'deadline_warning'"
                               " ORDER BY audit_id DESC LIMIT 1").fetchone()[0]  # type: ignore[index]
    assert (details["targets"], details["days_overdue"]) == (["telephony"], late)


def test_a_registered_request_never_run_past_its_due_date_fails_the_retry_run(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    key_extra: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """Registered 45 days ago and never run (no outbox row): the daily run pages for it like for a pending target,
    naming the DAG to trigger; one registered 10 days ago is neither flagged nor failing."""
    _, email, _, _ = _erasable_person(airflow_conns)
    keys = Keys.from_extra(key_extra)
    ctx = RunContext("warehouse-gdpr", "cli__test", "request_new")
    with psycopg.connect(airflow_conns) as conn:
        for request_id, kind, days in (("REQ-IDLE", "erasure", 45), ("ACC-IDLE", "access", 45),
                                       ("REQ-FRESH", "rectification", 10), ("OBJ-IDLE", "objection", 45)):
            received = date.today() - timedelta(days=days)
            requests.register(conn, keys, ctx, kind=kind, request_id=request_id, identifier=email,
                              received_at=received, today=received,
                              changes={"direct_phone": "+33 1 23 45 67 89"} if kind == "rectification" else None)

    dag_run, logs = _run_dag("gdpr_propagation_retry", {}, caplog, capfd)

    assert str(dag_run.state) == "failed", "an overdue request nobody ran must make a red run"
    assert _states(dag_run)["check_deadlines"] == "failed"
    assert ('request REQ-IDLE: registered but never run: trigger gdpr_subject_erasure with '
            '{"request_id": "REQ-IDLE"}') in logs
    assert 'request ACC-IDLE: registered but never run: trigger gdpr_subject_access' in logs
    # no DAG answers an objection: logged, never failing the run (nothing here could complete it)
    assert "Objection request OBJ-IDLE is OVERDUE" in logs and "request OBJ-IDLE:" not in logs
    assert "REQ-FRESH" not in logs and email not in logs
    with psycopg.connect(airflow_conns) as conn:
        flagged = conn.execute("SELECT details->>'request_id', outcome, details->>'status' FROM gdpr.audit_log"
                               " WHERE action = 'deadline_warning' ORDER BY 1").fetchall()
        warned = conn.execute("SELECT request_id FROM gdpr.request WHERE deadline_warned_at IS NOT NULL"
                              " ORDER BY 1").fetchall()
    assert flagged == [("ACC-IDLE", "overdue", "registered"), ("OBJ-IDLE", "overdue", "registered"),
                       ("REQ-IDLE", "overdue", "registered")]
    assert warned == [("ACC-IDLE",), ("OBJ-IDLE",), ("REQ-IDLE",)]


def test_the_policys_notifier_pages_when_the_retry_run_fails_on_an_overdue_request(
    airflow_home: Path, airflow_conns: str, downstream, tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch, key_extra: dict, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """erasure.on_failure_callback: a notifier instance named by `module:attribute`, called by a red retry run."""
    import pager_probe

    _policy_file(tmp_path, monkeypatch, on_failure_callback="pager_probe:page")
    probe = tmp_path / "pages.jsonl"
    monkeypatch.setenv("PAGER_PROBE_FILE", str(probe))
    assert _dag("gdpr_erasure_retry").on_failure_callback is pager_probe.page
    assert _dag("gdpr_subject_erasure").on_failure_callback is None  # an operator's typo pages nobody
    _overdue_pending_request(airflow_conns, Keys.from_extra(key_extra), "REQ-PAGE")
    downstream.telephony.stop()

    dag_run, logs = _run_dag("gdpr_erasure_retry", {}, caplog, capfd)

    assert str(dag_run.state) == "failed"
    pages = [json.loads(line) for line in probe.read_text().splitlines()]
    assert pages == [{"dag_id": "gdpr_erasure_retry", "run_id": dag_run.run_id, "reason": "task_failure",
                      "task_id": "check_deadlines"}]


def test_a_notifier_that_cannot_be_imported_keeps_the_dag_and_fails_its_last_task(
    airflow_home: Path, airflow_conns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _policy_file(tmp_path, monkeypatch, on_failure_callback="no_such_pager_module:page")
    assert _dag("gdpr_erasure_retry").on_failure_callback is None  # the DAG still loads
    dag_run, logs = _run_dag("gdpr_erasure_retry", {}, caplog, capfd)
    assert _states(dag_run) == {"preflight": "success", "retry_pending": "success", "check_deadlines": "failed",
                                "verify_audit_chain": "success", "audit_chain_failed": "skipped"}
    assert ("erasure.on_failure_callback `no_such_pager_module:page`: module no_such_pager_module cannot be imported"
            in logs)

    import pager_probe

    assert erasure_tasks.resolve_notifier("pager_probe:notifier") is pager_probe.notifier  # a BaseNotifier instance
    with pytest.raises(ValueError, match="is a class"):
        erasure_tasks.resolve_notifier("pager_probe:FilePager")
    with pytest.raises(ValueError, match="has no attribute"):
        erasure_tasks.resolve_notifier("pager_probe:pages")
