"""The gdpr_retention_sweep DAG: import, a whole dag.test() run, dry run, and PII-free task logs."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import CRM_TABLES, table_checksum
from warehouse_gdpr.engine.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[2]
# dag.test() runs as of this instant: 2026-06-15, the template's "today".
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
# The template's first sweep treats more than 10 % of its 1500 contacts in two rules (346 prospects,
# 222 leads): a real run needs the operator's confirmation, as the demo's first sweep does.
CONFIRMED = {"confirm_blast_radius": {"prospects_never_converted": 346, "leads_not_converted": 222}}


def _dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_dagbag_imports_without_errors(airflow_home: Path) -> None:
    bag = _dagbag()
    assert bag.import_errors == {}
    dag = bag.get_dag("gdpr_retention_sweep")
    assert dag is not None
    assert {"gdpr", "retention"} <= set(dag.tags)
    order = [t.task_id for t in dag.topological_sort() if t.task_id != "write_register"]
    assert order == ["check_policy", "plan", "apply", "purge_archive", "purge_requests", "purge_access_packages",
                     "report", "verify_audit_chain", "audit_chain_failed"]
    # The register runs beside the sweep: an unfinished register never delays a deletion (only the run's
    # last check, the audit chain's, follows it).
    assert dag.get_task("write_register").upstream_task_ids == {"check_policy"}
    assert dag.get_task("write_register").downstream_task_ids == {"verify_audit_chain"}
    assert all(t.retries >= 2 for t in dag.tasks)
    assert set(dag.params.keys()) == {"dry_run", "rules", "confirm_blast_radius"}


def _personal_values(conn: psycopg.Connection) -> list[str]:
    """Every seeded email and phone, and every full name and note body: none may reach a log."""
    values: list[str] = []
    for email, phone, first, last in conn.execute(
        "SELECT email, direct_phone, first_name, last_name FROM crm.contacts"
    ).fetchall():
        values.append(email)
        if phone:
            values.append(phone)
        if first and last:
            values.append(f"{first} {last}")
    values += [r[0] for r in conn.execute("SELECT DISTINCT body FROM crm.notes").fetchall()]
    conn.rollback()
    return values


def _run(dag_conf: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> tuple[str, str]:
    dag = _dagbag().get_dag("gdpr_retention_sweep")
    with caplog.at_level(logging.INFO):
        dag_run = dag.test(run_after=RUN_AFTER, logical_date=RUN_AFTER, run_conf=dag_conf)
    out, err = capfd.readouterr()
    logs = out + err + caplog.text
    return str(dag_run.state), logs


def test_whole_dag_run_sweeps_and_logs_no_personal_data(
    airflow_home: Path, airflow_conns: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(airflow_conns) as conn:
        personal = _personal_values(conn)
        before = conn.execute("SELECT count(*) FROM crm.contacts").fetchone()[0]  # type: ignore[index]
        # Requests completed more than requests.keep_for (P3Y) before the run's 2026-06-15, and one within it.
        conn.execute(
            "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome,"
            " completed_at) VALUES"
            " ('REQ-2022-1', 'erasure', repeat('a', 64), '2022-12-01', '2023-01-01', 'completed', 'erased',"
            "  '2022-12-20'),"
            " ('REQ-2023-1', 'access', repeat('b', 64), '2023-05-01', '2023-06-01', 'completed', 'answered',"
            "  '2023-05-30'),"
            " ('REQ-2023-2', 'erasure', repeat('c', 64), '2023-06-01', '2023-07-01', 'completed', 'erased',"
            "  '2023-06-20')")
        conn.execute("INSERT INTO gdpr.erasure_propagation (request_id, target, status) VALUES"
                     " ('REQ-2022-1', 'emailing', 'acknowledged'), ('REQ-2023-2', 'emailing', 'acknowledged')")

    state, logs = _run(CONFIRMED, caplog, capfd)

    assert state == "success", logs[-3000:]
    assert "Apply summary" in logs and "prospects_never_converted" in logs
    leaked = [v for v in personal if v in logs]
    assert leaked == [], f"{len(leaked)} personal value(s) found in task logs"
    assert not re.search(r"[\w.+-]+@[\w-]+\.example", logs), "an email address reached the logs"
    with psycopg.connect(airflow_conns) as conn:
        after = conn.execute("SELECT count(*) FROM crm.contacts").fetchone()[0]  # type: ignore[index]
        steps = {
            r[0] for r in conn.execute(
                "SELECT DISTINCT task_id FROM gdpr.audit_log WHERE dag_id = 'gdpr_retention_sweep'"
            ).fetchall()
        }
        audit_text = conn.execute("SELECT string_agg(a::text, ' ') FROM gdpr.audit_log a").fetchone()[0]  # type: ignore[index]
        pseudonymised = conn.execute(
            "SELECT count(*) FROM crm.contacts WHERE pseudonymised_at IS NOT NULL").fetchone()[0]  # type: ignore[index]
        stored = conn.execute("SELECT sha256, activities FROM gdpr.processing_register").fetchall()
        kept = conn.execute("SELECT request_id FROM gdpr.request").fetchall()
        outbox = conn.execute("SELECT request_id FROM gdpr.erasure_propagation").fetchall()
        totals = conn.execute("SELECT details->'totals' FROM gdpr.audit_log WHERE action = 'report'").fetchone()[0]  # type: ignore[index]
    assert after < before and pseudonymised > 0
    assert steps == {"check_policy", "plan", "apply", "purge_archive", "purge_requests", "purge_access_packages",
                     "report", "write_register"}
    assert kept == [("REQ-2023-2",)] and outbox == [("REQ-2023-2",)]  # three years after completion, then purged
    assert totals["-/purge_requests/gdpr.request"] == 2 and totals["-/purge_requests/gdpr.erasure_propagation"] == 1
    assert "2 request(s) and 1 outbox row(s) removed" in logs
    assert "@" not in audit_text
    register_md = airflow_home / "gdpr_register" / "register.md"
    assert "## Processing activity 1" in register_md.read_text(encoding="utf-8")
    assert (airflow_home / "gdpr_register" / "register.html").is_file()
    assert len(stored) == 1 and stored[0][1] == 2  # kept in the warehouse too (workers may be ephemeral)


def test_an_incomplete_register_fails_the_run_but_not_the_sweep(
    airflow_home: Path, airflow_conns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text(encoding="utf-8"))
    del data["processing_register"]["activities"][0]["security_measures"]
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(policy_file))

    dag = _dagbag().get_dag("gdpr_retention_sweep")
    with caplog.at_level(logging.INFO):
        dag_run = dag.test(run_after=RUN_AFTER, logical_date=RUN_AFTER, run_conf=CONFIRMED)
    logs = "".join(capfd.readouterr()) + caplog.text

    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "failed"
    assert states["write_register"] == "failed"
    assert states["apply"] == "success" and states["report"] == "success"
    assert "activities[0].security_measures: required" in logs


def test_dry_run_changes_no_row(
    airflow_home: Path, airflow_conns: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(airflow_conns) as conn:
        before = table_checksum(conn, [*CRM_TABLES, "gdpr_archive.archived_row"])

    state, logs = _run({"dry_run": True}, caplog, capfd)

    assert state == "success", logs[-3000:]
    assert "DRY RUN" in logs
    with psycopg.connect(airflow_conns) as conn:
        assert table_checksum(conn, [*CRM_TABLES, "gdpr_archive.archived_row"]) == before
        rows = conn.execute(
            "SELECT action, outcome, dry_run FROM gdpr.audit_log WHERE task_id = 'apply'"
        ).fetchall()
        stored = conn.execute("SELECT count(*) FROM gdpr.processing_register").fetchone()[0]  # type: ignore[index]
    assert rows and all(r[2] for r in rows)
    # The plan, and the two rules a real run would stop at the blast-radius limit (a dry run never stops).
    assert [r[1] for r in rows if r[0] != "blast_radius"] == ["dry_run"] * 3
    assert [r[1] for r in rows if r[0] == "blast_radius"] == ["unconfirmed"] * 2
    assert "DRY RUN: a real run would stop here" in logs
    assert stored == 0, "a dry run stores no register version"


def test_a_policy_without_a_register_section_skips_the_register(
    airflow_home: Path, airflow_conns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text(encoding="utf-8"))
    del data["processing_register"]
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(policy_file))

    dag_run = _dagbag().get_dag("gdpr_retention_sweep").test(
        run_after=RUN_AFTER, logical_date=RUN_AFTER, run_conf={"dry_run": True})

    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "success"
    assert states["write_register"] == "skipped" and states["report"] == "success"


def test_bad_keys_fail_before_any_write(
    airflow_home: Path, airflow_conns: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_GDPR_KEYS",
                       '{"conn_type": "generic", "extra": {"hmac_key_id": "p1", "hmac_pepper": "c2hvcnQ="}}')
    with psycopg.connect(airflow_conns) as conn:
        before = table_checksum(conn, CRM_TABLES)

    state, logs = _run({}, caplog, capfd)

    assert state == "failed"
    assert "hmac_pepper is 5 bytes" in logs
    assert "c2hvcnQ=" not in logs, "a secret value reached the logs"
    with psycopg.connect(airflow_conns) as conn:
        assert table_checksum(conn, CRM_TABLES) == before
        assert conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0] == 0  # type: ignore[index]


# -- the blast-radius limit (issue 11.3) ------------------------------------------------------------


def _delete_everyone_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong rule: every status, expired one day after the last interaction or creation."""
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text(encoding="utf-8"))
    data["rules"] = [{
        "name": "everyone", "statuses": {"column": "status", "values": ["prospect", "lead", "client", "former_client"]},
        "clock": {"kind": "last_interaction", "fallback": "created_at"}, "retain_for": "P1D", "action": "delete",
    }]
    del data["processing_register"]
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(policy_file))


def _blast_rows(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT task_id, rule, table_name, outcome, row_count, details->'confirmed', details->'subject_rows'"
            " FROM gdpr.audit_log WHERE action = 'blast_radius' ORDER BY audit_id"
        ).fetchall()


def test_the_blast_radius_limit_stops_a_delete_everything_rule_until_confirmed(
    airflow_home: Path, airflow_conns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    _delete_everyone_policy(tmp_path, monkeypatch)
    with psycopg.connect(airflow_conns) as conn:
        before = table_checksum(conn, [*CRM_TABLES, "crm.support_tickets"])

    state, logs = _run({}, caplog, capfd)

    assert state == "failed"
    match = re.search(r"everyone: would delete (\d+) of 1500 subjects \((\d+\.\d) %\)", logs)
    assert match, logs[-3000:]
    count = int(match.group(1))
    assert count > 150  # above the default 10 %
    assert f'{{"confirm_blast_radius": {{"everyone": {count}}}}}' in logs
    assert "docs/runbook.md" in logs
    with psycopg.connect(airflow_conns) as conn:
        assert table_checksum(conn, [*CRM_TABLES, "crm.support_tickets"]) == before
        assert conn.execute(
            "SELECT count(*) FROM gdpr.audit_log WHERE action IN ('batch', 'delete')").fetchone()[0] == 0  # type: ignore[index]
    assert _blast_rows(airflow_conns) == [("apply", "everyone", "crm.contacts", "stopped", count, None, 1500)]

    # A confirmation below the planned count stops it again, naming both counts.
    state, logs = _run({"confirm_blast_radius": {"everyone": count - 1}}, caplog, capfd)
    assert state == "failed"
    assert f"everyone: would delete {count} of 1500 subjects" in logs and f"more than the {count - 1} confirmed" in logs
    with psycopg.connect(airflow_conns) as conn:
        assert table_checksum(conn, [*CRM_TABLES, "crm.support_tickets"]) == before

    # The count the stopped run reported lets it run, and the confirmation is audited.
    state, logs = _run({"confirm_blast_radius": {"everyone": count}}, caplog, capfd)
    assert state == "success", logs[-3000:]
    with psycopg.connect(airflow_conns) as conn:
        deleted = conn.execute(
            "SELECT sum(row_count) FROM gdpr.audit_log WHERE action = 'delete' AND table_name = 'crm.contacts'"
        ).fetchone()[0]  # type: ignore[index]
    assert deleted == count
    assert _blast_rows(airflow_conns)[-1] == ("apply", "everyone", "crm.contacts", "confirmed", count, count, 1500)


def test_a_bad_confirm_blast_radius_param_is_refused_by_the_first_task() -> None:
    """check_policy reads the param with these rules (the trigger form's JSON schema says the same)."""
    from warehouse_gdpr.airflow.tasks import sweep as sweep_tasks
    from warehouse_gdpr.engine.policy import load_policy

    policy = load_policy(ROOT / "include" / "policy.yaml")
    for value, message in [
        ({"everyone": 10}, "confirm_blast_radius names unknown rule(s) everyone; the policy defines:"),
        ({"former_clients": True}, "confirm_blast_radius: the count of former_clients must be a whole number >= 0"),
        ({"former_clients": -1}, "confirm_blast_radius: the count of former_clients must be a whole number >= 0"),
        ([346], "confirm_blast_radius must map rule names to counts"),
    ]:
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            sweep_tasks._confirmations({"params": {"confirm_blast_radius": value}}, policy)
    assert sweep_tasks._confirmations({"params": {"confirm_blast_radius": None}}, policy) == {}
