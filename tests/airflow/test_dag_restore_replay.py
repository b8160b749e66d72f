"""A restore from a backup (issue 15, "Erasures replayed after a restore"): pg_dump of the demo warehouse, an erasure
through gdpr_subject_erasure (the demo's real downstream services), pg_restore of the dump; every DAG's first task
then refuses to run; gdpr_restore_replay erases the person again (catalog-wide scan), with the suppression entry and
the downstream acknowledgements back, records the restore beside the audit chain's heads, and the DAGs run again.
dag.test(), the real PostgreSQL as the least-privileged gdpr_dag role, pg_dump / pg_restore of the embedded
PostgreSQL wheel."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from helpers import add_activity, add_contact, capture_persons, pii_scan
from warehouse_gdpr_demo import embedded

ROOT = Path(__file__).resolve().parents[2]
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
PERSON = {"email": "zoe.replay@example.org", "request_id": "REQ-RESTORE-1"}
RESTRICTED = {"email": "yann.restricted@example.org", "request_id": "REQ-RESTORE-RS"}
# Each DAG with params its trigger form accepts; the first task refuses before it reads them.
FIRST_TASKS = {
    "gdpr_retention_sweep": ("check_policy", {"dry_run": True}),
    "gdpr_subject_erasure": ("validate_request", {"email": "someone.else@example.org", "request_id": "REQ-R-2",
                                                  "dry_run": True}),
    "gdpr_propagation_retry": ("preflight", {}),
    "gdpr_erasure_retry": ("preflight", {}),
    "gdpr_optout_sync": ("check", {"dry_run": True}),
    "gdpr_subject_access": ("validate_request", {"email": "someone.else@example.org", "request_id": "REQ-R-3",
                                                 "dry_run": True}),
    "gdpr_subject_rectification": ("validate_request", {"email": "someone.else@example.org", "request_id": "REQ-R-4",
                                                        "changes": {"direct_phone": "+33 1 23 45 67 89"},
                                                        "dry_run": True}),
    "gdpr_subject_restriction": ("validate_request", {"email": "someone.else@example.org", "request_id": "REQ-R-5",
                                                      "dry_run": True}),
}


def _dag(dag_id: str):  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag(dag_id)


@pytest.fixture
def evidence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo policy with its own evidence folder and short retries."""
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text(encoding="utf-8"))
    data["evidence"] = {"location": str(tmp_path / "evidence")}
    data["erasure"]["retries"] = 1
    data["erasure"]["retry_delay_seconds"] = 1
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(path))
    return tmp_path / "evidence"


def _run(dag_id: str, conf: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
         minutes: int) -> tuple[str, dict[str, str], str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    capfd.readouterr()
    caplog.clear()
    when = RUN_AFTER + timedelta(minutes=minutes)
    with caplog.at_level(logging.INFO):
        dag_run = _dag(dag_id).test(run_after=when, logical_date=when, run_conf=conf)
    out, err = capfd.readouterr()
    with create_session() as session:
        rows = session.execute(select(TaskInstance.task_id, TaskInstance.state, TaskInstance.map_index).where(
            TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id)).all()
    states = {t + (f"[{m}]" if m >= 0 else ""): str(s) for t, s, m in rows}
    return str(dag_run.state), states, out + err + caplog.text


def _pg(tool: str, *args: str) -> None:
    binary = embedded.bin_dir()
    assert binary is not None and (binary / tool).exists(), f"{tool} ships with the embedded PostgreSQL wheel"
    done = subprocess.run([str(binary / tool), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def _restore(server_url: str, warehouse: str, dump: Path) -> None:
    """What a DBA does: drop the damaged database, create it again, pg_restore the dump into it."""
    name = str(conninfo_to_dict(warehouse)["dbname"])
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    _pg("pg_restore", "--exit-on-error", f"--dbname={warehouse}", str(dump))


def _snapshot(url: str) -> tuple:
    with psycopg.connect(url) as conn:
        return (conn.execute("SELECT count(*), max(chain_seq) FROM gdpr.audit_log").fetchone(),
                conn.execute("SELECT count(*) FROM gdpr.suppression_list").fetchone(),
                conn.execute("SELECT count(*) FROM crm.contacts").fetchone())


def test_a_restored_warehouse_is_refused_by_every_dag_until_the_replay_erases_the_person_again(
    airflow_home: Path, airflow_conns: str, server_url: str, downstream, evidence: Path, keys,  # type: ignore[no-untyped-def]
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    warehouse = airflow_conns
    email = PERSON["email"]
    with psycopg.connect(warehouse) as conn:  # the person, in the CRM and in every downstream system
        contact_id = add_contact(conn, "prospect", date(2026, 5, 1), email=email)
        add_activity(conn, contact_id, "email_reply", date(2026, 5, 2))
    downstream.add_person(email)
    with psycopg.connect(warehouse) as conn:  # a second person, restricted after the backup
        restricted_id = add_contact(conn, "prospect", date(2026, 5, 1), email=RESTRICTED["email"])
        conn.execute("UPDATE crm.contacts SET do_not_contact = false WHERE contact_id = %s", (restricted_id,))
    downstream.add_person(RESTRICTED["email"])
    state, _, logs = _run("gdpr_retention_sweep", {"dry_run": True}, caplog, capfd, 0)  # a head exported
    assert state == "success", logs[-3000:]

    dump = tmp_path / "warehouse.dump"
    _pg("pg_dump", "--format=custom", f"--file={dump}", f"--dbname={warehouse}")
    with psycopg.connect(warehouse) as conn:
        person = capture_persons(conn)[contact_id]
        others = [p for i, p in capture_persons(conn).items() if i != contact_id]

    state, states, logs = _run("gdpr_subject_erasure", PERSON, caplog, capfd, 1)
    assert state == "success", logs[-3000:]
    with psycopg.connect(warehouse) as conn:
        assert pii_scan(conn, [person], not_theirs=others)[0] == []
        acknowledged = conn.execute("SELECT target, status FROM gdpr.erasure_propagation WHERE request_id = %s"
                                    " ORDER BY 1", (PERSON["request_id"],)).fetchall()
    assert {s for _, s in acknowledged} == {"acknowledged"} and len(acknowledged) == 3
    state, _, logs = _run("gdpr_subject_restriction", RESTRICTED, caplog, capfd, 1)
    assert state == "success", logs[-3000:]
    told = {"event": "restricted", "request_id": RESTRICTED["request_id"], "subject_table": "crm.contacts",
            "subject_ids": [str(restricted_id)]}
    assert downstream.webhook.notifications() == [told]
    with psycopg.connect(warehouse) as conn:
        restriction_outbox = conn.execute("SELECT target, status FROM gdpr.erasure_propagation WHERE request_id = %s"
                                          " ORDER BY 1", (RESTRICTED["request_id"],)).fetchall()
    assert restriction_outbox == [("emailing", "acknowledged"), ("sales_team", "acknowledged"),
                                  ("telephony", "acknowledged")]
    journal_files = sorted((evidence / "journal").rglob("*.jsonl"))
    assert journal_files, "the erasure was journaled outside the warehouse"
    assert email not in "".join(p.read_text() for p in journal_files).lower()

    _restore(server_url, warehouse, dump)
    with psycopg.connect(warehouse) as conn:
        assert pii_scan(conn, [person], not_theirs=others)[0] != [], "the backup brought the person back"
    before = _snapshot(warehouse)

    for minutes, (dag_id, (first, conf)) in enumerate(sorted(FIRST_TASKS.items()), 2):
        state, states, logs = _run(dag_id, conf, caplog, capfd, minutes)
        assert state == "failed", (dag_id, logs[-3000:])
        assert states[first] == "failed", (dag_id, states)
        assert "this warehouse is behind the journal kept outside it" in logs, (dag_id, logs[-3000:])
        assert "3 entries (1 erasure, 1 restriction, 1 suppression) are missing" in logs
        assert "trigger gdpr_restore_replay" in logs
        assert states["verify_audit_chain"] == "skipped", (dag_id, states)
        assert email not in logs
    assert _snapshot(warehouse) == before, "nothing ran on the restored warehouse"

    state, states, logs = _run("gdpr_restore_replay", {}, caplog, capfd, 20)

    assert state == "success", logs[-4000:]
    assert all(s == "success" for t, s in states.items() if t != "audit_chain_failed"), states
    assert email not in logs and RESTRICTED["email"] not in logs
    with psycopg.connect(warehouse) as conn:
        hits, looked_for = pii_scan(conn, [person], not_theirs=others)
        assert hits == [] and looked_for["emails"] == 1
        subject_hash = keys.subject_hash(email)
        assert conn.execute("SELECT reason, request_id FROM gdpr.suppression_list WHERE email_hash = %s",
                            (subject_hash,)).fetchall() == [("erasure", PERSON["request_id"])]
        assert conn.execute("SELECT target, status FROM gdpr.erasure_propagation WHERE request_id = %s ORDER BY 1",
                            (PERSON["request_id"],)).fetchall() == acknowledged
        assert conn.execute("SELECT status, outcome FROM gdpr.request WHERE request_id = %s",
                            (PERSON["request_id"],)).fetchall() == [("completed", "erased")]
        # The restriction: in force again, its request recorded, sent downstream again by the replay's retry
        # task (the restored outbox had no row for it), acknowledged, the request completed.
        assert conn.execute("SELECT subject_ids FROM gdpr.restriction WHERE request_id = %s",
                            (RESTRICTED["request_id"],)).fetchall() == [([str(restricted_id)],)]
        assert conn.execute("SELECT target, status FROM gdpr.erasure_propagation WHERE request_id = %s ORDER BY 1",
                            (RESTRICTED["request_id"],)).fetchall() == restriction_outbox
        assert conn.execute("SELECT kind, status, outcome FROM gdpr.request WHERE request_id = %s",
                            (RESTRICTED["request_id"],)).fetchall() == [("restriction", "completed", "restricted")]
        detected = conn.execute("SELECT details FROM gdpr.audit_log WHERE action = 'restore_detected'").fetchall()
        replayed = conn.execute("SELECT details->>'request_id', details->>'kind' FROM gdpr.audit_log"
                                " WHERE action = 'restore_replay' ORDER BY 2").fetchall()
    assert replayed == [(PERSON["request_id"], "erasure"), (RESTRICTED["request_id"], "restriction"),
                        (PERSON["request_id"], "suppression")]
    assert downstream.webhook.notifications() == [told, told], "the sales team was told again"
    assert downstream.emailing.contact(RESTRICTED["email"])["emailBlacklisted"] is True
    assert downstream.telephony.contact(RESTRICTED["email"])["restricted"] is True
    [(details,)] = detected
    assert details["missing_entries"] == 3 and details["lost_positions"][0] == details["log_end"]["chain_seq"] + 1
    [marker] = list(evidence.glob("audit_chain/*/restore-0001/restored.json"))
    recorded = json.loads(marker.read_text())
    assert recorded["superseded_head"]["chain_seq"] == details["exported_head"]["chain_seq"]
    assert list(marker.parent.glob("head-*.json")), "the replay's own run exported its head after the restore"

    # A replay whose record outside the warehouse was not written (the evidence store failed after its commit):
    # run again, it writes it from its restore_detected row, nothing replayed or recorded twice.
    shutil.rmtree(marker.parent)
    state, states, logs = _run("gdpr_restore_replay", {}, caplog, capfd, 25)
    assert state == "success", logs[-4000:]
    assert json.loads(marker.read_text())["superseded_head"] == recorded["superseded_head"]
    with psycopg.connect(warehouse) as conn:
        assert conn.execute("SELECT count(*) FROM gdpr.audit_log WHERE action = 'restore_detected'").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM gdpr.audit_log WHERE action = 'restore_replay'"
                            " AND outcome = 'replayed'").fetchone() == (3,)

    # The DAGs run again: the journal and the audit chain agree with the warehouse.
    state, states, logs = _run("gdpr_retention_sweep", {"dry_run": True}, caplog, capfd, 30)
    assert state == "success", logs[-3000:]
    assert states["verify_audit_chain"] == "success"
    assert "Journal: the warehouse holds all" in logs


def test_an_evidence_location_moved_without_its_journal_is_refused_by_the_first_task(
    airflow_home: Path, airflow_conns: str, downstream, evidence: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """A policy pointed at a new folder without the old one's files (or a volume not mounted): the missing journal
    folder used to read as an empty journal, the first task started a new one there and the run went on."""
    email = "xavier.moved@example.org"
    with psycopg.connect(airflow_conns) as conn:
        add_contact(conn, "prospect", date(2026, 5, 1), email=email)
    downstream.add_person(email)
    state, _, logs = _run("gdpr_subject_erasure", {"email": email, "request_id": "REQ-MOVED-1"}, caplog, capfd, 0)
    assert state == "success", logs[-3000:]
    seen = len({json.loads(line)["entry_id"] for path in (evidence / "journal").rglob("*.jsonl")
                for line in path.read_text(encoding="utf-8").splitlines()})
    assert seen >= 2  # at least the erasure and its suppression entry

    policy = evidence.parent / "policy.yaml"
    data = yaml.safe_load(policy.read_text(encoding="utf-8"))
    moved = tmp_path / "evidence-new"
    data["evidence"] = {"location": str(moved)}
    policy.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    before = _snapshot(airflow_conns)
    state, states, logs = _run("gdpr_retention_sweep", {"dry_run": True}, caplog, capfd, 1)
    assert state == "failed" and states["check_policy"] == "failed", (states, logs[-3000:])
    assert f"holds 0 entries, this warehouse has seen {seen} there: the evidence location is not the one it was" \
        in logs
    assert not (moved / "journal").exists(), "nothing appended to the new location"
    assert _snapshot(airflow_conns) == before and email not in logs
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT entries_seen FROM gdpr.journal_outside").fetchall() == [(seen,)]

    data["evidence"] = {"location": str(evidence)}  # pointed back: the DAGs run again
    policy.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    state, _, logs = _run("gdpr_retention_sweep", {"dry_run": True}, caplog, capfd, 2)
    assert state == "success", logs[-3000:]
