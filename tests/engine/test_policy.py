"""Policy validation (warehouse_gdpr.engine.policy): no database needed.

Every error must name the file, the path inside the document and what was expected. Variants are
built from include/policy.yaml: load it, change one thing, write it to a temporary file, load that.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from warehouse_gdpr.engine.policy import (
    Archive,
    HashColumn,
    LastInteractionClock,
    Policy,
    PolicyError,
    RelatedMaxClock,
    load_policy,
    parse_policy,
)

DEMO = Path(__file__).resolve().parents[2] / "include" / "policy.yaml"


@pytest.fixture(scope="module")
def demo_data() -> dict[str, Any]:
    return yaml.safe_load(DEMO.read_text(encoding="utf-8"))


def _write(tmp_path: Path, data: object, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _refused(tmp_path: Path, demo_data: dict[str, Any], mutate: Callable[[dict[str, Any]], None]) -> tuple[Path, str]:
    """Load a mutated copy of the demo policy; return (file, PolicyError message)."""
    data = copy.deepcopy(demo_data)
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return path, str(info.value)


def _problems(message: str) -> list[str]:
    """The '  - path: what' lines of a PolicyError message."""
    return [line.removeprefix("  - ") for line in message.splitlines()[1:]]


# -- the demo policy ---------------------------------------------------------------------------


def test_demo_policy_loads() -> None:
    policy = load_policy(DEMO)
    assert isinstance(policy, Policy)
    assert policy.version == 1
    assert policy.subject.table == "crm.contacts"
    assert [t.table for t in policy.tables] == [
        "crm.contacts", "crm.activities", "crm.notes", "crm.contracts", "crm.invoices", "crm.support_tickets",
    ]
    assert [r.name for r in policy.rules] == ["prospects_never_converted", "leads_not_converted", "former_clients"]
    assert [h.name for h in policy.holds] == ["active_contract", "invoice_under_10_years", "litigation"]
    assert policy.holds[1].blocks == ["delete"]
    assert isinstance(policy.rules[0].clock, LastInteractionClock)
    assert policy.rules[0].clock.fallback == "created_at"
    assert isinstance(policy.rules[2].clock, RelatedMaxClock)
    assert policy.rules[2].action == "pseudonymise"
    # Only the invoices carry a legal obligation to keep their originals (accounting records).
    assert {t.table: t.archive for t in policy.tables if t.archive} == {"crm.invoices": Archive.model_validate(
        {"for": "P10Y", "from": "issued_on", "obligation": "French Commercial Code L123-22 (accounting records)"})}
    assert policy.hashed_email_columns(policy.subject_mapping) == ["email"]
    assert policy.hashed_email_columns(policy.tables[5]) == ["requester_email"]
    assert isinstance(policy.subject_mapping.columns["email"], HashColumn)
    # Dependents are deleted in reverse order of the file, the subject table last (not listed).
    assert [t.table for t in policy.dependent_tables] == [
        "crm.support_tickets", "crm.invoices", "crm.contracts", "crm.notes", "crm.activities",
    ]


def test_demo_policy_round_trips_through_a_dumped_file(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    """The helper used below does not itself break the policy: an unchanged dump loads to the same Policy."""
    assert load_policy(_write(tmp_path, demo_data)) == load_policy(DEMO)


# -- one problem at a time -------------------------------------------------------------------


def test_missing_required_key(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    path, message = _refused(tmp_path, demo_data, lambda d: d.pop("subject"))
    assert message.startswith(f"{path}: 1 problem(s) in the policy:")
    assert _problems(message) == ["subject: required key is missing"]


def test_missing_nested_key_names_its_path(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    path, message = _refused(tmp_path, demo_data, lambda d: d["tables"][2].pop("subject_column"))
    assert str(path) in message
    assert _problems(message) == ["tables[2].subject_column: required key is missing"]


def test_unknown_key_is_refused(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    def typo(d: dict[str, Any]) -> None:
        d["rules"][1]["retian_for"] = d["rules"][1].pop("retain_for")

    path, message = _refused(tmp_path, demo_data, typo)
    assert str(path) in message
    problems = _problems(message)
    assert "rules[1].retian_for: unknown key (check the spelling; see include/policy.yaml for the keys)" in problems
    assert "rules[1].retain_for: required key is missing" in problems
    assert len(problems) == 2


def test_unknown_top_level_key_is_refused(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    path, message = _refused(tmp_path, demo_data, lambda d: d.update(batch_sise=500))
    assert str(path) in message
    assert _problems(message) == [
        "batch_sise: unknown key (check the spelling; see include/policy.yaml for the keys)"
    ]


def test_bad_duration(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    path, message = _refused(tmp_path, demo_data, lambda d: d["rules"][0].update(retain_for="three years"))
    assert str(path) in message
    assert _problems(message) == [
        "rules[0].retain_for: expected an ISO 8601 duration such as P3Y, P18M or P30D, got 'three years'"
    ]


@pytest.mark.parametrize("value", ["P", "3Y", "P3", "PT3H", "P-3Y", "p3y", "P3Y ", "P3Y2"])
def test_malformed_durations_are_refused(tmp_path: Path, demo_data: dict[str, Any], value: str) -> None:
    _, message = _refused(tmp_path, demo_data, lambda d: d["tables"][4]["archive"].update({"for": value}))
    assert _problems(message) == [
        f"tables[4].archive.for: expected an ISO 8601 duration such as P3Y, P18M or P30D, got {value!r}"
    ]


def test_duration_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    text = DEMO.read_text(encoding="utf-8").replace("    retain_for: P3Y\n    action: delete\n",
                                                    "    retain_for: |\n      P3Y\n    action: delete\n", 1)
    path.write_text(text, encoding="utf-8")
    assert yaml.safe_load(text)["rules"][0]["retain_for"] == "P3Y\n"  # the block scalar keeps its newline
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert _problems(str(info.value)) == [
        "rules[0].retain_for: expected an ISO 8601 duration such as P3Y, P18M or P30D, got 'P3Y\\n'"
    ]


@pytest.mark.parametrize("value", ["P3Y", "P18M", "P30D", "P2W", "P1Y6M", "P1Y2M3W4D"])
def test_well_formed_durations_are_accepted(tmp_path: Path, demo_data: dict[str, Any], value: str) -> None:
    data = copy.deepcopy(demo_data)
    data["rules"][0]["retain_for"] = value
    assert load_policy(_write(tmp_path, data)).rules[0].retain_for == value


def test_a_rule_with_the_former_archive_for_is_refused_with_what_to_write_instead(
    tmp_path: Path, demo_data: dict[str, Any]
) -> None:
    path, message = _refused(tmp_path, demo_data, lambda d: d["rules"][2].update(archive_for="P10Y"))
    assert str(path) in message
    assert _problems(message) == [
        "rules[2]: `archive_for` is no longer a key of a rule: the archive keeps only the tables a legal obligation "
        "requires, for that obligation's period. Delete `archive_for` here and, under `tables`, give each table "
        "whose originals the law requires keeping `archive: {for: P10Y, obligation: \"<the law, e.g. French "
        "Commercial Code L123-22 (accounting records)>\"}` (e.g. the invoices). Archive rows written before keep "
        "their own purge date"
    ]
    # on a delete rule too, and a malformed old value is not echoed back as advice
    _, message = _refused(tmp_path, demo_data, lambda d: d["rules"][0].update(archive_for="ten years"))
    assert _problems(message)[0].startswith("rules[0]: `archive_for` is no longer a key of a rule")
    assert "ten years" not in message and "{for: P10Y," in message


def test_an_archive_needs_its_obligation_and_refuses_unknown_keys(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    _, message = _refused(tmp_path, demo_data, lambda d: d["tables"][4]["archive"].pop("obligation"))
    assert _problems(message) == ["tables[4].archive.obligation: required key is missing"]
    _, message = _refused(tmp_path, demo_data, lambda d: d["tables"][4]["archive"].update(obligation=""))
    assert _problems(message) == ["tables[4].archive.obligation: String should have at least 1 character"]
    _, message = _refused(tmp_path, demo_data, lambda d: d["tables"][4]["archive"].update(for_="P1Y"))
    assert _problems(message) == ["tables[4].archive.for_: unknown key (check the spelling; see include/policy.yaml "
                                  "for the keys)"]


def test_an_archive_on_a_table_pseudonymisation_leaves_unchanged_is_refused(
    tmp_path: Path, demo_data: dict[str, Any]
) -> None:
    """Contracts keep every column (`columns: {}`): nothing is overwritten, so an archive copy is pointless."""
    def archive_contracts(d: dict[str, Any]) -> None:
        d["tables"][3]["archive"] = {"for": "P10Y", "obligation": "Civil Code art. 2224"}

    _, message = _refused(tmp_path, demo_data, archive_contracts)
    assert _problems(message) == [
        "(document root): tables[3] (crm.contracts): `archive` is set but pseudonymisation changes no column of "
        "this table (none in `columns` but `keep`), so its rows stay as they are and nothing would be archived: "
        "remove `archive`"
    ]


def test_duplicate_rule_names(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    path, message = _refused(tmp_path, demo_data, lambda d: d["rules"][1].update(name="prospects_never_converted"))
    assert str(path) in message
    assert _problems(message) == ["(document root): rule names must be unique, repeated: prospects_never_converted"]


def test_duplicate_hold_names(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    _, message = _refused(tmp_path, demo_data, lambda d: d["holds"][2].update(name="active_contract"))
    assert _problems(message) == ["(document root): hold names must be unique, repeated: active_contract"]


def test_table_mapped_twice(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    _, message = _refused(tmp_path, demo_data, lambda d: d["tables"].append(copy.deepcopy(d["tables"][2])))
    assert _problems(message) == ["(document root): each table may be mapped once in `tables`"]


def test_subject_table_must_be_mapped(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    _, message = _refused(tmp_path, demo_data, lambda d: d["tables"].pop(0))
    assert _problems(message) == [
        "(document root): the subject table crm.contacts must also be listed in `tables`"
    ]


QUALIFIED_PATTERN = r"'^[a-z_][a-z0-9_]{0,62}\.[a-z_][a-z0-9_]{0,62}$'"
IDENT_PATTERN = r"'^[a-z_][a-z0-9_]{0,62}$'"


@pytest.mark.parametrize(
    "table",
    [
        "crm.contacts; drop table x",
        "CRM.Contacts",
        'crm."contacts"',
        "crm.contacts--",
        "crm.contacts\n",
        "contacts",
        "crm.contacts.extra",
        "crm." + "a" * 64,
    ],
)
def test_bad_table_identifier_is_refused(tmp_path: Path, demo_data: dict[str, Any], table: str) -> None:
    path, message = _refused(tmp_path, demo_data, lambda d: d["tables"][1].update(table=table))
    assert str(path) in message
    assert _problems(message) == [f"tables[1].table: String should match pattern {QUALIFIED_PATTERN}"]


@pytest.mark.parametrize("column", ['email"', "Email", "e mail", "email;", "1email"])
def test_bad_column_identifier_is_refused(tmp_path: Path, demo_data: dict[str, Any], column: str) -> None:
    path, message = _refused(tmp_path, demo_data, lambda d: d["subject"].update(email_column=column))
    assert str(path) in message
    assert _problems(message) == [f"subject.email_column: String should match pattern {IDENT_PATTERN}"]


def test_bad_column_name_as_mapping_key_is_refused(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    _, message = _refused(
        tmp_path, demo_data, lambda d: d["tables"][2]["columns"].update({'Body"': {"pseudonymise": "keep"}})
    )
    (problem,) = _problems(message)
    assert problem.startswith('tables[2].columns.Body"')
    assert problem.endswith(f"String should match pattern {IDENT_PATTERN}")


def test_unknown_pseudonymise_treatment(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    _, message = _refused(
        tmp_path, demo_data, lambda d: d["tables"][0]["columns"].update(email={"pseudonymise": "encrypt"})
    )
    (problem,) = _problems(message)
    assert problem.startswith("tables[0].columns.email: ")
    assert "'encrypt'" in problem and "'hash', 'null', 'fixed', 'keep'" in problem


def test_fixed_treatment_needs_a_value(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    _, message = _refused(
        tmp_path, demo_data, lambda d: d["tables"][0]["columns"].update(job_title={"pseudonymise": "fixed"})
    )
    assert _problems(message) == ["tables[0].columns.job_title.value: required key is missing"]


def test_related_max_clock_on_an_unmapped_table(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    path, message = _refused(tmp_path, demo_data, lambda d: d["rules"][2]["clock"].update(table="crm.orders"))
    assert str(path) in message
    assert _problems(message) == [
        "(document root): rule former_clients: clock table crm.orders must be listed in `tables` (to know its join)"
    ]


def test_hold_predicate_with_a_semicolon(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    path, message = _refused(
        tmp_path, demo_data,
        lambda d: d["holds"][2].update(predicate="s.litigation_hold; DELETE FROM gdpr.audit_log"),
    )
    assert str(path) in message
    assert _problems(message) == [
        "holds[2].predicate: a predicate is one SQL boolean expression: ';' is not allowed"
    ]


def test_hold_blocks_an_unknown_action(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    _, message = _refused(tmp_path, demo_data, lambda d: d["holds"][0].update(blocks=["archive"]))
    (problem,) = _problems(message)
    assert problem.startswith("holds[0].blocks[0]: ")
    assert "'delete' or 'pseudonymise'" in problem


def test_unsupported_version(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    _, message = _refused(tmp_path, demo_data, lambda d: d.update(version=2))
    assert _problems(message) == ["version: Input should be 1"]


def test_every_problem_is_listed(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    def three(d: dict[str, Any]) -> None:
        d["rules"][0]["retain_for"] = "forever"
        d["tables"][3]["table"] = "crm.Contracts"
        d.pop("interactions")

    path, message = _refused(tmp_path, demo_data, three)
    assert message.startswith(f"{path}: 3 problem(s) in the policy:")
    problems = _problems(message)
    assert len(problems) == 3
    assert "interactions: required key is missing" in problems
    assert any(p.startswith("rules[0].retain_for: expected an ISO 8601 duration") for p in problems)
    assert any(p.startswith("tables[3].table: String should match pattern") for p in problems)


# -- the file itself ---------------------------------------------------------------------------


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\nsubject:\n  table: crm.contacts\n  primary_key: [contact_id\nrules: []\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML at line 5, column 6: ")
    assert "expected ',' or ']'" in message


def test_bad_indentation_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "indent.yaml"
    path.write_text("version: 1\n  batch_size: 10\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: not valid YAML at line 2, column 13: mapping values are not allowed here"


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    text = DEMO.read_text(encoding="utf-8").replace(
        "    retain_for: P3Y\n", "    retain_for: P3Y\n    retain_for: P30Y\n", 1
    )
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(path) in str(info.value)
    assert "retain_for" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: cannot read the policy file (No such file or directory)"


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read the policy file (Is a directory)"


def test_file_not_in_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("version: 1\n# r\xe9tention\n".encode("latin-1"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(path) in str(info.value)
    assert "UTF-8" in str(info.value) or "utf-8" in str(info.value)


@pytest.mark.parametrize(
    ("text", "kind"), [("- version: 1\n", "list"), ("just a string\n", "str"), ("42\n", "int"), ("", "NoneType")]
)
def test_document_root_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "root.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: expected a mapping at the document root, got {kind}"


def test_parse_policy_names_its_source() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy({"version": 1}, source="inline-test")
    message = str(info.value)
    assert message.startswith("inline-test: 4 problem(s) in the policy:")
    assert sorted(_problems(message)) == [
        "interactions: required key is missing",
        "rules: required key is missing",
        "subject: required key is missing",
        "tables: required key is missing",
    ]


# -- strict types, schedules, acknowledged absences (issue 11.3) -----------------------------------


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda d: d.update(batch_size=True), "batch_size: Input should be a valid integer"),
        (lambda d: d.update(batch_size=500.0), "batch_size: Input should be a valid integer"),
        (lambda d: d.update(batch_size="500"), "batch_size: Input should be a valid integer"),
        (lambda d: d.update(version=True), "version: expected the number 1"),
        (lambda d: d.update(blast_radius_percent=True), "blast_radius_percent: Input should be a valid number"),
        (lambda d: d["tables"][3].update(kept_when_held="yes"),
         "tables[3].kept_when_held: Input should be a valid boolean"),
        (lambda d: d["erasure"].update(retries="5"), "erasure.retries: Input should be a valid integer"),
        (lambda d: d["erasure"].update(approval_required=1),
         "erasure.approval_required: Input should be a valid boolean"),
        (lambda d: d["optout"]["share_targets"][0].update(batch_size=False),
         "optout.share_targets[0].batch_size: Input should be a valid integer"),
    ],
    ids=["batch_size_true", "batch_size_float", "batch_size_string", "version_true", "percent_true",
         "kept_when_held_yes", "retries_string", "approval_one", "share_batch_false"],
)
def test_values_of_the_wrong_type_are_refused_not_coerced(
    tmp_path: Path, demo_data: dict[str, Any], mutate: Callable[[dict[str, Any]], None], problem: str
) -> None:
    _, message = _refused(tmp_path, demo_data, mutate)
    assert _problems(message) == [problem]


@pytest.mark.parametrize("value", [0, -5, 100.5])
def test_blast_radius_percent_out_of_range(tmp_path: Path, demo_data: dict[str, Any], value: float) -> None:
    _, message = _refused(tmp_path, demo_data, lambda d: d.update(blast_radius_percent=value))
    assert _problems(message)[0].startswith("blast_radius_percent: Input should be")


def test_blast_radius_percent_defaults_to_ten_and_takes_a_whole_number(
    tmp_path: Path, demo_data: dict[str, Any]
) -> None:
    assert load_policy(DEMO).blast_radius_percent == 10.0
    data = copy.deepcopy(demo_data)
    data["blast_radius_percent"] = 25
    assert load_policy(_write(tmp_path, data)).blast_radius_percent == 25.0


ACCEPTED_SCHEDULES = ["@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly", "@once", "@continuous",
                      "0 3 * * 0", "*/15 * * * *", "0 0 * * sun", "0 6 * * 1-5"]
REFUSED_SCHEDULES = ["every sunday", "weekly", "@fortnightly", "0 0 * * 8", "61 * * * *", "0 3 * *", "H 3 * * *"]


@pytest.mark.parametrize("schedule", ACCEPTED_SCHEDULES)
def test_schedules_airflow_accepts_are_accepted(tmp_path: Path, demo_data: dict[str, Any], schedule: str) -> None:
    data = copy.deepcopy(demo_data)
    data["airflow"]["sweep_schedule"] = schedule
    data["optout"]["schedule"] = schedule
    policy = load_policy(_write(tmp_path, data))
    assert (policy.airflow.sweep_schedule, policy.optout.schedule) == (schedule, schedule)


@pytest.mark.parametrize("schedule", [*REFUSED_SCHEDULES, "0 0 30 2 *"])
def test_schedules_airflow_refuses_are_refused(tmp_path: Path, demo_data: dict[str, Any], schedule: str) -> None:
    """`0 0 30 2 *` (30 February) passes Airflow's parse but never fires: refused too."""
    def mutate(d: dict[str, Any]) -> None:
        d["airflow"]["sweep_schedule"] = schedule
        d["optout"]["schedule"] = schedule

    _, message = _refused(tmp_path, demo_data, mutate)
    problems = _problems(message)
    assert [p.split(":", 1)[0] for p in problems] == ["airflow.sweep_schedule", "optout.schedule"]
    assert all("not a schedule Airflow accepts" in p and "@weekly" in p for p in problems)


def test_schedules_are_judged_as_airflow_judges_them() -> None:
    """The model parses schedules without importing Airflow; Airflow 3.3's own parse agrees on every case."""
    from airflow.sdk.definitions.dag import _create_timetable
    from airflow.sdk.definitions.timetables._cron import CRON_PRESETS as AIRFLOW_PRESETS

    from warehouse_gdpr.engine.policy import CRON_PRESETS, _check_schedule

    assert CRON_PRESETS == AIRFLOW_PRESETS

    def airflow_accepts(schedule: str) -> bool:
        try:
            _create_timetable(schedule, "UTC").validate()  # what DAG processing runs on the DAG's schedule
        except Exception:  # noqa: BLE001 - AirflowTimetableInvalid, ValueError
            return False
        return True

    def model_accepts(schedule: str) -> bool:
        try:
            _check_schedule(schedule)
        except ValueError:
            return False
        return True

    for schedule in ACCEPTED_SCHEDULES + REFUSED_SCHEDULES:
        assert model_accepts(schedule) == airflow_accepts(schedule), schedule


def test_the_policy_model_never_imports_airflow() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from warehouse_gdpr.engine.policy import load_policy; load_policy(sys.argv[1]); "
        "loaded = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')); "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(DEMO.parents[1] / "plugins")}
    done = subprocess.run([sys.executable, "-c", code, str(DEMO)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def test_expect_absent_may_only_name_listed_values(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["interactions"]["expect_absent"] = ["webinar_registered"]
        d["rules"][0]["statuses"]["expect_absent"] = ["prospect", "suspect"]

    _, message = _refused(tmp_path, demo_data, mutate)
    assert _problems(message) == [
        "interactions: expect_absent may only name entries of subject_initiated; not listed there: webinar_registered",
        "rules[0].statuses: expect_absent may only name entries of values; not listed there: suspect",
    ]


def test_the_subject_tables_entry_joins_on_the_subject_key(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    _, message = _refused(tmp_path, demo_data, lambda d: d["tables"][0].update(subject_column="company_id"))
    assert _problems(message) == [
        "(document root): subject.primary_key (contact_id) and the subject_column of crm.contacts in `tables` "
        "(company_id) must name the same column, the subject's key: any other column would treat other people's rows"
    ]
