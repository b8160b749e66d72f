"""README "Deploy to your Airflow": its two shell blocks, run verbatim, from a wheel in a fresh venv.

The blocks are taken from README.md as they are written. The only preparation is what keeps the test
offline and fast: the fresh virtual environment sees this test run's installed dependencies (Airflow,
psycopg, ...) through a .pth file, so `pip install <wheel> -c constraints.txt` finds them satisfied and
installs the wheel only; this project's own editable install is hidden from it. Airflow's `airflow`
command is provided in the fresh venv as an install would. The block's `python3` is this test run's
interpreter (the linked dependencies are built for its version), from a PATH entry that holds nothing
else. The warehouse is this test's database, without the control schema: the block's
`warehouse-gdpr schema install` installs it from the wheel's DDL.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from warehouse_gdpr.engine.schema import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def block(marker: str) -> str:
    match = re.search(rf"<!-- {marker}:[^>]*-->\n```sh\n(.*?)```", README, flags=re.DOTALL)
    assert match, f"README.md has no `{marker}` block"
    return match.group(1)


def visible_dependencies(tmp_path: Path) -> Path:
    """A directory of links to every installed distribution of this test run except warehouse-gdpr."""
    site = Path(sysconfig.get_paths()["purelib"])
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("warehouse_gdpr", "__editable__", "_warehouse_gdpr")) or name.endswith(".pth"):
            continue
        (deps / entry.name).symlink_to(entry)
    return deps


def python3_only(tmp_path: Path) -> Path:
    """A PATH entry holding only `python3`: this test run's base interpreter. The README's `python3 -m venv`
    then keeps the venv on the version the linked dependencies are for, and no script of the test venv
    (`airflow`, `warehouse-gdpr`) is reachable."""
    bin_dir = tmp_path / "python3-only"
    bin_dir.mkdir()
    base = getattr(sys, "_base_executable", None) or sys.executable
    (bin_dir / "python3").symlink_to(os.path.realpath(base))
    return bin_dir


def uri(conninfo: str) -> str:
    """The warehouse as a plain postgresql:// URI, as a team would give it (a Unix-socket directory,
    as the embedded server uses, goes percent-encoded in the host part, which libpq and Airflow read)."""
    params = conninfo_to_dict(conninfo)
    auth = quote(str(params.get("user", "")), safe="")
    if params.get("password"):
        auth += ":" + quote(str(params["password"]), safe="")
    host = quote(str(params.get("host", "")), safe="")
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{auth}@{host}{port}/{params['dbname']}"


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "WAREHOUSE", "PYTHONPATH", "VIRTUAL_ENV"))
    }
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(extra)
    return env


def test_deploy_section_works_as_written_from_a_wheel(tmp_path: Path, warehouse: str) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(
        ROOT, repo, symlinks=True,
        ignore=shutil.ignore_patterns(".git", ".venv", ".demo", "build", "dist", "*.egg-info", "__pycache__",
                                      ".pytest_cache", "gdpr_register"),
    )
    env = clean_env()
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]  # python3 with pip, for the build
    built = subprocess.run(["bash", "-euo", "pipefail", "-c", block("deploy-build")], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    assert list((repo / "dist").glob("warehouse_gdpr-*.whl"))

    work = tmp_path / "deploy"
    work.mkdir()
    # What an Airflow installation provides: its dependencies in the venv, and the `airflow` command.
    subprocess.run([sys.executable, "-m", "venv", str(work / "gdpr-venv")], check=True, timeout=300)
    python = work / "gdpr-venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "test_run_dependencies.pth").write_text(f"{visible_dependencies(tmp_path)}\n")
    airflow = work / "gdpr-venv" / "bin" / "airflow"
    airflow.write_text(f"#!{python}\nimport sys\nfrom airflow.__main__ import main\nsys.exit(main())\n")
    airflow.chmod(0o755)

    # A warehouse that has never seen warehouse-gdpr: the block installs the control schema.
    with psycopg.connect(warehouse, autocommit=True) as conn:
        conn.execute("DROP SCHEMA gdpr, gdpr_archive CASCADE")

    steps = block("deploy-steps")
    assert "--url" not in steps, "a password on the command line shows in `ps`: the CLI reads $WAREHOUSE_URL"
    env = clean_env(REPO=str(repo), WAREHOUSE_URL=uri(warehouse))
    env["PATH"] = str(python3_only(tmp_path)) + os.pathsep + env["PATH"]
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c",
         steps + '\npython -c "import warehouse_gdpr; print(warehouse_gdpr.__file__)"\n'],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert f"version = {platform.python_version()}\n" in (work / "gdpr-venv" / "pyvenv.cfg").read_text()
    assert f"control schema version {SCHEMA_VERSION} installed.\n" in result.stdout, output[-3000:]

    # The package came from the wheel, into the fresh venv; the DAGs were built from the copied policy.
    assert result.stdout.strip().splitlines()[-1].startswith(purelib)
    for dag_id in ("gdpr_retention_sweep", "gdpr_subject_erasure", "gdpr_propagation_retry", "gdpr_erasure_retry",
                   "gdpr_optout_sync", "gdpr_subject_rectification", "gdpr_subject_restriction"):
        assert dag_id in result.stdout
    assert "matches the warehouse" in result.stdout
    home = work / "airflow-home"
    assert (home / "policy.schema.json").stat().st_size > 1000
    assert (home / "gdpr_register" / "register.html").is_file()
    with psycopg.connect(warehouse) as conn:
        rows = conn.execute(
            "SELECT task_id, outcome, dry_run FROM gdpr.audit_log WHERE dag_id = 'gdpr_retention_sweep'"
        ).fetchall()
    tasks = {r[0] for r in rows}
    assert {"check_policy", "plan", "apply", "purge_archive", "report", "write_register"} <= tasks, output[-3000:]
    assert all(r[2] for r in rows), "the README's sweep is a dry run"
    assert any(r[0] == "apply" and r[1] == "dry_run" for r in rows)
