"""The policy keys of access (art. 15) and portability (art. 20) requests: no database needed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from warehouse_gdpr.engine.policy import PolicyError, SqlTarget, load_policy, parse_policy

DEMO = Path(__file__).resolve().parents[2] / "include" / "policy.yaml"


@pytest.fixture(scope="module")
def demo_data() -> dict[str, Any]:
    return yaml.safe_load(DEMO.read_text(encoding="utf-8"))


def _refused(demo_data: dict[str, Any], mutate: Any) -> str:
    data = copy.deepcopy(demo_data)
    mutate(data)
    with pytest.raises(PolicyError) as info:
        parse_policy(data, "policy.yaml")
    return str(info.value)


def test_the_demo_policy_says_what_article_15_asks_for_every_table() -> None:
    policy = load_policy(DEMO)
    for mapped in policy.tables:
        assert mapped.purpose and mapped.legal_basis and mapped.source, mapped.table
    provided = {t.table: sorted(c for c, how in t.columns.items() if how.provided) for t in policy.tables}
    assert provided["crm.contacts"] == ["direct_phone", "email", "first_name", "job_title", "last_name"]
    assert provided["crm.notes"] == []  # a rep's notes are never the person's own data
    assert policy.access.keep_for == "P30D" and policy.access.location == "gdpr_access"
    assert "CNIL" in policy.access.complaint
    assert policy.access.automated_decisions and "art. 22" in policy.access.automated_decisions


def test_an_access_answer_needs_the_policy_to_state_automated_decisions(demo_data: dict[str, Any]) -> None:
    """Art. 15(1)(h): no default wording could be true of every warehouse, so the answer is refused without it."""
    from warehouse_gdpr.engine import access

    assert access.problems(load_policy(DEMO)) == []
    data = copy.deepcopy(demo_data)
    del data["access"]["automated_decisions"]
    with pytest.raises(access.AccessError, match=r"access.automated_decisions missing \(art. 15\(1\)\(h\)"):
        access.check_policy(parse_policy(data, "policy.yaml"))


def test_a_column_is_not_provided_unless_the_policy_says_so(demo_data: dict[str, Any]) -> None:
    data = copy.deepcopy(demo_data)
    data["tables"][0]["columns"]["email"] = {"pseudonymise": "hash"}
    assert parse_policy(data).tables[0].columns["email"].provided is False
    message = _refused(demo_data, lambda d: d["tables"][0]["columns"]["email"].update(provided="yes"))
    assert "tables[0].columns.email.provided" in message


def test_access_keep_for_is_a_duration_and_location_a_clean_string(demo_data: dict[str, Any]) -> None:
    assert "access.keep_for" in _refused(demo_data, lambda d: d["access"].update(keep_for="30 days"))
    assert "access.keep_for" in _refused(demo_data, lambda d: d["access"].update(keep_for="P0D"))
    assert "access.location" in _refused(demo_data, lambda d: d["access"].update(location=" /tmp/x"))
    assert "access.lokation" in _refused(demo_data, lambda d: d["access"].update(lokation="/tmp"))


def test_an_http_access_endpoint_names_the_person(demo_data: dict[str, Any]) -> None:
    message = _refused(demo_data, lambda d: d["erasure"]["targets"][1].update(access_endpoint="/contacts"))
    assert "access_endpoint must contain {identifier}" in message


def test_sql_access_queries_are_parameterised_selects(demo_data: dict[str, Any]) -> None:
    def query(text: str) -> str:
        return _refused(demo_data, lambda d: d["erasure"]["targets"][2].update(access={"tickets": text}))

    assert "%(identifier)s" in query("SELECT * FROM desk.tickets WHERE requester_email = 'x'")
    assert "one SELECT statement" in query("DELETE FROM desk.tickets WHERE requester_email = %(identifier)s")
    assert "one SELECT statement" in query(
        "SELECT 1 WHERE %(identifier)s = ''; DELETE FROM desk.tickets WHERE requester_email = %(identifier)s")
    ok = SqlTarget.model_validate({
        "name": "desk", "kind": "sql", "connection_id": "desk",
        "statements": ["DELETE FROM t WHERE e = %(identifier)s"],
        "access": {"t": "WITH x AS (SELECT 1) SELECT * FROM t WHERE e = %(identifier)s;"}})
    assert list(ok.access) == ["t"]


def test_the_policy_check_warns_about_what_an_access_request_could_not_answer(demo_data: dict[str, Any]) -> None:
    from warehouse_gdpr.engine.catalog import access_warnings

    assert access_warnings(load_policy(DEMO)) == []
    data = copy.deepcopy(demo_data)
    del data["tables"][1]["legal_basis"]
    del data["erasure"]["targets"][1]["access_endpoint"]
    del data["erasure"]["targets"][2]["access"]
    for table in data["tables"]:
        for column in table.get("columns", {}).values():
            column.pop("provided", None)
    warnings = access_warnings(parse_policy(data))
    assert warnings == [
        "tables[1] (crm.activities): legal_basis missing: gdpr_subject_access refuses to run until it is set "
        "(art. 15(1))",
        "erasure.targets[1] (telephony): no access_endpoint (or a preset): an access request lists it as a "
        "recipient without the data it holds",
        "erasure.targets[2] (support_desk): no access queries: an access request lists it as a recipient without "
        "the data it holds",
        "no column of `tables` is marked `provided: true`: a portability request (art. 20) exports nothing",
    ]
