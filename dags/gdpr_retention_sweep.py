"""gdpr_retention_sweep: enforce the policy's retention rules on the warehouse, weekly.

check_policy -> plan -> apply -> purge_archive -> report. The work lives in
warehouse_gdpr.sweep_tasks; rules are evaluated in warehouse_gdpr.rules.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from warehouse_gdpr import runtime, sweep_tasks

_policy = runtime.try_load_policy()  # local file read only; a broken policy is reported by check_policy
_rule_names = [r.name for r in _policy.rules] if _policy else []


@dag(
    dag_id="gdpr_retention_sweep",
    schedule=_policy.airflow.sweep_schedule if _policy else "@weekly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["gdpr", "retention"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5), "retry_exponential_backoff": True},
    params={
        "dry_run": Param(
            False, type="boolean", title="Dry run",
            description="Compute and log the plan, write one audit row per rule, change nothing else.",
        ),
        "rules": Param(
            None, type=["null", "array"], title="Rules",
            description="Run only these rules (names from the policy). Empty: all rules.",
            items={"type": "string", **({"enum": _rule_names} if _rule_names else {})},
        ),
    },
    doc_md=__doc__,
)
def gdpr_retention_sweep() -> None:
    @task
    def check_policy() -> dict:
        return sweep_tasks.check_policy(get_current_context())

    @task
    def plan(checked: dict) -> list:
        return sweep_tasks.plan(checked, get_current_context())

    @task
    def apply(checked: dict, plans: list) -> list:
        return sweep_tasks.apply(checked, plans, get_current_context())

    @task
    def purge_archive(checked: dict, applied: list) -> dict:
        return sweep_tasks.purge_archive(checked, get_current_context())

    @task
    def report(checked: dict, purged: dict) -> dict:
        return sweep_tasks.report(checked, get_current_context())

    checked = check_policy()
    plans = plan(checked)
    applied = apply(checked, plans)
    purged = purge_archive(checked, applied)
    report(checked, purged)


gdpr_retention_sweep()
