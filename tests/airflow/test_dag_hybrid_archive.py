"""The archive encrypted to a public key (issue 15), under dag.test() on a real PostgreSQL: the sweep and an
erasure run with the keys connection alone (no symmetric archive key, no private connection); the access
request and `warehouse-gdpr access unpack` read the archive through the private connection, and say which
connection is missing when it is."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from helpers import AS_OF, add_contact, add_contract, add_invoice
from warehouse_gdpr.engine import sweep
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import KeyConfigError, Keys, archive_aad
from warehouse_gdpr.engine.policy import Policy

ROOT = Path(__file__).resolve().parents[2]
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
CONFIRMED = {"confirm_blast_radius": {"prospects_never_converted": 346, "leads_not_converted": 222}}
PRIVATE_ENV = "AIRFLOW_CONN_GDPR_ARCHIVE_PRIVATE"


def _run(dag_id: str, conf: dict[str, Any], caplog: pytest.LogCaptureFixture,
         capfd: pytest.CaptureFixture[str]) -> tuple[Any, str]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    caplog.clear()
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        dag_run = bag.get_dag(dag_id).test(run_after=RUN_AFTER, logical_date=RUN_AFTER, run_conf=conf)
    out, err = capfd.readouterr()
    return dag_run, out + err + caplog.text


def _states(dag_run: Any) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(TaskInstance.task_id, TaskInstance.state).where(
            TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id)).all()
    return {task_id: str(state) for task_id, state in rows}


def _archive(url: str) -> list[tuple[str, str, str, bytes, bytes]]:
    with psycopg.connect(url) as conn:
        return [(t, pk, k, bytes(n), bytes(c)) for t, pk, k, n, c in conn.execute(
            "SELECT source_table, source_pk, key_id, nonce, ciphertext FROM gdpr_archive.archived_row").fetchall()]


def test_the_sweep_and_an_erasure_run_with_the_public_key_only(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    key_extra: dict[str, Any], keys: Keys, public_keys: Keys, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """The deployment every task sees: a keys connection with no symmetric archive key (a store key and the
    archive's public key) and no private connection at all."""
    monkeypatch.delenv(PRIVATE_ENV)
    assert "archive_keys" not in key_extra and "archive_private_keys" not in json.dumps(key_extra)
    with psycopg.connect(airflow_conns) as conn:
        contact_id, email = conn.execute(
            "SELECT contact_id, email FROM crm.contacts c WHERE status = 'prospect' AND NOT litigation_hold"
            " AND NOT EXISTS (SELECT 1 FROM crm.invoices i WHERE i.contact_id = c.contact_id)"
            " ORDER BY contact_id DESC LIMIT 1").fetchone()  # type: ignore[misc]
        archived_before = conn.execute("SELECT count(*) FROM gdpr_archive.archived_row").fetchone()[0]  # type: ignore[index]
    downstream.add_person(email)

    erasure_run, logs = _run("gdpr_subject_erasure", {"email": email, "request_id": "REQ-HYBRID-1"}, caplog, capfd)
    assert str(erasure_run.state) == "success", logs[-4000:]
    assert not downstream.emailing.has_contact(email)  # the outbox (store key) went out and came back

    sweep_run, logs = _run("gdpr_retention_sweep", CONFIRMED, caplog, capfd)
    assert str(sweep_run.state) == "success", logs[-4000:]

    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT status, outcome FROM gdpr.erasure_request WHERE request_id = 'REQ-HYBRID-1'"
                            ).fetchone() == ("completed", "erased")
        assert conn.execute("SELECT count(*) FROM crm.contacts WHERE contact_id = %s", (contact_id,)).fetchone() == (0,)
    archive = _archive(airflow_conns)
    assert len(archive) > archived_before, "the sweep archived originals"
    assert {key_id for *_, key_id, _, _ in archive} == {"archive-x1"}
    # Legal, with the private key, reads every row; the engine's own keys read none.
    for table, pk, key_id, nonce, ciphertext in archive:
        assert json.loads(keys.decrypt(key_id, nonce, ciphertext, archive_aad(table, pk, key_id)))
    table, pk, key_id, nonce, ciphertext = archive[0]
    with pytest.raises(KeyConfigError, match="'gdpr_archive_private'"):
        public_keys.decrypt(key_id, nonce, ciphertext, archive_aad(table, pk, key_id))


@pytest.fixture
def access_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    data["erasure"]["targets"] = []  # what the warehouse and its archive hold: no downstream system asked
    data["processing_register"]["activities"][0]["processors"][1]["targets"] = []
    data["access"]["location"] = str(tmp_path / "packages")
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(path))
    return path


def _swept_former_client(url: str, policy: Policy, public_keys: Keys) -> tuple[int, str]:
    """A former client with an invoice the law keeps, pseudonymised by the sweep with the public key only:
    (id, the archived invoice's id)."""
    with psycopg.connect(url) as conn:
        cid = add_contact(conn, "former_client", date(2015, 1, 1))
        add_contract(conn, cid, date(2015, 2, 1), date(2019, 12, 31))
        add_invoice(conn, cid, date(2019, 6, 1))
        conn.commit()
        sweep.apply_rule(conn, policy, policy.rule("former_clients"), public_keys,
                         RunContext("sweep", "s-hybrid", "apply"), AS_OF)
        rows = conn.execute("SELECT source_pk, key_id FROM gdpr_archive.archived_row WHERE subject_id = %s"
                            " AND source_table = 'crm.invoices'", (str(cid),)).fetchall()
    assert len(rows) == 1 and rows[0][1] == "archive-x1"
    return cid, rows[0][0]


def _unpack(request_id: str, out: Path, without_private: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT / 'demo'}"}
    if without_private:
        env.pop(PRIVATE_ENV)
    return subprocess.run([sys.executable, "-m", "warehouse_gdpr.cli", "access", "unpack", request_id, "--out",
                           str(out)], env=env, capture_output=True, text=True, timeout=120)


def test_the_access_request_reads_the_archive_with_the_private_connection(
    airflow_home: Path, airflow_conns: str, access_policy: Path, policy: Policy, public_keys: Keys,
    private_extra: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    cid, invoice = _swept_former_client(airflow_conns, policy, public_keys)

    dag_run, logs = _run("gdpr_subject_access", {"subject_id": cid, "request_id": "ACC-HYBRID-1"}, caplog, capfd)

    assert str(dag_run.state) == "success", logs[-4000:]
    package = (tmp_path / "packages" / "ACC-HYBRID-1.wgdpr").read_bytes()
    assert b'"key_id":"archive-x1"' in package  # the package too is encrypted to the public key
    # `access unpack` without the private connection: a clear refusal naming it, nothing written, no key shown.
    refused = _unpack("ACC-HYBRID-1", tmp_path / "refused", without_private=True)
    assert refused.returncode == 1 and "'gdpr_archive_private'" in refused.stderr, refused.stderr
    assert not (tmp_path / "refused").exists()
    for secret in private_extra["archive_private_keys"].values():
        assert secret not in refused.stderr + refused.stdout
    unpacked = _unpack("ACC-HYBRID-1", tmp_path / "unpacked", without_private=False)
    assert unpacked.returncode == 0, unpacked.stderr
    document = json.loads((tmp_path / "unpacked" / "data.json").read_text())
    invoices = [a for a in document["archive"] if a["table"] == "crm.invoices"][0]["rows"]
    assert [str(r["invoice_id"]) for r in invoices] == [invoice]
    assert invoices[0]["billing_name"] == "Zoé Testperson"  # the original, decrypted with the private key


@pytest.mark.parametrize(("private", "message"), [
    (None, "the archive's private connection 'gdpr_archive_private' is not defined"),
    # The compose stack's default when GDPR_ARCHIVE_PRIVATE_EXTRA is not set: defined, its extra null.
    ('{"conn_type": "generic", "extra": null}',
     "the archive's private connection 'gdpr_archive_private' lacks archive_private_keys for ['archive-x1']"),
])
def test_without_the_private_connection_the_access_request_fails_first_naming_it(
    airflow_home: Path, airflow_conns: str, access_policy: Path, policy: Policy, public_keys: Keys,
    private_extra: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], private: str | None, message: str,
) -> None:
    cid, _ = _swept_former_client(airflow_conns, policy, public_keys)
    if private is None:
        monkeypatch.delenv(PRIVATE_ENV)
    else:
        monkeypatch.setenv(PRIVATE_ENV, private)

    dag_run, logs = _run("gdpr_subject_access", {"subject_id": cid, "request_id": "ACC-HYBRID-2"}, caplog, capfd)

    assert str(dag_run.state) == "failed"
    states = _states(dag_run)
    assert states["validate_request"] == "failed" and states["answer"] != "success", states
    assert message in logs
    assert not (tmp_path / "packages" / "ACC-HYBRID-2.wgdpr").exists()
    for secret in private_extra["archive_private_keys"].values():
        assert secret not in logs
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT count(*) FROM gdpr.request WHERE request_id = 'ACC-HYBRID-2'"
                            " AND status = 'completed'").fetchone() == (0,)
