"""The append-only audit log (gdpr.audit_log): one row per step, no personal data.

Rows are written through the caller's connection so that they commit in the same transaction as
the change they describe: the audit equals what happened. A person is referred to only by a keyed
hash (`subject_hash`); `details` holds counts and timings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb


@dataclass(frozen=True)
class RunContext:
    """Who is writing: the Airflow DAG, run and task (or a CLI name), and whether this is a dry run."""

    dag_id: str
    run_id: str
    task_id: str
    dry_run: bool = False


INSERT = """
INSERT INTO gdpr.audit_log
    (dag_id, run_id, task_id, rule, table_name, action, row_count, dry_run, outcome, subject_hash, details)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


def record(
    conn: psycopg.Connection,
    ctx: RunContext,
    *,
    action: str,
    outcome: str,
    rule: str | None = None,
    table: str | None = None,
    row_count: int = 0,
    subject_hash: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Insert one audit row in the caller's current transaction."""
    conn.execute(
        INSERT,
        (
            ctx.dag_id,
            ctx.run_id,
            ctx.task_id,
            rule,
            table,
            action,
            row_count,
            ctx.dry_run,
            outcome,
            subject_hash,
            Jsonb(details or {}),
        ),
    )


def record_many(conn: psycopg.Connection, ctx: RunContext, rows: list[dict[str, Any]]) -> int:
    """Insert several audit rows of one step in one statement, in the caller's current transaction. Each row
    has `action` and `outcome`, and optionally `rule`, `table`, `row_count`, `subject_hash` and `details`, as
    `record` takes them. Returns the number of rows inserted."""
    if not rows:
        return 0
    return conn.execute(
        "INSERT INTO gdpr.audit_log (dag_id, run_id, task_id, rule, table_name, action, row_count, dry_run,"
        " outcome, subject_hash, details)"
        " SELECT %s, %s, %s, e.r->>'rule', e.r->>'table', e.r->>'action', coalesce((e.r->>'row_count')::bigint, 0),"
        " %s, e.r->>'outcome', e.r->>'subject_hash', coalesce(e.r->'details', '{}')"
        " FROM jsonb_array_elements(%s) WITH ORDINALITY AS e(r, n) ORDER BY e.n",
        (ctx.dag_id, ctx.run_id, ctx.task_id, ctx.dry_run, Jsonb(rows)),
    ).rowcount


def rows_for_run(conn: psycopg.Connection, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    """Every audit row of one run, oldest first (for the report task and the tests)."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT * FROM gdpr.audit_log WHERE dag_id = %s AND run_id = %s ORDER BY audit_id", (dag_id, run_id)
        )
        return cur.fetchall()
