"""The weekly retention sweep: plan, apply, purge the archive, report.

Apply works in keyset batches over the subject's primary key. Each batch is ONE transaction that
holds the encrypted archive copy, the pseudonymisation or deletion of the live rows (dependent rows
first) and the audit rows describing it. A crash at any instant leaves every subject either
untouched or fully processed, and a rerun finishes the job: candidates are re-evaluated, and a
pseudonymised subject carries the marker column so it is never selected twice.

The batch's subject ids never leave the server: they live in a temporary table for the length of
the transaction, and every statement is set-based over it. Only pseudonymisation brings rows to
Python, because encryption and keyed hashing happen here (the warehouse may lack pgcrypto).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from . import audit, candidates
from .audit import RunContext
from .crypto import Keys, archive_aad
from .policy import FixedColumn, HashColumn, KeepColumn, MappedTable, NullColumn, Policy, Rule

log = logging.getLogger(__name__)

BATCH_TABLE = sql.Identifier("_gdpr_batch")
UNHELD = sql.SQL("(SELECT subject_id FROM _gdpr_batch WHERE cardinality(holds) = 0)")


@dataclass
class RulePlan:
    rule: str
    action: str
    candidates: int
    held: int
    by_hold: dict[str, int]
    seconds: float


@dataclass
class RuleResult:
    rule: str
    action: str
    candidates: int = 0
    held: int = 0
    archived: int = 0
    pseudonymised: int = 0
    deleted: int = 0
    rows_by_table: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_rules(policy: Policy, names: list[str] | None) -> list[Rule]:
    """The rules to run: all, or the named subset (unknown names are an error, nothing runs)."""
    if not names:
        return list(policy.rules)
    known = [r.name for r in policy.rules]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(unknown)}; the policy defines: {', '.join(known)}")
    return [r for r in policy.rules if r.name in names]


def plan(conn: psycopg.Connection, policy: Policy, selected: list[Rule], as_of: str) -> list[RulePlan]:
    """Count each rule's candidates and held subjects: one set-based query per rule, no write."""
    plans = []
    for rule in selected:
        started = time.monotonic()
        row = conn.execute(candidates.plan_query(policy, rule), candidates.rule_params(policy, rule, as_of)).fetchone()
        conn.rollback()
        assert row is not None
        plans.append(RulePlan(rule.name, rule.action, row[0], row[1], dict(row[2]), time.monotonic() - started))
    return plans


# -- apply ------------------------------------------------------------------------------------


def apply_rule(
    conn: psycopg.Connection,
    policy: Policy,
    rule: Rule,
    keys: Keys,
    ctx: RunContext,
    as_of: str,
    batch_size: int | None = None,
) -> RuleResult:
    """Delete or pseudonymise the rule's expired, unheld subjects, batch by batch (see module doc)."""
    batch_size = batch_size or policy.batch_size
    result = RuleResult(rule.name, rule.action)
    params: dict[str, Any] = {**candidates.rule_params(policy, rule, as_of), "limit": batch_size}
    started = time.monotonic()
    after: Any = None
    while True:
        batch_started = time.monotonic()
        with conn.transaction():
            query = candidates.batch_query(policy, rule, first=after is None)
            conn.execute(
                sql.SQL("CREATE TEMP TABLE {t} ON COMMIT DROP AS {q}").format(
                    t=BATCH_TABLE, q=sql.SQL("SELECT * FROM ({q}) b(subject_id, holds)").format(q=query)
                ),
                {**params, "after": after},
            )
            count, held, last = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE cardinality(holds) > 0), max(subject_id) FROM _gdpr_batch"
            ).fetchone()  # type: ignore[misc]
            if count == 0:
                break
            after = last
            # Lock the batch's subjects so that concurrent writers (new activities reference the
            # subject) wait for this transaction instead of racing it.
            conn.execute(
                sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {t} s WHERE s.{pk} IN {ids} FOR UPDATE) locked").format(
                    t=candidates.qualified(policy.subject.table), pk=sql.Identifier(policy.subject.primary_key), ids=UNHELD
                )
            )
            if rule.action == "delete":
                counts = _delete_batch(conn, policy)
                result.deleted += counts.get(policy.subject.table, 0)
            else:
                counts, archived = _pseudonymise_batch(conn, policy, rule, keys, ctx, as_of)
                result.archived += archived
                result.pseudonymised += counts.get(policy.subject.table, 0)
            for table, n in counts.items():
                result.rows_by_table[table] = result.rows_by_table.get(table, 0) + n
                audit.record(conn, ctx, action=rule.action, outcome="done", rule=rule.name, table=table, row_count=n)
            if rule.action == "pseudonymise":
                audit.record(
                    conn, ctx, action="archive", outcome="done", rule=rule.name,
                    table="gdpr_archive.archived_row", row_count=archived,
                )
            audit.record(
                conn, ctx, action="batch", outcome="done", rule=rule.name, row_count=count - held,
                details={"candidates": count, "held": held, "seconds": round(time.monotonic() - batch_started, 3)},
            )
        result.candidates += count
        result.held += held
        result.batches += 1
    result.seconds = time.monotonic() - started
    return result


def _delete_batch(conn: psycopg.Connection, policy: Policy) -> dict[str, int]:
    """Delete the batch's unheld subjects and every mapped dependent row, dependents first."""
    counts: dict[str, int] = {}
    for mapped in policy.dependent_tables:
        cur = conn.execute(
            sql.SQL("DELETE FROM {t} WHERE {c} IN {ids}").format(
                t=candidates.qualified(mapped.table), c=sql.Identifier(mapped.subject_column), ids=UNHELD
            )
        )
        counts[mapped.table] = cur.rowcount
    subject = policy.subject
    try:
        cur = conn.execute(
            sql.SQL("DELETE FROM {t} WHERE {pk} IN {ids}").format(
                t=candidates.qualified(subject.table), pk=sql.Identifier(subject.primary_key), ids=UNHELD
            )
        )
    except psycopg.errors.ForeignKeyViolation as exc:
        raise RuntimeError(
            f"deleting from {subject.table} is blocked by a foreign key from table {exc.diag.table_name!r}, "
            "which the policy does not map: add it to `tables` (with its subject_column) so its rows are handled"
        ) from None
    counts[subject.table] = cur.rowcount
    return counts


def _treatment_sql(mapped: MappedTable) -> tuple[list[str], list[sql.Composable]]:
    """(hash columns, SET clauses for null/fixed columns) of a mapped table."""
    hashed: list[str] = []
    sets: list[sql.Composable] = []
    for name, treatment in mapped.columns.items():
        if isinstance(treatment, HashColumn):
            hashed.append(name)
        elif isinstance(treatment, NullColumn):
            sets.append(sql.SQL("{c} = NULL").format(c=sql.Identifier(name)))
        elif isinstance(treatment, FixedColumn):
            sets.append(sql.SQL("{c} = {v}").format(c=sql.Identifier(name), v=sql.Literal(treatment.value)))
        else:
            assert isinstance(treatment, KeepColumn)
    return hashed, sets


def _pseudonymise_batch(
    conn: psycopg.Connection,
    policy: Policy,
    rule: Rule,
    keys: Keys,
    ctx: RunContext,
    as_of: str,
) -> tuple[dict[str, int], int]:
    """Archive the originals of the tables a legal obligation keeps (`tables[].archive`), encrypted, then
    overwrite personal columns. Other tables keep no copy. Returns (rows per table, rows archived)."""
    counts: dict[str, int] = {}
    archived = 0
    subject = policy.subject
    # Email columns hash the normalised email, chained over the peppers: the value `Keys.subject_hash`
    # gives, so erasure, the suppression list and `warehouse-gdpr subject-hash` find the person by it.
    email_hash = keys.hasher(policy.optout.strip_plus_tags)
    for mapped in policy.tables:
        hashed, sets = _treatment_sql(mapped)
        is_subject = mapped.table == subject.table
        if is_subject:
            sets.append(sql.SQL("{m} = now()").format(m=sql.Identifier(subject.pseudonymised_marker)))
        if not hashed and not sets:
            continue
        table = candidates.qualified(mapped.table)
        pk = sql.Identifier(mapped.primary_key)
        link = sql.Identifier(mapped.subject_column)
        originals: list[tuple[str, str, str, datetime | None]] = []
        if mapped.archive or hashed:
            # Only rows to archive or to hash come to Python; other tables are updated in place.
            if mapped.archive:
                row, purge = sql.SQL("to_jsonb(t)"), _purge_after_sql(mapped, as_of)
            else:  # the hashed columns only
                row = sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
                    sql.SQL("{n}, t.{c}").format(n=sql.Literal(c), c=sql.Identifier(c)) for c in hashed))
                purge = sql.SQL("NULL::timestamptz")
            originals = conn.execute(
                sql.SQL(
                    "SELECT t.{pk}::text, t.{link}::text, {row}::text, {purge} FROM {t} t WHERE t.{link} IN {ids}"
                ).format(pk=pk, link=link, row=row, t=table, ids=UNHELD, purge=purge)
            ).fetchall()
            if not originals:
                continue
            kept = [r for r in originals if r[3] is not None]
            if kept:
                archived += _archive_rows(conn, mapped.table, kept, rule, keys, ctx)
        if hashed:
            emails = set(policy.hashed_email_columns(mapped))
            # Keyed hashes are computed here; they travel back through a typed temp table.
            conn.execute(
                sql.SQL("CREATE TEMP TABLE _gdpr_hash ON COMMIT DROP AS SELECT {cols} FROM {t} WITH NO DATA").format(
                    cols=sql.SQL(", ").join(sql.Identifier(c) for c in [mapped.primary_key, *hashed]), t=table
                )
            )
            with conn.cursor().copy(
                sql.SQL("COPY _gdpr_hash ({cols}) FROM STDIN").format(
                    cols=sql.SQL(", ").join(sql.Identifier(c) for c in [mapped.primary_key, *hashed])
                )
            ) as copy:
                for source_pk, _subject_id, row_json, _purge in originals:
                    values = json.loads(row_json)
                    copy.write_row((source_pk, *(
                        None if values[c] is None
                        else email_hash(str(values[c]))[-1] if c in emails
                        else keys.hash_value(str(values[c]))
                        for c in hashed
                    )))
            hash_sets = [sql.SQL("{c} = h.{c}").format(c=sql.Identifier(c)) for c in hashed]
            cur = conn.execute(
                sql.SQL("UPDATE {t} t SET {sets} FROM _gdpr_hash h WHERE t.{pk} = h.{pk}").format(
                    t=table, sets=sql.SQL(", ").join([*hash_sets, *sets]), pk=pk
                )
            )
            conn.execute("DROP TABLE _gdpr_hash")
        else:
            cur = conn.execute(
                sql.SQL("UPDATE {t} SET {sets} WHERE {link} IN {ids}").format(
                    t=table, sets=sql.SQL(", ").join(sets), link=link, ids=UNHELD
                )
            )
        if cur.rowcount:
            counts[mapped.table] = cur.rowcount
    return counts, archived


def _purge_after_sql(mapped: MappedTable, as_of: str) -> sql.Composable:
    """When the archived original of a row of `mapped` is destroyed: its obligation's period after `from`
    (else after `as_of`); NULL when that instant is not after `as_of` (the obligation has ended: no copy)."""
    assert mapped.archive is not None
    now = sql.SQL("{}::timestamptz").format(sql.Literal(as_of))
    start = (sql.SQL("coalesce(t.{c}::timestamptz, {now})").format(c=sql.Identifier(mapped.archive.from_), now=now)
             if mapped.archive.from_ else now)
    until = sql.SQL("({start} + {period}::interval)").format(start=start, period=sql.Literal(mapped.archive.for_))
    return sql.SQL("CASE WHEN {until} > {now} THEN {until} END").format(until=until, now=now)


ARCHIVE_COLUMNS = "source_table, source_pk, subject_id, rule, run_id, purge_after, key_id, nonce, ciphertext"


def _archive_rows(
    conn: psycopg.Connection,
    table: str,
    originals: list[tuple[str, str, str, datetime]],
    rule: Rule,
    keys: Keys,
    ctx: RunContext,
) -> int:
    """Encrypt (pk, subject id, row JSON, purge_after) originals into gdpr_archive.archived_row; returns rows added.

    A row archived before (e.g. restored from a backup and pseudonymised again) keeps its first
    archived original: ON CONFLICT DO NOTHING, through a staging table because COPY cannot.
    """
    conn.execute(
        "CREATE TEMP TABLE _gdpr_archive_stage ON COMMIT DROP AS"
        f" SELECT {ARCHIVE_COLUMNS} FROM gdpr_archive.archived_row WITH NO DATA"
    )
    with conn.cursor().copy(f"COPY _gdpr_archive_stage ({ARCHIVE_COLUMNS}) FROM STDIN") as copy:
        for source_pk, subject_id, row_json, purge_after in originals:
            aad = archive_aad(table, source_pk, keys.archive_key_id)
            key_id, nonce, ciphertext = keys.encrypt(row_json.encode(), aad)
            copy.write_row((table, source_pk, subject_id, rule.name, ctx.run_id, purge_after, key_id, nonce, ciphertext))
    cur = conn.execute(
        f"INSERT INTO gdpr_archive.archived_row ({ARCHIVE_COLUMNS}) SELECT {ARCHIVE_COLUMNS} FROM _gdpr_archive_stage"
        " ON CONFLICT (source_table, source_pk) DO NOTHING"
    )
    conn.execute("DROP TABLE _gdpr_archive_stage")
    return cur.rowcount


# -- archive purge ----------------------------------------------------------------------------


def purge_archive(conn: psycopg.Connection, ctx: RunContext, as_of: str, batch_size: int) -> int:
    """Delete archive rows whose own retention ended, in batches, each with its audit row."""
    if ctx.dry_run:
        n = conn.execute(
            "SELECT count(*) FROM gdpr_archive.archived_row WHERE purge_after < %s::timestamptz", (as_of,)
        ).fetchone()[0]  # type: ignore[index]
        with conn.transaction():
            audit.record(conn, ctx, action="purge_archive", outcome="dry_run", table="gdpr_archive.archived_row", row_count=n)
        return n
    total = 0
    while True:
        with conn.transaction():
            rows = conn.execute(
                "DELETE FROM gdpr_archive.archived_row WHERE archive_id IN ("
                " SELECT archive_id FROM gdpr_archive.archived_row WHERE purge_after < %s::timestamptz"
                " ORDER BY archive_id LIMIT %s) RETURNING rule",
                (as_of, batch_size),
            ).fetchall()
            if not rows:
                break
            by_rule: dict[str, int] = {}
            for (rule_name,) in rows:
                by_rule[rule_name] = by_rule.get(rule_name, 0) + 1
            for rule_name, n in sorted(by_rule.items()):
                audit.record(
                    conn, ctx, action="purge_archive", outcome="done", rule=rule_name,
                    table="gdpr_archive.archived_row", row_count=n,
                )
        total += len(rows)
    if total == 0:
        with conn.transaction():
            audit.record(
                conn, ctx, action="purge_archive", outcome="nothing_to_purge", table="gdpr_archive.archived_row"
            )
    return total


# -- logs for on-call staff -------------------------------------------------------------------


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A small fixed-width table for task logs (counts and timings only)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
