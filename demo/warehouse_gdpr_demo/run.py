"""`make demo`: a demo CRM warehouse, a local Airflow, and one real retention sweep.

1. Warehouse: $WAREHOUSE_GDPR_DEMO_URL if set (never $WAREHOUSE_URL), else the embedded PostgreSQL under
   .demo/pg. The demo refuses a database it did not seed that holds data (safety.py).
2. Installs the control schema and roles, seeds the demo CRM ($DEMO_CONTACTS, default 10000).
3. Writes .demo/env (source it to use `airflow` and `psql` by hand), migrates Airflow's SQLite DB.
4. Runs `airflow dags test gdpr_retention_sweep` and prints the PII-free summary from gdpr.audit_log.
5. Starts two downstream services on 127.0.0.1 (an emailing tool and a telephony tool) and a
   support-desk database, erases one demo contact (registered with `warehouse-gdpr request new`, the
   address on stdin, then `gdpr_subject_erasure` run with the request id alone: the address is never in
   a process's argv or in Airflow's dag_run.conf), and prints each target's acknowledgement.
6. Re-imports the erased person and runs `gdpr_optout_sync`: opt-outs collected and enforced, the
   resurrection caught, the hashed list shared with the emailing tool.

`python -m warehouse_gdpr_demo ui` starts Airflow's UI on the demo (`make ui`, see ui.py);
`python -m warehouse_gdpr_demo stop` stops it, the services and the embedded PostgreSQL (`make stop`).
The docker compose stack seeds its warehouse with the same steps (`seed_warehouse`,
`create_support_desk`, `share_with_downstream`) through `warehouse_gdpr_demo.compose_seed`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import psycopg.conninfo
import psycopg.sql

from warehouse_gdpr.engine import schema
from warehouse_gdpr.engine.crypto import generate_extras

from . import data as demo_data
from . import embedded, safety
from .sqlfiles import read_sql

ROOT = Path(__file__).resolve().parents[2]
# Where the demo keeps its state (.demo/env, keys, logs, the embedded server's data); a test gives its own.
DEMO = Path(os.environ.get("WAREHOUSE_GDPR_DEMO_DIR") or ROOT / ".demo")


def warehouse_url() -> tuple[str, bool]:
    """(owner URL, embedded?)"""
    url = os.environ.get(safety.DEMO_URL_ENV)
    if url:
        return url, False
    return embedded.start(DEMO / "pg"), True


def engine_url(owner_url: str, is_embedded: bool) -> str:
    """The URL the DAGs use: the least-privileged `gdpr_dag` role on the embedded server."""
    if not is_embedded:
        return owner_url
    return owner_url.replace("postgresql://postgres:@", "postgresql://gdpr_dag:@", 1)


def write_env(owner_url: str, dag_url: str, keys: dict[str, object], services: dict[str, object]) -> Path:
    path_dirs = [str(Path(sys.executable).parent)]
    pg_bin = embedded.bin_dir()
    if pg_bin:
        path_dirs.append(str(pg_bin))  # psql and pg_ctl of the embedded PostgreSQL
    values = {
        "PATH": ":".join(path_dirs) + ":$PATH",
        "AIRFLOW_HOME": str(DEMO / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "WAREHOUSE_GDPR_POLICY": str(ROOT / "include" / "policy.yaml"),
        "WAREHOUSE_URL": owner_url,
        "AIRFLOW_CONN_WAREHOUSE": json.dumps(embedded.airflow_conn_json(dag_url)),
        # Demo only: production keys live in your secrets backend, never in a file like this one.
        "AIRFLOW_CONN_GDPR_KEYS": json.dumps({"conn_type": "generic", "extra": keys}),
        # The downstream systems an erasure is propagated to (demo services on 127.0.0.1).
        "AIRFLOW_CONN_EMAILING": json.dumps({"conn_type": "http", "host": "127.0.0.1", "schema": "http",
                                             "port": services["emailing_port"], "extra": {"api-key": DEMO_API_KEY}}),
        "AIRFLOW_CONN_TELEPHONY": json.dumps({"conn_type": "http", "host": "127.0.0.1", "schema": "http",
                                              "port": services["telephony_port"],
                                              "extra": {"Authorization": f"Bearer {DEMO_TOKEN}"}}),
        "AIRFLOW_CONN_SUPPORT_DESK": json.dumps(embedded.airflow_conn_json(str(services["desk_url"]))),
        # The sales team's webhook, told of each restriction of processing and its lift (internal ids only).
        "AIRFLOW_CONN_SALES_WEBHOOK": json.dumps({"conn_type": "http", "host": "127.0.0.1", "schema": "http",
                                                  "port": services["webhook_port"],
                                                  "extra": {"Authorization": f"Bearer {DEMO_TOKEN}"}}),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    private = load_private_file()
    if private is not None:
        # The archive's private key. Demo only, beside every other connection: in production only the
        # legal / accounting side and the access request's DAG may read it (README, "Keys").
        values["AIRFLOW_CONN_GDPR_ARCHIVE_PRIVATE"] = json.dumps({"conn_type": "generic", "extra": private})
    lines = ["# generated by `make demo`: source .demo/env"]
    for key, value in values.items():
        quoted = f'"{value}"' if key == "PATH" else shlex.quote(value)
        lines.append(f"export {key}={quoted}")
    path = DEMO / "env"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def airflow_env(env_file: Path) -> dict[str, str]:
    out = subprocess.run(
        ["bash", "-c", f"source {shlex.quote(str(env_file))} && env -0"], check=True, capture_output=True
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def load_keys_file() -> dict[str, object]:
    """The keys connection's extra (.demo/keys.json), generated on the first run with the archive's private
    key beside it (.demo/archive_private.json). A keys.json of an earlier demo (one symmetric archive key,
    no private file) is kept as it is: its warehouse's archive stays readable."""
    path = DEMO / "keys.json"
    if not path.exists():
        keys_extra, private_extra = generate_extras()
        private = DEMO / "archive_private.json"
        private.write_text(json.dumps(private_extra))
        private.chmod(0o600)
        path.write_text(json.dumps(keys_extra))
        path.chmod(0o600)
    return json.loads(path.read_text())


def load_private_file() -> dict[str, object] | None:
    """The archive's private connection's extra (.demo/archive_private.json), None for an earlier demo's keys."""
    path = DEMO / "archive_private.json"
    return json.loads(path.read_text()) if path.exists() else None


def print_summary(conn: psycopg.Connection, run_id: str) -> None:
    rows = conn.execute(
        "SELECT coalesce(rule, '-'), action, coalesce(table_name, '-'), sum(row_count)"
        " FROM gdpr.audit_log WHERE dag_id = 'gdpr_retention_sweep' AND run_id = %s"
        " AND action IN ('delete', 'pseudonymise', 'archive', 'purge_archive')"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        (run_id,),
    ).fetchall()
    held = conn.execute(
        "SELECT rule, sum((details->>'held')::int) FROM gdpr.audit_log"
        " WHERE dag_id = 'gdpr_retention_sweep' AND run_id = %s AND action = 'batch' GROUP BY rule ORDER BY rule",
        (run_id,),
    ).fetchall()
    from warehouse_gdpr.engine.sweep import format_table

    print("\nRows changed by the sweep (from gdpr.audit_log, no personal data):")
    print(format_table(["rule", "action", "table", "rows"], [list(r) for r in rows]) if rows else "(none)")
    print("\nSubjects skipped because a legal hold applies:")
    print(format_table(["rule", "held"], [list(r) for r in held]) if held else "(none)")
    status = conn.execute("SELECT status, count(*), count(pseudonymised_at) FROM crm.contacts"
                          " GROUP BY 1 ORDER BY 1").fetchall()
    print("\nContacts now in the warehouse:")
    print(format_table(["status", "contacts", "pseudonymised"], [list(r) for r in status]))


DEMO_API_KEY = "demo-emailing-key"
DEMO_TOKEN = "demo-telephony-token"
SERVICES_PID = DEMO / "services.pid"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_services() -> None:
    if SERVICES_PID.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(SERVICES_PID.read_text()), signal.SIGTERM)
        SERVICES_PID.unlink()


def seed_warehouse(owner_url: str, contacts: int) -> dict[str, int]:
    """A new demo warehouse: the demo CRM seeded afresh, the control schema (re)installed empty, the demo
    grants. Returns the rows written per table."""
    with psycopg.connect(owner_url) as conn:
        safety.check_demo_target(conn)  # never drops a control schema the demo did not create
        # A demo reseed is a new warehouse: its archive and audit history start over too.
        with conn.transaction():
            conn.execute("DROP SCHEMA IF EXISTS gdpr CASCADE; DROP SCHEMA IF EXISTS gdpr_archive CASCADE")
        counts = demo_data.seed(conn, contacts=contacts)
        schema.ensure_schema(conn)
        with conn.transaction():
            conn.execute(read_sql("demo_grants.sql"))
    return counts


def create_support_desk(owner_url: str, name: str = "support_desk") -> str:
    """(Re)create the support desk's own database (a SQL erasure target) on the warehouse's server; its URL."""
    with psycopg.connect(owner_url, autocommit=True) as admin:
        admin.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))
        admin.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    desk_url = psycopg.conninfo.make_conninfo(owner_url, dbname=name)
    with psycopg.connect(desk_url) as desk:
        desk.execute(read_sql("demo_support_desk.sql"))
    return desk_url


def start_services(owner_url: str, desk_name: str = "support_desk") -> dict[str, object]:
    """The demo's downstream systems: two HTTP services (detached, until `make stop`) and a desk DB."""
    stop_services()
    ports = {"emailing_port": _free_port(), "telephony_port": _free_port(), "webhook_port": _free_port()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "warehouse_gdpr_demo.services", "--emailing-port", str(ports["emailing_port"]),
         "--telephony-port", str(ports["telephony_port"]), "--webhook-port", str(ports["webhook_port"]),
         "--api-key", DEMO_API_KEY, "--token", DEMO_TOKEN],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True,
    )
    assert proc.stdout is not None
    for _ in range(3):
        proc.stdout.readline()  # "emailing http://...", "telephony http://...", "webhook http://...": all listen
    SERVICES_PID.write_text(str(proc.pid))
    urls = {f"{name}_url": f"http://127.0.0.1:{ports[f'{name}_port']}"
            for name in ("emailing", "telephony", "webhook")}
    return {**ports, **urls, "desk_url": create_support_desk(owner_url, desk_name)}


def _post(url: str, body: dict[str, object], headers: dict[str, str]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    opener.open(request, timeout=10).close()


def share_with_downstream(conn: psycopg.Connection, services: dict[str, object], limit: int = 200,
                          api_key: str = DEMO_API_KEY, token: str = DEMO_TOKEN) -> int:
    """Copy some demo contacts to the downstream systems, as a real CRM sync would have.

    `services`: ``emailing_url``, ``telephony_url`` (base URLs) and ``desk_url`` (the desk database)."""
    rows = conn.execute(
        "SELECT email, direct_phone, first_name, last_name, contact_id FROM crm.contacts"
        " WHERE status IN ('prospect', 'lead', 'client') AND pseudonymised_at IS NULL ORDER BY contact_id LIMIT %s",
        (limit,)
    ).fetchall()
    conn.rollback()
    with psycopg.connect(str(services["desk_url"])) as desk:
        for email, phone, first, last, contact_id in rows:
            # What each tool holds (and answers on GET, for an access request): the contact and its history.
            _post(f"{services['emailing_url']}/v3/contacts",
                  {"email": email, "attributes": {"FIRSTNAME": first, "LASTNAME": last}, "listIds": [2],
                   "statistics": {"messagesSent": [{"campaignId": 7, "eventTime": "2026-05-12T09:00:00+02:00"}],
                                  "opened": [{"campaignId": 7, "eventTime": "2026-05-12T10:41:00+02:00"}]}},
                  {"api-key": api_key})
            _post(f"{services['telephony_url']}/contacts",
                  {"email": email, "phone": phone, "name": f"{first} {last}",
                   "calls": [{"direction": "outbound", "started_at": "2026-05-20T14:05:00+02:00",
                              "duration_seconds": 60 + contact_id % 400, "user": "Julien Robert"}]},
                  {"Authorization": f"Bearer {token}"})
            ticket = desk.execute(
                "INSERT INTO desk.tickets (requester_email, subject) VALUES (%s, 'Demo ticket') RETURNING ticket_id",
                (email,)).fetchone()[0]  # type: ignore[index]
            desk.execute("INSERT INTO desk.ticket_messages (ticket_id, body) VALUES (%s, %s)",
                         (ticket, f"Hello, {first} here."))
    return len(rows)


def demo_erasure(owner_url: str, env: dict[str, str]) -> tuple[int, str]:
    """Erase one demo contact (still held downstream) through the real DAG; print the acknowledgements."""
    with psycopg.connect(owner_url) as conn:
        row = conn.execute(
            "SELECT contact_id, email FROM crm.contacts c WHERE status = 'prospect' AND NOT litigation_hold"
            " AND pseudonymised_at IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM crm.invoices i WHERE i.contact_id = c.contact_id)"
            " ORDER BY contact_id LIMIT 1"
        ).fetchone()
    assert row is not None, "the demo CRM has no erasable prospect left"
    contact_id, email = row
    request_id = f"DEMO-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"\nErasing demo contact #{contact_id} (request {request_id}): `warehouse-gdpr request new` with the "
          "address on stdin, then `airflow dags test gdpr_subject_erasure` with the request id alone ...")
    log_path = DEMO / "erasure.log"
    with log_path.open("w") as log_file:
        # The registered path: the address never appears in a process's argv or in the run's dag_run.conf.
        proc = subprocess.run(
            ["warehouse-gdpr", "request", "new", "--kind", "erasure", "--request-id", request_id],
            input=email.encode(), env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
        if proc.returncode == 0:
            proc = subprocess.run(
                ["airflow", "dags", "test", "gdpr_subject_erasure", "-c", json.dumps({"request_id": request_id})],
                env=env, stdout=log_file, stderr=subprocess.STDOUT,
            )
    with psycopg.connect(owner_url) as conn:
        status = conn.execute("SELECT status, outcome, due_date FROM gdpr.erasure_request WHERE request_id = %s",
                              (request_id,)).fetchone()
        targets = conn.execute(
            "SELECT target, status, attempts, to_char(acknowledged_at, 'YYYY-MM-DD HH24:MI:SS'), last_result,"
            " identifier_ciphertext IS NULL FROM gdpr.erasure_propagation WHERE request_id = %s ORDER BY target",
            (request_id,)).fetchall()
        left = conn.execute("SELECT count(*) FROM crm.contacts WHERE contact_id = %s", (contact_id,)).fetchone()[0]  # type: ignore[index]
    from warehouse_gdpr.engine.sweep import format_table

    if status is None:
        print(f"The erasure failed before recording the request (exit {proc.returncode}); see {log_path}",
              file=sys.stderr)
        return 1, email
    print(f"Request {request_id}: outcome {status[1]}, status {status[0]}, due {status[2]}; "
          f"contact rows left in the warehouse: {left}.")
    print(format_table(["target", "status", "attempts", "acknowledged at (UTC)", "answer", "identifier destroyed"],
                       [list(t) for t in targets]))
    return (0 if proc.returncode == 0 else 1), email


def demo_optout(owner_url: str, env: dict[str, str], services: dict[str, object], erased_email: str) -> int:
    """Re-import the erased person (as a CRM import would), then run gdpr_optout_sync: opt-outs are
    collected and enforced, the resurrection is caught, the list is shared with the emailing tool."""
    with psycopg.connect(owner_url) as conn:
        conn.execute(
            "INSERT INTO crm.contacts (contact_id, company_id, status, email, first_name, last_name, created_at)"
            " SELECT max(contact_id) + 1, min(company_id), 'lead', %s, 'Re', 'Imported', now() FROM crm.contacts",
            (erased_email.upper(),),
        )
    print("\nA CRM import brought the erased person back (new contact, same email in capitals).")
    print("Running `airflow dags test gdpr_optout_sync` (task logs: .demo/optout.log) ...")
    with (DEMO / "optout.log").open("w") as log_file:
        proc = subprocess.run(["airflow", "dags", "test", "gdpr_optout_sync"], env=env,
                              stdout=log_file, stderr=subprocess.STDOUT)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{services['emailing_url']}/_control/blocklist/count", timeout=10) as answer:
        shared = json.load(answer)["count"]
    with psycopg.connect(owner_url) as conn:
        listed = conn.execute("SELECT reason, count(*) FROM gdpr.suppression_list GROUP BY 1 ORDER BY 1").fetchall()
        caught = conn.execute(
            "SELECT outcome, details->>'request_id' FROM gdpr.audit_log WHERE action = 'resurrection' ORDER BY audit_id"
        ).fetchall()
        flagged = conn.execute("SELECT count(*) FROM crm.contacts WHERE do_not_contact").fetchone()[0]  # type: ignore[index]
        back = conn.execute("SELECT count(*) FROM crm.contacts WHERE lower(email) = lower(%s)",
                            (erased_email,)).fetchone()[0]  # type: ignore[index]
    from warehouse_gdpr.engine.sweep import format_table

    print("Suppression list (hashes only):")
    print(format_table(["reason", "entries"], [list(r) for r in listed]))
    print(f"Resurrections caught: {len(caught)} ("
          + ", ".join(f"{outcome}, original request {req}" for outcome, req in caught) + f"); "
          f"rows of the re-imported person left: {back}.")
    print(f"Contacts marked do-not-contact: {flagged}. Hashes shared with the emailing tool: {shared}.")
    if proc.returncode != 0:
        print("The opt-out sync failed; see .demo/optout.log", file=sys.stderr)
        return 1
    return 0


def stop() -> int:
    from . import ui

    print("Airflow UI (make ui):", "stopped" if ui.stop() else "not running")
    stop_services()
    print("embedded PostgreSQL:", "stopped" if embedded.stop(DEMO / "pg") else "not running")
    return 0


def first_sweep_confirmation(owner_url: str, as_of: str) -> dict[str, int]:
    """The confirmation an operator gives for the demo's first sweep, and why it is needed.

    A freshly seeded CRM holds years of backlog: in the first sweep the prospects rule deletes about
    23 % of the contacts and the leads rule about 15 %, above the policy's blast-radius limit (10 % of
    the subject table per rule and run), so an unconfirmed run stops before changing anything. The demo does what
    docs/runbook.md asks of a person: count what each rule would select (as `warehouse-gdpr policy
    check` does, at the run's own reference instant) and confirm those counts. The limit stays at its
    default for every later run."""
    from warehouse_gdpr.engine import sweep
    from warehouse_gdpr.engine.policy import load_policy

    policy = load_policy(ROOT / "include" / "policy.yaml")
    with psycopg.connect(owner_url) as conn:
        plans = sweep.plan(conn, policy, policy.rules, as_of)
        rows = sweep.subject_rows(conn, policy)
    over = sweep.blast_radius({p.rule: p.candidates - p.held for p in plans}, rows, policy.blast_radius_percent)
    for b in over:
        print(f"First sweep: {b.rule} treats {b.to_process} of {b.subject_rows} contacts ({b.percent} %), above "
              f"blast_radius_percent ({policy.blast_radius_percent:g} %): confirmed with the confirm_blast_radius "
              "param.")
    return {b.rule: b.to_process for b in over}


def main() -> int:
    DEMO.mkdir(exist_ok=True)
    contacts = int(os.environ.get("DEMO_CONTACTS", "10000"))
    owner_url, is_embedded = warehouse_url()
    print(f"Warehouse: {'embedded PostgreSQL under .demo/pg' if is_embedded else '$' + safety.DEMO_URL_ENV}")
    started = time.monotonic()
    try:
        counts = seed_warehouse(owner_url, contacts)
    except safety.NotADemoWarehouse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Seeded the demo CRM in {time.monotonic() - started:.1f} s: "
          + ", ".join(f"{n} {t}" for t, n in counts.items()))
    services = start_services(owner_url)
    env_file = write_env(owner_url, engine_url(owner_url, is_embedded), load_keys_file(), services)
    env = airflow_env(env_file)
    print("Preparing Airflow's metadata DB (SQLite under .demo/airflow) ...")
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    log_path = DEMO / "sweep.log"
    as_of = datetime.now(timezone.utc).replace(microsecond=0)
    confirm = first_sweep_confirmation(owner_url, as_of.isoformat())
    print(f"Running `airflow dags test gdpr_retention_sweep` (task logs: {log_path.relative_to(ROOT)}) ...")
    with log_path.open("w") as log_file:
        proc = subprocess.run(
            ["airflow", "dags", "test", "gdpr_retention_sweep", as_of.isoformat(),
             "-c", json.dumps({"confirm_blast_radius": confirm})],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0:
        print(f"The sweep failed (exit {proc.returncode}); see {log_path}", file=sys.stderr)
        return 1
    with psycopg.connect(owner_url) as conn:
        run_id = conn.execute(
            "SELECT run_id FROM gdpr.audit_log WHERE dag_id = 'gdpr_retention_sweep' AND action = 'report'"
            " ORDER BY audit_id DESC LIMIT 1"
        ).fetchone()[0]  # type: ignore[index]
        print_summary(conn, run_id)
        shared = share_with_downstream(conn, services)
    print(f"\nDownstream: emailing tool on port {services['emailing_port']}, telephony on port "
          f"{services['telephony_port']}, support-desk database; {shared} contacts synced to each.")
    failed, erased_email = demo_erasure(owner_url, env)
    if failed or demo_optout(owner_url, env, services, erased_email):
        return 1
    print(
        "\nNext: `source .demo/env`, then for example\n"
        "  airflow dags test gdpr_retention_sweep -c '{\"dry_run\": true}'\n"
        "  read -rs EMAIL; printf '%s' \"$EMAIL\" | warehouse-gdpr request new --kind erasure --request-id REQ-1\n"
        "  airflow dags test gdpr_subject_erasure -c '{\"request_id\": \"REQ-1\"}'\n"
        "  airflow dags test gdpr_optout_sync\n"
        "  psql \"$WAREHOUSE_URL\" -c 'SELECT * FROM gdpr.audit_log ORDER BY audit_id DESC LIMIT 20'\n"
        "Stop the embedded PostgreSQL with `make stop`."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(stop() if sys.argv[1:] == ["stop"] else main())
