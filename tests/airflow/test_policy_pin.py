"""One policy per run: the first task pins the policy file's SHA-256, a later task refuses another file."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest

from helpers import CRM_TABLES, table_checksum

ROOT = Path(__file__).resolve().parents[2]
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)


def test_a_policy_file_changed_after_check_policy_is_refused_by_the_next_tasks(
    airflow_home: Path, airflow_conns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text((ROOT / "include" / "policy.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(policy_file))
    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("gdpr_retention_sweep")
    edited: list[str] = []

    def edit_the_policy(context) -> None:  # type: ignore[no-untyped-def]
        # Someone deploys a new policy while the run is between check_policy and plan (a comment suffices).
        policy_file.write_text(policy_file.read_text(encoding="utf-8") + "\n# edited during the run\n",
                               encoding="utf-8")
        edited.append(context["ti"].task_id)

    dag.get_task("check_policy").on_success_callback = [edit_the_policy]
    with psycopg.connect(airflow_conns) as conn:
        before = table_checksum(conn, CRM_TABLES)

    with caplog.at_level(logging.INFO):
        dag_run = dag.test(run_after=RUN_AFTER, logical_date=RUN_AFTER)
    logs = "".join(capfd.readouterr()) + caplog.text

    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert edited == ["check_policy"]
    assert str(dag_run.state) == "failed"
    assert states["check_policy"] == "success"
    assert states["plan"] == "failed" and states["write_register"] == "failed"
    assert states["apply"] == "upstream_failed"
    assert f"the policy file {policy_file} changed since check_policy validated it in this run" in logs
    assert "Clear the run from check_policy" in logs
    with psycopg.connect(airflow_conns) as conn:
        assert table_checksum(conn, CRM_TABLES) == before, "nothing ran on the other file"
