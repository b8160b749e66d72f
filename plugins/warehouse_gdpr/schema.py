"""Install or upgrade the control schema (include/sql/gdpr_schema.sql) when it is missing or older."""

from __future__ import annotations

import logging

import psycopg

from .sqlfiles import read_sql

SCHEMA_VERSION = 4
log = logging.getLogger(__name__)


class SchemaError(RuntimeError):
    """The control schema is missing and this connection may not create it."""


def installed_version(conn: psycopg.Connection) -> int | None:
    if conn.execute("SELECT to_regclass('gdpr.schema_version')").fetchone()[0] is None:  # type: ignore[index]
        return None
    row = conn.execute("SELECT max(version) FROM gdpr.schema_version").fetchone()
    return row[0] if row else None


def ensure_schema(conn: psycopg.Connection) -> bool:
    """Apply the DDL if needed (idempotent). Returns True when it ran. Commits."""
    with conn.transaction():
        version = installed_version(conn)
        if version is not None and version >= SCHEMA_VERSION:
            return False
        # Two DAGs starting at once must not race on CREATE ROLE / CREATE TABLE.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('warehouse_gdpr.schema'))")
        try:
            conn.execute(read_sql("gdpr_schema.sql"))  # type: ignore[arg-type]
        except psycopg.errors.InsufficientPrivilege as exc:
            raise SchemaError(
                "the gdpr control schema is not installed and this connection may not install it "
                f"({exc.diag.message_primary}). Ask a DBA to run include/sql/gdpr_schema.sql as the warehouse owner."
            ) from None
    log.info("installed the gdpr control schema, version %s", SCHEMA_VERSION)
    return True
