"""`make ui` (after `make demo`): Airflow's UI on the demo, without Docker, with the GDPR page.

Starts the api-server, the scheduler, the dag-processor and the triggerer on the demo's metadata database
(SQLite under .demo/airflow) and warehouse (.demo/env), with Airflow's SimpleAuthManager and two users:
`admin` (may trigger DAGs, so may use the page's form) and `viewer` (reads only). Their passwords are
generated on the first start into .demo/airflow/simple_auth_manager_passwords.json.generated and printed.
Logs go to .demo/ui/*.log; `make stop` stops the four processes (python -m warehouse_gdpr_demo stop).

Only `gdpr_subject_erasure` (no schedule: it runs when triggered) is unpaused, so that the form's runs
execute; the scheduled DAGs stay paused (an unpaused `gdpr_retention_sweep` would sweep the demo
warehouse at once, see the README). The embedded PostgreSQL and the demo's downstream services are
started again if `make stop` stopped them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import embedded, run, safety

UI = run.DEMO / "ui"
STATE = UI / "state.json"
PROCESSES = ("api-server", "scheduler", "dag-processor", "triggerer")
USERS = {"admin": "admin", "viewer": "viewer"}  # user name -> SimpleAuthManager role
DEFAULT_PORT = 8080


def _alive(pid: int, marker: bytes = b"airflow") -> bool:
    """`pid` is still one of ours: a running process leading its own group (start_new_session) whose command
    line holds `marker` (so that a pid the system reused for something else is never signalled)."""
    try:
        if os.getpgid(pid) != pid:
            return False
        cmdline = Path(f"/proc/{pid}/cmdline")
        return marker in cmdline.read_bytes() if cmdline.parent.exists() else True
    except (ProcessLookupError, PermissionError, OSError):
        return False


def read_state() -> dict[str, Any] | None:
    """The running UI (url, pids, passwords), or None when it is not running."""
    if not STATE.exists():
        return None
    state: dict[str, Any] = json.loads(STATE.read_text())
    return state if any(_alive(pid) for pid in state.get("pids", {}).values()) else None


def _port() -> int:
    wanted = int(os.environ.get("DEMO_UI_PORT", DEFAULT_PORT))
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            sock.bind(("127.0.0.1", 0))  # the default port is taken: any free one
            return int(sock.getsockname()[1])


def _services_running() -> bool:
    with contextlib.suppress(ValueError, OSError):
        return run.SERVICES_PID.exists() and _alive(int(run.SERVICES_PID.read_text()), b"warehouse_gdpr_demo.services")
    return False


def _restart_services(env: dict[str, str]) -> None:
    """The downstream HTTP services on the ports .demo/env gives them (stopped by `make stop`)."""
    ports = {name: json.loads(env[f"AIRFLOW_CONN_{name.upper()}"])["port"] for name in ("emailing", "telephony")}
    webhook = json.loads(env["AIRFLOW_CONN_SALES_WEBHOOK"])["port"] if "AIRFLOW_CONN_SALES_WEBHOOK" in env else 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "warehouse_gdpr_demo.services", "--emailing-port", str(ports["emailing"]),
         "--telephony-port", str(ports["telephony"]), "--webhook-port", str(webhook),
         "--api-key", run.DEMO_API_KEY, "--token", run.DEMO_TOKEN],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True,
    )
    assert proc.stdout is not None
    for _ in range(3):
        proc.stdout.readline()
    run.SERVICES_PID.write_text(str(proc.pid))


def ui_env(env_file: Path, port: int) -> dict[str, str]:
    """.demo/env plus what the four processes share: the UI's address, SimpleAuthManager and its users, and
    the secrets that sign the UI's and the tasks' tokens (new ones at every start)."""
    env = run.airflow_env(env_file)
    url = f"http://127.0.0.1:{port}"
    env.update({
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",  # a demo on a laptop: two task processes at a time
    })
    return env


def _wait_healthy(url: str, log: Path, timeout: float = 180.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), opener.open(f"{url}/api/v2/monitor/health", timeout=5) as answer:
            if answer.status == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"the api-server did not answer at {url} within {timeout:.0f} s; see {log}")


def _passwords(env: dict[str, str]) -> dict[str, str]:
    path = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            passwords: dict[str, str] = json.loads(path.read_text())
            if all(u in passwords for u in USERS):
                return passwords
        time.sleep(0.5)
    raise RuntimeError(f"no password in {path}")


def start() -> int:
    env_file = run.DEMO / "env"
    if not env_file.exists():
        print("run `make demo` first: it seeds the warehouse and writes .demo/env", file=sys.stderr)
        return 2
    if read_state() is not None:
        state = read_state()
        assert state is not None
        print(f"The demo's Airflow UI is already running: {state['url']} (`make stop` stops it).")
        return 0
    if not os.environ.get(safety.DEMO_URL_ENV):
        embedded.start(run.DEMO / "pg")
    port = _port()
    env = ui_env(env_file, port)
    if not _services_running():
        _restart_services(env)
    UI.mkdir(exist_ok=True)
    print("Preparing Airflow (metadata DB, the DAGs) ...")
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["airflow", "dags", "reserialize"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    subprocess.run(["airflow", "dags", "unpause", "gdpr_subject_erasure"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    pids = {}
    for name in PROCESSES:
        log = (UI / f"{name}.log").open("ab")
        pids[name] = subprocess.Popen(["airflow", name], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True).pid
    url = env["AIRFLOW__API__BASE_URL"]
    STATE.write_text(json.dumps({"url": url, "pids": pids, "passwords": {}}))
    STATE.chmod(0o600)
    _wait_healthy(url, UI / "api-server.log")
    passwords = _passwords(env)
    STATE.write_text(json.dumps({"url": url, "pids": pids, "passwords": {u: passwords[u] for u in USERS}}))
    print(f"\nAirflow UI: {url}   (the GDPR page: {url}/plugin/gdpr, its JSON: {url}/gdpr/api/summary)")
    print(f"Log in as admin / {passwords['admin']} (may register requests), or viewer / {passwords['viewer']} "
          "(reads only).")
    logs = os.path.relpath(UI) if UI.resolve().is_relative_to(Path.cwd().resolve()) else str(UI)
    print(f"api-server, scheduler, dag-processor, triggerer: logs in {logs}/. "
          "Stop them (and the demo's PostgreSQL and services) with `make stop`.")
    return 0


def stop() -> bool:
    """Stop the four processes `start` left running (by their pids: each leads its own process group).
    True if something was running."""
    if not STATE.exists():
        return False
    pids = json.loads(STATE.read_text()).get("pids", {})
    running = [pid for pid in pids.values() if _alive(pid)]
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in running):
        time.sleep(0.5)
    for pid in running:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    STATE.unlink()
    return bool(running)
