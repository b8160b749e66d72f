"""gdpr_optout_sync and example_check_before_import under dag.test(): real PostgreSQL (as the
least-privileged gdpr_dag role), real HTTP share target."""

from __future__ import annotations

import json
import logging
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from helpers import AS_OF, add_activity, add_contact
from warehouse_gdpr.engine import erasure, optout
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr_demo import embedded

ROOT = Path(__file__).resolve().parents[2]
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
TODAY = date(2026, 6, 15)
UNSUB = "dag.unsub@example.example"
PHOENIX = "dag.phoenix@example.example"


def _bag():  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag


def _run(dag_id: str, conf: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO):
        dag_run = _bag().get_dag(dag_id).test(run_after=RUN_AFTER, logical_date=RUN_AFTER, run_conf=conf)
    out, err = capfd.readouterr()
    return str(dag_run.state), out + err + caplog.text


@pytest.fixture
def export_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo policy, with an export file (relative to the policy's folder)."""
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    data["optout"]["export_path"] = "exports/suppression.txt"
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(path))
    return tmp_path / "exports" / "suppression.txt"


def _scenario(url: str, policy, keys: Keys) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """An unsubscribed contact, and a person erased (REQ-DAG-1) then re-imported."""
    with psycopg.connect(url) as conn:
        unsub = add_contact(conn, "lead", date(2025, 1, 1), email=UNSUB)
        add_activity(conn, unsub, "unsubscribe", date(2026, 6, 1))
        first = add_contact(conn, "prospect", date(2024, 1, 1), email=PHOENIX)
        conn.commit()
        request = erasure.parse_request({"email": PHOENIX, "request_id": "REQ-DAG-1"}, today=TODAY)
        located = erasure.locate(conn, policy, keys, request)
        erasure.erase(conn, policy, keys, RunContext("gdpr_subject_erasure", "r", "erase"), request, located,
                      erasure.holds_in_force(conn, policy, located, AS_OF))
        back = add_contact(conn, "lead", date(2026, 6, 10), email=PHOENIX.upper())
        add_activity(conn, back, "form_submit", date(2026, 6, 11))
        conn.commit()
    assert first != back
    return {"unsub": unsub, "back": back}


def test_both_dags_import_without_errors(airflow_home: Path) -> None:
    bag = _bag()
    sync = bag.get_dag("gdpr_optout_sync")
    example = bag.get_dag("example_check_before_import")
    assert sync is not None and example is not None
    assert {"check", "rekey", "collect", "guard_resurrections", "enforce", "share", "export", "report"} <= set(
        sync.task_ids)
    assert sync.params.get_param("dry_run").description
    for name in ("connection_id", "staging_table", "email_column", "target_table"):
        assert example.params.get_param(name).description, name


def test_sync_collects_catches_the_resurrection_enforces_and_shares(
    airflow_home: Path, airflow_conns: str, downstream, export_policy: Path, policy,  # type: ignore[no-untyped-def]
    key_extra: dict[str, Any], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    keys = Keys.from_extra(key_extra)
    ids = _scenario(airflow_conns, policy, keys)

    state, logs = _run("gdpr_optout_sync", {}, caplog, capfd)

    assert state == "success", logs[-4000:]
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM crm.contacts WHERE contact_id = %s",
                            (ids["back"],)).fetchone()[0] == 0
        assert conn.execute("SELECT do_not_contact FROM crm.contacts WHERE contact_id = %s",
                            (ids["unsub"],)).fetchone()[0]
        assert conn.execute("SELECT reason, source FROM gdpr.suppression_list WHERE email_hash = %s",
                            (keys.subject_hash(UNSUB),)).fetchone() == ("opt_out", "unsubscribe_activity")
        row = conn.execute("SELECT outcome, subject_hash, details->>'request_id', dag_id FROM gdpr.audit_log"
                           " WHERE action = 'resurrection'").fetchone()
        assert row == ("erased", keys.subject_hash(PHOENIX), "REQ-DAG-1", "gdpr_optout_sync")
        listed = {r[0] for r in conn.execute("SELECT email_hash FROM gdpr.suppression_list").fetchall()}
        steps = [r[0] for r in conn.execute(
            "SELECT DISTINCT action FROM gdpr.audit_log WHERE dag_id = 'gdpr_optout_sync'").fetchall()]
        with_at = conn.execute(
            "SELECT (SELECT count(*) FROM gdpr.suppression_list x WHERE position('@' in x::text) > 0)"
            " + (SELECT count(*) FROM gdpr.audit_log x WHERE position('@' in x::text) > 0)").fetchone()[0]
    assert with_at == 0
    assert set(steps) >= {"check_policy", "rekey", "collect", "resurrection_guard", "resurrection", "enforce",
                          "share", "export", "report"}
    assert downstream.emailing.blocklist_hashes() == listed
    assert set(export_policy.read_text().split()) == listed
    for value in (UNSUB, PHOENIX, PHOENIX.upper(), "Testperson"):
        assert value not in logs, "a personal value reached the task logs"
    assert "1 erased subject(s) found again" in logs

    # a second run finds nothing new and changes nothing
    state, logs = _run("gdpr_optout_sync", {}, caplog, capfd)
    assert state == "success", logs[-4000:]
    with psycopg.connect(airflow_conns) as conn:
        assert {r[0] for r in conn.execute("SELECT email_hash FROM gdpr.suppression_list").fetchall()} == listed
        assert conn.execute("SELECT count(*) FROM gdpr.audit_log WHERE action = 'resurrection'").fetchone()[0] == 1


def test_dry_run_changes_nothing(
    airflow_home: Path, airflow_conns: str, downstream, export_policy: Path, policy,  # type: ignore[no-untyped-def]
    key_extra: dict[str, Any], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    ids = _scenario(airflow_conns, policy, Keys.from_extra(key_extra))
    with psycopg.connect(airflow_conns) as conn:
        before = conn.execute("SELECT count(*) FROM gdpr.suppression_list").fetchone()[0]

    state, logs = _run("gdpr_optout_sync", {"dry_run": True}, caplog, capfd)

    assert state == "success", logs[-4000:]
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM gdpr.suppression_list").fetchone()[0] == before
        assert conn.execute("SELECT count(*) FROM crm.contacts WHERE contact_id = %s",
                            (ids["back"],)).fetchone()[0] == 1
        assert not conn.execute("SELECT do_not_contact FROM crm.contacts WHERE contact_id = %s",
                                (ids["unsub"],)).fetchone()[0]
        outcomes = {r[0] for r in conn.execute(
            "SELECT outcome FROM gdpr.audit_log WHERE dag_id = 'gdpr_optout_sync'"
            " AND action IN ('rekey', 'collect', 'resurrection_guard', 'enforce', 'share', 'export')").fetchall()}
    assert outcomes == {"dry_run"}
    assert downstream.emailing.blocklist_hashes() == set()
    assert not export_policy.exists()
    assert "1 erased subject(s) found again" in logs and "DRY RUN" in logs


def test_a_broken_source_fails_the_check_before_any_change(
    airflow_home: Path, airflow_conns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    data["optout"]["sources"].append({"name": "typo", "predicate": "s.opted_out_flag"})
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(path))

    state, logs = _run("gdpr_optout_sync", {}, caplog, capfd)

    assert state == "failed"
    assert "optout.sources[2] (typo).predicate: does not compile" in logs
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM gdpr.suppression_list").fetchone()[0] == 0


def test_example_check_before_import_drops_suppressed_people(
    airflow_home: Path, airflow_conns: str, policy, key_extra: dict[str, Any],  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    keys = Keys.from_extra(key_extra)
    _scenario(airflow_conns, policy, keys)
    with psycopg.connect(airflow_conns) as conn:
        optout.collect(conn, policy, keys, RunContext("gdpr_optout_sync", "r", "collect"), AS_OF)
        conn.execute("CREATE SCHEMA staging")
        conn.execute("CREATE TABLE staging.contact_import (LIKE crm.contacts INCLUDING DEFAULTS)")
        company = conn.execute("SELECT min(company_id) FROM crm.companies").fetchone()[0]
        for cid, email in [(8_000_001, " Dag.Unsub@Example.example"), (8_000_002, PHOENIX),
                           (8_000_003, "new.person@example.example"), (8_000_004, "other.new@example.example")]:
            conn.execute("INSERT INTO staging.contact_import (contact_id, company_id, status, email, created_at)"
                         " VALUES (%s, %s, 'prospect', %s, now())", (cid, company, email))
        conn.commit()
    # the loader's own connection (here the warehouse owner: it may insert into crm.contacts)
    monkeypatch.setenv("AIRFLOW_CONN_CRM_LOADER", json.dumps(embedded.airflow_conn_json(airflow_conns)))

    state, logs = _run("example_check_before_import", {"connection_id": "crm_loader"}, caplog, capfd)

    assert state == "success", logs[-4000:]
    with psycopg.connect(airflow_conns) as conn:
        loaded = [r[0] for r in conn.execute(
            "SELECT contact_id FROM crm.contacts WHERE contact_id BETWEEN 8000001 AND 8000004 ORDER BY 1").fetchall()]
        assert conn.execute("SELECT count(*) FROM staging.contact_import").fetchone()[0] == 0
    assert loaded == [8_000_003, 8_000_004]
    assert "2 suppressed person(s) dropped, 2 row(s) loaded" in logs
    assert "new.person@example.example" not in logs and UNSUB not in logs
