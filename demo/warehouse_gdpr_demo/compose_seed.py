"""Seed the docker compose stack's warehouse (its `warehouse-init` service) the way `make demo` does.

    python -m warehouse_gdpr_demo.compose_seed --emailing-url http://downstream:8081 \\
        --telephony-url http://downstream:8082 [--contacts 10000] [--desk-db support_desk] [--reseed]

The steps are demo.py's own (`seed_warehouse`, `create_support_desk`, `share_with_downstream`): the
demo CRM, the control schema and roles, the demo grants, the support desk's database (`--desk-db`, on
the same server), and a first sync of some contacts to the downstream services. Then the DAGs'
least-privileged login role `gdpr_dag` gets its password, so the `warehouse` connection can log in
over TCP.

Environment (secrets never on the command line):
  WAREHOUSE_GDPR_DEMO_URL owner connection string of the warehouse; empty or unset: libpq's PGHOST,
                         PGUSER, PGPASSWORD, PGDATABASE
  GDPR_DAG_PASSWORD      the password of `gdpr_dag` (the `warehouse` Airflow connection's)
  DEMO_EMAILING_API_KEY, DEMO_TELEPHONY_TOKEN   the demo services' credentials

A warehouse seeded before (control schema and desk database present) is left as it is, so its audit
log and erasure requests survive another `docker compose up`, unless `--reseed`; but its control schema
is brought up to this package's version every time (idempotent: a volume seeded by an older version
gets the new tables, every row kept), and the password is set every time. Contacts are synced
downstream only right after seeding and only into empty services (their store is in memory).
Prints counts only, never a personal value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request

import psycopg
from psycopg import sql

from warehouse_gdpr.engine import schema

from . import run as demo
from . import safety

PASSWORD_ENV = "GDPR_DAG_PASSWORD"
DAG_ROLE = "gdpr_dag"  # created by demo/warehouse_gdpr_demo/sql/demo_grants.sql


def _contact_count(base_url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{base_url}/_control/contacts/count", timeout=10) as answer:
        return int(json.load(answer)["count"])


def is_seeded(owner_url: str, desk_db: str) -> bool:
    """Whether a previous seed got through: the control schema is installed and the desk database exists."""
    with psycopg.connect(owner_url) as conn:
        if schema.installed_version(conn) is None:
            return False
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (desk_db,)).fetchone() is not None


def set_dag_password(owner_url: str, password: str) -> None:
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(DAG_ROLE), sql.Literal(password)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emailing-url", required=True, help="base URL of the demo emailing tool")
    parser.add_argument("--telephony-url", required=True, help="base URL of the demo telephony tool")
    parser.add_argument("--contacts", type=int, default=int(os.environ.get("DEMO_CONTACTS", "10000")))
    parser.add_argument("--desk-db", default="support_desk", help="the support desk's database (default support_desk)")
    parser.add_argument("--reseed", action="store_true", help="drop and reseed a warehouse seeded before")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    password = os.environ.get(PASSWORD_ENV)
    api_key, token = os.environ.get("DEMO_EMAILING_API_KEY"), os.environ.get("DEMO_TELEPHONY_TOKEN")
    if not password or not api_key or not token:
        parser.error(f"set ${PASSWORD_ENV}, $DEMO_EMAILING_API_KEY and $DEMO_TELEPHONY_TOKEN")
    owner_url = os.environ.get(safety.DEMO_URL_ENV, "")

    if is_seeded(owner_url, args.desk_db) and not args.reseed:
        print("The warehouse is seeded already: left as it is (run with --reseed to start over).")
    else:
        try:
            counts = demo.seed_warehouse(owner_url, args.contacts)
        except safety.NotADemoWarehouse as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print("Seeded the demo CRM: " + ", ".join(f"{n} {t}" for t, n in counts.items()))
        services: dict[str, object] = {"emailing_url": args.emailing_url.rstrip("/"),
                                       "telephony_url": args.telephony_url.rstrip("/"),
                                       "desk_url": demo.create_support_desk(owner_url, args.desk_db)}
        if any(_contact_count(str(services[f"{name}_url"])) for name in ("emailing", "telephony")):
            print("The downstream services hold contacts already: no new sync.")
        else:
            with psycopg.connect(owner_url) as conn:
                shared = demo.share_with_downstream(conn, services, api_key=api_key, token=token)
            print(f"Synced {shared} contacts to the emailing tool, the telephony tool and the support desk.")
    # As the owner, every time: the DAGs' least-privileged role may not upgrade the control schema.
    with psycopg.connect(owner_url) as conn:
        before = schema.installed_version(conn)
        conn.commit()
        if schema.ensure_schema(conn):
            print(f"Upgraded the control schema from version {before} to {schema.SCHEMA_VERSION}.")
    set_dag_password(owner_url, password)
    print(f"Role {DAG_ROLE} can log in with ${PASSWORD_ENV}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
