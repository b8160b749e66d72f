"""The demo can never wipe a real warehouse.

The demo drops and recreates the schemas `crm`, `gdpr` and `gdpr_archive`. It does so only in a database it
seeded itself, which it marks with the schema `warehouse_gdpr_demo` (table `marker`). In an unmarked database
it refuses while any of those schemas holds a row: a real CRM, or a control schema with audit rows, requests
or suppression entries the demo did not create. The URL comes from the demo's own variable,
$WAREHOUSE_GDPR_DEMO_URL, never from $WAREHOUSE_URL (which operators export for the real warehouse).
"""

from __future__ import annotations

import psycopg
from psycopg import sql

DEMO_URL_ENV = "WAREHOUSE_GDPR_DEMO_URL"
MARKER_SCHEMA = "warehouse_gdpr_demo"
DROPPED_SCHEMAS = ("crm", "gdpr", "gdpr_archive")


class NotADemoWarehouse(RuntimeError):
    """The target database holds data the demo did not create: nothing was dropped."""


def is_marked(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{MARKER_SCHEMA}.marker",)).fetchone()[0]  # type: ignore[index]


def tables_with_rows(conn: psycopg.Connection) -> list[str]:
    """Tables of the schemas the demo drops that hold at least one row (names only, no values)."""
    tables = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') ORDER BY 1, 2",
        (list(DROPPED_SCHEMAS),),
    ).fetchall()
    found = []
    for schema, table in tables:
        query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(schema, table))
        if conn.execute(query).fetchone()[0]:  # type: ignore[index]
            found.append(f"{schema}.{table}")
    return found


def check_demo_target(conn: psycopg.Connection) -> None:
    """Raise NotADemoWarehouse unless the database is one the demo seeded, or holds nothing it would drop."""
    if is_marked(conn):
        conn.rollback()
        return
    found = tables_with_rows(conn)
    conn.rollback()
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise NotADemoWarehouse(
            f"refusing to run the demo here: this database was not seeded by the demo and {shown} hold rows "
            f"(the demo drops the schemas {', '.join(DROPPED_SCHEMAS)}). Point ${DEMO_URL_ENV} at an empty "
            "database, or unset it to use the embedded PostgreSQL under .demo/pg."
        )


def mark(conn: psycopg.Connection) -> None:
    """Mark the database as the demo's (inside the caller's transaction)."""
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {MARKER_SCHEMA}")
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {MARKER_SCHEMA}.marker (seeded_at timestamptz NOT NULL DEFAULT now(),"
        " note text NOT NULL DEFAULT 'seeded by the warehouse-gdpr demo: its data may be dropped by the demo')"
    )
    conn.execute(f"INSERT INTO {MARKER_SCHEMA}.marker DEFAULT VALUES")
