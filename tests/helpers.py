"""Small builders for precise scenarios on top of the seeded template (ids far above the seeded ones)."""

from __future__ import annotations

import hashlib
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from warehouse_gdpr.engine import candidates as candidate_sql
from warehouse_gdpr.engine.policy import Policy

AS_OF = "2026-06-15T00:00:00+00:00"
AS_OF_DATE = date(2026, 6, 15)
THREE_YEARS_BEFORE = date(2023, 6, 15)  # AS_OF - P3Y

_next_id = [9_000_000]


def new_id() -> int:
    _next_id[0] += 1
    return _next_id[0]


def ts(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def add_contact(
    conn: psycopg.Connection,
    status: str,
    created: date,
    *,
    litigation: bool = False,
    email: str | None = None,
) -> int:
    cid = new_id()
    conn.execute(
        "INSERT INTO crm.contacts (contact_id, company_id, status, email, first_name, last_name, direct_phone,"
        " job_title, created_at, litigation_hold)"
        " VALUES (%s, (SELECT min(company_id) FROM crm.companies), %s, %s, 'Zoé', 'Testperson', '+33 6 00 00 00 00',"
        " 'CTO', %s, %s)",
        (cid, status, email or f"zoe.testperson.{cid}@scenario.example", ts(created), litigation),
    )
    return cid


def add_activity(conn: psycopg.Connection, contact_id: int, kind: str, day: date) -> None:
    conn.execute(
        "INSERT INTO crm.activities (activity_id, contact_id, kind, occurred_at, subject_line)"
        " VALUES (%s, %s, %s, %s, %s)",
        (new_id(), contact_id, kind, ts(day), "Re: scenario"),
    )


def add_contract(conn: psycopg.Connection, contact_id: int, start: date, end: date | None) -> None:
    conn.execute(
        "INSERT INTO crm.contracts (contract_id, contact_id, start_date, end_date, value_eur)"
        " VALUES (%s, %s, %s, %s, 1000)",
        (new_id(), contact_id, start, end),
    )


def add_invoice(conn: psycopg.Connection, contact_id: int, issued: date) -> None:
    conn.execute(
        "INSERT INTO crm.invoices (invoice_id, contact_id, issued_on, amount_eur, billing_name)"
        " VALUES (%s, %s, %s, 10, 'Zoé Testperson')",
        (new_id(), contact_id, issued),
    )


def candidates(conn: psycopg.Connection, policy: Policy, rule_name: str, as_of: str = AS_OF) -> dict[int, list[str]]:
    """{subject id: blocking holds} of every candidate of a rule."""
    rule = policy.rule(rule_name)
    rows = conn.execute(
        candidate_sql.batch_query(policy, rule, first=True),
        {**candidate_sql.rule_params(policy, rule, as_of), "limit": 10**9},
    ).fetchall()
    conn.rollback()
    return {r[0]: list(r[1]) for r in rows}


def table_checksum(conn: psycopg.Connection, tables: list[str]) -> dict[str, str]:
    """md5 of every row of each table, ordered: equal checksums mean no row changed."""
    out = {}
    for table in tables:
        rows = conn.execute(f"SELECT t::text FROM {table} t ORDER BY 1").fetchall()  # test-only, fixed names
        out[table] = hashlib.md5("\n".join(r[0] for r in rows).encode()).hexdigest()
    conn.rollback()
    return out


CRM_TABLES = ["crm.contacts", "crm.activities", "crm.notes", "crm.contracts", "crm.invoices"]


# -- the catalog-wide scan for personal data (issue 10: "every row of a person") -----------------

# Who the demo's notes name as their author: employees, not subjects (notes.author is `keep`).
EMPLOYEES = ("Claire Martin", "Julien Robert", "Nadia Belkacem", "Olivier Petit", "Sandrine Morel", "Tom Becker")
_EMAIL = re.compile(r"[^\s@<>\"'(),;:\[\]{}\\]+@[^\s@<>\"'(),;:\[\]{}\\]+")
_WORD = re.compile(r"\w+")
_DIGIT_RUN = re.compile(r"\d[\d ().]*\d")


@dataclass(frozen=True)
class Person:
    """A person's identifying values as they were before the tool treated them."""

    subject_id: int
    email: str
    first_name: str | None
    last_name: str | None
    phone: str | None


def capture_persons(conn: psycopg.Connection) -> dict[int, Person]:
    """Every demo contact's original email, names and phone, by contact id (call before a sweep)."""
    rows = conn.execute("SELECT contact_id, email, first_name, last_name, direct_phone FROM crm.contacts").fetchall()
    conn.rollback()
    return {r[0]: Person(*r) for r in rows}


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _words(text: str | None) -> tuple[str, ...]:
    return tuple(_WORD.findall(_fold(text))) if text else ()


def _digits(text: str | None) -> str:
    return "".join(ch for ch in text if ch.isdigit()) if text else ""


def scanned_columns(
    conn: psycopg.Connection, exclude_schemas: tuple[str, ...] = ("gdpr_archive",)
) -> list[tuple[str, str, str, bool]]:
    """(schema, table, column, is_bytea) of every text, varchar, char, json, jsonb, xml or bytea column (also
    arrays and domains of those) of every table and materialized view of every schema but the system
    ones and `exclude_schemas`, read from pg_catalog: no table is listed by hand."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname, a.attname, base.typname = 'bytea'
        FROM pg_catalog.pg_attribute a
        JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
        JOIN pg_catalog.pg_type d ON d.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
        JOIN pg_catalog.pg_type base ON base.oid = CASE WHEN d.typcategory = 'A' THEN d.typelem ELSE d.oid END
        WHERE c.relkind IN ('r', 'm') AND a.attnum > 0 AND NOT a.attisdropped
          AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%%'
          AND n.nspname <> ALL(%s)
          AND (base.typcategory = 'S' OR base.typname IN ('json', 'jsonb', 'xml', 'bytea'))
        ORDER BY 1, 2, 3
        """,
        (list(exclude_schemas),),
    ).fetchall()
    conn.rollback()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def pii_scan(
    conn: psycopg.Connection,
    persons: Sequence[Person],
    *,
    not_theirs: Sequence[Person] = (),
    exclude_schemas: tuple[str, ...] = ("gdpr_archive",),
) -> tuple[list[str], dict[str, int]]:
    """Where the persons' original email, name or phone is still in the database.

    Reads every value of every column of `scanned_columns` (bytea decoded as UTF-8), folded (NFKC,
    case-folded), and looks for: the email, the phone's digits (separators ignored), the full name (every
    word of the first and the last name in one value), and the first or the last name alone when no one
    else has it. A name, phone or email that `not_theirs` (people the data may still be about: namesakes
    still held in clear) or an employee (`EMPLOYEES`) also has is not looked for: finding it proves nothing.

    Returns (hits as "schema.table.column: <kind> of subject <id>", how many values of each kind were
    looked for). Values are never returned: a failing test names places and subject ids only."""
    wanted = _Wanted.of(persons, not_theirs)
    hits: set[str] = set()
    for schema, table, column, is_bytea in scanned_columns(conn, exclude_schemas):
        column_sql = sql.Identifier(column) if is_bytea else sql.SQL("{}::text").format(sql.Identifier(column))
        where = f"{schema}.{table}.{column}"
        with conn.cursor(name="pii_scan") as cur:
            cur.itersize = 5000
            cur.execute(sql.SQL("SELECT {c} FROM {t} WHERE {n} IS NOT NULL").format(
                c=column_sql, t=sql.Identifier(schema, table), n=sql.Identifier(column)))
            for (value,) in cur:
                text = _fold(bytes(value).decode("utf-8", "ignore") if is_bytea else value)
                hits |= {f"{where}: {hit}" for hit in wanted.found_in(text)}
        conn.rollback()
    return sorted(hits), wanted.looked_for


@dataclass
class _Wanted:
    """What `pii_scan` looks for: {folded email: subject}, {phone digits: subject}, {first word of a name:
    [(all its words, kind, subject)]}, and how many of each kind."""

    emails: dict[str, int]
    phones: dict[str, int]
    names: dict[str, list[tuple[tuple[str, ...], str, int]]]
    looked_for: dict[str, int]
    phone_lengths: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, persons: Sequence[Person], not_theirs: Sequence[Person]) -> _Wanted:
        theirs_emails = {_fold(o.email).strip() for o in not_theirs}
        theirs_phones = {_digits(o.phone) for o in not_theirs}
        theirs_full = {(_words(o.first_name), _words(o.last_name)) for o in not_theirs}
        theirs_words = {w for o in not_theirs for w in _words(o.first_name) + _words(o.last_name)}
        employee_words = {w for name in EMPLOYEES for w in _words(name)}
        wanted = cls({}, {}, {}, {"emails": 0, "phones": 0, "full_names": 0, "single_names": 0})
        for p in persons:
            email, digits = _fold(p.email).strip(), _digits(p.phone)
            if "@" in email and email not in theirs_emails:
                wanted.emails[email] = p.subject_id
            if len(digits) >= 6 and digits not in theirs_phones:
                wanted.phones[digits] = p.subject_id
            first, last = _words(p.first_name), _words(p.last_name)
            names: list[tuple[tuple[str, ...], str]] = []
            if first and last and (first, last) not in theirs_full and not set(first + last) <= employee_words:
                names.append((first + last, "full_names"))
            names += [(w, "single_names") for w in (first, last) if w and not set(w) & (theirs_words | employee_words)]
            for words, kind in names:
                wanted.names.setdefault(words[0], []).append((words, kind, p.subject_id))
        wanted.looked_for.update(emails=len(wanted.emails), phones=len(wanted.phones))
        for entries in wanted.names.values():
            for _, kind, _ in entries:
                wanted.looked_for[kind] += 1
        wanted.phone_lengths = {len(d) for d in wanted.phones}
        return wanted

    def found_in(self, text: str) -> set[str]:
        """"<kind> of subject <id>" for each wanted value in one folded value."""
        hits = set()
        if "@" in text:
            for found in _EMAIL.findall(text):
                sid = self.emails.get(found.strip("."))
                if sid is not None:
                    hits.add(f"email of subject {sid}")
        for run in _DIGIT_RUN.findall(text):
            digits = _digits(run)
            for n in self.phone_lengths:
                for i in range(len(digits) - n + 1):
                    sid = self.phones.get(digits[i:i + n])
                    if sid is not None:
                        hits.add(f"phone of subject {sid}")
        words = set(_WORD.findall(text))
        for word in words & self.names.keys():
            for name, kind, sid in self.names[word]:
                if words.issuperset(name):
                    hits.add(f"{'full name' if kind == 'full_names' else 'name'} of subject {sid}")
        return hits


# The append-only guard of gdpr.audit_log as control schema versions 1 to 7 defined it.
_REFUSE_BEFORE_V8 = """
CREATE OR REPLACE FUNCTION gdpr.refuse_audit_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'gdpr.audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""

# The suppression list's guard as versions 3 to 7 defined it (re-keying in place allowed).
_SUPPRESSION_GUARD_BEFORE_V8 = """
CREATE OR REPLACE FUNCTION gdpr.guard_suppression_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.key_id IS DISTINCT FROM OLD.key_id AND NEW.email_hash IS DISTINCT FROM OLD.email_hash
           AND NEW.email_hash ~ '^[0-9a-f]{64}$'
           AND (NEW.reason, NEW.source, NEW.request_id, NEW.first_seen)
               IS NOT DISTINCT FROM (OLD.reason, OLD.source, OLD.request_id, OLD.first_seen) THEN
            RETURN NEW;
        END IF;
        IF OLD.reason = 'opt_out' AND NEW.reason = 'erasure' AND NEW.request_id IS NOT NULL
           AND (NEW.email_hash, NEW.key_id, NEW.source, NEW.first_seen)
               IS NOT DISTINCT FROM (OLD.email_hash, OLD.key_id, OLD.source, OLD.first_seen) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'gdpr.suppression_list is permanent: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""


def schema_before_v8(conn: psycopg.Connection) -> None:
    """Take an installed control schema back to what it was before version 8: no audit chain (chain
    columns, head, functions and trigger removed; rows kept, unchained), no archive guard, suppression
    entries re-keyed in place; version 8 forgotten."""
    with conn.transaction():
        conn.execute("DROP TRIGGER audit_log_chain ON gdpr.audit_log")
        conn.execute("DROP FUNCTION gdpr.chain_audit_row(), gdpr.audit_row_hash(bigint, text, gdpr.audit_log),"
                     " gdpr.audit_chain_genesis(uuid)")
        conn.execute("DROP TABLE gdpr.audit_chain_head")
        conn.execute(_REFUSE_BEFORE_V8)
        conn.execute("ALTER TABLE gdpr.audit_log DROP COLUMN chain_seq, DROP COLUMN prev_hash, DROP COLUMN row_hash")
        conn.execute("DROP TRIGGER archived_row_guard ON gdpr_archive.archived_row")
        conn.execute("DROP FUNCTION gdpr.guard_archive_delete(),"
                     " gdpr.erase_archived_rows(text[], text[], text, text, text, text, text)")
        conn.execute(_SUPPRESSION_GUARD_BEFORE_V8)
        conn.execute("ALTER TABLE gdpr.suppression_list DROP COLUMN rekeyed_at")
        conn.execute("GRANT UPDATE (email_hash, key_id, reason, request_id) ON gdpr.suppression_list TO gdpr_engine")
        conn.execute("DELETE FROM gdpr.schema_version WHERE version >= 8")



def as_role(url: str, user: str) -> str:
    """`url` logged in as `user` without a password (the embedded server's roles have none)."""
    params = conninfo_to_dict(url)
    params["user"] = user
    params.pop("password", None)
    return make_conninfo(**params)  # type: ignore[arg-type]


class Worker(threading.Thread):
    """Runs `body(conn)` on its own connection (autocommit off, as the DAGs' connections); keeps its result or
    exception. Concurrency tests order workers by locks (`wait_for_lock_wait`), never by sleeps."""

    def __init__(self, url: str, body: Callable[[psycopg.Connection], Any]) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(url)
        self.pid = self.conn.info.backend_pid
        self.body = body
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.body(self.conn)
        except BaseException as exc:  # noqa: BLE001 - examined by the test (done / finish)
            self.error = exc
        finally:
            self.conn.close()

    def done(self) -> None:
        """Wait for the worker to end; its result or exception stays for the test to examine."""
        self.join(timeout=300)
        assert not self.is_alive(), "the worker never finished"

    def finish(self) -> Any:
        """Wait for the worker to end; raise its exception, or return its result."""
        self.done()
        if self.error is not None:
            raise self.error
        return self.result


def wait_for_lock_wait(observer: psycopg.Connection, worker: Worker) -> str:
    """Block until the worker's backend waits for a lock (pg_stat_activity); return its wait_event.

    A guard stops the wait if the worker ended first (it then never blocked: ordering failed)."""
    guard = time.monotonic() + 300
    while True:
        row = observer.execute(
            "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = %s", (worker.pid,)
        ).fetchone()
        observer.rollback()
        if row and row[0] == "Lock":
            return str(row[1])
        if not worker.is_alive():
            worker.finish()  # raises the worker's own error, if any
            pytest.fail("the worker finished without ever waiting for a lock")
        if time.monotonic() > guard:
            pytest.fail("the worker never waited for a lock")
        time.sleep(0.02)
