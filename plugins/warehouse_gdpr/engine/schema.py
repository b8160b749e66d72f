"""Install or upgrade the control schema (include/sql/gdpr_schema.sql) when it is missing or older."""

from __future__ import annotations

import logging

import psycopg

from .errors import ConfigurationError
from .sqlfiles import read_sql

SCHEMA_VERSION = 12  # 8: the audit chain; 9: rectification and restriction (gdpr.restriction, the guard);
# 10: requests and outbox rows follow their lifecycle, each change audited (enforced for the engine);
# 11: the journal of erasures, suppression entries and restrictions (gdpr.journal);
# 12: how many entries of its journal outside the warehouse the warehouse has seen (gdpr.journal_outside)
log = logging.getLogger(__name__)


class SchemaError(ConfigurationError, RuntimeError):
    """The control schema is missing or older than this package, and this connection may not install it."""


def installed_version(conn: psycopg.Connection) -> int | None:
    if conn.execute("SELECT to_regclass('gdpr.schema_version')").fetchone()[0] is None:  # type: ignore[index]
        return None
    row = conn.execute("SELECT max(version) FROM gdpr.schema_version").fetchone()
    return row[0] if row else None


def _cannot_install(version: int | None, role: str, reason: str) -> str:
    """What a role that may not run the DDL is told: which case it is, and what the owner runs."""
    if version is None:
        state, verb = "is not installed", "install"
    else:
        state, verb = f"is out of date (installed version {version}, this package needs {SCHEMA_VERSION})", "upgrade"
    return (
        f"the gdpr control schema {state} and this connection (role {role}) may not {verb} it ({reason}); "
        "nothing was changed. The warehouse owner or a DBA runs, with this version of warehouse-gdpr installed: "
        "`warehouse-gdpr schema install --url <owner URL>` (or with $WAREHOUSE_URL set instead of --url, which "
        "keeps the password out of the process list); `warehouse-gdpr schema sql` prints the DDL to review. "
        "It is idempotent and keeps every existing row."
    )


def ensure_schema(conn: psycopg.Connection) -> bool:
    """Apply the DDL if needed (idempotent). Returns True when it ran. Commits when called outside a
    transaction (as the DAGs and the CLI do); inside one it runs as a savepoint of the caller's."""
    with conn.transaction():
        try:
            version = installed_version(conn)
        except psycopg.errors.InsufficientPrivilege as exc:  # installed, but not readable by this role
            raise SchemaError(
                f"this connection (role {conn.info.user}) may not read the gdpr control schema "
                f"({exc.diag.message_primary}): a DBA grants gdpr_engine to its login role "
                "(README, Control schema and roles)."
            ) from None
        if version is not None and version >= SCHEMA_VERSION:
            return False
        # Two DAGs starting at once must not race on CREATE ROLE / CREATE TABLE.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('warehouse_gdpr.schema'))")
        try:
            conn.execute(read_sql("gdpr_schema.sql"))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise SchemaError(_cannot_install(version, str(conn.info.user), str(exc.diag.message_primary))) from None
    log.info("installed the gdpr control schema, version %s (was %s)", SCHEMA_VERSION, version or "not installed")
    return True
