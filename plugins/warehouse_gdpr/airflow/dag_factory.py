"""DAG factory: build warehouse-gdpr's DAGs from a policy file.

One line in your dags folder creates them all (the words "airflow" and "dag" must appear in the file
for Airflow's DAG discovery, hence the comment):

    # airflow dags of warehouse-gdpr
    from warehouse_gdpr.dags import build_all; globals().update(build_all("/opt/airflow/include/policy.yaml"))

Building reads the policy file (a local file) for the schedule, the rule names offered in the trigger
form and the erasure retry settings; nothing touches a database or the network. A policy that does
not load still gives DAGs (default schedules), so they stay visible: the reason is logged at ERROR
when the file is parsed (the dag-processor log) and their first task fails with it.
Without a path, $WAREHOUSE_GDPR_POLICY names the file (`connections.policy_path`).
Task bodies live in airflow/tasks/sweep.py, erasure.py, optout.py, access.py, evidence.py and journal.py.

Every DAG ends with `verify_audit_chain` (airflow/tasks/evidence.py), a teardown task: it runs once the
run's other tasks are done, whatever their outcome, verifies the audit chain and exports its head. As
a teardown it leaves the run's state to the other tasks; `audit_chain_failed`, after it, fails the run
when it failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param, XComArg, dag, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException

from warehouse_gdpr.airflow import connections
from warehouse_gdpr.airflow.tasks import access as access_tasks
from warehouse_gdpr.airflow.tasks import erasure as erasure_tasks
from warehouse_gdpr.airflow.tasks import evidence as evidence_tasks
from warehouse_gdpr.airflow.tasks import journal as journal_tasks
from warehouse_gdpr.airflow.tasks import optout as optout_tasks
from warehouse_gdpr.airflow.tasks import rectification as rectification_tasks
from warehouse_gdpr.airflow.tasks import restriction as restriction_tasks
from warehouse_gdpr.airflow.tasks import sweep as sweep_tasks
from warehouse_gdpr.engine import erasure, journal
from warehouse_gdpr.engine.policy import Policy, PolicyError, load_policy

log = logging.getLogger(__name__)
START = datetime(2026, 1, 1)
DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(minutes=5), "retry_exponential_backoff": True}


def _load(policy_file: str, dag_id: str) -> Policy | None:
    try:
        return load_policy(policy_file)
    except Exception as exc:  # noqa: BLE001 - a broken policy must not hide the DAGs; their first task explains it
        # PolicyError messages name places in the file, never a value of the warehouse; others: the class only.
        reason = str(exc) if isinstance(exc, PolicyError) else type(exc).__name__
        log.error("%s is built with default settings because its policy file does not load; every run will "
                  "fail in its first task until the file is fixed:\n%s", dag_id, reason)
        return None


def resolved(result: XComArg) -> Any:
    """An upstream task's result (the XComArg its call returns), passed to another task call.

    A @task function's parameters are typed as what it receives when it runs (a dict, a list): Airflow
    resolves the XComArg given at DAG-build time to the upstream task's return value first. mypy cannot
    know that (the decorator's `__call__` takes the function's own parameter types), so this one typed
    function says it where a result is passed on, instead of an ignore per call. Nothing happens at run
    time: `result` is returned as it is."""
    return result


def _notifier(policy: Policy | None) -> Callable[[Any], Any] | None:
    """The policy's erasure.on_failure_callback, imported; None when unset or broken (a broken one never
    hides the DAG: check_deadlines fails with its error)."""
    try:
        return erasure_tasks.resolve_notifier(policy.erasure.on_failure_callback) if policy else None
    except ValueError as exc:
        log.error("%s", exc)
        return None


def _verify_audit_chain(policy_file: str, leaves: list[Any], whole_chain: bool = False) -> None:
    """The run's last tasks: `verify_audit_chain` after `leaves` (the tasks nothing else follows), as a
    teardown, and `audit_chain_failed`, which fails the run when the verification failed (a teardown's
    own failure does not; see the module docstring). `whole_chain`: recompute every row, not only those
    since the previous exported head."""

    @task
    def verify_audit_chain(policy_file: str) -> dict:
        return evidence_tasks.verify_audit_chain(policy_file, get_current_context(), whole_chain=whole_chain)

    @task(trigger_rule="one_failed")
    def audit_chain_failed() -> None:
        raise AirflowFailException("verify_audit_chain failed (see its log): the audit chain is broken or could "
                                   "not be verified, so this run fails")

    verified = verify_audit_chain(policy_file).as_teardown()
    leaves >> verified >> audit_chain_failed()


def build_retention_sweep(policy_file: str | Path | None = None) -> DAG:
    """check_policy -> plan -> apply -> purge_archive -> purge_requests -> purge_access_packages -> report, and
    check_policy -> write_register
    (the article 30 register, beside the sweep so that it never delays a deletion). See sweep_tasks.py,
    rules.py, register.py."""
    path = str(policy_file or connections.policy_path())
    policy = _load(path, "gdpr_retention_sweep")
    rule_names = [r.name for r in policy.rules] if policy else []
    rule_enum: dict[str, Any] = {"enum": rule_names} if rule_names else {}
    property_names: dict[str, Any] = {"propertyNames": rule_enum} if rule_names else {}

    @dag(
        dag_id="gdpr_retention_sweep",
        schedule=policy.airflow.sweep_schedule if policy else "@weekly",
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=["gdpr", "retention"],
        default_args=DEFAULT_ARGS,
        params={
            "dry_run": Param(
                False, type="boolean", title="Dry run",
                description="Compute and log the plan, write one audit row per rule, change nothing else.",
            ),
            "rules": Param(
                None, type=["null", "array"], title="Rules",
                description="Run only these rules (names from the policy). Empty: all rules.",
                items={"type": "string", **rule_enum},
            ),
            "confirm_blast_radius": Param(
                None, type=["null", "object"], title="Confirm blast radius",
                description="Only after a run stopped at the blast-radius limit: the rules it named, each with the "
                            'count it reported, e.g. {"prospects_never_converted": 3402}. Each rule then runs if it '
                            "treats at most that many subjects. Audited. Empty: none.",
                additionalProperties={"type": "integer", "minimum": 0},
                **property_names,
            ),
        },
        doc_md="Enforce the policy's retention rules on the warehouse. Rules are evaluated in "
               "`warehouse_gdpr/rules.py`; see docs/runbook.md when a run fails.",
    )
    def gdpr_retention_sweep() -> None:
        @task
        def check_policy(policy_file: str) -> dict:
            return sweep_tasks.check_policy(policy_file, get_current_context())

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
        def purge_requests(checked: dict, purged: dict) -> dict:
            return sweep_tasks.purge_requests(checked, get_current_context())

        @task
        def purge_access_packages(checked: dict, purged: dict) -> dict:
            return sweep_tasks.purge_access_packages(checked, get_current_context())

        @task
        def report(checked: dict, purged: dict) -> dict:
            return sweep_tasks.report(checked, get_current_context())

        @task
        def write_register(checked: dict) -> dict:
            return sweep_tasks.write_register(checked, get_current_context())

        checked = check_policy(path)
        registered = write_register(resolved(checked))
        plans = plan(resolved(checked))
        applied = apply(resolved(checked), resolved(plans))
        purged = purge_archive(resolved(checked), resolved(applied))
        requests_purged = purge_requests(resolved(checked), resolved(purged))
        packages_purged = purge_access_packages(resolved(checked), resolved(requests_purged))
        # The weekly sweep recomputes the whole chain (an old row edited shows within a week); the other
        # DAGs the rows since the previous exported head.
        _verify_audit_chain(path, [report(resolved(checked), resolved(packages_purged)), registered], whole_chain=True)

    return gdpr_retention_sweep()


def build_subject_erasure(policy_file: str | Path | None = None) -> DAG:
    """validate_request -> [approve_erasure] -> erase -> downstream[target] (preflight -> propagate) ->
    propagation_done -> verify (airflow/tasks/erasure.py)."""
    path = str(policy_file or connections.policy_path())
    policy = _load(path, "gdpr_subject_erasure")
    settings = policy.erasure if policy else None

    @dag(
        dag_id="gdpr_subject_erasure",
        schedule=None,
        start_date=START,
        catchup=False,
        tags=["gdpr", "erasure"],
        default_args={**DEFAULT_ARGS, "retry_delay": timedelta(minutes=1)},
        params={
            # No pattern, format or length on these: Airflow's error for a refused value quotes it (an
            # email). validate_request, the first task, checks them and names the param and the rule.
            "email": Param(
                None, type=["null", "string"], title="Email",
                description="The person's email (plain ASCII; case and surrounding spaces do not matter). Give "
                            "this or the subject id, not both; or neither, for a request registered with "
                            "`warehouse-gdpr request new` (recommended: the address then stays out of the run's "
                            "conf). Even when nobody matches, the erasure adds the email's keyed hash to the "
                            "suppression list for good (the person is never imported again): a dry run shows it "
                            "first.",
            ),
            "subject_id": Param(
                None, type=["null", "integer"], minimum=1, title="Subject id",
                description="The person's internal id in the subject table, instead of the email.",
            ),
            "request_id": Param(
                type="string", title="Request id",
                description="The ticket reference of the request (3-64 letters, digits, '.', '_', ':', '-'), "
                            "one per request: an id already used for another person is refused. Alone, it runs "
                            "the request registered under this id.",
            ),
            "received_at": Param(
                None, type=["null", "string"], title="Received on",
                description="The date the request arrived (YYYY-MM-DD; empty: today, or the registered date; at "
                            f"most {erasure.MAX_RECEIVED_AGE_DAYS} days ago). Due one month later.",
            ),
            "dry_run": Param(False, type="boolean", title="Dry run",
                             description="Locate and evaluate holds, record the plan, change nothing."),
        },
        doc_md="Erase one person on request (GDPR art. 17), propagate downstream, certify. "
               "Outcomes and what to do: docs/runbook.md.",
    )
    def gdpr_subject_erasure() -> None:
        @task
        def validate_request(policy_file: str) -> dict:
            return erasure_tasks.validate_request(policy_file, get_current_context())

        @task
        def erase(policy_file: str, checked: dict) -> dict:
            return erasure_tasks.erase(policy_file, get_current_context())

        @task
        def targets_to_notify(erased: dict) -> list:
            return erased["targets"]

        retry: dict[str, Any] = {
            "retries": settings.retries if settings else 5,
            "retry_delay": timedelta(seconds=settings.retry_delay_seconds if settings else 60),
            "retry_exponential_backoff": True,
        }

        @task(**retry)
        def preflight(policy_file: str, target: str) -> str:
            return erasure_tasks.preflight(policy_file, target, get_current_context())

        @task(**retry)
        def propagate(policy_file: str, target: str) -> str:
            return erasure_tasks.propagate(policy_file, target, get_current_context())

        @task_group
        def downstream(target: str) -> None:
            """Per target: prove its base URL and credentials, then send the erasure (nothing is sent to a
            target whose preflight failed: its erasure stays pending, and only its own tasks fail)."""
            preflight(path, target) >> propagate(path, target)

        @task
        def verify(policy_file: str, erased: dict) -> dict:
            return erasure_tasks.verify(policy_file, get_current_context())

        checked = validate_request(path)
        erased = erase(path, resolved(checked))
        if settings and settings.approval_required:
            from airflow.providers.standard.operators.hitl import ApprovalOperator

            approval = ApprovalOperator(
                task_id="approve_erasure",
                subject="Approve GDPR erasure {{ params.request_id }}",
                body="Request {{ params.request_id }}: see the validate_request log for counts and holds.",
            )
            checked >> approval >> erased
        propagated = downstream.expand(target=targets_to_notify(resolved(erased)))
        # verify runs once every propagation is done, whatever its result (it certifies or names the pending
        # targets), and only when erase succeeded (an erasure refused by erase has nothing to verify).
        propagation_done = EmptyOperator(task_id="propagation_done", trigger_rule="all_done")
        certified = verify(path, resolved(erased))
        propagated >> propagation_done >> certified
        _verify_audit_chain(path, [certified])

    return gdpr_subject_erasure()


def build_subject_access(policy_file: str | Path | None = None) -> DAG:
    """validate_request -> preflight[target] -> answer (airflow/tasks/access.py; engine: access.py): the right
    of access (art. 15) and, with `portability`, the right to portability (art. 20)."""
    path = str(policy_file or connections.policy_path())
    policy = _load(path, "gdpr_subject_access")
    settings = policy.erasure if policy else None

    @dag(
        dag_id="gdpr_subject_access",
        schedule=None,
        start_date=START,
        catchup=False,
        tags=["gdpr", "access"],
        default_args={**DEFAULT_ARGS, "retry_delay": timedelta(minutes=1)},
        params={
            # No pattern, format or length on these: Airflow's error for a refused value quotes it (an
            # email). validate_request, the first task, checks them and names the param and the rule.
            "email": Param(
                None, type=["null", "string"], title="Email",
                description="The person's email (plain ASCII; case and surrounding spaces do not matter). Give "
                            "this or the subject id, not both; or neither, for a request registered with "
                            "`warehouse-gdpr request new` (recommended: the address then stays out of the run's "
                            "conf).",
            ),
            "subject_id": Param(
                None, type=["null", "integer"], minimum=1, title="Subject id",
                description="The person's internal id in the subject table, instead of the email.",
            ),
            "request_id": Param(
                type="string", title="Request id",
                description="The ticket reference of the request (3-64 letters, digits, '.', '_', ':', '-'), "
                            "one per request. Alone, it runs the request registered under this id (access or "
                            "portability, as registered). The package is written as <request id>.wgdpr under the "
                            "policy's access.location.",
            ),
            "received_at": Param(
                None, type=["null", "string"], title="Received on",
                description="The date the request arrived (YYYY-MM-DD; empty: today, or the registered date; at "
                            f"most {erasure.MAX_RECEIVED_AGE_DAYS} days ago). Due one month later.",
            ),
            "portability": Param(
                False, type="boolean", title="Portability (art. 20)",
                description="Only the data the person provided (the policy's `provided` columns), as JSON and "
                            "CSV, without the PDF report. A request registered as `portability` is one anyway.",
            ),
            "dry_run": Param(False, type="boolean", title="Dry run",
                             description="Locate and count the person's rows, write no package."),
        },
        doc_md="Answer a right of access (GDPR art. 15) or portability (art. 20) request: everything held on the "
               "person, in the warehouse (live, pseudonymised, archived) and downstream, written as one encrypted "
               "package. Unpack it with `warehouse-gdpr access unpack REQUEST_ID --out DIR`; docs/runbook.md.",
    )
    def gdpr_subject_access() -> None:
        @task
        def validate_request(policy_file: str) -> dict:
            return access_tasks.validate_request(policy_file, get_current_context())

        @task
        def targets_to_ask(checked: dict) -> list:
            return checked["targets"]

        @task(retries=settings.retries if settings else 5,
              retry_delay=timedelta(seconds=settings.retry_delay_seconds if settings else 60),
              retry_exponential_backoff=True)
        def preflight(policy_file: str, target: str) -> str:
            return erasure_tasks.preflight(policy_file, target, get_current_context())

        # none_failed: with no target to ask (portability, a dry run, no email known) the mapped preflight is
        # skipped and the answer still runs; a failed preflight stops it (no package leaves a system out).
        @task(trigger_rule="none_failed")
        def answer(policy_file: str, checked: dict) -> dict:
            return access_tasks.answer(policy_file, get_current_context())

        checked = validate_request(path)
        asked = preflight.partial(policy_file=path).expand(target=targets_to_ask(resolved(checked)))
        answered = answer(path, resolved(checked))
        asked >> answered
        _verify_audit_chain(path, [answered])

    return gdpr_subject_access()


RETRY_DAG_ID = "gdpr_propagation_retry"
# The retry DAG's former id, built as well for one release (paused when created) so that a deployment that runs
# it keeps working: unpause gdpr_propagation_retry, pause gdpr_erasure_retry (README, "Upgrading").
OLD_RETRY_DAG_ID = "gdpr_erasure_retry"


def build_erasure_retry(policy_file: str | Path | None = None, dag_id: str = RETRY_DAG_ID) -> DAG:
    """Hourly: preflight the targets with pending propagations (every kind of request: erasure, rectification,
    restriction and its lift), retry them (a target whose preflight failed gets nothing), then flag requests
    near or past their due date (an overdue one fails the run, which calls the policy's
    `erasure.on_failure_callback`). `dag_id`: gdpr_propagation_retry, or its former id gdpr_erasure_retry."""
    path = str(policy_file or connections.policy_path())
    notifier = _notifier(_load(path, dag_id))
    deprecated = dag_id == OLD_RETRY_DAG_ID

    @dag(
        dag_id=dag_id,
        schedule="@hourly",
        start_date=START,
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=True if deprecated else None,
        tags=["gdpr", "erasure", "rectification", "restriction"] + (["deprecated"] if deprecated else []),
        default_args=DEFAULT_ARGS,
        doc_md=("**Deprecated**: the former id of `gdpr_propagation_retry`, kept for one release. Unpause "
                "`gdpr_propagation_retry` and pause this one. " if deprecated else "")
        + "Retry pending propagations (erasures, rectifications, restrictions and their lifts) until each target "
          "acknowledges (after this run's preflight of each target: a target whose preflight fails gets nothing "
          "and fails the run); flag requests due within `deadline_warning_days`; fail the run while a request "
          "is overdue.",
        on_failure_callback=notifier,
    )
    def gdpr_erasure_retry() -> None:
        @task
        def preflight(policy_file: str) -> dict:
            return erasure_tasks.preflight_pending(policy_file, get_current_context())

        @task(trigger_rule="all_done")
        def retry_pending(policy_file: str) -> dict:
            return erasure_tasks.retry_pending(policy_file, get_current_context())

        @task(trigger_rule="all_done")
        def check_deadlines(policy_file: str, retried: dict) -> dict:
            return erasure_tasks.check_deadlines(policy_file, retried, get_current_context())

        retried = retry_pending(path)
        preflight(path) >> retried
        _verify_audit_chain(path, [check_deadlines(path, resolved(retried))])

    return gdpr_erasure_retry()


def build_optout_sync(policy_file: str | Path | None = None) -> DAG:
    """check -> rekey -> collect -> guard_resurrections -> enforce -> share[target] -> export -> report
    (optout_tasks.py; engine: optout.py)."""
    path = str(policy_file or connections.policy_path())
    policy = _load(path, "gdpr_optout_sync")

    @dag(
        dag_id="gdpr_optout_sync",
        schedule=policy.optout.schedule if policy else "@daily",
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=["gdpr", "opt-out"],
        default_args=DEFAULT_ARGS,
        params={
            "dry_run": Param(
                False, type="boolean", title="Dry run",
                description="Compute and log what each step would do, write one audit row per step, change "
                            "nothing else (no list entry, no flag, no deletion, nothing shared or exported).",
            ),
        },
        doc_md="The hashed opt-out list: collect opt-outs, erase (or quarantine) erased people who came back, "
               "mark every listed person do-not-contact, share the hashes downstream. Only keyed hashes are "
               "stored, shared or exported; see `warehouse_gdpr/optout.py` (key rotation included).",
    )
    def gdpr_optout_sync() -> None:
        @task
        def check(policy_file: str) -> dict:
            return optout_tasks.check(policy_file, get_current_context())

        @task
        def rekey(checked: dict) -> dict:
            return optout_tasks.rekey(checked, get_current_context())

        @task
        def collect(checked: dict, rekeyed: dict) -> dict:
            return optout_tasks.collect(checked, get_current_context())

        @task
        def guard_resurrections(checked: dict, collected: dict) -> dict:
            return optout_tasks.guard(checked, get_current_context())

        @task
        def enforce(checked: dict, guarded: dict) -> dict:
            return optout_tasks.enforce(checked, get_current_context())

        @task
        def share_targets(checked: dict, enforced: dict) -> list:
            return checked["targets"]

        @task
        def share(policy_file: str, target: str) -> dict:
            return optout_tasks.share(policy_file, target, get_current_context())

        @task
        def export(checked: dict, enforced: dict) -> dict:
            return optout_tasks.export(checked, get_current_context())

        @task(trigger_rule="none_failed")
        def report(checked: dict) -> dict:
            return optout_tasks.report(checked, get_current_context())

        checked = check(path)
        rekeyed = rekey(resolved(checked))
        collected = collect(resolved(checked), resolved(rekeyed))
        guarded = guard_resurrections(resolved(checked), resolved(collected))
        enforced = enforce(resolved(checked), resolved(guarded))
        shared = share.partial(policy_file=path).expand(target=share_targets(resolved(checked), resolved(enforced)))
        exported = export(resolved(checked), resolved(enforced))
        reported = report(resolved(checked))
        [shared, exported] >> reported
        _verify_audit_chain(path, [reported])

    return gdpr_optout_sync()


def build_subject_rectification(policy_file: str | Path | None = None) -> DAG:
    """validate_request -> [approve_rectification] -> rectify -> downstream[target] (preflight -> propagate) ->
    propagation_done -> verify (airflow/tasks/rectification.py; the downstream tasks are erasure's)."""
    path = str(policy_file or connections.policy_path())
    policy = _load(path, "gdpr_subject_rectification")
    columns = sorted(policy.rectification.columns) if policy else []

    @dag(
        dag_id="gdpr_subject_rectification",
        schedule=None,
        start_date=START,
        catchup=False,
        tags=["gdpr", "rectification"],
        default_args={**DEFAULT_ARGS, "retry_delay": timedelta(minutes=1)},
        params={
            **_person_params("rectification"),
            # No pattern on the values: Airflow's error for a refused value quotes it. validate_request checks
            # each against the policy and names the column and the rule, never the value.
            "changes": Param(
                None, type=["null", "object"], title="Changes",
                description="The corrections, as an object of column -> new value, e.g. "
                            '{"direct_phone": "+33 1 23 45 67 89"}. Rectifiable columns (the policy\'s '
                            f"rectification.columns): {', '.join(columns) or 'none'}. Empty for a request registered "
                            "with `warehouse-gdpr request new --kind rectification` (its changes are stored encrypted "
                            "with it).",
            ),
            "dry_run": Param(False, type="boolean", title="Dry run",
                             description="Check and count the rows each change would touch, change nothing."),
        },
        doc_md="Rectify one person's data on request (GDPR art. 16) everywhere the warehouse holds it, and tell "
               "the downstream systems that hold it. What to do when a target does not acknowledge: docs/runbook.md.",
    )
    def gdpr_subject_rectification() -> None:
        @task
        def validate_request(policy_file: str) -> dict:
            return rectification_tasks.validate_request(policy_file, get_current_context())

        @task
        def rectify(policy_file: str, checked: dict) -> dict:
            return rectification_tasks.rectify(policy_file, get_current_context())

        @task
        def verify(policy_file: str, done: dict) -> dict:
            return rectification_tasks.verify(policy_file, get_current_context())

        checked = validate_request(path)
        rectified = rectify(path, resolved(checked))
        if policy and policy.rectification.approval_required:
            checked >> _approval("rectification") >> rectified
        verified = _downstream(path, policy, rectified, lambda done: verify(path, resolved(done)))
        _verify_audit_chain(path, [verified])

    return gdpr_subject_rectification()


def build_subject_restriction(policy_file: str | Path | None = None) -> DAG:
    """validate_request -> apply (restrict or lift) -> downstream[target] (preflight -> propagate) ->
    propagation_done -> verify (airflow/tasks/restriction.py; engine: restriction.py)."""
    path = str(policy_file or connections.policy_path())
    policy = _load(path, "gdpr_subject_restriction")

    @dag(
        dag_id="gdpr_subject_restriction",
        schedule=None,
        start_date=START,
        catchup=False,
        tags=["gdpr", "restriction"],
        default_args={**DEFAULT_ARGS, "retry_delay": timedelta(minutes=1)},
        params={
            **_person_params("restriction"),
            "action": Param(
                None, type=["null", "string"], enum=[None, "restrict", "lift"], title="Action",
                description="`restrict` (GDPR art. 18: the person's data is held from the retention sweep, kept out "
                            "of every campaign and share, downstream and the sales team told) or `lift` (once the "
                            "question is resolved). Empty: the kind of the registered request, else `restrict`.",
            ),
            "dry_run": Param(False, type="boolean", title="Dry run",
                             description="Locate the person and say what would happen, change nothing."),
        },
        doc_md="Restrict the processing of one person's data on request (GDPR art. 18), or lift the restriction; "
               "downstream systems and the sales team are told. What to do when one does not acknowledge: "
               "docs/runbook.md.",
    )
    def gdpr_subject_restriction() -> None:
        @task
        def validate_request(policy_file: str) -> dict:
            return restriction_tasks.validate_request(policy_file, get_current_context())

        @task
        def apply(policy_file: str, checked: dict) -> dict:
            return restriction_tasks.apply(policy_file, get_current_context())

        @task
        def verify(policy_file: str, done: dict) -> dict:
            return restriction_tasks.verify(policy_file, get_current_context())

        applied = apply(path, resolved(validate_request(path)))
        verified = _downstream(path, policy, applied, lambda done: verify(path, resolved(done)))
        _verify_audit_chain(path, [verified])

    return gdpr_subject_restriction()


def _person_params(kind: str) -> dict[str, Param]:
    """The params that name the person and the request, as the erasure DAG has them."""
    return {
        "email": Param(
            None, type=["null", "string"], title="Email",
            description="The person's email (plain ASCII; case and surrounding spaces do not matter). Give this or the "
                        "subject id, not both; or neither, for a request registered with `warehouse-gdpr request new "
                        f"--kind {kind}` (recommended: the address then stays out of the run's conf).",
        ),
        "subject_id": Param(
            None, type=["null", "integer"], minimum=1, title="Subject id",
            description="The person's internal id in the subject table, instead of the email.",
        ),
        "request_id": Param(
            type="string", title="Request id",
            description="The ticket reference of the request (3-64 letters, digits, '.', '_', ':', '-'), one per "
                        "request: an id already used for another person or kind is refused. Alone, it runs the "
                        "request registered under this id.",
        ),
        "received_at": Param(
            None, type=["null", "string"], title="Received on",
            description="The date the request arrived (YYYY-MM-DD; empty: today, or the registered date; at most "
                        f"{erasure.MAX_RECEIVED_AGE_DAYS} days ago). Due one month later.",
        ),
    }


def _approval(kind: str) -> Any:
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    return ApprovalOperator(
        task_id=f"approve_{kind}",
        subject=f"Approve GDPR {kind} {{{{ params.request_id }}}}",
        body="Request {{ params.request_id }}: see the validate_request log for the columns, counts and targets.",
    )


def _downstream(path: str, policy: Policy | None, done: XComArg, then: Callable[[XComArg], XComArg]) -> XComArg:
    """done -> downstream[target] (preflight -> propagate, erasure's tasks: one outbox for every kind) ->
    propagation_done (whatever their result) -> then(done), which runs only when `done` succeeded; returns
    then's task."""
    settings = policy.erasure if policy else None
    retry: dict[str, Any] = {
        "retries": settings.retries if settings else 5,
        "retry_delay": timedelta(seconds=settings.retry_delay_seconds if settings else 60),
        "retry_exponential_backoff": True,
    }

    @task
    def targets_to_notify(result: dict) -> list:
        return result["targets"]

    @task(**retry)
    def preflight(policy_file: str, target: str) -> str:
        return erasure_tasks.preflight(policy_file, target, get_current_context())

    @task(**retry)
    def propagate(policy_file: str, target: str) -> str:
        return erasure_tasks.propagate(policy_file, target, get_current_context())

    @task_group
    def downstream(target: str) -> None:
        """Per target: prove its base URL and credentials, then send the request (nothing is sent to a target
        whose preflight failed: its row stays pending, and only its own tasks fail)."""
        preflight(path, target) >> propagate(path, target)

    propagated = downstream.expand(target=targets_to_notify(resolved(done)))
    propagation_done = EmptyOperator(task_id="propagation_done", trigger_rule="all_done")
    last = then(done)
    propagated >> propagation_done >> last
    return last


def build_restore_replay(policy_file: str | Path | None = None) -> DAG:
    """detect_restore -> replay -> preflight_pending -> retry_pending (airflow/tasks/journal.py; engine: journal.py):
    after the warehouse was restored from a backup, erase again the people erased since, suppress, restrict and
    lift again, record their requests, send the erasures, restrictions and lifts downstream again where the
    restored outbox has no row for them, and record the restore in the audit log and beside the audit chain's
    heads. Triggered by hand (docs/runbook.md)."""
    path = str(policy_file or connections.policy_path())
    _load(path, journal.REPLAY_DAG_ID)

    @dag(
        dag_id=journal.REPLAY_DAG_ID,
        schedule=None,
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=["gdpr", "erasure", "restore"],
        default_args={**DEFAULT_ARGS, "retry_delay": timedelta(minutes=1)},
        doc_md="After a restore of the warehouse from a backup: re-apply every erasure, suppression entry and "
               "restriction of the journal kept outside the warehouse that the restored control schema lacks, send "
               "the erasures, restrictions and lifts downstream again where the restored outbox has no row for "
               "them, and record the restore "
               "(docs/runbook.md, 'Restore procedure'). Every other DAG refuses to run until this one has.",
    )
    def gdpr_restore_replay() -> None:
        @task
        def detect_restore(policy_file: str) -> dict:
            return journal_tasks.detect_restore(policy_file, get_current_context())

        @task
        def replay(policy_file: str, detected: dict) -> dict:
            return journal_tasks.replay(policy_file, detected, get_current_context())

        @task
        def preflight_pending(policy_file: str, replayed: dict) -> dict:
            return erasure_tasks.preflight_pending(policy_file, get_current_context())

        @task(trigger_rule="all_done")
        def retry_pending(policy_file: str, replayed: dict) -> dict:
            return erasure_tasks.retry_pending(policy_file, get_current_context())

        replayed = replay(path, resolved(detect_restore(path)))
        checked = preflight_pending(path, resolved(replayed))
        retried = retry_pending(path, resolved(replayed))
        checked >> retried
        _verify_audit_chain(path, [retried])

    return gdpr_restore_replay()


def build_all(policy_file: str | Path | None = None) -> dict[str, DAG]:
    """Every warehouse-gdpr DAG for one policy file, keyed by dag_id (for `globals().update(...)`); the retry DAG
    also under its former id, gdpr_erasure_retry, for one release."""
    dags = [build_retention_sweep(policy_file), build_subject_erasure(policy_file), build_erasure_retry(policy_file),
            build_erasure_retry(policy_file, OLD_RETRY_DAG_ID), build_subject_rectification(policy_file),
            build_subject_restriction(policy_file), build_optout_sync(policy_file), build_subject_access(policy_file),
            build_restore_replay(policy_file)]
    return {d.dag_id: d for d in dags}
