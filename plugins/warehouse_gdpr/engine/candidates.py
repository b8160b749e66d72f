"""Where a retention rule is evaluated: the SQL that finds a rule's expired subjects.

A subject is a candidate of a rule when
  * its status column is one of the rule's statuses,
  * it has not been pseudonymised already (the subject's marker column is NULL),
  * its retention clock is strictly older than ``as_of - retain_for``.

Clocks (see `policy.Clock`):
  * ``last_interaction``: the latest interaction of a *subject-initiated* kind (the policy lists them;
    a rep's call attempt does not count), else the ``fallback`` column (e.g. ``created_at``);
  * ``related_max``: the latest non-NULL value of a column in a mapped table (e.g. the last contract
    end; a NULL end date is an open contract, which the policy's holds keep), else the ``fallback``
    column when the subject has no such row or only NULL values.

A subject whose clock has no value (no date and no fallback) is never selected by the rule;
`catalog.check_policy` counts them (`clock_missing`) and warns.

Each candidate row carries the names of the legal holds that block the rule's action; held
subjects are skipped by `sweep.apply_rule` and counted. A hold predicate that evaluates to NULL
holds (``(predicate) IS NOT FALSE``): a hold that cannot be decided never lets a subject go.
`selects_now` re-evaluates the same predicate on a batch the sweep has locked ("lock, then check",
see sweep.py). Identifiers are composed with `psycopg.sql` after `catalog.check_policy` validated
them; hold predicates are the policy's own SQL expressions (checked to compile by the catalog check).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from psycopg import sql

from .policy import RESERVED_HOLD, Hold, LastInteractionClock, Policy, Rule

AS_OF = re.compile(r"(?<![:\w]):as_of\b")


def qualified(name: str) -> sql.Identifier:
    """'schema.table' -> "schema"."table"."""
    schema, table = name.split(".", 1)
    return sql.Identifier(schema, table)


def clock_expression(policy: Policy, rule: Rule) -> sql.Composable:
    """SQL expression of the rule's clock for the subject row aliased ``s``."""
    pk = sql.Identifier("s", policy.subject.primary_key)
    clock = rule.clock
    if isinstance(clock, LastInteractionClock):
        inter = policy.interactions
        last = sql.SQL(
            "(SELECT max(i.{at}) FROM {table} i WHERE i.{subj} = {pk} AND i.{kind} = ANY(%(subject_kinds)s::text[]))"
        ).format(
            at=sql.Identifier(inter.at_column),
            table=qualified(inter.table),
            subj=sql.Identifier(inter.subject_column),
            kind=sql.Identifier(inter.kind_column),
            pk=pk,
        )
        if clock.fallback is None:
            return last
        return sql.SQL("coalesce({last}, s.{fallback})").format(last=last, fallback=sql.Identifier(clock.fallback))
    mapped = next(t for t in policy.tables if t.table == clock.table)
    latest = sql.SQL("(SELECT max(r.{col}) FROM {table} r WHERE r.{subj} = {pk})").format(
        col=sql.Identifier(clock.column),
        table=qualified(clock.table),
        subj=sql.Identifier(mapped.subject_column),
        pk=pk,
    )
    if clock.fallback is None:
        return latest
    return sql.SQL("coalesce({latest}, s.{fallback})").format(latest=latest, fallback=sql.Identifier(clock.fallback))


def clock_missing(policy: Policy, rule: Rule) -> sql.Composable:
    """Predicate on subject ``s``: its clock has no value, so the rule can never select it (no own
    interaction, or no row / only NULL values in the related table, and no fallback value).

    Written as NOT EXISTS, so that counting such subjects is an anti-join, not a clock per subject.
    Parameters: %(subject_kinds)s."""
    pk = sql.Identifier("s", policy.subject.primary_key)
    clock = rule.clock
    if isinstance(clock, LastInteractionClock):
        inter = policy.interactions
        none = sql.SQL(
            "NOT EXISTS (SELECT 1 FROM {table} i WHERE i.{subj} = {pk} AND i.{kind} = ANY(%(subject_kinds)s::text[])"
            " AND i.{at} IS NOT NULL)"
        ).format(table=qualified(inter.table), subj=sql.Identifier(inter.subject_column), pk=pk,
                 kind=sql.Identifier(inter.kind_column), at=sql.Identifier(inter.at_column))
    else:
        mapped = next(t for t in policy.tables if t.table == clock.table)
        none = sql.SQL("NOT EXISTS (SELECT 1 FROM {table} r WHERE r.{subj} = {pk} AND r.{col} IS NOT NULL)").format(
            table=qualified(clock.table), subj=sql.Identifier(mapped.subject_column), pk=pk,
            col=sql.Identifier(clock.column))
    if clock.fallback is None:
        return none
    return sql.SQL("({none} AND s.{fallback} IS NULL)").format(none=none, fallback=sql.Identifier(clock.fallback))


def unselectable_query(policy: Policy, rule: Rule, count_missing: bool = True) -> sql.Composed:
    """One query: (does any subject have the rule's statuses, how many of them are not pseudonymised yet,
    how many of those have no clock value). Without `count_missing` the last two are 0 (cheap).
    Parameters: %(statuses)s, %(subject_kinds)s."""
    subject = policy.subject
    table = qualified(subject.table)
    statuses = sql.SQL("s.{status} = ANY(%(statuses)s::text[])").format(status=sql.Identifier(rule.statuses.column))
    if not count_missing:
        return sql.SQL("SELECT EXISTS (SELECT 1 FROM {t} s WHERE {st}), 0, 0").format(t=table, st=statuses)
    base = sql.SQL("FROM {t} s WHERE {st} AND s.{marker} IS NULL").format(
        t=table, st=statuses, marker=sql.Identifier(subject.pseudonymised_marker))
    return sql.SQL(
        "SELECT EXISTS (SELECT 1 FROM {t} s WHERE {st}), (SELECT count(*) {base}),"
        " (SELECT count(*) {base} AND {missing})"
    ).format(t=table, st=statuses, base=base, missing=clock_missing(policy, rule))


def bound_predicate(predicate: str) -> sql.SQL:
    """A policy SQL predicate (a hold's, an opt-out source's) with ``:as_of`` bound to the run's
    reference instant (a timestamptz, parameter ``%(as_of)s``) and literal ``%`` escaped."""
    text = predicate.replace("%", "%%")
    return sql.SQL(AS_OF.sub("(%(as_of)s::timestamptz)", text))


def hold_predicate(hold: Hold) -> sql.SQL:
    """The hold's SQL with ``:as_of`` bound to the run's reference instant (a timestamptz)."""
    return bound_predicate(hold.predicate)


def holds_array(holds: Iterable[Hold], builtin: Iterable[tuple[str, sql.Composable]] = ()) -> sql.Composable:
    """text[] of the names of those of `holds` in force for subject row ``s``: THE legal-hold builder,
    which the sweep (`holds_expression`), erasure (`erasure.holds_in_force`) and the resurrection guard
    (`optout.guard`) all call, so that the three agree on who is held. `builtin`: (name, predicate) of holds
    the engine adds itself (the sweep's `processing_restricted`), evaluated the same way.

    Fail-safe: a hold whose predicate is NULL for the row (``(pred) IS NOT FALSE``), e.g. a litigation with
    no end date, holds it; only a predicate that is false releases it. Parameter: %(as_of)s.
    """
    predicates = [(h.name, hold_predicate(h)) for h in holds] + list(builtin)
    cases = [sql.SQL("CASE WHEN ({pred}) IS NOT FALSE THEN {name} END").format(pred=pred, name=sql.Literal(name))
             for name, pred in predicates]
    if not cases:
        return sql.SQL("ARRAY[]::text[]")
    return sql.SQL("array_remove(ARRAY[{cases}]::text[], NULL)").format(cases=sql.SQL(", ").join(cases))


def restricted(policy: Policy) -> sql.Composable:
    """Predicate on subject ``s``: a restriction of processing (GDPR art. 18) is in force for it (gdpr.restriction,
    see restriction.py). Uncorrelated, so PostgreSQL evaluates the set once per statement (a hashed subplan)."""
    return sql.SQL("s.{pk}::text IN (SELECT unnest(r.subject_ids) FROM gdpr.restriction r"
                   " WHERE r.subject_table = {table})").format(pk=sql.Identifier(policy.subject.primary_key),
                                                               table=sql.Literal(policy.subject.table))


def holds_expression(policy: Policy, rule: Rule) -> sql.Composable:
    """text[] of the names of the holds that block this rule's action, for subject ``s``: the policy's, and the
    built-in `processing_restricted` (a restricted person is neither deleted nor pseudonymised while the
    restriction is in force; an erasure request is not held by it)."""
    return holds_array([h for h in policy.holds if rule.action in h.blocks],
                       builtin=[(RESERVED_HOLD, restricted(policy))])


def candidates_from(policy: Policy, rule: Rule) -> sql.Composable:
    """FROM/WHERE part shared by the plan (counts) and the apply (batches) queries.

    Parameters: %(statuses)s, %(subject_kinds)s, %(as_of)s, %(retain_for)s.
    """
    subject = policy.subject
    return sql.SQL(
        "FROM {table} s"
        " WHERE s.{status} = ANY(%(statuses)s::text[])"
        " AND s.{marker} IS NULL"
        " AND {clock} < %(as_of)s::timestamptz - %(retain_for)s::interval"
    ).format(
        table=qualified(subject.table),
        status=sql.Identifier(rule.statuses.column),
        marker=sql.Identifier(subject.pseudonymised_marker),
        clock=clock_expression(policy, rule),
    )


def rule_params(policy: Policy, rule: Rule, as_of: str) -> dict[str, object]:
    return {
        "statuses": list(rule.statuses.values),
        "subject_kinds": list(policy.interactions.subject_initiated),
        "as_of": as_of,
        "retain_for": rule.retain_for,
    }


def plan_query(policy: Policy, rule: Rule) -> sql.Composed:
    """One set-based query: candidate count, held count and per-hold counts for a rule."""
    return sql.SQL(
        "WITH cand AS (SELECT {holds} AS holds {from_})"
        " SELECT count(*) AS candidates,"
        " count(*) FILTER (WHERE cardinality(holds) > 0) AS held,"
        " coalesce((SELECT jsonb_object_agg(h, n) FROM"
        " (SELECT h, count(*) AS n FROM cand, unnest(cand.holds) AS h GROUP BY h) x), '{{}}'::jsonb) AS by_hold"
        " FROM cand"
    ).format(holds=holds_expression(policy, rule), from_=candidates_from(policy, rule))


def batch_query(policy: Policy, rule: Rule, first: bool) -> sql.Composed:
    """Next keyset batch of candidates: (subject id, blocking holds), ordered by primary key.

    Extra parameters: %(limit)s, and %(after)s unless ``first``.
    """
    pk = sql.Identifier("s", policy.subject.primary_key)
    keyset = sql.SQL("") if first else sql.SQL(" AND {pk} > %(after)s").format(pk=pk)
    return sql.SQL("SELECT {pk}, {holds} {from_}{keyset} ORDER BY {pk} LIMIT %(limit)s").format(
        pk=pk, holds=holds_expression(policy, rule), from_=candidates_from(policy, rule), keyset=keyset
    )


def selects_now(policy: Policy, rule: Rule, subject_id: sql.Composable) -> sql.Composed:
    """Boolean SQL: the rule selects subject `subject_id` (an SQL expression) and no hold blocks it,
    evaluated when the statement runs: the re-check of a locked batch (`sweep.apply_rule`, "lock, then
    check"). False for a subject row that no longer exists, and when the predicate is NULL.

    Written as a correlated ``count(*)`` so that it stays one primary-key lookup per subject (a subplan
    the planner cannot turn into a join, which could scan the whole subject table). Parameters as
    `candidates_from`.
    """
    pk = sql.Identifier("s", policy.subject.primary_key)
    return sql.SQL("((SELECT count(*) {from_} AND {pk} = {id} AND cardinality({holds}) = 0) > 0)").format(
        from_=candidates_from(policy, rule), pk=pk, id=subject_id, holds=holds_expression(policy, rule)
    )
