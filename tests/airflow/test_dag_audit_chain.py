"""Every DAG's last task verifies the audit chain and exports its head (dag.test(), real PostgreSQL as the
least-privileged gdpr_dag role, the heads in a real folder through airflow.sdk.ObjectStoragePath)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
DAGS = ("gdpr_retention_sweep", "gdpr_subject_erasure", "gdpr_erasure_retry", "gdpr_optout_sync",
        "gdpr_subject_access")
CHAIN_TASKS = {"verify_audit_chain", "audit_chain_failed"}


def _dag(dag_id: str):  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag(dag_id)


@pytest.fixture
def evidence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo policy with its own evidence folder."""
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text(encoding="utf-8"))
    data["evidence"] = {"location": str(tmp_path / "evidence")}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(path))
    return tmp_path / "evidence"


def _run(dag_id: str, conf: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
         hours: int = 0) -> tuple[str, dict[str, str], str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    capfd.readouterr()
    caplog.clear()
    when = RUN_AFTER + timedelta(hours=hours)
    with caplog.at_level(logging.INFO):
        dag_run = _dag(dag_id).test(run_after=when, logical_date=when, run_conf=conf)
    out, err = capfd.readouterr()
    with create_session() as session:
        rows = session.execute(select(TaskInstance.task_id, TaskInstance.state).where(
            TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id)).all()
    return str(dag_run.state), {t: str(s) for t, s in rows}, out + err + caplog.text


def _heads(evidence: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(evidence.glob("audit_chain/*/head-*.json"))]


def _superuser(url: str, *statements: str) -> None:
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute("ALTER TABLE gdpr.audit_log DISABLE TRIGGER ALL")
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]
        for trigger in ("audit_log_no_update_delete", "audit_log_no_truncate", "audit_log_chain"):
            conn.execute(f"ALTER TABLE gdpr.audit_log ENABLE ALWAYS TRIGGER {trigger}")  # type: ignore[arg-type]


def _history(url: str, n: int) -> None:
    """n audit rows written meanwhile (another DAG's steps)."""
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute("INSERT INTO gdpr.audit_log (dag_id, action, outcome) SELECT 'gdpr_optout_sync', 'enforce', 'ok'"
                     " FROM generate_series(1, %s)", (n,))


def _last_rows(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT audit_id, chain_seq, row_hash, action, outcome, details FROM gdpr.audit_log"
                            " ORDER BY chain_seq").fetchall()


@pytest.mark.parametrize("dag_id", DAGS)
def test_every_dag_ends_with_the_audit_chain_check(airflow_home: Path, dag_id: str) -> None:
    from airflow.sdk.exceptions import AirflowFailException  # noqa: F401 - the DAG factory's import works

    dag = _dag(dag_id)
    verify = dag.get_task("verify_audit_chain")
    failed = dag.get_task("audit_chain_failed")
    assert verify.is_teardown and not verify.on_failure_fail_dagrun  # the other tasks decide the run's state ...
    assert failed.trigger_rule == "one_failed" and failed.upstream_task_ids == {"verify_audit_chain"}  # ... and this
    assert failed.downstream_task_ids == set()
    others = {t.task_id for t in dag.tasks} - CHAIN_TASKS
    assert others <= verify.get_flat_relative_ids(upstream=True), "every other task runs before the check"


def test_each_run_verifies_from_the_previous_head_and_exports_its_own(
    airflow_home: Path, airflow_conns: str, evidence: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    state, states, logs = _run("gdpr_retention_sweep", {"dry_run": True}, caplog, capfd)

    assert state == "success", logs[-3000:]
    assert states["verify_audit_chain"] == "success" and states["audit_chain_failed"] == "skipped"
    assert "No audit chain head of chain" in logs and "verifying the whole chain from its first row" in logs
    rows = _last_rows(airflow_conns)
    assert f"Audit chain holds: {len(rows)} row(s) recomputed, positions 1 to {len(rows)}" in logs
    [head] = _heads(evidence)  # the last row, exported; the check itself writes no audit row
    assert (head["chain_seq"], head["audit_id"], head["row_hash"]) == (len(rows), rows[-1][0], rows[-1][2])
    assert head["exported_by"].startswith("gdpr_retention_sweep/")

    _history(airflow_conns, 3)
    state, states, logs = _run("gdpr_erasure_retry", {}, caplog, capfd)

    assert state == "success", logs[-3000:]
    assert states["verify_audit_chain"] == "success"
    rows_after = _last_rows(airflow_conns)
    new = len(rows_after) - len(rows)
    # From the previous head: that row, then every row after it.
    assert f"Audit chain holds: {new + 1} row(s) recomputed, positions {len(rows)} to {len(rows_after)}" in logs
    heads = _heads(evidence)
    assert [h["chain_seq"] for h in heads] == [len(rows), len(rows_after)]
    assert heads[-1]["exported_by"].startswith("gdpr_erasure_retry/")
    assert "@" not in json.dumps(heads)


def test_a_row_edited_since_the_last_export_fails_the_next_run(
    airflow_home: Path, airflow_conns: str, evidence: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _history(airflow_conns, 3)
    state, _, logs = _run("gdpr_erasure_retry", {}, caplog, capfd)
    assert state == "success", logs[-3000:]
    _history(airflow_conns, 2)
    rows = _last_rows(airflow_conns)
    _superuser(airflow_conns, f"UPDATE gdpr.audit_log SET outcome = 'forged' WHERE audit_id = {rows[-1][0]}")

    state, states, logs = _run("gdpr_erasure_retry", {}, caplog, capfd, hours=1)

    assert state == "failed"
    assert states == {"preflight": "success", "retry_pending": "success", "check_deadlines": "success",
                      "verify_audit_chain": "failed", "audit_chain_failed": "failed"}
    assert (f"the audit chain is broken at audit row audit id {rows[-1][0]}, chain position {rows[-1][1]}: its "
            "content does not match its hash: the row was edited") in logs
    assert len(_heads(evidence)) == 1, "a broken chain's head is not exported"


def test_a_truncated_tail_fails_the_next_run(
    airflow_home: Path, airflow_conns: str, evidence: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _history(airflow_conns, 4)
    state, _, logs = _run("gdpr_erasure_retry", {}, caplog, capfd)
    assert state == "success", logs[-3000:]
    [head] = _heads(evidence)
    rows = _last_rows(airflow_conns)
    keep = rows[-4]  # delete the last three rows, the exported head's among them, and rewind the database's head
    _superuser(airflow_conns, f"DELETE FROM gdpr.audit_log WHERE chain_seq > {keep[1]}",
               f"UPDATE gdpr.audit_chain_head SET chain_seq = {keep[1]}, audit_id = {keep[0]}, row_hash = '{keep[2]}'")

    state, states, logs = _run("gdpr_erasure_retry", {}, caplog, capfd, hours=1)

    assert state == "failed" and states["verify_audit_chain"] == "failed"
    assert (f"the audit chain is broken at audit row audit id {head['audit_id']}, chain position {head['chain_seq']}: "
            "the row of the head exported outside the warehouse") in logs
    assert "is gone: rows were deleted or the warehouse was restored from an older backup" in logs


def test_the_weekly_sweep_recomputes_the_whole_chain(
    airflow_home: Path, airflow_conns: str, evidence: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """A row deleted before the last exported head: the sweep's check recomputes every row and finds it."""
    state, _, logs = _run("gdpr_retention_sweep", {"dry_run": True}, caplog, capfd)
    assert state == "success", logs[-3000:]
    rows = _last_rows(airflow_conns)
    _superuser(airflow_conns, f"DELETE FROM gdpr.audit_log WHERE audit_id = {rows[2][0]}")

    state, states, logs = _run("gdpr_retention_sweep", {"dry_run": True}, caplog, capfd, hours=24 * 7)

    assert state == "failed" and states["verify_audit_chain"] == "failed"
    assert states["report"] == "success" and states["write_register"] == "success"
    assert (f"the audit chain is broken at audit row audit id {rows[3][0]}, chain position 4: the chain skips "
            "position 3") in logs


def test_a_failed_task_still_fails_the_run_after_a_good_check(
    airflow_home: Path, airflow_conns: str, evidence: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """The check is a teardown: it runs after a failure, and leaves the run failed (the template's first
    sweep stops at the blast-radius limit without a confirmation)."""
    state, states, logs = _run("gdpr_retention_sweep", {}, caplog, capfd)

    assert state == "failed"
    assert states["apply"] == "failed" and states["report"] == "upstream_failed"
    assert states["verify_audit_chain"] == "success" and states["audit_chain_failed"] == "skipped"
    assert len(_heads(evidence)) == 1
