"""The policy file: what the warehouse holds about people, and how long it may keep it.

`load_policy(path)` reads YAML, validates it with pydantic and returns a `Policy`. Every error names
the file, the path inside the document (``rules[2].retain_for``) and what was expected. The policy
holds no secret: keys come from an Airflow connection (see `crypto.py`).

Identifiers here are only checked for shape; `catalog.check_policy` checks them against the live
database before any write.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from .errors import ConfigurationError

IDENT = r"^[a-z_][a-z0-9_]{0,62}$"
QUALIFIED = r"^[a-z_][a-z0-9_]{0,62}\.[a-z_][a-z0-9_]{0,62}$"
DURATION = re.compile(r"^P(?=\d)(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)W)?(?:(\d+)D)?$")

Ident = Annotated[str, Field(pattern=IDENT)]
# `package.module:attribute` (an attribute path may be dotted: `module:Class.attribute`)
CALLABLE_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


def _callable_path(value: str) -> str:
    """Only the shape is checked here (the engine imports no Airflow code); the DAG factory imports it."""
    if not re.fullmatch(CALLABLE_PATH, value):
        raise ValueError(f"expected `package.module:attribute` (e.g. `my_alerts.pager:notify`), got {value!r}")
    return value


def _one_expression(value: str) -> str:
    if ";" in value:
        raise ValueError("a predicate is one SQL boolean expression: ';' is not allowed")
    return value


# A SQL boolean expression on the subject row `s`, written by the policy's author (never by a user).
Predicate = Annotated[str, Field(min_length=1, max_length=4000), AfterValidator(_one_expression)]
QualifiedName = Annotated[str, Field(pattern=QUALIFIED, description="schema.table")]


class PolicyError(ConfigurationError, ValueError):
    """The policy file is unreadable or invalid. The message lists every problem."""


class _Model(BaseModel):
    # strict: no coercion. YAML's `batch_size: true` or `retries: "5"` is refused, never read as 1 or 5.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _require_unique(names: list[str], what: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique, repeated: {', '.join(dupes)}")


def _require_listed(acknowledged: list[str], listed: list[str], where: str) -> None:
    strays = [v for v in acknowledged if v not in listed]
    if strays:
        raise ValueError(f"expect_absent may only name entries of {where}; not listed there: {', '.join(strays)}")


def _check_duration(value: str) -> str:
    match = DURATION.fullmatch(value)
    if not match:
        raise ValueError(f"expected an ISO 8601 duration such as P3Y, P18M or P30D, got {value!r}")
    if not any(int(n) for n in match.groups() if n):
        raise ValueError(f"a retention period must be longer than zero, got {value!r}")
    return value


# Airflow's schedule presets (airflow.sdk.definitions.timetables._cron.CRON_PRESETS, Airflow 3.3; a test
# checks they agree). Anything else is a cron expression for croniter, as Airflow parses it; croniter
# comes with Airflow, but this module never imports Airflow.
CRON_PRESETS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@quarterly": "0 0 1 */3 *",
    "@yearly": "0 0 1 1 *",
}
SPECIAL_SCHEDULES = ("@once", "@continuous")


def _check_schedule(value: str) -> str:
    """A schedule string as Airflow's DAG accepts it (a preset, @once, @continuous or a cron expression),
    refused here rather than making the DAG disappear at import; a cron expression that never fires
    (``0 0 30 2 *``) is refused too."""
    if value in SPECIAL_SCHEDULES:
        return value
    from croniter import CroniterBadCronError, CroniterBadDateError, croniter

    try:
        croniter(CRON_PRESETS.get(value, value)).get_next()
    except (CroniterBadCronError, CroniterBadDateError, ValueError) as exc:
        raise ValueError(
            f"not a schedule Airflow accepts ({exc}): use a preset ({', '.join(CRON_PRESETS)}) or a cron "
            "expression such as '0 3 * * 0'"
        ) from None
    return value


Schedule = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_check_schedule)]


# Field descriptions are the "meaning" column of docs/policy.md, word for word (tests/test_docs.py checks
# it): the JSON Schema of `warehouse-gdpr policy schema` shows editors the same text as the reference.
# A key that several models share (each column treatment's `pseudonymise`, each clock's `kind`, each
# erasure target's `name`) takes its text from one constant below.

_PSEUDONYMISE = (
    '`hash`: HMAC-SHA256 with the pepper (stays joinable; needs a text column of 64+ characters; an email column, '
    "the subject's `email_column` or one of `email_columns`, is hashed normalised, as `warehouse-gdpr subject-hash` "
    'does); `"null"`: set to NULL; `fixed`: set to `value`; `keep`: left as it is'
)
_CLOCK_KIND = (
    "`last_interaction`: the person's last own interaction; `related_max`: the latest value of a column of a "
    "mapped table"
)
_CLOCK_FALLBACK = (
    "subject column (a date) the clock uses when it finds no date: with `last_interaction`, a person who never "
    "interacted; with `related_max`, a person with no row in `table` or only NULL values in `column` (e.g. "
    "`created_at`); without it, such a person is never selected (the catalog check warns)"
)
_TARGET_NAME = "unique name of the target (outbox, audit, the register's `processors[].targets`)"
_TARGET_KIND = "how it is reached: `http` (an API) or `sql` (statements on another database)"
_TARGET_CONNECTION = "Airflow connection (HTTP: base URL and auth headers; SQL: any DB-API connection)"
_TARGET_TIMEOUT = (
    "overall deadline of each call to the target, in seconds (HTTP: connecting, sending and the whole answer; "
    "SQL on PostgreSQL: each statement's `statement_timeout`)"
)


class AirflowSettings(_Model):
    warehouse_connection_id: Ident = Field(
        default="warehouse", description="Airflow connection to the warehouse (postgres, psycopg 3)"
    )
    keys_connection_id: Ident = Field(
        default="gdpr_keys",
        description="Airflow connection whose extra holds the pepper, the store keys and the archive's public keys "
        "(every task reads it)",
    )
    archive_private_connection_id: Ident = Field(
        default="gdpr_archive_private",
        description="Airflow connection whose extra holds the archive's private keys: only the access request "
        "and the archive-reading commands read it (restrict it to them in your secrets backend)",
    )
    sweep_schedule: Schedule = Field(default="@weekly", description="schedule of `gdpr_retention_sweep`")


class Subject(_Model):
    table: QualifiedName = Field(description="the table of people (also listed in `tables`)")
    primary_key: Ident = Field(description="its primary key (the sweep's keyset batches follow it)")
    email_column: Ident = Field(
        description="the email that identifies the person (erasure looks it up, opt-out hashes it)"
    )
    phone_column: Ident | None = Field(
        default=None,
        description="the direct phone column, if any; only checked to exist (pseudonymise it through "
        "`tables[].columns`)",
    )
    pseudonymised_marker: Ident = Field(
        description="timestamp column set to `now()` by pseudonymisation; a marked subject is never selected by a rule "
        "again"
    )
    restriction_column: Ident | None = Field(
        default=None,
        description="boolean do-not-contact flag, set to true when processing is restricted (an erasure restricted by "
        "a hold, opt-out enforcement, a quarantined resurrection); `gdpr_optout_sync` needs it",
    )


LegalBasis = Literal[
    "consent", "contract", "legal_obligation", "vital_interests", "public_task", "legitimate_interest"
]
Text = Annotated[str, Field(max_length=2000)]

_PROVIDED = (
    "the person gave this column's data themselves (a form, an email, a call): a portability request (art. 20) "
    "exports it; derived or internal data (scores, a rep's notes, internal ids) is left out"
)


class HashColumn(_Model):
    pseudonymise: Literal["hash"] = Field(description=_PSEUDONYMISE)
    provided: bool = Field(default=False, description=_PROVIDED)


class NullColumn(_Model):
    pseudonymise: Literal["null"] = Field(description=_PSEUDONYMISE)
    provided: bool = Field(default=False, description=_PROVIDED)


class FixedColumn(_Model):
    pseudonymise: Literal["fixed"] = Field(description=_PSEUDONYMISE)
    value: str = Field(description="the constant written by `fixed` (a text that fits the column)")
    provided: bool = Field(default=False, description=_PROVIDED)


class KeepColumn(_Model):
    pseudonymise: Literal["keep"] = Field(description=_PSEUDONYMISE)
    provided: bool = Field(default=False, description=_PROVIDED)


ColumnTreatment = Annotated[
    HashColumn | NullColumn | FixedColumn | KeepColumn, Field(discriminator="pseudonymise")
]


class Archive(_Model):
    """The legal obligation that keeps a table's originals when its rows are pseudonymised, and how long."""

    for_: str = Field(
        alias="for",
        description="how long the encrypted originals are kept (ISO 8601 duration), counted from `from`, else from "
        "the sweep's `as_of`",
    )
    from_: Ident | None = Field(
        default=None,
        alias="from",
        description="a date column of the table the period counts from (e.g. `issued_on`); a row whose period has "
        "already ended is not archived, a NULL counts from `as_of`",
    )
    obligation: str = Field(
        min_length=1,
        max_length=500,
        description="the legal obligation that requires keeping them (quoted by the register and by erasure "
        'answers), e.g. "French Commercial Code L123-22 (accounting records)"',
    )

    _duration = field_validator("for_")(lambda cls, v: _check_duration(v))


class MappedTable(_Model):
    table: QualifiedName = Field(description="a table holding personal data")
    primary_key: Ident = Field(description="its primary key (identifies each archived original and each hashed row)")
    subject_column: Ident = Field(description="the column holding the subject's primary key")
    email_columns: list[Ident] = Field(
        default_factory=list,
        description="text columns holding the person's email: the sweep, erasure and the opt-out guard also find the "
        "person's rows by them (rows never linked to the subject); index `lower(btrim(column))`",
    )
    kept_when_held: bool = Field(
        default=False, description="kept, not erased, when a hold restricts an erasure (e.g. accounting records)"
    )
    archive: Archive | None = Field(
        default=None,
        description="when a legal obligation requires keeping this table's originals: pseudonymisation first copies "
        "its rows, encrypted, to `gdpr_archive` for that period; tables without it keep no copy",
    )
    columns: dict[Ident, ColumnTreatment] = Field(
        default_factory=dict,
        description="what pseudonymisation does to each personal column; unlisted columns are left as they are",
    )
    # What article 15(1) makes an access report tell the person about this table's data.
    title: Text = Field(
        default="", description="heading of the table's section in an access report (default: the table name)"
    )
    purpose: Text = Field(default="", description="what the data of this table is used for (art. 15(1)(a))")
    legal_basis: LegalBasis | None = Field(
        default=None, description="the legal basis of that processing (art. 6(1)), stated in an access report"
    )
    source: Text = Field(
        default="",
        description="where the data comes from (art. 15(1)(g)), e.g. \"the person, through our web forms\"",
    )
    retention: Text = Field(
        default="",
        description="how long the data is kept, in words, when the retention rules alone do not say it (e.g. a "
        "period set by law); an access report states it with the rules that apply to the person",
    )


class Interactions(_Model):
    table: QualifiedName = Field(description="the activity table")
    subject_column: Ident = Field(description="its column holding the subject's primary key")
    kind_column: Ident = Field(description="its column holding the kind of activity")
    at_column: Ident = Field(description="its column holding when the activity happened")
    subject_initiated: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        min_length=1,
        description="the kinds that are the person's own; only these restart a `last_interaction` clock",
    )
    expect_absent: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list,
        description="kinds of `subject_initiated` that may occur nowhere in the table yet: the check warns instead "
        "of refusing the policy (any other kind that occurs nowhere is taken for a typo)",
    )

    @model_validator(mode="after")
    def _absent_are_listed(self) -> Interactions:
        _require_listed(self.expect_absent, self.subject_initiated, "subject_initiated")
        return self


Action = Literal["delete", "pseudonymise"]


def _every_action() -> list[Action]:
    return ["delete", "pseudonymise"]


class Hold(_Model):
    name: Ident = Field(description="unique name of the hold (logs, audit, certificates)")
    description: str = Field(default="", description="why it exists (quoted in the register's retention wording)")
    predicate: Predicate = Field(
        description="true when the hold applies to the subject `s`; NULL counts as true (fail-safe: a hold that "
        "cannot be decided holds)"
    )
    blocks: list[Action] = Field(
        default_factory=_every_action,
        min_length=1,
        description="the sweep actions it suspends; an erasure request is checked against every hold, whatever this "
        "says",
    )
    on_erasure: Literal["refuse", "restrict"] = Field(
        default="restrict",
        description="an erasure request of a held person: `restrict` erases what is not `kept_when_held` and flags "
        "the subject row with `restriction_column`; `refuse` erases nothing (a refusing hold wins)",
    )


class StatusFilter(_Model):
    column: Ident = Field(description="the subject's status column")
    values: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        min_length=1, description="the status values the rule applies to"
    )
    expect_absent: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list,
        description="values of `values` that may occur nowhere in the subject table yet: the check warns instead of "
        "refusing the policy (any other value that occurs nowhere is taken for a typo)",
    )

    @model_validator(mode="after")
    def _absent_are_listed(self) -> StatusFilter:
        _require_listed(self.expect_absent, self.values, "values")
        return self


class LastInteractionClock(_Model):
    kind: Literal["last_interaction"] = Field(description=_CLOCK_KIND)
    fallback: Ident | None = Field(default=None, description=_CLOCK_FALLBACK)


class RelatedMaxClock(_Model):
    kind: Literal["related_max"] = Field(description=_CLOCK_KIND)
    table: QualifiedName = Field(description="a mapped table, joined on its `subject_column` (e.g. contracts)")
    column: Ident = Field(
        description="its date column (e.g. `end_date`); NULL values are ignored (an open contract has no end)"
    )
    fallback: Ident | None = Field(default=None, description=_CLOCK_FALLBACK)


Clock = Annotated[LastInteractionClock | RelatedMaxClock, Field(discriminator="kind")]


class Rule(_Model):
    name: Ident = Field(description="unique rule name (the sweep's `rules` param takes these)")
    description: str = Field(default="", description="what it implements (for readers; the code does not use it)")
    statuses: StatusFilter = Field(description="which subjects the rule applies to")
    clock: Clock = Field(description="the retention clock")
    retain_for: str = Field(description="how long after the clock the data may stay")
    action: Action = Field(
        description="what happens to expired subjects: `delete` removes them and their rows in every mapped table; "
        "`pseudonymise` applies `tables[].columns`, after archiving the originals of the tables with an `archive` "
        "obligation"
    )

    _duration = field_validator("retain_for")(lambda cls, v: _check_duration(v))

    @model_validator(mode="before")
    @classmethod
    def _archive_for_moved(cls, data: object) -> object:
        if isinstance(data, dict) and "archive_for" in data:
            given = data["archive_for"]
            period = given if isinstance(given, str) and DURATION.fullmatch(given) else "P10Y"
            raise ValueError(
                "`archive_for` is no longer a key of a rule: the archive keeps only the tables a legal obligation "
                "requires, for that obligation's period. Delete `archive_for` here and, under `tables`, give each "
                f"table whose originals the law requires keeping `archive: {{for: {period}, obligation: "
                '"<the law, e.g. French Commercial Code L123-22 (accounting records)>"}` (e.g. the invoices). '
                "Archive rows written before keep their own purge date"
            )
        return data


_ACTION_METHOD = "HTTP method (default: the preset's)"
_ACTION_ENDPOINT = (
    "path template; `{identifier}` (the person's current email) is URL-encoded into it (default: the preset's)"
)
_ACTION_SUCCESS_CODES = "the 2xx answers that acknowledge (default: the preset's, else 200, 201, 202, 204)"
_ACTION_SUCCESS_BODY = "JSON values a success answer's body must hold to count (e.g. `{updated: true}`)"
_RESTRICT_BODY = "JSON body (default: the preset's); a string value that is exactly `{identifier}` is replaced by it"


class HttpAction(_Model):
    """One call that tells an HTTP target to restrict, or to lift a restriction (presets: propagation.ACTIONS)."""

    method: Literal["POST", "PUT", "PATCH", "DELETE"] | None = Field(default=None, description=_ACTION_METHOD)
    endpoint: str | None = Field(default=None, description=_ACTION_ENDPOINT)
    body: object | None = Field(default=None, description=_RESTRICT_BODY)
    success_codes: list[int] | None = Field(default=None, description=_ACTION_SUCCESS_CODES)
    success_body: dict[str, object] | None = Field(default=None, description=_ACTION_SUCCESS_BODY)

    @model_validator(mode="after")
    def _codes(self) -> HttpAction:
        bad = [c for c in self.success_codes or [] if not 200 <= c <= 299]
        if bad:
            raise ValueError(f"success_codes must be 2xx answers, got {bad}")
        if self.endpoint is not None and not self.endpoint.startswith("/"):
            raise ValueError("endpoint must be a path starting with /")
        return self


class HttpRectify(_Model):
    """How an HTTP target takes a correction: which of the subject's columns it holds, under which field names."""

    fields: dict[Ident, Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1,
        description="the rectifiable columns this target holds, each with the API's field name (e.g. "
        "`{direct_phone: SMS}`); a correction of another column is not sent to it",
    )
    method: Literal["POST", "PUT", "PATCH"] | None = Field(default=None, description=_ACTION_METHOD)
    endpoint: str | None = Field(default=None, description=_ACTION_ENDPOINT)
    body: object | None = Field(
        default=None,
        description="JSON body (default: the preset's); a string value that is exactly `{changes}` is replaced by "
        "the object of changed fields (`{field: new value}`), one that is exactly `{identifier}` by the email",
    )
    success_codes: list[int] | None = Field(default=None, description=_ACTION_SUCCESS_CODES)
    success_body: dict[str, object] | None = Field(default=None, description=_ACTION_SUCCESS_BODY)

    @model_validator(mode="after")
    def _codes(self) -> HttpRectify:
        bad = [c for c in self.success_codes or [] if not 200 <= c <= 299]
        if bad:
            raise ValueError(f"success_codes must be 2xx answers, got {bad}")
        if self.endpoint is not None and not self.endpoint.startswith("/"):
            raise ValueError("endpoint must be a path starting with /")
        return self


class HttpTarget(_Model):
    """A downstream system reached over HTTP; base URL and auth come from an Airflow HTTP connection.

    Redirects are never followed. An answer counts as an acknowledgement only when it is what the API
    says success is (code and body); a 404 ("already gone") only after this run's preflight proved the
    base URL and credentials right; and, where there is a lookup, only when the lookup then answers 404.
    The presets (propagation.PRESETS) give each of these for their API."""

    name: Ident = Field(description=_TARGET_NAME)
    kind: Literal["http"] = Field(description=_TARGET_KIND)
    connection_id: Ident = Field(description=_TARGET_CONNECTION)
    preset: Literal["brevo", "hubspot"] | None = Field(
        default=None,
        description="HTTP: known API (`DELETE /v3/contacts/{identifier}`, "
        "`POST /crm/v3/objects/contacts/gdpr-delete`)",
    )
    method: Literal["DELETE", "POST", "PUT"] | None = Field(default=None, description="HTTP method")
    endpoint: str | None = Field(
        default=None, description="path template; `{identifier}` is URL-encoded into it"
    )
    body: dict[str, object] | None = Field(
        default=None,
        description="JSON body; a string value that is exactly `{identifier}` is replaced by the identifier",
    )
    success_codes: list[int] | None = Field(
        default=None,
        description="the 2xx answers that acknowledge (default: the preset's, else 200, 201, 202, 204); a 3xx "
        "redirect is never followed nor an acknowledgement",
    )
    success_body: dict[str, object] | None = Field(
        default=None,
        description="JSON values a success answer's body must hold to count (e.g. `{deleted: true}`); in any case "
        "a success answer whose body is not JSON, or holds an `error` or `errors` key, does not count",
    )
    not_found_body: dict[str, object] | None = Field(
        default=None,
        description='JSON values a 404 body must hold to mean "already gone" (default: the preset\'s); a 404 counts '
        "only after this run's preflight passed",
    )
    preflight_endpoint: str | None = Field(
        default=None,
        description="authenticated `GET` path called once per run before any erasure is sent: a 2xx JSON object "
        "proves the base URL and credentials, anything else keeps the target's erasures pending "
        "(default: the preset's; required without a preset)",
    )
    lookup_endpoint: str | None = Field(
        default=None,
        description="`GET` path template with `{identifier}` that confirms a deletion: acknowledged only when it "
        "answers 404 after the erasure call (default: the preset's)",
    )
    access_endpoint: str | None = Field(
        default=None,
        description="`GET` path template with `{identifier}` that returns what the system holds on the person, for "
        "an access request (default: the preset's); its 404 counts as \"holds nothing\" only with the API's "
        "not-found answer and after this run's preflight",
    )
    timeout_seconds: int = Field(default=30, ge=1, le=600, description=_TARGET_TIMEOUT)
    rectify: HttpRectify | None = Field(
        default=None,
        description="how this target takes a rectification (GDPR art. 16): the fields it holds, and the call (presets "
        "`brevo`: `PUT /v3/contacts/{identifier}` with `{attributes: {changes}}`; `hubspot`: "
        "`PATCH /crm/v3/objects/contacts/{identifier}?idProperty=email` with `{properties: {changes}}`); without it "
        "the target is not told of corrections",
    )
    restrict: HttpAction | None = Field(
        default=None,
        description="the call that restricts the person's processing at this target (GDPR art. 18; preset `brevo`: "
        "`PUT /v3/contacts/{identifier}` with `{emailBlacklisted: true}`); without it the target is not told",
    )
    lift: HttpAction | None = Field(
        default=None,
        description="the call that lifts the restriction (preset `brevo`: `{emailBlacklisted: false}`); required "
        "with `restrict`",
    )

    @model_validator(mode="after")
    def _preset_or_explicit(self) -> HttpTarget:
        if self.preset is None and (self.method is None or self.endpoint is None):
            raise ValueError("an http target needs a preset (brevo, hubspot) or both method and endpoint")
        if self.endpoint is not None and "{identifier}" not in self.endpoint and not self.body:
            raise ValueError("the endpoint or the body must contain {identifier}")
        if self.preset is None and self.preflight_endpoint is None:
            raise ValueError(
                "an http target without a preset needs preflight_endpoint: an authenticated GET (e.g. the API's "
                "account endpoint) that proves the base URL and credentials before any erasure is sent"
            )
        if self.preflight_endpoint is not None and "{identifier}" in self.preflight_endpoint:
            raise ValueError("preflight_endpoint is called without a person: it must not contain {identifier}")
        if self.lookup_endpoint is not None and "{identifier}" not in self.lookup_endpoint:
            raise ValueError("lookup_endpoint must contain {identifier} (the lookup of the erased person)")
        if self.access_endpoint is not None and "{identifier}" not in self.access_endpoint:
            raise ValueError("access_endpoint must contain {identifier} (what the system holds on that person)")
        bad = [c for c in self.success_codes or [] if not 200 <= c <= 299]
        if bad:
            raise ValueError(
                f"success_codes must be 2xx answers (a redirect or an error never acknowledges), got {bad}")
        _check_actions(self)
        return self


def _check_actions(target: HttpTarget) -> None:
    """`restrict` and `lift` go together; without a preset that has them, each needs its method and endpoint."""
    if (target.restrict is None) != (target.lift is None):
        raise ValueError("give both `restrict` and `lift` (a restriction told downstream must be liftable), or neither")
    presets = {"rectify": ("brevo", "hubspot"), "restrict": ("brevo",), "lift": ("brevo",)}
    for name, with_preset in presets.items():
        action = getattr(target, name)
        if action is not None and target.preset not in with_preset and (action.method is None or
                                                                          action.endpoint is None):
            raise ValueError(f"`{name}` needs method and endpoint (no preset gives them for this target)")


class SqlTarget(_Model):
    """Another database reached through an Airflow connection; statements take %(identifier)s."""

    name: Ident = Field(description=_TARGET_NAME)
    kind: Literal["sql"] = Field(description=_TARGET_KIND)
    connection_id: Ident = Field(description=_TARGET_CONNECTION)
    statements: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1,
        description="run in one transaction with the `%(identifier)s` parameter (each statement must use it)",
    )
    max_rows: int = Field(
        default=100, ge=1, le=1_000_000,
        description="the most rows the statements may change together for one person: a call that changes more "
        "(or whose count the driver cannot give) is rolled back and not acknowledged",
    )
    access: dict[Ident, Annotated[str, Field(min_length=1)]] = Field(
        default_factory=dict,
        description="for an access request: named queries, each one `SELECT` with the `%(identifier)s` parameter "
        "returning what the system holds on the person; run in a read-only transaction, each is a section of the "
        "report",
    )
    timeout_seconds: int = Field(default=30, ge=1, le=600, description=_TARGET_TIMEOUT)
    rectify_statements: dict[Ident, list[Annotated[str, Field(min_length=1)]]] = Field(
        default_factory=dict,
        description="per rectifiable column this database holds, the statements that correct it, run in one "
        "transaction with `%(identifier)s` (the person's current email) and `%(value)s` (the new value)",
    )
    restrict_statements: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="statements that restrict the person's processing there, with `%(identifier)s`; without them "
        "the target is not told of restrictions",
    )
    lift_statements: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="statements that lift the restriction, with `%(identifier)s`; required with "
        "`restrict_statements`",
    )

    @field_validator("statements")
    @classmethod
    def _parameterised(cls, value: list[str]) -> list[str]:
        for statement in value:
            if "%(identifier)s" not in statement:
                raise ValueError("each statement must use the %(identifier)s parameter (never string formatting)")
        return value

    @model_validator(mode="after")
    def _action_statements(self) -> SqlTarget:
        for column, statements in self.rectify_statements.items():
            if not statements or any("%(identifier)s" not in s or "%(value)s" not in s for s in statements):
                raise ValueError(f"rectify_statements.{column}: each statement must use %(identifier)s and %(value)s")
        if bool(self.restrict_statements) != bool(self.lift_statements):
            raise ValueError("give both `restrict_statements` and `lift_statements`, or neither")
        for statement in [*self.restrict_statements, *self.lift_statements]:
            if "%(identifier)s" not in statement:
                raise ValueError("each restrict or lift statement must use the %(identifier)s parameter")
        return self

    @field_validator("access")
    @classmethod
    def _access_queries(cls, value: dict[str, str]) -> dict[str, str]:
        for name, query in value.items():
            if "%(identifier)s" not in query:
                raise ValueError(f"access query {name}: it must use the %(identifier)s parameter (never string "
                                 "formatting)")
            if not re.match(r"^\s*(SELECT|WITH)\b", query, re.IGNORECASE) or ";" in query.rstrip().rstrip(";"):
                raise ValueError(f"access query {name}: one SELECT statement (it runs read-only)")
        return value


Target = Annotated[HttpTarget | SqlTarget, Field(discriminator="kind")]


class Erasure(_Model):
    approval_required: bool = Field(
        default=False, description="four-eyes approval (`ApprovalOperator`) before erasing"
    )
    retries: int = Field(
        default=5,
        ge=0,
        le=50,
        description="retries of each propagation task (exponential backoff); after the last one "
        "`gdpr_erasure_retry` keeps trying hourly",
    )
    retry_delay_seconds: int = Field(
        default=60,
        ge=1,
        description="delay before the first retry of a propagation task, in seconds (longer at each retry: "
        "exponential backoff)",
    )
    deadline_warning_days: int = Field(
        default=7, ge=0, le=30, description="warn this many days before the one-month due date"
    )
    on_failure_callback: Annotated[str, AfterValidator(_callable_path)] | None = Field(
        default=None,
        description="`package.module:attribute` of an Airflow notifier instance or a function taking the context, "
        "called when a run of `gdpr_erasure_retry` fails, as it does while a request is overdue: route it to your "
        "pager",
    )
    targets: list[Target] = Field(
        default_factory=list,
        description="downstream systems told to erase the person, by normalised email (none when the erasure is "
        "refused or no email is known)",
    )

    @model_validator(mode="after")
    def _unique_targets(self) -> Erasure:
        _require_unique([t.name for t in self.targets], "target")
        return self


class OptOutSource(_Model):
    """Where opt-outs are collected: a SQL predicate on the subject row `s` (e.g. a do-not-contact flag)."""

    name: Ident = Field(
        description="unique name of the source (stored as the entry's source; when several select a subject, the "
        "first listed wins)"
    )
    predicate: Predicate = Field(description="true for an opted-out subject")


class ShareTarget(_Model):
    """A downstream system that accepts the list of hashes (HTTP POST of JSON batches)."""

    name: Ident = Field(
        description="unique name of the share target (audit, the register's `processors[].targets`)"
    )
    connection_id: Ident = Field(description="Airflow HTTP connection (base URL and auth headers)")
    endpoint: str = Field(min_length=1, description='receives `POST {"hashes": [...]}`')
    batch_size: int = Field(default=1000, ge=1, le=100_000, description="hashes per request")


class OptOut(_Model):
    schedule: Schedule = Field(default="@daily", description="schedule of `gdpr_optout_sync`")
    sources: list[OptOutSource] = Field(default_factory=list, description="where opt-outs are collected")
    strip_plus_tags: bool = Field(
        default=False,
        description="fold `jane+news@x` onto `jane@x` before hashing (erasure hashes the same way)",
    )
    resurrection: Literal["erase", "quarantine"] = Field(
        default="erase",
        description="an erased person who comes back (an import, a form): `erase` erases them again, `quarantine` "
        "keeps them flagged and listed in `gdpr.quarantine`; a held person is always quarantined",
    )
    share_targets: list[ShareTarget] = Field(
        default_factory=list, description="downstream systems that accept the list of hashes"
    )
    export_path: str | None = Field(
        default=None,
        description="file written with the hashes only, one per line; a relative path is under the policy file's "
        "folder",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> OptOut:
        _require_unique([s.name for s in self.sources], "source")
        _require_unique([t.name for t in self.share_targets], "share target")
        return self


class Requests(_Model):
    """What every request of a person (access, erasure, ...) shares: how long its record is kept."""

    keep_for: str = Field(
        default="P3Y",
        description="how long a completed request (kind, dates, status, outcome, counts, targets) and its outbox "
        "rows are kept as proof after completion, at least one year (the database refuses less); then the weekly "
        "sweep purges them",
    )

    @field_validator("keep_for")
    @classmethod
    def _at_least_a_year(cls, value: str) -> str:
        years, months, weeks, days = (int(n or 0) for n in DURATION.fullmatch(_check_duration(value)).groups())  # type: ignore[union-attr]
        if years * 360 + months * 30 + weeks * 7 + days < 360:  # PostgreSQL's interval order: a year is 360 days
            raise ValueError(f"a request is kept at least one year after completion (P1Y, P12M or P52W), got {value!r}")
        return value


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})") from None
    return value


class ColumnCopy(_Model):
    table: QualifiedName = Field(description="a mapped table holding a copy of the column (e.g. `crm.support_tickets`)")
    column: Ident = Field(description="its column holding the copy (e.g. `requester_email`)")


class RectifiableColumn(_Model):
    """A column of the subject a person may have corrected (GDPR art. 16), with the check of a new value."""

    pattern: Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_check_regex)] = Field(
        description="a new value must match it entirely (Python `re.fullmatch`, after surrounding blanks are "
        "dropped); a value that does not is refused before any change and never echoed"
    )
    min_length: int = Field(default=1, ge=0, le=10_000, description="the shortest new value accepted, in characters")
    max_length: int = Field(ge=1, le=10_000, description="the longest new value accepted, in characters")
    copies: list[ColumnCopy] = Field(
        default_factory=list,
        description="other mapped tables holding a copy of the value (e.g. a support ticket's requester email): "
        "the person's rows there that hold one are corrected in the same transaction",
    )

    @model_validator(mode="after")
    def _lengths(self) -> RectifiableColumn:
        if self.min_length > self.max_length:
            raise ValueError("min_length is larger than max_length")
        return self


class Rectification(_Model):
    """Rectification on request (GDPR art. 16): `gdpr_subject_rectification`."""

    approval_required: bool = Field(
        default=False, description="four-eyes approval (`ApprovalOperator`) before rectifying"
    )
    columns: dict[Ident, RectifiableColumn] = Field(
        default_factory=dict,
        description="the subject's columns a person may have corrected, each with its check; a change of any other "
        "column is refused before any change",
    )


class Webhook(_Model):
    """An HTTP endpoint told of each restriction and lift (the sales team): internal ids only, never an email."""

    name: Ident = Field(description="its name in the outbox, the audit log and `warehouse-gdpr requests`")
    connection_id: Ident = Field(description="Airflow HTTP connection (base URL and auth headers)")
    endpoint: str = Field(
        min_length=1,
        description='receives `POST {"event": "restricted" | "lifted", "request_id": ..., "subject_table": ..., '
        '"subject_ids": [...]}`; any 2xx answer acknowledges',
    )
    timeout_seconds: int = Field(default=30, ge=1, le=600, description=_TARGET_TIMEOUT)


class Restriction(_Model):
    """Restriction of processing on request (GDPR art. 18): `gdpr_subject_restriction`."""

    database_guard: bool = Field(
        default=False,
        description="a trigger on every mapped table refuses UPDATE and DELETE of a restricted person's rows by any "
        "role that is not a member of `gdpr_engine` (installed by `warehouse-gdpr schema install --policy`)",
    )
    notify: Webhook | None = Field(
        default=None, description="the sales team's webhook, told of each restriction and each lift"
    )


_CNIL = (
    "You may lodge a complaint with the CNIL (Commission nationale de l'informatique et des libertés), "
    "3 place de Fontenoy, TSA 80715, 75334 Paris Cedex 07, France, www.cnil.fr/en/plaintes"
)


class Access(_Model):
    """The answer to an access (art. 15) or portability (art. 20) request: an encrypted package."""

    location: str = Field(
        default="gdpr_access",
        min_length=1,
        max_length=1000,
        description="where `gdpr_subject_access` writes the encrypted packages: a folder (a relative path is under "
        "`$AIRFLOW_HOME`) or an `airflow.sdk.ObjectStoragePath` URL such as `s3://aws_default@bucket/gdpr-access`; "
        "`warehouse-gdpr access unpack` reads them there",
    )
    keep_for: str = Field(
        default="P30D",
        description="how long a package stays there after it was written; then the weekly sweep deletes it "
        "(audited, counted in its report)",
    )
    complaint: Text = Field(
        default=_CNIL,
        min_length=1,
        description="how the person may lodge a complaint with the supervisory authority (art. 15(1)(f)), as the "
        "report words it",
    )
    automated_decisions: Text | None = Field(
        default=None,
        min_length=1,
        description="whether decisions based solely on automated processing, including profiling, are made with "
        "this data (art. 15(1)(h), art. 22) and, if so, their logic, significance and consequences, as the report "
        "words it; an access request is refused until the policy says it (no default could be true of every "
        "warehouse)",
    )

    _duration = field_validator("keep_for")(lambda cls, v: _check_duration(v))

    @field_validator("location")
    @classmethod
    def _location(cls, value: str) -> str:
        if value != value.strip() or "\n" in value or "\x00" in value:
            raise ValueError("a folder or a URL, without surrounding spaces or control characters")
        return value


class Evidence(_Model):
    """Evidence kept outside the warehouse, where its owner cannot rewrite it."""

    location: str = Field(
        default="gdpr_evidence",
        min_length=1,
        max_length=1000,
        description="where every DAG run exports the audit chain's head (its last audit id and hash) and the journal "
        "of erasures, suppression entries and restrictions (replayed after a restore), and `warehouse-gdpr audit "
        "verify` reads them: a folder (a relative path is under `$AIRFLOW_HOME`) or an "
        "`airflow.sdk.ObjectStoragePath` URL such as `s3://aws_default@bucket/gdpr` (the Airflow connection id "
        "before `@`); shared by every worker, and not writable by the warehouse's owner",
    )

    @field_validator("location")
    @classmethod
    def _location(cls, value: str) -> str:
        if value != value.strip() or "\n" in value or "\x00" in value:
            raise ValueError("a folder or a URL, without surrounding spaces or control characters")
        return value


# --- Article 30 register of processing activities (register.py renders it) -----------------------
# Every field has a default so that an unfinished register never stops a sweep or an erasure from
# loading the policy; `register.problems` names what is missing and generating the register
# fails until it is complete.

TransferMechanism = Literal[
    "adequacy_decision", "standard_contractual_clauses", "binding_corporate_rules", "derogation_art49"
]
Country = Annotated[str, Field(pattern=r"^([A-Z]{2})?$")]


class Controller(_Model):
    name: Text = Field(default="", description="legal name of the company")
    represented_by: Text = Field(default="", description="its representative (managing director, DPO)")
    address: Text = Field(default="", description="postal address")
    contact: Text = Field(default="", description="contact for data protection questions")
    dpo: Text = Field(default="", description="data protection officer, if one is designated")


class DataCategory(_Model):
    category: Text = Field(default="", description='name of the category, e.g. "Contact data"')
    items: list[Text] = Field(
        default_factory=list, description="the data of this category, e.g. `[professional email, direct phone]`"
    )


class Recipient(_Model):
    name: Text = Field(default="", description='who receives the data, e.g. "Sales team"')
    access: Text = Field(default="", description='what they may do, e.g. "read access for campaigns"')


class Processor(_Model):
    name: Text = Field(
        default="", description='the processor\'s name, e.g. "Brevo" (a transfer names it as its `recipient`)'
    )
    service: Text = Field(default="", description='what it does for the controller, e.g. "emailing"')
    country: Country = Field(
        default="",
        description="where it processes the data; outside the EU/EEA it needs a `transfers` entry of the same name",
    )
    targets: list[Ident] = Field(
        default_factory=list,
        description="the erasure targets and opt-out share targets of this policy that are this processor",
    )


class Transfer(_Model):
    recipient: Text = Field(default="", description="the recipient (same name as its processor)")
    country: Country = Field(default="", description="destination, outside the EU/EEA")
    mechanism: TransferMechanism | None = Field(default=None, description="legal mechanism (art. 45–49)")
    safeguards: Text = Field(
        default="", description='additional safeguards, e.g. "transfer impact assessment on file"'
    )


class RetentionEntry(_Model):
    category: Text = Field(
        default="", description='the category of data or people it covers, e.g. "Prospects never converted"'
    )
    rule: Ident | None = Field(
        default=None,
        description="a retention rule of this policy: the entry is worded from it (period, clock, action, archive) "
        "and the holds that suspend it",
    )
    period: Text = Field(default="", description="a period the sweep does not enforce, in words")
    optout_list: bool = Field(
        default=False,
        description="the hashed opt-out list, kept permanently (an entry is needed when `optout.sources` is set)",
    )


class Activity(_Model):
    name: Ident = Field(description="short unique name")
    title: Text = Field(
        default="", description='title of the record, e.g. "Management of B2B commercial prospecting"'
    )
    purpose: Text = Field(default="", description="what the data is used for")
    legal_basis: LegalBasis | None = Field(default=None, description="legal basis (art. 6(1))")
    legal_basis_detail: Text = Field(default="", description="the interest pursued, or other precision")
    data_subjects: list[Text] = Field(default_factory=list, description="categories of people concerned")
    data_categories: list[DataCategory] = Field(default_factory=list, description="categories of data processed")
    sources: list[Text] = Field(default_factory=list, description="where the data comes from")
    recipients: list[Recipient] = Field(
        default_factory=list, description="internal recipients (at least one recipient or processor)"
    )
    processors: list[Processor] = Field(default_factory=list, description="subprocessors (sous-traitants)")
    transfers: list[Transfer] = Field(default_factory=list, description="transfers outside the EU/EEA")
    retention: list[RetentionEntry] = Field(
        default_factory=list, description="retention per category of data or people"
    )
    security_measures: list[Text] = Field(
        default_factory=list, description="technical and organisational measures"
    )
    rights: Text = Field(default="", description="how people exercise their rights, and the answer time")


class Register(_Model):
    controller: Controller = Field(
        default_factory=Controller, description="the controller (responsable de traitement)"
    )
    output_dir: str = Field(
        default="gdpr_register",
        description="where the task writes `register.md` and `register.html`; relative paths are under "
        "`$AIRFLOW_HOME` (the CLI: under the current directory)",
    )
    activities: list[Activity] = Field(
        default_factory=list, description="the processing activities (traitements)"
    )

    @model_validator(mode="after")
    def _unique_activities(self) -> Register:
        _require_unique([a.name for a in self.activities], "activity")
        return self

    # Problems found while reading the section (a typo, a wrong type): kept here instead of refusing
    # the whole policy, so that an unfinished register never stops a sweep or an erasure.
    _invalid: list[str] = PrivateAttr(default_factory=list)

    @property
    def invalid(self) -> list[str]:
        """Why the section could not be read (empty when it could); register.problems() reports them."""
        return self._invalid


def _tolerate_register(value: object, handler: ValidatorFunctionWrapHandler) -> Register | None:
    try:
        return handler(value)
    except ValidationError as exc:
        unreadable = Register()
        unreadable._invalid = [_format_error(err, prefix=("processing_register",)) for err in exc.errors()]
        return unreadable


class Policy(_Model):
    version: Literal[1] = Field(description="format version of the file (always 1)")

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_a_number(cls, value: object) -> object:
        if isinstance(value, bool):  # True == 1 in Python: strict mode alone would take `version: true`
            raise ValueError("expected the number 1")
        return value
    airflow: AirflowSettings = Field(
        default_factory=AirflowSettings, description="Airflow connections and the sweep's schedule"
    )
    batch_size: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="subjects per sweep transaction (keyset batches over the subject's primary key); also archive "
        "rows per purge transaction",
    )
    blast_radius_percent: float = Field(
        default=10.0,
        gt=0,
        le=100,
        description="a rule that would delete or pseudonymise more than this share of the subject table in one sweep "
        "stops before changing anything, unless the run confirms its count (the `confirm_blast_radius` param)",
    )
    subject: Subject = Field(description="the table of people")
    tables: list[MappedTable] = Field(
        min_length=1,
        description="every table holding personal data, the subject's table included; dependents are deleted in "
        "reverse order of the list",
    )
    interactions: Interactions = Field(
        description="the activity table whose subject-initiated rows restart a `last_interaction` clock"
    )
    holds: list[Hold] = Field(
        default_factory=list,
        description="legal holds: they suspend sweep actions and restrict or refuse erasure requests",
    )
    rules: list[Rule] = Field(min_length=1, description="retention rules, applied by `gdpr_retention_sweep`")
    erasure: Erasure = Field(default_factory=Erasure, description="erasure on request and its propagation")
    optout: OptOut = Field(default_factory=OptOut, description="the hashed opt-out list")
    requests: Requests = Field(
        default_factory=Requests, description="the record of people's requests (every kind), kept as proof"
    )
    rectification: Rectification = Field(
        default_factory=Rectification, description="rectification on request (GDPR art. 16)"
    )
    restriction: Restriction = Field(
        default_factory=Restriction, description="restriction of processing on request (GDPR art. 18)"
    )
    access: Access = Field(
        default_factory=Access,
        description="the answer to access (art. 15) and portability (art. 20) requests (`gdpr_subject_access`)",
    )
    processing_register: Annotated[Register | None, WrapValidator(_tolerate_register)] = Field(
        default=None, description="the register of processing activities (GDPR art. 30)"
    )
    evidence: Evidence = Field(
        default_factory=Evidence,
        description="evidence kept outside the warehouse: the audit chain's exported heads, the journal"
    )

    @model_validator(mode="after")
    def _cross_references(self) -> Policy:
        _require_unique([r.name for r in self.rules], "rule")
        _require_unique([h.name for h in self.holds], "hold")
        tables = [t.table for t in self.tables]
        if len(set(tables)) != len(tables):
            raise ValueError("each table may be mapped once in `tables`")
        if self.subject.table not in tables:
            raise ValueError(f"the subject table {self.subject.table} must also be listed in `tables`")
        if self.subject_mapping.subject_column != self.subject.primary_key:
            raise ValueError(
                f"subject.primary_key ({self.subject.primary_key}) and the subject_column of {self.subject.table} "
                f"in `tables` ({self.subject_mapping.subject_column}) must name the same column, the subject's key: "
                "any other column would treat other people's rows"
            )
        for i, mapped in enumerate(self.tables):
            if mapped.archive and mapped.table != self.subject.table and not any(
                not isinstance(t, KeepColumn) for t in mapped.columns.values()
            ):
                raise ValueError(
                    f"tables[{i}] ({mapped.table}): `archive` is set but pseudonymisation changes no column of this "
                    "table (none in `columns` but `keep`), so its rows stay as they are and nothing would be "
                    "archived: remove `archive`"
                )
        _check_rectification(self, tables)
        for rule in self.rules:
            if isinstance(rule.clock, RelatedMaxClock) and rule.clock.table not in tables:
                raise ValueError(
                    f"rule {rule.name}: clock table {rule.clock.table} must be listed in `tables` (to know its join)"
                )
        return self

    @property
    def subject_mapping(self) -> MappedTable:
        return next(t for t in self.tables if t.table == self.subject.table)

    @property
    def dependent_tables(self) -> list[MappedTable]:
        """Mapped tables other than the subject's, in the order they must be deleted (reverse of the file)."""
        return [t for t in reversed(self.tables) if t.table != self.subject.table]

    def email_columns(self, mapped: MappedTable) -> list[str]:
        """The columns of `mapped` holding the person's email: its `email_columns`, and the subject's
        `email_column` on the subject's table."""
        own = [self.subject.email_column] if mapped.table == self.subject.table else []
        return list(dict.fromkeys([*own, *mapped.email_columns]))

    def hashed_email_columns(self, mapped: MappedTable) -> list[str]:
        """The email columns of `mapped` that pseudonymisation hashes (normalised, as `Keys.subject_hash`)."""
        return [c for c in self.email_columns(mapped) if isinstance(mapped.columns.get(c), HashColumn)]

    def rule(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)


RESERVED_HOLD = "processing_restricted"  # the sweep's built-in hold (a restriction of processing, art. 18)


def _check_rectification(policy: Policy, tables: list[str]) -> None:
    """Copies live in other mapped tables; targets correct only rectifiable columns; no hold takes the
    built-in hold's name; the sales team's webhook has a name of its own."""
    if RESERVED_HOLD in [h.name for h in policy.holds]:
        raise ValueError(f"the hold name {RESERVED_HOLD} is the sweep's built-in hold for restricted people: rename it")
    columns = policy.rectification.columns
    for name, column in columns.items():
        for copy in column.copies:
            if copy.table not in tables or copy.table == policy.subject.table:
                raise ValueError(f"rectification.columns.{name}.copies: {copy.table} must be a mapped table other "
                                 "than the subject's (listed in `tables`)")
    for target in policy.erasure.targets:
        held = (target.rectify.fields if isinstance(target, HttpTarget) and target.rectify
                else target.rectify_statements if isinstance(target, SqlTarget) else {})
        unknown = sorted(set(held) - set(columns))
        if unknown:
            raise ValueError(f"erasure target {target.name}: rectifies {', '.join(unknown)}, not listed in "
                             "rectification.columns")
    notify = policy.restriction.notify
    if notify and notify.name in [t.name for t in policy.erasure.targets]:
        raise ValueError(f"restriction.notify.name {notify.name} is already the name of an erasure target")


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("hash", "null", "fixed", "keep", "last_interaction", "related_max"):
            continue  # discriminated-union branch names are noise for the reader
        else:
            out += f".{part}" if out else str(part)
    return out or "(document root)"


def parse_policy(data: object, source: str = "<policy>") -> Policy:
    """Validate an already-parsed document. Raises PolicyError naming `source` and each path."""
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a mapping at the document root, got {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: {exc.error_count()} problem(s) in the policy:"]
        lines += [f"  - {_format_error(err)}" for err in exc.errors()]
        raise PolicyError("\n".join(lines)) from None


def _format_error(err: typing.Any, prefix: tuple[str, ...] = ()) -> str:
    """One pydantic error as ``path: message`` in the policy's own words."""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see include/policy.yaml for the keys)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    return f"{_format_loc((*prefix, *err['loc']))}: {msg}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (a second value would silently win)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_policy(path: str | Path, content: bytes | None = None) -> Policy:
    """Read and validate a policy file (`content`: its bytes, when the caller has read them already)."""
    path = Path(path)
    try:
        text = (path.read_bytes() if content is None else content).decode("utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); save the policy as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_policy(data, str(path))


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(key path, field) for every field of `model` and of the models under it, depth first."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        yield path, info
        container = typing.get_origin(info.annotation)
        separator = "[]." if container is list else ".*." if container is dict else "."
        for sub in _models_in(info.annotation):
            yield from _fields(sub, path + separator)


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def key_paths(model: type[BaseModel] = Policy, prefix: str = "") -> list[str]:
    """Every key the policy file accepts, as documented in docs/policy.md (``tables[].columns.*.value``).

    docs/policy.md is checked against this list by the tests, so the reference cannot drift."""
    return list(dict.fromkeys(path for path, _ in _fields(model, prefix)))


def key_descriptions(model: type[BaseModel] = Policy, prefix: str = "") -> dict[str, str]:
    """{key path: the field's description} for every key of `key_paths` ("" when a field has none).

    The description is the "meaning" column of the key's row in docs/policy.md (the tests check it) and
    what the JSON Schema shows. A key several models share (the `pseudonymise` of each column treatment,
    the `kind` of each clock) has one row, so its fields must agree: ValueError names the key otherwise."""
    out: dict[str, str] = {}
    for path, info in _fields(model, prefix):
        text = info.description or ""
        if out.setdefault(path, text) != text:
            raise ValueError(f"{path}: the models sharing this key describe it differently: {out[path]!r}, {text!r}")
    return out
