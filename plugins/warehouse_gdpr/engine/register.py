"""The register of processing activities (GDPR article 30), generated from the policy file.

The policy's `processing_register` section carries what only people know (controller, purposes, legal
bases, recipients, transfers, security measures). Retention periods are not retyped: an entry names a
retention `rule` and the register states what the sweep enforces (period, clock, action, and which tables'
originals the archive keeps, for how long, under which legal obligation),
together with the legal holds that suspend it. So the register cannot promise one thing while the
code does another.

`problems(policy)` lists every missing or inconsistent field (empty when the register is complete);
`generate(...)` refuses to write anything while there is one. The output follows the structure of the
reference article's model record ("Modèle de fiche traitement"): one section per processing activity
with controller, purpose, legal basis, data subjects, data processed, sources, recipients, transfers
outside the EU, retention, security measures and exercise of rights. Markdown and HTML are rendered
from the same list of sections, so they always say the same thing.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigurationError
from .policy import (
    DURATION,
    Action,
    Activity,
    Hold,
    KeepColumn,
    LastInteractionClock,
    MappedTable,
    Policy,
    RelatedMaxClock,
    Rule,
)

if TYPE_CHECKING:
    import psycopg

# EU member states and the other EEA countries (ISO 3166-1 alpha-2; Greece is EL in EU usage, GR in ISO).
EEA = frozenset([
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "EL", "HU", "IE", "IT", "LV",
    "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "LI", "NO",
])

LEGAL_BASES = {
    "consent": "Consent (art. 6(1)(a))",
    "contract": "Performance of a contract (art. 6(1)(b))",
    "legal_obligation": "Legal obligation (art. 6(1)(c))",
    "vital_interests": "Vital interests (art. 6(1)(d))",
    "public_task": "Public interest task (art. 6(1)(e))",
    "legitimate_interest": "Legitimate interest (art. 6(1)(f))",
}

MECHANISMS = {
    "adequacy_decision": "Adequacy decision of the European Commission (art. 45)",
    "standard_contractual_clauses": "Standard contractual clauses approved by the European Commission (art. 46(2)(c))",
    "binding_corporate_rules": "Binding corporate rules (art. 47)",
    "derogation_art49": "Derogation for a specific situation (art. 49)",
}

DOC = "docs/policy.md#processing_register"
HEADER_NOTE = ("Retention entries that name a rule are worded from the rules the retention sweep enforces; "
               "other periods are stated by the controller.")


class RegisterIncomplete(ConfigurationError, ValueError):
    """The policy's register section misses required fields; the message lists each, by path."""


@dataclass(frozen=True)
class Rendered:
    """One register, rendered; `sha256` is of the Markdown activities (not the dated header), so it names
    the content: regenerating an unchanged register gives the same digest."""

    markdown: str
    html: str
    sha256: str
    activities: int


@dataclass(frozen=True)
class RegisterFiles:
    markdown: Path
    html: Path
    sha256: str
    activities: int


STORE = """
INSERT INTO gdpr.processing_register (sha256, policy_file, activities, markdown, html)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (sha256) DO NOTHING
"""


def store(conn: psycopg.Connection, rendered: Rendered, source: str) -> bool:
    """Keep this version of the register in gdpr.processing_register, in the caller's transaction.
    Returns False when the same content was stored before (its first row, and date, are kept)."""
    cur = conn.execute(STORE, (rendered.sha256, source, rendered.activities, rendered.markdown, rendered.html))
    return cur.rowcount == 1


# --- completeness -----------------------------------------------------------------------------------


def problems(policy: Policy) -> list[str]:
    """Every missing or inconsistent field of the register, by path; empty when it is complete."""
    reg = policy.processing_register
    if reg is None:
        return [f"processing_register: section missing (see {DOC})"]
    if reg.invalid:
        return list(reg.invalid)
    out: list[str] = []
    need = _needs(out, "processing_register")
    for key in ("name", "represented_by", "contact"):
        need(getattr(reg.controller, key), f"controller.{key}")
    need(reg.activities, "activities", "at least one processing activity is required")

    rule_names = {r.name for r in policy.rules}
    target_names = {t.name for t in policy.erasure.targets} | {t.name for t in policy.optout.share_targets}
    for i, act in enumerate(reg.activities):
        out += _activity_problems(act, f"processing_register.activities[{i}]", rule_names, target_names)

    retained = {e.rule for a in reg.activities for e in a.retention if e.rule}
    for name in sorted(rule_names - retained):
        out.append(f"processing_register: retention rule {name!r} is enforced but no activity's retention names it")
    if policy.optout.sources and not any(e.optout_list for a in reg.activities for e in a.retention):
        out.append(
            "processing_register: the opt-out list is kept forever (optout.sources is set) but no activity's "
            "retention has an entry with optout_list: true"
        )
    quoting = {policy.rule(e.rule).action for a in reg.activities for e in a.retention if e.rule in rule_names}
    for hold in _quoted_holds(policy, quoting):
        if not hold.description.strip():
            i = policy.holds.index(hold)
            out.append(f"holds[{i}].description: required by the register, which quotes it as the reason a "
                       "retention period is suspended")
    listed = {t for a in reg.activities for p in a.processors for t in p.targets}
    for name in sorted(target_names - listed):
        out.append(
            f"processing_register: downstream system {name!r} receives personal data (erasure target or opt-out "
            "share target) but no processor lists it in `targets`"
        )
    return out


def _needs(out: list[str], at: str) -> Callable[..., None]:
    """need(value, path, what="required"): record `at.path: what` in `out` when value is empty."""

    def need(value: object, path: str, what: str = "required") -> None:
        if value in ("", None, []):
            out.append(f"{at}.{path}: {what}")

    return need


def _activity_problems(act: Activity, at: str, rule_names: set[str], target_names: set[str]) -> list[str]:
    """Every missing or inconsistent field of one activity (at `at`): its own fields, then its
    processors, transfers and retention entries."""
    out: list[str] = []
    need = _needs(out, at)
    for key in ("title", "purpose", "legal_basis", "data_subjects", "data_categories", "retention",
                "security_measures", "rights"):
        need(getattr(act, key), key)
    if act.legal_basis == "legitimate_interest":
        need(act.legal_basis_detail, "legal_basis_detail", "required with legitimate_interest: state the interest")
    if not act.recipients and not act.processors:
        out.append(f"{at}.recipients: at least one recipient or processor is required")
    for j, cat in enumerate(act.data_categories):
        need(cat.category, f"data_categories[{j}].category")
        need(cat.items, f"data_categories[{j}].items", "list the data of this category")
    for j, rec in enumerate(act.recipients):
        need(rec.name, f"recipients[{j}].name")
        need(rec.access, f"recipients[{j}].access", "say what this recipient may do with the data")
    return (out + _processor_problems(act, at, target_names) + _transfer_problems(act, at)
            + _retention_problems(act, at, rule_names))


def _processor_problems(act: Activity, at: str, target_names: set[str]) -> list[str]:
    """Each processor named, outside the EU/EEA only with a transfer, and its `targets` known."""
    out: list[str] = []
    need = _needs(out, at)
    transferred = {t.recipient for t in act.transfers}
    for j, proc in enumerate(act.processors):
        for key in ("name", "service", "country"):
            need(getattr(proc, key), f"processors[{j}].{key}")
        if proc.country and proc.country not in EEA and proc.name not in transferred:
            out.append(
                f"{at}.processors[{j}]: {proc.name!r} is in {proc.country}, outside the EU/EEA: list it under "
                "transfers (recipient with the same name) with its mechanism"
            )
        for name in proc.targets:
            if name not in target_names:
                out.append(f"{at}.processors[{j}].targets: {name!r} is not an erasure target or opt-out share target")
    return out


def _transfer_problems(act: Activity, at: str) -> list[str]:
    """Each transfer complete, outside the EU/EEA, to a processor or recipient of the activity (in the
    processor's country), with its safeguards under an art. 49 derogation."""
    out: list[str] = []
    need = _needs(out, at)
    countries = {p.name: p.country for p in act.processors}
    named = set(countries) | {r.name for r in act.recipients}
    for j, tr in enumerate(act.transfers):
        for key in ("recipient", "country", "mechanism"):
            need(getattr(tr, key), f"transfers[{j}].{key}")
        if tr.country in EEA:
            out.append(f"{at}.transfers[{j}].country: {tr.country} is in the EU/EEA; this is not a transfer")
        if tr.recipient and tr.recipient not in named:
            out.append(f"{at}.transfers[{j}].recipient: {tr.recipient!r} is not a processor or recipient of this "
                       "activity")
        elif tr.recipient in countries and tr.country and countries[tr.recipient] != tr.country:
            out.append(f"{at}.transfers[{j}].country: {tr.country}, but processor {tr.recipient!r} is in "
                       f"{countries[tr.recipient]}")
        if tr.mechanism == "derogation_art49":
            need(tr.safeguards, f"transfers[{j}].safeguards", "required with derogation_art49: state the "
                 "derogation of art. 49(1) relied on")
    return out


def _retention_problems(act: Activity, at: str, rule_names: set[str]) -> list[str]:
    """Each retention entry has a category and exactly one of a rule of the policy, a period or the
    opt-out list."""
    out: list[str] = []
    need = _needs(out, at)
    for j, entry in enumerate(act.retention):
        need(entry.category, f"retention[{j}].category")
        given = sum((entry.rule is not None, bool(entry.period), entry.optout_list))
        if given != 1:
            out.append(f"{at}.retention[{j}]: give exactly one of rule, period or optout_list")
        if entry.rule is not None and entry.rule not in rule_names:
            out.append(f"{at}.retention[{j}].rule: {entry.rule!r} is not a rule of this policy")
    return out


def check(policy: Policy) -> None:
    """Raise RegisterIncomplete listing every problem, or return when the register is complete."""
    found = problems(policy)
    if found:
        lines = [f"the register of processing activities is incomplete ({len(found)} problem(s)):"]
        raise RegisterIncomplete("\n".join(lines + [f"  - {p}" for p in found]))


# --- wording derived from the rules -------------------------------------------------------------------


def humanise(duration: str) -> str:
    """P3Y -> '3 years', P1Y6M -> '1 year 6 months', P30D -> '30 days'."""
    match = DURATION.fullmatch(duration)
    if not match:
        return duration
    parts = []
    for number, unit in zip(match.groups(), ("year", "month", "week", "day"), strict=True):
        if number and int(number):
            parts.append(f"{int(number)} {unit}{'s' if int(number) > 1 else ''}")
    return " ".join(parts)


def describe_rule(policy: Policy, rule: Rule) -> str:
    """What the sweep enforces for one rule, in words (period, clock, action, archive)."""
    if isinstance(rule.clock, LastInteractionClock):
        kinds = ", ".join(f"`{k}`" for k in policy.interactions.subject_initiated)
        clock = (f"the person's own last interaction ({kinds}); contact attempts by the company do not "
                 "restart it; ")
        clock += (f"for a person who never interacted, from `{rule.clock.fallback}`" if rule.clock.fallback
                  else "a person who never interacted is not selected by this rule")
    else:
        assert isinstance(rule.clock, RelatedMaxClock)
        clock = (f"the latest `{rule.clock.table}.{rule.clock.column}` among the person's records (an empty one, "
                 "e.g. an open contract, does not count); ")
        clock += (f"for a person without such a record, from `{rule.clock.fallback}`" if rule.clock.fallback
                  else "a person without such a record is not selected by this rule")
    tables = ", ".join(f"`{t.table}`" for t in policy.tables)
    if rule.action == "delete":
        then = f"then deleted from the warehouse, with the person's rows in {tables}"
    else:
        changed = ", ".join(f"`{t.table}`" for t in _pseudonymised_tables(policy))
        then = f"then pseudonymised in the warehouse (personal columns of {changed}); {describe_archive(policy)}"
    values = ", ".join(f"`{v}`" for v in rule.statuses.values)
    return (f"{humanise(rule.retain_for)} after {clock}; {then} "
            f"(records with `{rule.statuses.column}` in: {values}; rule `{rule.name}`)")


def describe_archive(policy: Policy) -> str:
    """What pseudonymisation keeps of the originals, in words: each archived table with its period and the
    legal obligation that requires it, and that the other tables keep no copy."""
    archived = [t for t in policy.tables if t.archive]
    if not archived:
        return "no copy of the originals is kept"
    parts = []
    for mapped in archived:
        assert mapped.archive is not None
        start = (f"each row's `{mapped.archive.from_}` (from the pseudonymisation when it is empty; a row whose "
                 "period has already ended is not kept)" if mapped.archive.from_ else "the pseudonymisation")
        parts.append(f"the originals of `{mapped.table}` are kept encrypted in a restricted archive for "
                     f"{humanise(mapped.archive.for_)} from {start}, as required by {mapped.archive.obligation}, "
                     "then destroyed")
    others = [t.table for t in _pseudonymised_tables(policy) if not t.archive]
    tail = f"; no copy of the originals of {', '.join(f'`{t}`' for t in others)} is kept" if others else ""
    return "; ".join(parts) + tail


def _pseudonymised_tables(policy: Policy) -> list[MappedTable]:
    """The mapped tables pseudonymisation changes: the subject's, and those with a column not kept."""
    return [t for t in policy.tables
            if t.table == policy.subject.table or any(not isinstance(c, KeepColumn) for c in t.columns.values())]


def _holds(policy: Policy, actions: set[Action]) -> list[str]:
    """The legal holds that suspend any of `actions`, in words."""
    return [f"Suspended while legal hold `{h.name}` applies: {h.description} (suspends: {', '.join(h.blocks)})"
            for h in _quoted_holds(policy, actions)]


def _quoted_holds(policy: Policy, actions: set[Action]) -> list[Hold]:
    return [h for h in policy.holds if actions & set(h.blocks)]


# --- rendering ----------------------------------------------------------------------------------------

Item = tuple[str, str | list[str]]  # (label, paragraph or bullet list)


def _sections(policy: Policy) -> list[tuple[str, list[Item]]]:
    reg = policy.processing_register
    assert reg is not None
    ctl = reg.controller
    controller = f"{ctl.name}, represented by {ctl.represented_by}"
    if ctl.address:
        controller += f", {ctl.address}"
    controller += f"; contact: {ctl.contact}"
    if ctl.dpo:
        controller += f"; data protection officer: {ctl.dpo}"
    out = []
    for number, act in enumerate(reg.activities, start=1):
        basis = LEGAL_BASES[act.legal_basis or "consent"]
        if act.legal_basis_detail:
            basis += f": {act.legal_basis_detail}"
        recipients = [f"{r.name}: {r.access}" for r in act.recipients]
        recipients += [f"Processor {p.name} ({p.service}, {p.country})" for p in act.processors]
        transfers = [
            f"{t.recipient} ({t.country}): {MECHANISMS[t.mechanism or 'adequacy_decision']}"
            + (f"; {t.safeguards}" if t.safeguards else "")
            for t in act.transfers
        ] or "None."
        retention = []
        for entry in act.retention:
            if entry.rule:
                retention.append(f"{entry.category}: {describe_rule(policy, policy.rule(entry.rule))}")
            elif entry.optout_list:
                retention.append(f"{entry.category}: the keyed hash (HMAC-SHA256) of the normalised email is kept "
                                 "permanently on the suppression list, so that the objection keeps being honoured "
                                 "(no other data is kept on that list); the rest of the person's record follows the "
                                 "retention of its category")
            else:
                retention.append(f"{entry.category}: {entry.period} (stated by the controller; not enforced by "
                                 "warehouse-gdpr)")
        ruled = [e for e in act.retention if e.rule]
        retention += _holds(policy, {policy.rule(e.rule).action for e in ruled if e.rule})
        if ruled and act.processors:
            retention.append("The retention sweep deletes and pseudonymises in the warehouse only: copies held by "
                             "processors follow their own retention settings (erasure requests are propagated to "
                             "the processors listed with `targets`)")
        fields: list[Item] = [
            ("Controller", controller),
            ("Purpose", act.purpose),
            ("Legal basis", basis),
            ("Data subjects", act.data_subjects),
            ("Data processed", [f"{c.category}: {', '.join(c.items)}" for c in act.data_categories]),
        ]
        if act.sources:
            fields.append(("Sources", act.sources))
        fields += [
            ("Recipients", recipients),
            ("Transfers outside the EU/EEA", transfers),
            ("Retention", retention),
            ("Security measures", act.security_measures),
            ("Exercise of rights", act.rights),
        ]
        out.append((f"Processing activity {number}: {act.title}", fields))
    return out


_MD_SPECIAL = re.compile(r"([\\*_<>#\[\]|&~])")
_MD_SPECIAL_AND_BACKTICK = re.compile(r"([\\`*_<>#\[\]|&~])")


def _md(text: str) -> str:
    """Keep policy text from being read as Markdown structure (emphasis, HTML, links, lists); `code`
    spans stay."""
    text = " ".join(text.split())
    if text.count("`") % 2:  # unpaired backtick: no code spans at all, escape everything
        text = _MD_SPECIAL_AND_BACKTICK.sub(r"\\\1", text)
    else:
        pieces = text.split("`")  # even pieces are outside code spans
        text = "`".join(_MD_SPECIAL.sub(r"\\\1", p) if i % 2 == 0 else p for i, p in enumerate(pieces))
    # A leading list, rule or setext marker would restructure the line it starts ('*', '#', '>' are
    # escaped above).
    text = re.sub(r"^([-+=])", r"\\\1", text)
    return re.sub(r"^(\d+)([.)])", r"\1\\\2", text)


def render_markdown(policy: Policy, generated_on: date, source: str) -> str:
    header = [
        "# Register of processing activities (GDPR article 30)",
        "",
        f"Generated on {generated_on.isoformat()} by warehouse-gdpr from `{source}`. {HEADER_NOTE}",
        "",
    ]
    return "\n".join(header) + "\n" + markdown_body(policy)


def markdown_body(policy: Policy) -> str:
    """The activities, without the dated header: what the register's sha256 is computed over, so that
    regenerating an unchanged register gives the same digest."""
    lines: list[str] = []
    for title, fields in _sections(policy):
        lines += [f"## {_md(title)}", ""]
        for label, value in fields:
            if isinstance(value, str):
                lines.append(f"**{label}:** {_md(value)}")
                lines.append("")
            else:
                lines.append(f"**{label}:**")
                lines.append("")
                lines += [f"- {_md(item)}" for item in value]
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _html_inline(text: str) -> str:
    """Escape, then show `code` spans (the only markup the derived wording uses)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(" ".join(text.split())))


def render_html(policy: Policy, generated_on: date, source: str) -> str:
    title = "Register of processing activities (GDPR article 30)"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title>",
        "<style>body{font-family:sans-serif;max-width:60rem;margin:2rem auto;line-height:1.4}"
        "dt{font-weight:bold;margin-top:.8rem}section{border-top:1px solid #ccc;margin-top:1.5rem}</style>",
        "</head><body>",
        f"<h1>{title}</h1>",
        f"<p>Generated on {generated_on.isoformat()} by warehouse-gdpr from <code>{html.escape(source)}</code>. "
        f"{html.escape(HEADER_NOTE)}</p>",
    ]
    for heading, fields in _sections(policy):
        parts += ["<section>", f"<h2>{html.escape(heading)}</h2>", "<dl>"]
        for label, value in fields:
            parts.append(f"<dt>{label}</dt>")
            if isinstance(value, str):
                parts.append(f"<dd>{_html_inline(value)}</dd>")
            else:
                items = "".join(f"<li>{_html_inline(v)}</li>" for v in value)
                parts.append(f"<dd><ul>{items}</ul></dd>")
        parts += ["</dl>", "</section>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def output_dir(policy: Policy, base: str | Path) -> Path:
    """The policy's `output_dir`; a relative one is taken under `base` ($AIRFLOW_HOME in Airflow)."""
    assert policy.processing_register is not None
    return Path(base) / Path(policy.processing_register.output_dir).expanduser()


def render(policy: Policy, generated_on: date, source: str) -> Rendered:
    """Check completeness (RegisterIncomplete lists every problem), then render Markdown and HTML."""
    check(policy)
    assert policy.processing_register is not None
    return Rendered(
        markdown=render_markdown(policy, generated_on, source),
        html=render_html(policy, generated_on, source),
        sha256=hashlib.sha256(markdown_body(policy).encode("utf-8")).hexdigest(),
        activities=len(policy.processing_register.activities),
    )


def write(rendered: Rendered, out_dir: str | Path) -> RegisterFiles:
    """Write register.md and register.html into out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out / "register.md", out / "register.html"
    md_path.write_text(rendered.markdown, encoding="utf-8")
    html_path.write_text(rendered.html, encoding="utf-8")
    return RegisterFiles(markdown=md_path, html=html_path, sha256=rendered.sha256, activities=rendered.activities)


def generate(policy: Policy, out_dir: str | Path, generated_on: date, source: str) -> RegisterFiles:
    """Check completeness, then write register.md and register.html into out_dir; nothing is written
    while the register is incomplete."""
    return write(render(policy, generated_on, source), out_dir)
