"""The policy file: what the warehouse holds about people, and how long it may keep it.

`load_policy(path)` reads YAML, validates it with pydantic and returns a `Policy`. Every error names
the file, the path inside the document (``rules[2].retain_for``) and what was expected. The policy
holds no secret: keys come from an Airflow connection (see `crypto.py`).

Identifiers here are only checked for shape; `catalog.check_policy` checks them against the live
database before any write.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

IDENT = r"^[a-z_][a-z0-9_]{0,62}$"
QUALIFIED = r"^[a-z_][a-z0-9_]{0,62}\.[a-z_][a-z0-9_]{0,62}$"
DURATION = re.compile(r"^P(?=\d)(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)W)?(?:(\d+)D)?$")

Ident = Annotated[str, Field(pattern=IDENT)]


def _one_expression(value: str) -> str:
    if ";" in value:
        raise ValueError("a predicate is one SQL boolean expression: ';' is not allowed")
    return value


# A SQL boolean expression on the subject row `s`, written by the policy's author (never by a user).
Predicate = Annotated[str, Field(min_length=1, max_length=4000), AfterValidator(_one_expression)]
QualifiedName = Annotated[str, Field(pattern=QUALIFIED, description="schema.table")]


class PolicyError(ValueError):
    """The policy file is unreadable or invalid. The message lists every problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _require_unique(names: list[str], what: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique, repeated: {', '.join(dupes)}")


def _check_duration(value: str) -> str:
    match = DURATION.fullmatch(value)
    if not match:
        raise ValueError(f"expected an ISO 8601 duration such as P3Y, P18M or P30D, got {value!r}")
    if not any(int(n) for n in match.groups() if n):
        raise ValueError(f"a retention period must be longer than zero, got {value!r}")
    return value


class AirflowSettings(_Model):
    warehouse_connection_id: Ident = "warehouse"
    keys_connection_id: Ident = "gdpr_keys"
    sweep_schedule: str = "@weekly"


class Subject(_Model):
    table: QualifiedName
    primary_key: Ident
    email_column: Ident
    phone_column: Ident | None = None
    pseudonymised_marker: Ident = Field(
        description="timestamptz column set when the subject is pseudonymised; such subjects are not selected again"
    )
    restriction_column: Ident | None = Field(
        default=None,
        description="boolean column set to true when an erasure is restricted by a hold (e.g. a do-not-contact flag)",
    )


class HashColumn(_Model):
    pseudonymise: Literal["hash"]


class NullColumn(_Model):
    pseudonymise: Literal["null"]


class FixedColumn(_Model):
    pseudonymise: Literal["fixed"]
    value: str


class KeepColumn(_Model):
    pseudonymise: Literal["keep"]


ColumnTreatment = Annotated[
    Union[HashColumn, NullColumn, FixedColumn, KeepColumn], Field(discriminator="pseudonymise")
]


class MappedTable(_Model):
    table: QualifiedName
    primary_key: Ident
    subject_column: Ident = Field(description="column holding the subject's primary key")
    email_columns: list[Ident] = Field(
        default_factory=list,
        description="columns holding the person's email: an erasure also finds rows by them (e.g. unlinked tickets)",
    )
    kept_when_held: bool = Field(
        default=False, description="kept (not erased) when a hold restricts an erasure, e.g. accounting records"
    )
    columns: dict[Ident, ColumnTreatment] = Field(default_factory=dict)


class Interactions(_Model):
    table: QualifiedName
    subject_column: Ident
    kind_column: Ident
    at_column: Ident
    subject_initiated: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(min_length=1)


Action = Literal["delete", "pseudonymise"]


class Hold(_Model):
    name: Ident
    description: str = ""
    predicate: Predicate
    blocks: list[Action] = Field(default_factory=lambda: ["delete", "pseudonymise"], min_length=1)
    on_erasure: Literal["refuse", "restrict"] = Field(
        default="restrict",
        description="erasure request of a held subject: refuse it, or erase what is not kept_when_held and restrict the rest",
    )


class StatusFilter(_Model):
    column: Ident
    values: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(min_length=1)


class LastInteractionClock(_Model):
    kind: Literal["last_interaction"]
    fallback: Ident | None = Field(
        default=None, description="subject column used when the person never interacted (e.g. created_at)"
    )


class RelatedMaxClock(_Model):
    kind: Literal["related_max"]
    table: QualifiedName
    column: Ident


Clock = Annotated[Union[LastInteractionClock, RelatedMaxClock], Field(discriminator="kind")]


class Rule(_Model):
    name: Ident
    description: str = ""
    statuses: StatusFilter
    clock: Clock
    retain_for: str
    action: Action
    archive_for: str | None = None

    _duration = field_validator("retain_for", "archive_for")(
        lambda cls, v: v if v is None else _check_duration(v)
    )

    @model_validator(mode="after")
    def _archive_needs_pseudonymise(self) -> "Rule":
        if self.action == "pseudonymise" and self.archive_for is None:
            raise ValueError("action 'pseudonymise' needs archive_for (how long the encrypted originals are kept)")
        if self.action == "delete" and self.archive_for is not None:
            raise ValueError("archive_for is only meaningful with action 'pseudonymise'")
        return self


class HttpTarget(_Model):
    """A downstream system reached over HTTP; base URL and auth come from an Airflow HTTP connection."""

    name: Ident
    kind: Literal["http"]
    connection_id: Ident
    preset: Literal["brevo", "hubspot"] | None = None
    method: Literal["DELETE", "POST", "PUT"] | None = None
    endpoint: str | None = Field(default=None, description="path template; {identifier} is URL-encoded into it")
    body: dict[str, object] | None = Field(default=None, description="JSON body; the string '{identifier}' is replaced")
    success_codes: list[int] = Field(default_factory=lambda: [200, 201, 202, 204])

    @model_validator(mode="after")
    def _preset_or_explicit(self) -> "HttpTarget":
        if self.preset is None and (self.method is None or self.endpoint is None):
            raise ValueError("an http target needs a preset (brevo, hubspot) or both method and endpoint")
        if self.endpoint is not None and "{identifier}" not in self.endpoint and not self.body:
            raise ValueError("the endpoint or the body must contain {identifier}")
        return self


class SqlTarget(_Model):
    """Another database reached through an Airflow connection; statements take %(identifier)s."""

    name: Ident
    kind: Literal["sql"]
    connection_id: Ident
    statements: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)

    @field_validator("statements")
    @classmethod
    def _parameterised(cls, value: list[str]) -> list[str]:
        for statement in value:
            if "%(identifier)s" not in statement:
                raise ValueError("each statement must use the %(identifier)s parameter (never string formatting)")
        return value


Target = Annotated[Union[HttpTarget, SqlTarget], Field(discriminator="kind")]


class Erasure(_Model):
    approval_required: bool = Field(default=False, description="four-eyes approval (ApprovalOperator) before erasing")
    retries: int = Field(default=5, ge=0, le=50)
    retry_delay_seconds: int = Field(default=60, ge=1)
    deadline_warning_days: int = Field(default=7, ge=0, le=30)
    targets: list[Target] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_targets(self) -> "Erasure":
        _require_unique([t.name for t in self.targets], "target")
        return self


class OptOutSource(_Model):
    """Where opt-outs are collected: a SQL predicate on the subject row `s` (e.g. a do-not-contact flag)."""

    name: Ident
    predicate: Predicate


class ShareTarget(_Model):
    """A downstream system that accepts the list of hashes (HTTP POST of JSON batches)."""

    name: Ident
    connection_id: Ident
    endpoint: str = Field(min_length=1)
    batch_size: int = Field(default=1000, ge=1, le=100_000)


class OptOut(_Model):
    schedule: str = "@daily"
    sources: list[OptOutSource] = Field(default_factory=list)
    strip_plus_tags: bool = Field(
        default=False, description="treat a+tag@x and a@x as one address (normalisation before hashing)"
    )
    resurrection: Literal["erase", "quarantine"] = Field(
        default="erase", description="what happens to an erased person who comes back through an import"
    )
    share_targets: list[ShareTarget] = Field(default_factory=list)
    export_path: str | None = Field(default=None, description="file written with the hashes only, one per line")

    @model_validator(mode="after")
    def _unique_names(self) -> "OptOut":
        _require_unique([s.name for s in self.sources], "source")
        _require_unique([t.name for t in self.share_targets], "share target")
        return self


# --- Article 30 register of processing activities (register.py renders it) -----------------------
# Every field has a default so that an unfinished register never stops a sweep or an erasure from
# loading the policy; `register.missing_fields` names what is missing and generating the register
# fails until it is complete.

LegalBasis = Literal[
    "consent", "contract", "legal_obligation", "vital_interests", "public_task", "legitimate_interest"
]
TransferMechanism = Literal[
    "adequacy_decision", "standard_contractual_clauses", "binding_corporate_rules", "derogation_art49"
]
Text = Annotated[str, Field(max_length=2000)]


class Controller(_Model):
    name: Text = ""
    represented_by: Text = ""
    address: Text = ""
    contact: Text = ""
    dpo: Text = ""


class DataCategory(_Model):
    category: Text = ""
    items: list[Text] = Field(default_factory=list)


class Recipient(_Model):
    name: Text = ""
    access: Text = ""


class Processor(_Model):
    name: Text = ""
    service: Text = ""
    country: Annotated[str, Field(pattern=r"^([A-Z]{2})?$")] = ""
    targets: list[Ident] = Field(default_factory=list)


class Transfer(_Model):
    recipient: Text = ""
    country: Annotated[str, Field(pattern=r"^([A-Z]{2})?$")] = ""
    mechanism: TransferMechanism | None = None
    safeguards: Text = ""


class RetentionEntry(_Model):
    category: Text = ""
    rule: Ident | None = None
    period: Text = ""
    optout_list: bool = False


class Activity(_Model):
    name: Ident
    title: Text = ""
    purpose: Text = ""
    legal_basis: LegalBasis | None = None
    legal_basis_detail: Text = ""
    data_subjects: list[Text] = Field(default_factory=list)
    data_categories: list[DataCategory] = Field(default_factory=list)
    sources: list[Text] = Field(default_factory=list)
    recipients: list[Recipient] = Field(default_factory=list)
    processors: list[Processor] = Field(default_factory=list)
    transfers: list[Transfer] = Field(default_factory=list)
    retention: list[RetentionEntry] = Field(default_factory=list)
    security_measures: list[Text] = Field(default_factory=list)
    rights: Text = ""


class Register(_Model):
    controller: Controller = Field(default_factory=Controller)
    output_dir: str = "gdpr_register"
    activities: list[Activity] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_activities(self) -> "Register":
        _require_unique([a.name for a in self.activities], "activity")
        return self


class Policy(_Model):
    version: Literal[1]
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)
    batch_size: int = Field(default=10_000, ge=1, le=1_000_000)
    subject: Subject
    tables: list[MappedTable] = Field(min_length=1)
    interactions: Interactions
    holds: list[Hold] = Field(default_factory=list)
    rules: list[Rule] = Field(min_length=1)
    erasure: Erasure = Field(default_factory=Erasure)
    optout: OptOut = Field(default_factory=OptOut)
    processing_register: Register | None = None

    @model_validator(mode="after")
    def _cross_references(self) -> "Policy":
        _require_unique([r.name for r in self.rules], "rule")
        _require_unique([h.name for h in self.holds], "hold")
        tables = [t.table for t in self.tables]
        if len(set(tables)) != len(tables):
            raise ValueError("each table may be mapped once in `tables`")
        if self.subject.table not in tables:
            raise ValueError(f"the subject table {self.subject.table} must also be listed in `tables`")
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

    def rule(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)


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
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see include/policy.yaml for the keys)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            lines.append(f"  - {_format_loc(err['loc'])}: {msg}")
        raise PolicyError("\n".join(lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:  # type: ignore[override]
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (a second value would silently win)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); save the policy as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_policy(data, str(path))


def key_paths(model: type[BaseModel] = Policy, prefix: str = "") -> list[str]:
    """Every key the policy file accepts, as documented in docs/policy.md (``tables[].columns.*.value``).

    docs/policy.md is checked against this list by the tests, so the reference cannot drift."""
    import typing

    def models_in(annotation: object) -> list[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    paths: list[str] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        if path not in paths:
            paths.append(path)
        container = typing.get_origin(info.annotation)
        separator = "[]." if container is list else ".*." if container is dict else "."
        for sub in models_in(info.annotation):
            paths += [p for p in key_paths(sub, path + separator) if p not in paths]
    return paths
