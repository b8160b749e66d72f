"""The Airflow glue's connections: tuple rows whatever the connection's extra says, and no guessed policy path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from warehouse_gdpr.airflow import connections
from warehouse_gdpr.engine.errors import ConfigurationError
from warehouse_gdpr.engine.policy import Policy


def test_a_dict_cursor_in_the_connection_extra_does_not_change_the_rows(
    airflow_conns: str, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The postgres provider turns {"cursor": "dictcursor"} into psycopg's dict_row for every cursor.
    conn_json = json.loads(os.environ["AIRFLOW_CONN_WAREHOUSE"])
    conn_json["extra"] = {**conn_json.get("extra", {}), "cursor": "dictcursor"}
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", json.dumps(conn_json))

    with connections.connect(policy) as conn:
        assert conn.execute("SELECT 1, 2").fetchone() == (1, 2)
        report = connections.prepare_warehouse(conn, policy)  # the engine unpacks tuples throughout
    assert report.tables == len(policy.tables)


def test_the_default_policy_path_is_the_environment_variable_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from warehouse_gdpr.dags import build_all

    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(tmp_path / "policy.yaml"))
    assert connections.policy_path() == tmp_path / "policy.yaml"

    monkeypatch.delenv("WAREHOUSE_GDPR_POLICY")
    with pytest.raises(ConfigurationError,
                       match=r"set WAREHOUSE_GDPR_POLICY .* or pass the path to .*build_all\(path\)"):
        connections.policy_path()
    with pytest.raises(ConfigurationError, match="WAREHOUSE_GDPR_POLICY"):
        build_all()  # a dags file without a path: an import error that names the fix
