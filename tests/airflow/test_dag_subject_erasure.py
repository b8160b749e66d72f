"""gdpr_subject_erasure and gdpr_erasure_retry under dag.test(): real PostgreSQL, real HTTP targets."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from scripted_http import ScriptedServer
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
    with caplog.at_level(logging.INFO):
        dag_run = _dag(dag_id).test(run_after=run_after, logical_date=run_after, run_conf=conf)
    out, err = capfd.readouterr()
    return str(dag_run.state), out + err + caplog.text


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


@pytest.mark.parametrize(
    "conf",
    [
        {"email": "x@", "request_id": "REQ-1"},
        {"email": "p\u0430ul@example.com", "request_id": "REQ-1"},  # Cyrillic look-alike
        {"email": "'; drop table crm.contacts; --", "request_id": "REQ-1"},
        {"email": "paul@example.com", "request_id": "'; drop table x"},
        {"email": "paul@example.com"},  # no request id
    ],
)
def test_bad_params_are_refused_before_any_run(
    airflow_home: Path, airflow_conns: str, conf: dict, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):
        _dag("gdpr_subject_erasure").test(run_after=RUN_AFTER, logical_date=RUN_AFTER, run_conf=conf)
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0] == 0  # type: ignore[index]


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
