"""The GDPR page in the Airflow UI (issue 16), on a real `airflow api-server` with the SimpleAuthManager,
a warehouse holding a finished sweep (the real DAG), one open and one overdue request; read over HTTP
and in a real headless Chromium.

  * no session, a bad token: 401/403 on the page, its JSON and the form; nothing registered;
  * a viewer reads the page and its JSON but may not register (403); an admin registers and triggers;
  * the page and its JSON hold none of the seeded emails, names, phones or subject hashes;
  * the form stores the address encrypted and triggers the DAG with {"request_id": ID} alone;
  * the browser logs in through Airflow's login form, opens the GDPR entry of the navigation, checks what
    the page shows, submits the form and saves a screenshot.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from warehouse_gdpr.engine import audit, requests
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr_demo import browser, embedded

ROOT = Path(__file__).resolve().parents[2]
TODAY = date.today()  # the page's today: the api-server's clock
SWEEP_AT = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)  # the template's today (test_dag_retention_sweep)
CONFIRMED = {"confirm_blast_radius": {"prospects_never_converted": 346, "leads_not_converted": 222}}
OPEN_ID, LATE_ID = "REQ-UI-OPEN", "REQ-UI-LATE"
LATE_RUN = "scheduled__2026-06-15T08:00:00+00:00"


@dataclass
class Stack:
    url: str  # the api-server
    warehouse: str  # owner URL
    passwords: dict[str, str]
    log: Path
    people: list[str]  # seeded emails of the requests' subjects, and for the form
    seeded: list[str]  # every seeded email, full name and phone, read before the sweep

    def personal(self) -> list[str]:
        """The seeded values, and the start of every request's keyed hash."""
        with psycopg.connect(self.warehouse) as conn:
            hashes = [h[:12] for (h,) in conn.execute("SELECT subject_hash FROM gdpr.request").fetchall()]
        return self.seeded + hashes

    def token(self, user: str) -> str:
        body = json.dumps({"username": user, "password": self.passwords[user]}).encode()
        status, answer = http(f"{self.url}/auth/token", body=body, headers={"Content-Type": "application/json"})
        assert status == 201, answer
        return str(json.loads(answer)["access_token"])


def http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         method: str | None = None) -> tuple[int, str]:
    """(status, body text) of one request, errors included; no proxy."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ui_warehouse(server_url: str, template_db: str) -> Iterator[str]:
    """A copy of the template for this module (the api-server serves it for all its tests)."""
    name = f"gdpr_ui_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                      sql.Identifier(template_db)))
    try:
        yield make_conninfo(**{**conninfo_to_dict(server_url), "dbname": name})  # type: ignore[arg-type]
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _connections(warehouse: str, key_extra: dict[str, object]) -> dict[str, str]:
    url = warehouse if os.environ.get("WAREHOUSE_TEST_URL") else make_conninfo(
        **{**conninfo_to_dict(warehouse), "user": "gdpr_dag"})  # type: ignore[arg-type]
    return {"AIRFLOW_CONN_WAREHOUSE": json.dumps(embedded.airflow_conn_json(url)),
            "AIRFLOW_CONN_GDPR_KEYS": json.dumps({"conn_type": "generic", "extra": key_extra})}


def _policy(work: Path) -> Path:
    """The demo policy with an evidence folder of this module's own (where the DAG runs export the audit
    chain's head, and where the page finds it): other tests' warehouses share the template's chain id."""
    import yaml

    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    data["evidence"] = {"location": str(work / "evidence")}
    path = work / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _finished_sweep(conns: dict[str, str]) -> None:
    """A whole gdpr_retention_sweep run (dag.test), as the demo's first sweep."""
    from airflow.dag_processing.dagbag import DagBag

    with pytest.MonkeyPatch.context() as mp:
        for key, value in conns.items():
            mp.setenv(key, value)
        dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("gdpr_retention_sweep")
        run = dag.test(run_after=SWEEP_AT, logical_date=SWEEP_AT, run_conf=CONFIRMED)
    assert str(run.state) == "success"


def _requests(warehouse: str, keys: Keys) -> list[str]:
    """One open request (access, received 3 days ago) and one overdue erasure (received 40 days ago, a
    target still pending after attempts, worked on by a gdpr_erasure_retry run). Their subjects' emails."""
    with psycopg.connect(warehouse) as conn:
        people = [e for (e,) in conn.execute(
            "SELECT email FROM crm.contacts WHERE status = 'prospect' AND NOT litigation_hold"
            " AND pseudonymised_at IS NULL ORDER BY contact_id LIMIT 3").fetchall()]
        cli = RunContext("warehouse-gdpr", "cli__ui-test", "request_new")
        requests.register(conn, keys, cli, kind="access", request_id=OPEN_ID, identifier=people[0],
                          received_at=TODAY - timedelta(days=3), today=TODAY)
        requests.register(conn, keys, cli, kind="erasure", request_id=LATE_ID, identifier=people[1],
                          received_at=TODAY - timedelta(days=40), today=TODAY)
        with conn.transaction():
            conn.execute("UPDATE gdpr.request SET status = 'pending_propagation', outcome = 'erased'"
                         " WHERE request_id = %s", (LATE_ID,))
            conn.execute("INSERT INTO gdpr.erasure_propagation (request_id, target, status, attempts) VALUES"
                         " (%s, 'emailing', 'acknowledged', 1), (%s, 'telephony', 'pending', 3)", (LATE_ID, LATE_ID))
            audit.record(conn, RunContext("gdpr_erasure_retry", LATE_RUN, "retry_pending"), action="propagate",
                         outcome="failed", details={"request_id": LATE_ID, "target": "telephony"})
    return people


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the api-server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if http(f"{url}/api/v2/monitor/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"the api-server did not start:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def stack(airflow_home: Path, ui_warehouse: str, key_extra: dict[str, object], keys: Keys,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("ui")
    conns = {**_connections(ui_warehouse, key_extra), "WAREHOUSE_GDPR_POLICY": str(_policy(work))}
    seeded = _seeded(ui_warehouse)
    _finished_sweep(conns)
    people = _requests(ui_warehouse, keys)
    passwords = {"admin": secrets.token_urlsafe(12), "viewer": secrets.token_urlsafe(12)}
    (work / "passwords.json").write_text(json.dumps(passwords))
    port = _free_port()
    env = {**os.environ, **conns,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "demo")]),
           "AIRFLOW__CORE__AUTH_MANAGER":
               "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(work / "passwords.json"),
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
           "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
           "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}"}
    # The DAGs in the metadata DB, as the dag-processor leaves them: the form triggers gdpr_subject_erasure.
    subprocess.run([sys.executable, "-m", "airflow", "dags", "reserialize"], env=env, check=True,
                   capture_output=True)
    log = work / "api-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port",
                                 str(port), "--workers", "1"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        yield Stack(f"http://127.0.0.1:{port}", ui_warehouse, passwords, log, people, seeded)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _seeded(warehouse: str) -> list[str]:
    """Every seeded email, full name and phone of the demo CRM."""
    values: list[str] = []
    with psycopg.connect(warehouse) as conn:
        for email, first, last, phone in conn.execute(
                "SELECT email, first_name, last_name, direct_phone FROM crm.contacts").fetchall():
            values += [email, f"{first} {last}"] + ([phone] if phone else [])
    return values


def _leaks(text: str, values: list[str]) -> list[str]:
    low = text.lower()
    return [v for v in values if v.lower() in low]


def _post(stack: Stack, body: dict[str, Any], token: str | None, **headers: str) -> tuple[int, dict[str, Any]]:
    all_headers = {"Content-Type": "application/json", **headers}
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    status, text = http(f"{stack.url}/gdpr/api/requests", body=json.dumps(body).encode(), headers=all_headers)
    return status, json.loads(text) if text.startswith("{") else {"raw": text}


def _request_row(stack: Stack, request_id: str) -> tuple[Any, ...] | None:
    with psycopg.connect(stack.warehouse) as conn:
        return conn.execute("SELECT kind, status, identifier_ciphertext IS NOT NULL FROM gdpr.request"
                            " WHERE request_id = %s", (request_id,)).fetchone()


def _dag_runs(stack: Stack, token: str) -> list[dict[str, Any]]:
    status, text = http(f"{stack.url}/api/v2/dags/gdpr_subject_erasure/dagRuns",
                        headers={"Authorization": f"Bearer {token}"})
    assert status == 200, text
    return list(json.loads(text)["dag_runs"])


# -- authentication and authorisation -----------------------------------------------------------


def test_without_a_session_the_page_its_json_and_the_form_are_refused(stack: Stack) -> None:
    body = {"kind": "erasure", "request_id": "REQ-UI-ANON", "identifier": stack.people[2]}
    for path in ("/gdpr/", "/gdpr/api/summary", "/gdpr/page.js"):
        status, text = http(stack.url + path)
        assert status == 401, (path, text)
        assert "REQ-UI" not in text
    assert _post(stack, body, None)[0] == 401
    assert _post(stack, body, "not-a-token")[0] in (401, 403)
    status, _ = http(f"{stack.url}/gdpr/api/summary", headers={"Cookie": "_token=forged.jwt.value"})
    assert status in (401, 403)
    assert _request_row(stack, "REQ-UI-ANON") is None


def test_a_viewer_reads_but_may_not_register(stack: Stack) -> None:
    token = stack.token("viewer")
    status, text = http(f"{stack.url}/gdpr/api/summary", headers={"Authorization": f"Bearer {token}"})
    assert status == 200, text
    data = json.loads(text)
    assert {r["request_id"] for r in data["requests"]["open"]} == {OPEN_ID, LATE_ID}
    status, html = http(f"{stack.url}/gdpr/", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and 'id="register-form"' not in html and "needs the permission to trigger" in html
    status, answer = _post(stack, {"kind": "erasure", "request_id": "REQ-UI-VIEWER", "identifier": stack.people[2]},
                           token)
    assert status == 403 and "permission to trigger gdpr_subject_erasure" in answer["error"]
    assert _request_row(stack, "REQ-UI-VIEWER") is None


# -- what the page and its JSON show ------------------------------------------------------------------


def test_summary_json_shows_the_requests_sweep_backlog_archive_list_and_chart(stack: Stack) -> None:
    status, text = http(f"{stack.url}/gdpr/api/summary", headers={"Authorization": f"Bearer {stack.token('admin')}"})
    assert status == 200, text
    data = json.loads(text)
    late, open_ = data["requests"]["open"]  # by due date
    due = requests.due_date(TODAY - timedelta(days=40))
    assert (late["request_id"], late["overdue"], late["days_left"]) == (LATE_ID, True, (due - TODAY).days)
    assert late["targets"] == {"emailing": {"status": "acknowledged", "attempts": 1},
                               "telephony": {"status": "pending", "attempts": 3}}
    assert late["dag_run"] == {"dag_id": "gdpr_erasure_retry", "run_id": LATE_RUN}
    assert (open_["request_id"], open_["overdue"], open_["kind"]) == (OPEN_ID, False, "access")
    assert (data["requests"]["open_count"], data["requests"]["overdue_count"]) == (2, 1)
    [sweep] = data["sweeps"]
    rules = {r["rule"]: r for r in sweep["rules"]}
    assert rules["prospects_never_converted"]["deleted"] == 346 and rules["leads_not_converted"]["deleted"] == 222
    assert rules["former_clients"]["pseudonymised"] > 0 and rules["former_clients"]["archived"] > 0
    assert data["backlog"]["error"] is None and {r["rule"] for r in data["backlog"]["rules"]} == set(rules)
    assert data["archive"]["rows"] == rules["former_clients"]["archived"]
    assert sum(data["weekly"]["actions"]["delete"]) >= 346 + 222
    chain = data["audit_chain"]  # verified from the head the sweep's last task exported
    assert chain["status"] == "holds" and chain["exported"]["by"].startswith("gdpr_retention_sweep/"), chain
    assert chain["rows_checked"] == chain["position"] - chain["exported"]["position"] + 1 > 1


def test_page_and_json_hold_no_seeded_personal_data(stack: Stack) -> None:
    token = stack.token("admin")
    _, html = http(f"{stack.url}/gdpr/", headers={"Authorization": f"Bearer {token}"})
    _, text = http(f"{stack.url}/gdpr/api/summary", headers={"Authorization": f"Bearer {token}"})
    assert OPEN_ID in html and LATE_ID in html and OPEN_ID in text
    personal = stack.personal()
    assert len(personal) > 4000
    assert _leaks(html, personal) == [] and _leaks(text, personal) == []
    assert not re.search(r"[\w.+-]+@[\w-]+\.example", html + text), "an email address reached the page"


# -- the form -------------------------------------------------------------------------------------


def test_the_form_registers_encrypted_and_triggers_with_the_request_id_alone(stack: Stack) -> None:
    token = stack.token("admin")
    email = stack.people[2]
    status, answer = _post(stack, {"kind": "erasure", "request_id": "REQ-UI-API-1", "identifier": email.upper(),
                                   "received_on": (TODAY - timedelta(days=2)).isoformat()}, token)
    assert status == 201, answer
    assert answer["request_id"] == "REQ-UI-API-1" and answer["dag_id"] == "gdpr_subject_erasure"
    assert answer["paused"] is True and "waits until gdpr_subject_erasure is unpaused" in answer["message"]
    assert _request_row(stack, "REQ-UI-API-1") == ("erasure", "registered", True)
    [run] = [r for r in _dag_runs(stack, token) if r["dag_run_id"] == answer["run_id"]]
    assert run["conf"] == {"request_id": "REQ-UI-API-1"}
    assert run["triggered_by"] == "ui" and run["triggering_user_name"] == "admin"
    with psycopg.connect(stack.warehouse) as conn:
        row = conn.execute("SELECT details FROM gdpr.audit_log WHERE action = 'trigger_request'"
                           " AND details->>'request_id' = 'REQ-UI-API-1'").fetchone()
    assert row is not None and row[0]["triggered_run_id"] == answer["run_id"]
    assert email.lower() not in json.dumps(answer).lower()
    # Each kind goes to the DAG of its kind (requests.DAG_FOR_KIND).
    status, answer = _post(stack, {"kind": "access", "request_id": "REQ-UI-API-3", "identifier": email}, token)
    assert status == 201 and answer["dag_id"] == requests.DAG_FOR_KIND["access"], answer
    status, text = http(f"{stack.url}/api/v2/dags/{answer['dag_id']}/dagRuns/{answer['run_id']}",
                        headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and json.loads(text)["conf"] == {"request_id": "REQ-UI-API-3"}, text
    # A kind no DAG runs yet is registered only.
    status, answer = _post(stack, {"kind": "objection", "request_id": "REQ-UI-API-2", "identifier": email}, token)
    assert status == 201 and answer["run_id"] is None and "No DAG of this package runs" in answer["message"]
    # A rectification needs its changes, which the form does not take (warehouse-gdpr request new reads them
    # on stdin): refused, nothing registered.
    status, answer = _post(stack, {"kind": "rectification", "request_id": "REQ-UI-API-4", "identifier": email}, token)
    assert status == 400 and "a rectification request needs its changes" in answer["error"], answer
    assert _request_row(stack, "REQ-UI-API-4") is None


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"kind": "erasure", "request_id": "REQ-UI-BAD-1", "identifier": "jane.doe@@x"}, 400, "neither a plain ASCII"),
    ({"kind": "erasure", "request_id": "x", "identifier": "jane.doe@bad.example"}, 400, "3-64 characters"),
    ({"kind": "nope", "request_id": "REQ-UI-BAD-2", "identifier": "jane.doe@bad.example"}, 400, "unknown request kind"),
    ({"kind": "erasure", "request_id": "REQ-UI-BAD-3", "identifier": "jane.doe@bad.example",
      "received_on": "2999-01-01"}, 400, "in the future"),
    ({"kind": "erasure", "request_id": "REQ-UI-BAD-4", "identifier": "jane.doe@bad.example",
      "email": "jane.doe@bad.example"}, 400, "unknown field"),
    ({"kind": "erasure", "request_id": OPEN_ID, "identifier": "jane.doe@bad.example"}, 400, "already exists"),
])
def test_the_form_refuses_bad_input_without_echoing_it(stack: Stack, body: dict[str, Any], status: int,
                                                        message: str) -> None:
    got, answer = _post(stack, body, stack.token("admin"))
    assert got == status and message in answer["error"], answer
    assert "jane.doe" not in json.dumps(answer)
    if body["request_id"] != OPEN_ID:
        assert _request_row(stack, body["request_id"]) is None


def test_the_form_accepts_json_from_this_origin_only(stack: Stack) -> None:
    token = stack.token("admin")
    body = {"kind": "erasure", "request_id": "REQ-UI-CSRF", "identifier": "jane.doe@bad.example"}
    status, text = http(f"{stack.url}/gdpr/api/requests", body=b"kind=erasure",
                        headers={"Content-Type": "application/x-www-form-urlencoded",
                                 "Authorization": f"Bearer {token}"})
    assert status == 415, text
    assert _post(stack, body, token, Origin="https://evil.example")[0] == 403
    assert _request_row(stack, "REQ-UI-CSRF") is None


# -- a real browser -------------------------------------------------------------------------------------


def _chromium() -> str:
    binary = browser.find_chromium()
    if binary:
        return binary
    if os.environ.get("CI"):
        pytest.fail("CI must run the browser test, but chromium is not installed (.ci/run installs it: "
                    "apt-get install chromium)")
    pytest.skip("the browser test needs a headless Chromium and none is installed: apt-get install chromium "
                "(Debian; or set CHROMIUM to a Chrome/Chromium binary). CI installs it and never skips.")


def test_in_a_real_browser(stack: Stack, tmp_path: Path) -> None:
    binary = _chromium()
    email = stack.people[2]
    with browser.Chromium(binary) as chrome:
        browser.log_in(chrome, stack.url, "admin", stack.passwords["admin"])
        assert chrome.evaluate("document.cookie.includes('_token=')")
        # The GDPR entry of Airflow's navigation, clicked as a person does.
        chrome.wait_for("[...document.querySelectorAll('a')].some(a => a.textContent.trim() === 'GDPR')",
                        "the GDPR entry in Airflow's navigation")
        chrome.evaluate("[...document.querySelectorAll('a')].find(a => a.textContent.trim() === 'GDPR').click()")
        chrome.wait_for(f"location.pathname.startsWith('/plugin/gdpr') && {browser.FRAME_DOC}"
                        f" && !!{browser.FRAME_DOC}.getElementById('register-form')", "the GDPR page", timeout=60)
        text = browser.frame_text(chrome)
        for expected in (OPEN_ID, LATE_ID, "Open requests", "telephony: pending (3 attempts)",
                         "prospects_never_converted", "Retention backlog now", "Archive", "Suppression list",
                         "Register a request", "Audit chain", "holds:"):
            assert expected in text, expected
        late_colour = chrome.evaluate(
            f"(() => {{ const row = [...{browser.FRAME_DOC}.querySelectorAll('tr.overdue')]"
            f".find(r => r.textContent.includes('{LATE_ID}'));"
            " return row && getComputedStyle(row.cells[0]).color; })()")
        assert late_colour == "rgb(197, 48, 48)", late_colour  # overdue in red
        assert chrome.evaluate(f"{browser.FRAME_DOC}.querySelectorAll('#weekly-chart rect').length") > 0
        assert chrome.evaluate(  # the DAG run of the overdue request, linked
            f"{browser.FRAME_DOC}.querySelector('a[href*=\"/dags/gdpr_erasure_retry/runs/scheduled__\"]') !== null")

        message = browser.submit_request(chrome, "erasure", "REQ-UI-BROWSER", TODAY.isoformat(), email)
        assert "Registered erasure request REQ-UI-BROWSER" in message and "triggered gdpr_subject_erasure" in message

        browser.open_gdpr_page(chrome, stack.url)
        assert "REQ-UI-BROWSER" in browser.frame_text(chrome)
        html = chrome.evaluate(f"{browser.FRAME_DOC}.documentElement.outerHTML")
        shot = chrome.screenshot(tmp_path / "gdpr-page.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("GDPR_UI_SCREENSHOT"):
        shutil.copy(shot, os.environ["GDPR_UI_SCREENSHOT"])
    assert _request_row(stack, "REQ-UI-BROWSER") == ("erasure", "registered", True)
    runs = [r for r in _dag_runs(stack, stack.token("admin")) if r["conf"] == {"request_id": "REQ-UI-BROWSER"}]
    assert len(runs) == 1
    assert _leaks(html, stack.personal()) == []
    assert email.lower() not in stack.log.read_text().lower(), "the address reached the api-server's log"


def test_without_chromium_a_developer_is_told_why_and_ci_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        _chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the browser test"):
        _chromium()


def test_the_page_shows_a_broken_chain_in_red_and_escapes_what_it_shows() -> None:
    from warehouse_gdpr.airflow.ui import page

    weeks = [(date(2026, 1, 5) + timedelta(weeks=i)).isoformat() for i in range(3)]
    data: dict[str, Any] = {
        "generated_at": "2026-06-15T09:00:00+00:00", "today": "2026-06-15",
        "requests": {"open": [{"request_id": "REQ-<b>", "kind": "erasure", "status": "registered", "received_at":
                               "2026-05-01", "due_date": "2026-06-01", "first_due_date": "2026-06-01",
                               "extended": False, "days_left": -14, "overdue": True, "targets": {},
                               "dag_run": {"dag_id": "gdpr_subject_erasure",
                                           "run_id": "manual__2026-06-15T09:00:00+00:00"}}],
                     "open_count": 1, "overdue_count": 1},
        "sweeps": [], "backlog": {"as_of": "2026-06-15T09:00:00+00:00", "rules": [], "error": None},
        "archive": {"rows": 0, "by_table": {}, "next_purge": None}, "suppression": {"entries": 0, "by_reason": {}},
        "audit_chain": {"status": "broken", "description": "broken at audit row audit id 7, chain position 7: edited",
                        "position": 9, "audit_id": 9, "exported": None, "rows_checked": 7, "broken": "audit id 7"},
        "weekly": {"weeks": weeks, "actions": {"delete": [0, 5, 0], "erase": [1, 0, 0]}},
    }
    html = page.render(data, base_path="/airflow", prefix="/airflow/gdpr", kinds=["erasure"],
                       dag_for_kind={"erasure": "gdpr_subject_erasure"}, can_register=True)
    assert '<p class="overdue">broken at audit row audit id 7' in html
    assert '<div class="card overdue">Audit chain<b>broken</b>' in html
    assert "REQ-&lt;b&gt;" in html and "REQ-<b>" not in html
    assert 'href="/airflow/dags/gdpr_subject_erasure/runs/manual__2026-06-15T09%3A00%3A00%2B00%3A00"' in html
    assert html.count("<rect") == 2 and 'src="/airflow/gdpr/page.js"' in html
