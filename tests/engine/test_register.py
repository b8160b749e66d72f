"""The article 30 register: complete for the demo policy, derived from the rules, refused when incomplete."""

from __future__ import annotations

import copy
import re
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml

from warehouse_gdpr.cli import main
from warehouse_gdpr.engine import register
from warehouse_gdpr.engine.policy import Policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]
POLICY_FILE = ROOT / "include" / "policy.yaml"
DEMO: dict[str, Any] = yaml.safe_load(POLICY_FILE.read_text(encoding="utf-8"))
DAY = date(2026, 11, 30)

# The reference article's model record ("Modèle de fiche traitement CRM"), in its order.
MODEL_RECORD = [
    "Controller", "Purpose", "Legal basis", "Data subjects", "Data processed", "Sources", "Recipients",
    "Transfers outside the EU/EEA", "Retention", "Security measures", "Exercise of rights",
]


def policy_with(change: Any = None) -> Policy:
    data = copy.deepcopy(DEMO)
    if change:
        change(data)
    return parse_policy(data, "test-policy.yaml")


def activity(data: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return data["processing_register"]["activities"][i]


def test_the_demo_register_is_complete_and_follows_the_model_record(tmp_path: Path) -> None:
    policy = policy_with()
    assert register.problems(policy) == []
    files = register.generate(policy, tmp_path / "out", DAY, "policy.yaml")
    markdown = files.markdown.read_text(encoding="utf-8")
    assert files.activities == 2 and len(files.sha256) == 64
    sections = re.split(r"^## ", markdown, flags=re.MULTILINE)[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "Processing activity 1: Management of B2B commercial prospecting",
        "Processing activity 2: Management of clients and contracts",
    ]
    labels = re.findall(r"^\*\*([^*]+):\*\*", sections[0], flags=re.MULTILINE)
    assert labels == MODEL_RECORD
    labels = re.findall(r"^\*\*([^*]+):\*\*", sections[1], flags=re.MULTILINE)
    assert labels == [label for label in MODEL_RECORD if label != "Sources"]  # sources are optional
    assert "Legitimate interest (art. 6(1)(f)): commercial development" in sections[0]
    assert "Salesforce (US): Standard contractual clauses" in sections[0]
    assert "(stated by the controller; not enforced by warehouse-gdpr)" in sections[1]  # the invoices' period
    assert "copies held by processors follow their own retention settings" in sections[0]
    assert "Generated on 2026-11-30" in markdown
    page = files.html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<section>") == 2
    assert re.findall(r"<dt>([^<]+)</dt>", page)[: len(MODEL_RECORD)] == MODEL_RECORD


def test_retention_is_what_the_rules_enforce_not_retyped_text(tmp_path: Path) -> None:
    def shorten(data: dict[str, Any]) -> None:
        data["rules"][0]["retain_for"] = "P2Y6M"
        data["tables"][4]["archive"]["for"] = "P5Y"

    markdown = register.render_markdown(policy_with(shorten), DAY, "policy.yaml")
    prospects = next(line for line in markdown.splitlines() if line.startswith("- Prospects never converted"))
    assert prospects.startswith("- Prospects never converted: 2 years 6 months after the person's own last interaction")
    assert "contact attempts by the company do not restart it" in prospects
    assert "then deleted from the warehouse, with the person's rows in `crm.contacts`" in prospects
    assert "rule `prospects_never_converted`" in prospects
    assert "for a person who never interacted, from `created_at`" in prospects
    former = next(line for line in markdown.splitlines() if line.startswith("- Former clients"))
    assert "3 years after the latest `crm.contracts.end_date`" in former
    assert "(an empty one, e.g. an open contract, does not count)" in former
    assert "for a person without such a record, from `created_at`" in former
    assert "restricted archive for 5 years from each row's `issued_on`" in former
    assert "Suspended while legal hold `litigation` applies" in markdown
    assert "the keyed hash (HMAC-SHA256) of the normalised email is kept permanently" in markdown
    assert "the rest of the person's record follows the retention of its category" in markdown


def test_the_register_states_each_archive_period_with_its_legal_obligation() -> None:
    """Only what a legal obligation requires is archived, and the register says which tables, how long and
    why, and that the other tables of a pseudonymised person keep no copy."""
    markdown = register.render_markdown(policy_with(), DAY, "policy.yaml")
    former = next(line for line in markdown.splitlines() if line.startswith("- Former clients"))
    assert ("then pseudonymised in the warehouse (personal columns of `crm.contacts`, `crm.activities`, "
            "`crm.notes`, `crm.invoices`, `crm.support_tickets`); the originals of `crm.invoices` are kept "
            "encrypted in a restricted archive for 10 years from each row's `issued_on`") in former
    assert "as required by French Commercial Code L123-22 (accounting records), then destroyed" in former
    assert ("no copy of the originals of `crm.contacts`, `crm.activities`, `crm.notes`, `crm.support_tickets` "
            "is kept") in former
    assert "French Commercial Code L123-22 (accounting records)" in register.render_html(policy_with(), DAY, "p")

    def two_obligations(data: dict[str, Any]) -> None:
        data["tables"][4]["archive"] = {"for": "P6Y", "obligation": "Tax code (LPF L102 B)"}  # no `from`
        data["tables"][2]["archive"] = {"for": "P18M", "obligation": "Employment law"}

    markdown = register.render_markdown(policy_with(two_obligations), DAY, "policy.yaml")
    former = next(line for line in markdown.splitlines() if line.startswith("- Former clients"))
    assert ("the originals of `crm.notes` are kept encrypted in a restricted archive for 18 months from the "
            "pseudonymisation, as required by Employment law, then destroyed; the originals of `crm.invoices` are "
            "kept encrypted in a restricted archive for 6 years from the pseudonymisation, as required by Tax code "
            "(LPF L102 B), then destroyed; no copy of the originals of `crm.contacts`, `crm.activities`, "
            "`crm.support_tickets` is kept") in former

    def no_obligation(data: dict[str, Any]) -> None:
        data["tables"][4].pop("archive")

    markdown = register.render_markdown(policy_with(no_obligation), DAY, "policy.yaml")
    former = next(line for line in markdown.splitlines() if line.startswith("- Former clients"))
    assert "no copy of the originals is kept" in former and "restricted archive" not in former


def test_a_clock_without_fallback_says_who_is_never_selected() -> None:
    def no_fallback(data: dict[str, Any]) -> None:
        data["rules"][1]["clock"].pop("fallback")
        data["rules"][2]["clock"].pop("fallback")

    markdown = register.render_markdown(policy_with(no_fallback), DAY, "policy.yaml")
    leads = next(line for line in markdown.splitlines() if line.startswith("- Qualified leads not converted"))
    assert "a person who never interacted is not selected by this rule" in leads
    former = next(line for line in markdown.splitlines() if line.startswith("- Former clients"))
    assert "a person without such a record is not selected by this rule" in former


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("processing_register"), "processing_register: section missing"),
        (lambda d: d["processing_register"]["controller"].update(name=""),
         "processing_register.controller.name: required"),
        (lambda d: activity(d).pop("purpose"), "processing_register.activities[0].purpose: required"),
        (lambda d: activity(d, 1).update(security_measures=[]), "activities[1].security_measures: required"),
        (lambda d: activity(d).pop("legal_basis_detail"), "legal_basis_detail: required with legitimate_interest"),
        (lambda d: activity(d)["data_categories"][1].update(items=[]), "activities[0].data_categories[1].items"),
        (lambda d: activity(d)["transfers"].clear(),
         "'Salesforce' is in US, outside the EU/EEA: list it under transfers"),
        (lambda d: activity(d)["transfers"][0].pop("mechanism"), "activities[0].transfers[0].mechanism: required"),
        (lambda d: activity(d)["transfers"][0].update(country="FR"), "FR is in the EU/EEA; this is not a transfer"),
        (lambda d: activity(d)["retention"].pop(0), "retention rule 'prospects_never_converted' is enforced but no"),
        (lambda d: activity(d)["retention"].pop(2), "no activity's retention has an entry with optout_list: true"),
        (lambda d: activity(d)["retention"][0].update(rule="prospect_typo"),
         "'prospect_typo' is not a rule of this policy"),
        (lambda d: activity(d)["retention"][0].update(period="3 years"),
         "give exactly one of rule, period or optout_list"),
        (lambda d: activity(d)["processors"][2].update(targets=[]),
         "downstream system 'telephony' receives personal data"),
        (lambda d: activity(d)["processors"][2].update(targets=["telephony", "fax"]), "'fax' is not an erasure target"),
        (lambda d: activity(d, 1).update(recipients=[], processors=[]), "activities[1].recipients: at least one"),
        (lambda d: activity(d)["transfers"][0].update(recipient="Salesforse"), "'Salesforse' is not a processor or"),
        (lambda d: activity(d)["transfers"][0].update(country="CN"),
         "transfers[0].country: CN, but processor 'Salesforce' is in US"),
        (lambda d: activity(d)["transfers"][0].update(mechanism="derogation_art49", safeguards=""),
         "transfers[0].safeguards: required with derogation_art49"),
        (lambda d: d["holds"][2].update(description=""), "holds[2].description: required by the register"),
        (lambda d: activity(d)["processors"][0].update(country="us"), "processors[0].country: String should match"),
        (lambda d: activity(d)["transfers"][0].update(mechanism="scc"), "transfers[0].mechanism: Input should be"),
        (lambda d: d["processing_register"].update(colour="blue"), "processing_register.colour: unknown key"),
        (lambda d: d.update(processing_register="to do"), "processing_register: Input should be a valid dictionary"),
    ],
)
def test_an_incomplete_register_is_refused_and_nothing_is_written(change: Any, expected: str, tmp_path: Path) -> None:
    policy = policy_with(change)
    with pytest.raises(register.RegisterIncomplete) as exc:
        register.generate(policy, tmp_path / "out", DAY, "policy.yaml")
    assert expected in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_every_problem_is_listed_at_once() -> None:
    def break_two(data: dict[str, Any]) -> None:
        data["processing_register"]["controller"]["contact"] = ""
        activity(data)["rights"] = ""

    found = register.problems(policy_with(break_two))
    assert found == [
        "processing_register.controller.contact: required",
        "processing_register.activities[0].rights: required",
    ]


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["processing_register"].update(activities=[{"name": "draft"}]),
        lambda d: activity(d)["transfers"][0].update(mechanism="scc"),  # malformed, not only missing
        lambda d: activity(d).pop("name"),
        lambda d: d["processing_register"].update(activities="later"),
    ],
)
def test_an_unfinished_or_malformed_register_never_stops_the_policy_from_loading(change: Any) -> None:
    """Sweeps and erasures must not wait for the DPO: only the register itself is refused."""
    policy = policy_with(change)
    assert policy.rules and register.problems(policy)


def test_policy_text_cannot_inject_markup(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script> **bold** [link](http://x) `code"
    policy = policy_with(lambda d: activity(d).update(purpose=evil))
    files = register.generate(policy, tmp_path, DAY, "policy.yaml")
    page = files.html.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;" in page
    markdown = files.markdown.read_text(encoding="utf-8")
    assert r"\<script\>" in markdown and r"\*\*bold\*\*" in markdown and r"\[link\]" in markdown
    assert r"\`code" in markdown


@pytest.mark.parametrize(
    ("text", "escaped"),
    [("---", r"\---"), ("- x", r"\- x"), ("1. x", r"1\. x"), ("+ y", r"\+ y"), ("# h", r"\# h"),
     ("a &copy; ~~s~~", r"a \&copy; \~\~s\~\~"), ("keep `a_b` c_d", r"keep `a_b` c\_d")],
)
def test_markdown_structure_in_policy_text_is_escaped(text: str, escaped: str) -> None:
    policy = policy_with(lambda d: activity(d)["security_measures"].append(text))
    markdown = register.render_markdown(policy, DAY, "policy.yaml")
    assert f"\n- {escaped}\n" in markdown


def test_humanise_durations() -> None:
    assert register.humanise("P3Y") == "3 years"
    assert register.humanise("P1Y1M") == "1 year 1 month"
    assert register.humanise("P2W3D") == "2 weeks 3 days"


def test_cli_writes_both_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["register", str(POLICY_FILE), "--out", str(tmp_path), "--date", "2026-11-30"]) == 0
    out = capsys.readouterr().out
    assert "2 activities" in out and "sha256" in out
    assert (tmp_path / "register.md").is_file() and (tmp_path / "register.html").is_file()


def test_cli_fails_on_an_incomplete_register(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy.deepcopy(DEMO)
    activity(data).pop("purpose")
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    assert main(["register", str(path), "--out", str(tmp_path / "out")]) == 1
    assert "activities[0].purpose: required" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # `policy check` still accepts the file (the sweep may run) and warns about the register.
    assert main(["policy", "check", str(path)]) == 0
    assert "warning: register: processing_register.activities[0].purpose: required" in capsys.readouterr().out


def test_the_digest_names_the_content_not_the_day(tmp_path: Path) -> None:
    policy = policy_with()
    monday = register.generate(policy, tmp_path / "a", date(2026, 11, 30), "policy.yaml")
    next_monday = register.generate(policy, tmp_path / "b", date(2026, 12, 7), "policy.yaml")
    assert monday.sha256 == next_monday.sha256
    assert monday.markdown.read_text() != next_monday.markdown.read_text()
    changed = register.generate(policy_with(lambda d: activity(d).update(purpose="Something else")),
                                tmp_path / "c", date(2026, 11, 30), "policy.yaml")
    assert changed.sha256 != monday.sha256


def test_every_version_is_kept_once_in_the_warehouse(warehouse: str, tmp_path: Path) -> None:
    import psycopg

    policy = policy_with()
    first = register.render(policy, date(2026, 11, 30), "policy.yaml")
    again = register.render(policy, date(2026, 12, 7), "policy.yaml")
    changed = register.render(policy_with(lambda d: activity(d).update(purpose="Something else")),
                              date(2026, 12, 14), "policy.yaml")
    with psycopg.connect(warehouse) as conn:
        assert register.store(conn, first, "policy.yaml") is True
        assert register.store(conn, again, "policy.yaml") is False
        assert register.store(conn, changed, "policy.yaml") is True
        conn.commit()
        rows = conn.execute(
            "SELECT sha256, activities, markdown LIKE '%Generated on 2026-11-30%' FROM gdpr.processing_register"
            " ORDER BY generated_at, sha256"
        ).fetchall()
    assert {r[0] for r in rows} == {first.sha256, changed.sha256}
    assert [r for r in rows if r[0] == first.sha256][0][1:] == (2, True)  # the first text is kept


def test_cli_says_when_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["register", str(POLICY_FILE), "--out", str(blocker / "out")]) == 1
    assert "cannot write the register under" in capsys.readouterr().err
