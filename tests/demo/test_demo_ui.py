"""`make ui` / `make stop` (issue 16), for real: `python -m warehouse_gdpr_demo ui` on a demo directory of its
own (a seeded warehouse, the demo's downstream services, .demo/env as `make demo` writes it) starts the
api-server, scheduler, dag-processor and triggerer, prints the URL and the logins; a request registered
through the GDPR page's form is then run to completion by that scheduler; `... stop` stops all four."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(url: str, body: dict[str, object] | None = None, token: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _demo_dir(tmp_path: Path, warehouse: str) -> dict[str, str]:
    """What `make demo` leaves: .demo/env (keys, connections, the downstream services running)."""
    env = {**os.environ, "WAREHOUSE_GDPR_DEMO_DIR": str(tmp_path / "demo"), "WAREHOUSE_GDPR_DEMO_URL": warehouse,
           "DEMO_UI_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "demo")])}
    dag_url = make_conninfo(**{**conninfo_to_dict(warehouse), "user": "gdpr_dag"})  # type: ignore[arg-type]
    script = textwrap.dedent(f"""
        from warehouse_gdpr_demo import run
        run.DEMO.mkdir(parents=True)
        services = run.start_services({warehouse!r}, desk_name="gdpr_desk_ui_{uuid.uuid4().hex[:8]}")
        run.write_env({warehouse!r}, {dag_url!r}, run.load_keys_file(), services)
    """)
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True)
    return env


def test_make_ui_runs_the_forms_request_and_make_stop_stops_it(warehouse: str, tmp_path: Path) -> None:
    if os.environ.get("WAREHOUSE_TEST_URL"):
        pytest.skip("needs the gdpr_dag login of the embedded server")
    env = _demo_dir(tmp_path, warehouse)
    try:
        started = subprocess.run([sys.executable, "-m", "warehouse_gdpr_demo", "ui"], env=env, capture_output=True,
                                 text=True, timeout=600)
        assert started.returncode == 0, started.stdout + started.stderr
        url = re.search(r"Airflow UI: (http://127\.0\.0\.1:\d+)", started.stdout).group(1)  # type: ignore[union-attr]
        logins = dict(re.findall(r"(admin|viewer) / (\S+)", started.stdout))
        assert set(logins) == {"admin", "viewer"}, started.stdout
        state = json.loads((tmp_path / "demo" / "ui" / "state.json").read_text())
        assert set(state["pids"]) == {"api-server", "scheduler", "dag-processor", "triggerer"}
        assert all(_alive(pid) for pid in state["pids"].values())

        status, answer = _http(f"{url}/auth/token", {"username": "admin", "password": logins["admin"]})
        assert status == 201, answer
        token = json.loads(answer)["access_token"]
        assert _http(f"{url}/gdpr/api/summary")[0] == 401
        with psycopg.connect(warehouse) as conn:
            email = conn.execute("SELECT email FROM crm.contacts WHERE status = 'prospect' AND NOT litigation_hold"
                                 " ORDER BY contact_id LIMIT 1").fetchone()[0]  # type: ignore[index]
        status, answer = _http(f"{url}/gdpr/api/requests",
                               {"kind": "erasure", "request_id": "REQ-MAKE-UI", "identifier": email}, token)
        assert status == 201, answer
        assert json.loads(answer)["paused"] is False  # make ui unpaused gdpr_subject_erasure, and only it

        deadline, row = time.monotonic() + 300, None
        while time.monotonic() < deadline:
            with psycopg.connect(warehouse) as conn:
                row = conn.execute("SELECT status, outcome FROM gdpr.request WHERE request_id = 'REQ-MAKE-UI'"
                                   ).fetchone()
            if row and row[0] == "completed":
                break
            time.sleep(3)
        logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "demo" / "ui").glob("*.log"))
        assert row == ("completed", "erased"), logs[-4000:]
        status, text = _http(f"{url}/gdpr/api/summary", token=token)
        assert status == 200 and "REQ-MAKE-UI" not in text  # complete: no longer an open request
        assert email.lower() not in logs.lower()
    finally:
        stopped = subprocess.run([sys.executable, "-m", "warehouse_gdpr_demo", "stop"], env=env, capture_output=True,
                                 text=True, timeout=120)
    assert "Airflow UI (make ui): stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not any(_alive(pid) for pid in state["pids"].values())
    assert not (tmp_path / "demo" / "ui" / "state.json").exists()
    with pytest.raises(OSError):
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/api/v2/monitor/health", timeout=5)
