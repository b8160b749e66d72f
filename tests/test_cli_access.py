"""`warehouse-gdpr access unpack` and the access warnings of `warehouse-gdpr policy check`, outside Airflow."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from warehouse_gdpr.airflow.storage import ObjectStoragePackages
from warehouse_gdpr.cli import main
from warehouse_gdpr.engine import access
from warehouse_gdpr.engine.crypto import Keys

ROOT = Path(__file__).resolve().parents[1]
CREATED = datetime(2026, 6, 1, tzinfo=timezone.utc)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_extra: dict, private_extra: dict,  # type: ignore[no-untyped-def]
          keys: Keys):
    """A policy whose packages are under tmp_path, the keys connection and the archive's private connection
    (the package is encrypted to its public key), one package (ACC-CLI-1)."""
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    data["access"]["location"] = "packages"  # relative: under $AIRFLOW_HOME
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    home = tmp_path / "airflow"
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(policy))
    monkeypatch.setenv("AIRFLOW_CONN_GDPR_KEYS", json.dumps({"conn_type": "generic", "extra": key_extra}))
    monkeypatch.setenv("AIRFLOW_CONN_GDPR_ARCHIVE_PRIVATE",
                       json.dumps({"conn_type": "generic", "extra": private_extra}))
    document = {"request": {"request_id": "ACC-CLI-1", "kind": "access"}, "warehouse": []}
    files = {"data.json": json.dumps(document).encode(), "csv/crm.contacts.csv": b"contact_id\n7\n"}
    digests = {n: {"sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    files["manifest.json"] = json.dumps({"files": digests}).encode()
    store = ObjectStoragePackages("packages", home)
    store.write("ACC-CLI-1.wgdpr", access.seal(files, keys, "ACC-CLI-1", "access", CREATED,
                                               access.expiry(CREATED, "P30D")))
    return store


def test_unpack_writes_the_files_into_a_new_private_folder(setup, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "ACC-CLI-1"
    assert main(["access", "unpack", "ACC-CLI-1", "--out", str(out)]) == 0
    assert (out / "csv" / "crm.contacts.csv").read_bytes() == b"contact_id\n7\n"
    assert json.loads((out / "data.json").read_text())["request"]["request_id"] == "ACC-CLI-1"
    assert oct((out / "csv").stat().st_mode & 0o777) == "0o700"
    printed = capsys.readouterr().out
    assert "Request ACC-CLI-1 (access)" in printed and "2026-07-01" in printed and "manifest.json" in printed


@pytest.mark.parametrize(("request_id", "message"), [
    ("ACC-NOPE", "no package file://"),
    ("jane@x.example", "the request id must be 3-64 characters"),
])
def test_unpack_of_an_unknown_request_fails_clearly(setup, tmp_path: Path, request_id: str, message: str,  # type: ignore[no-untyped-def]
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["access", "unpack", request_id, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and "jane@" not in err
    assert not (tmp_path / "out").exists()


def test_unpack_never_writes_into_a_folder_that_holds_files(setup, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.pdf").write_bytes(b"someone else's")
    assert main(["access", "unpack", "ACC-CLI-1", "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (out / "report.pdf").read_bytes() == b"someone else's"


def test_unpack_with_keys_that_do_not_decrypt_fails_clearly(setup, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from warehouse_gdpr.engine.crypto import generate_extra

    other = generate_extra()
    other["archive_keys"] = {"other-key": other["archive_keys"]["archive-1"]}  # type: ignore[index]
    other["archive_key_id"] = "other-key"
    monkeypatch.setenv("AIRFLOW_CONN_GDPR_KEYS", json.dumps({"conn_type": "generic", "extra": other}))
    # ... and a private connection with another key pair's private key, under another id.
    from warehouse_gdpr.engine.crypto import generate_extras
    another = {"archive_private_keys": {"other-x": generate_extras()[1]["archive_private_keys"]["archive-x1"]}}
    monkeypatch.setenv("AIRFLOW_CONN_GDPR_ARCHIVE_PRIVATE", json.dumps({"conn_type": "generic", "extra": another}))
    assert main(["access", "unpack", "ACC-CLI-1", "--out", str(tmp_path / "out")]) == 1
    assert ("archive key 'archive-x1' is not in the keys connection nor in the archive's private connection "
            "'gdpr_archive_private'") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_policy_check_without_a_warehouse_warns_about_access(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WAREHOUSE_URL", raising=False)
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    del data["tables"][0]["source"]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    assert main(["policy", "check", str(path)]) == 0
    assert "warning: access: tables[0] (crm.contacts): source missing" in capsys.readouterr().out
