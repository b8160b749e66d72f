"""What the GDPR page of the Airflow UI shows, read from the control schema: no personal data.

Open requests (dates, status, each downstream target's status and attempts, the DAG run that last worked
on the request), the last sweeps per rule and the retention backlog now (`sweep.plan`, the SQL
`candidates.py` builds), the archive, the suppression list by reason, the audit chain's state, and
the rows treated per week over the last year by action. Everything is ids, dates, counts and names from
the policy: never an email, a name, a keyed hash or a free-text reason.

`summary` is what `GET <plugin prefix>/api/summary` returns (README, "The GDPR page"); the Airflow layer
(airflow/ui/) only adds links and renders it. Reads only; call it outside a transaction (it rolls back).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from . import auditchain, requests, sweep
from .auditchain import ChainHead, ChainUnavailable
from .policy import Policy

# Audit actions that change rows, as the weekly chart groups them (dry runs excluded).
CHART_ACTIONS = ("delete", "pseudonymise", "archive", "purge_archive", "erase")
CHART_WEEKS = 52
SWEEP_DAG = "gdpr_retention_sweep"
LAST_SWEEPS = 5
# The backlog runs the sweep's plan query on the live warehouse: bounded, so that a page load never
# holds the warehouse longer than this.
BACKLOG_TIMEOUT_MS = 20_000
# The page recomputes the audit chain from the head the last DAG run exported, as the next run's check
# will; beyond this many rows it leaves them to that run rather than hold a page load.
CHAIN_CHECK_ROWS = 50_000


def _rows(conn: psycopg.Connection, query: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


# -- requests ------------------------------------------------------------------------------------

TARGETS = """
SELECT request_id, target, status, attempts FROM gdpr.erasure_propagation
WHERE request_id = ANY(%s) ORDER BY request_id, target
"""

# The DAG run that last worked on each request: a DAG's own audit row naming the request, or the run the
# page triggered (action `trigger_request`). `gdpr_%` DAGs only: the CLI and the page write as
# `warehouse-gdpr*`.
LAST_RUN = r"""
SELECT DISTINCT ON (details->>'request_id') details->>'request_id' AS request_id,
       coalesce(details->>'triggered_dag_id', dag_id) AS dag_id,
       coalesce(details->>'triggered_run_id', run_id) AS run_id
FROM gdpr.audit_log
WHERE details->>'request_id' = ANY(%s) AND (dag_id LIKE 'gdpr\_%%' OR action = 'trigger_request')
ORDER BY details->>'request_id', audit_id DESC
"""


def open_requests(conn: psycopg.Connection, today: date) -> list[dict[str, Any]]:
    """Every request not complete yet, by due date: `requests.listing`'s fields, each target's status and
    attempts, and the DAG run that last worked on it (None when none has)."""
    listed = requests.listing(conn, today, open_only=True)
    ids = [r["request_id"] for r in listed]
    targets: dict[str, dict[str, dict[str, Any]]] = {}
    runs: dict[str, dict[str, str]] = {}
    if ids:
        for t in _rows(conn, TARGETS, (ids,)):
            targets.setdefault(t["request_id"], {})[t["target"]] = {"status": t["status"], "attempts": t["attempts"]}
        for r in _rows(conn, LAST_RUN, (ids,)):
            runs[r["request_id"]] = {"dag_id": r["dag_id"], "run_id": r["run_id"]}
        conn.rollback()
    return [{**r, "targets": targets.get(r["request_id"], {}), "dag_run": runs.get(r["request_id"])} for r in listed]


# -- sweeps --------------------------------------------------------------------------------------

LAST_SWEEP_RUNS = """
SELECT run_id, logged_at AS finished_at,
       (SELECT min(a.logged_at) FROM gdpr.audit_log a WHERE a.dag_id = r.dag_id AND a.run_id = r.run_id) AS started_at
FROM gdpr.audit_log r
WHERE dag_id = %s AND action = 'report' AND NOT dry_run
ORDER BY audit_id DESC LIMIT %s
"""

SWEEP_RULES = """
SELECT run_id, rule,
       max(action) FILTER (WHERE action IN ('delete', 'pseudonymise')) AS action,
       coalesce(sum(row_count) FILTER (WHERE action = 'batch'), 0)::bigint AS subjects,
       coalesce(sum(row_count) FILTER (WHERE action IN ('delete', 'pseudonymise')), 0)::bigint AS rows_changed,
       coalesce(sum((details->>'held')::bigint) FILTER (WHERE action = 'batch'), 0)::bigint AS held,
       coalesce(sum(row_count) FILTER (WHERE action = 'archive'), 0)::bigint AS archived,
       coalesce(sum((details->>'seconds')::numeric) FILTER (WHERE action = 'batch'), 0) AS seconds,
       (array_agg(details->'by_hold' ORDER BY audit_id DESC) FILTER (WHERE action = 'plan'))[1] AS by_hold
FROM gdpr.audit_log
WHERE dag_id = %s AND run_id = ANY(%s) AND rule IS NOT NULL AND NOT dry_run
  AND action IN ('plan', 'batch', 'delete', 'pseudonymise', 'archive')
GROUP BY run_id, rule
ORDER BY run_id, rule
"""


def last_sweeps(conn: psycopg.Connection, limit: int = LAST_SWEEPS) -> list[dict[str, Any]]:
    """The last `limit` finished (reported), real sweeps, newest first; per rule the subjects deleted or
    pseudonymised, the rows changed, the subjects held (in all, and by hold as planned), the rows archived
    and the time its batches took."""
    runs = _rows(conn, LAST_SWEEP_RUNS, (SWEEP_DAG, limit))
    per_rule: dict[str, list[dict[str, Any]]] = {}
    if runs:
        for r in _rows(conn, SWEEP_RULES, (SWEEP_DAG, [run["run_id"] for run in runs])):
            action = r["action"]
            per_rule.setdefault(r["run_id"], []).append({
                "rule": r["rule"],
                "action": action,
                "deleted": r["subjects"] if action == "delete" else 0,
                "pseudonymised": r["subjects"] if action == "pseudonymise" else 0,
                "rows_changed": r["rows_changed"],
                "held": r["held"],
                "held_by_hold": dict(r["by_hold"] or {}),
                "archived": r["archived"],
                "seconds": round(float(r["seconds"]), 3),
            })
    conn.rollback()
    return [{"run_id": run["run_id"], "started_at": run["started_at"].isoformat(),
             "finished_at": run["finished_at"].isoformat(),
             "seconds": round((run["finished_at"] - run["started_at"]).total_seconds(), 3),
             "rules": per_rule.get(run["run_id"], [])} for run in runs]


def backlog(conn: psycopg.Connection, policy: Policy, as_of: datetime) -> dict[str, Any]:
    """What the next sweep would treat now: per rule its candidates past their date, those a hold keeps
    (and by hold), and the rest. The sweep's own plan query, read-only and bounded in time; a failure is
    reported (scrubbed: `catalog.sql_error`), never raised."""
    from .catalog import sql_error

    started = time.monotonic()
    read_only = conn.read_only
    conn.rollback()
    conn.read_only = True  # each of the plan's transactions (it rolls back after every rule)
    conn.execute(f"SET statement_timeout = {BACKLOG_TIMEOUT_MS}")
    conn.commit()  # for the session: the plan's rollbacks would undo it otherwise
    try:
        plans = sweep.plan(conn, policy, list(policy.rules), as_of.isoformat())
    except psycopg.Error as exc:
        conn.rollback()
        return {"as_of": as_of.isoformat(), "rules": [], "error": sql_error(exc)}
    finally:
        conn.execute("RESET statement_timeout")
        conn.commit()
        conn.read_only = read_only
    return {"as_of": as_of.isoformat(), "seconds": round(time.monotonic() - started, 3), "error": None,
            "rules": [{"rule": p.rule, "action": p.action, "candidates": p.candidates, "held": p.held,
                       "held_by_hold": p.by_hold, "to_process": p.candidates - p.held} for p in plans]}


# -- archive, suppression list, chart --------------------------------------------------------------


def archive(conn: psycopg.Connection) -> dict[str, Any]:
    """Archived originals: rows in all and per source table, and the next purge date."""
    rows = _rows(conn, "SELECT source_table, count(*) AS n, min(purge_after) AS next_purge"
                       " FROM gdpr_archive.archived_row GROUP BY source_table ORDER BY source_table")
    conn.rollback()
    purges = [r["next_purge"] for r in rows]
    return {"rows": sum(r["n"] for r in rows),
            "by_table": {r["source_table"]: {"rows": r["n"], "next_purge": r["next_purge"].date().isoformat()}
                         for r in rows},
            "next_purge": min(purges).date().isoformat() if purges else None}


def suppression(conn: psycopg.Connection) -> dict[str, Any]:
    """The suppression list: entries in all and by reason (hashes are never read)."""
    rows = _rows(conn, "SELECT reason, count(*) AS n FROM gdpr.suppression_list GROUP BY reason ORDER BY reason")
    conn.rollback()
    return {"entries": sum(r["n"] for r in rows), "by_reason": {r["reason"]: r["n"] for r in rows}}


WEEKLY = """
SELECT date_trunc('week', logged_at AT TIME ZONE 'UTC')::date AS week, action, sum(row_count)::bigint AS n
FROM gdpr.audit_log
WHERE logged_at >= %(since)s::timestamptz AND NOT dry_run AND outcome <> 'dry_run' AND action = ANY(%(actions)s)
GROUP BY 1, 2
"""


def week_start(day: date) -> date:
    """The Monday of `day`'s ISO week (PostgreSQL's date_trunc('week'))."""
    return day - timedelta(days=day.weekday())


def weekly(conn: psycopg.Connection, today: date, weeks: int = CHART_WEEKS) -> dict[str, Any]:
    """Rows treated per week (Monday, UTC) over the last `weeks` weeks and this one, by action: one list of
    counts per action, aligned on `weeks` (oldest first; a week with nothing is 0)."""
    first = week_start(today) - timedelta(weeks=weeks)
    days = [first + timedelta(weeks=i) for i in range(weeks + 1)]
    counts = {a: [0] * len(days) for a in CHART_ACTIONS}
    for r in _rows(conn, WEEKLY, {"since": first.isoformat(), "actions": list(CHART_ACTIONS)}):
        index = (r["week"] - first).days // 7
        if 0 <= index < len(days):
            counts[r["action"]][index] += int(r["n"])
    conn.rollback()
    return {"weeks": [d.isoformat() for d in days], "actions": counts}


# -- the audit chain -------------------------------------------------------------------------------

LatestHead = Callable[[str], ChainHead | None]


def _exported(latest: LatestHead, chain_id: str) -> tuple[ChainHead | None, str | None]:
    """The last head a DAG run exported, or why it cannot be read."""
    try:
        return latest(chain_id), None
    except (OSError, ChainUnavailable) as exc:
        return None, (str(exc) if isinstance(exc, ChainUnavailable)
                      else f"the exported heads cannot be read ({type(exc).__name__})")


def audit_chain(conn: psycopg.Connection, latest: LatestHead,
                max_rows: int = CHAIN_CHECK_ROWS) -> dict[str, Any] | None:
    """The audit chain's state (None when the audit log is not chained: control schema older than 8).

    `latest(chain_id)` gives the last head a DAG run exported to the policy's evidence.location. The rows
    since it are recomputed (`auditchain.verify`, read-only), as the next run's check will, when there are
    at most `max_rows`; with no exported head yet, the whole chain under the same bound. `status`:
    `holds`, `broken` (where: audit id and position only), `not_checked` (more rows than the bound), or
    `unavailable` (the exported heads cannot be read)."""
    try:
        head = auditchain.read_head(conn)
    except ChainUnavailable:
        conn.rollback()
        return None
    conn.rollback()
    exported, error = _exported(latest, head.chain_id)
    out: dict[str, Any] = {
        "position": head.chain_seq, "audit_id": head.audit_id,
        "exported": None if exported is None else {"position": exported.chain_seq, "at": exported.exported_at,
                                                   "by": exported.exported_by},
        "rows_checked": 0, "broken": None}
    if error is not None:
        return {**out, "status": "unavailable", "description": error}
    pending = head.chain_seq - (exported.chain_seq if exported else 0)
    if pending > max_rows:
        return {**out, "status": "not_checked", "description": (
            f"{pending} row(s) since the last exported head, more than this page recomputes: the next DAG run's "
            "audit chain check verifies them")}
    result = auditchain.verify(conn, start=exported, exported=exported)
    conn.rollback()
    out["rows_checked"] = result.rows_checked
    if result.broken is not None:
        return {**out, "status": "broken", "broken": result.broken.describe(), "description": (
            f"broken at {result.broken.describe()} (docs/runbook.md, 'The audit chain is broken')")}
    since = (f"since the head exported {exported.exported_at} by {exported.exported_by}" if exported
             else "from its first row (no head exported yet)")
    return {**out, "status": "holds", "description": (
        f"holds: {result.rows_checked} row(s) recomputed {since}, up to position {head.chain_seq}")}


def summary(conn: psycopg.Connection, policy: Policy, now: datetime,
            latest_head: LatestHead | None = None) -> dict[str, Any]:
    """Everything the page shows (`GET .../api/summary`), as JSON-able values. `now`: an aware instant; the
    requests' days left count from its date. `latest_head`: the evidence location's last exported chain head
    (`audit_chain`); without it, the chain is checked from its first row."""
    today = now.date()
    open_ = open_requests(conn, today)
    return {
        "generated_at": now.isoformat(),
        "today": today.isoformat(),
        "requests": {"open": open_, "open_count": len(open_), "overdue_count": sum(1 for r in open_ if r["overdue"])},
        "sweeps": last_sweeps(conn),
        "backlog": backlog(conn, policy, now),
        "archive": archive(conn),
        "suppression": suppression(conn),
        "audit_chain": audit_chain(conn, latest_head or (lambda chain_id: None)),
        "weekly": weekly(conn, today),
    }
