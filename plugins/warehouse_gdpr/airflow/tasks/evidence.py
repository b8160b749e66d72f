"""The last task of every DAG: verify the audit chain, then export its head outside the warehouse.

`verify_audit_chain` is a teardown task (dag_factory.py): it runs when the run's other tasks are done,
whatever their outcome. It recomputes the chain of gdpr.audit_log from the head the previous run (of
any DAG) exported to the policy's `evidence.location` (the whole chain when there is none yet, and in
every weekly `gdpr_retention_sweep` run, so that an old row edited shows within a week), checks that the
log still reaches that head, and exports the head it verified: one file per run, naming the run, is
the record of the check (it writes no audit row: a run refused before any change leaves the warehouse
as it was). A broken chain fails it at once (no retry: a person must look, docs/runbook.md "The audit chain is
broken"); the head is then not exported, so every later run fails the same way until the chain holds
again. The evidence location being
unreachable is retried.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from airflow.sdk.exceptions import AirflowSkipException

from warehouse_gdpr.airflow import connections
from warehouse_gdpr.airflow.errors import task_errors
from warehouse_gdpr.engine import auditchain
from warehouse_gdpr.engine.errors import ConfigurationError, TransientError

log = logging.getLogger(__name__)


class AuditChainBroken(ConfigurationError):
    """The audit chain does not hold: a row was deleted, edited or inserted outside the chain, or the
    log ends before the head exported earlier."""


def _storage(action: str, where: str, exc: OSError) -> TransientError:
    return TransientError(f"cannot {action} the audit chain head at {where} ({type(exc).__name__}: "
                          f"{exc.strerror or exc}); check the policy's evidence.location and its storage")


@task_errors
def verify_audit_chain(policy_file: str, context: Any, whole_chain: bool = False) -> dict[str, Any]:
    if not connections.policy_pinned(context):
        log.warning("No policy was validated in this run (its first task failed before): the audit chain is not "
                    "verified by this run; the next run verifies it from the last exported head.")
        raise AirflowSkipException("no policy validated in this run")
    policy = connections.run_policy(policy_file, context)
    store = connections.evidence_store(policy)
    where = str(store.root)
    with connections.connect(policy) as conn:
        chain_id = auditchain.read_head(conn).chain_id
        conn.rollback()
        try:
            previous = store.latest(chain_id)
        except OSError as exc:
            raise _storage("read", where, exc) from None
        if previous is None:
            log.warning("No audit chain head of chain %s was exported to %s yet: verifying the whole chain from "
                        "its first row.", chain_id, where)
        result = auditchain.verify(conn, start=None if whole_chain else previous, exported=previous)
    if result.broken is not None:
        message = (f"the audit chain is broken at {result.broken.describe()}. Nothing was exported; every run "
                   "fails here until on-call has explained the break (docs/runbook.md, 'The audit chain is broken').")
        log.error("%s", message)
        raise AuditChainBroken(message)
    head = auditchain.ChainHead(
        chain_id=chain_id, chain_seq=result.last.chain_seq, audit_id=result.last.audit_id,
        row_hash=result.last.row_hash, exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        exported_by=f"{context['dag'].dag_id}/{context['run_id']}",
    )
    try:
        path = store.save(head)
    except OSError as exc:
        raise _storage("export", where, exc) from None
    log.info("Audit chain holds: %d row(s) recomputed, positions %d to %d (audit id %s, hash %s); head exported "
             "to %s.", result.rows_checked, result.first, head.chain_seq, head.audit_id, head.row_hash, path)
    return {"chain_id": chain_id, "rows_checked": result.rows_checked, "position": head.chain_seq,
            "audit_id": head.audit_id, "row_hash": head.row_hash, "exported_to": path}
