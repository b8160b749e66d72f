"""The wheel: built from the repository, installed into a fresh virtual environment outside it, and
used from a temporary dags folder that holds only the one-line factory file and a policy."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_builds_the_dags_outside_the_repository(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(wheels.glob("warehouse_gdpr-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if "demo" in n], "the demo must never be in the wheel"
    assert [n for n in names if n.endswith(".sql")] == ["warehouse_gdpr/sql/gdpr_schema.sql"]
    assert "warehouse_gdpr/engine/candidates.py" in names and "warehouse_gdpr/airflow/dag_factory.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[airflow.plugins]\nwarehouse_gdpr = warehouse_gdpr.airflow.ui.plugin:WarehouseGdprPlugin" in entry_points
    # report.pdf of an access request is set in these fonts, shipped with their licence
    assert {"warehouse_gdpr/engine/fonts/DejaVuSans.ttf", "warehouse_gdpr/engine/fonts/DejaVuSans-Bold.ttf",
            "warehouse_gdpr/engine/fonts/LICENSE"} <= set(names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())
    # The dependencies (Airflow, ...) come from the test run's environment, appended after the fresh
    # venv's own site-packages; the package itself only from the wheel, unpacked there.
    subprocess.run([sys.executable, "-m", "zipfile", "-e", str(wheel), str(site)], check=True)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    dags = tmp_path / "dags"
    dags.mkdir()
    (tmp_path / "policy.yaml").write_text((ROOT / "include" / "policy.yaml").read_text())
    (dags / "warehouse_gdpr_dags.py").write_text(
        "# airflow dags of warehouse-gdpr\n"
        f"from warehouse_gdpr.dags import build_all; globals().update(build_all({str(tmp_path / 'policy.yaml')!r}))\n"
    )
    probe = textwrap.dedent(f"""
        import importlib.util, sys, warehouse_gdpr, warehouse_gdpr.engine.sqlfiles as sqlfiles
        assert importlib.util.find_spec("warehouse_gdpr_demo") is None  # the demo is not installed
        assert warehouse_gdpr.__file__.startswith({str(site)!r}), warehouse_gdpr.__file__
        assert "gdpr.audit_log" in sqlfiles.read_sql("gdpr_schema.sql")
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder={str(dags)!r})
        assert bag.import_errors == {{}}, bag.import_errors
        # Without a path and without $WAREHOUSE_GDPR_POLICY: a clear error, no file guessed in the virtualenv.
        import os
        from warehouse_gdpr.airflow import connections
        from warehouse_gdpr.engine.errors import ConfigurationError
        try:
            guessed = connections.policy_path()
        except ConfigurationError as exc:
            assert "set WAREHOUSE_GDPR_POLICY" in str(exc), exc
        else:
            raise AssertionError(f"policy_path() guessed {{guessed}}")
        # The GDPR page's plugin, from the wheel's entry point; the repository's plugins folder (the compose
        # stack's) registers the same one, and defers to the entry point: one plugin, no import error.
        from airflow import plugins_manager
        plugins, errors = plugins_manager._get_plugins()
        mine = [p for p in plugins if p.name == "warehouse_gdpr"]
        # This test's own setup puts a second warehouse-gdpr distribution on sys.path (the test run's
        # editable install, among the dependencies deps.pth adds), whose entry point Airflow then skips as
        # "already registered": that error is the setup's, not a deployment's. The wheel's comes first.
        import importlib.metadata as md
        installed = [d for d in md.distributions() if d.metadata["Name"] == "warehouse-gdpr"]
        if len(installed) > 1:
            errors = {{k: v for k, v in errors.items()
                      if not (k.startswith("warehouse-gdpr==") and "already registered" in v)}}
        assert len(mine) == 1 and errors == {{}}, ([p.name for p in plugins], errors)
        assert sys.modules[type(mine[0]).__module__].__file__.startswith({str(site)!r})  # the wheel's plugin
        assert type(mine[0].source).__name__ == "EntryPointSource", mine[0].source
        assert mine[0].fastapi_apps[0]["url_prefix"] == "/gdpr" and mine[0].external_views[0]["url_route"] == "gdpr"
        assert "airflow.api_fastapi.core_api.security" not in sys.modules  # built on its first request only
        os.environ["WAREHOUSE_GDPR_POLICY"] = {str(tmp_path / "policy.yaml")!r}
        from warehouse_gdpr.dags import build_all
        assert sorted(build_all()) == sorted(bag.dag_ids)
        print(sorted(bag.dag_ids))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WAREHOUSE_GDPR_", "PYTHONPATH"))}
    env["AIRFLOW_HOME"] = str(tmp_path / "airflow")
    env["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
    result = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(
        ["gdpr_erasure_retry", "gdpr_optout_sync", "gdpr_propagation_retry", "gdpr_restore_replay",
         "gdpr_retention_sweep", "gdpr_subject_access", "gdpr_subject_erasure", "gdpr_subject_rectification",
         "gdpr_subject_restriction"]
    )
