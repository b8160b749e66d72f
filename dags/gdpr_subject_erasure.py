"""gdpr_subject_erasure: erase one person on request (GDPR art. 17), propagate downstream, prove it.

Trigger from the UI form or the CLI:
    airflow dags trigger gdpr_subject_erasure -c '{"email": "...", "request_id": "REQ-2026-0042"}'

validate_request -> [approve_erasure] -> erase -> propagate (one mapped task per target) -> verify.
The work lives in warehouse_gdpr.erasure_tasks; outcomes: erased, restricted, refused, not_found.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from warehouse_gdpr import erasure, erasure_tasks, runtime

_policy = runtime.try_load_policy()  # local file read only
_erasure = _policy.erasure if _policy else None


@dag(
    dag_id="gdpr_subject_erasure",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["gdpr", "erasure"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True},
    params={
        "email": Param(
            None, type=["null", "string"], title="Email",
            description="The person's email (plain ASCII). Give this or the subject id, not both.",
            pattern=erasure.EMAIL_PATTERN, minLength=6, maxLength=erasure.EMAIL_MAX_LENGTH,
        ),
        "subject_id": Param(
            None, type=["null", "integer"], minimum=1, title="Subject id",
            description="The person's internal id in the subject table, instead of the email.",
        ),
        "request_id": Param(
            type="string", title="Request id", pattern=erasure.REQUEST_ID_PATTERN,
            description="The ticket reference of the request (3-64 letters, digits, '.', '_', ':', '-').",
        ),
        "received_at": Param(
            None, type=["null", "string"], format="date", title="Received on",
            description="The date the request arrived (YYYY-MM-DD; empty: today). Due one month later.",
        ),
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description="Locate and evaluate holds, record the plan, change nothing."),
    },
    doc_md=__doc__,
)
def gdpr_subject_erasure() -> None:
    @task
    def validate_request() -> dict:
        return erasure_tasks.validate_request(get_current_context())

    @task
    def erase(checked: dict) -> dict:
        return erasure_tasks.erase(get_current_context())

    @task
    def targets_to_notify(erased: dict) -> list:
        return erased["targets"]

    @task(
        retries=_erasure.retries if _erasure else 5,
        retry_delay=timedelta(seconds=_erasure.retry_delay_seconds if _erasure else 60),
        retry_exponential_backoff=True,
    )
    def propagate(target: str) -> str:
        return erasure_tasks.propagate(target, get_current_context())

    @task(trigger_rule="all_done")
    def verify(erased: dict) -> dict:
        return erasure_tasks.verify(get_current_context())

    checked = validate_request()
    erased = erase(checked)
    if _erasure and _erasure.approval_required:
        from airflow.providers.standard.operators.hitl import ApprovalOperator

        approval = ApprovalOperator(
            task_id="approve_erasure",
            subject="Approve GDPR erasure {{ params.request_id }}",
            body="Request {{ params.request_id }}: see the validate_request log for counts and holds.",
        )
        checked >> approval >> erased
    propagated = propagate.expand(target=targets_to_notify(erased))
    propagated >> verify(erased)


gdpr_subject_erasure()
