"""The rows of a person: ONE definition, used by the sweep, erasure and the opt-out guard.

A row of a mapped table belongs to a set of persons (subjects) when

  * its link column (`tables[].subject_column`) holds the id of one of them, or
  * one of its `tables[].email_columns`, normalised as ``lower(btrim(column))``, equals the normalised
    email of one of them (rows never linked to the subject: a support ticket sent before the account
    existed, an import that lost the link).

The subject's own table is matched by its key only: another subject row with the same email is
another subject, with its own rules and holds.

An email is used for matching only while no subject OUTSIDE the set still holds it in clear (a
duplicate record that is held, active or not yet expired): the rows carrying it cannot be told apart,
so they stay with that other subject, and the last subject holding the email takes them with it. An
erasure by email puts every subject holding the email in the set, so this never holds an erasure back.

Two ways to name the set, the same predicate for both:

  * `stage(conn, policy, ids)`: a batch, set-based. `ids` is an SQL subquery of subject ids (the
    sweep's ``_gdpr_batch``, the guard's resurrected subjects). The emails of the set are read ONCE
    into the temporary table ``_gdpr_match_email (email_norm, subject_id)``, so call it before any
    statement of the transaction overwrites the subject's email (pseudonymisation hashes it).
  * `for_person(conn, policy, ids, email, email_hashes)`: one person (erasure): a list of subject ids,
    the normalised email and, for a person the sweep may have pseudonymised, every keyed hash their
    email may have in a hashed email column (`tables[].columns: hash` on an email column stores the
    subject hash of the normalised email); all travel as parameters (`Persons.params`).

`rows(policy, mapped, persons)` is the WHERE predicate. Each row is selected once, whether it matches
by link, by email or both. The email comparison is exactly ``lower(btrim(column))``: index that
expression on the subject's email column and on every `email_columns` entry (docs/policy.md), and
the planner uses the index for the email side of the predicate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from .candidates import qualified
from .policy import MappedTable, Policy

EMAIL_TABLE = sql.Identifier("_gdpr_match_email")


def normalised(column: sql.Composable) -> sql.Composable:
    """The email comparison key of a column: ``lower(btrim(column))`` (the recommended index's expression)."""
    return sql.SQL("lower(btrim({c}))").format(c=column)


@dataclass(frozen=True)
class Persons:
    """A set of persons, as the SQL that names their subject ids and the emails of their rows.

    `ids` is a parenthesised subquery (a batch) or None (one person: parameters); `staged` says that
    ``_gdpr_match_email`` holds the batch's emails; `params` are the parameters the predicates need,
    to merge into the statement's own."""

    ids: sql.Composable | None
    params: dict[str, Any] = field(default_factory=dict)
    staged: bool = False

    def id_set(self) -> sql.Composable:
        """`col IN <this>` / `col = ANY(<array>)` operand naming the subject ids."""
        return self.ids if self.ids is not None else sql.SQL("%(match_ids)s")

    def id_array(self) -> sql.Composable:
        return sql.SQL("ARRAY{q}").format(q=self.ids) if self.ids is not None else sql.SQL("%(match_ids)s")

    def email_array(self) -> sql.Composable:
        if self.staged:
            return sql.SQL("ARRAY(SELECT email_norm FROM {e})").format(e=EMAIL_TABLE)
        if self.ids is not None:
            return sql.SQL("ARRAY[]::text[]")  # a batch staged without any table found by email
        return sql.SQL("%(match_emails)s::text[]")


def email_tables(policy: Policy) -> list[MappedTable]:
    """The mapped tables (other than the subject's) whose rows are also found by email."""
    return [t for t in policy.tables if t.email_columns and t.table != policy.subject.table]


def stage(conn: psycopg.Connection, policy: Policy, ids: sql.Composable, owners: bool = False) -> Persons:
    """The persons whose subject ids `ids` (a parenthesised subquery) names, for set-based statements.

    Creates ``_gdpr_match_email`` (dropped at commit) from the subject rows as they are NOW: call it
    first in the transaction, before the subject's email is overwritten. Run inside a transaction.
    With `owners`, the table is indexed for `owner` (one lookup per row found by email)."""
    if not email_tables(policy):
        return Persons(ids=ids)  # nothing is found by email: no need to read the emails
    subject = policy.subject
    table, pk = qualified(subject.table), sql.Identifier(subject.primary_key)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {e}").format(e=EMAIL_TABLE))
    # One row per email of the set; kept when every subject holding it is in the set (its holders,
    # counted through the email index, one probe per email: no scan of the subject table).
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE {e} ON COMMIT DROP AS"
            " SELECT m.email_norm, m.subject_id"
            " FROM (SELECT {norm} AS email_norm, (array_agg(s.{pk} ORDER BY s.{pk}))[1] AS subject_id,"
            "  count(*) AS in_set FROM {t} s WHERE s.{pk} IN {ids} GROUP BY 1) m"
            " WHERE position('@' in m.email_norm) > 0"
            "  AND (SELECT count(*) FROM {t} o WHERE {onorm} = m.email_norm) = m.in_set"
        ).format(e=EMAIL_TABLE, norm=normalised(sql.Identifier("s", subject.email_column)), pk=pk, t=table, ids=ids,
                 onorm=normalised(sql.Identifier("o", subject.email_column)))
    )
    if owners:
        conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {e} (email_norm)").format(e=EMAIL_TABLE))
    return Persons(ids=ids, staged=True)


def for_person(
    conn: psycopg.Connection, policy: Policy, ids: list[Any], email: str | None, email_hashes: list[str] | None = None
) -> Persons:
    """One person: their subject ids, their normalised email (None when unknown) and the keyed hashes of
    it that a pseudonymised row may hold (`email_hashes`, matched in the hashed email columns).

    The email is left out when a subject outside `ids` holds it (see the module doc): one indexed
    lookup. Runs in the caller's transaction."""
    emails: list[str] = []
    if email and "@" in email and email_tables(policy):
        subject = policy.subject
        shared = conn.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {t} o WHERE {norm} = %s AND NOT o.{pk} = ANY(%s))").format(
                t=qualified(subject.table), norm=normalised(sql.Identifier("o", subject.email_column)),
                pk=sql.Identifier(subject.primary_key)),
            (email, ids),
        ).fetchone()
        if not (shared and shared[0]):
            emails = [email]
    return Persons(ids=None, params={"match_ids": list(ids), "match_emails": emails,
                                     "match_hashes": list(email_hashes or [])})


def rows(policy: Policy, mapped: MappedTable, persons: Persons, alias: str | None = None) -> sql.Composable:
    """WHERE predicate selecting the rows of `mapped` that belong to `persons` (module doc)."""

    def col(name: str) -> sql.Identifier:
        return sql.Identifier(alias, name) if alias else sql.Identifier(name)

    is_subject = mapped.table == policy.subject.table
    link = col(policy.subject.primary_key if is_subject else mapped.subject_column)
    # Hashed email columns of a pseudonymised row hold a keyed hash (lower-case hex): one person only.
    hashed = [] if is_subject or not persons.params.get("match_hashes") else policy.hashed_email_columns(mapped)
    if is_subject or not (mapped.email_columns or hashed):
        if persons.ids is not None:
            return sql.SQL("{link} IN {ids}").format(link=link, ids=persons.id_set())
        return sql.SQL("{link} = ANY({ids})").format(link=link, ids=persons.id_set())
    # `= ANY(ARRAY(...))`, not `IN (subquery)`: the planner can then use an index for each side of the OR.
    parts = [sql.SQL("{link} = ANY({ids})").format(link=link, ids=persons.id_array())]
    parts += [sql.SQL("{e} = ANY({emails})").format(e=normalised(col(c)), emails=persons.email_array())
              for c in mapped.email_columns]
    parts += [sql.SQL("{e} = ANY(%(match_hashes)s::text[])").format(e=normalised(col(c))) for c in hashed]
    return sql.SQL("(") + sql.SQL(" OR ").join(parts) + sql.SQL(")")


def owner(policy: Policy, mapped: MappedTable, persons: Persons, alias: str) -> sql.Composable:
    """SQL expression of the subject id a matched row belongs to (its link, else the subject whose email
    it carries), for a staged set: the archive records it."""
    is_subject = mapped.table == policy.subject.table
    link = sql.Identifier(alias, policy.subject.primary_key if is_subject else mapped.subject_column)
    if not persons.staged or is_subject or not mapped.email_columns:
        return link
    lookups = [sql.SQL("(SELECT e.subject_id FROM {e} e WHERE e.email_norm = {n})").format(
        e=EMAIL_TABLE, n=normalised(sql.Identifier(alias, c))) for c in mapped.email_columns]
    return sql.SQL("coalesce({parts})").format(parts=sql.SQL(", ").join([link, *lookups]))
