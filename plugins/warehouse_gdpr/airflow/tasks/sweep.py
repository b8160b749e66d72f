"""What each task of the `gdpr_retention_sweep` DAG does. The DAG file only wires these together.

Every task opens its own connection (tasks may run on different workers), writes its audit rows,
logs counts and timings only, and returns a small JSON-able dict (no personal data in XComs).
Every task reads the policy the run pinned (`connections.run_policy`); `task_errors` fails
configuration errors at once (retrying cannot fix a wrong policy or a missing key) and scrubs
warehouse errors (airflow/errors.py).
"""

from __future__ import annotations

import logging
from datetime import date, datetime
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowSkipException

from warehouse_gdpr.airflow import connections
from warehouse_gdpr.airflow.errors import task_errors
from warehouse_gdpr.engine import audit, register, requests, sweep
from warehouse_gdpr.engine.errors import ConfigurationError

log = logging.getLogger(__name__)


def _params(context: Any) -> tuple[bool, list[str] | None]:
    params = context["params"]
    return bool(params.get("dry_run", False)), params.get("rules") or None


def _confirmations(context: Any, policy: Any) -> dict[str, int]:
    """The `confirm_blast_radius` param: {rule name: the count a person confirmed}. ConfigurationError otherwise."""
    value = context["params"].get("confirm_blast_radius") or {}
    known = [r.name for r in policy.rules]
    if not isinstance(value, dict):
        raise ConfigurationError('confirm_blast_radius must map rule names to counts, e.g. {"former_clients": 2368}')
    unknown = sorted(name for name in value if name not in known)
    if unknown:
        raise ConfigurationError(f"confirm_blast_radius names unknown rule(s) {', '.join(map(str, unknown))}; "
                         f"the policy defines: {', '.join(known)}")
    bad = sorted(name for name, n in value.items() if isinstance(n, bool) or not isinstance(n, int) or n < 0)
    if bad:
        raise ConfigurationError(f"confirm_blast_radius: the count of {', '.join(bad)} must be a whole number >= 0")
    return dict(value)


@task_errors
def check_policy(policy_file: str, context: Any) -> dict[str, Any]:
    """Validate the policy file, the keys and the live catalog before anything writes."""
    path = Path(policy_file)
    dry_run, names = _params(context)
    policy = connections.run_policy(path, context)
    selected = sweep.select_rules(policy, names)
    _confirmations(context, policy)
    connections.load_keys(policy)
    with connections.connect(policy) as conn:
        report = connections.prepare_warehouse(conn, policy)
        ctx = connections.run_context(context, dry_run)
        with conn.transaction():
            audit.record(
                conn, ctx, action="check_policy", outcome="ok",
                details={"policy": path.name, "rules": [r.name for r in selected], "warnings": len(report.warnings)},
            )
    log.info("Policy %s matches the warehouse: %d tables, %d personal columns, rules: %s",
             path, report.tables, report.columns, ", ".join(r.name for r in selected))
    return {"rules": [r.name for r in selected], "as_of": connections.as_of(context), "dry_run": dry_run,
            "policy_file": str(path)}


@task_errors
def plan(checked: dict[str, Any], context: Any) -> list[dict[str, Any]]:
    """Count candidates and held subjects per rule (one set-based query each)."""
    policy = connections.run_policy(checked["policy_file"], context)
    selected = sweep.select_rules(policy, checked["rules"])
    ctx = connections.run_context(context, checked["dry_run"])
    with connections.connect(policy) as conn:
        plans = sweep.plan(conn, policy, selected, checked["as_of"])
        rows = sweep.subject_rows(conn, policy)  # the blast-radius limit's denominator, as planned
        with conn.transaction():
            for p in plans:
                audit.record(
                    conn, ctx, action="plan", outcome="ok", rule=p.rule, row_count=p.candidates - p.held,
                    details={"candidates": p.candidates, "held": p.held, "by_hold": p.by_hold,
                             "seconds": round(p.seconds, 3), "as_of": checked["as_of"], "subject_rows": rows},
                )
    log.info(
        "Plan as of %s%s:\n%s", checked["as_of"], " (DRY RUN)" if checked["dry_run"] else "",
        sweep.format_table(
            ["rule", "action", "candidates", "held", "to process", "seconds"],
            [[p.rule, p.action, p.candidates, p.held, p.candidates - p.held, f"{p.seconds:.2f}"] for p in plans],
        ),
    )
    return [{**p.__dict__, "subject_rows": rows} for p in plans]


def _blast_radius(conn: Any, policy: Any, plans: list[dict[str, Any]], ctx: Any, context: Any) -> None:
    """Before any write: a rule whose plan treats more than `blast_radius_percent` of the subject table
    runs only when the run's `confirm_blast_radius` param confirms its count. Confirmations used and
    stops are audited (action `blast_radius`); a stop fails the task at once, nothing changed."""
    rows = plans[0]["subject_rows"] if plans and "subject_rows" in plans[0] else sweep.subject_rows(conn, policy)
    over = sweep.blast_radius(
        {p["rule"]: p["candidates"] - p["held"] for p in plans}, rows, policy.blast_radius_percent,
        _confirmations(context, policy),
    )
    if not over:
        return
    stopped = [b for b in over if not b.allowed]
    limit = policy.blast_radius_percent
    with conn.transaction():
        for b in over:
            if b.allowed:
                if stopped and not ctx.dry_run:
                    continue  # nothing runs: only the rules that stopped the sweep are recorded
                outcome = "confirmed"
            else:
                outcome = "unconfirmed" if ctx.dry_run else "stopped"
            audit.record(conn, ctx, action="blast_radius", outcome=outcome, rule=b.rule, table=policy.subject.table,
                         row_count=b.to_process, details={"subject_rows": b.subject_rows, "percent": b.percent,
                                                          "limit_percent": limit, "confirmed": b.confirmed})
    actions = {r.name: r.action for r in policy.rules}
    if ctx.dry_run:
        if stopped:
            log.warning("DRY RUN: a real run would stop here.\n%s", sweep.blast_radius_message(over, limit, actions))
        return
    if stopped:
        message = sweep.blast_radius_message(over, limit, actions)
        log.error("%s", message)
        raise ConfigurationError(message)
    for b in over:
        log.warning("Rule %s treats %d of %d subjects (%s %%), above blast_radius_percent (%g %%): confirmed for "
                    "up to %d by this run's confirm_blast_radius param.", b.rule, b.to_process, b.subject_rows,
                    b.percent, limit, b.confirmed)


@task_errors
def apply(checked: dict[str, Any], plans: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
    """Delete or pseudonymise per rule in audited keyset batches; a dry run only records the plan."""
    policy = connections.run_policy(checked["policy_file"], context)
    selected = sweep.select_rules(policy, checked["rules"])
    ctx = connections.run_context(context, checked["dry_run"])
    results: list[dict[str, Any]] = []
    with connections.connect(policy) as conn:
        _blast_radius(conn, policy, plans, ctx, context)
        if checked["dry_run"]:
            with conn.transaction():
                for p in plans:
                    audit.record(
                        conn, ctx, action=p["action"], outcome="dry_run", rule=p["rule"],
                        row_count=p["candidates"] - p["held"],
                        details={"candidates": p["candidates"], "held": p["held"], "by_hold": p["by_hold"]},
                    )
            log.info("DRY RUN: nothing was changed; the plan was written to gdpr.audit_log.")
            return plans
        keys = connections.load_keys(policy)
        # One sweep per warehouse: the lock is held for all the rules of this task (engine/sweep.py, module doc).
        # A second sweep waits up to sweep.LOCK_WAIT_SECONDS, then fails (Airflow retries it later).
        try:
            with sweep.sweep_lock(conn, ctx):
                for rule in selected:
                    result = sweep.apply_rule(conn, policy, rule, keys, ctx, checked["as_of"])
                    results.append(result.as_dict())
                    log.info(
                        "Rule %s done in %d batch(es), %.2f s:\n%s", rule.name, result.batches, result.seconds,
                        sweep.format_table(
                            ["table", "rows " + ("deleted" if rule.action == "delete" else "pseudonymised")],
                            [[t, n] for t, n in result.rows_by_table.items()],
                        ),
                    )
        except sweep.SweepLockBusy as exc:
            log.error("%s", exc)
            raise
    log.info(
        "Apply summary:\n%s",
        sweep.format_table(
            ["rule", "candidates", "held", "changed under lock", "archived", "pseudonymised", "deleted", "seconds"],
            [[r["rule"], r["candidates"], r["held"], r["changed_under_lock"], r["archived"], r["pseudonymised"],
              r["deleted"], f"{r['seconds']:.2f}"] for r in results],
        ),
    )
    return results


@task_errors
def purge_archive(checked: dict[str, Any], context: Any) -> dict[str, Any]:
    """Remove archived originals whose own purge date (set when archived, from the table's `archive`) has passed."""
    policy = connections.run_policy(checked["policy_file"], context)
    ctx = connections.run_context(context, checked["dry_run"])
    with connections.connect(policy) as conn:
        done = sweep.purge_archive(conn, policy, ctx, checked["as_of"], policy.batch_size)
    log.info("Archive purge: %d expired archive row(s) %s.", done.purged,
             "would be removed" if checked["dry_run"] else "removed")
    if done.kept_restricted:
        log.warning("Archive purge: %d expired archive row(s) kept: the person's processing is restricted (art. 18); "
                    "purged by the first sweep after the restriction is lifted.", done.kept_restricted)
    return {"purged": done.purged, "kept_restricted": done.kept_restricted}


@task_errors
def purge_requests(checked: dict[str, Any], context: Any) -> dict[str, Any]:
    """Purge the requests (every kind) completed more than `requests.keep_for` ago, kept until then as proof,
    with their outbox rows; destroy any identifier a completed request still holds."""
    policy = connections.run_policy(checked["policy_file"], context)
    ctx = connections.run_context(context, checked["dry_run"])
    keep_for = policy.requests.keep_for
    with connections.connect(policy) as conn:
        result = requests.purge(conn, ctx, keep_for, checked["as_of"], policy.batch_size)
    log.info("Request purge (completed more than %s ago): %d request(s) and %d outbox row(s) %s; %d leftover "
             "identifier(s) destroyed.", keep_for, result["requests"], result["outbox"],
             "would be removed" if checked["dry_run"] else "removed", result["identifiers_destroyed"])
    return result


@task_errors
def purge_access_packages(checked: dict[str, Any], context: Any) -> dict[str, Any]:
    """Delete the access packages (gdpr_subject_access) older than the policy's `access.keep_for` from
    `access.location`, one audit row each."""
    from warehouse_gdpr.airflow.tasks.access import packages
    from warehouse_gdpr.engine import access
    from warehouse_gdpr.engine.errors import TransientError
    from warehouse_gdpr.transport import StoreError

    policy = connections.run_policy(checked["policy_file"], context)
    ctx = connections.run_context(context, checked["dry_run"])
    with connections.connect(policy) as conn:
        try:
            result = access.purge(conn, packages(policy), ctx, datetime.fromisoformat(checked["as_of"]))
        except StoreError as exc:
            raise TransientError(str(exc)) from None
    log.info("Access packages older than %s: %d %s, %d kept; %d other file(s) left alone in %s.",
             policy.access.keep_for, result["purged"], "would be deleted" if checked["dry_run"] else "deleted",
             result["kept"], result["not_packages"], policy.access.location)
    return result


@task_errors
def write_register(checked: dict[str, Any], context: Any) -> dict[str, Any]:
    """Generate the article 30 register from the policy and keep it; fail while it is incomplete.

    Runs beside the sweep, not before it: an unfinished register fails the run (on-call sees it) but
    never delays a deletion that is due. A policy without a `processing_register` section skips it.
    The warehouse copy (gdpr.processing_register, one row per distinct content) is the record; the
    files under `output_dir` are a convenience and a worker that cannot write them only logs it.
    A dry run writes the files and changes nothing in the warehouse but its audit row."""
    policy = connections.run_policy(checked["policy_file"], context)
    if policy.processing_register is None:
        log.warning("The policy has no processing_register section: no register of processing activities "
                    "is generated (see docs/policy.md#processing_register).")
        raise AirflowSkipException("no processing_register section in the policy")
    source = Path(checked["policy_file"]).name
    try:
        rendered = register.render(policy, date.fromisoformat(checked["as_of"][:10]), source)
    except register.RegisterIncomplete:
        log.error("Register of processing activities not written; complete processing_register in %s.",
                  checked["policy_file"])
        raise
    ctx = connections.run_context(context, checked["dry_run"])
    new = False
    with connections.connect(policy) as conn, conn.transaction():
        if not ctx.dry_run:
            new = register.store(conn, rendered, source)
        outcome = "dry_run" if ctx.dry_run else "ok" if new else "unchanged"
        audit.record(conn, ctx, action="register", outcome=outcome, row_count=rendered.activities,
                     details={"sha256": rendered.sha256})
    result: dict[str, Any] = {"sha256": rendered.sha256, "activities": rendered.activities, "new_version": new}
    out_dir = register.output_dir(policy, connections.airflow_home())
    try:
        files = register.write(rendered, out_dir)
        result |= {"markdown": str(files.markdown), "html": str(files.html)}
    except OSError as exc:
        log.warning("Could not write the register files under %s (%s); the register is in "
                    "gdpr.processing_register.", out_dir, exc.strerror)
    log.info("Register of processing activities: %d activities, sha256 %s (%s)%s.", rendered.activities,
             rendered.sha256,
             "dry run: not stored" if ctx.dry_run else "a new version, stored in gdpr.processing_register" if new
             else "unchanged since it was first stored in gdpr.processing_register",
             f"; files {result['markdown']} and {result['html']}" if "markdown" in result else "")
    return result


@task_errors
def report(checked: dict[str, Any], context: Any) -> dict[str, Any]:
    """Summarise the run from the audit log (what happened, not what was intended) and record it."""
    policy = connections.run_policy(checked["policy_file"], context)
    ctx = connections.run_context(context, checked["dry_run"])
    with connections.connect(policy) as conn:
        rows = audit.rows_for_run(conn, ctx.dag_id, ctx.run_id)
        totals: dict[tuple[str, str, str], int] = {}
        for row in rows:
            if row["action"] in ("delete", "pseudonymise", "archive", "purge_archive", "purge_requests",
                                 "destroy_identifier", "purge_access_package") and row["table_name"]:
                key = (row["rule"] or "-", row["action"], row["table_name"])
                totals[key] = totals.get(key, 0) + row["row_count"]
        summary = {f"{r}/{a}/{t}": n for (r, a, t), n in sorted(totals.items())}
        held = _held(rows)
        archive_held = sum(row["row_count"] for row in rows if row["action"] == "purge_archive_held")
        with conn.transaction():
            audit.record(conn, ctx, action="report", outcome="ok", details={
                "totals": summary, "held": held, "archive_kept_restricted": archive_held})
    log.info(
        "Retention sweep %s%s — rows changed, from gdpr.audit_log:\n%s",
        ctx.run_id, " (DRY RUN: none)" if ctx.dry_run else "",
        sweep.format_table(["rule", "action", "table", "rows"], [[*k, n] for k, n in sorted(totals.items())])
        if totals else "(no row changed)",
    )
    if held:
        log.info("Subjects kept because a hold applies (from the plan; processing_restricted: a restriction of "
                 "processing, GDPR art. 18, is in force):\n%s",
                 sweep.format_table(["rule", "hold", "subjects"],
                                    [[r, h, n] for r, by_hold in held.items() for h, n in sorted(by_hold.items())]))
    if archive_held:
        log.info("Archive rows past their purge date kept because the person's processing is restricted (GDPR art. "
                 "18): %d.", archive_held)
    return {"dry_run": ctx.dry_run, "totals": summary, "held": held, "archive_kept_restricted": archive_held}


def _held(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{rule: {hold: subjects}} from the run's plan rows (the policy's holds and the built-in
    processing_restricted)."""
    return {row["rule"]: dict(row["details"].get("by_hold", {})) for row in rows
            if row["action"] == "plan" and row["rule"] and row["details"].get("by_hold")}
