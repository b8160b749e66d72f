"""Two runs of one access request at the same time (an operator triggers it twice, or a retry overlaps an attempt
still running), at engine level: real concurrent connections to a real PostgreSQL, as the DAGs' login role
(gdpr_dag: the v10 lifecycle triggers apply), each calling what the `answer` task calls (requests.resolve,
access.parse_request, access.answer) on the real package store.

Steps are ordered by locks only: a test connection holds the request id's lock while the runs start, and
`pg_stat_activity` shows when a run's backend waits for it. No sleep decides an outcome.

* two runs at once: exactly one package written and recorded (its SHA-256 is the stored file's), the other run
  refused with "already answered", having read and written nothing;
* a run still answering (its lock held past the wait): the second run stops, naming the other run, and writes
  nothing; an audit row says so;
* a run that failed without recording an answer does not block the next one, which answers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest

from helpers import Worker, add_activity, add_contact, as_role, wait_for_lock_wait
from warehouse_gdpr.airflow.storage import ObjectStoragePackages
from warehouse_gdpr.airflow.transport import AirflowTransport
from warehouse_gdpr.engine import access, erasure, requests
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.policy import Policy

ROOT = Path(__file__).resolve().parents[2]
RID = "ACC-TWICE-1"

pytestmark = pytest.mark.skipif(bool(os.environ.get("WAREHOUSE_TEST_URL")),
                                reason="needs the embedded server's gdpr_dag login without a password")


class Recording(ObjectStoragePackages):
    """The real package store, keeping which files this run wrote (name, SHA-256)."""

    def __init__(self, location: str, home: Path) -> None:
        super().__init__(location, home)
        self.written: list[tuple[str, str]] = []

    def write(self, name: str, data: bytes) -> str:
        location = super().write(name, data)
        self.written.append((name, hashlib.sha256(data).hexdigest()))
        return location


@pytest.fixture
def engine_url(warehouse: str) -> str:
    return as_role(warehouse, "gdpr_dag")


def _person(conn: psycopg.Connection) -> str:
    cid = add_contact(conn, "client", date(2024, 1, 10))
    add_activity(conn, cid, "email_open", date(2026, 1, 1))
    email = str(conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0])  # type: ignore[index]
    conn.commit()
    return email


def _register(conn: psycopg.Connection, keys: Keys, email: str) -> None:
    requests.register(conn, keys, RunContext("cli", "cli", "request new"), kind="access", request_id=RID,
                      identifier=email, received_at=date.today(), today=date.today())


def _body(policy: Policy, keys: Keys, run_id: str, params: dict[str, Any],
          store: Recording) -> Callable[[psycopg.Connection], access.Answered]:
    """What the `answer` task does with its connection (airflow/tasks/access.py), without Airflow."""
    def body(conn: psycopg.Connection) -> access.Answered:
        resolved, _ = requests.resolve(conn, keys, "access", params)
        request = access.parse_request(resolved)
        ctx = RunContext("gdpr_subject_access", run_id, "answer")
        return access.answer(conn, policy, keys, ctx, request, AirflowTransport(), store, set())
    return body


def _hold_request_lock(conn: psycopg.Connection) -> None:
    """The request id's lock, as a run answering it holds it (released when `conn` ends its transaction)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (erasure.REQUEST_LOCK_CLASS, RID))


def _state(conn: psycopg.Connection, home: Path) -> dict[str, Any]:
    rows = conn.execute("SELECT status, outcome, details->'package'->>'sha256', identifier_ciphertext IS NULL"
                        " FROM gdpr.request WHERE request_id = %s", (RID,)).fetchall()
    audits = conn.execute("SELECT run_id, action, outcome FROM gdpr.audit_log WHERE details->>'request_id' = %s"
                          " AND action NOT IN ('register_request') ORDER BY audit_id", (RID,)).fetchall()
    conn.rollback()
    folder = home / "packages"
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} if folder.exists() else {}
    return {"request": rows, "audit": audits, "files": files}


@pytest.fixture
def long_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second run waits for the first however slow the machine is (the order is made by locks)."""
    monkeypatch.setattr(access, "ANSWER_LOCK_WAIT_SECONDS", 600.0, raising=False)


def _params(email: str, registered: bool) -> dict[str, Any]:
    return {"request_id": RID} if registered else {"email": email, "request_id": RID,
                                                   "received_at": date.today().isoformat()}


@pytest.mark.parametrize("registered", [True, False], ids=["registered", "by_email"])
def test_two_runs_at_once_write_and_record_one_package(
    conn: psycopg.Connection, engine_url: str, no_targets: Policy, keys: Keys, tmp_path: Path, registered: bool,
    long_wait: None,
) -> None:
    """Failed on main: both runs read the person's data and wrote `<id>.wgdpr`, the second replacing the
    package the first had recorded (gdpr.request named a SHA-256 no stored file had), then failed
    ("recorded by another run meanwhile") with no audit row of what it had read and written."""
    email = _person(conn)
    if registered:
        _register(conn, keys, email)
    stores = {"run-first": Recording("packages", tmp_path), "run-second": Recording("packages", tmp_path)}
    runs = {name: Worker(engine_url, _body(no_targets, keys, name, _params(email, registered), store))
            for name, store in stores.items()}
    with psycopg.connect(conn.info.dsn) as blocker, psycopg.connect(conn.info.dsn) as observer:
        _hold_request_lock(blocker)
        runs["run-first"].start()
        assert wait_for_lock_wait(observer, runs["run-first"]) == "advisory"
        runs["run-second"].start()
        assert wait_for_lock_wait(observer, runs["run-second"]) == "advisory"
        blocker.commit()  # both runs started and wait: let them go
    for run in runs.values():
        run.done()
    answered = [name for name, run in runs.items() if run.error is None]
    assert len(answered) == 1, {name: repr(run.error) for name, run in runs.items()}
    winner = answered[0]
    loser = next(name for name in runs if name != winner)
    result = runs[winner].result
    assert result.outcome == "answered" and result.written is not None

    # The other run: nothing written, one clear answer, no personal data.
    assert stores[loser].written == []
    assert stores[winner].written == [(f"{RID}.wgdpr", result.written.sha256)]
    error = runs[loser].error
    assert isinstance(error, erasure.RequestError)
    assert f"request {RID} was already answered on {date.today().isoformat()} (completed)" in str(error)
    assert "nothing was changed" in str(error) and email.lower() not in str(error).lower()

    # One package on disk, the one gdpr.request records; one answer in the audit log.
    state = _state(conn, tmp_path)
    assert state["files"] == {f"{RID}.wgdpr": result.written.sha256}
    assert state["request"] == [("completed", "answered", result.written.sha256, True)]
    assert [a for a in state["audit"] if a[1] == "access_request"] == [(winner, "access_request", "answered")]
    assert all(a[0] == winner for a in state["audit"]), state["audit"]


def _hold_as_another_run(url: str) -> psycopg.Connection:
    """A session holding the request id's lock as a run of gdpr_subject_access answering it does."""
    holder = psycopg.connect(url, autocommit=True, application_name="warehouse-gdpr access run-first")
    holder.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (erasure.REQUEST_LOCK_CLASS, RID))
    return holder


def test_a_second_run_stops_while_the_first_is_still_answering_and_writes_nothing(
    conn: psycopg.Connection, engine_url: str, no_targets: Policy, keys: Keys, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Failed on main: the second run read the person's data and wrote its package while the first one held
    the request (here it then timed out on the lock when recording, its package left in place)."""
    monkeypatch.setattr(access, "ANSWER_LOCK_WAIT_SECONDS", 0.2, raising=False)
    email = _person(conn)
    _register(conn, keys, email)
    store = Recording("packages", tmp_path)
    holder = _hold_as_another_run(engine_url)
    try:
        # lock_timeout: on main the run would otherwise wait forever when recording (the test's holder never ends)
        with psycopg.connect(engine_url, options="-c lock_timeout=5s") as second, \
                pytest.raises(Exception) as refused:  # noqa: B017 - which one is asserted below
            _body(no_targets, keys, "run-second", {"request_id": RID}, store)(second)
    finally:
        holder.close()  # the first run ends without recording an answer (it failed)
    assert store.written == [], repr(refused.value)
    message = str(refused.value)
    assert isinstance(refused.value, access.RequestBusy), message
    assert f"request {RID} is being answered by another run right now" in message
    assert "application_name 'warehouse-gdpr access run-first'" in message
    assert "This run read and wrote nothing" in message and email.lower() not in message.lower()
    assert store.written == []
    state = _state(conn, tmp_path)
    assert state["files"] == {}
    status = conn.execute("SELECT status, identifier_ciphertext IS NOT NULL FROM gdpr.request WHERE request_id = %s",
                          (RID,)).fetchone()
    assert status == ("registered", True)  # untouched: it can still be run
    assert [a for a in state["audit"] if a[0] == "run-second"] == [("run-second", "request_lock", "busy")]
    busy = conn.execute("SELECT details FROM gdpr.audit_log WHERE action = 'request_lock'").fetchone()[0]  # type: ignore[index]
    assert busy["request_id"] == RID and "warehouse-gdpr access run-first" in busy["holder"]
    conn.rollback()

    # The first run failed without answering (its session ended): the next run answers, once.
    with psycopg.connect(engine_url) as third:
        result = _body(no_targets, keys, "run-third", {"request_id": RID}, store)(third)
    assert result.written is not None and store.written == [(f"{RID}.wgdpr", result.written.sha256)]
    state = _state(conn, tmp_path)
    assert state["files"] == {f"{RID}.wgdpr": result.written.sha256}
    assert state["request"] == [("completed", "answered", result.written.sha256, True)]
    # The lock was released when the run ended: nothing holds it now.
    assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid",
                        (erasure.REQUEST_LOCK_CLASS,)).fetchone() == (0,)


def test_a_dry_run_takes_no_lock(
    conn: psycopg.Connection, engine_url: str, no_targets: Policy, keys: Keys, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dry run reads and counts only: it does not wait for a run answering the request."""
    monkeypatch.setattr(access, "ANSWER_LOCK_WAIT_SECONDS", 0.0, raising=False)
    email = _person(conn)
    holder = _hold_as_another_run(engine_url)
    try:
        with psycopg.connect(engine_url) as dry:
            result = _body(no_targets, keys, "run-dry", {**_params(email, False), "dry_run": True},
                           Recording("packages", tmp_path))(dry)
    finally:
        holder.close()
    assert result.outcome == "dry_run" and result.written is None
