"""`warehouse-gdpr audit verify`: the audit chain checked from outside Airflow, with read rights only."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import errors

from helpers import as_role, schema_before_v8
from warehouse_gdpr.cli import main
from warehouse_gdpr.engine import audit, auditchain

ROOT = Path(__file__).resolve().parents[1]
CTX = audit.RunContext(dag_id="gdpr_optout_sync", run_id="manual__cli", task_id="report")


@pytest.fixture(scope="module")
def auditor(server_url: str) -> str:
    """A login role whose only grant is gdpr_auditor (cluster-wide: created once if missing)."""
    with psycopg.connect(server_url, autocommit=True) as admin:
        with contextlib.suppress(errors.DuplicateObject):  # created concurrently by another session
            admin.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'audit_reader') THEN"
                          " CREATE ROLE audit_reader LOGIN; END IF; END $$")
        admin.execute("GRANT gdpr_auditor TO audit_reader")
        granted = admin.execute(
            "SELECT array_agg(r.rolname) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid"
            " JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = 'audit_reader'").fetchone()[0]
    assert granted == ["gdpr_auditor"]
    return "audit_reader"


def _write(conn: psycopg.Connection, n: int) -> list[int]:
    with conn.transaction():
        for i in range(n):
            audit.record(conn, CTX, action="enforce", outcome="ok", row_count=i)
    ids = [r[0] for r in conn.execute("SELECT audit_id FROM gdpr.audit_log ORDER BY chain_seq")]
    conn.commit()
    return ids


def _export(conn: psycopg.Connection, folder: Path) -> auditchain.ChainHead:
    """What each DAG run's last task does: verify, then export the head."""
    conn.commit()
    result = auditchain.verify(conn)
    assert result.ok
    auditchain.PathHeadStore(folder).save(result.last)
    return result.last


def _superuser(conn: psycopg.Connection, statement: str) -> None:
    with conn.transaction():
        conn.execute("ALTER TABLE gdpr.audit_log DISABLE TRIGGER ALL")
        conn.execute(statement)  # type: ignore[arg-type]
        for trigger in ("audit_log_no_update_delete", "audit_log_no_truncate", "audit_log_chain"):
            conn.execute(f"ALTER TABLE gdpr.audit_log ENABLE ALWAYS TRIGGER {trigger}")  # type: ignore[arg-type]


def test_the_auditor_verifies_with_read_rights_only(
    conn: psycopg.Connection, warehouse: str, auditor: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = _write(conn, 4)
    head = _export(conn, tmp_path)
    url = as_role(warehouse, auditor)
    with psycopg.connect(url) as reader:  # read rights only
        for statement in ("INSERT INTO gdpr.audit_log (action, outcome) VALUES ('x', 'y')",
                          "UPDATE gdpr.audit_chain_head SET chain_seq = 0"):
            with pytest.raises(errors.InsufficientPrivilege), reader.transaction():
                reader.execute(statement)  # type: ignore[arg-type]

    assert main(["audit", "verify", "--url", url, "--evidence", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["broken"] is None
    assert (result["rows_checked"], result["last"]["chain_seq"], result["last"]["audit_id"]) == (4, 4, ids[-1])
    assert result["exported_head"]["row_hash"] == head.row_hash and result["chain_id"] == head.chain_id

    assert main(["audit", "verify", "--url", url, "--evidence", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (f"The audit chain {head.chain_id} holds: 4 row(s) recomputed, positions 1 to 4 (last audit id {ids[-1]}"
            in out)
    assert f"Compared with the last head exported to {tmp_path}: position 4 (audit id {ids[-1]})" in out


def test_a_deleted_middle_row_exits_1_naming_the_first_broken_row(
    conn: psycopg.Connection, warehouse: str, auditor: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = _write(conn, 5)
    _superuser(conn, f"DELETE FROM gdpr.audit_log WHERE audit_id = {ids[1]}")
    monkeypatch.setenv("WAREHOUSE_URL", as_role(warehouse, auditor))  # keeps a password out of `ps`

    assert main(["audit", "verify"]) == 1
    captured = capsys.readouterr()
    assert "Not compared with an exported head (no --policy or --evidence given)" in captured.out
    assert (f"is BROKEN at audit row audit id {ids[2]}, chain position 3: the chain skips position 2, after position 1 "
            f"(audit id {ids[0]}): rows were deleted (1 row(s) before it hold).") in captured.err

    assert main(["audit", "verify", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False
    assert (result["broken"]["audit_id"], result["broken"]["chain_seq"]) == (ids[2], 3)


def test_an_edited_row_exits_1(conn: psycopg.Connection, warehouse: str, capsys: pytest.CaptureFixture[str]) -> None:
    ids = _write(conn, 3)
    _superuser(conn, f"UPDATE gdpr.audit_log SET outcome = 'refused' WHERE audit_id = {ids[2]}")
    assert main(["audit", "verify", "--url", warehouse]) == 1
    assert (f"BROKEN at audit row audit id {ids[2]}, chain position 3: its content does not match its hash: the row "
            "was edited") in capsys.readouterr().err


def test_a_truncated_tail_is_found_through_the_policys_evidence_location(
    conn: psycopg.Connection, warehouse: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text(encoding="utf-8"))
    data["evidence"] = {"location": str(tmp_path / "evidence")}
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    ids = _write(conn, 5)
    _export(conn, tmp_path / "evidence")
    # Delete the last two rows and rewind the database's head: nothing inside the warehouse shows it.
    _superuser(conn, f"DELETE FROM gdpr.audit_log WHERE audit_id IN ({ids[3]}, {ids[4]})")
    with conn.transaction():
        conn.execute("UPDATE gdpr.audit_chain_head h SET chain_seq = 3, audit_id = a.audit_id, row_hash = a.row_hash"
                     " FROM gdpr.audit_log a WHERE a.chain_seq = 3")
    assert main(["audit", "verify", "--url", warehouse]) == 0
    capsys.readouterr()

    assert main(["audit", "verify", "--url", warehouse, "--policy", str(policy)]) == 1
    err = capsys.readouterr().err
    assert (f"BROKEN at audit row audit id {ids[4]}, chain position 5: the head exported outside the warehouse "
            f"(position 5 (audit id {ids[4]})") in err
    assert f"is beyond the end of the log (position 3 (audit id {ids[2]})): rows at the end were deleted" in err


def test_what_cannot_be_checked_exits_2(
    conn: psycopg.Connection, warehouse: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WAREHOUSE_URL", raising=False)
    assert main(["audit", "verify"]) == 2
    assert "give --url (or set WAREHOUSE_URL)" in capsys.readouterr().err
    chain = auditchain.read_head(conn).chain_id
    conn.commit()
    damaged = tmp_path / "audit_chain" / chain
    damaged.mkdir(parents=True)
    (damaged / f"head-{1:020d}.json").write_text("{not json")
    assert main(["audit", "verify", "--url", warehouse, "--evidence", str(tmp_path)]) == 2
    assert "is not JSON: an exported audit chain head was damaged" in capsys.readouterr().err
    schema_before_v8(conn)
    assert main(["audit", "verify", "--url", warehouse]) == 2
    assert ("this warehouse's audit log is not chained: its control schema is older than version 8"
            in capsys.readouterr().err)
