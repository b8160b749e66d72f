"""gdpr_erasure_retry: retry pending erasure propagations until each target acknowledges, and flag
requests near or past their one-month due date. Work in warehouse_gdpr.erasure_tasks."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, get_current_context, task

from warehouse_gdpr import erasure_tasks


@dag(
    dag_id="gdpr_erasure_retry",
    schedule="@hourly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["gdpr", "erasure"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5), "retry_exponential_backoff": True},
    doc_md=__doc__,
)
def gdpr_erasure_retry() -> None:
    @task
    def retry_pending() -> dict:
        return erasure_tasks.retry_pending(get_current_context())

    @task(trigger_rule="all_done")
    def check_deadlines(retried: dict) -> dict:
        return erasure_tasks.check_deadlines(get_current_context())

    check_deadlines(retry_pending())


gdpr_erasure_retry()
