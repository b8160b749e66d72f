"""The audit log's hash chain: recompute it, and keep its head outside the warehouse.

The database chains every row of gdpr.audit_log when its transaction commits (control schema v8,
include/sql/gdpr_schema.sql): `chain_seq` is the row's position (1, 2, 3, ... without a gap, in commit
order), `prev_hash` the `row_hash` of the row before it, and `row_hash` the SHA-256 of a canonical
encoding of the position, `prev_hash` and every content column. `verify` recomputes all of it here,
in Python, from the raw columns, so that a database function replaced by its owner cannot vouch for
itself. It finds a row deleted, edited or inserted behind the triggers' back (by a superuser with the
triggers disabled), and with the head a DAG run exported earlier (`HeadStore`), a truncated tail.

Read rights are enough (`gdpr_auditor`). No personal data is read beyond what the audit log holds,
and a finding names rows by audit id and chain position only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import psycopg

from .errors import ConfigurationError

FORMAT = "gdpr.audit_log/v1"
HASH = re.compile(r"^[0-9a-f]{64}$")

# The content columns, in the order the hash takes them (gdpr.audit_row_hash in the DDL).
CONTENT_COLUMNS = ("audit_id", "logged_at", "dag_id", "run_id", "task_id", "rule", "table_name", "action",
                   "row_count", "dry_run", "outcome", "subject_hash", "details")
CHAIN_COLUMNS = ("chain_seq", "prev_hash", "row_hash")

_ROWS = (
    "SELECT chain_seq, prev_hash, row_hash, audit_id, logged_at, dag_id, run_id, task_id, rule, table_name, action,"
    " row_count, dry_run, outcome, subject_hash, details::text FROM gdpr.audit_log"
)


class ChainUnavailable(ConfigurationError, RuntimeError):
    """The warehouse has no audit chain to verify (control schema older than version 8), or an exported
    head cannot be read as one."""


def genesis(chain_id: str) -> str:
    """The `prev_hash` of position 1 (gdpr.audit_chain_genesis)."""
    return hashlib.sha256(f"{FORMAT}/genesis/{chain_id}".encode()).hexdigest()


def _utc(moment: datetime) -> str:
    d = moment.astimezone(timezone.utc)
    return (f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}"
            f".{d.microsecond:06d}")


def _field(value: str | None) -> str:
    return "~" if value is None else f"{len(value.encode('utf-8'))}:{value}"


def row_hash(seq: int, prev: str | None, row: tuple[Any, ...]) -> str:
    """SHA-256 (hex) of one row: `row` holds the content columns in CONTENT_COLUMNS order, with `details`
    as jsonb's text form. Must equal gdpr.audit_row_hash in the DDL."""
    audit_id, logged_at, dag_id, run_id, task_id, rule, table, action, count, dry_run, outcome, subject, details = row
    fields = [str(seq), prev, str(audit_id), _utc(logged_at), dag_id, run_id, task_id, rule, table, action,
              None if count is None else str(count), None if dry_run is None else ("true" if dry_run else "false"),
              outcome, subject, details]
    return hashlib.sha256((FORMAT + "".join(_field(f) for f in fields)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChainHead:
    """A point of the chain: its id, a position, the audit row there and its hash. Position 0 is the
    empty chain (no row; the hash is the genesis value). `exported_at`/`exported_by` describe an
    exported head (when, and which DAG run wrote it)."""

    chain_id: str
    chain_seq: int
    audit_id: int | None
    row_hash: str
    exported_at: str | None = None
    exported_by: str | None = None

    def describe(self) -> str:
        where = f"position {self.chain_seq}" + (f" (audit id {self.audit_id})" if self.audit_id is not None else "")
        if self.exported_at:
            where += f", exported {self.exported_at}" + (f" by {self.exported_by}" if self.exported_by else "")
        return where

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ChainHead:
        try:
            head = cls(chain_id=str(data["chain_id"]), chain_seq=int(data["chain_seq"]),
                       audit_id=None if data.get("audit_id") is None else int(data["audit_id"]),
                       row_hash=str(data["row_hash"]), exported_at=data.get("exported_at"),
                       exported_by=data.get("exported_by"))
        except (KeyError, TypeError, ValueError):
            raise ChainUnavailable(f"{source} is not an exported audit chain head (chain_id, chain_seq, audit_id, "
                                   "row_hash)") from None
        if head.chain_seq < 0 or not HASH.match(head.row_hash):
            raise ChainUnavailable(f"{source} is not an exported audit chain head (position or hash malformed)")
        return head


@dataclass(frozen=True)
class Break:
    """The first place the chain does not hold: the audit row (id and position, when known) and why."""

    audit_id: int | None
    chain_seq: int | None
    reason: str

    def describe(self) -> str:
        parts = [f"audit id {self.audit_id}" if self.audit_id is not None else "",
                 f"chain position {self.chain_seq}" if self.chain_seq is not None else ""]
        return f"audit row {', '.join(p for p in parts if p)}: {self.reason}"


@dataclass
class Verification:
    """What `verify` found: the rows it recomputed (positions `first`..`last.chain_seq`), the head it
    ended on, the exported head it compared with, and the first break (None: the chain holds)."""

    chain_id: str
    first: int
    rows_checked: int
    last: ChainHead
    exported: ChainHead | None
    broken: Break | None = None
    unchained: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.broken is None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "chain_id": self.chain_id, "first_position": self.first,
                "rows_checked": self.rows_checked, "last": self.last.as_dict(),
                "exported_head": self.exported.as_dict() if self.exported else None,
                "broken": asdict(self.broken) if self.broken else None, "unchained_rows": self.unchained}


def read_head(conn: psycopg.Connection) -> ChainHead:
    """The database's chain head (gdpr.audit_chain_head): the last chained row."""
    if conn.execute("SELECT to_regclass('gdpr.audit_chain_head')").fetchone()[0] is None:  # type: ignore[index]
        raise ChainUnavailable(
            "this warehouse's audit log is not chained: its control schema is older than version 8; the owner runs "
            "`warehouse-gdpr schema install` (README, Upgrading)")
    row = conn.execute("SELECT chain_id::text, chain_seq, audit_id, row_hash FROM gdpr.audit_chain_head").fetchone()
    if row is None:
        raise ChainUnavailable("gdpr.audit_chain_head is empty: the audit chain has no head")
    return ChainHead(chain_id=row[0], chain_seq=row[1], audit_id=row[2], row_hash=row[3])


def verify(
    conn: psycopg.Connection,
    *,
    start: ChainHead | None = None,
    exported: ChainHead | None = None,
    batch_size: int = 5000,
) -> Verification:
    """Recompute the chain from `start` (an exported head already verified; None: from position 1) to
    its end, and compare the end with the database's head and with `exported` (the last head exported
    outside the warehouse). Reads only; one consistent snapshot when called outside a transaction."""
    owned = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if owned:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return _verify(conn, start, exported, batch_size)


def _verify(conn: psycopg.Connection, start: ChainHead | None, exported: ChainHead | None,
            batch_size: int) -> Verification:
    head = read_head(conn)
    if start is not None and start.chain_seq == 0:
        start = None
    result = Verification(chain_id=head.chain_id, first=(start.chain_seq if start else 1), rows_checked=0,
                          last=ChainHead(head.chain_id, 0, None, genesis(head.chain_id)), exported=exported)
    for given in (start, exported):
        if given is not None and given.chain_id != head.chain_id:
            result.broken = Break(given.audit_id, given.chain_seq, (
                f"the exported head ({given.describe()}) belongs to chain {given.chain_id}, but this warehouse's "
                f"chain is {head.chain_id}: its chain head was replaced"))
            return result
    previous = result.last
    if start is not None:
        row = conn.execute(_ROWS + " WHERE chain_seq = %s", (start.chain_seq,)).fetchone()
        found = _check_start(row, start)
        if found is not None:
            result.broken = found
            return result
        assert row is not None
        previous = ChainHead(head.chain_id, start.chain_seq, row[3], row[2])
        result.rows_checked = 1
    result.last = previous
    with conn.cursor(name="gdpr_audit_chain_verify") as cur:
        cur.itersize = batch_size
        cur.execute(_ROWS + " WHERE chain_seq > %s ORDER BY chain_seq", (previous.chain_seq,))
        for row in cur:
            seq, digest, audit_id = row[0], row[2], row[3]
            found = _check_row(row, previous)
            if found is None and exported is not None and seq == exported.chain_seq and (
                    audit_id != exported.audit_id or digest != exported.row_hash):
                found = Break(audit_id, seq, (
                    f"differs from the head exported outside the warehouse ({exported.describe()}, hash "
                    f"{exported.row_hash[:12]}…): this row or rows before it were rewritten"))
            if found is not None:
                result.broken = found
                return result
            previous = ChainHead(head.chain_id, seq, audit_id, digest)
            result.rows_checked += 1
    result.last = previous
    result.broken = _check_end(previous, head, exported)
    if result.broken is None:
        unchained = conn.execute(
            "SELECT count(*), min(audit_id) FROM gdpr.audit_log WHERE chain_seq IS NULL").fetchone()
        assert unchained is not None
        result.unchained = unchained[0]
        if unchained[0]:
            result.broken = Break(unchained[1], None, (
                f"not chained ({unchained[0]} row(s) without a chain position, this is the first): inserted while "
                "the chain trigger was disabled"))
    return result


def _check_start(row: tuple[Any, ...] | None, start: ChainHead) -> Break | None:
    if row is None:
        return Break(start.audit_id, start.chain_seq, (
            f"the row of the head exported outside the warehouse ({start.describe()}) is gone: rows were deleted "
            "or the warehouse was restored from an older backup"))
    if row[3] != start.audit_id or row[2] != start.row_hash:
        return Break(row[3], start.chain_seq, (
            f"differs from the head exported outside the warehouse ({start.describe()}, hash "
            f"{start.row_hash[:12]}…): this row or rows before it were rewritten"))
    if row_hash(row[0], row[1], row[3:]) != row[2]:
        return Break(row[3], row[0], "its content does not match its hash: the row was edited")
    return None


def _check_row(row: tuple[Any, ...], previous: ChainHead) -> Break | None:
    seq, prev, digest, audit_id = row[0], row[1], row[2], row[3]
    expected = previous.chain_seq + 1
    if seq != expected:
        missing = f"position {expected}" if seq == expected + 1 else f"positions {expected} to {seq - 1}"
        return Break(audit_id, seq, f"the chain skips {missing}, after {previous.describe()}: rows were deleted")
    if prev != previous.row_hash:
        return Break(audit_id, seq, (
            f"its prev_hash is not the hash of the row before it ({previous.describe()}): one of the two rows was "
            "rewritten"))
    if row_hash(seq, prev, row[3:]) != digest:
        return Break(audit_id, seq, "its content does not match its hash: the row was edited")
    return None


def _check_end(last: ChainHead, head: ChainHead, exported: ChainHead | None) -> Break | None:
    if exported is not None and exported.chain_seq > last.chain_seq:
        return Break(exported.audit_id, exported.chain_seq, (
            f"the head exported outside the warehouse ({exported.describe()}) is beyond the end of the log "
            f"({last.describe()}): rows at the end were deleted (a truncated tail), or the warehouse was restored "
            "from an older backup"))
    if (head.chain_seq, head.row_hash) != (last.chain_seq, last.row_hash):
        if head.chain_seq > last.chain_seq:
            reason = (f"the database's chain head (gdpr.audit_chain_head) is at position {head.chain_seq}, beyond "
                      f"the end of the log ({last.describe()}): rows at the end were deleted")
        else:
            reason = (f"the database's chain head (gdpr.audit_chain_head, position {head.chain_seq}) does not "
                      f"match the last row ({last.describe()}): the head was rewritten")
        return Break(head.audit_id, head.chain_seq, reason)
    return None


# -- the head, kept outside the warehouse ------------------------------------------------------------


class HeadStore(Protocol):
    """Where DAG runs export the chain head and where `verify` finds the last one. The Airflow layer
    gives a `PathHeadStore` over an `airflow.sdk.ObjectStoragePath`; the CLI one over a local path."""

    def latest(self, chain_id: str) -> ChainHead | None:
        """The exported head of `chain_id` with the highest position; None when there is none."""

    def save(self, head: ChainHead) -> str:
        """Export `head`; returns where it went."""


class StoragePath(Protocol):
    """The part of the pathlib API `PathHeadStore` uses (pathlib.Path and ObjectStoragePath have it)."""

    @property
    def name(self) -> str: ...

    def __truediv__(self, other: str, /) -> StoragePath: ...

    def exists(self) -> bool: ...

    def is_dir(self) -> bool: ...

    def iterdir(self) -> Iterable[StoragePath]: ...

    def mkdir(self, mode: int = ..., parents: bool = ..., exist_ok: bool = ...) -> None: ...

    def read_text(self, encoding: str | None = ...) -> str: ...

    def write_text(self, data: str, encoding: str | None = ...) -> Any: ...

    def unlink(self, missing_ok: bool = ...) -> None: ...


_HEAD_FILE = re.compile(r"^head-(\d{20})\.json$")
_EPOCH = re.compile(r"^restore-(\d{4})$")


class PathHeadStore:
    """Exported heads as small JSON files, one per export, never overwritten:
    `<root>/audit_chain/<chain id>/head-<position, 20 digits>.json`. The chain id keeps the heads of
    several warehouses sharing one location apart. After a restore from a backup, in
    `<chain id>/restore-NNNN/` (`record_restore`)."""

    def __init__(self, root: StoragePath) -> None:
        self.root = root

    def _folder(self, chain_id: str) -> StoragePath:
        return self.root / "audit_chain" / chain_id

    def _epoch(self, chain_id: str) -> tuple[StoragePath, ChainHead | None]:
        """The folder heads go to now, and the head it starts from: the chain's own folder, or after a restore
        (`record_restore`) its latest `restore-NNNN` sub-folder, which starts from the head recorded there."""
        base = self._folder(chain_id)
        if not base.exists() or not base.is_dir():
            return base, None
        for name in sorted((p.name for p in base.iterdir() if _EPOCH.match(p.name)), reverse=True):
            marker = base / name / "restored.json"
            if not marker.exists():
                continue  # a restore record interrupted before its file was written
            try:
                data = json.loads(marker.read_text(encoding="utf-8"))
            except ValueError:
                raise ChainUnavailable(f"{marker} is not JSON: a restore record of the chain was damaged") from None
            start = ChainHead.from_dict(data.get("restored_head") if isinstance(data, dict) else None, str(marker))
            if start.chain_id != chain_id:
                raise ChainUnavailable(f"{marker} names another chain than its folder: it was altered")
            return base / name, start
        return base, None

    def latest(self, chain_id: str) -> ChainHead | None:
        folder, start = self._epoch(chain_id)
        if not folder.exists() or not folder.is_dir():
            return start
        names = sorted(p.name for p in folder.iterdir() if _HEAD_FILE.match(p.name))
        if not names:
            return start
        path = folder / names[-1]
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise ChainUnavailable(f"{path} is not JSON: an exported audit chain head was damaged") from None
        head = ChainHead.from_dict(data, str(path))
        if head.chain_id != chain_id or f"head-{head.chain_seq:020d}.json" != names[-1]:
            raise ChainUnavailable(f"{path} names another chain or position than its file name: it was altered")
        return head

    def record_restore(self, head: ChainHead, superseded: ChainHead | None, details: dict[str, Any]) -> str:
        """After a restore from a backup (gdpr_restore_replay): the heads exported before it stay as they are (the
        evidence of what the backup lost); later heads go to a new sub-folder, `restore-NNNN/`, whose
        `restored.json` names the head they start from (`head`: the restored log, verified, with the
        `restore_detected` audit row), the head it supersedes, and `details`. Returns the file written."""
        base = self._folder(head.chain_id)
        base.mkdir(parents=True, exist_ok=True)
        done = [p.name for p in base.iterdir() if _EPOCH.match(p.name)]
        folder = base / f"restore-{len(done) + 1:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / "restored.json"
        marker.write_text(json.dumps({"restored_head": head.as_dict(),
                                      "superseded_head": superseded.as_dict() if superseded else None,
                                      **details}, indent=1) + "\n", encoding="utf-8")
        return str(marker)

    def save(self, head: ChainHead) -> str:
        folder, _ = self._epoch(head.chain_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"head-{head.chain_seq:020d}.json"
        if path.exists():
            kept = ChainHead.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
            if (kept.audit_id, kept.row_hash) != (head.audit_id, head.row_hash):
                raise ChainUnavailable(
                    f"{path} already holds another row for position {head.chain_seq}: the chain was rewritten since "
                    "it was exported")
            return str(path)
        path.write_text(json.dumps(head.as_dict(), indent=1) + "\n", encoding="utf-8")
        return str(path)
