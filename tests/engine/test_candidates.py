"""Clock semantics and each rule at its boundary (3 years ± 1 day), on a real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from helpers import (
    AS_OF_DATE,
    THREE_YEARS_BEFORE,
    add_activity,
    add_contact,
    add_contract,
    add_invoice,
    candidates,
)
from warehouse_gdpr.engine.policy import Policy

DAY = timedelta(days=1)
OLD = THREE_YEARS_BEFORE - timedelta(days=400)


def test_prospect_clock_boundary_on_own_interaction(conn, policy: Policy) -> None:
    older = add_contact(conn, "prospect", OLD)
    add_activity(conn, older, "link_click", THREE_YEARS_BEFORE - DAY)
    exact = add_contact(conn, "prospect", OLD)
    add_activity(conn, exact, "link_click", THREE_YEARS_BEFORE)
    newer = add_contact(conn, "prospect", OLD)
    add_activity(conn, newer, "link_click", THREE_YEARS_BEFORE + DAY)
    conn.commit()

    found = candidates(conn, policy, "prospects_never_converted")
    assert older in found
    assert exact not in found, "a clock exactly 3 years old has not expired yet (strictly older only)"
    assert newer not in found


def test_rep_activity_does_not_restart_the_clock(conn, policy: Policy) -> None:
    cold_called = add_contact(conn, "prospect", OLD)
    add_activity(conn, cold_called, "email_open", THREE_YEARS_BEFORE - 300 * DAY)
    for years_ago in (2, 1, 0):  # a rep logging an unanswered call every year or two
        add_activity(conn, cold_called, "call_attempt", AS_OF_DATE - timedelta(days=365 * years_ago + 10))
    add_activity(conn, cold_called, "email_sent", AS_OF_DATE - 5 * DAY)
    add_activity(conn, cold_called, "note_added", AS_OF_DATE - 3 * DAY)
    answered = add_contact(conn, "prospect", OLD)
    add_activity(conn, answered, "email_reply", AS_OF_DATE - 30 * DAY)
    conn.commit()

    found = candidates(conn, policy, "prospects_never_converted")
    assert cold_called in found
    assert answered not in found


def test_no_interaction_falls_back_to_creation(conn, policy: Policy) -> None:
    created_before = add_contact(conn, "prospect", THREE_YEARS_BEFORE - DAY)
    created_on = add_contact(conn, "prospect", THREE_YEARS_BEFORE)
    created_after = add_contact(conn, "prospect", THREE_YEARS_BEFORE + DAY)
    conn.commit()
    found = candidates(conn, policy, "prospects_never_converted")
    assert created_before in found
    assert created_on not in found
    assert created_after not in found


def test_own_interaction_counts_even_if_created_long_ago(conn, policy: Policy) -> None:
    cid = add_contact(conn, "lead", OLD - timedelta(days=2000))
    add_activity(conn, cid, "form_submit", AS_OF_DATE - 100 * DAY)
    conn.commit()
    assert cid not in candidates(conn, policy, "leads_not_converted")


def test_lead_boundary(conn, policy: Policy) -> None:
    older = add_contact(conn, "lead", OLD)
    add_activity(conn, older, "web_visit", THREE_YEARS_BEFORE - DAY)
    newer = add_contact(conn, "lead", OLD)
    add_activity(conn, newer, "web_visit", THREE_YEARS_BEFORE + DAY)
    conn.commit()
    found = candidates(conn, policy, "leads_not_converted")
    assert older in found and newer not in found
    # statuses keep rules apart: a lead is never a prospect-rule candidate
    assert older not in candidates(conn, policy, "prospects_never_converted")


def test_former_client_boundary_uses_latest_contract_end(conn, policy: Policy) -> None:
    ended_before = add_contact(conn, "former_client", OLD)
    add_contract(conn, ended_before, OLD, THREE_YEARS_BEFORE - 600 * DAY)
    add_contract(conn, ended_before, OLD, THREE_YEARS_BEFORE - DAY)
    ended_on = add_contact(conn, "former_client", OLD)
    add_contract(conn, ended_on, OLD, THREE_YEARS_BEFORE)
    second_contract_recent = add_contact(conn, "former_client", OLD)
    add_contract(conn, second_contract_recent, OLD, THREE_YEARS_BEFORE - 600 * DAY)
    add_contract(conn, second_contract_recent, OLD, THREE_YEARS_BEFORE + DAY)
    conn.commit()
    found = candidates(conn, policy, "former_clients")
    assert ended_before in found
    assert ended_on not in found
    assert second_contract_recent not in found


def test_clients_are_never_candidates(conn, policy: Policy) -> None:
    client = add_contact(conn, "client", OLD)
    add_contract(conn, client, OLD, None)
    conn.commit()
    for rule in policy.rules:
        assert client not in candidates(conn, policy, rule.name)


def test_holds_are_reported_per_action(conn, policy: Policy) -> None:
    litigated = add_contact(conn, "prospect", OLD, litigation=True)
    invoiced_prospect = add_contact(conn, "prospect", OLD)
    add_invoice(conn, invoiced_prospect, AS_OF_DATE - timedelta(days=365 * 5))
    old_invoice = add_contact(conn, "prospect", OLD)
    add_invoice(conn, old_invoice, AS_OF_DATE - timedelta(days=365 * 10 + 10))
    former = add_contact(conn, "former_client", OLD)
    add_contract(conn, former, OLD, THREE_YEARS_BEFORE - 30 * DAY)
    add_invoice(conn, former, THREE_YEARS_BEFORE - 30 * DAY)
    conn.commit()

    prospects = candidates(conn, policy, "prospects_never_converted")
    assert prospects[litigated] == ["litigation"]
    assert prospects[invoiced_prospect] == ["invoice_under_10_years"]
    assert prospects[old_invoice] == []
    # the invoice hold blocks deletion only: a former client is still pseudonymised (archive kept 10 years)
    assert candidates(conn, policy, "former_clients")[former] == []


def test_which_kinds_count_is_policy_not_code(conn, policy: Policy) -> None:
    cid = add_contact(conn, "prospect", OLD)
    add_activity(conn, cid, "email_open", AS_OF_DATE - 10 * DAY)
    conn.commit()
    assert cid not in candidates(conn, policy, "prospects_never_converted")

    kinds = [k for k in policy.interactions.subject_initiated if k != "email_open"]
    stricter = policy.model_copy(
        update={"interactions": policy.interactions.model_copy(update={"subject_initiated": kinds})}
    )
    assert cid in candidates(conn, stricter, "prospects_never_converted")


# -- clocks without a date (issue 10, point 4) ---------------------------------------------------------


def test_a_former_client_without_a_contract_row_falls_back_to_creation(conn, policy: Policy) -> None:
    created_before = add_contact(conn, "former_client", THREE_YEARS_BEFORE - DAY)
    created_on = add_contact(conn, "former_client", THREE_YEARS_BEFORE)
    created_after = add_contact(conn, "former_client", THREE_YEARS_BEFORE + DAY)
    conn.commit()
    found = candidates(conn, policy, "former_clients")
    assert found.get(created_before) == [], "no contract row: the clock is created_at, and nothing holds the person"
    assert created_on not in found and created_after not in found


def test_an_open_contract_is_no_end_date_and_its_hold_keeps_the_person(conn, policy: Policy) -> None:
    only_open = add_contact(conn, "former_client", OLD)  # NULL end_date only: the clock falls back to created_at
    add_contract(conn, only_open, OLD, None)
    ended_and_open = add_contact(conn, "former_client", OLD)  # the NULL end is ignored: the old end is the clock
    add_contract(conn, ended_and_open, OLD, THREE_YEARS_BEFORE - 100 * DAY)
    add_contract(conn, ended_and_open, OLD, None)
    conn.commit()
    found = candidates(conn, policy, "former_clients")
    # Selected by the clock, then kept and counted as held: an open contract is an active one.
    assert found[only_open] == ["active_contract"]
    assert found[ended_and_open] == ["active_contract"]


def test_without_a_fallback_a_person_without_a_date_is_never_selected(conn, policy: Policy) -> None:
    no_contract = add_contact(conn, "former_client", OLD)
    only_open = add_contact(conn, "former_client", OLD)
    add_contract(conn, only_open, OLD, None)
    conn.commit()
    rule = policy.rule("former_clients")
    bare = rule.model_copy(update={"clock": rule.clock.model_copy(update={"fallback": None})})
    strict = policy.model_copy(update={"rules": [bare if r.name == rule.name else r for r in policy.rules]})
    found = candidates(conn, strict, "former_clients")
    assert no_contract not in found and only_open not in found
