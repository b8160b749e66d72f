"""The hashed opt-out (suppression) list: collect, enforce, guard against resurrection, share.

An objection ("don't contact me again") is honoured everywhere and forever, and the only thing kept
about the person is a keyed hash of the email. `gdpr.suppression_list` holds HMAC-SHA256(pepper,
normalised email), its key id, the reason ('opt_out' or 'erasure'), the source, the erasure request
id and when the entry was first seen. No plain email is ever stored, logged, audited, returned,
shared or exported: only hashes, internal ids and counts.

Steps (`gdpr_optout_sync` runs them daily, in this order):

  rekey     entries stored under an earlier pepper are brought to the current one (key rotation, below)
  collect   every subject an opt-out source of the policy selects (SQL predicates on `s`) has its email
            hashed; new hashes are added with reason 'opt_out' and the source's name. Idempotent.
  guard     a subject whose hash is listed with reason 'erasure' was erased and came back (an import, a
            form, an API sync): it is erased again (policy `resurrection: erase`, with the erasure
            engine's own deletion, dependents first) or quarantined (`resurrection: quarantine`: the row
            stays, flagged do-not-contact, recorded in gdpr.quarantine for review). A subject under a
            legal hold today is quarantined, never erased. Each case is audited as a `resurrection`
            with the original request id. Entries whose request was restricted or refused by a hold are
            not resurrections: those subjects were kept on purpose.
  enforce   every subject whose hash is listed (either reason) gets the do-not-contact flag
            (`subject.restriction_column`), whatever its status; a later import that clears the flag is
            undone by the next run (and `filter_suppressed` lets an import drop them before they land).
  share     the list (current-key hashes only) is POSTed to each share target as JSON
            ``{"hashes": [...]}`` in batches, and written to the export file, one hash per line.

Normalisation is `crypto.normalise_email`: Unicode NFKC, trim, lowercase, and with
`optout.strip_plus_tags` the sub-address tag is dropped (``john+news@x`` -> ``john@x``). The erasure
engine hashes with the same function and flag, so both write the same hash for one person.

Set-based and memory-bounded. Hashing happens in Python (the warehouse may lack pgcrypto): ONE
``COPY (SELECT id, email ...) TO STDOUT`` streams the rows, each email is hashed as it arrives and
only (id, hash) is written to a spooled temporary file (in memory up to SPOOL_BYTES, then on disk;
never an email); ONE ``COPY ... FROM STDIN`` loads it into a temporary table, and a fixed number of
set-based statements join that table with the list. The number of statements does not depend on the
number of rows.

Key rotation: chained re-keying
-------------------------------
The pepper has a key id. To rotate, the new pepper becomes ``hmac_key_id`` / ``hmac_pepper`` in the
keys connection and the old one moves to ``hmac_chain`` (oldest first). A person's hash is then the
chain HMAC(new, HMAC(old, email)), and the next sync re-keys every stored entry in one set-based pass:
new entry = HMAC(new pepper, stored hash). No plaintext is needed, which is the point: the list exists
precisely for people whose emails we no longer hold. Every lookup (`is_suppressed`,
`filter_suppressed`, the sync itself) computes the person's hash as it was under each key of the
chain, so entries not re-keyed yet (between the rotation and the next sync) are still found.

Why chaining: keeping independent peppers side by side (hash under each at lookup, never re-key)
also works without plaintext, but then each entry stays under the pepper it was written with, so a
leaked old pepper exposes those entries to a dictionary attack forever. Re-hashing from the emails is
impossible for erased people.

The trade-offs:
  * Retired peppers can never be deleted: a lookup starts with the oldest one. Keep `hmac_chain` in
    the same secrets backend as the current pepper and back it up: losing any pepper of the chain
    makes the whole list unusable.
  * The gain: entries written after a rotation, and the re-keyed copies, can only be tested against
    guessed emails by someone holding every pepper of the chain; a leaked old pepper alone is not
    enough for them. The entries written before the rotation are kept as they were (below), as are
    copies taken before it (backups, exports, downstream lists): rotation protects the future.
  * Hashes shared or exported before the rotation become stale; the next share pushes the re-keyed
    list, and downstream tools must replace their list rather than merge it.
  * Re-keying inserts the entry under the current key and keeps the old one (marked `rekeyed_at`).
    The control schema refuses every change of a stored hash, and any deletion, to the engine's role
    (issue 15): a re-keyed hash cannot be checked by the database (it would need the pepper), so a
    job allowed to re-key in place could take anyone off the "permanent" list with a random value.
    The price: entries written under a retired pepper stay, so that pepper leaking still exposes them
    to a dictionary attack (the gain above holds for entries written after the rotation). Old entries,
    and an old entry of a person also listed under the current key (erased between the rotation and
    the next sync, "superseded"), are excluded from shares and exports; lookups find the person
    through any of them.
  * Audit rows and erasure requests keep the hash of the key current when they were written (they are
    append-only): ``Keys.subject_hashes(email)[key_id]`` finds them.
  * Cost: one HMAC per retired key per hashed email (microseconds), and one pass over the list per
    rotation.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql

from ..transport import ConnectionNotUsable, HttpCall, Transport, TransportError
from . import audit, candidates, catalog, erasure, matcher, restriction
from .audit import RunContext
from .crypto import KeyConfigError, Keys
from .errors import ConfigurationError, TransientError, UnmappedForeignKey
from .policy import OptOutSource, Policy, ShareTarget

log = logging.getLogger(__name__)

LIST = "gdpr.suppression_list"
SPOOL_BYTES = 16 * 1024 * 1024  # (id, hash) lines kept in memory before the spool moves to disk
HASH_STAGE = sql.Identifier("_gdpr_optout_hash")
RESURRECTED = sql.Identifier("_gdpr_optout_resurrected")


class OptOutError(ConfigurationError, ValueError):
    """The opt-out configuration cannot work on this warehouse. The message names the policy field."""


class ShareError(TransientError, RuntimeError):
    """A share target did not accept a batch. The message holds the target name and HTTP status only."""


# -- checks ------------------------------------------------------------------------------------------


def source_predicate(source: OptOutSource) -> sql.SQL:
    """The source's SQL predicate on subject `s`, bound exactly as a hold's (``:as_of`` allowed)."""
    return candidates.bound_predicate(source.predicate)


def check(conn: psycopg.Connection, policy: Policy) -> list[str]:
    """Raise OptOutError unless the opt-out section can run here; return warnings for the logs.

    Run after `catalog.check_policy` (which checks the subject's columns). Source predicates are
    compiled by the server (EXPLAIN runs nothing).
    """
    optout, subject = policy.optout, policy.subject
    problems: list[str] = []
    warnings: list[str] = []
    if not subject.restriction_column:
        problems.append("subject.restriction_column: enforcement needs the subject's do-not-contact flag column")
    if not optout.sources:
        warnings.append("optout.sources is empty: nothing is collected (erasure entries are still enforced)")
    for i, source in enumerate(optout.sources):
        problem = catalog.compile_problem(conn, subject.table, source_predicate(source))
        if problem:
            problems.append(f"optout.sources[{i}] ({source.name}).predicate: does not compile: {problem}")
    if problems:
        raise OptOutError("the opt-out policy cannot run (nothing was changed):\n"
                          + "\n".join(f"  - {p}" for p in problems))
    return warnings


# -- hashing: COPY out, hash in Python, COPY back in -------------------------------------------------


_UNESCAPE = {b"\\": b"\\", b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def _copy_rows(conn: psycopg.Connection, query: sql.SQL | sql.Composed, params: dict[str, Any] | None = None
               ) -> Iterator[list[bytes]]:
    """Stream the rows of ONE ``COPY (...) TO STDOUT`` (text format), each as its raw fields.

    A field stays in COPY's escaped text form, so that it can be written back to a ``COPY FROM``
    as it is; `_text` decodes one. (Faster than psycopg's row parsing: only the email is decoded.)
    """
    with conn.cursor().copy(query, params) as copy:
        while data := copy.read():
            yield bytes(data).rstrip(b"\n").split(b"\t")


def _text(field: bytes) -> str:
    """A COPY text-format field as a string (COPY TO escapes only backslash, b, f, n, r, t and v)."""
    if b"\\" not in field:
        return field.decode()
    out, i = bytearray(), 0
    while i < len(field):
        if field[i:i + 1] == b"\\" and i + 1 < len(field):
            out += _UNESCAPE.get(field[i + 1:i + 2], field[i + 1:i + 2])
            i += 2
        else:
            out += field[i:i + 1]
            i += 1
    return out.decode()


def _spool() -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, mode="w+b")  # noqa: SIM115 - closed by callers


def _copy_in(conn: psycopg.Connection, statement: sql.SQL | sql.Composed, spool: IO[bytes]) -> None:
    spool.seek(0)
    with conn.cursor().copy(statement) as copy:
        while chunk := spool.read(1 << 20):
            copy.write(chunk)


def _stage_subject_hashes(
    conn: psycopg.Connection, policy: Policy, keys: Keys, params: dict[str, Any],
    source: sql.Composable | None = None,
) -> int:
    """Temp table _gdpr_optout_hash (subject_id, email_hash, current, source): one row per subject
    with an email and per key of the chain (`current` marks the current key's hash). With `source`
    (an SQL expression naming the first matching opt-out source, or NULL), only the subjects it
    selects. Call inside a transaction (the table is dropped on commit). Returns subjects hashed."""
    subject = policy.subject
    table, pk = candidates.qualified(subject.table), sql.Identifier(subject.primary_key)
    email = sql.Identifier(subject.email_column)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {stage}").format(stage=HASH_STAGE))
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {stage} ON COMMIT DROP AS SELECT s.{pk} AS subject_id, ''::text AS email_hash,"
                " true AS current, ''::text AS source FROM {t} s WITH NO DATA").format(stage=HASH_STAGE, pk=pk, t=table)
    )
    src = source if source is not None else sql.SQL("''")
    # Rows with an '@' (or a compatibility form of it, which NFKC turns into '@'): a pseudonymised
    # email (a hex hash) or an empty one is not an address.
    query = sql.SQL("COPY (SELECT * FROM (SELECT s.{pk}::text, s.{email}, {src} AS source FROM {t} s"
                    " WHERE s.{email} ~ '[@\\uFF20\\uFE6B]') x WHERE source IS NOT NULL) TO STDOUT").format(
        pk=pk, email=email, src=src, t=table)
    hashes = keys.hasher(policy.optout.strip_plus_tags)
    last = len(keys.hmac_key_ids) - 1
    subjects = 0
    with _spool() as spool:
        for subject_id, address, name in _copy_rows(conn, query, params):
            for i, value in enumerate(hashes(_text(address))):
                spool.write(b"%s\t%s\t%s\t%s\n" % (subject_id, value.encode(), b"t" if i == last else b"f", name))
            subjects += 1
        _copy_in(conn, sql.SQL("COPY {stage} (subject_id, email_hash, current, source) FROM STDIN")
                 .format(stage=HASH_STAGE), spool)
    conn.execute(sql.SQL("ANALYZE {stage}").format(stage=HASH_STAGE))
    return subjects


def stage_subject_hashes(conn: psycopg.Connection, policy: Policy, keys: Keys) -> int:
    """Every subject's email hashed under every key of the pepper chain, in the temp table HASH_STAGE
    (subject_id, email_hash, current, source), as the guard and enforce see them: how the restore replay
    (journal.py) finds a person by a keyed hash written under any pepper. In the caller's transaction."""
    return _stage_subject_hashes(conn, policy, keys, {})


def _finish(conn: psycopg.Connection, ctx: RunContext, tx: psycopg.Transaction, **record: Any) -> None:
    """End a step's transaction: audit it there (the audit commits with the change it describes), or,
    for a dry run, roll the whole step back (`_dry_run_record` then audits what would have happened)."""
    if ctx.dry_run:
        raise psycopg.Rollback(tx)
    audit.record(conn, ctx, **record)


def _dry_run_record(conn: psycopg.Connection, ctx: RunContext, **record: Any) -> None:
    if ctx.dry_run:
        with conn.transaction():
            audit.record(conn, ctx, **{**record, "outcome": "dry_run"})


# -- rekey -------------------------------------------------------------------------------------------


def rekey(conn: psycopg.Connection, keys: Keys, ctx: RunContext) -> dict[str, Any]:
    """Bring every entry stored under an earlier pepper of the chain to the current key (one pass): the
    entry under the current key is inserted and the old one stays, marked `rekeyed_at` (the control
    schema refuses any change of a stored hash: the database cannot check one, see the module doc).

    Raises KeyConfigError (nothing changed) when the list holds a key id the keys connection does not know.
    """
    current = keys.hmac_key_id
    with conn.transaction() as tx:
        by_key: dict[str, int] = dict(
            conn.execute(f"SELECT key_id, count(*) FROM {LIST} GROUP BY key_id ORDER BY key_id").fetchall())
        unknown = {k: n for k, n in by_key.items() if k not in keys.hmac_key_ids}
        if unknown:
            raise KeyConfigError(
                f"the suppression list holds entries under key id(s) the keys connection does not list: {unknown}; "
                "add the retired pepper(s) to hmac_chain (oldest first) and run again"
            )
        pending: dict[str, int] = dict(conn.execute(
            f"SELECT key_id, count(*) FROM {LIST} WHERE rekeyed_at IS NULL GROUP BY key_id ORDER BY key_id").fetchall())
        stale = {k: n for k, n in pending.items() if k != current}
        # restrictions in force (art. 18) follow the list's key: the sync adopts re-imported rows by it
        result = {"key_id": current, "stale": stale, "rekeyed": 0, "superseded": 0,
                  "restrictions_rekeyed": restriction.rekey(conn, keys)}
        if not stale:
            _finish(conn, ctx, tx, action="rekey", outcome="nothing_to_rekey", table=LIST, details=result)
            return result
        with _spool() as spool:
            for stored, key_id in _copy_rows(conn, sql.SQL(
                    "COPY (SELECT email_hash, key_id FROM {l} WHERE key_id <> {c} AND rekeyed_at IS NULL)"
                    " TO STDOUT").format(
                    l=candidates.qualified(LIST), c=sql.Literal(current))):
                spool.write(b"%s\t%s\n" % (stored, keys.rekey(_text(stored), _text(key_id)).encode()))
            conn.execute("DROP TABLE IF EXISTS _gdpr_optout_rekey")
            conn.execute("CREATE TEMP TABLE _gdpr_optout_rekey (old_hash text PRIMARY KEY, new_hash text NOT NULL)"
                         " ON COMMIT DROP")
            _copy_in(conn, sql.SQL("COPY _gdpr_optout_rekey (old_hash, new_hash) FROM STDIN"), spool)
        # One entry per person under the current key: one already there wins, then an erasure entry, then
        # the oldest (the others are "superseded"). Every old entry stays, marked re-keyed.
        rekeyed = conn.execute(
            f"WITH pick AS (SELECT DISTINCT ON (r.new_hash) r.new_hash, l.reason, l.source, l.request_id,"
            f" l.first_seen FROM _gdpr_optout_rekey r JOIN {LIST} l ON l.email_hash = r.old_hash"
            f" WHERE NOT EXISTS (SELECT 1 FROM {LIST} x WHERE x.email_hash = r.new_hash)"
            f" ORDER BY r.new_hash, l.reason = 'erasure' DESC, l.first_seen, r.old_hash),"
            f" added AS (INSERT INTO {LIST} (email_hash, key_id, reason, source, request_id, first_seen)"
            f" SELECT new_hash, %s, reason, source, request_id, first_seen FROM pick RETURNING 1),"
            f" marked AS (UPDATE {LIST} l SET rekeyed_at = now() FROM _gdpr_optout_rekey r"
            f" WHERE l.email_hash = r.old_hash)"
            f" SELECT count(*) FROM added",
            (current,),
        ).fetchone()[0]  # type: ignore[index]
        result["rekeyed"] = rekeyed
        result["superseded"] = sum(stale.values()) - rekeyed
        _finish(conn, ctx, tx, action="rekey", outcome="done", table=LIST, row_count=rekeyed, details=result)
    _dry_run_record(conn, ctx, action="rekey", table=LIST, row_count=result["rekeyed"], details=result)
    return result


# -- collect -----------------------------------------------------------------------------------------


def collect(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, as_of: str) -> dict[str, Any]:
    """Hash the email of every subject an opt-out source selects; add the new hashes (reason 'opt_out').

    Idempotent: a person already listed (under any key of the chain, for any reason) is not added
    again. A subject matched by several sources is attributed to the first one in the policy.
    """
    sources = policy.optout.sources
    result: dict[str, Any] = {"subjects": 0, "added": 0, "by_source": {}}
    if not sources:
        with conn.transaction():
            audit.record(conn, ctx, action="collect", outcome="no_source", table=LIST)
        return result
    first_match = sql.SQL("CASE {whens} END").format(whens=sql.SQL(" ").join(
        sql.SQL("WHEN ({p}) THEN {n}").format(p=source_predicate(s), n=sql.Literal(s.name)) for s in sources))
    with conn.transaction() as tx:
        result["subjects"] = _stage_subject_hashes(conn, policy, keys, {"as_of": as_of}, source=first_match)
        rows = conn.execute(
            sql.SQL(
                "WITH listed AS (SELECT DISTINCT h.subject_id FROM {stage} h"
                "  JOIN {l} l ON l.email_hash = h.email_hash),"
                " new AS (SELECT DISTINCT ON (h.email_hash) h.email_hash, h.source FROM {stage} h"
                "  LEFT JOIN listed x ON x.subject_id = h.subject_id WHERE h.current AND x.subject_id IS NULL"
                "  ORDER BY h.email_hash, array_position({order}, h.source)),"
                " added AS (INSERT INTO {l} (email_hash, key_id, reason, source)"
                "  SELECT email_hash, {key}, 'opt_out', source FROM new ON CONFLICT (email_hash) DO NOTHING"
                "  RETURNING source)"
                " SELECT source, count(*) FROM added GROUP BY source ORDER BY source"
            ).format(stage=HASH_STAGE, l=candidates.qualified(LIST), key=sql.Literal(keys.hmac_key_id),
                     order=sql.Literal([s.name for s in sources]))
        ).fetchall()
        result["by_source"] = {name: 0 for name in (s.name for s in sources)} | dict(rows)
        result["added"] = sum(n for _, n in rows)
        _finish(conn, ctx, tx, action="collect", outcome="done", table=LIST, row_count=result["added"], details=result)
    _dry_run_record(conn, ctx, action="collect", table=LIST, row_count=result["added"], details=result)
    return result


# -- resurrection guard ------------------------------------------------------------------------------


AUDIT_RESURRECTIONS = sql.SQL(
    "INSERT INTO gdpr.audit_log (dag_id, run_id, task_id, table_name, action, row_count, dry_run, outcome,"
    " subject_hash, details)"
    " SELECT %(dag_id)s, %(run_id)s, %(task_id)s, %(table)s, 'resurrection', 1, false, r.handled, r.email_hash,"
    " jsonb_build_object('request_id', r.request_id, 'subject_id', r.subject_id, 'policy', %(mode)s::text,"
    " 'holds', to_jsonb(r.holds))"
    " FROM {res} r ORDER BY r.subject_id"
)


def guard(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, as_of: str) -> dict[str, Any]:
    """Find subjects listed with reason 'erasure' (erased, then re-imported) and erase or quarantine them.

    One transaction: the deletion (the erasure engine's `delete_everywhere`, dependents first), the
    quarantine rows, the do-not-contact flag and one audit row per case (action 'resurrection',
    outcome 'erased' or 'quarantined', details: original request id, subject id, holds).
    """
    subject, mode = policy.subject, policy.optout.resurrection
    if not subject.restriction_column:
        raise OptOutError(
            "subject.restriction_column: the resurrection guard needs the subject's do-not-contact flag column")
    result: dict[str, Any] = {"policy": mode, "found": 0, "erased": 0, "quarantined": 0, "held": 0, "rows": {}}
    with conn.transaction() as tx:
        result["subjects"] = _stage_subject_hashes(conn, policy, keys, {})
        found, held, erased = _find_resurrected(conn, policy, as_of)
        result.update(found=found, held=held, erased=erased, quarantined=found - erased)
        if found:
            _lock_resurrected(conn, policy)
            if erased:
                result["rows"] = _erase_resurrected(conn, policy)
            if result["quarantined"]:
                _quarantine_resurrected(conn, policy)
            if not ctx.dry_run:
                _audit_resurrections(conn, policy, ctx, result["rows"])
        _finish(conn, ctx, tx, action="resurrection_guard", outcome="done", table=subject.table, row_count=found,
                details=result)
    _dry_run_record(conn, ctx, action="resurrection_guard", table=subject.table, row_count=result["found"],
                    details=result)
    return result


def _find_resurrected(conn: psycopg.Connection, policy: Policy, as_of: str) -> tuple[int, int, int]:
    """Stage in RESURRECTED every subject whose staged hash is listed with reason 'erasure' (and whose
    request was not restricted or refused, nor already quarantined), with the holds in force for it
    and how it is handled ('erased', or 'quarantined' when the policy says so or a hold is in force).
    Returns (found, held, to be erased)."""
    subject, mode = policy.subject, policy.optout.resurrection
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {res}").format(res=RESURRECTED))
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE {res} ON COMMIT DROP AS"
            " SELECT DISTINCT ON (h.subject_id) h.subject_id, l.email_hash, l.request_id, {holds} AS holds,"
            "  ''::text AS handled"
            " FROM {stage} h JOIN {l} l ON l.email_hash = h.email_hash AND l.reason = 'erasure'"
            " JOIN {t} s ON s.{pk} = h.subject_id"
            " LEFT JOIN gdpr.request r ON r.request_id = l.request_id AND r.kind = 'erasure'"
            " WHERE (r.request_id IS NULL OR r.outcome IN ('erased', 'not_found'))"
            "  AND NOT EXISTS (SELECT 1 FROM gdpr.quarantine q"
            "   WHERE q.subject_table = %(table)s AND q.subject_id = h.subject_id::text)"
            # the oldest erasure entry; of an entry and its re-keyed copy (same first_seen), the current key's
            " ORDER BY h.subject_id, l.first_seen, h.current DESC"
        ).format(res=RESURRECTED, holds=candidates.holds_array(policy.holds), stage=HASH_STAGE,
                 l=candidates.qualified(LIST), t=candidates.qualified(subject.table),
                 pk=sql.Identifier(subject.primary_key)),
        {"as_of": as_of, "table": subject.table},
    )
    conn.execute(
        sql.SQL("UPDATE {res} SET handled = CASE WHEN {mode} = 'erase' AND cardinality(holds) = 0"
                " THEN 'erased' ELSE 'quarantined' END").format(res=RESURRECTED, mode=sql.Literal(mode))
    )
    found, held, erased = conn.execute(
        sql.SQL("SELECT count(*), count(*) FILTER (WHERE cardinality(holds) > 0),"
                " count(*) FILTER (WHERE handled = 'erased') FROM {res}").format(res=RESURRECTED)
    ).fetchone()  # type: ignore[misc]
    return found, held, erased


def _lock_resurrected(conn: psycopg.Connection, policy: Policy) -> None:
    """Lock the staged subjects first, in primary-key order, as every writer does (lock order: sweep.py)."""
    table, pk = candidates.qualified(policy.subject.table), sql.Identifier(policy.subject.primary_key)
    conn.execute(sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {t} s WHERE s.{pk} IN (SELECT subject_id FROM {res})"
                         " ORDER BY s.{pk} FOR UPDATE) locked").format(t=table, pk=pk, res=RESURRECTED))


def _erase_resurrected(conn: psycopg.Connection, policy: Policy) -> dict[str, int]:
    """Delete every row of the subjects handled 'erased', found as the sweep and erasure find them
    (`matcher`: linked rows and rows carrying their email). {table: rows deleted}."""
    persons = matcher.stage(conn, policy, sql.SQL("(SELECT subject_id FROM {res} WHERE handled = 'erased')")
                            .format(res=RESURRECTED))
    try:
        return erasure.delete_everywhere(conn, policy, persons, restricted=False)
    except psycopg.errors.ForeignKeyViolation as exc:
        raise UnmappedForeignKey(
            f"erasing resurrected subjects from {policy.subject.table} is blocked by a foreign key from table "
            f"{exc.diag.table_name!r}, which the policy does not map: add it to `tables`"
        ) from None


def _quarantine_resurrected(conn: psycopg.Connection, policy: Policy) -> None:
    """Record the subjects handled 'quarantined' in gdpr.quarantine (with the holds keeping them) and set
    their do-not-contact flag."""
    subject = policy.subject
    assert subject.restriction_column  # checked by `guard`
    conn.execute(
        sql.SQL("INSERT INTO gdpr.quarantine (subject_table, subject_id, email_hash, request_id, reason)"
                " SELECT %(table)s, subject_id::text, email_hash, request_id,"
                " CASE WHEN cardinality(holds) > 0"
                " THEN 'resurrection; legal hold: ' || array_to_string(holds, ', ')"
                " ELSE 'resurrection' END FROM {res} WHERE handled = 'quarantined'"
                " ON CONFLICT (subject_table, subject_id) DO NOTHING").format(res=RESURRECTED),
        {"table": subject.table},
    )
    conn.execute(
        sql.SQL("UPDATE {t} s SET {flag} = true FROM {res} r WHERE s.{pk} = r.subject_id"
                " AND r.handled = 'quarantined' AND s.{flag} IS NOT TRUE").format(
            t=candidates.qualified(subject.table), flag=sql.Identifier(subject.restriction_column),
            res=RESURRECTED, pk=sql.Identifier(subject.primary_key))
    )


def _audit_resurrections(conn: psycopg.Connection, policy: Policy, ctx: RunContext, rows: dict[str, int]) -> None:
    """One audit row per resurrection (with the original request id and the holds), one per erased table."""
    conn.execute(AUDIT_RESURRECTIONS.format(res=RESURRECTED),
                 {"dag_id": ctx.dag_id, "run_id": ctx.run_id, "task_id": ctx.task_id,
                  "table": policy.subject.table, "mode": policy.optout.resurrection})
    for name, n in rows.items():
        audit.record(conn, ctx, action="erase", outcome="resurrection", table=name, row_count=n)


# -- enforce -----------------------------------------------------------------------------------------


def enforce(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext) -> dict[str, Any]:
    """Set the do-not-contact flag of every subject whose hash is on the list (any reason, any status)."""
    subject = policy.subject
    if not subject.restriction_column:
        raise OptOutError("subject.restriction_column: enforcement needs the subject's do-not-contact flag column")
    table, pk = candidates.qualified(subject.table), sql.Identifier(subject.primary_key)
    flag = sql.Identifier(subject.restriction_column)
    with conn.transaction() as tx:
        hashed = _stage_subject_hashes(conn, policy, keys, {})
        # The rows to flag are locked in primary-key order before any is updated (lock order: sweep.py).
        listed, flagged = conn.execute(
            sql.SQL(
                "WITH m AS (SELECT DISTINCT h.subject_id FROM {stage} h JOIN {l} l ON l.email_hash = h.email_hash),"
                " k AS (SELECT s.{pk} FROM {t} s WHERE s.{pk} IN (SELECT subject_id FROM m) AND s.{flag} IS NOT TRUE"
                " ORDER BY s.{pk} FOR NO KEY UPDATE),"
                " u AS (UPDATE {t} s SET {flag} = true FROM k WHERE s.{pk} = k.{pk} AND s.{flag} IS NOT TRUE"
                " RETURNING 1)"
                " SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM u)"
            ).format(stage=HASH_STAGE, l=candidates.qualified(LIST), t=table, flag=flag, pk=pk)
        ).fetchone()  # type: ignore[misc]
        result = {"subjects": hashed, "listed": listed, "flagged": flagged, **_enforce_restrictions(conn, policy)}
        if result["restricted_reflagged"] or result["restricted_adopted"]:
            audit.record(conn, ctx, action="restriction_reapplied", outcome="done", table=subject.table,
                         row_count=result["restricted_reflagged"],
                         details={"reflagged": result["restricted_reflagged"],
                                  "adopted": result["restricted_adopted"]})
        _finish(conn, ctx, tx, action="enforce", outcome="done", table=subject.table, row_count=flagged, details=result)
    _dry_run_record(conn, ctx, action="enforce", table=subject.table, row_count=flagged, details=result)
    return result


def _enforce_restrictions(conn: psycopg.Connection, policy: Policy) -> dict[str, int]:
    """Restrictions of processing in force (gdpr.restriction, GDPR art. 18) survive a CRM import: a subject row
    that carries a restricted person's email under a new id (the import rewrote the row) is added to the
    restriction, and every restricted subject whose do-not-contact flag an import cleared is flagged again (the
    restriction clears at `lift` the flags it set). In the caller's transaction, after `_stage_subject_hashes`."""
    subject = policy.subject
    assert subject.restriction_column
    table, pk = candidates.qualified(subject.table), sql.Identifier(subject.primary_key)
    flag = sql.Identifier(subject.restriction_column)
    adopted = conn.execute(
        sql.SQL(
            "WITH found AS (SELECT r.subject_hash, array_agg(DISTINCT h.subject_id::text) AS ids"
            "  FROM {stage} h JOIN gdpr.restriction r ON r.by_email AND r.subject_hash = h.email_hash"
            "  WHERE r.subject_table = %(table)s AND NOT h.subject_id::text = ANY(r.subject_ids) GROUP BY 1),"
            " u AS (UPDATE gdpr.restriction r SET subject_ids = ARRAY(SELECT DISTINCT x FROM unnest(r.subject_ids"
            "  || f.ids) x ORDER BY x) FROM found f WHERE r.subject_hash = f.subject_hash"
            "  RETURNING cardinality(f.ids) n)"
            " SELECT coalesce(sum(n), 0) FROM u").format(stage=HASH_STAGE),
        {"table": subject.table}).fetchone()[0]  # type: ignore[index]
    reflagged = conn.execute(
        sql.SQL(
            "WITH k AS (SELECT s.{pk} FROM {t} s WHERE s.{pk}::text IN (SELECT unnest(subject_ids) FROM"
            "  gdpr.restriction WHERE subject_table = %(table)s) AND s.{flag} IS NOT TRUE ORDER BY s.{pk}"
            "  FOR NO KEY UPDATE),"
            " u AS (UPDATE {t} s SET {flag} = true FROM k WHERE s.{pk} = k.{pk} RETURNING s.{pk}::text AS id)"
            " SELECT coalesce(array_agg(id), '{{}}') FROM u").format(t=table, pk=pk, flag=flag),
        {"table": subject.table}).fetchone()[0]  # type: ignore[index]
    if reflagged:  # cleared again at `lift`, as the flags the restriction set itself
        conn.execute("UPDATE gdpr.restriction SET flagged_ids = ARRAY(SELECT DISTINCT x FROM"
                     " unnest(flagged_ids || %(ids)s::text[]) x ORDER BY x)"
                     " WHERE subject_table = %(table)s AND subject_ids && %(ids)s::text[]",
                     {"ids": reflagged, "table": subject.table})
    return {"restricted_reflagged": len(reflagged), "restricted_adopted": int(adopted)}


# -- share and export --------------------------------------------------------------------------------


def spool_list(conn: psycopg.Connection, keys: Keys) -> tuple[IO[bytes], int]:
    """The list's current-key hashes, sorted, one per line, in a spooled temporary file (the caller
    closes it). Superseded entries (still under an earlier key) are left out. The people whose processing
    is restricted (gdpr.restriction, by email) are in it too while the restriction is in force: no campaign
    or share reaches them; the first share after `lift` no longer carries them (unless they are listed)."""
    spool = _spool()
    count = 0
    with conn.transaction(), conn.cursor().copy(
        sql.SQL("COPY (SELECT email_hash FROM {l} WHERE key_id = {k} UNION SELECT subject_hash FROM gdpr.restriction"
                " WHERE by_email AND key_id = {k} ORDER BY 1) TO STDOUT").format(
            l=candidates.qualified(LIST), k=sql.Literal(keys.hmac_key_id))
    ) as copy:
        for chunk in copy:
            spool.write(chunk)
            count += bytes(chunk).count(b"\n")
    spool.seek(0)
    return spool, count


def _batches(spool: IO[bytes], size: int) -> Iterator[list[str]]:
    spool.seek(0)
    batch: list[str] = []
    for line in spool:
        batch.append(line.decode().rstrip("\n"))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


SHARE_DEADLINE_SECONDS = 60.0  # per batch, whatever the peer does (a trickled answer is cut)


def post_hashes(target: ShareTarget, batches: Iterator[list[str]], http: HttpCall) -> tuple[int, int]:
    """POST each batch as ``{"hashes": [...]}`` to the target's endpoint through the transport seam (the
    Airflow layer gives base URL and auth from the target's HTTP connection). A batch counts only with a
    2xx answer: a redirect is never followed (a 3xx refuses the batch, like any other status). Returns
    (batches, hashes); raises ShareError at the first batch without a 2xx answer."""
    sent = hashes = 0
    for batch in batches:
        try:
            answer = http("POST", target.endpoint, json_body={"hashes": batch}, deadline_seconds=SHARE_DEADLINE_SECONDS)
        except ConnectionNotUsable:
            raise ShareError(f"share target {target.name}: connection {target.connection_id!r} not usable") from None
        except TransportError as exc:  # the message holds no URL and no personal data
            raise ShareError(f"share target {target.name}: no answer to batch {sent + 1} ({exc})") from None
        if not 200 <= answer.status < 300:
            raise ShareError(f"share target {target.name}: batch {sent + 1} refused with HTTP {answer.status}")
        sent += 1
        hashes += len(batch)
    return sent, hashes


def share(conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, target_name: str,
          transport: Transport) -> dict[str, Any]:
    """Push the whole list (current-key hashes) to one share target, in its batch size, through
    `transport` (the Airflow layer passes its adapter). Audited."""
    target = next((t for t in policy.optout.share_targets if t.name == target_name), None)
    if target is None:
        raise OptOutError(f"share target {target_name!r} is not declared in the policy's optout.share_targets")
    spool, count = spool_list(conn, keys)
    with spool:
        if ctx.dry_run:
            result = {"target": target.name, "hashes": count, "batches": 0}
            _dry_run_record(conn, ctx, action="share", table=f"target:{target.name}", row_count=count, details=result)
            return result
        started = time.monotonic()
        try:
            batches, sent = post_hashes(target, _batches(spool, target.batch_size),
                                            transport.http(target.connection_id))
        except ShareError as exc:
            with conn.transaction():
                audit.record(conn, ctx, action="share", outcome="failed", table=f"target:{target.name}",
                             details={"target": target.name, "hashes": count, "error": str(exc)})
            raise
    result = {"target": target.name, "hashes": sent, "batches": batches, "key_id": keys.hmac_key_id,
              "seconds": round(time.monotonic() - started, 3)}
    with conn.transaction():
        audit.record(conn, ctx, action="share", outcome="done", table=f"target:{target.name}", row_count=sent,
                     details=result)
    return result


def export_path(policy: Policy, policy_file: Path | None = None) -> Path | None:
    """The export file: `optout.export_path`, relative to the policy file's folder unless absolute."""
    if not policy.optout.export_path:
        return None
    path = Path(policy.optout.export_path).expanduser()
    if not path.is_absolute() and policy_file is not None:
        path = policy_file.resolve().parent / path
    return path


def export(conn: psycopg.Connection, keys: Keys, ctx: RunContext, path: Path) -> dict[str, Any]:
    """Write the list's current-key hashes to `path`, one per line, sorted (atomically replaced)."""
    spool, count = spool_list(conn, keys)
    with spool:
        if not ctx.dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    spool.seek(0)
                    while chunk := spool.read(1 << 20):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o640)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    result = {"file": path.name, "hashes": count, "key_id": keys.hmac_key_id}
    if ctx.dry_run:
        _dry_run_record(conn, ctx, action="export", table="file", row_count=count, details=result)
    else:
        with conn.transaction():
            audit.record(conn, ctx, action="export", outcome="done", table="file", row_count=count, details=result)
    return result


# -- for other pipelines -----------------------------------------------------------------------------


def is_suppressed(conn: psycopg.Connection, keys: Keys, email: str, *, strip_plus_tags: bool = False) -> bool:
    """Whether the person is on the list (any reason, any key of the chain). One indexed lookup.

    Pass the policy's `optout.strip_plus_tags`. Runs in the caller's transaction.
    """
    forms = list(keys.subject_hashes(email, strip_plus_tags).values())
    row = conn.execute(f"SELECT EXISTS (SELECT 1 FROM {LIST} WHERE email_hash = ANY(%s))", (forms,)).fetchone()
    return bool(row and row[0])


def _table_name(name: str) -> sql.Identifier:
    parts = name.split(".")
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise ValueError("staging_table must be 'table' or 'schema.table'")
    return sql.Identifier(*parts)


def filter_suppressed(
    conn: psycopg.Connection,
    keys: Keys,
    staging_table: str,
    email_column: str,
    *,
    strip_plus_tags: bool = False,
    ctx: RunContext | None = None,
) -> dict[str, int]:
    """Delete from a staging table every row whose email is on the list, before it lands anywhere.

    Set-based: one COPY out of (row id, email), hashes computed here (every key of the chain), one
    COPY in, one DELETE joined with the list. The staging table is locked against concurrent writes
    for the caller's transaction (run this and the load in ONE transaction to close the gap; the
    role needs DELETE on the staging table and SELECT on gdpr.suppression_list, e.g. through the
    gdpr_list_reader role). With `ctx`, an audit row records the counts. Returns
    {"checked": rows with an email, "dropped": rows deleted}.
    """
    table, column = _table_name(staging_table), sql.Identifier(email_column)
    hashes = keys.hasher(strip_plus_tags)
    with conn.transaction():
        conn.execute(sql.SQL("LOCK TABLE {t} IN SHARE ROW EXCLUSIVE MODE").format(t=table))
        conn.execute("DROP TABLE IF EXISTS _gdpr_optout_filter")
        conn.execute("CREATE TEMP TABLE _gdpr_optout_filter (row_ctid tid, email_hash text) ON COMMIT DROP")
        checked = 0
        with _spool() as spool:
            for ctid, address in _copy_rows(conn, sql.SQL(
                    "COPY (SELECT ctid, {c} FROM {t} WHERE {c} IS NOT NULL) TO STDOUT").format(c=column, t=table)):
                for value in hashes(_text(address)):
                    spool.write(b"%s\t%s\n" % (ctid, value.encode()))
                checked += 1
            _copy_in(conn, sql.SQL("COPY _gdpr_optout_filter (row_ctid, email_hash) FROM STDIN"), spool)
        conn.execute("ANALYZE _gdpr_optout_filter")
        dropped = conn.execute(
            sql.SQL("WITH m AS (SELECT DISTINCT f.row_ctid FROM _gdpr_optout_filter f JOIN {l} l"
                    " ON l.email_hash = f.email_hash),"
                    " d AS (DELETE FROM {t} s USING m WHERE s.ctid = m.row_ctid RETURNING 1)"
                    " SELECT count(*) FROM d").format(l=candidates.qualified(LIST), t=table)
        ).fetchone()[0]  # type: ignore[index]
        conn.execute("DROP TABLE _gdpr_optout_filter")
        if ctx is not None:
            audit.record(conn, ctx, action="filter_suppressed", outcome="done", table=staging_table,
                         row_count=dropped, details={"checked": checked, "dropped": dropped})
    return {"checked": checked, "dropped": dropped}


# -- the whole sync, for the demo, the benchmark and the tests ---------------------------------------


@dataclass
class SyncResult:
    rekey: dict[str, Any] = field(default_factory=dict)
    collect: dict[str, Any] = field(default_factory=dict)
    guard: dict[str, Any] = field(default_factory=dict)
    enforce: dict[str, Any] = field(default_factory=dict)
    share: list[dict[str, Any]] = field(default_factory=list)
    export: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sync(
    conn: psycopg.Connection, policy: Policy, keys: Keys, ctx: RunContext, as_of: str,
    export_to: Path | None = None, transport: Transport | None = None,
) -> SyncResult:
    """Every step in DAG order, in one process (the DAG runs them as separate tasks). The list is shared
    with the policy's share targets only through a `transport` (none given: not shared)."""
    result = SyncResult()
    result.rekey = rekey(conn, keys, ctx)
    result.collect = collect(conn, policy, keys, ctx, as_of)
    result.guard = guard(conn, policy, keys, ctx, as_of)
    result.enforce = enforce(conn, policy, keys, ctx)
    if transport is not None:
        result.share = [share(conn, policy, keys, ctx, t.name, transport) for t in policy.optout.share_targets]
    if export_to is not None:
        result.export = export(conn, keys, ctx, export_to)
    return result

