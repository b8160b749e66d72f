"""The journal: erasures, suppression entries and restrictions, kept outside the warehouse, replayed after a restore.

"You restored last month's backup after an incident: are the people erased since then back in your CRM?"
Every completed erasure, every suppression entry (an erasure's, an opt-out's, a re-keyed copy) and every
restriction and its lift is one row of `gdpr.journal` (control schema v11), written in the transaction that
makes it true (triggers on the suppression list and the restrictions; `erasure.erase` for an erasure, which
knows the subject ids). Right after that commit the task that made the change copies the rows not yet there
to the journal OUTSIDE the warehouse (`sync`): append-only files of JSON lines under the policy's
`evidence.location` (`PathJournalStore`, the same place as the audit chain's heads), one line per entry: entry
id, kind, request id, keyed subject hash, key id, time, and for erasures and restrictions the internal subject
ids (never an email, a name or any other personal data: the free-text source of a suppression entry written by
another writer goes out as `other` unless it is a name like the engine's own).

A task that dies between its commit and the copy loses nothing: every `sync` appends every committed row that
the outside journal lacks (the next DAG run's first task does it at the latest). A task that dies in the middle
of its append leaves a last line without its end of line: skipped on reading, and appended again.

A warehouse restored from a backup lacks the rows written since the backup: `sync` finds the entries of the
outside journal that the control schema lacks (`Status.missing`; one read of the journal, one set-based
comparison), the first task of every DAG refuses to run (`WarehouseBehind`, naming `gdpr_restore_replay`), and
`replay` re-applies them, in one transaction:

  suppression   the entry again, with its hash, key id, reason, source, request id and first-seen time;
  erasure       the person located by keyed hash (every subject's email hashed under every key of the pepper
                chain, as the opt-out guard does: the entry's key id may be a retired pepper) and by the subject
                ids the erasure recorded (not a row whose email has another hash: an id given to a new row since
                the restore, or an email corrected between the backup and the erasure; neither erased nor
                re-sent, the request id in `ids_reused` for a person to check); erased again with the erasure
                engine's own deletion (dependents first; a subject under a legal hold today keeps its
                kept_when_held rows and is flagged, as an erasure restricted by a hold), its archived originals
                destroyed unless a legal obligation keeps them; its request row recorded when the backup lacks
                it, and an outbox row queued (the email
                read from the restored subject row, encrypted) for every downstream target with no
                acknowledgement in the restored outbox. A target that acknowledged before the restore has
                forgotten the person already: sending the erasure again is harmless (the targets' contracts take
                a 404 after a passed preflight as "already gone"), and it gives the restored warehouse its
                acknowledgement back. A person the restored warehouse no longer has in clear cannot be sent
                again: the request then stays completed with `resent: false` in its details (downstream had it
                when it ran);
  lift          the record of the restriction it ends removed and the flags it set cleared (first: a person
                lifted and restricted again since the backup ends restricted);
  restriction   the record again, for the recorded subject ids still there and (by email) the subjects whose
                email has the hash; their do-not-contact flag set (not for a restriction whose lift is replayed
                too);
  both          the request recorded when the backup lacks it (or holds it not run yet: it keeps its date of
                receipt), with its audit row (`restrict` / `lift`, as the lifecycle guard requires); a lift's
                request id and both dates of receipt are in the entries that `restriction.apply` writes. Then
                the last replayed restriction or lift of each person (a restriction only while in force after
                the replay; neither for a person whose erasure is replayed, the erasure is re-sent) is sent
                downstream again: an outbox row for every target of its kind (`propagation.targets_for`) with no
                row for the request in the restored outbox. An earlier one is recorded, not re-sent (the outbox
                has no order: a restriction re-sent beside its lift could reach a target after it), with
                `superseded` in its details. The sales team's webhook (internal ids) is always re-sent; a target
                that knows the person by email only when the restored subject row holds, in clear, an email with
                the entry's hash (read before anything changes, kept in memory, encrypted in the outbox);
                otherwise the request id is in `not_resent` and the targets in its details' `not_resent`.
                Setting a flag downstream again is harmless: the targets' restrict and lift calls are
                idempotent.

Each replayed entry is inserted into gdpr.journal with its original entry id and time (`replayed_at` set) and
audited (action `restore_replay`, with the original request id and entry id).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from . import audit, erasure, matcher, optout, propagation, requests
from .audit import RunContext
from .auditchain import StoragePath
from .candidates import holds_array, qualified
from .crypto import Keys
from .errors import ConfigurationError
from .policy import IDENT, Policy

log = logging.getLogger(__name__)

FORMAT = "warehouse-gdpr/journal/v1"
KINDS = ("suppression", "erasure", "restriction", "restriction_lift")
REPLAY_DAG_ID = "gdpr_restore_replay"
_HASH = re.compile(r"^[0-9a-f]{64}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_FILE = re.compile(r"^\d{8}T\d{12}-[0-9a-f]{12}\.jsonl$")
REPLAY = sql.Identifier("_gdpr_replay")
REPLAY_SUBJECTS = sql.Identifier("_gdpr_replay_subject")


class JournalError(ConfigurationError, RuntimeError):
    """A line of the outside journal is not a journal entry (damaged or altered): named by file and line."""


class WarehouseBehind(ConfigurationError, RuntimeError):
    """The warehouse lacks entries of the outside journal (restored from a backup): run gdpr_restore_replay."""


@dataclass(frozen=True)
class Entry:
    """One journal entry. `details`: for an erasure its outcome and subject ids, for a suppression entry its
    reason, source and first-seen time, for a restriction its subject table and ids, its date of receipt and due
    date, and for a lift its own request id (`lift_request_id`: `request_id` is the restriction's it ends), the
    restriction's ids and the dates (internal ids only)."""

    entry_id: str
    kind: str
    request_id: str | None
    subject_hash: str
    key_id: str | None
    recorded_at: str
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return json.dumps({"format": FORMAT, "entry_id": self.entry_id, "kind": self.kind,
                           "request_id": self.request_id, "subject_hash": self.subject_hash, "key_id": self.key_id,
                           "recorded_at": self.recorded_at, "details": self.details},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_line(cls, line: str, where: str) -> Entry:
        try:
            data = json.loads(line)
            entry = cls(entry_id=data["entry_id"], kind=data["kind"], request_id=data["request_id"],
                        subject_hash=data["subject_hash"], key_id=data["key_id"], recorded_at=data["recorded_at"],
                        details=data.get("details") or {})
            datetime.fromisoformat(entry.recorded_at)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise JournalError(f"{where} is not a journal entry: the outside journal was damaged or altered") from None
        if (data.get("format") != FORMAT or entry.kind not in KINDS or not isinstance(entry.subject_hash, str)
                or not _HASH.match(entry.subject_hash) or not isinstance(entry.details, dict)
                or not isinstance(entry.entry_id, str) or not _UUID.match(entry.entry_id)):
            raise JournalError(f"{where} is not a journal entry (format, kind or hash): the outside journal was "
                               "damaged or altered")
        return entry

    def describe(self) -> str:
        return f"{self.kind} {self.request_id or '-'} (entry {self.entry_id[:8]}, {self.recorded_at})"


class JournalShrunk(ConfigurationError, RuntimeError):
    """The outside journal holds fewer entries than the warehouse has seen there: the evidence location is not
    the one it was (emptied, moved, not mounted). Nothing is appended; a person must act (docs/runbook.md)."""


class JournalStore(Protocol):
    """Where the journal is kept outside the warehouse: lines are appended, never changed. `chain_id` names the
    warehouse's journal (the count of entries it has seen there is kept under it, gdpr.journal_outside)."""

    chain_id: str

    def append(self, lines: list[str]) -> str:
        """Append `lines` (JSON, no newline inside); returns where they went."""

    def read(self) -> Iterable[tuple[str, str]]:
        """Every line appended so far, as (where: file and line number, line)."""


class PathJournalStore:
    """The journal as files of JSON lines under `<root>/journal/<chain id>/`: each `append` writes one new file
    (`<UTC time>-<random>.jsonl`; object stores cannot append to a file), never rewritten or deleted, so the
    folder only grows. The audit chain's id names the warehouse (several may share one location; a restored
    warehouse keeps its id)."""

    def __init__(self, root: StoragePath, chain_id: str) -> None:
        self.root = root
        self.chain_id = chain_id
        self.folder = root / "journal" / chain_id

    def append(self, lines: list[str]) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        path = self.folder / f"{stamp}-{uuid.uuid4().hex[:12]}.jsonl"
        try:
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        except BaseException:
            # A write that failed half-way (disk full, storage gone): the rows are still only in gdpr.journal and
            # the next sync appends them again; a torn file left behind is read up to its last whole line.
            with contextlib.suppress(Exception):  # the write's own error is the one to report
                path.unlink(missing_ok=True)
            raise
        return str(path)

    def read(self) -> Iterable[tuple[str, str]]:
        """Every whole line. A file's last line without its newline was cut off by a write that did not finish
        (a task killed, a full disk): it is skipped with a warning, and the next `sync` appends its entry again
        from gdpr.journal. Anything else that is not an entry is an error (`JournalError`, in `read`)."""
        if not self.folder.exists() or not self.folder.is_dir():
            return
        for name in sorted(p.name for p in self.folder.iterdir() if _FILE.match(p.name)):
            try:
                text = (self.folder / name).read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise JournalError(f"{name} is not UTF-8 text: the outside journal was damaged or altered "
                                   "(docs/runbook.md, 'The journal outside the warehouse is damaged')") from None
            lines = text.split("\n")
            torn = lines.pop()  # "" after a final newline; otherwise a last line whose write did not finish
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield f"{name}:{number}", line
            if torn.strip():
                log.warning("Journal: %s:%d has no end of line (a write that did not finish): skipped; the next "
                            "sync appends its entry again from the warehouse.", name, len(lines) + 1)


@dataclass
class Status:
    """What `sync` found: the entries of the outside journal (`entries`), those the control schema lacks
    (`missing`, oldest first) and how many committed rows it appended to the outside journal (`appended`)."""

    entries: int
    missing: list[Entry]
    appended: int = 0
    appended_to: str | None = None

    @property
    def behind(self) -> bool:
        return bool(self.missing)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(e.kind for e in self.missing).items()))

    def as_dict(self) -> dict[str, Any]:
        return {"entries": self.entries, "missing": len(self.missing), "missing_by_kind": self.counts(),
                "appended": self.appended}


def installed(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('gdpr.journal')").fetchone()[0] is not None  # type: ignore[index]


def entries_seen(conn: psycopg.Connection, chain_id: str) -> int | None:
    """How many distinct entries the warehouse has seen in its outside journal (gdpr.journal_outside, control
    schema v12): 0 before its first sync since the upgrade; None when the control schema is older than v12."""
    if conn.execute("SELECT to_regclass('gdpr.journal_outside')").fetchone()[0] is None:  # type: ignore[index]
        return None
    row = conn.execute("SELECT entries_seen FROM gdpr.journal_outside WHERE chain_id = %s", (chain_id,)).fetchone()
    return int(row[0]) if row else 0


def shrunk_message(where: str, entries: int, seen: int) -> str:
    return (f"the journal outside the warehouse at {where} holds {entries} entr{'y' if entries == 1 else 'ies'}, "
            f"this warehouse has seen {seen} there: the evidence location is not the one it was (emptied, moved, "
            "not mounted); nothing was changed, nothing was appended there. docs/runbook.md, 'The journal outside "
            "the warehouse has fewer entries than the warehouse has seen'")


def record(conn: psycopg.Connection, kind: str, request_id: str | None, subject_hash: str, key_id: str | None,
           details: dict[str, Any]) -> None:
    """One journal row, in the caller's transaction (the one making the change true)."""
    conn.execute("INSERT INTO gdpr.journal (kind, request_id, subject_hash, key_id, details)"
                 " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                 (kind, request_id, subject_hash, key_id, Jsonb(details)))


def read(store: JournalStore) -> list[Entry]:
    """Every entry of the outside journal, once each (an entry appended twice by two concurrent syncs is one)."""
    seen: dict[str, Entry] = {}
    for where, line in store.read():
        entry = Entry.from_line(line, where)
        seen.setdefault(entry.entry_id, entry)
    return sorted(seen.values(), key=lambda e: (e.recorded_at, KINDS.index(e.kind), e.entry_id))


_ROW = "entry_id::text, kind, request_id, subject_hash, key_id, recorded_at, details"


def _entry(row: tuple[Any, ...]) -> Entry:
    details = dict(row[6])
    if row[1] == "suppression" and not re.fullmatch(IDENT, str(details.get("source", ""))):
        # The source of an entry written by another writer (a loader, an owner by hand) is free text: only a
        # name like the engine's own ('erasure_request', an opt-out source of the policy) leaves the warehouse.
        details["source"] = "other"
    return Entry(entry_id=row[0], kind=row[1], request_id=row[2], subject_hash=row[3], key_id=row[4],
                 recorded_at=row[5].astimezone(timezone.utc).isoformat(), details=details)


def sync(conn: psycopg.Connection, store: JournalStore) -> Status:
    """Read the outside journal once; append to it the committed rows of gdpr.journal it lacks (a task that died
    after its commit); return the entries the control schema lacks (an entry is there under its id, or as the same
    change: kind, subject hash and request id). Two set-based statements. Ends the transaction it reads in.

    The outside journal only grows: when it holds fewer entries than the warehouse has seen there (control schema
    v12, gdpr.journal_outside), its location is not the one it was, and `JournalShrunk` is raised before anything
    is appended (a warehouse restored from a backup has seen fewer: it is found behind, as before). After a read
    and append that succeeded, the count seen is recorded (never lowered), in its own committed transaction."""
    entries = read(store)
    if not installed(conn):
        conn.rollback()
        return Status(entries=len(entries), missing=entries)
    seen = entries_seen(conn, store.chain_id)
    if seen is not None and len(entries) < seen:
        conn.rollback()
        raise JournalShrunk(shrunk_message(str(getattr(store, "folder", store.chain_id)), len(entries), seen))
    ids = [e.entry_id for e in entries]
    absent = _absent(conn, entries)
    unjournaled = [_entry(r) for r in conn.execute(
        f"SELECT {_ROW} FROM gdpr.journal j WHERE NOT EXISTS (SELECT 1 FROM unnest(%s::uuid[]) AS f(id)"
        " WHERE f.id = j.entry_id) ORDER BY recorded_at, entry_id", (ids,)).fetchall()]
    conn.rollback()
    status = Status(entries=len(entries), missing=[e for e in entries if e.entry_id in absent])
    if unjournaled:
        status.appended_to = store.append([e.line() for e in unjournaled])
        status.appended = len(unjournaled)
        status.entries += len(unjournaled)
    if seen is not None and status.entries > seen:
        with conn.transaction():
            conn.execute(
                "INSERT INTO gdpr.journal_outside (chain_id, entries_seen, seen_at) VALUES (%s, %s, now())"
                " ON CONFLICT (chain_id) DO UPDATE SET seen_at = EXCLUDED.seen_at,"
                " entries_seen = GREATEST(gdpr.journal_outside.entries_seen, EXCLUDED.entries_seen)",
                (store.chain_id, status.entries))
    return status


def _absent(conn: psycopg.Connection, entries: list[Entry]) -> set[str]:
    """The ids of `entries` that gdpr.journal lacks, under their id or as the same change (kind, subject hash and
    request id). One set-based statement."""
    return {r[0] for r in conn.execute(
        "SELECT f.id::text FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[]) AS f(id, kind, hash, req)"
        " WHERE NOT EXISTS (SELECT 1 FROM gdpr.journal j WHERE j.entry_id = f.id)"
        " AND NOT EXISTS (SELECT 1 FROM gdpr.journal j WHERE j.kind = f.kind AND j.subject_hash = f.hash"
        "  AND coalesce(j.request_id, '') = coalesce(f.req, ''))",
        ([e.entry_id for e in entries], [e.kind for e in entries], [e.subject_hash for e in entries],
         [e.request_id for e in entries]),
    ).fetchall()}


def behind_message(status: Status, where: str) -> str:
    counts = ", ".join(f"{n} {kind}" for kind, n in status.counts().items())
    return (f"this warehouse is behind the journal kept outside it ({where}): {len(status.missing)} entr"
            f"{'y' if len(status.missing) == 1 else 'ies'} ({counts}) are missing from its control schema, the "
            f"oldest from {status.missing[0].recorded_at}. It was restored from a backup taken before them: people "
            "erased since may be back. Nothing was changed in the warehouse. Pause the other DAGs and trigger "
            f"{REPLAY_DAG_ID}, which erases them again (docs/runbook.md, 'Restore procedure').")


def refuse_if_behind(status: Status, where: str) -> None:
    if status.behind:
        raise WarehouseBehind(behind_message(status, where))


# -- replay --------------------------------------------------------------------------------------------------


def replay(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, missing: list[Entry],
           as_of: str, extra_audit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-apply `missing` (module doc), in ONE transaction with their audit rows. `extra_audit`: the details of
    a `restore_detected` audit row written in the same transaction (the caller found the audit log truncated).
    Returns counts (no personal data).

    Lock, then re-check: a second replay (another deployment, a run by hand) waits for the replay lock, then
    finds what the first one applied already there and neither applies nor audits it again (`missing` and the
    restore row are re-checked under the lock)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('warehouse_gdpr.restore_replay'))")
        if missing:
            absent = _absent(conn, missing)
            missing = [e for e in missing if e.entry_id in absent]
        result = _replay(conn, policy, keys, ctx, missing, as_of, extra_audit)
    return result


def _replay(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, missing: list[Entry],
            as_of: str, extra_audit: dict[str, Any] | None) -> dict[str, Any]:
    """`replay`'s body, in its transaction, under its lock."""
    result: dict[str, Any] = {"entries": len(missing), "by_kind": dict(Counter(e.kind for e in missing)),
                              "suppression_added": 0, "erased_subjects": 0, "held_subjects": 0, "rows": {},
                              "archive_destroyed": 0, "requests_recorded": 0, "requeued": 0, "not_resent": [],
                              "ids_reused": [], "restricted": 0, "lifted": 0}
    if extra_audit is not None and not _restore_recorded(conn, extra_audit):
        audit.record(conn, ctx, action="restore_detected", outcome="recorded", table="gdpr.audit_log",
                     details=extra_audit)
    if not missing:
        audit.record(conn, ctx, action="restore_replay", outcome="nothing_to_replay", table="gdpr.journal")
        return result
    _stage(conn, missing)
    _suppression(conn, result)
    if any(e.kind == "erasure" for e in missing):
        _erasures(conn, policy, keys, ctx, as_of, result)
    if any(e.kind in ("restriction", "restriction_lift") for e in missing):
        _restrictions(conn, policy, keys, ctx, result)
    conn.execute(sql.SQL(
        "INSERT INTO gdpr.audit_log (dag_id, run_id, task_id, table_name, action, row_count, dry_run, outcome,"
        " subject_hash, details)"
        " SELECT %(dag)s, %(run)s, %(task)s, 'gdpr.journal', 'restore_replay', 1, false, 'replayed', subject_hash,"
        " jsonb_build_object('request_id', request_id, 'kind', kind, 'entry_id', entry_id,"
        "  'recorded_at', recorded_at, 'key_id', key_id)"
        " FROM {r} ORDER BY recorded_at, entry_id").format(r=REPLAY),
        {"dag": ctx.dag_id, "run": ctx.run_id, "task": ctx.task_id})
    for table, n in sorted(result["rows"].items()):
        audit.record(conn, ctx, action="erase", outcome="restore_replay", table=table, row_count=n)
    return result


def _restore_recorded(conn: psycopg.Connection, restore: dict[str, Any]) -> bool:
    """Whether a replay already recorded this restore (its `restore_detected` row supersedes the same exported
    head)."""
    head = (restore.get("exported_head") or {}).get("row_hash")
    return head is not None and bool(conn.execute(
        "SELECT EXISTS (SELECT 1 FROM gdpr.audit_log WHERE action = 'restore_detected'"
        " AND details->'exported_head'->>'row_hash' = %s)", (head,)).fetchone()[0])  # type: ignore[index]


def _stage(conn: psycopg.Connection, missing: list[Entry]) -> None:
    """The missing entries as the temp table _gdpr_replay, and in gdpr.journal again with their own ids (inserted
    first: the triggers' rows for the changes below are then the same entries, not new ones)."""
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {r}").format(r=REPLAY))
    conn.execute(sql.SQL(
        "CREATE TEMP TABLE {r} ON COMMIT DROP AS SELECT * FROM jsonb_to_recordset(%s) AS x(entry_id uuid, kind text,"
        " request_id text, subject_hash text, key_id text, recorded_at timestamptz, details jsonb)").format(r=REPLAY),
        (Jsonb([json.loads(e.line()) for e in missing]),))
    conn.execute(sql.SQL(
        "INSERT INTO gdpr.journal (entry_id, kind, request_id, subject_hash, key_id, recorded_at, details, replayed_at)"
        " SELECT entry_id, kind, request_id, subject_hash, key_id, recorded_at, details, clock_timestamp() FROM {r}"
        " ON CONFLICT DO NOTHING").format(r=REPLAY))


def _suppression(conn: psycopg.Connection, result: dict[str, Any]) -> None:
    added = conn.execute(sql.SQL(
        "INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source, request_id, first_seen)"
        " SELECT DISTINCT ON (subject_hash) subject_hash, key_id, coalesce(details->>'reason', 'opt_out'),"
        "  coalesce(details->>'source', 'restore_replay'), request_id,"
        "  coalesce((details->>'first_seen')::timestamptz, recorded_at)"
        " FROM {r} WHERE kind = 'suppression' AND key_id IS NOT NULL ORDER BY subject_hash, recorded_at"
        " ON CONFLICT (email_hash) DO NOTHING").format(r=REPLAY)).rowcount
    # An opted-out person erased since the backup: the entry is an erasure one again (the guard needs it).
    conn.execute(sql.SQL(
        "UPDATE gdpr.suppression_list l SET reason = 'erasure', request_id = r.request_id FROM {r} r"
        " WHERE r.kind = 'erasure' AND l.email_hash = r.subject_hash AND l.reason = 'opt_out'").format(r=REPLAY))
    result["suppression_added"] = added


def _erasures(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, as_of: str,
              result: dict[str, Any]) -> None:
    """Locate (keyed hash under any key of the chain, recorded subject ids), hold check, delete, archive, request
    row, outbox. Set-based, except one archive call per replayed erasure that has archived originals."""
    subject = policy.subject
    table, pk = qualified(subject.table), sql.Identifier(subject.primary_key)
    optout.stage_subject_hashes(conn, policy, keys)
    # Subject row `s` found by a recorded id of erasure `r` holds an email whose keyed hash (under every key of the
    # chain) is not the erasure's: another person (only for an erasure by email: `r.key_id`).
    other = sql.SQL(
        "r.key_id IS NOT NULL AND EXISTS (SELECT 1 FROM {stage} h WHERE h.subject_id = s.{pk})"
        " AND NOT EXISTS (SELECT 1 FROM {stage} h WHERE h.subject_id = s.{pk} AND h.email_hash = r.subject_hash)"
    ).format(stage=optout.HASH_STAGE, pk=pk)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {rs}").format(rs=REPLAY_SUBJECTS))
    conn.execute(sql.SQL(
        "CREATE TEMP TABLE {rs} ON COMMIT DROP AS"
        " SELECT DISTINCT ON (m.subject_id) m.subject_id, m.entry_id, m.by_hash, {holds} AS holds"
        " FROM (SELECT h.subject_id, r.entry_id, true AS by_hash FROM {stage} h JOIN {r} r"
        "   ON r.kind = 'erasure' AND r.subject_hash = h.email_hash"
        "  UNION ALL SELECT s.{pk}, r.entry_id, false FROM {r} r"
        "   CROSS JOIN LATERAL jsonb_array_elements_text(coalesce(r.details->'subject_ids', '[]')) AS x(id)"
        "   JOIN {t} s ON s.{pk}::text = x.id WHERE r.kind = 'erasure' AND NOT ({other})) m"
        " JOIN {t} s ON s.{pk} = m.subject_id"
        " ORDER BY m.subject_id, m.by_hash DESC").format(
            rs=REPLAY_SUBJECTS, holds=holds_array(policy.holds), stage=optout.HASH_STAGE, r=REPLAY, pk=pk, t=table,
            other=other), {"as_of": as_of})
    # A recorded id whose row holds today another person's email (an id given again to a new row since the
    # restore, or the email corrected between the backup and the erasure): not erased, not re-sent, its archive
    # kept; the request id is reported (`ids_reused`) for a person to check.
    reused: dict[str, set[str]] = {}
    for entry_id, request_id, ids in conn.execute(sql.SQL(
            "SELECT r.entry_id::text, r.request_id, array_agg(s.{pk}::text) FROM {r} r"
            " CROSS JOIN LATERAL jsonb_array_elements_text(coalesce(r.details->'subject_ids', '[]')) AS x(id)"
            " JOIN {t} s ON s.{pk}::text = x.id WHERE r.kind = 'erasure' AND {other}"
            " GROUP BY 1, 2 ORDER BY 2").format(r=REPLAY, t=table, pk=pk, other=other)).fetchall():
        reused[entry_id] = set(ids)
        result["ids_reused"].append(request_id)
    # The email each re-sent erasure needs, read before the rows go (kept in memory only, encrypted in the outbox).
    emails: dict[str, str] = dict(conn.execute(sql.SQL(
        "SELECT DISTINCT ON (rs.entry_id) rs.entry_id::text, lower(btrim(s.{e})) FROM {rs} rs"
        " JOIN {t} s ON s.{pk} = rs.subject_id WHERE position('@' in s.{e}) > 0"
        " ORDER BY rs.entry_id, rs.by_hash DESC, rs.subject_id").format(
            e=sql.Identifier(subject.email_column), rs=REPLAY_SUBJECTS, t=table, pk=pk)).fetchall())
    archive_ids: dict[str, list[str]] = {}
    for entry_id, subject_id in conn.execute(sql.SQL(
            "SELECT entry_id::text, subject_id::text FROM {rs} ORDER BY 1, 2").format(rs=REPLAY_SUBJECTS)).fetchall():
        archive_ids.setdefault(entry_id, []).append(subject_id)
    counts = conn.execute(sql.SQL(
        "SELECT count(*) FILTER (WHERE cardinality(holds) = 0), count(*) FILTER (WHERE cardinality(holds) > 0)"
        " FROM {rs}").format(rs=REPLAY_SUBJECTS)).fetchone()
    assert counts is not None
    result["erased_subjects"], result["held_subjects"] = counts
    rows: Counter[str] = Counter()
    for held, count in ((False, counts[0]), (True, counts[1])):
        if not count:
            continue
        persons = matcher.stage(conn, policy, sql.SQL(
            "(SELECT subject_id FROM {rs} WHERE (cardinality(holds) > 0) = {h})").format(
                rs=REPLAY_SUBJECTS, h=sql.Literal(held)))
        rows.update(erasure.delete_everywhere(conn, policy, persons, restricted=held))
    result["rows"] = dict(rows)
    kept = [t.table for t in policy.tables if t.archive]
    replayed = conn.execute(sql.SQL(
        "SELECT entry_id::text, request_id, subject_hash, details, recorded_at FROM {r} WHERE kind = 'erasure'"
        " ORDER BY recorded_at, entry_id").format(r=REPLAY)).fetchall()
    for entry_id, request_id, subject_hash, details, _ in replayed:
        ids = sorted((set(archive_ids.get(entry_id, [])) | {str(i) for i in details.get("subject_ids", [])})
                     - reused.get(entry_id, set()))
        if ids:
            destroyed = conn.execute(
                "SELECT coalesce(sum(destroyed), 0) FROM gdpr.erase_archived_rows(%s, %s, %s, %s, %s, %s, %s)",
                (ids, kept, request_id, subject_hash, ctx.dag_id, ctx.run_id, ctx.task_id)).fetchone()
            result["archive_destroyed"] += int(destroyed[0]) if destroyed else 0
    _erasure_requests(conn, policy, keys, ctx, replayed, emails, result)


def _erasure_requests(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext,
                      replayed: list[tuple[Any, ...]], emails: dict[str, str], result: dict[str, Any]) -> None:
    """The request row of each replayed erasure when the backup lacks it (or holds it not run yet), and an outbox
    row per target that has no row for it in the restored outbox (module doc)."""
    targets = [t.name for t in policy.erasure.targets]
    for entry_id, request_id, subject_hash, details, recorded_at in replayed:
        email = emails.get(entry_id)
        have = {r[0] for r in conn.execute(
            "SELECT target FROM gdpr.erasure_propagation WHERE request_id = %s", (request_id,)).fetchall()}
        queue = [t for t in targets if t not in have] if email else []
        if targets and not email:
            result["not_resent"].append(request_id)
        status = "pending_propagation" if queue or any(
            r[0] == "pending" for r in conn.execute(
                "SELECT status FROM gdpr.erasure_propagation WHERE request_id = %s", (request_id,)).fetchall()
        ) else "completed"
        received = details.get("received_at") or recorded_at.date().isoformat()
        due = details.get("due_date") or received
        row = conn.execute(
            "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome, reason,"
            " completed_at, details) VALUES (%s, 'erasure', %s, %s, %s, %s, %s, %s,"
            " CASE WHEN %s = 'completed' THEN now() END, %s)"
            " ON CONFLICT (request_id) DO UPDATE SET status = EXCLUDED.status, outcome = EXCLUDED.outcome,"
            " reason = EXCLUDED.reason, completed_at = EXCLUDED.completed_at,"
            " details = gdpr.request.details || EXCLUDED.details"
            " WHERE gdpr.request.kind = 'erasure' AND gdpr.request.status IN ('registered', 'in_progress')"
            " RETURNING request_id",
            (request_id, subject_hash, received, due, status, details.get("outcome", "erased"),
             "replayed after a restore (gdpr_restore_replay)", status,
             Jsonb({"replayed": True, "entry_id": entry_id, "targets": queue, "resent": bool(email)})),
        ).fetchone()
        if row:  # the request's own audit row, as the erasure writes it (the lifecycle guard checks it)
            result["requests_recorded"] += 1
            audit.record(conn, ctx, action="erasure_request", outcome=details.get("outcome", "erased"),
                         subject_hash=subject_hash,
                         details={"request_id": request_id, "status": status, "replayed": True, "entry_id": entry_id,
                                  "targets": queue, "reason": "replayed after a restore (gdpr_restore_replay)"})
        for name in queue:
            assert email is not None
            aad = erasure.outbox_aad(request_id, name, keys.store_key_id)
            key_id, nonce, ciphertext = keys.encrypt(email.encode(), aad)
            conn.execute(
                "INSERT INTO gdpr.erasure_propagation (request_id, target, status, key_id, nonce,"
                " identifier_ciphertext) VALUES (%s, %s, 'pending', %s, %s, %s)"
                " ON CONFLICT (request_id, target) DO NOTHING",
                (request_id, name, key_id, nonce, ciphertext))
            result["requeued"] += 1


def _restrictions(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext,
                  result: dict[str, Any]) -> None:
    """The lifts (the restored record removed, the flags it set cleared), then the restrictions again (recorded
    ids still there, and by email hash; not one whose lift is replayed too), in one pass each; then their
    requests and outbox rows (`_restriction_requests`). `result`: restrictions in force again, lifts replayed."""
    subject = policy.subject
    table, pk = qualified(subject.table), sql.Identifier(subject.primary_key)
    any_by_email, any_email = conn.execute(sql.SQL(
        "SELECT coalesce(bool_or(kind = 'restriction' AND (details->>'by_email')::boolean), false),"
        " coalesce(bool_or((details->>'by_email')::boolean), false)"
        " FROM {r} WHERE kind IN ('restriction', 'restriction_lift')").format(r=REPLAY)).fetchone()  # type: ignore[misc]
    if any_email:
        optout.stage_subject_hashes(conn, policy, keys)
    # The email each re-sent restriction or lift needs, read before anything changes here (kept in memory only,
    # encrypted in the outbox): the restored row whose email has the entry's hash (under any key of the chain).
    emails: dict[str, str] = dict(conn.execute(sql.SQL(
        "SELECT DISTINCT ON (r.entry_id) r.entry_id::text, lower(btrim(s.{e})) FROM {r} r"
        " JOIN {stage} h ON h.email_hash = r.subject_hash JOIN {t} s ON s.{pk} = h.subject_id"
        " WHERE r.kind IN ('restriction', 'restriction_lift') AND (r.details->>'by_email')::boolean"
        " AND position('@' in s.{e}) > 0 ORDER BY r.entry_id, s.{pk}").format(
            e=sql.Identifier(subject.email_column), r=REPLAY, stage=optout.HASH_STAGE, t=table, pk=pk)).fetchall()
    ) if any_email else {}
    by_hash = sql.SQL(
        " UNION SELECT h.subject_id::text FROM {stage} h WHERE (r.details->>'by_email')::boolean"
        " AND h.email_hash = r.subject_hash").format(stage=optout.HASH_STAGE) if any_by_email else sql.SQL("")
    flag = sql.Identifier(subject.restriction_column) if subject.restriction_column else None
    # The lifts first, of the restored restrictions they end (by request id: the hash may be re-keyed since), so
    # that a person lifted and restricted again since the backup ends restricted; a restriction whose lift is
    # replayed too is not recorded again (it ended, and the flags it set with it).
    lifted = conn.execute(sql.SQL(
        "DELETE FROM gdpr.restriction g USING {r} r WHERE r.kind = 'restriction_lift'"
        " AND g.request_id = r.request_id RETURNING g.flagged_ids, g.request_id, g.subject_ids")
        .format(r=REPLAY)).fetchall()
    to_clear = sorted({i for r in lifted for i in r[0]})
    if flag and to_clear:
        # A person on the suppression list is flagged again by the next opt-out sync (`optout.enforce`).
        conn.execute(sql.SQL("UPDATE {t} s SET {f} = false WHERE s.{pk}::text = ANY(%s)").format(
            t=table, f=flag, pk=pk), (to_clear,))
    restricted = conn.execute(sql.SQL(
        "WITH found AS (SELECT r.entry_id, ARRAY(SELECT x FROM (SELECT s.{pk}::text AS x FROM {t} s"
        "   WHERE s.{pk}::text IN (SELECT jsonb_array_elements_text(coalesce(r.details->'subject_ids', '[]'))){by_hash}"
        "  ) ids ORDER BY x) AS ids FROM {r} r WHERE r.kind = 'restriction'),"
        " unflagged AS (SELECT f.entry_id, ARRAY(SELECT s.{pk}::text FROM {t} s WHERE s.{pk}::text = ANY(f.ids)"
        "   AND {notflagged} ORDER BY 1) AS ids FROM found f)"
        " INSERT INTO gdpr.restriction (subject_hash, by_email, key_id, subject_table, subject_ids, flagged_ids,"
        "  request_id, restricted_at)"
        " SELECT r.subject_hash, coalesce((r.details->>'by_email')::boolean, false), coalesce(r.key_id, %(key)s),"
        "  coalesce(r.details->>'subject_table', %(table)s), f.ids, u.ids, r.request_id, r.recorded_at"
        " FROM {r} r JOIN found f USING (entry_id) JOIN unflagged u USING (entry_id)"
        " WHERE r.kind = 'restriction' AND cardinality(f.ids) > 0 AND NOT EXISTS (SELECT 1 FROM {r} l"
        "  WHERE l.kind = 'restriction_lift' AND l.request_id = r.request_id)"
        " ON CONFLICT (subject_hash) DO NOTHING RETURNING flagged_ids").format(
            pk=pk, t=table, by_hash=by_hash, r=REPLAY,
            notflagged=sql.SQL("s.{f} IS NOT TRUE").format(f=flag) if flag else sql.SQL("false")),
        {"key": keys.hmac_key_id, "table": subject.table}).fetchall()
    to_flag = sorted({i for r in restricted for i in r[0]})
    if flag and to_flag:
        conn.execute(sql.SQL("UPDATE {t} SET {f} = true WHERE {pk}::text = ANY(%s)").format(t=table, f=flag, pk=pk),
                     (to_flag,))
    result["restricted"] = len(restricted)
    result["lifted"] = conn.execute(sql.SQL(  # every replayed lift: its restriction is not in force any more
        "SELECT count(*) FROM {r} WHERE kind = 'restriction_lift'").format(r=REPLAY)).fetchone()[0]  # type: ignore[index]
    _restriction_requests(conn, policy, keys, ctx, emails, {str(r[1]): list(r[2]) for r in lifted}, result)


def _restriction_requests(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext,
                          emails: dict[str, str], lifted_ids: dict[str, list[str]], result: dict[str, Any]) -> None:
    """The request row of each replayed restriction and lift (a lift's own request id is in its entry) when the
    backup lacks it (or holds it not run yet), audited as the request is, and an outbox row per target with no
    row for it in the restored outbox, for the LAST replayed restriction or lift of each person only (the outbox
    has no order: a restriction re-sent beside its lift could reach a target after it) and neither for a person
    whose erasure is replayed too (the erasure is re-sent). A restriction is re-sent only while in force after
    the replay. Targets that know the person by email are re-sent only when the restored row still holds it in
    clear (with the entry's hash); the sales team's webhook (internal ids) always (module doc)."""
    notify = policy.restriction.notify.name if policy.restriction.notify else None
    replayed = conn.execute(sql.SQL(
        "SELECT r.entry_id::text, r.kind, coalesce(r.details->>'lift_request_id', r.request_id), r.request_id,"
        "  r.subject_hash, r.details, r.recorded_at, g.subject_ids,"
        "  NOT EXISTS (SELECT 1 FROM {r} l WHERE l.kind IN ('restriction', 'restriction_lift')"
        "    AND l.subject_hash = r.subject_hash AND (l.recorded_at, l.entry_id) > (r.recorded_at, r.entry_id))"
        "  AND NOT EXISTS (SELECT 1 FROM {r} x WHERE x.kind = 'erasure' AND x.subject_hash = r.subject_hash)"
        "  AND (r.kind = 'restriction_lift' OR g.request_id IS NOT NULL) AS latest"
        " FROM {r} r LEFT JOIN gdpr.restriction g ON r.kind = 'restriction' AND g.request_id = r.request_id"
        " WHERE r.request_id IS NOT NULL"
        "  AND (r.kind = 'restriction' OR (r.kind = 'restriction_lift' AND r.details ? 'lift_request_id'))"
        " ORDER BY r.recorded_at, r.entry_id").format(r=REPLAY)).fetchall()
    reason = "replayed after a restore (gdpr_restore_replay)"
    for entry_id, kind, request_id, restriction_id, subject_hash, details, recorded_at, ids_now, latest in replayed:
        email = emails.get(entry_id)
        wanted = [t for t in propagation.targets_for(policy, kind) if details.get("by_email") or t == notify] \
            if latest else []
        have: dict[str, str] = dict(conn.execute(
            "SELECT target, status FROM gdpr.erasure_propagation WHERE request_id = %s", (request_id,)).fetchall())
        queue = [t for t in wanted if t not in have and (email or t == notify)]
        unsent = [t for t in wanted if t not in have and t not in queue]
        status = "pending_propagation" if queue or "pending" in have.values() else "completed"
        outcome = "restricted" if kind == "restriction" else "lifted"
        action = "restrict" if kind == "restriction" else "lift"
        received = date.fromisoformat(details.get("received_at") or recorded_at.date().isoformat())
        due = details.get("due_date") or requests.due_date(received).isoformat()
        ids = [str(i) for i in (ids_now if kind == "restriction" else lifted_ids.get(restriction_id))
               or details.get("subject_ids") or details.get("flagged_ids") or []]
        row = conn.execute(
            "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome, reason,"
            " completed_at, details) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
            " CASE WHEN %s = 'completed' THEN now() END, %s)"
            " ON CONFLICT (request_id) DO UPDATE SET status = EXCLUDED.status, outcome = EXCLUDED.outcome,"
            " reason = EXCLUDED.reason, completed_at = EXCLUDED.completed_at,"
            " details = gdpr.request.details || EXCLUDED.details"
            " WHERE gdpr.request.kind = EXCLUDED.kind AND gdpr.request.status IN ('registered', 'in_progress')"
            " RETURNING status",
            (request_id, kind, subject_hash, received, due, status, outcome, reason, status,
             Jsonb({"replayed": True, "entry_id": entry_id, "subject_rows": len(ids), "targets": queue,
                    "not_resent": unsent, "superseded": not latest})),
        ).fetchone()
        if row:  # the request's own audit row, as restriction.apply writes it (the lifecycle guard checks it)
            result["requests_recorded"] += 1
            audit.record(conn, ctx, action=action, outcome=outcome, table="gdpr.restriction", row_count=len(ids),
                         subject_hash=subject_hash,
                         details={"request_id": request_id, "kind": kind, "status": status, "targets": queue,
                                  "not_resent": unsent, "replayed": True, "entry_id": entry_id, "reason": reason})
        else:  # the restored warehouse holds it run already: its outbox only while it is pending propagation
            found = conn.execute("SELECT status FROM gdpr.request WHERE request_id = %s AND kind = %s",
                                 (request_id, kind)).fetchone()
            if found is None or found[0] != "pending_propagation":
                continue
        if unsent:
            result["not_resent"].append(request_id)
        payload = {"identifier": email, "request_id": request_id, "subject_table": policy.subject.table,
                   "subject_ids": ids}
        for name in queue:
            propagation.queue(conn, keys, request_id, kind, name, payload)
            result["requeued"] += 1
