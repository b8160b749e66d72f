"""`warehouse-gdpr policy schema|check` outside Airflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from warehouse_gdpr.cli import main

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "include" / "policy.yaml"


def test_schema_is_the_models_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"subject", "tables", "rules", "holds", "erasure", "optout"} <= set(schema["properties"])
    assert "subject" in schema["required"]
    assert schema["$defs"]["Rule"]["properties"]["retain_for"]["description"]  # editors show docs/policy.md's text


def test_check_without_a_warehouse_validates_the_file(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("WAREHOUSE_URL", raising=False)
    assert main(["policy", "check", str(POLICY)]) == 0
    assert "valid" in capsys.readouterr().out


def test_check_against_the_warehouse_prints_counts_only(warehouse: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(POLICY), "--url", warehouse, "--as-of", "2026-06-15T00:00:00+00:00"]) == 0
    out = capsys.readouterr().out
    assert "prospects_never_converted" in out and "former_clients" in out
    assert "@" not in out


def test_check_names_a_missing_column(warehouse: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load(POLICY.read_text())
    data["tables"][1]["columns"]["subject_lin"] = data["tables"][1]["columns"].pop("subject_line")
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["policy", "check", str(path), "--url", warehouse]) == 1
    assert "tables[1].columns.subject_lin: column crm.activities.subject_lin does not exist" in capsys.readouterr().err


def test_check_refuses_an_invalid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\n")
    assert main(["policy", "check", str(path)]) == 2
    assert "subject: required key is missing" in capsys.readouterr().err


def test_schema_sql_prints_the_packaged_ddl(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "sql"]) == 0
    assert "CREATE TABLE IF NOT EXISTS gdpr.audit_log" in capsys.readouterr().out


def test_schema_install_is_idempotent(warehouse: str, capsys: pytest.CaptureFixture[str]) -> None:
    import psycopg

    with psycopg.connect(warehouse, autocommit=True) as conn:
        conn.execute("DROP SCHEMA gdpr, gdpr_archive CASCADE")
    assert main(["schema", "install", "--url", warehouse]) == 0
    assert "installed." in capsys.readouterr().out
    assert main(["schema", "install", "--url", warehouse]) == 0
    assert "already installed." in capsys.readouterr().out


def test_url_comes_from_the_environment_without_url(
    warehouse: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README's deploy steps give no --url: a password in argv would show in `ps`."""
    import psycopg

    from warehouse_gdpr.engine.schema import SCHEMA_VERSION

    with psycopg.connect(warehouse, autocommit=True) as conn:
        conn.execute("DROP SCHEMA gdpr, gdpr_archive CASCADE")
    monkeypatch.setenv("WAREHOUSE_URL", warehouse)
    assert main(["schema", "install"]) == 0
    assert capsys.readouterr().out == f"control schema version {SCHEMA_VERSION} installed.\n"
    assert main(["policy", "check", str(POLICY)]) == 0
    assert "matches the warehouse" in capsys.readouterr().out
    monkeypatch.delenv("WAREHOUSE_URL")
    assert main(["schema", "install"]) == 2
    assert "give --url (or set WAREHOUSE_URL)" in capsys.readouterr().err


def test_schema_install_by_a_role_that_may_not_says_who_must(
    warehouse: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with psycopg.connect(warehouse, autocommit=True) as conn:
        conn.execute("DROP SCHEMA gdpr, gdpr_archive CASCADE")
        conn.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cli_nobody') "
                     "THEN CREATE ROLE cli_nobody LOGIN; END IF; END $$")
    if "WAREHOUSE_TEST_URL" in __import__("os").environ:
        pytest.skip("cli_nobody has no password on an external server")
    nobody = make_conninfo(**{**conninfo_to_dict(warehouse), "user": "cli_nobody"})
    assert main(["schema", "install", "--url", nobody]) == 1
    err = capsys.readouterr().err
    assert "is not installed and this connection (role cli_nobody) may not install it" in err
    assert "The warehouse owner or a DBA runs" in err and "`warehouse-gdpr schema install --url <owner URL>`" in err


def test_subject_hash_reads_the_email_on_stdin(
    airflow_conns: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from warehouse_gdpr.airflow import connections as runtime
    from warehouse_gdpr.engine.policy import load_policy

    keys = runtime.load_keys(load_policy(POLICY))
    monkeypatch.setattr("sys.stdin", io.StringIO("  Jane.Doe@ACME.example \n"))
    assert main(["subject-hash", str(POLICY)]) == 0
    out = capsys.readouterr().out
    assert out == f"{keys.hmac_key_id}\t{keys.subject_hash('jane.doe@acme.example')} (current)\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["subject-hash", str(POLICY)]) == 2
    assert "on stdin" in capsys.readouterr().err
