"""Subject erasure on request (GDPR art. 17): validate, locate, evaluate holds, erase, verify, certify.

The person's rows in each mapped table are those `matcher.rows` selects: linked to one of their
subject rows, or carrying their email in an `email_columns` column, compared as
``lower(btrim(column)) = normalised email``: index that expression on the subject's email column and
on every `email_columns` entry (demo/warehouse_gdpr_demo/sql/demo_crm.sql does). The sweep and the
opt-out guard use the same definition. A person the sweep pseudonymised is found the same way by the keyed hashes of
their email in hashed email columns (`email_hashes`), and their encrypted originals in gdpr_archive by
subject id: those no legal obligation keeps are destroyed with the rest, the others are kept and the
outcome says until when.

The email is only ever held in memory by the task that needs it (read from the run's params); logs,
audit rows, XComs and exceptions refer to the person by `subject_hash` (HMAC of the normalised email)
or by internal ids. Every statement is set-based over the subject's ids and identity values, and
uses the indexes on the join and email columns.

Lock order (the same for every writer of the engine, see sweep.py): `erase` first locks the
subject rows, ``FOR UPDATE`` in primary-key order in one statement (the located subjects and the
subjects of rows found by email in other tables), then deletes the dependent rows in
`Policy.dependent_tables` order, and changes the subject rows last. A retention sweep working on
the same person therefore waits for the erasure, or the erasure for the sweep, never both.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

import psycopg
from psycopg import sql

from . import audit, matcher
from .audit import RunContext
from .candidates import holds_array, qualified
from .crypto import Keys, normalise_email
from .errors import ConfigurationError
from .policy import Policy

# ASCII only on purpose: a Unicode look-alike (Cyrillic "а" in "pаul@…") is refused, not matched.
EMAIL_PATTERN = (
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
EMAIL_MAX_LENGTH = 254
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{2,63}$"
# The params of gdpr_subject_erasure: any other key (a typo such as `emial`) is refused.
PARAMS = ("email", "subject_id", "request_id", "received_at", "dry_run")
SAFE_PARAM_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,39}"  # an unknown key is named in the error only if it looks like one
# A request received longer ago than this is refused as a likely typo (1900, last year instead of this
# one); one received more than a month ago is accepted, already overdue (the first task says so).
MAX_RECEIVED_AGE_DAYS = 365


class RequestError(ConfigurationError, ValueError):
    """The erasure request is malformed. The message names the field, never the value of an email."""


@dataclass(frozen=True, repr=False)
class ErasureRequest:
    request_id: str
    email: str | None
    subject_id: int | None
    received_at: date
    dry_run: bool = False
    # A registered request extended with `warehouse-gdpr request extend` (art. 12(3)): its new due date.
    extended_due_date: date | None = None

    def __repr__(self) -> str:  # never print the email
        return f"ErasureRequest(request_id={self.request_id!r}, by={'email' if self.email else 'subject_id'})"

    @property
    def first_due_date(self) -> date:
        """One calendar month after receipt (GDPR art. 12(3)); the 31st falls back to the month's last day."""
        year, month = (self.received_at.year + 1, 1) if self.received_at.month == 12 else (
            self.received_at.year, self.received_at.month + 1)
        return date(year, month, min(self.received_at.day, calendar.monthrange(year, month)[1]))

    @property
    def due_date(self) -> date:
        """The date the answer is due: the extended one when the request was extended, else the first."""
        return self.extended_due_date or self.first_due_date


def refuse_unknown_params(params: Mapping[str, Any], allowed: tuple[str, ...] = PARAMS) -> None:
    """Refuse a param this DAG does not take (a typo such as `emial`), naming it only if it looks like a name.
    Checked first, before a registered request is looked up by its id (a typo is named as such). `allowed`:
    the params of the DAG (default: gdpr_subject_erasure's)."""
    unknown = sorted(str(k) for k in params if k not in allowed)
    if unknown:
        shown = [f"`{k}`" for k in unknown if re.fullmatch(SAFE_PARAM_NAME, k)]
        hidden = len(unknown) - len(shown)
        names = ", ".join(shown + ([f"{hidden} other(s) (name not shown)"] if hidden else []))
        raise RequestError(
            f"unknown param(s) {names}: this DAG takes only "
            + ", ".join(f"`{n}`" for n in allowed) + " (check the spelling; nothing was changed)"
        )


def parse_request(params: Mapping[str, Any], today: date | None = None) -> ErasureRequest:
    """Check a trigger's params: the DAG's first task calls this before anything is read or written.

    The trigger form only checks types (a Param pattern or format would echo a refused value, e.g. an
    email, in Airflow's error), so every rule is checked here. A message names the param and the rule
    it broke, never a refused value. The email is normalised: surrounding whitespace (spaces, tabs,
    a trailing newline) dropped, lower case; what is left must be a plain ASCII address.
    """
    today = today or date.today()
    refuse_unknown_params(params)
    email, subject_id = identity(params)
    request_id = params.get("request_id")
    if not isinstance(request_id, str) or not re.fullmatch(REQUEST_ID_PATTERN, request_id):
        raise RequestError("`request_id` must be 3-64 characters: letters, digits, '.', '_', ':' or '-'")
    received_at = received_date(params, today)
    dry_run = params.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise RequestError("`dry_run` must be true or false")
    return ErasureRequest(request_id, email, subject_id, received_at, dry_run)


def identity(params: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """(normalised email, subject id): exactly one of them, each valid."""
    email = params.get("email")
    if email is not None and not isinstance(email, str):
        raise RequestError("`email` must be text")
    if email is not None:
        email = email.strip() or None  # blank is "not given"
    subject_id = params.get("subject_id")
    if (email is None) == (subject_id is None):
        raise RequestError("give exactly one of `email` or `subject_id`")
    if email is not None:
        if len(email) > EMAIL_MAX_LENGTH or not re.fullmatch(EMAIL_PATTERN, email):
            raise RequestError(
                "`email` is not a plain ASCII address of at most 254 characters (look-alike characters are refused)"
            )
        email = email.lower()
    if subject_id is not None and (not isinstance(subject_id, int) or isinstance(subject_id, bool) or subject_id < 1):
        raise RequestError("`subject_id` must be a positive integer")
    return email, subject_id


def received_date(params: Mapping[str, Any], today: date) -> date:
    """The date the request arrived (default today): not in the future, nor more than a year ago."""
    received = params.get("received_at") or today.isoformat()
    if not isinstance(received, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", received.strip()):
        raise RequestError("`received_at` must be a date, YYYY-MM-DD")
    try:
        received_at = date.fromisoformat(received.strip())
    except ValueError:
        raise RequestError("`received_at` must be a date, YYYY-MM-DD") from None
    if received_at > today:
        raise RequestError("`received_at` is in the future")
    if received_at < today - timedelta(days=MAX_RECEIVED_AGE_DAYS):
        raise RequestError(
            f"`received_at` is more than {MAX_RECEIVED_AGE_DAYS} days before today: refused as a likely typo "
            "(runbook: 'Trigger an erasure')"
        )
    return received_at


@dataclass(frozen=True)
class ArchivedRows:
    """The person's encrypted originals in gdpr_archive from one source table. `obligation` is the legal
    obligation that keeps them (`tables[].archive`) and `until` their latest purge date; without an
    obligation (a table the policy no longer archives, or a purge date passed) an erasure destroys them."""

    source_table: str
    rows: int
    obligation: str | None
    until: date | None

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.source_table, "rows": self.rows, "obligation": self.obligation,
                "until": self.until.isoformat() if self.until else None}


@dataclass(repr=False)
class Located:
    """Where the person is. `email` stays in memory only (repr hides it)."""

    subject_ids: list[Any]
    subject_hash: str
    email: str | None
    rows: dict[str, int] = field(default_factory=dict)
    # Every keyed hash the person's email may have in a hashed email column (pseudonymised rows).
    email_hashes: list[str] = field(default_factory=list)
    archive: list[ArchivedRows] = field(default_factory=list)
    # The subject ids the archive was searched by (text, as gdpr_archive stores them): the found subjects,
    # and the requested subject id even when its live row is gone.
    archive_ids: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Located(subjects={len(self.subject_ids)}, rows={self.rows}, archive={self.archive})"

    @property
    def found(self) -> bool:
        return bool(self.subject_ids) or any(self.rows.values()) or bool(self.archive)

    @property
    def kept_archive(self) -> list[ArchivedRows]:
        """Archived originals a legal obligation keeps: an erasure leaves them and says until when."""
        return [a for a in self.archive if a.obligation]


def locate(conn: psycopg.Connection, policy: Policy, keys: Keys, request: ErasureRequest) -> Located:
    """Find the subject rows and count every linked row, per mapped table (indexed lookups only)."""
    subject = policy.subject
    table, pk = qualified(subject.table), sql.Identifier(subject.primary_key)
    email_col = sql.Identifier(subject.email_column)
    if request.email is not None:
        email: str | None = normalise_email(request.email)
        ids = [r[0] for r in conn.execute(
            sql.SQL("SELECT {pk} FROM {t} WHERE lower(btrim({e})) = %s ORDER BY 1").format(pk=pk, t=table, e=email_col),
            (email,),
        ).fetchall()]
    else:
        row = conn.execute(
            sql.SQL("SELECT {pk}, {e} FROM {t} WHERE {pk} = %s").format(pk=pk, t=table, e=email_col),
            (request.subject_id,),
        ).fetchone()
        ids = [row[0]] if row else []
        email = normalise_email(row[1]) if row and row[1] and "@" in row[1] else None
    # The same normalisation as the opt-out list (policy optout.strip_plus_tags): both must agree.
    subject_hash = (keys.subject_hash(email, policy.optout.strip_plus_tags) if email
                    else keys.hash_value(f"subject-id:{request.subject_id}"))
    hashes = email_hashes(policy, keys, email) if email else []
    if hashes:  # a pseudonymised subject: its email column holds the keyed hash
        ids = sorted(set(ids) | set(_hashed_subject_ids(conn, policy, hashes)))
    located = Located(ids, subject_hash, email, email_hashes=hashes)
    persons = matcher.for_person(conn, policy, ids, email, hashes)
    for mapped in policy.tables:
        if mapped.table == subject.table:
            located.rows[mapped.table] = len(ids)
            continue
        count = conn.execute(
            sql.SQL("SELECT count(*) FROM {t} WHERE {m}").format(
                t=qualified(mapped.table), m=matcher.rows(policy, mapped, persons)),
            persons.params,
        ).fetchone()[0]  # type: ignore[index]
        located.rows[mapped.table] = int(count)
    located.archive_ids = sorted({str(i) for i in ids} | (
        set() if request.subject_id is None else {str(request.subject_id)}))
    located.archive = _archived(conn, policy, located.archive_ids)
    conn.rollback()
    return located


def email_hashes(policy: Policy, keys: Keys, email: str) -> list[str]:
    """Every value a hashed email column may hold for `email`: its subject hash under each key id (the
    pepper may have rotated since the row was pseudonymised), the plus-tag-folded form when the policy
    folds them, and the hash of the normalised email under each pepper alone (rows pseudonymised before
    email columns were hashed as subject hashes)."""
    found = list(keys.subject_hashes(email).values())
    if policy.optout.strip_plus_tags:
        found += keys.subject_hashes(email, True).values()
    found += keys.unchained_hashes(normalise_email(email))
    return list(dict.fromkeys(found))


def _hashed_subject_ids(conn: psycopg.Connection, policy: Policy, hashes: list[str]) -> list[Any]:
    """Subject ids whose email column holds one of `hashes` (pseudonymised subjects); the same indexed
    expression as the clear lookup (a hash is lower-case hex without blanks)."""
    subject = policy.subject
    if subject.email_column not in policy.hashed_email_columns(policy.subject_mapping):
        return []
    return [r[0] for r in conn.execute(
        sql.SQL("SELECT {pk} FROM {t} WHERE lower(btrim({e})) = ANY(%s)").format(
            pk=sql.Identifier(subject.primary_key), t=qualified(subject.table), e=sql.Identifier(subject.email_column)),
        (hashes,),
    ).fetchall()]


def _archived(conn: psycopg.Connection, policy: Policy, subject_ids: list[str]) -> list[ArchivedRows]:
    """The person's archived originals per source table, split into those a legal obligation of the policy
    keeps (table with `archive`, purge date ahead) and the others."""
    if not subject_ids:
        return []
    obligations = {t.table: t.archive.obligation for t in policy.tables if t.archive}
    rows = conn.execute(
        "SELECT source_table, purge_after > now(), count(*), max(purge_after)::date FROM gdpr_archive.archived_row"
        " WHERE subject_id = ANY(%s) GROUP BY 1, 2",
        (subject_ids,),
    ).fetchall()
    groups: dict[tuple[str, str | None], list[Any]] = {}
    for table, ahead, count, until in rows:
        obligation = obligations.get(table) if ahead else None
        group = groups.setdefault((table, obligation), [0, None])
        group[0] += count
        group[1] = until if obligation else None
    return [ArchivedRows(t, n, o, u)
            for (t, o), (n, u) in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] or ""))]


def holds_in_force(conn: psycopg.Connection, policy: Policy, located: Located, as_of: str) -> dict[str, str]:
    """{hold name: 'refuse' | 'restrict'} for every hold in force for one of the subject rows (as the sweep
    and the resurrection guard see them: `candidates.holds_array`). Reads only, then ends the transaction:
    what the first task shows; `erase` evaluates them again under its row locks."""
    holds = _holds_now(conn, policy, located.subject_ids, as_of)
    conn.rollback()
    return holds


def _holds_now(conn: psycopg.Connection, policy: Policy, subject_ids: list[Any], as_of: str) -> dict[str, str]:
    """The holds in force for `subject_ids`, in the caller's transaction."""
    if not subject_ids or not policy.holds:
        return {}
    row = conn.execute(
        sql.SQL(
            "SELECT array_agg(DISTINCT h)"
            " FROM {t} s CROSS JOIN LATERAL unnest({holds}) h WHERE s.{pk} = ANY(%(ids)s)"
        ).format(t=qualified(policy.subject.table), holds=holds_array(policy.holds),
                 pk=sql.Identifier(policy.subject.primary_key)),
        {"ids": subject_ids, "as_of": as_of},
    ).fetchone()
    names = (row[0] if row else None) or []
    return {h.name: h.on_erasure for h in policy.holds if h.name in names}


def decide(located: Located, holds: dict[str, str]) -> tuple[str, str]:
    """(outcome, reason): erased, restricted (kept_when_held tables kept), refused, or not_found."""
    if not located.found:
        return "not_found", "nothing of the subject is held: no live, pseudonymised or archived row"
    refusing = sorted(n for n, how in holds.items() if how == "refuse")
    if refusing:
        return "refused", "legal hold: " + ", ".join(refusing)
    reasons = []
    if holds:
        reasons.append("legal hold: " + ", ".join(sorted(holds)) + "; held records kept and restricted")
    if located.kept_archive:
        reasons.append("archived originals kept by legal obligation: " + "; ".join(
            f"{a.source_table} ({a.rows} rows) until {a.until}, {a.obligation}" for a in located.kept_archive))
    if reasons:
        return "restricted", "; ".join(reasons)
    return "erased", "no legal hold"


@dataclass
class ErasureResult:
    request_id: str
    subject_hash: str
    outcome: str
    reason: str
    status: str
    due_date: str
    rows: dict[str, int] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    already_recorded: bool = False
    suppression: str = ""  # what happened (or, in a dry run, would happen) to the suppression list
    # {"destroyed": {source table: rows}, "kept": [ArchivedRows.as_dict()]}: the person's archived originals
    archive: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- one request id, one person -------------------------------------------------------------------------
# Key of the transaction-level advisory lock taken on a request id (two-int form: its own key space).
REQUEST_LOCK_CLASS = 0x67647072  # "gdpr"


def request_key(keys: Keys, request: ErasureRequest, located: Located) -> str:
    """Keyed hash of what the request asked for: the email's hash, or the subject id's (stored with the
    request, so that the same subject id triggered again after its erasure is still recognised)."""
    return located.subject_hash if request.email is not None else keys.hash_value(f"subject-id:{request.subject_id}")


def recorded_request(
    conn: psycopg.Connection, keys: Keys, request: ErasureRequest, located: Located, *, for_update: bool = False
) -> ErasureResult | None:
    """The result recorded under this request id when it is this person's request; None for a new id, and
    for this person's request registered (`warehouse-gdpr request new`) but not run yet.

    Raises RequestError when the id was used for another person, or for a subject this request cannot be
    matched to (a subject id whose row is gone, recorded before `requested_by` was stored), or for a
    request of another kind (gdpr.request holds every kind): the recorded result of someone else is never
    reported. Reads only; the caller owns the transaction.
    """
    row = conn.execute(
        "SELECT subject_hash, outcome, reason, status, coalesce(extended_due_date, due_date), details, kind"
        " FROM gdpr.request WHERE request_id = %s" + (" FOR UPDATE" if for_update else ""), (request.request_id,)
    ).fetchone()
    if row is None:
        return None
    subject_hash, outcome, reason, status, due_date, details, kind = row
    if kind != "erasure":
        raise RequestError(
            f"`request_id` {request.request_id} is already the id of a request of kind {kind}, not an erasure: "
            "nothing was changed; give this request its own request id"
        )
    key = request_key(keys, request, located)
    if subject_hash != located.subject_hash and details.get("requested_by") != key and subject_hash != key:
        raise RequestError(
            f"`request_id` {request.request_id} was already used for another request (another person, or one this "
            "request cannot be matched to): nothing was changed; give this request its own request id"
        )
    if status == "registered":  # registered for this person, not run yet: erase records its outcome
        return None
    return ErasureResult(request.request_id, subject_hash, outcome, reason or "", status, due_date.isoformat(),
                         rows=details.get("rows", {}), targets=details.get("targets", []), already_recorded=True,
                         archive=details.get("archive", {}))


def lock_request_id(conn: psycopg.Connection, request_id: str) -> None:
    """Serialise two erasures of one request id (inside the caller's transaction, released at its end): the
    second waits, then finds the first one's record, instead of failing on the primary key."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (REQUEST_LOCK_CLASS, request_id))


def suppression_effect(conn: psycopg.Connection, located: Located) -> str:
    """What an erasure does to the suppression list for this person (said by a dry run before it happens)."""
    if not located.email:
        return "none: no email known, no suppression entry"
    row = conn.execute("SELECT reason FROM gdpr.suppression_list WHERE email_hash = %s",
                       (located.subject_hash,)).fetchone()
    if row is None:
        return ("would add a suppression entry (permanent: the keyed hash of this email is refused by every import "
                "and opt-out check from now on, even when nobody matches)")
    if row[0] == "opt_out":
        return "would turn the person's opt-out entry into an erasure entry"
    return "already on the suppression list"


def erase(
    conn: psycopg.Connection,
    policy: Policy,
    keys: Keys,
    ctx: RunContext,
    request: ErasureRequest,
    located: Located,
    holds: dict[str, str],
    as_of: str | None = None,
) -> ErasureResult:
    """Erase everywhere, suppress, record the request and its outbox, audit: ONE transaction.

    Lock, then re-check: the person's subject rows are locked first (module doc), and the legal holds are
    evaluated again on the locked rows at `as_of` (the run's reference instant; default now). A hold set
    since `holds` was read (a litigation flag, a new contract) is honoured: the outcome follows the holds
    in force under the lock, and the change is audited (`holds_changed_under_lock`).
    Triggering the same request id again returns the recorded result and changes nothing.
    """
    result = _planned(policy, request, located, holds)
    with conn.transaction():
        lock_request_id(conn, request.request_id)
        recorded = recorded_request(conn, keys, request, located, for_update=True)
        if recorded:
            audit.record(conn, ctx, action="erase", outcome="already_recorded", subject_hash=located.subject_hash,
                         details={"request_id": request.request_id, "status": recorded.status})
            return recorded
        if request.dry_run:
            return _dry_run(conn, ctx, request, located, result)
        persons = matcher.for_person(conn, policy, located.subject_ids, located.email, located.email_hashes)
        lock_subjects(conn, policy, persons)
        locked = _holds_now(conn, policy, located.subject_ids, as_of or datetime.now(timezone.utc).isoformat())
        if locked != holds:
            audit.record(conn, ctx, action="erase", outcome="holds_changed_under_lock",
                         subject_hash=located.subject_hash,
                         details={"request_id": request.request_id, "before": sorted(holds), "now": sorted(locked)})
            holds, result = locked, _planned(policy, request, located, locked)
        if result.outcome in ("erased", "restricted"):
            # Restricted by a hold: kept_when_held tables stay. Restricted only by archived originals a legal
            # obligation keeps: every live row goes.
            result.rows = delete_everywhere(conn, policy, persons, restricted=bool(holds))
            result.archive = _archive_summary(located, _destroy_archive(conn, ctx, request, located))
        if result.outcome == "erased":
            _end_restriction(conn, policy, keys, ctx, request, located)
        _record_everything(conn, keys, ctx, request, located, result, holds)
    return result


def _end_restriction(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, request: ErasureRequest,
                     located: Located) -> None:
    """A restriction of processing (GDPR art. 18) is no legal hold: an erasure follows its own rules, and once
    the person is erased the restriction's record (gdpr.restriction) ends with the data it restricted. Audited."""
    hashes = (list(keys.subject_hashes(located.email, policy.optout.strip_plus_tags).values()) if located.email
              else [located.subject_hash])
    ended = conn.execute(
        "DELETE FROM gdpr.restriction WHERE subject_table = %s"
        " AND (subject_hash = ANY(%s) OR subject_ids && %s::text[])",
        (policy.subject.table, hashes, [str(i) for i in located.subject_ids])).rowcount
    if ended:
        audit.record(conn, ctx, action="restriction_ended", outcome="erased", table="gdpr.restriction",
                     row_count=ended, subject_hash=located.subject_hash, details={"request_id": request.request_id})


def _planned(policy: Policy, request: ErasureRequest, located: Located, holds: dict[str, str]) -> ErasureResult:
    """The result the holds lead to, before anything is erased: outcome, reason, targets, status."""
    outcome, reason = decide(located, holds)
    targets = [t.name for t in policy.erasure.targets] if outcome != "refused" and located.email else []
    status = "refused" if outcome == "refused" else "pending_propagation" if targets else (
        "not_found" if outcome == "not_found" else "completed")
    return ErasureResult(request.request_id, located.subject_hash, outcome, reason, status,
                         request.due_date.isoformat(), targets=targets)


def _record_everything(conn: psycopg.Connection, keys: Keys, ctx: RunContext, request: ErasureRequest,
                       located: Located, result: ErasureResult, holds: dict[str, str]) -> None:
    """In erase's transaction: the audit rows per table and for the archive, the suppression entry, the
    request row, the outbox rows, and the request's audit row."""
    for table, n in result.rows.items():
        audit.record(conn, ctx, action="erase", outcome=result.outcome, table=table, row_count=n,
                     subject_hash=located.subject_hash, details={"request_id": request.request_id})
    _audit_archive(conn, ctx, result)
    if located.email:
        result.suppression = _suppress(conn, keys, ctx, request, located)
    _record_request(conn, keys, request, located, result, holds)
    _queue_outbox(conn, keys, request, located, result.targets)
    if result.outcome in ("erased", "restricted"):
        # The journal (engine/journal.py): the erasure is replayed if a restored warehouse lacks it. Internal ids.
        from . import journal

        journal.record(conn, "erasure", request.request_id, located.subject_hash,
                       keys.hmac_key_id if located.email else None,
                       {"outcome": result.outcome, "subject_ids": [str(i) for i in located.subject_ids],
                        "received_at": request.received_at.isoformat(), "due_date": result.due_date})
    audit.record(conn, ctx, action="erasure_request", outcome=result.outcome, subject_hash=located.subject_hash,
                 row_count=sum(result.rows.values()),
                 details={"request_id": request.request_id, "status": result.status, "reason": result.reason,
                          "received_at": request.received_at.isoformat(), "due_date": result.due_date,
                          "targets": result.targets})


def _dry_run(conn: psycopg.Connection, ctx: RunContext, request: ErasureRequest, located: Located,
             result: ErasureResult) -> ErasureResult:
    """A dry run's result (what would be erased, suppressed, destroyed) and its one audit row."""
    result.suppression = suppression_effect(conn, located)
    audit.record(conn, ctx, action="erase", outcome="dry_run", subject_hash=located.subject_hash,
                 row_count=sum(located.rows.values()),
                 details={"request_id": request.request_id, "would_be": result.outcome, "rows": located.rows,
                          "suppression": result.suppression,
                          "archive": [a.as_dict() for a in located.archive]})
    result.rows = dict(located.rows)
    result.archive = _archive_summary(located, {a.source_table: a.rows for a in located.archive
                                                if not a.obligation})
    return result


def _suppress(conn: psycopg.Connection, keys: Keys, ctx: RunContext, request: ErasureRequest,
              located: Located) -> str:
    """List the person's subject hash with reason 'erasure' (audited); what happened to the list.

    An opted-out person erased now: the entry becomes an erasure one (the resurrection guard of
    optout.py needs it); an entry already of reason 'erasure' is kept as it is."""
    cur = conn.execute(
        "INSERT INTO gdpr.suppression_list (email_hash, key_id, reason, source, request_id)"
        " VALUES (%s, %s, 'erasure', 'erasure_request', %s) ON CONFLICT (email_hash) DO UPDATE"
        " SET reason = 'erasure', request_id = EXCLUDED.request_id WHERE gdpr.suppression_list.reason = 'opt_out'"
        " RETURNING (xmax = 0)",
        (located.subject_hash, keys.hmac_key_id, request.request_id),
    )
    row = cur.fetchone()
    suppression = "already_listed" if row is None else "added" if row[0] else "opt_out_now_erasure"
    audit.record(conn, ctx, action="suppress", outcome=suppression,
                 table="gdpr.suppression_list", row_count=cur.rowcount, subject_hash=located.subject_hash,
                 details={"request_id": request.request_id, "reason": "erasure"})
    return suppression


def _record_request(conn: psycopg.Connection, keys: Keys, request: ErasureRequest, located: Located,
                    result: ErasureResult, holds: dict[str, str]) -> None:
    """The request's row in gdpr.request (kind 'erasure'; one table for every kind of request): outcome,
    status (completed at once unless targets are pending), and what was done (no personal data: counts,
    target names, hold names, keyed hashes). A request registered with `warehouse-gdpr request new` gets its
    outcome in its own row (its receipt and first due date stay)."""
    recorded = conn.execute(
        "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome,"
        " reason, completed_at, details) VALUES (%s, 'erasure', %s, %s, %s, %s, %s, %s,"
        " CASE WHEN %s IN ('completed', 'not_found', 'refused') THEN now() END, %s)"
        " ON CONFLICT (request_id) DO UPDATE SET subject_hash = EXCLUDED.subject_hash, status = EXCLUDED.status,"
        " outcome = EXCLUDED.outcome, reason = EXCLUDED.reason, completed_at = EXCLUDED.completed_at,"
        " details = gdpr.request.details || EXCLUDED.details || jsonb_build_object('run_at', now())"
        " WHERE gdpr.request.status = 'registered'"
        " RETURNING request_id",
        (request.request_id, located.subject_hash, request.received_at, request.first_due_date, result.status,
         result.outcome, result.reason, result.status,
         psycopg.types.json.Jsonb({"rows": result.rows, "targets": result.targets, "holds": sorted(holds),
                                   "archive": result.archive,
                                   "requested_by": request_key(keys, request, located)})),
    ).fetchone()
    if recorded is None:  # cannot happen: the caller locked the request id and read it first
        raise RequestError(f"request id {request.request_id} was recorded by another run meanwhile")


def _queue_outbox(conn: psycopg.Connection, keys: Keys, request: ErasureRequest, located: Located,
                  targets: list[str]) -> None:
    """One pending outbox row per downstream target, the email encrypted under the store key (bound to
    the request, the target and the key id)."""
    for name in targets:
        assert located.email is not None
        key_id, nonce, ciphertext = keys.encrypt(located.email.encode(),
                                                 outbox_aad(request.request_id, name, keys.store_key_id))
        conn.execute(
            "INSERT INTO gdpr.erasure_propagation (request_id, target, status, key_id, nonce,"
            " identifier_ciphertext) VALUES (%s, %s, 'pending', %s, %s, %s)",
            (request.request_id, name, key_id, nonce, ciphertext),
        )


def outbox_aad(request_id: str, target: str, key_id: str) -> bytes:
    return f"erasure|{request_id}|{target}|{key_id}".encode()


def lock_subjects(conn: psycopg.Connection, policy: Policy, persons: matcher.Persons) -> None:
    """Lock order (module doc): lock the subject rows this erasure touches, FOR UPDATE in primary-key
    order, before any dependent row: the person's subject rows and the owners of rows matched by email."""
    subject = policy.subject
    pk = sql.Identifier("s", subject.primary_key)
    owners = [
        sql.SQL("SELECT {c} FROM {t} WHERE {m}").format(
            c=sql.Identifier(mapped.subject_column), t=qualified(mapped.table), m=matcher.rows(policy, mapped, persons))
        for mapped in policy.dependent_tables if mapped.email_columns
    ]
    which = sql.SQL("{pk} = ANY({ids})").format(pk=pk, ids=persons.id_array())
    if owners:
        which = sql.SQL("({ids} OR {pk} = ANY(ARRAY({q})))").format(ids=which, pk=pk, q=sql.SQL(" UNION ").join(owners))
    conn.execute(
        sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {t} s WHERE {which} ORDER BY {pk} FOR UPDATE) locked").format(
            t=qualified(subject.table), which=which, pk=pk),
        persons.params,
    )


def delete_everywhere(conn: psycopg.Connection, policy: Policy, persons: matcher.Persons,
                      restricted: bool) -> dict[str, int]:
    """Delete every row of the persons (`matcher.rows`), dependents first; under a restricting hold keep
    kept_when_held tables and the subject row, which is flagged (restriction_column) instead. Subject rows
    are locked first. {table: rows deleted}. Runs in the caller's transaction: `erase`, and the
    resurrection guard (`optout.guard`), which deletes re-imported erased people the same way."""
    params = persons.params or None
    counts: dict[str, int] = {}
    lock_subjects(conn, policy, persons)
    for mapped in policy.dependent_tables:
        if restricted and mapped.kept_when_held:
            continue
        cur = conn.execute(
            sql.SQL("DELETE FROM {t} WHERE {m}").format(t=qualified(mapped.table),
                                                        m=matcher.rows(policy, mapped, persons)),
            params,
        )
        counts[mapped.table] = cur.rowcount
    subject = policy.subject
    table, own = qualified(subject.table), matcher.rows(policy, policy.subject_mapping, persons)
    if restricted:
        if subject.restriction_column:
            conn.execute(
                sql.SQL("UPDATE {t} SET {flag} = true WHERE {m}").format(
                    t=table, flag=sql.Identifier(subject.restriction_column), m=own),
                params,
            )
    else:
        cur = conn.execute(sql.SQL("DELETE FROM {t} WHERE {m}").format(t=table, m=own), params)
        counts[subject.table] = cur.rowcount
    return counts


def _destroy_archive(conn: psycopg.Connection, ctx: RunContext, request: ErasureRequest,
                     located: Located) -> dict[str, int]:
    """Delete the person's archived originals that no legal obligation keeps (as `locate` found them);
    returns rows destroyed per source table. Runs in the caller's transaction, through the control
    schema's gdpr.erase_archived_rows: the only way to delete an archive row before its purge date, it
    writes the audit rows (erase_archive, destroyed) in the same statement."""
    destroy = [a.source_table for a in located.archive if not a.obligation]
    if not destroy:
        return {}
    kept = [a.source_table for a in located.kept_archive]
    rows = conn.execute(
        "SELECT source_table, destroyed FROM gdpr.erase_archived_rows(%s, %s, %s, %s, %s, %s, %s)",
        (located.archive_ids, kept, request.request_id, located.subject_hash, ctx.dag_id, ctx.run_id, ctx.task_id),
    ).fetchall()
    return {table: int(n) for table, n in rows}


def _archive_summary(located: Located, destroyed: dict[str, int]) -> dict[str, Any]:
    """What the result and the certificate say about the archive: rows destroyed, rows kept and why."""
    if not located.archive:
        return {}
    return {"destroyed": destroyed, "kept": [a.as_dict() for a in located.kept_archive]}


def _audit_archive(conn: psycopg.Connection, ctx: RunContext, result: ErasureResult) -> None:
    """One audit row per source table of the person's archive kept by a legal obligation, with the
    obligation and the date until which it is kept (the rows destroyed were audited as they went)."""
    for kept in result.archive.get("kept", []):
        audit.record(conn, ctx, action="erase_archive", outcome="kept", table="gdpr_archive.archived_row",
                     row_count=kept["rows"], subject_hash=result.subject_hash,
                     details={"request_id": result.request_id, "source_table": kept["table"],
                              "obligation": kept["obligation"], "until": kept["until"]})


def verify(conn: psycopg.Connection, policy: Policy, keys: Keys, request: ErasureRequest,
           outcome: str) -> dict[str, int]:
    """Rescan every mapped table and the archive: rows still linked to the person, per table. Under a
    restricting hold the kept_when_held tables and the subject row may remain, and archived originals a
    legal obligation keeps always may; anything else remaining is a failure."""
    located = locate(conn, policy, keys, request)
    allowed = set()
    if outcome in ("restricted", "refused"):
        allowed = {t.table for t in policy.tables if t.kept_when_held or outcome == "refused"} | {policy.subject.table}
    remaining = {t: n for t, n in located.rows.items() if n and t not in allowed}
    archived = sum(a.rows for a in located.archive if not a.obligation)
    if archived and outcome != "refused":
        remaining["gdpr_archive.archived_row"] = archived
    return remaining
