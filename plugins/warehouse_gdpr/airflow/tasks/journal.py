"""The journal outside the warehouse (engine/journal.py) from the Airflow side, and gdpr_restore_replay.

* `refuse_if_restored`: the first task of every DAG (through `connections.run_policy`, before the run's policy is
  pinned) copies to the outside journal what the control schema committed and the journal lacks, and refuses to
  run a warehouse behind it (entries missing: a restore from a backup): the message names gdpr_restore_replay.
  One read of the journal, one comparison. A journal outside with fewer entries than the warehouse has seen
  there (an evidence location emptied, moved or not mounted) is refused too, nothing appended to it
  (`journal.JournalShrunk`). (An audit log that ends before the exported head is left to
  `verify_audit_chain`, at the end of the run: a deleted tail is an incident, not a restore, unless on-call
  knows of one; docs/runbook.md.)
* `flush`: right after a task commits an erasure, a suppression entry or a restriction, the same copy. A failure
  here is only logged: the change is committed, and the next run's first task copies it.
* `detect_restore` and `replay`: the tasks of gdpr_restore_replay (docs/runbook.md, "Restore procedure").

The journal lives under the policy's `evidence.location` (`journal/<chain id>/`), beside the audit chain's heads.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import psycopg

from warehouse_gdpr.airflow import connections
from warehouse_gdpr.airflow.errors import task_errors
from warehouse_gdpr.engine import auditchain, journal
from warehouse_gdpr.engine.errors import ConfigurationError, TransientError
from warehouse_gdpr.engine.policy import Policy

log = logging.getLogger(__name__)


class ReplayRefused(ConfigurationError):
    """gdpr_restore_replay found something a restore does not explain (the restored audit log itself broken)."""


def _store(policy: Policy, chain_id: str) -> journal.PathJournalStore:
    return journal.PathJournalStore(connections.evidence_store(policy).root, chain_id)


def _storage(action: str, where: str, exc: OSError) -> TransientError:
    return TransientError(f"cannot {action} the journal at {where} ({type(exc).__name__}: {exc.strerror or exc}); "
                          "check the policy's evidence.location and its storage")


def _chain_id(conn: psycopg.Connection) -> str | None:
    """The warehouse's audit chain id (names its journal), None when its control schema has no chain yet."""
    try:
        return auditchain.read_head(conn).chain_id
    except (auditchain.ChainUnavailable, psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedTable):
        return None
    finally:
        conn.rollback()


def _sync(conn: psycopg.Connection, policy: Policy, chain_id: str) -> tuple[journal.Status, str]:
    store = _store(policy, chain_id)
    where = str(store.folder)
    try:
        return journal.sync(conn, store), where
    except OSError as exc:
        raise _storage("read or append to", where, exc) from None
    except journal.JournalShrunk as exc:  # the evidence location is not the one it was: no retry, a person acts
        log.error("%s", exc)
        raise


def refuse_if_restored(policy: Policy, context: Any) -> None:
    """The first task's check (module doc). Raises journal.WarehouseBehind (no retry: a person must act)."""
    if context["dag"].dag_id == journal.REPLAY_DAG_ID:
        return
    with connections.connect(policy) as conn:
        chain_id = _chain_id(conn)
        if chain_id is None:
            return  # no control schema (or no chain) yet: nothing was ever journaled from this warehouse
        status, where = _sync(conn, policy, chain_id)
        if status.appended:
            log.warning("Journal: %d committed entr(y/ies) were not in the journal outside the warehouse yet (a task "
                        "stopped after its commit); appended to %s.", status.appended, status.appended_to)
        if status.behind:
            message = journal.behind_message(status, where)
            log.error("%s", message)
            raise journal.WarehouseBehind(message)
    log.info("Journal: the warehouse holds all %d entr(y/ies) of the journal kept outside it.", status.entries)


def flush(policy: Policy) -> None:
    """After a commit (module doc): append what the outside journal lacks; a failure is logged, not raised."""
    try:
        with connections.connect(policy) as conn:
            chain_id = _chain_id(conn)
            if chain_id is None:
                return
            status, _ = _sync(conn, policy, chain_id)
    except Exception as exc:  # noqa: BLE001 - the change is committed; the next run's first task copies it
        log.warning("Journal: not written now (%s); the next DAG run's first task appends it.", type(exc).__name__)
        return
    if status.appended:
        log.info("Journal: %d entr(y/ies) appended to %s.", status.appended, status.appended_to)


# -- gdpr_restore_replay -------------------------------------------------------------------------------------


def _audit_state(conn: psycopg.Connection, policy: Policy, chain_id: str) -> dict[str, Any]:
    """Whether the audit log ends before the head exported outside the warehouse (a restore), after checking that
    the restored log holds by itself and agrees with the exported head when it reaches it."""
    store = connections.evidence_store(policy)
    try:
        exported = store.latest(chain_id)
    except OSError as exc:
        raise _storage("read", str(store.root), exc) from None
    own = auditchain.verify(conn)
    if own.broken is not None:
        raise ReplayRefused(f"the restored audit log does not hold by itself ({own.broken.describe()}): this is not "
                            "explained by a restore; nothing was changed (docs/runbook.md, 'The audit chain is "
                            "broken')")
    truncated = exported is not None and exported.chain_seq > own.last.chain_seq
    # A replay that committed but could not write its record outside the warehouse (run again): its
    # restore_detected row names the exported head it superseded.
    recorded = None if exported is None else conn.execute(
        "SELECT details FROM gdpr.audit_log WHERE action = 'restore_detected'"
        " AND details->'exported_head'->>'row_hash' = %s ORDER BY chain_seq DESC LIMIT 1",
        (exported.row_hash,)).fetchone()
    conn.rollback()
    if exported is not None and not truncated and recorded is None:
        against = auditchain.verify(conn, exported=exported)
        if against.broken is not None:
            raise ReplayRefused(f"the audit log disagrees with the head exported outside the warehouse "
                                f"({against.broken.describe()}): this is not explained by a restore; nothing was "
                                "changed (docs/runbook.md, 'The audit chain is broken')")
    return {"truncated": truncated or recorded is not None, "already_recorded": recorded is not None,
            "log_end": recorded[0]["log_end"] if recorded else own.last.as_dict(),
            "exported_head": exported.as_dict() if exported else None}


@task_errors
def detect_restore(policy_file: str, context: Any) -> dict[str, Any]:
    """gdpr_restore_replay's first task: what the restored warehouse lacks (journal entries, audit rows). Changes
    none of the warehouse's data: it installs the control schema when it is older than the package, and appends
    to the outside journal what the warehouse committed and the journal lacks, recording how many entries it has
    seen there (as every first task does)."""
    policy = connections.run_policy(policy_file, context)
    with connections.connect(policy) as conn:
        connections.prepare_warehouse(conn, policy)
        chain_id = auditchain.read_head(conn).chain_id
        conn.rollback()
        status, where = _sync(conn, policy, chain_id)
        state = _audit_state(conn, policy, chain_id)
    for entry in status.missing:
        log.info("Missing from the control schema: %s", entry.describe())
    log.info("Journal at %s: %d entr(y/ies), %d missing from the control schema %s. Audit log: %s.", where,
             status.entries, len(status.missing), status.counts() or "", (
                 f"ends at position {state['log_end']['chain_seq']}, before the head exported at position "
                 f"{state['exported_head']['chain_seq']} (restored from a backup)" if state["truncated"]
                 else "reaches the head exported outside the warehouse"))
    return {"chain_id": chain_id, **status.as_dict(), **state}


@task_errors
def replay(policy_file: str, detected: dict[str, Any], context: Any) -> dict[str, Any]:
    """Re-apply the missing entries and record the restore (audit row `restore_detected`; the audit chain's heads
    continue in a new folder from the restored log's end), one transaction for the warehouse."""
    policy = connections.run_policy(policy_file, context)
    keys = connections.load_keys(policy)
    ctx = connections.run_context(context, False)
    with connections.connect(policy) as conn:
        chain_id = auditchain.read_head(conn).chain_id
        conn.rollback()
        status, _ = _sync(conn, policy, chain_id)  # again: nothing may have changed since detect_restore
        state = _audit_state(conn, policy, chain_id)
        restore = None
        lost = [state["log_end"]["chain_seq"] + 1, state["exported_head"]["chain_seq"]] if state["truncated"] else []
        if state["truncated"] and not state["already_recorded"]:
            restore = {"log_end": state["log_end"], "exported_head": state["exported_head"], "lost_positions": lost,
                       "missing_entries": len(status.missing), "missing_by_kind": status.counts()}
        result = journal.replay(conn, policy, keys, ctx, status.missing, connections.as_of(context), restore)
        recorded = None
        if state["truncated"]:
            verified = auditchain.verify(conn)
            if verified.broken is not None:  # cannot happen: verified before, and only appended to since
                raise ReplayRefused(f"the audit log does not hold after the replay ({verified.broken.describe()})")
            superseded = auditchain.ChainHead.from_dict(state["exported_head"], "the exported head")
            head = auditchain.ChainHead(
                chain_id=chain_id, chain_seq=verified.last.chain_seq, audit_id=verified.last.audit_id,
                row_hash=verified.last.row_hash, exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                exported_by=f"{context['dag'].dag_id}/{context['run_id']}")
            try:
                recorded = connections.evidence_store(policy).record_restore(
                    head, superseded, {"lost_positions": lost})
            except OSError as exc:
                raise _storage("record the restore in", str(connections.evidence_store(policy).root), exc) from None
    flush(policy)
    log.info("Replayed %d journal entr(y/ies) %s: %d suppression entr(y/ies) added, %d subject(s) erased again "
             "(%d kept under a legal hold and flagged), rows %s, %d archived original(s) destroyed, %d request(s) "
             "recorded (erasures, restrictions, lifts), %d propagation(s) queued, %d restriction(s) in force again "
             "and %d lift(s) re-applied.",
             result["entries"], result["by_kind"], result["suppression_added"], result["erased_subjects"],
             result["held_subjects"], result["rows"], result["archive_destroyed"], result["requests_recorded"],
             result["requeued"], result["restricted"], result["lifted"])
    if result["not_resent"]:
        log.warning("Request(s) %s could not be sent again to the downstream targets that know the person by email: "
                    "the restored warehouse does not hold the person's email in clear (downstream had the request "
                    "when it first ran; see docs/runbook.md, 'Restore procedure').", ", ".join(result["not_resent"]))
    if result["ids_reused"]:
        log.warning("Erasure request(s) %s: a subject id the erasure recorded now holds another person's email (an id "
                    "given again to a new row since the restore, or the email corrected between the backup and the "
                    "erasure): that row was not erased nor sent downstream. Check it by hand (docs/runbook.md, "
                    "'Restore procedure').", ", ".join(result["ids_reused"]))
    if recorded:
        log.warning("The audit log was restored to position %d; the heads exported up to position %d stay as they "
                    "were (what the backup lost) and the chain continues from position %d (recorded in %s, audit "
                    "row restore_detected).", state["log_end"]["chain_seq"], state["exported_head"]["chain_seq"],
                    state["log_end"]["chain_seq"], recorded)
    return {k: v for k, v in result.items() if k not in ("not_resent", "ids_reused")} | {
        "not_resent": len(result["not_resent"]), "ids_reused": len(result["ids_reused"]),
        "restore_recorded": bool(recorded)}
