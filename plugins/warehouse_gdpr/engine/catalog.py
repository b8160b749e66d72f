"""Check the policy against the live catalog, before any write.

`check_policy(conn, policy)` reads pg_catalog once, then checks every table and column the policy
names and the column types pseudonymisation needs; then that the keys are keys (each `primary_key`
unique, each `subject_column` of the subject key's type and, where a foreign key is declared on it,
referencing the subject's key), that every table with a foreign key to the subject table is mapped,
and that each hold predicate compiles; then, with one set-based query per list, that the
subject-initiated interaction kinds and each rule's status values occur in the data (a typo there
deletes active people, or keeps expired ones). It also warns about what an access request could not
answer (`access_warnings`). It raises `CatalogError` listing every problem with
its place in the policy (``tables[2].columns.body``), and returns warnings for the logs: a join or email
column without its index, and a rule that can never select some subjects of its statuses (their clock
has no date and no fallback) or selects nobody. It only reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from .candidates import hold_predicate, qualified, rule_params, unselectable_query
from .errors import ConfigurationError
from .policy import ColumnTreatment, FixedColumn, HashColumn, NullColumn, Policy, RelatedMaxClock

TEXT_TYPES = ("text", "character varying", "character")
TIME_TYPES = ("timestamp with time zone", "timestamp without time zone", "date")
INTEGER_TYPES = ("smallint", "integer", "bigint")


class CatalogError(ConfigurationError, ValueError):
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


_INDEX_FIRST_COLUMNS = """
    SELECT n.nspname || '.' || t.relname, a.attname
    FROM pg_catalog.pg_index i
    JOIN pg_catalog.pg_class t ON t.oid = i.indrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace
    JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0]
    WHERE n.nspname = ANY(%s) AND i.indisvalid AND i.indpred IS NULL
"""


def _indexed_first_columns(conn: psycopg.Connection, schemas: set[str]) -> set[tuple[str, str]]:
    """(table, column) pairs that lead a valid, non-partial index (a join on the column can use it)."""
    rows = conn.execute(_INDEX_FIRST_COLUMNS, (sorted(schemas),)).fetchall()
    return {(table, column) for table, column in rows}


def _unique_columns(conn: psycopg.Connection, schemas: set[str]) -> set[tuple[str, str]]:
    """(table, column) pairs that are a key on their own: a valid, non-partial unique index on that one
    column (what a primary key or a single-column unique constraint creates)."""
    query = _INDEX_FIRST_COLUMNS + "  AND i.indisunique AND i.indnkeyatts = 1 AND i.indexprs IS NULL\n"
    rows = conn.execute(query, (sorted(schemas),)).fetchall()
    return {(table, column) for table, column in rows}


@dataclass(frozen=True)
class ForeignKey:
    name: str
    table: str
    columns: tuple[str, ...]
    references: str
    referenced_columns: tuple[str, ...]


def _foreign_keys(conn: psycopg.Connection, schemas: set[str], subject_table: str) -> list[ForeignKey]:
    """Foreign keys declared on the policy's schemas' tables, and every foreign key (from any schema)
    that references the subject table. Partitions' copies of a parent's constraint are left out."""
    subject_schema, subject_name = subject_table.split(".", 1)
    rows = conn.execute(
        """
        SELECT c.conname, fn.nspname || '.' || f.relname,
               ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(num, ord)
                     JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.num ORDER BY k.ord),
               tn.nspname || '.' || t.relname,
               ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(num, ord)
                     JOIN pg_catalog.pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.num ORDER BY k.ord)
        FROM pg_catalog.pg_constraint c
        JOIN pg_catalog.pg_class f ON f.oid = c.conrelid
        JOIN pg_catalog.pg_namespace fn ON fn.oid = f.relnamespace
        JOIN pg_catalog.pg_class t ON t.oid = c.confrelid
        JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
        WHERE c.contype = 'f' AND c.conparentid = 0
          AND (fn.nspname = ANY(%s) OR (tn.nspname = %s AND t.relname = %s))
        ORDER BY 2, 1
        """,
        (sorted(schemas), subject_schema, subject_name),
    ).fetchall()
    return [ForeignKey(name, table, tuple(cols), ref, tuple(ref_cols)) for name, table, cols, ref, ref_cols in rows]


def _same_type(a: str, b: str) -> bool:
    """Joinable without a cast that could change a value: the same type, two integer types or two text types."""
    return a == b or (a in INTEGER_TYPES and b in INTEGER_TYPES) or (a in TEXT_TYPES and b in TEXT_TYPES)


def _key_problems(
    policy: Policy, catalog: dict[str, dict[str, Column]], unique: set[tuple[str, str]], fks: list[ForeignKey]
) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the policy's keys: each primary_key is a key, each subject column joins the
    subject's key (same type; a foreign key declared on it references that key), and every table with a
    foreign key to the subject table is mapped. Every column named here is known to exist."""
    subject = policy.subject
    keys = [("subject.primary_key", subject.table, subject.primary_key)] + [
        (f"tables[{i}].primary_key", t.table, t.primary_key) for i, t in enumerate(policy.tables)
        if t.table != subject.table or t.primary_key != subject.primary_key
    ]
    problems = [
        f"{where}: {table}.{column} is not a key (no primary key, unique constraint or unique index on "
        "that column alone): rows sharing a value would be treated together"
        for where, table, column in keys if (table, column) not in unique
    ]
    links = [(f"tables[{i}]", t.table, t.subject_column) for i, t in enumerate(policy.tables)]
    links.append(("interactions", policy.interactions.table, policy.interactions.subject_column))
    for where, table, column in links:
        if table != subject.table:  # the model makes the subject's own entry join on subject.primary_key
            problems += _link_problems(policy, catalog, fks, f"{where}.subject_column", table, column)
    unmapped, warnings = _unmapped_problems(policy, fks)
    return problems + unmapped, warnings


def _link_problems(
    policy: Policy, catalog: dict[str, dict[str, Column]], fks: list[ForeignKey], where: str, table: str, column: str
) -> list[str]:
    """Problems of one subject column: it has the subject key's type, and a foreign key declared on it
    references the subject key."""
    subject = policy.subject
    problems = []
    key_type = catalog[subject.table][subject.primary_key].type
    column_type = catalog[table][column].type
    if not _same_type(column_type, key_type):
        problems.append(
            f"{where}: {table}.{column} is {column_type}, but the subject key "
            f"{subject.table}.{subject.primary_key} is {key_type}"
        )
    for fk in fks:
        if fk.table != table or column not in fk.columns:
            continue
        target = (fk.references, fk.referenced_columns[fk.columns.index(column)])
        if target != (subject.table, subject.primary_key):
            problems.append(
                f"{where}: {table}.{column} has a foreign key ({fk.name}) to "
                f"{target[0]}.{target[1]}, not to the subject key {subject.table}.{subject.primary_key}"
            )
    return problems


def _unmapped_problems(policy: Policy, fks: list[ForeignKey]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the foreign keys to the subject table: each comes from a mapped table (else
    its rows would be kept in clear), and through the column the policy joins that table on."""
    subject = policy.subject
    problems: list[str] = []
    warnings: list[str] = []
    mapped_columns = {t.table: t.subject_column for t in policy.tables}
    for fk in fks:
        if fk.references != subject.table or fk.table == subject.table:
            continue
        if fk.table not in mapped_columns:
            problems.append(
                f"tables: {fk.table} has a foreign key ({fk.name}) to {subject.table} but is not mapped: add it to "
                "`tables` (with its primary_key and subject_column) so that its rows are deleted or pseudonymised "
                "with their subject"
            )
        elif mapped_columns[fk.table] not in fk.columns:
            warnings.append(
                f"{fk.table}.{', '.join(fk.columns)} references {subject.table} ({fk.name}) but the policy joins "
                f"that table on {mapped_columns[fk.table]}: rows linked only through those columns are not "
                "treated with that subject (deleting the subject fails, or cascades, as the foreign key says)"
            )
    return problems, warnings


def _absent_values(
    conn: psycopg.Connection, table: str, column: str, values: list[str]
) -> tuple[bool, list[str]]:
    """(whether the table has any row, the values no row holds in `column`): one set-based query."""
    row = conn.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {t}),"
            " ARRAY(SELECT u.v FROM unnest(%(values)s::text[]) WITH ORDINALITY u(v, n)"
            " WHERE NOT EXISTS (SELECT 1 FROM {t} x WHERE x.{c}::text = u.v) ORDER BY u.n)"
        ).format(t=qualified(table), c=sql.Identifier(column)),
        {"values": values},
    ).fetchone()
    assert row is not None
    return bool(row[0]), list(row[1])


def _data_problems(conn: psycopg.Connection, policy: Policy) -> tuple[list[str], list[str]]:
    """(problems, warnings): kinds and status values of the policy that occur nowhere in the data.

    A kind that occurs nowhere is almost always a typo, and a typo in `subject_initiated` silently
    drops the person's own interactions from the clock (active people deleted); a status value that
    occurs nowhere makes a rule never fire (expired people kept). A value listed in `expect_absent`
    only warns; an empty table only warns (nothing to compare with yet)."""
    problems: list[str] = []
    warnings: list[str] = []

    def judge(where: str, what: str, table: str, column: str, values: list[str], expected: list[str]) -> None:
        has_rows, absent = _absent_values(conn, table, column, values)
        if not has_rows:
            warnings.append(f"{where}: {table} is empty, so its {what} could not be compared with the data")
            return
        typos = [v for v in absent if v not in expected]
        if typos:
            problems.append(
                f"{where}: {_values(typos, 'occurs', 'occur')} nowhere in {table}.{column} (a typo?); if that is "
                f"intended, list {'it' if len(typos) == 1 else 'them'} under {where.rsplit('.', 1)[0]}.expect_absent"
            )
        waiting = [v for v in absent if v in expected]
        if waiting:
            warnings.append(f"{where}: {_values(waiting, 'occurs', 'occur')} nowhere in {table}.{column} yet "
                            "(listed in expect_absent)")
        present = [v for v in expected if v not in absent]
        if present:
            warnings.append(f"{where}: {_values(present, 'occurs', 'occur')} in {table}.{column} now: remove "
                            f"{'it' if len(present) == 1 else 'them'} from expect_absent")

    inter = policy.interactions
    judge("interactions.subject_initiated", "interaction kinds", inter.table, inter.kind_column,
          list(inter.subject_initiated), list(inter.expect_absent))
    for i, rule in enumerate(policy.rules):
        judge(f"rules[{i}].statuses.values", "status values", policy.subject.table, rule.statuses.column,
              list(rule.statuses.values), list(rule.statuses.expect_absent))
    return problems, warnings


def _values(values: list[str], singular: str, plural: str) -> str:
    return f"{', '.join(repr(v) for v in values)} {singular if len(values) == 1 else plural}"


def sql_error(exc: psycopg.Error) -> str:
    """What went wrong, for a log or a terminal, without the values a data error may quote."""
    state = getattr(exc, "sqlstate", None) or ""
    primary = exc.diag.message_primary if getattr(exc, "diag", None) else None
    if not state:
        return str(exc).strip() or type(exc).__name__
    if state[:2] in ("22", "23", "P0") or not primary:  # data, integrity, raised: may quote a row's value
        return f"{type(exc).__name__} (SQLSTATE {state})"
    return f"{primary} (SQLSTATE {state})"


def check_policy(conn: psycopg.Connection, policy: Policy) -> CatalogReport:
    """Raise CatalogError unless every identifier of the policy exists with a usable type.

    Steps, each only once the previous one passed: names and types (one catalog read); keys and hold
    predicates; the values the policy expects in the data. Then the warnings: indexes, rules that
    select nobody, what an access request could not answer."""
    report = CatalogReport()
    names = {t.table for t in policy.tables} | {policy.interactions.table}
    schemas = {n.split(".", 1)[0] for n in names}
    found = _Lookup(_load_columns(conn, schemas))
    _check_subject(found, policy)
    _check_tables(found, policy, report)
    _check_interactions_and_rules(found, policy)
    _check_rectification(found, policy)
    if found.problems:
        raise CatalogError(_message(found.problems))

    # Keys that are not keys treat other people's rows; an unmapped table keeps its rows in clear.
    problems, key_warnings = _key_problems(
        policy, found.catalog, _unique_columns(conn, schemas), _foreign_keys(conn, schemas, policy.subject.table)
    )
    report.warnings += key_warnings
    problems += _hold_problems(conn, policy)
    if problems:
        raise CatalogError(_message(problems))

    report.warnings += _checked_data(conn, policy)
    report.warnings += _index_warnings(conn, policy, schemas)
    for i in range(len(policy.rules)):
        report.warnings += _unselectable(conn, policy, i, found.catalog[policy.subject.table])
    report.warnings += access_warnings(policy)
    return report


class _Lookup:
    """The columns of the policy's schemas, and the problems met looking the policy's names up in them."""

    def __init__(self, catalog: dict[str, dict[str, Column]]) -> None:
        self.catalog = catalog
        self.problems: list[str] = []

    def need(self, where: str, table: str, column: str | None = None) -> Column | None:
        """The column (None for a table alone); a missing table or column is a problem."""
        cols = self.catalog.get(table)
        if cols is None:
            self.problems.append(f"{where}: table {table} does not exist")
            return None
        if column is None:
            return None
        col = cols.get(column)
        if col is None:
            self.problems.append(f"{where}: column {table}.{column} does not exist")
        return col


def _check_subject(found: _Lookup, policy: Policy) -> None:
    """The subject's table and columns exist; the marker is a timestamp and the flag a boolean."""
    subject = policy.subject
    found.need("subject.table", subject.table)
    found.need("subject.primary_key", subject.table, subject.primary_key)
    found.need("subject.email_column", subject.table, subject.email_column)
    if subject.phone_column:
        found.need("subject.phone_column", subject.table, subject.phone_column)
    marker = found.need("subject.pseudonymised_marker", subject.table, subject.pseudonymised_marker)
    if marker and marker.type not in TIME_TYPES:
        found.problems.append(
            f"subject.pseudonymised_marker: column {subject.table}.{subject.pseudonymised_marker} is {marker.type}, "
            "expected a timestamp"
        )
    if subject.restriction_column:
        flag = found.need("subject.restriction_column", subject.table, subject.restriction_column)
        if flag and flag.type != "boolean":
            found.problems.append(
                f"subject.restriction_column: column {subject.table}.{subject.restriction_column} is {flag.type}, "
                "expected boolean"
            )


def _check_tables(found: _Lookup, policy: Policy, report: CatalogReport) -> None:
    """Each mapped table exists with its key, subject and email columns, and each pseudonymised column can
    take its treatment (counted in the report)."""
    for i, mapped in enumerate(policy.tables):
        where = f"tables[{i}]"
        if mapped.table not in found.catalog:
            found.need(f"{where}.table", mapped.table)
            continue
        report.tables += 1
        found.need(f"{where}.primary_key", mapped.table, mapped.primary_key)
        found.need(f"{where}.subject_column", mapped.table, mapped.subject_column)
        for j, name in enumerate(mapped.email_columns):
            col = found.need(f"{where}.email_columns[{j}]", mapped.table, name)
            if col and col.type not in TEXT_TYPES:
                found.problems.append(
                    f"{where}.email_columns[{j}]: column {mapped.table}.{name} is {col.type}, expected text")
        if mapped.archive and mapped.archive.from_:
            col = found.need(f"{where}.archive.from", mapped.table, mapped.archive.from_)
            if col and col.type not in TIME_TYPES:
                found.problems.append(f"{where}.archive.from: column {mapped.table}.{mapped.archive.from_} is "
                                      f"{col.type}, expected a date or timestamp")
        for name, treatment in mapped.columns.items():
            col = found.need(f"{where}.columns.{name}", mapped.table, name)
            if col is not None:
                report.columns += 1
                found.problems += _treatment_problems(f"{where}.columns.{name}: column {mapped.table}.{name}",
                                                      treatment, col)


def _treatment_problems(target: str, treatment: ColumnTreatment, col: Column) -> list[str]:
    """Why `col` cannot take its pseudonymisation `treatment` (`target` names it), if it cannot."""
    problems = []
    if isinstance(treatment, NullColumn) and col.not_null:
        problems.append(f"{target} is NOT NULL, so it cannot be pseudonymised to null")
    if isinstance(treatment, (HashColumn, FixedColumn)) and col.type not in TEXT_TYPES:
        problems.append(f"{target} is {col.type}; hash and fixed need a text column")
    if isinstance(treatment, HashColumn) and col.max_length is not None and col.max_length < 64:
        problems.append(f"{target} holds {col.max_length} characters; a hash needs 64")
    if isinstance(treatment, FixedColumn) and col.max_length is not None and len(treatment.value) > col.max_length:
        problems.append(f"{target} holds {col.max_length} characters; the fixed value is longer")
    return problems


def _check_rectification(found: _Lookup, policy: Policy) -> None:
    """The rectifiable columns exist on the subject's table, and each copy on its table."""
    for name, column in policy.rectification.columns.items():
        found.need(f"rectification.columns.{name}", policy.subject.table, name)
        for i, copy in enumerate(column.copies):
            found.need(f"rectification.columns.{name}.copies[{i}]", copy.table, copy.column)


def _check_interactions_and_rules(found: _Lookup, policy: Policy) -> None:
    """The interactions table and its columns exist; each rule's status column and clock columns exist,
    the clocks' of a date type."""
    subject, inter = policy.subject, policy.interactions
    found.need("interactions.table", inter.table)
    for key in ("subject_column", "kind_column", "at_column"):
        found.need(f"interactions.{key}", inter.table, getattr(inter, key))
    for i, rule in enumerate(policy.rules):
        where = f"rules[{i}]"
        found.need(f"{where}.statuses.column", subject.table, rule.statuses.column)
        if rule.clock.fallback:
            col = found.need(f"{where}.clock.fallback", subject.table, rule.clock.fallback)
            if col and col.type not in TIME_TYPES:
                found.problems.append(
                    f"{where}.clock.fallback: {subject.table}.{rule.clock.fallback} is {col.type}, expected a date")
        if isinstance(rule.clock, RelatedMaxClock):
            col = found.need(f"{where}.clock.column", rule.clock.table, rule.clock.column)
            if col and col.type not in TIME_TYPES:
                found.problems.append(
                    f"{where}.clock.column: {rule.clock.table}.{rule.clock.column} is {col.type}, expected a date")


def _hold_problems(conn: psycopg.Connection, policy: Policy) -> list[str]:
    """Hold predicates are SQL: make the server compile each one (EXPLAIN runs nothing)."""
    problems = []
    for i, hold in enumerate(policy.holds):
        problem = compile_problem(conn, policy.subject.table, hold_predicate(hold))
        if problem:
            problems.append(f"holds[{i}] ({hold.name}).predicate: does not compile: {problem}")
    return problems


def _checked_data(conn: psycopg.Connection, policy: Policy) -> list[str]:
    """The data itself (`_data_problems`): raise CatalogError on a problem, else return the warnings. One
    query per list of values, read-only, in a savepoint so the connection stays usable."""
    try:
        with conn.transaction():
            problems, warnings = _data_problems(conn, policy)
    except psycopg.Error as exc:
        raise CatalogError(
            _message([f"the policy's values could not be compared with the data: {sql_error(exc)}"])
        ) from None
    if problems:
        raise CatalogError(_message(problems))
    return warnings


def _index_warnings(conn: psycopg.Connection, policy: Policy, schemas: set[str]) -> list[str]:
    """A subject column (of a mapped table, of the interactions) that no index starts with."""
    indexed = _indexed_first_columns(conn, schemas)
    warnings = [
        f"{mapped.table}.{mapped.subject_column} has no index starting with it: sweeps and erasures will scan "
        "the table"
        for mapped in policy.tables if (mapped.table, mapped.subject_column) not in indexed
    ]
    inter = policy.interactions
    if (inter.table, inter.subject_column) not in indexed:
        warnings.append(
            f"{inter.table}.{inter.subject_column} has no index: clock evaluation will scan the table")
    return warnings


def access_warnings(policy: Policy) -> list[str]:
    """What an access or portability request (gdpr_subject_access) could not answer with this policy: a table
    without its purpose, legal basis or source (the DAG refuses to run), a downstream target without an access
    call (its data would be missing from the answer), no column the person provided (portability exports
    nothing). Warnings only: the sweep and erasure do not need them."""
    from .access import exportable, problems

    out = [f"{p}: gdpr_subject_access refuses to run until it is set (art. 15(1))" for p in problems(policy)]
    for i, target in enumerate(policy.erasure.targets):
        if not exportable(target):
            how = "access_endpoint (or a preset)" if target.kind == "http" else "access queries"
            out.append(f"erasure.targets[{i}] ({target.name}): no {how}: an access request lists it as a recipient "
                       "without the data it holds")
    if not any(c.provided for t in policy.tables for c in t.columns.values()):
        out.append("no column of `tables` is marked `provided: true`: a portability request (art. 20) exports nothing")
    return out


def _unselectable(conn: psycopg.Connection, policy: Policy, i: int, subject_columns: dict[str, Column]) -> list[str]:
    """Warnings for rule `i`: no subject has its statuses, or some will never have a clock value. One
    query; it counts only when that can happen (a NOT NULL fallback column gives every subject a date)."""
    rule = policy.rules[i]
    where = f"rules[{i}] ({rule.name})"
    values = ", ".join(rule.statuses.values)
    fallback = subject_columns.get(rule.clock.fallback) if rule.clock.fallback else None
    with conn.transaction():
        row = conn.execute(
            unselectable_query(policy, rule, count_missing=not (fallback and fallback.not_null)),
            rule_params(policy, rule, "now"),
        ).fetchone()
    exists, total, missing = row if row else (False, 0, 0)
    if not exists:
        return [f"{where}: no subject has {rule.statuses.column} in ({values}): the rule selects nobody "
                "(check statuses.values)"]
    if not missing:
        return []
    clock = rule.clock
    why = (f"no row with a {clock.column} in {clock.table}" if isinstance(clock, RelatedMaxClock)
           else "no own interaction")
    cure = (f"and no {clock.fallback}" if clock.fallback
            else "and the clock has no fallback (set clock.fallback, e.g. created_at)")
    everyone = ": the rule selects nobody" if missing == total else ""
    return [f"{where}: {missing} of the {total} subjects with {rule.statuses.column} in ({values}) have {why} {cure}; "
            f"the rule never selects them{everyone}"]


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
