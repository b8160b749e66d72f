"""The right of access (GDPR art. 15) and the right to portability (art. 20): everything held on one
person, answered as one encrypted package.

1. `parse_request`: the params of `gdpr_subject_access` (those of an erasure, plus `portability`).
2. `erasure.locate` finds the person (by email or subject id, pseudonymised people by the keyed hash of
   their email); `gather` then reads, in one read-only snapshot and with ONE query per mapped table, every
   row `matcher.rows` gives the person (the same definition as the sweep and erasure: linked by subject
   id or carrying the email), and their encrypted originals in ``gdpr_archive.archived_row``, decrypted
   (the archive is data we hold).
3. `export` asks each downstream target what it holds on the person, through the transport seam: an
   HTTP target's `access_endpoint` (after this run's preflight; a redirect is never followed, the whole
   body is read, a 404 means "holds nothing" only with the API's own not-found answer), a SQL target's
   `access` queries (one read-only transaction, rolled back).
4. `build_document` puts it together with what article 15(1) asks (purposes, legal bases, sources,
   retention, recipients, rights, the right to complain: `information`); `package_files` renders
   `report.pdf` (access_pdf.py), `data.json`, `csv/<section>.csv` and `manifest.json` (each file's
   SHA-256, the row counts). A portability request gives `data.json` and the CSV files only, with the
   columns the person provided (`tables[].columns.*.provided`), and no PDF.
5. `seal` zips and encrypts the files (to the archive's public key; the file's header, which names
   the request, the key id and the expiry date, is the associated data); `store` writes the package to
   the policy's `access.location` through a `PackageStore`; `unseal` is `warehouse-gdpr access unpack`;
   `purge` deletes packages past `access.keep_for` (the weekly sweep).
6. One run per request id: `answer` holds the request id's lock from before it reads anything until the
   answer is recorded, and checks the request again under it (`answering`): a second run of the same id
   (a double Trigger, an overlapping retry) finds the first one's answer, or stops naming it, and writes
   no package.

Nothing here logs or returns personal data: callers get counts, the package's location and SHA-256.
"""

from __future__ import annotations

import base64
import calendar
import csv
import hashlib
import io
import json
import re
import time as clock
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from ..transport import ConnectionNotUsable, PackageStore, StoreError, Transport, TransportError
from . import audit, erasure, matcher, sweep
from .audit import RunContext
from .candidates import qualified
from .crypto import Keys, archive_aad
from .erasure import ErasureRequest, Located, RequestError
from .errors import ConfigurationError, TransientError
from .policy import DURATION, HttpTarget, MappedTable, Policy, SqlTarget

# The params of gdpr_subject_access: those of gdpr_subject_erasure, and `portability`.
PARAMS = ("email", "subject_id", "request_id", "received_at", "portability", "dry_run")
PACKAGE_SUFFIX = ".wgdpr"
MAGIC = b"WGDPR-ACCESS-1\n"
HEADER_MAX = 4096
# How long a second run of one request id waits for the run answering it (`answering`), then stops.
ANSWER_LOCK_WAIT_SECONDS = 60.0
MAX_ROWS_PER_QUERY = 10_000  # a downstream query answering more for one person matches other people
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # zip members carry no date: the manifest and the header say when

LEGAL_BASES = {
    "consent": "Your consent (art. 6(1)(a))",
    "contract": "Performance of a contract with you (art. 6(1)(b))",
    "legal_obligation": "A legal obligation of ours (art. 6(1)(c))",
    "vital_interests": "Vital interests (art. 6(1)(d))",
    "public_task": "A task in the public interest (art. 6(1)(e))",
    "legitimate_interest": "Our legitimate interest (art. 6(1)(f))",
}
RIGHTS = (
    "You may ask us to correct inaccurate data (art. 16), to erase it (art. 17), to restrict its processing "
    "(art. 18), to receive the data you provided in a machine-readable format (art. 20), and you may object to "
    "its processing, at any time to prospecting (art. 21). We answer within one month."
)


class AccessError(ConfigurationError, ValueError):
    """An access request that cannot run as asked (or a policy that lacks what the answer must state). The
    message names the field or the policy key, never a personal value; nothing was read or written."""


class ExportFailed(TransientError, RuntimeError):
    """A downstream system gave no usable answer (yet): retrying may help. No personal data in the message."""


class ExportMisconfigured(ConfigurationError, RuntimeError):
    """A downstream system's answer shows its target or connection is wrong (a redirect, refused credentials,
    a 404 that is not the API's): retrying will not help."""


class RequestBusy(RequestError):
    """Another run is answering this request id right now (it holds the request id's lock past the wait): this
    run read and wrote nothing. The message names the request and the other run, no personal data."""


class PackageError(ConfigurationError, ValueError):
    """A package is missing, not a package, or does not decrypt with the keys connection's keys."""


# -- the request -------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class AccessRequest:
    """An access or portability request; `base` carries the identifier, dates and dry run (repr hides the email)."""

    base: ErasureRequest
    portability: bool = False

    def __repr__(self) -> str:
        return f"AccessRequest(request_id={self.request_id!r}, kind={self.kind!r})"

    @property
    def request_id(self) -> str:
        return self.base.request_id

    @property
    def kind(self) -> str:
        return "portability" if self.portability else "access"

    @property
    def dry_run(self) -> bool:
        return self.base.dry_run

    @property
    def received_at(self) -> date:
        return self.base.received_at

    @property
    def due_date(self) -> date:
        return self.base.due_date


def refuse_unknown_params(params: Mapping[str, Any]) -> None:
    """Refuse a param this DAG does not take (a typo such as `portabilty`), naming it only if it looks like a
    name; checked first, before a registered request is looked up by its id."""
    unknown = sorted(str(k) for k in params if k not in PARAMS)
    if unknown:
        shown = [f"`{k}`" for k in unknown if re.fullmatch(erasure.SAFE_PARAM_NAME, k)]
        hidden = len(unknown) - len(shown)
        names = ", ".join(shown + ([f"{hidden} other(s) (name not shown)"] if hidden else []))
        raise RequestError(
            f"unknown param(s) {names}: this DAG takes only " + ", ".join(f"`{n}`" for n in PARAMS)
            + " (check the spelling; nothing was read or written)"
        )


def parse_request(params: Mapping[str, Any], today: date | None = None) -> AccessRequest:
    """Check the params of `gdpr_subject_access` (the DAG's first task, before anything is read). The rules of
    an erasure request (erasure.parse_request: exactly one of email and subject id, normalised email never
    echoed, request id, received_at), plus `portability` (a boolean); any other key is refused."""
    refuse_unknown_params(params)
    portability = params.get("portability", False)
    if portability is None:
        portability = False
    if not isinstance(portability, bool):
        raise RequestError("`portability` must be true or false")
    base = erasure.parse_request({k: v for k, v in params.items() if k != "portability"}, today)
    return AccessRequest(base, portability)


def check_not_answered(conn: psycopg.Connection, request: AccessRequest) -> None:
    """Refuse (RequestError, nothing read or written) a request id recorded for another kind, or already
    answered: each request gets its own id, and a completed one keeps its record (and its package)."""
    row = conn.execute("SELECT kind, status, completed_at FROM gdpr.request WHERE request_id = %s",
                       (request.request_id,)).fetchone()
    conn.rollback()
    if row is None:
        return
    kind, status, completed_at = row
    if kind != request.kind:
        raise RequestError(f"request {request.request_id} is of kind {kind}, not {request.kind}: give each request "
                           "its own id; nothing was changed")
    if completed_at is not None:
        raise RequestError(
            f"request {request.request_id} was already answered on {completed_at.date().isoformat()} ({status}): "
            "nothing was changed; a new request of the person gets its own request id")


# -- one run per request id ------------------------------------------------------------------------------
#
# Two runs of one request id (a double Trigger, a retry overlapping an attempt still running) would both read
# the person's data and write `<request_id>.wgdpr`, the second replacing the first's package after the first
# recorded it. So a run (not a dry run) takes the request id's lock before it reads anything, and keeps it
# until its answer is recorded: the session-level form of the lock `erasure.lock_request_id` takes (same key,
# ``pg_advisory_lock(REQUEST_LOCK_CLASS, hashtext(request_id))``; reentrant, so `record` takes it again
# at once). The lock order is the one every writer of gdpr.request follows: the request id's lock, then the
# gdpr.request row, then the subject rows (an access run locks no subject row: it reads a snapshot). Under
# the lock, `check_not_answered` is run again: a second run finds the first one's answer and stops.


def _request_lock_holder(conn: psycopg.Connection, request_id: str) -> str:
    """Who holds the request id's lock (no personal data)."""
    objid = conn.execute("SELECT hashtext(%s)", (request_id,)).fetchone()[0]  # type: ignore[index]
    return sweep.advisory_lock_holder(conn, erasure.REQUEST_LOCK_CLASS, objid)


def _take_request_lock(conn: psycopg.Connection, request_id: str, wait_seconds: float) -> bool:
    with conn.transaction():
        if wait_seconds <= 0:
            row = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))",
                               (erasure.REQUEST_LOCK_CLASS, request_id)).fetchone()
            return bool(row and row[0])
        # lock_timeout bounds the wait (SET LOCAL: this transaction only); the lock itself is the session's.
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{max(1, round(wait_seconds * 1000))}ms",))
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (erasure.REQUEST_LOCK_CLASS, request_id))
        except psycopg.errors.LockNotAvailable:
            return False
        return True


def _release_request_lock(conn: psycopg.Connection, request_id: str) -> None:
    if conn.closed or conn.broken:
        return  # the server released the lock with the session
    try:
        conn.rollback()  # what the run committed stays; anything left open is undone
        conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (erasure.REQUEST_LOCK_CLASS, request_id))
        conn.rollback()  # the unlock is immediate, not transactional
    except psycopg.OperationalError:
        pass  # the connection is gone: the server released the lock with the session


@contextmanager
def answering(conn: psycopg.Connection, ctx: RunContext, request: AccessRequest,
              wait_seconds: float | None = None) -> Iterator[None]:
    """Hold the request id's lock (see above) for the block, then run `check_not_answered` again under it.

    Waits at most `wait_seconds` (default ANSWER_LOCK_WAIT_SECONDS; 0: do not wait) for another run holding
    it, then raises RequestBusy naming that run, after an audit row (action 'request_lock', outcome 'busy').
    When the other run recorded its answer meanwhile, raises RequestError ("already answered on ..."). Either
    way this run read and wrote nothing else. The connection must hold no uncommitted change (a transaction
    that only read is rolled back). Released at the end of the block, or by the server with the session."""
    status = psycopg.pq.TransactionStatus
    if conn.info.transaction_status == status.INTRANS:
        if conn.execute("SELECT pg_current_xact_id_if_assigned() IS NOT NULL").fetchone()[0]:  # type: ignore[index]
            raise RuntimeError("an access answer needs a connection without uncommitted changes")
        conn.rollback()
    wait = ANSWER_LOCK_WAIT_SECONDS if wait_seconds is None else wait_seconds
    started = clock.monotonic()
    if not _take_request_lock(conn, request.request_id, wait):
        waited = round(clock.monotonic() - started, 1)
        holder = _request_lock_holder(conn, request.request_id)
        conn.rollback()
        with conn.transaction():
            audit.record(conn, ctx, action="request_lock", outcome="busy",
                         details={"request_id": request.request_id, "kind": request.kind, "waited_seconds": waited,
                                  "holder": holder})
        raise RequestBusy(
            f"request {request.request_id} is being answered by another run right now: the request id's lock "
            f"(advisory lock {erasure.REQUEST_LOCK_CLASS}, hashtext of the request id) is held by {holder}; "
            f"waited {waited} s. This run read and wrote nothing. Let that run finish: it writes the package and "
            "records the request as completed (warehouse-gdpr requests); trigger the request again only if "
            "it ends without doing so (docs/runbook.md, 'Answer an access request')")
    try:
        conn.execute("SELECT set_config('application_name', %s, false)",
                      (f"warehouse-gdpr access {ctx.run_id}"[:63],))  # what a second run's message shows
        conn.commit()
        check_not_answered(conn, request)  # re-checked under the lock: another run may have answered meanwhile
        yield
    finally:
        _release_request_lock(conn, request.request_id)


def problems(policy: Policy) -> list[str]:
    """What the policy lacks for an answer to state what article 15(1) requires, by key; empty when complete."""
    out = []
    for i, mapped in enumerate(policy.tables):
        missing = [k for k in ("purpose", "legal_basis", "source") if not getattr(mapped, k)]
        if missing:
            out.append(f"tables[{i}] ({mapped.table}): " + ", ".join(missing) + " missing")
    if not policy.access.automated_decisions:
        out.append("access.automated_decisions missing (art. 15(1)(h): say whether decisions based solely on "
                   "automated processing, including profiling, are made with this data)")
    return out


def check_policy(policy: Policy) -> None:
    """Raise AccessError while `problems` lists anything: an answer must say why and from where we hold the data."""
    found = problems(policy)
    if found:
        raise AccessError(
            "the policy lacks what an access answer must state (art. 15(1)); nothing was read: "
            + "; ".join(found) + " (docs/policy.md, `tables` and `access`)"
        )


# -- values --------------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """A database value as JSON: dates and times in ISO 8601, decimals as exact strings, bytes in base64."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, timedelta):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def flatten(document: Any, prefix: str = "") -> dict[str, Any]:
    """A JSON document as one row of named columns: nested keys joined by '.', list items by their index."""
    if isinstance(document, dict):
        out: dict[str, Any] = {}
        for key, value in document.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: None}
    if isinstance(document, list):
        out = {}
        for i, value in enumerate(document):
            out.update(flatten(value, f"{prefix}.{i}" if prefix else str(i)))
        return out if out or not prefix else {prefix: None}
    return {prefix or "value": document}


# -- what the warehouse holds ----------------------------------------------------------------------------


@dataclass
class Section:
    """Rows of one place, with named columns (a mapped table, an archived source table, a downstream answer)."""

    key: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]


@dataclass
class Gathered:
    """What the warehouse holds on the person: live and pseudonymised rows per mapped table, decrypted archive."""

    tables: list[Section] = field(default_factory=list)
    archive: list[Section] = field(default_factory=list)
    statuses: dict[str, list[str]] = field(default_factory=dict)  # subject column -> the person's values

    def counts(self) -> dict[str, int]:
        out = {s.key: len(s.rows) for s in self.tables}
        out.update({f"archive:{s.key}": len(s.rows) for s in self.archive})
        return out


def _title(mapped: MappedTable) -> str:
    return mapped.title or mapped.table


def gather(conn: psycopg.Connection, policy: Policy, keys: Keys, located: Located) -> Gathered:
    """Every row of the person in every mapped table (one query per table, `matcher.rows`), and their archived
    originals decrypted, read in one REPEATABLE READ, READ ONLY transaction (a consistent snapshot)."""
    gathered = Gathered()
    conn.rollback()
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    try:
        # Live rows and pseudonymised ones (hashed email columns holding the keyed hash of the email).
        persons = matcher.for_person(conn, policy, located.subject_ids, located.email, located.email_hashes)
        for mapped in policy.tables:
            cur = conn.execute(
                sql.SQL("SELECT t.* FROM {t} t WHERE {m} ORDER BY t.{pk}").format(
                    t=qualified(mapped.table), m=matcher.rows(policy, mapped, persons, alias="t"),
                    pk=sql.Identifier(mapped.primary_key)),
                persons.params,
            )
            columns = [c.name for c in cur.description or ()]
            rows = [dict(zip(columns, (jsonable(v) for v in r), strict=True)) for r in cur.fetchall()]
            gathered.tables.append(Section(mapped.table, _title(mapped), columns, rows))
            if mapped.table == policy.subject.table:
                for rule in policy.rules:
                    column = rule.statuses.column
                    gathered.statuses[column] = sorted({str(r[column]) for r in rows if r.get(column) is not None})
        gathered.archive = _archived(conn, policy, keys, located.archive_ids)
    finally:
        conn.rollback()
        conn.isolation_level = None
        conn.read_only = None
    return gathered


def _archived(conn: psycopg.Connection, policy: Policy, keys: Keys, subject_ids: list[str]) -> list[Section]:
    """The person's encrypted originals in gdpr_archive.archived_row, decrypted, per source table (one query)."""
    if not subject_ids:
        return []
    rows = conn.execute(
        "SELECT source_table, source_pk, archived_at, purge_after, key_id, nonce, ciphertext"
        " FROM gdpr_archive.archived_row WHERE subject_id = ANY(%s) ORDER BY source_table, archive_id",
        (subject_ids,),
    ).fetchall()
    titles = {t.table: _title(t) for t in policy.tables}
    sections: dict[str, Section] = {}
    for table, source_pk, archived_at, purge_after, key_id, nonce, ciphertext in rows:
        original = json.loads(keys.decrypt(key_id, bytes(nonce), bytes(ciphertext),
                                           archive_aad(table, source_pk, key_id)))
        section = sections.setdefault(table, Section(
            table, f"{titles.get(table, table)}: archived originals", ["archived_at", "destroyed_after"], []))
        for column in original:
            if column not in section.columns:
                section.columns.append(column)
        section.rows.append({"archived_at": jsonable(archived_at), "destroyed_after": jsonable(purge_after),
                             **{k: jsonable(v) for k, v in original.items()}})
    return list(sections.values())


# -- what the downstream systems hold ------------------------------------------------------------------------


@dataclass
class Answer:
    """What one downstream target holds on the person."""

    target: str
    status: str  # "holds data", "holds nothing", "not exported: ...", "not asked: ..."
    sections: list[Section] = field(default_factory=list)
    document: Any = None  # an HTTP target's JSON answer, as it came

    def rows(self) -> int:
        return sum(len(s.rows) for s in self.sections)


def access_endpoint(target: HttpTarget) -> str | None:
    from .propagation import PRESETS

    return target.access_endpoint or PRESETS.get(target.preset or "", {}).get("access_endpoint")


def exportable(target: HttpTarget | SqlTarget) -> bool:
    return bool(access_endpoint(target)) if isinstance(target, HttpTarget) else bool(target.access)


def http_targets_to_preflight(policy: Policy) -> list[str]:
    """The HTTP targets an access request asks (each needs a passed preflight in the run first)."""
    return [t.name for t in policy.erasure.targets if isinstance(t, HttpTarget) and exportable(t)]


def _export_http(target: HttpTarget, identifier: str, transport: Transport, preflight_passed: bool) -> Answer:
    from .propagation import ERROR_KEYS, NOT_JSON, endpoint_path, holds_values, http_contract, json_document

    endpoint = access_endpoint(target)
    assert endpoint is not None
    if not preflight_passed:
        raise ExportMisconfigured(
            f"target {target.name} has no passed preflight in this run: nothing was asked of it (see the "
            "preflight task's log; runbook: 'A preflight fails')")
    contract = http_contract(target)
    try:
        answer = transport.http(target.connection_id)("GET", endpoint_path(endpoint, identifier),
                                                       deadline_seconds=contract.timeout_seconds)
    except ConnectionNotUsable as exc:
        raise ExportMisconfigured(f"target {target.name}: {exc}") from None
    except TransportError as exc:
        raise ExportFailed(f"target {target.name}: {exc}") from None
    status = answer.status
    where = f"target {target.name}: GET {endpoint} answered HTTP {status}"
    if 200 <= status <= 299:
        document = json_document(answer.body)
        if document is NOT_JSON or not isinstance(document, (dict, list)):
            raise ExportMisconfigured(f"{where} with an answer that is not a JSON object (wrong endpoint?)")
        if isinstance(document, dict) and any(document.get(k) not in (None, False, "", [], {}) for k in ERROR_KEYS):
            raise ExportMisconfigured(f"{where} with an error in the body")
        records = document if isinstance(document, list) else [document]
        rows = [flatten(r) for r in records]
        columns = list(dict.fromkeys(c for r in rows for c in r))
        return Answer(target.name, "holds data" if rows else "holds nothing",
                      [Section(f"{target.name}", target.name, columns, rows)], document)
    if status == 404:
        if contract.not_found_body and not holds_values(json_document(answer.body), contract.not_found_body):
            raise ExportMisconfigured(f"{where} that is not the API's not-found answer (wrong endpoint?)")
        return Answer(target.name, "holds nothing", [Section(target.name, target.name, [], [])], None)
    if 300 <= status <= 399:
        raise ExportMisconfigured(f"{where} (a redirect, not followed)")
    if status in (401, 403):
        raise ExportMisconfigured(f"{where} (credentials refused)")
    if status in (408, 429) or status >= 500:
        raise ExportFailed(where)
    raise ExportMisconfigured(where)


def _export_sql(target: SqlTarget, identifier: str, transport: Transport) -> Answer:
    try:
        results = transport.sql_read(target.connection_id)(
            target.access, {"identifier": identifier}, max_rows=MAX_ROWS_PER_QUERY,
            deadline_seconds=float(target.timeout_seconds))
    except ConnectionNotUsable as exc:
        raise ExportMisconfigured(f"target {target.name}: {exc}") from None
    except TransportError as exc:
        raise ExportFailed(f"target {target.name}: {exc}") from None
    sections = []
    for name in target.access:
        result = results[name]
        columns = list(result.columns)
        sections.append(Section(f"{target.name}.{name}", name, columns,
                                [dict(zip(columns, (jsonable(v) for v in row), strict=True)) for row in result.rows]))
    held = any(s.rows for s in sections)
    return Answer(target.name, "holds data" if held else "holds nothing", sections)


def export(policy: Policy, identifier: str | None, transport: Transport, preflights: set[str]) -> list[Answer]:
    """What each downstream target holds on the person (`identifier`: their normalised email). `preflights`:
    the HTTP targets whose preflight passed in this run. Raises ExportFailed / ExportMisconfigured when one
    gives no usable answer: an answer that leaves a system out is never written."""
    answers = []
    for target in policy.erasure.targets:
        if not exportable(target):
            answers.append(Answer(target.name, "not exported: the policy declares no access call for it"))
        elif identifier is None:
            answers.append(Answer(target.name, "not asked: no email is known for the person"))
        elif isinstance(target, HttpTarget):
            answers.append(_export_http(target, identifier, transport, target.name in preflights))
        else:
            answers.append(_export_sql(target, identifier, transport))
    return answers


# -- what article 15(1) asks, and the document --------------------------------------------------------------


def _retention(policy: Policy, mapped: MappedTable, statuses: dict[str, list[str]]) -> list[str]:
    """The retention that applies to the person's data in this table, in words: the rules of their status
    (register.describe_rule) and the holds suspending them, the table's own `retention`, its archive."""
    from .register import describe_rule, humanise

    lines = []
    for rule in policy.rules:
        if set(statuses.get(rule.statuses.column, [])) & set(rule.statuses.values):
            lines.append(describe_rule(policy, rule))
            lines += [f"Suspended while {h.name} applies: {h.description}" for h in policy.holds
                      if rule.action in h.blocks and h.description]
    if mapped.retention:
        lines.append(mapped.retention)
    archive = mapped.archive  # a legal obligation to keep the originals of this table
    if archive is not None:
        start = f" after its {archive.from_.replace('_', ' ')} date" if archive.from_ else ""
        lines.append(f"When your record is pseudonymised, the originals of this table are kept encrypted for "
                     f"{humanise(archive.for_)}{start} as required by {archive.obligation}, then destroyed")
    if not any(set(statuses.get(r.statuses.column, [])) & set(r.statuses.values) for r in policy.rules):
        now_ = "; ".join(f"{column} {', '.join(values)}" for column, values in statuses.items() if values)
        lines.insert(0, f"No retention period runs for your record as it is now ({now_ or 'no record'}): the data "
                        f"is kept while your record in {policy.subject.table} is, and a retention rule applies when "
                        "it changes")
    return lines


def information(policy: Policy) -> dict[str, Any]:
    """The controller, the recipients (internal teams, and each downstream target with the processor the
    register names for it), transfers, the rights and the right to complain: from the policy."""
    register = policy.processing_register
    controller = register.controller.model_dump() if register is not None else {}
    recipients: list[dict[str, str]] = []
    transfers: list[str] = []
    processors: dict[str, str] = {}
    for activity in (register.activities if register is not None else []):
        for r in activity.recipients:
            recipients.append({"name": r.name, "detail": r.access or "internal recipient"})
        for p in activity.processors:
            for name in p.targets:
                processors[name] = f"{p.name}, {p.service} ({p.country})" if p.country else f"{p.name}, {p.service}"
        for t in activity.transfers:
            mechanism = (t.mechanism or "").replace("_", " ")
            safeguards = f", {t.safeguards}" if t.safeguards else ""
            transfers.append(f"{t.recipient} ({t.country}): {mechanism}{safeguards}")
    for target in policy.erasure.targets:
        recipients.append({"name": processors.get(target.name, target.name),
                           "detail": f"processes your data on our behalf (our {target.name} service)"})
    unique = list({(r["name"], r["detail"]): r for r in recipients}.values())
    contact = controller.get("contact") or controller.get("name") or "us"
    return {"controller": controller, "recipients": unique, "transfers": list(dict.fromkeys(transfers)),
            "rights": f"{RIGHTS} Write to {contact}.", "complaint": policy.access.complaint,
            "automated_decisions": policy.access.automated_decisions or "",
            "targets": {t.name: processors.get(t.name, t.name) for t in policy.erasure.targets}}


def _as_json(section: Section, columns: list[str] | None = None) -> dict[str, Any]:
    columns = section.columns if columns is None else columns
    return {"columns": columns, "rows": [{c: r.get(c) for c in columns} for r in section.rows]}


def build_document(policy: Policy, request: AccessRequest, gathered: Gathered, answers: list[Answer],
                   generated_at: datetime) -> dict[str, Any]:
    """`data.json`: everything, labelled. With portability, only the mapped tables' provided columns."""
    head = {"request_id": request.request_id, "kind": request.kind, "received_at": request.received_at.isoformat(),
            "generated_at": generated_at.isoformat(timespec="seconds")}
    mapped = {t.table: t for t in policy.tables}
    if request.portability:
        tables = []
        for section in gathered.tables:
            provided = [c for c in section.columns if c in mapped[section.key].columns
                        and mapped[section.key].columns[c].provided]
            if provided:
                tables.append({"table": section.key, "title": section.title, **_as_json(section, provided)})
        return {"request": head, "warehouse": tables}
    warehouse = []
    for section in gathered.tables:
        m = mapped[section.key]
        warehouse.append({
            "table": section.key, "title": section.title, "purpose": m.purpose,
            "legal_basis": LEGAL_BASES.get(m.legal_basis or "", m.legal_basis or ""), "source": m.source,
            "retention": _retention(policy, m, gathered.statuses), **_as_json(section)})
    info = information(policy)
    names = info.pop("targets")
    downstream = [{
        "target": a.target, "recipient": names.get(a.target, a.target), "status": a.status,
        "sections": [{"name": s.title, **_as_json(s)} for s in a.sections if a.status == "holds data"],
        **({"answer": jsonable(a.document)} if a.document is not None else {}),
    } for a in answers]
    return {
        "request": head, "about": info, "warehouse": warehouse,
        "archive": [{"table": s.key, "title": s.title, **_as_json(s)} for s in gathered.archive],
        "downstream": downstream,
    }


def _csv(columns: list[str], rows: list[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:  # JSON's spelling for what CSV has none of: true/false, nested values
        writer.writerow(["" if row.get(c) is None else
                         json.dumps(row[c], ensure_ascii=False) if isinstance(row.get(c), (bool, dict, list))
                         else row[c] for c in columns])
    return out.getvalue().encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def row_counts(document: dict[str, Any]) -> dict[str, int]:
    """Rows per section of a document (the manifest's and the XCom's counts): no personal data."""
    counts = {t["table"]: len(t["rows"]) for t in document["warehouse"]}
    counts.update({f"archive:{t['table']}": len(t["rows"]) for t in document.get("archive", [])})
    for answer in document.get("downstream", []):
        counts[f"downstream:{answer['target']}"] = sum(len(s["rows"]) for s in answer["sections"])
    return counts


def package_files(document: dict[str, Any], render_pdf: bool = True) -> dict[str, bytes]:
    """The package's files: report.pdf (unless portability), data.json, csv/<section>.csv, manifest.json."""
    files: dict[str, bytes] = {}
    if render_pdf and document["request"]["kind"] == "access":
        from . import access_pdf

        files["report.pdf"] = access_pdf.render(document)
    files["data.json"] = json.dumps(document, ensure_ascii=False, indent=2).encode("utf-8")
    for table in document["warehouse"]:
        files[f"csv/{table['table']}.csv"] = _csv(table["columns"], table["rows"])
    for table in document.get("archive", []):
        files[f"csv/archive.{table['table']}.csv"] = _csv(table["columns"], table["rows"])
    for answer in document.get("downstream", []):
        for section in answer["sections"]:
            name = answer["target"] if section["name"] == answer["target"] else f"{answer['target']}.{section['name']}"
            files[f"csv/downstream.{name}.csv"] = _csv(section["columns"], section["rows"])
    manifest = {
        "request_id": document["request"]["request_id"], "kind": document["request"]["kind"],
        "generated_at": document["request"]["generated_at"],
        "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()},
        "rows": row_counts(document),
    }
    files["manifest.json"] = json.dumps(manifest, indent=2).encode("utf-8")
    return files


# -- the encrypted package ---------------------------------------------------------------------------------------


def package_name(request_id: str) -> str:
    return f"{request_id}{PACKAGE_SUFFIX}"


def _aad(header: bytes) -> bytes:
    return b"access-package|" + header


def seal(files: dict[str, bytes], keys: Keys, request_id: str, kind: str, created_at: datetime,
         expires_at: datetime) -> bytes:
    """The files zipped, then encrypted under the active archive key (to its public key: hybrid, so that
    unpacking needs the archive's private connection; or AES-256-GCM with the symmetric key of the earlier
    layout). Layout: MAGIC, one line of JSON header (request id, kind, key id, created and expiry instants;
    also the associated data, so it cannot be altered or swapped), the 12-byte nonce, the ciphertext (for a
    public key, the ephemeral public key first)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, files[name])
    header = json.dumps({
        "format": 1, "request_id": request_id, "kind": kind, "key_id": keys.archive_key_id,
        "created_at": created_at.isoformat(timespec="seconds"), "expires_at": expires_at.isoformat(timespec="seconds"),
    }, sort_keys=True, separators=(",", ":")).encode()
    key_id, nonce, ciphertext = keys.archive_encrypt(buffer.getvalue(), _aad(header))
    assert key_id == keys.archive_key_id
    return MAGIC + header + b"\n" + nonce + ciphertext


def read_header(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, its raw bytes) of a package, or PackageError when `data` does not start like one."""
    if not data.startswith(MAGIC):
        raise PackageError("not an access package (it does not start with the package signature)")
    end = data.find(b"\n", len(MAGIC))
    if end < 0 or end - len(MAGIC) > HEADER_MAX:
        raise PackageError("not an access package (no header line)")
    raw = data[len(MAGIC):end]
    try:
        header = json.loads(raw)
    except ValueError:
        raise PackageError("not an access package (its header is not JSON)") from None
    if not isinstance(header, dict) or header.get("format") != 1:
        raise PackageError("an access package of an unknown format")
    return header, raw


SAFE_MEMBER = re.compile(r"^(report\.pdf|data\.json|manifest\.json|csv/[A-Za-z0-9_.:-]+\.csv)$")


def unseal(data: bytes, keys: Keys) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(header, files) of a package: decrypted, unzipped, each file checked against the manifest's SHA-256."""
    from cryptography.exceptions import InvalidTag

    header, raw = read_header(data)
    body = data[len(MAGIC) + len(raw) + 1:]
    try:
        plain = keys.decrypt(str(header.get("key_id")), body[:12], body[12:], _aad(raw))
    except InvalidTag:
        raise PackageError(
            f"package of request {header.get('request_id')} does not decrypt: altered, or encrypted under "
            f"another key listed as {header.get('key_id')!r}") from None
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(io.BytesIO(plain)) as archive:
        for name in archive.namelist():
            if not SAFE_MEMBER.fullmatch(name):
                raise PackageError(f"package of request {header.get('request_id')} holds an unexpected file name")
            files[name] = archive.read(name)
    manifest = json.loads(files.get("manifest.json", b"{}"))
    for name, entry in manifest.get("files", {}).items():
        if name not in files or _sha256(files[name]) != entry.get("sha256"):
            raise PackageError(f"package of request {header.get('request_id')}: {name} does not match its manifest")
    return header, files


@dataclass
class Written:
    """Where a package went: no personal data (the XCom of the DAG's last task)."""

    request_id: str
    kind: str
    location: str
    sha256: str
    bytes: int
    key_id: str
    expires_at: str
    rows: dict[str, int]
    files: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def expiry(created_at: datetime, keep_for: str) -> datetime:
    """`created_at` plus an ISO 8601 duration of the policy (years and months as calendar months)."""
    match = DURATION.fullmatch(keep_for)
    assert match is not None
    years, months, weeks, days = (int(n) if n else 0 for n in match.groups())
    index = created_at.month - 1 + 12 * years + months
    year, month = created_at.year + index // 12, index % 12 + 1
    moved = created_at.replace(year=year, month=month, day=min(created_at.day, calendar.monthrange(year, month)[1]))
    return moved + timedelta(weeks=weeks, days=days)


def store(packages: PackageStore, keys: Keys, policy: Policy, document: dict[str, Any],
          files: dict[str, bytes], created_at: datetime) -> Written:
    """Seal the files and write them as `<request_id>.wgdpr` (replacing an earlier package of the request)."""
    request = document["request"]
    expires_at = expiry(created_at, policy.access.keep_for)
    data = seal(files, keys, request["request_id"], request["kind"], created_at, expires_at)
    location = packages.write(package_name(request["request_id"]), data)
    return Written(request["request_id"], request["kind"], location, _sha256(data), len(data), keys.archive_key_id,
                   expires_at.isoformat(timespec="seconds"), row_counts(document), sorted(files))


def open_package(packages: PackageStore, keys: Keys, request_id: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The decrypted files of a request's package (`warehouse-gdpr access unpack`)."""
    if not re.fullmatch(erasure.REQUEST_ID_PATTERN, request_id):
        raise PackageError("the request id must be 3-64 characters: letters, digits, '.', '_', ':' or '-'")
    try:
        data = packages.read(package_name(request_id))
    except StoreError as exc:
        raise PackageError(f"{exc} (never written, or purged after access.keep_for)") from None
    header, files = unseal(data, keys)
    if header.get("request_id") != request_id:
        raise PackageError(f"the package stored for request {request_id} is another request's")
    return header, files


def purge(conn: psycopg.Connection, packages: PackageStore, ctx: RunContext, as_of: datetime) -> dict[str, int]:
    """Delete the packages whose expiry (their header's `expires_at`) is not after `as_of`; one audit row per
    package (request id, kind, expiry). A dry run counts and audits only. Files that are not packages are left
    alone and counted."""
    result = {"purged": 0, "kept": 0, "not_packages": 0}
    for name in packages.names():
        if not name.endswith(PACKAGE_SUFFIX):
            result["not_packages"] += 1
            continue
        try:
            header, _ = read_header(packages.read(name, len(MAGIC) + HEADER_MAX + 1))
            expires = datetime.fromisoformat(str(header["expires_at"]))
        except (PackageError, KeyError, ValueError):
            result["not_packages"] += 1
            continue
        if expires > as_of:
            result["kept"] += 1
            continue
        if not ctx.dry_run:
            packages.delete(name)
        with conn.transaction():
            audit.record(conn, ctx, action="purge_access_package", outcome="dry_run" if ctx.dry_run else "done",
                         table="access_package", row_count=1,
                         details={"request_id": header.get("request_id"), "kind": header.get("kind"),
                                  "expires_at": header["expires_at"]})
        result["purged"] += 1
    if not result["purged"]:
        with conn.transaction():
            audit.record(conn, ctx, action="purge_access_package", outcome="nothing_to_purge", table="access_package",
                         details={"kept": result["kept"]})
    return result


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


# -- one request, end to end -----------------------------------------------------------------------------------


@dataclass
class Answered:
    """The result of one access request: no personal data (counts, statuses, the package's location)."""

    request_id: str
    kind: str
    subject_hash: str
    outcome: str  # "answered" (something is held), "not_found" (nothing is: the package says so), "dry_run"
    rows: dict[str, int]
    downstream: dict[str, str]
    written: Written | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # "db", "downstream", "pdf", "package"

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "written"}
        if self.written is not None:
            out.update(location=self.written.location, sha256=self.written.sha256, bytes=self.written.bytes,
                       key_id=self.written.key_id, expires_at=self.written.expires_at, files=self.written.files)
        return out


def answer(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, request: AccessRequest,
           transport: Transport, packages: PackageStore | None, preflights: set[str],
           located: Located | None = None) -> Answered:
    """Locate, gather, ask the downstream systems, build, seal and store the package, audit. A dry run reads
    and counts, writes no package and audits one row. Anything else runs holding the request id's lock
    (`answering`): RequestError when another run answered it meanwhile, RequestBusy while another run still
    answers it; this run then read and wrote nothing."""
    check_policy(policy)
    check_not_answered(conn, request)
    if request.dry_run:  # reads and counts only: no lock
        return _answer(conn, policy, keys, ctx, request, transport, packages, preflights, located)
    with answering(conn, ctx, request):  # one run per request id: lock, then check again
        return _answer(conn, policy, keys, ctx, request, transport, packages, preflights, located)


def _answer(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, request: AccessRequest,
            transport: Transport, packages: PackageStore | None, preflights: set[str],
            located: Located | None) -> Answered:
    started = clock.perf_counter()
    located = located or erasure.locate(conn, policy, keys, request.base)
    gathered = gather(conn, policy, keys, located)
    seconds = {"db": clock.perf_counter() - started}
    started = clock.perf_counter()
    # A portability answer holds the mapped tables' provided columns only: the downstream systems are not asked.
    answers = [] if request.dry_run or request.portability else export(policy, located.email, transport, preflights)
    seconds["downstream"] = clock.perf_counter() - started
    rows = gathered.counts()
    rows.update({f"downstream:{a.target}": a.rows() for a in answers})
    held = any(rows.values())
    result = Answered(request.request_id, request.kind, located.subject_hash,
                      "dry_run" if request.dry_run else "answered" if held else "not_found", rows,
                      {a.target: a.status for a in answers})
    if not request.dry_run:
        if packages is None:
            raise AccessError("no package store: give the policy's access.location")
        generated_at = now()
        document = build_document(policy, request, gathered, answers, generated_at)
        started = clock.perf_counter()
        files = package_files(document)
        seconds["pdf"] = clock.perf_counter() - started if "report.pdf" in files else 0.0
        started = clock.perf_counter()
        result.written = store(packages, keys, policy, document, files, generated_at)
        seconds["package"] = clock.perf_counter() - started
        del document, files
    result.seconds = {k: round(v, 4) for k, v in seconds.items()}
    with conn.transaction():
        if not request.dry_run:
            record(conn, ctx, request, result)
        audit.record(conn, ctx, action="access_request", outcome=result.outcome, subject_hash=located.subject_hash,
                     row_count=sum(rows.values()),
                     details={"request_id": request.request_id, "kind": request.kind, "rows": rows,
                              "downstream": result.downstream,
                              **({"location": result.written.location, "sha256": result.written.sha256,
                                  "expires_at": result.written.expires_at} if result.written else {})})
    return result


def record(conn: psycopg.Connection, ctx: RunContext, request: AccessRequest, result: Answered) -> None:
    """Record the request as completed in gdpr.request (the registered row, else a new one) with the evidence
    kept (counts, downstream statuses, the package's location, SHA-256, key id and expiry; no personal data),
    and destroy a registered request's encrypted identifier. In the caller's transaction; a second run of the
    same request id, recorded meanwhile, is refused (RequestError) and rolls it back."""
    from psycopg.types.json import Jsonb

    from . import requests

    erasure.lock_request_id(conn, request.request_id)
    assert result.written is not None
    details = Jsonb({"rows": result.rows, "downstream": result.downstream,
                     "package": {"location": result.written.location, "sha256": result.written.sha256,
                                 "key_id": result.written.key_id, "expires_at": result.written.expires_at,
                                 "files": result.written.files}})
    updated = conn.execute(
        "UPDATE gdpr.request SET status = 'completed', outcome = %s, completed_at = now(), details = details || %s"
        " WHERE request_id = %s AND kind = %s AND completed_at IS NULL RETURNING request_id",
        (result.outcome, details, request.request_id, request.kind),
    ).fetchone()
    if updated is None:
        inserted = conn.execute(
            "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome,"
            " completed_at, details) VALUES (%s, %s, %s, %s, %s, 'completed', %s, now(), %s)"
            " ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
            (request.request_id, request.kind, result.subject_hash, request.received_at, request.base.first_due_date,
             result.outcome, details),
        ).fetchone()
        if inserted is None:
            raise RequestError(f"request {request.request_id} was recorded by another run meanwhile: nothing was "
                               "changed by this one")
    requests.destroy_identifier(conn, ctx, request.request_id)
