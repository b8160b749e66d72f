"""Check the policy against the live catalog, before any write.

`check_policy(conn, policy)` reads pg_catalog once, then checks every table and column the policy
names, the column types pseudonymisation needs, and that each hold predicate compiles. It raises
`CatalogError` listing every problem with its place in the policy (``tables[2].columns.body``), and
returns warnings (e.g. a join column without an index) for the logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from .policy import FixedColumn, HashColumn, LastInteractionClock, NullColumn, Policy, RelatedMaxClock
from .candidates import hold_predicate, qualified

TEXT_TYPES = ("text", "character varying", "character")
TIME_TYPES = ("timestamp with time zone", "timestamp without time zone", "date")


class CatalogError(ValueError):
    """The policy does not match the live database. The message lists every mismatch."""


@dataclass(frozen=True)
class Column:
    type: str
    not_null: bool
    max_length: int | None


@dataclass
class CatalogReport:
    warnings: list[str] = field(default_factory=list)
    tables: int = 0
    columns: int = 0


def _load_columns(conn: psycopg.Connection, schemas: set[str]) -> dict[str, dict[str, Column]]:
    rows = conn.execute(
        """
        SELECT n.nspname || '.' || c.relname, a.attname, format_type(a.atttypid, NULL), a.attnotnull,
               CASE WHEN a.atttypmod > 4 AND a.atttypid IN (1042, 1043) THEN a.atttypmod - 4 END
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY(%s)
        """,
        (sorted(schemas),),
    ).fetchall()
    tables: dict[str, dict[str, Column]] = {}
    for table, column, type_, not_null, max_length in rows:
        tables.setdefault(table, {})[column] = Column(type_, not_null, max_length)
    return tables


def _indexed_first_columns(conn: psycopg.Connection, schemas: set[str]) -> set[tuple[str, str]]:
    rows = conn.execute(
        """
        SELECT n.nspname || '.' || t.relname, a.attname
        FROM pg_catalog.pg_index i
        JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
        JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace
        JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0]
        WHERE n.nspname = ANY(%s) AND i.indisvalid AND i.indpred IS NULL
        """,
        (sorted(schemas),),
    ).fetchall()
    return {(table, column) for table, column in rows}


def check_policy(conn: psycopg.Connection, policy: Policy) -> CatalogReport:
    """Raise CatalogError unless every identifier of the policy exists with a usable type."""
    problems: list[str] = []
    report = CatalogReport()
    names = {t.table for t in policy.tables} | {policy.interactions.table}
    schemas = {n.split(".", 1)[0] for n in names}
    catalog = _load_columns(conn, schemas)

    def need(where: str, table: str, column: str | None = None) -> Column | None:
        cols = catalog.get(table)
        if cols is None:
            problems.append(f"{where}: table {table} does not exist")
            return None
        if column is None:
            return None
        col = cols.get(column)
        if col is None:
            problems.append(f"{where}: column {table}.{column} does not exist")
        return col

    subject = policy.subject
    need("subject.table", subject.table)
    need("subject.primary_key", subject.table, subject.primary_key)
    need("subject.email_column", subject.table, subject.email_column)
    if subject.phone_column:
        need("subject.phone_column", subject.table, subject.phone_column)
    marker = need("subject.pseudonymised_marker", subject.table, subject.pseudonymised_marker)
    if marker and marker.type not in TIME_TYPES:
        problems.append(
            f"subject.pseudonymised_marker: column {subject.table}.{subject.pseudonymised_marker} is {marker.type}, "
            "expected a timestamp"
        )

    if subject.restriction_column:
        flag = need("subject.restriction_column", subject.table, subject.restriction_column)
        if flag and flag.type != "boolean":
            problems.append(
                f"subject.restriction_column: column {subject.table}.{subject.restriction_column} is {flag.type}, "
                "expected boolean"
            )

    for i, mapped in enumerate(policy.tables):
        where = f"tables[{i}]"
        if mapped.table not in catalog:
            need(f"{where}.table", mapped.table)
            continue
        report.tables += 1
        need(f"{where}.primary_key", mapped.table, mapped.primary_key)
        need(f"{where}.subject_column", mapped.table, mapped.subject_column)
        for j, name in enumerate(mapped.email_columns):
            col = need(f"{where}.email_columns[{j}]", mapped.table, name)
            if col and col.type not in TEXT_TYPES:
                problems.append(f"{where}.email_columns[{j}]: column {mapped.table}.{name} is {col.type}, expected text")
        if mapped.archive and mapped.archive.from_:
            col = need(f"{where}.archive.from", mapped.table, mapped.archive.from_)
            if col and col.type not in TIME_TYPES:
                problems.append(f"{where}.archive.from: column {mapped.table}.{mapped.archive.from_} is {col.type}, "
                                "expected a date or timestamp")
        for name, treatment in mapped.columns.items():
            col = need(f"{where}.columns.{name}", mapped.table, name)
            if col is None:
                continue
            report.columns += 1
            target = f"{where}.columns.{name}: column {mapped.table}.{name}"
            if isinstance(treatment, NullColumn) and col.not_null:
                problems.append(f"{target} is NOT NULL, so it cannot be pseudonymised to null")
            if isinstance(treatment, (HashColumn, FixedColumn)) and col.type not in TEXT_TYPES:
                problems.append(f"{target} is {col.type}; hash and fixed need a text column")
            if isinstance(treatment, HashColumn) and col.max_length is not None and col.max_length < 64:
                problems.append(f"{target} holds {col.max_length} characters; a hash needs 64")
            if isinstance(treatment, FixedColumn) and col.max_length is not None and len(treatment.value) > col.max_length:
                problems.append(f"{target} holds {col.max_length} characters; the fixed value is longer")

    inter = policy.interactions
    need("interactions.table", inter.table)
    for key in ("subject_column", "kind_column", "at_column"):
        need(f"interactions.{key}", inter.table, getattr(inter, key))

    for i, rule in enumerate(policy.rules):
        where = f"rules[{i}]"
        need(f"{where}.statuses.column", subject.table, rule.statuses.column)
        if isinstance(rule.clock, LastInteractionClock) and rule.clock.fallback:
            need(f"{where}.clock.fallback", subject.table, rule.clock.fallback)
        if isinstance(rule.clock, RelatedMaxClock):
            col = need(f"{where}.clock.column", rule.clock.table, rule.clock.column)
            if col and col.type not in TIME_TYPES:
                problems.append(f"{where}.clock.column: {rule.clock.table}.{rule.clock.column} is {col.type}, expected a date")

    if problems:
        raise CatalogError(_message(problems))

    # Hold predicates are SQL: make the server compile each one (EXPLAIN runs nothing).
    for i, hold in enumerate(policy.holds):
        problem = compile_problem(conn, subject.table, hold_predicate(hold))
        if problem:
            problems.append(f"holds[{i}] ({hold.name}).predicate: does not compile: {problem}")
    if problems:
        raise CatalogError(_message(problems))

    indexed = _indexed_first_columns(conn, schemas)
    for mapped in policy.tables:
        if (mapped.table, mapped.subject_column) not in indexed:
            report.warnings.append(
                f"{mapped.table}.{mapped.subject_column} has no index starting with it: sweeps and erasures will scan the table"
            )
    if (inter.table, inter.subject_column) not in indexed:
        report.warnings.append(f"{inter.table}.{inter.subject_column} has no index: clock evaluation will scan the table")
    return report


def compile_problem(conn: psycopg.Connection, subject_table: str, predicate: sql.Composable) -> str | None:
    """None when a policy predicate on the subject row `s` compiles (EXPLAIN plans, runs nothing),
    else the server's message."""
    query = sql.SQL("EXPLAIN SELECT 1 FROM {table} s WHERE ({pred})").format(
        table=qualified(subject_table), pred=predicate
    )
    try:
        with conn.transaction():
            conn.execute(query, {"as_of": "now"})
    except psycopg.Error as exc:
        return (exc.diag.message_primary or type(exc).__name__) if exc.diag else type(exc).__name__
    return None


def _message(problems: list[str]) -> str:
    return "the policy does not match the warehouse (nothing was changed):\n" + "\n".join(f"  - {p}" for p in problems)
