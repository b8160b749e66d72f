"""What each task of the `gdpr_optout_sync` DAG does. The DAG file only wires them.

Every task opens its own connection, writes its audit rows, logs counts only and returns a small
JSON-able dict of counts (no email, no hash list in XComs). Every task reads the policy the run
pinned (`connections.run_policy`). `task_errors` maps failures (airflow/errors.py): configuration
errors fail at once (retrying cannot fix a wrong policy or a missing key); a share target that does
not answer raises ShareError, which Airflow retries (the whole list is pushed again next time).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from warehouse_gdpr.airflow import connections
from warehouse_gdpr.airflow.errors import task_errors
from warehouse_gdpr.airflow.tasks import journal as journal_tasks
from warehouse_gdpr.airflow.transport import AirflowTransport
from warehouse_gdpr.engine import audit, optout
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.errors import ConfigurationError
from warehouse_gdpr.engine.policy import Policy
from warehouse_gdpr.engine.sweep import format_table

log = logging.getLogger(__name__)

STEPS = ("rekey", "collect", "resurrection_guard", "resurrection", "erase", "enforce", "share", "export")


def _dry_run(context: Any) -> bool:
    return bool(context["params"].get("dry_run", False))


def _setup(policy_file: str, context: Any) -> tuple[Policy, Keys]:
    policy = connections.run_policy(policy_file, context)
    return policy, connections.load_keys(policy)


@task_errors
def check(policy_file: str, context: Any) -> dict[str, Any]:
    """Validate the policy, the keys, the live catalog and the opt-out section before anything writes."""
    policy, keys = _setup(policy_file, context)
    dry_run = _dry_run(context)
    with connections.connect(policy) as conn:
        connections.prepare_warehouse(conn, policy)
        warnings = optout.check(conn, policy)
        for warning in warnings:
            log.warning("opt-out check: %s", warning)
        settings = policy.optout
        export = optout.export_path(policy, Path(policy_file))
        details = {"sources": [s.name for s in settings.sources], "strip_plus_tags": settings.strip_plus_tags,
                   "resurrection": settings.resurrection, "targets": [t.name for t in settings.share_targets],
                   "export": export is not None, "key_id": keys.hmac_key_id, "chain": keys.hmac_key_ids[:-1]}
        with conn.transaction():
            audit.record(conn, connections.run_context(context, dry_run), action="check_policy", outcome="ok",
                         details=details)
    log.info("Opt-out policy ready%s:\n%s", " (DRY RUN)" if dry_run else "", format_table(
        ["setting", "value"], [[k, (", ".join(v) or "-") if isinstance(v, list) else v] for k, v in details.items()]))
    return {"as_of": connections.as_of(context), "dry_run": dry_run, "targets": details["targets"],
            "export": details["export"], "policy_file": policy_file}


@task_errors
def rekey(checked: dict[str, Any], context: Any) -> dict[str, Any]:
    """Bring entries stored under a retired pepper to the current key (after a rotation)."""
    policy, keys = _setup(checked["policy_file"], context)
    with connections.connect(policy) as conn:
        result = optout.rekey(conn, keys, connections.run_context(context, checked["dry_run"]))
    journal_tasks.flush(policy)
    if result["stale"]:
        log.info("Re-keyed the suppression list to %s:\n%s", result["key_id"], format_table(
            ["from key", "entries"], [[k, n] for k, n in result["stale"].items()]))
        log.info("Entries re-keyed: %d; superseded (the person is already listed under %s): %d.",
                 result["rekeyed"], result["key_id"], result["superseded"])
        if result["superseded"]:
            log.warning("Superseded entries stay under a retired key, excluded from shares and exports: %d.",
                        result["superseded"])
    else:
        log.info("Every entry is under the current key %s: nothing to re-key.", result["key_id"])
    if result["restrictions_rekeyed"]:
        log.info("Restrictions of processing re-keyed to %s: %d.", result["key_id"], result["restrictions_rekeyed"])
    return {k: result[k] for k in ("key_id", "rekeyed", "superseded", "restrictions_rekeyed")}


@task_errors
def collect(checked: dict[str, Any], context: Any) -> dict[str, Any]:
    """Hash the opted-out subjects' emails and add the new hashes to the list."""
    policy, keys = _setup(checked["policy_file"], context)
    with connections.connect(policy) as conn:
        ctx = connections.run_context(context, checked["dry_run"])
        result = optout.collect(conn, policy, keys, ctx, checked["as_of"])
    journal_tasks.flush(policy)
    log.info("Collected opt-outs: %d subject(s) selected by the sources, new entries: %d%s:\n%s",
             result["subjects"], result["added"], " (DRY RUN: none added)" if checked["dry_run"] else "",
             format_table(["source", "new entries"], [[k, n] for k, n in result["by_source"].items()])
             if result["by_source"] else "(no source)")
    return result


@task_errors
def guard(checked: dict[str, Any], context: Any) -> dict[str, Any]:
    """Erase again (or quarantine) the erased people who came back."""
    policy, keys = _setup(checked["policy_file"], context)
    with connections.connect(policy) as conn:
        result = optout.guard(conn, policy, keys, connections.run_context(context, checked["dry_run"]),
                              checked["as_of"])
    log.info("Resurrection guard (policy: %s)%s: %d erased subject(s) found again.\n%s",
             result["policy"], " (DRY RUN: nothing changed)" if checked["dry_run"] else "", result["found"],
             format_table(["handled", "subjects"], [["erased again", result["erased"]],
                                                    ["quarantined", result["quarantined"]],
                                                    ["  of which under a legal hold", result["held"]]]))
    if result["rows"]:
        log.info("Rows erased:\n%s", format_table(["table", "rows"], [[t, n] for t, n in result["rows"].items()]))
    if result["quarantined"]:
        log.warning("%d resurrected subject(s) quarantined: review gdpr.quarantine (ids and hashes only).",
                    result["quarantined"])
    return {k: result[k] for k in ("found", "erased", "quarantined", "held")}


@task_errors
def enforce(checked: dict[str, Any], context: Any) -> dict[str, Any]:
    """Mark every listed person do-not-contact."""
    policy, keys = _setup(checked["policy_file"], context)
    with connections.connect(policy) as conn:
        result = optout.enforce(conn, policy, keys, connections.run_context(context, checked["dry_run"]))
    log.info("Enforcement%s:\n%s", " (DRY RUN: nothing changed)" if checked["dry_run"] else "", format_table(
        ["subjects with an email", "on the list", "newly flagged do-not-contact"],
        [[result["subjects"], result["listed"], result["flagged"]]]))
    return result


@task_errors
def share(policy_file: str, target: str, context: Any) -> dict[str, Any]:
    """Push the list (hashes only) to one share target; raise (Airflow retries) if it refuses a batch."""
    policy, keys = _setup(policy_file, context)
    dry_run = _dry_run(context)
    with connections.connect(policy) as conn:
        result = optout.share(conn, policy, keys, connections.run_context(context, dry_run), target,
                              AirflowTransport())
    if dry_run:
        log.info("DRY RUN: %d hash(es) would be shared with %s.", result["hashes"], target)
    else:
        log.info("Shared %d hash(es) with %s in %d batch(es) (key %s).", result["hashes"], target,
                 result["batches"], result["key_id"])
    return result


@task_errors
def export(checked: dict[str, Any], context: Any) -> dict[str, Any]:
    """Write the hashes-only export file, if the policy names one."""
    policy, keys = _setup(checked["policy_file"], context)
    path = optout.export_path(policy, Path(checked["policy_file"]))
    if path is None:
        log.info("No optout.export_path in the policy: no export file.")
        return {"hashes": 0, "file": None}
    with connections.connect(policy) as conn:
        try:
            result = optout.export(conn, keys, connections.run_context(context, checked["dry_run"]), path)
        except OSError as exc:
            raise ConfigurationError(f"cannot write the export file {path}: {exc.strerror}") from None
    log.info("%s %d hash(es) to %s.", "DRY RUN: would write" if checked["dry_run"] else "Wrote",
             result["hashes"], path)
    return result


@task_errors
def report(checked: dict[str, Any], context: Any) -> dict[str, Any]:
    """Summarise the run from the audit log (what happened) and record it."""
    policy, _ = _setup(checked["policy_file"], context)
    ctx = connections.run_context(context, checked["dry_run"])
    with connections.connect(policy) as conn:
        rows = audit.rows_for_run(conn, ctx.dag_id, ctx.run_id)
        totals: dict[tuple[str, str, str], int] = {}
        for row in rows:
            if row["action"] in STEPS:
                key = (row["action"], row["outcome"], row["table_name"] or "-")
                totals[key] = totals.get(key, 0) + row["row_count"]
        listed = conn.execute(
            "SELECT reason, count(*) FROM gdpr.suppression_list GROUP BY reason ORDER BY reason").fetchall()
        conn.rollback()
        summary = {f"{a}/{o}/{t}": n for (a, o, t), n in sorted(totals.items())}
        by_reason: dict[str, int] = dict(listed)
        with conn.transaction():
            audit.record(conn, ctx, action="report", outcome="ok", details={"totals": summary, "list": by_reason})
    log.info(
        "Opt-out sync %s%s, from gdpr.audit_log:\n%s\nSuppression list now: %s",
        ctx.run_id, " (DRY RUN)" if ctx.dry_run else "",
        format_table(["step", "outcome", "table / target", "rows"], [[*k, n] for k, n in sorted(totals.items())])
        if totals else "(nothing recorded)",
        ", ".join(f"{n} {r}" for r, n in by_reason.items()) or "empty",
    )
    return {"dry_run": ctx.dry_run, "totals": summary, "list": by_reason}
