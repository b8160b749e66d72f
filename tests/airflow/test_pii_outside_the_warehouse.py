"""Personal data outside the warehouse (issue 15): after an erasure registered with `warehouse-gdpr request new`
and run from its id alone, the person's email, name and phone appear nowhere Airflow keeps things: not in its
metadata database (`dag_run.conf`, `log`, XComs, rendered fields: every table, read row by row, and every byte
of the SQLite file), not in the task logs (captured, and every file under $AIRFLOW_HOME), not in the process
list (every process's command line and environment, sampled while the CLI and the DAG run).

The control run shows that the scans can fail: a run triggered with the email in its conf puts it in
`dag_run.conf` and `log`, where the scan finds it, and the runbook's purge (`airflow db clean ... --skip-archive`)
removes it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[2]
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)


def _person(url: str) -> dict[str, str]:
    """A prospect no other test ever names: an erasable person whose every attribute is unique to this test."""
    tag = uuid.uuid4().hex[:10]
    person = {"email": f"Outside.{tag}@Nowhere-Else.example", "first_name": f"Quillon{tag[:5]}",
              "last_name": f"Brakkenfeld{tag[5:]}", "direct_phone": f"+33 6 {int(tag[:6], 16) % 10**8:08d}"}
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO crm.contacts (contact_id, company_id, status, email, first_name, last_name, direct_phone,"
            " job_title, created_at, litigation_hold)"
            " VALUES ((SELECT max(contact_id) + 1 FROM crm.contacts), (SELECT min(company_id) FROM crm.companies),"
            " 'prospect', %(email)s, %(first_name)s, %(last_name)s, %(direct_phone)s, 'CTO', now(), false)",
            person)
    return person


def _needles(person: dict[str, str]) -> list[bytes]:
    """What must appear nowhere, as bytes, in the forms a log or a JSON encoder would write it."""
    texts = {person["email"], person["email"].lower(), person["first_name"], person["last_name"],
             person["direct_phone"], person["direct_phone"].replace(" ", "")}
    return sorted({t.encode() for t in texts} | {json.dumps(t).strip('"').encode() for t in texts}
                  | {t.encode("utf-16-le") for t in texts})


@contextmanager
def _process_list() -> Iterator[list[bytes]]:
    """Every command line and environment of every process this user can read, sampled every 5 ms."""
    seen: list[bytes] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit():
                    for part in ("cmdline", "environ"):
                        with contextlib.suppress(OSError):  # gone, or another user's
                            seen.append((proc / part).read_bytes())
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def _metadata_rows() -> str:
    """Every row of every table of Airflow's metadata database, as text."""
    from airflow.configuration import conf

    db = conf.get("database", "sql_alchemy_conn").removeprefix("sqlite:///")
    with sqlite3.connect(db) as meta:
        tables = [r[0] for r in meta.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return "\n".join(f"{table}: {row!r}" for table in tables
                         for row in meta.execute(f'SELECT * FROM "{table}"'))  # noqa: S608 - names from the catalog


def _files_under(home: Path) -> Iterator[tuple[Path, bytes]]:
    for path in home.rglob("*"):
        if path.is_file():
            yield path, path.read_bytes()


def _env(url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "demo")])
    env["WAREHOUSE_URL"] = url if os.environ.get("WAREHOUSE_TEST_URL") else make_conninfo(
        **{**conninfo_to_dict(url), "user": "gdpr_dag"})  # type: ignore[arg-type]
    return env


def _airflow(*args: str) -> None:
    """An `airflow` CLI command, run in this process (another process writing the SQLite metadata DB that this
    one holds open corrupts it here): the same parser and `action_cli` wrapper, which logs sys.argv to `log`."""
    from airflow.cli import cli_parser

    parsed = cli_parser.get_parser().parse_args(list(args))
    argv = sys.argv
    sys.argv = ["airflow", *args]
    try:
        parsed.func(parsed)
    finally:
        sys.argv = argv


def _run_dag(conf: dict, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        dag_run = bag.get_dag("gdpr_subject_erasure").test(run_after=RUN_AFTER, logical_date=RUN_AFTER,
                                                           run_conf=conf)
    out, err = capfd.readouterr()
    return dag_run, out + err + caplog.text


def _found(needles: list[bytes], haystack: bytes) -> list[bytes]:
    return [n for n in needles if n.lower() in haystack.lower()]


def test_a_registered_erasure_leaves_no_personal_data_in_airflow(
    airflow_home: Path, airflow_conns: str, downstream, fast_retry_policy: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    person = _person(airflow_conns)
    downstream.add_person(person["email"])
    needles = _needles(person)
    env = _env(airflow_conns)
    request_id = f"REQ-OUT-{uuid.uuid4().hex[:8]}"
    _airflow("dags", "reserialize")

    with _process_list() as processes:
        # the operator's two commands, as the README gives them: the address on stdin only
        registered = subprocess.run(
            [sys.executable, "-m", "warehouse_gdpr.cli", "request", "new", "--kind", "erasure",
             "--request-id", request_id, "--received-on", date.today().isoformat()],
            input=person["email"] + "\n", env=env, capture_output=True, text=True, timeout=300, check=False)
        _airflow("dags", "trigger", "gdpr_subject_erasure", "-c", json.dumps({"request_id": request_id}))
        dag_run, logs = _run_dag({"request_id": request_id}, caplog, capfd)

    assert registered.returncode == 0, registered.stderr[-2000:]
    assert str(dag_run.state) == "success", logs[-4000:]
    with psycopg.connect(airflow_conns) as conn:
        assert conn.execute("SELECT status, outcome FROM gdpr.request WHERE request_id = %s",
                            (request_id,)).fetchone() == ("completed", "erased")
        assert conn.execute("SELECT count(*) FROM crm.contacts WHERE email = %s",
                            (person["email"],)).fetchone()[0] == 0  # type: ignore[index]
    assert not downstream.emailing.has_contact(person["email"])

    # the scans see what they should: the CLI in the process list, the request id in the metadata DB
    cmdlines = b"\n".join(processes)
    assert request_id.encode() in cmdlines and b"request\x00new" in cmdlines, "the process sampler saw the CLI"
    rows = _metadata_rows()
    assert request_id in rows and "gdpr_subject_erasure" in rows
    assert f'"request_id": "{request_id}"' in rows, "the trigger's conf, in dag_run and log"

    out, err = capfd.readouterr()
    text_out = (registered.stdout + registered.stderr + out + err + logs).encode()
    assert _found(needles, text_out) == [], "the CLI output or the task logs"
    assert _found(needles, cmdlines) == [], "the process list"
    assert _found(needles, rows.encode()) == [], "a row of Airflow's metadata database"
    leaks = {str(path): _found(needles, data) for path, data in _files_under(airflow_home)}
    assert {path: found for path, found in leaks.items() if found} == {}, "a file under $AIRFLOW_HOME"


def test_an_email_in_the_conf_is_kept_by_airflow_until_db_clean_purges_it(
    airflow_home: Path, airflow_conns: str, fast_retry_policy: Path,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    """The control of the test above, and the runbook's purge: with the email in the form, Airflow keeps it in
    `dag_run.conf` (and in `log` for `airflow dags trigger -c`); `airflow db clean --skip-archive` removes both."""
    person = _person(airflow_conns)
    _airflow("dags", "reserialize")
    _airflow("dags", "trigger", "gdpr_subject_erasure", "-c",
             json.dumps({"email": person["email"], "request_id": "REQ-OUT-CONTROL", "dry_run": True}))
    dag_run, logs = _run_dag({"email": person["email"], "request_id": "REQ-OUT-CONTROL", "dry_run": True},
                             caplog, capfd)
    assert str(dag_run.state) == "success", logs[-4000:]

    rows = _metadata_rows()
    where = {line.split(":", 1)[0] for line in rows.splitlines() if person["email"] in line}
    assert {"dag_run", "log"} <= where, where

    # the runbook's purge: every run and log line of the DAG older than now, without an archive table
    until = (datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat()
    _airflow("db", "clean", "--clean-before-timestamp", until, "--tables", "dag_run,log,xcom",
             "--dag-ids", "gdpr_subject_erasure", "--skip-archive", "-y")
    rows = _metadata_rows()
    left = [line for line in rows.splitlines() if person["email"] in line]
    # a run that never started (queued: no scheduler here) has no start_date, the column db clean ages runs by:
    # the runbook says to delete such a run from the UI; only it may be left
    assert all(line.startswith("dag_run: ") and "'queued'" in line for line in left), [x[:60] for x in left]
    assert len(left) == 1, "the CLI-triggered run, never started"
