"""Every row of a person (issue 10, point 1): the sweep, erasure and the opt-out guard find a person's
rows with ONE definition (warehouse_gdpr.matcher: linked to the subject, or carrying its email), and
after each of them nothing of a treated person remains in clear in any column of any schema but the
encrypted archive (tests/helpers.pii_scan reads the catalog, not a list of tables)."""

from __future__ import annotations

from datetime import date

import psycopg
from psycopg import sql

from helpers import (
    AS_OF,
    Person,
    add_activity,
    add_contact,
    add_contract,
    add_invoice,
    capture_persons,
    new_id,
    pii_scan,
    scanned_columns,
    ts,
)
from warehouse_gdpr.engine import erasure, matcher, optout, sweep
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import Keys
from warehouse_gdpr.engine.policy import Policy

CTX = RunContext("test_rows", "run-1", "apply")
TODAY = date(2026, 6, 15)


def _count(conn: psycopg.Connection, query: str, *params: object) -> int:
    value = conn.execute(query, params).fetchone()[0]  # type: ignore[index]
    conn.rollback()
    return int(value)


def _person(conn: psycopg.Connection, status: str, created: date, first: str, last: str, phone: str,
            email: str) -> int:
    """A contact with a rare name whose name and email also sit in free text: a note, an activity, a
    ticket linked to them and one never linked (only the email finds it), its body naming them."""
    cid = add_contact(conn, status, created, email=email)
    conn.execute("UPDATE crm.contacts SET first_name = %s, last_name = %s, direct_phone = %s WHERE contact_id = %s",
                 (first, last, phone, cid))
    conn.execute("INSERT INTO crm.notes (note_id, contact_id, author, body, created_at) VALUES (%s, %s, 'Tom Becker',"
                 " %s, %s)", (new_id(), cid, f"Met {first} {last}, call back on {phone}.", ts(created)))
    conn.execute("INSERT INTO crm.activities (activity_id, contact_id, kind, occurred_at, subject_line)"
                 " VALUES (%s, %s, 'form_submit', %s, %s)",
                 (new_id(), cid, ts(created), f"Demo request from {first} {last}"))
    for linked, typed in ((cid, email), (None, "  " + email.upper() + " ")):  # a copy typed by hand
        conn.execute(
            "INSERT INTO crm.support_tickets (ticket_id, contact_id, requester_email, subject, body, created_at)"
            " VALUES (%s, %s, %s, 'Question about my invoice', %s, %s)",
            (new_id(), linked, typed, f"Hello, {first} here. My number is {phone}.", ts(created)),
        )
    return cid


def _tickets(conn: psycopg.Connection) -> list[tuple[int | None, str]]:
    """(contact id, normalised requester email) of every support ticket."""
    rows = conn.execute("SELECT contact_id, lower(btrim(requester_email)) FROM crm.support_tickets").fetchall()
    conn.rollback()
    return [(r[0], r[1]) for r in rows]


def _sweep(conn: psycopg.Connection, policy: Policy, keys: Keys) -> dict[str, sweep.RuleResult]:
    return {rule.name: sweep.apply_rule(conn, policy, rule, keys, CTX, AS_OF) for rule in policy.rules}


def _treated_by_sweep(conn: psycopg.Connection, before: dict[int, Person]) -> tuple[set[int], set[int]]:
    """(deleted, pseudonymised) contact ids, from what the warehouse holds now."""
    rows = dict(conn.execute("SELECT contact_id, pseudonymised_at IS NOT NULL FROM crm.contacts").fetchall())
    conn.rollback()
    return {cid for cid in before if cid not in rows}, {cid for cid, marked in rows.items() if marked}


# -- the catalog-wide scan -----------------------------------------------------------------------------


def test_after_the_sweep_nothing_of_a_treated_person_remains_anywhere(conn, policy: Policy, keys: Keys) -> None:
    former = _person(conn, "former_client", date(2015, 3, 2), "Ysolde", "Quennevault", "+33 6 41 27 93 05",
                     "ysolde.quennevault@rare-names.example")
    add_contract(conn, former, date(2016, 1, 1), date(2021, 1, 31))
    add_invoice(conn, former, date(2021, 1, 31))
    prospect = _person(conn, "prospect", date(2019, 5, 6), "Barnabé", "Oakenshaw", "+33 7 88 10 42 67",
                       "barnabe.oakenshaw@rare-names.example")
    add_activity(conn, prospect, "web_visit", date(2020, 2, 2))
    conn.commit()
    before = capture_persons(conn)
    tickets = _tickets(conn)

    results = _sweep(conn, policy, keys)

    deleted, pseudonymised = _treated_by_sweep(conn, before)
    assert prospect in deleted and former in pseudonymised
    treated = [before[cid] for cid in sorted(deleted | pseudonymised)]
    # The demo exercises the case: persons of both actions had tickets linked to no contact.
    for group, at_least in ((deleted, 1), (pseudonymised, 10)):
        emails = {before[cid].email.strip().lower() for cid in group}
        assert sum(1 for link, email in tickets if link is None and email in emails) >= at_least
    others = [p for cid, p in before.items() if cid not in deleted | pseudonymised]
    hits, looked_for = pii_scan(conn, treated, not_theirs=others)
    assert hits == []
    # The scan is not vacuous: every treated person's email, their phones, most full names, rare names alone.
    assert looked_for["emails"] == len(treated) > 400
    assert looked_for["phones"] > 300 and looked_for["full_names"] > 100 and looked_for["single_names"] >= 4
    assert len(scanned_columns(conn)) >= 30
    # What the sweep says it did is every ticket of theirs: linked, or carrying their email.
    for group, rules in ((deleted, ("prospects_never_converted", "leads_not_converted")),
                         (pseudonymised, ("former_clients",))):
        emails = {before[cid].email.strip().lower() for cid in group}
        theirs = sum(1 for link, email in tickets if link in group or link is None and email in emails)
        assert sum(results[r].rows_by_table.get("crm.support_tickets", 0) for r in rules) == theirs


def test_after_erasures_nothing_of_the_erased_persons_remains_anywhere(conn, policy: Policy, keys: Keys) -> None:
    by_email = _person(conn, "lead", date(2025, 1, 6), "Ottoline", "Brackwater", "+33 6 55 01 86 23",
                       "ottoline.brackwater@rare-names.example")
    by_id = _person(conn, "prospect", date(2025, 2, 7), "Pelagius", "Vormwald", "+33 6 72 40 19 58",
                    "pelagius.vormwald@rare-names.example")
    conn.commit()
    demo = [r[0] for r in conn.execute(
        "SELECT contact_id FROM crm.contacts c WHERE status IN ('prospect', 'lead') AND NOT litigation_hold"
        " AND contact_id < 9000000 AND NOT EXISTS (SELECT 1 FROM crm.contracts x WHERE x.contact_id = c.contact_id)"
        " ORDER BY contact_id LIMIT 5").fetchall()]
    conn.rollback()
    before = capture_persons(conn)
    requests = [{"email": before[cid].email, "request_id": f"REQ-SCAN-{cid}"} for cid in [by_email, *demo]]
    requests.append({"subject_id": by_id, "request_id": "REQ-SCAN-BY-ID"})

    for params in requests:
        request = erasure.parse_request(params, today=TODAY)
        located = erasure.locate(conn, policy, keys, request)
        assert located.rows["crm.support_tickets"] == (2 if params["request_id"] in
                                                      (f"REQ-SCAN-{by_email}", "REQ-SCAN-BY-ID") else 0)
        result = erasure.erase(conn, policy, keys, CTX, request, located,
                               erasure.holds_in_force(conn, policy, located, AS_OF))
        assert result.outcome == "erased"
        assert erasure.verify(conn, policy, keys, request, result.outcome) == {}

    erased = {by_email, by_id, *demo}
    hits, looked_for = pii_scan(conn, [before[cid] for cid in sorted(erased)],
                                not_theirs=[p for cid, p in before.items() if cid not in erased])
    assert hits == []
    assert looked_for["emails"] == len(erased) and looked_for["single_names"] >= 4


def test_the_scan_finds_what_is_left(conn, policy: Policy) -> None:
    """The scan itself: a leftover email (any case, in json), phone, full name or rare name is reported."""
    cid = _person(conn, "prospect", date(2019, 5, 6), "Quintilla", "Marchbanks", "+33 6 10 20 30 40",
                  "quintilla.marchbanks@rare-names.example")
    conn.commit()
    person = capture_persons(conn)[cid]
    conn.execute("DELETE FROM crm.support_tickets WHERE contact_id = %s OR contact_id IS NULL AND requester_email LIKE"
                 " '%%MARCHBANKS%%'", (cid,))
    conn.execute("DELETE FROM crm.notes WHERE contact_id = %s", (cid,))
    conn.execute("DELETE FROM crm.activities WHERE contact_id = %s", (cid,))
    conn.execute("DELETE FROM crm.contacts WHERE contact_id = %s", (cid,))
    conn.execute("CREATE SCHEMA elsewhere")
    conn.execute("CREATE TABLE elsewhere.leftovers (doc jsonb, blob bytea, line varchar(200))")
    conn.execute("INSERT INTO elsewhere.leftovers VALUES (%s, NULL, NULL), (NULL, %s, NULL), (NULL, NULL, %s),"
                 " (NULL, NULL, %s)",
                 ('{"to": "Quintilla.Marchbanks@Rare-Names.example"}', b"Tel. +33 (6) 10.20.30.40",
                  "Dear QUINTILLA", "Marchbanks, Quintilla"))
    conn.commit()
    hits, _ = pii_scan(conn, [person])
    assert hits == [
        f"elsewhere.leftovers.blob: phone of subject {cid}",
        f"elsewhere.leftovers.doc: email of subject {cid}",
        f"elsewhere.leftovers.doc: full name of subject {cid}",  # the address spells the name
        f"elsewhere.leftovers.doc: name of subject {cid}",
        f"elsewhere.leftovers.line: full name of subject {cid}",
        f"elsewhere.leftovers.line: name of subject {cid}",
    ]
    # A namesake still held in clear is not evidence: their name is not looked for.
    namesake = Person(1, "someone@else.example", "Quintilla", "Marchbanks", None)
    assert pii_scan(conn, [person], not_theirs=[namesake])[0] == [
        f"elsewhere.leftovers.blob: phone of subject {cid}", f"elsewhere.leftovers.doc: email of subject {cid}"]
    # The archive schema is the one place not scanned.
    assert all(schema != "gdpr_archive" for schema, *_ in scanned_columns(conn))


# -- the matcher's rules --------------------------------------------------------------------------------


def test_pseudonymisation_treats_unlinked_rows_with_the_original_email_once(conn, policy: Policy, keys: Keys) -> None:
    cid = _person(conn, "former_client", date(2015, 3, 2), "Ysolde", "Quennevault", "+33 6 41 27 93 05",
                  "ysolde.quennevault@rare-names.example")
    add_contract(conn, cid, date(2016, 1, 1), date(2021, 1, 31))
    conn.commit()
    tickets = [r[0] for r in conn.execute(
        "SELECT ticket_id FROM crm.support_tickets WHERE lower(btrim(requester_email)) = %s"
        " ORDER BY contact_id NULLS LAST",
        ("ysolde.quennevault@rare-names.example",)).fetchall()]
    conn.rollback()

    result = sweep.apply_rule(conn, policy, policy.rule("former_clients"), keys, CTX, AS_OF)

    rows = conn.execute("SELECT ticket_id, contact_id, requester_email, body FROM crm.support_tickets"
                        " WHERE ticket_id = ANY(%s) ORDER BY contact_id NULLS LAST", (tickets,)).fetchall()
    hashed = keys.hash_value("ysolde.quennevault@rare-names.example")
    assert [(r[1], r[3]) for r in rows] == [(cid, None), (None, None)]
    assert rows[0][2] == hashed  # the linked ticket: matched by link and by email, treated once
    assert rows[1][2] is not None and "@" not in rows[1][2]  # hashed from the original, not from the hash
    assert result.rows_by_table["crm.support_tickets"] >= 2
    # An archived copy of a row found by its email is filed under the person it belongs to.
    owners = dict(conn.execute("SELECT source_pk, subject_id FROM gdpr_archive.archived_row"
                               " WHERE source_table = 'crm.support_tickets' AND source_pk = ANY(%s)",
                               ([str(t) for t in tickets],)).fetchall())
    conn.rollback()
    assert set(owners.values()) <= {str(cid)}


def test_an_email_another_subject_still_holds_stays_with_that_subject(conn, policy: Policy, keys: Keys) -> None:
    shared = "dual.record@rare-names.example"
    stale = add_contact(conn, "prospect", date(2018, 1, 1), email=shared)  # expired
    active = add_contact(conn, "client", date(2024, 1, 1), email=shared.upper())  # the same person, a client now
    add_contract(conn, active, date(2024, 1, 1), None)
    ticket = new_id()
    conn.execute("INSERT INTO crm.support_tickets (ticket_id, contact_id, requester_email, subject, body, created_at)"
                 " VALUES (%s, NULL, %s, 'Help', 'Hello', now())", (ticket, shared))
    conn.commit()

    sweep.apply_rule(conn, policy, policy.rule("prospects_never_converted"), keys, CTX, AS_OF)

    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = %s", stale) == 0
    assert _count(conn, "SELECT count(*) FROM crm.support_tickets WHERE ticket_id = %s", ticket) == 1
    # An erasure by email is of every record holding it: the ticket goes with them.
    request = erasure.parse_request({"email": shared, "request_id": "REQ-DUAL-1"}, today=TODAY)
    located = erasure.locate(conn, policy, keys, request)
    assert located.subject_ids == [active] and located.rows["crm.support_tickets"] == 1


def test_an_email_every_holder_of_which_is_treated_goes_with_them(conn, policy: Policy, keys: Keys) -> None:
    shared = "twice.imported@rare-names.example"
    first = add_contact(conn, "prospect", date(2018, 1, 1), email=shared)
    second = add_contact(conn, "lead", date(2018, 2, 1), email=" " + shared.upper())  # both expired
    ticket = new_id()
    conn.execute("INSERT INTO crm.support_tickets (ticket_id, contact_id, requester_email, subject, body, created_at)"
                 " VALUES (%s, NULL, %s, 'Help', 'Hello', now())", (ticket, shared))
    conn.commit()

    prospects = sweep.apply_rule(conn, policy, policy.rule("prospects_never_converted"), keys, CTX, AS_OF)
    # the lead holds it
    assert _count(conn, "SELECT count(*) FROM crm.support_tickets WHERE ticket_id = %s", ticket) == 1
    leads = sweep.apply_rule(conn, policy, policy.rule("leads_not_converted"), keys, CTX, AS_OF)

    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = ANY(%s)", [first, second]) == 0
    assert _count(conn, "SELECT count(*) FROM crm.support_tickets WHERE ticket_id = %s", ticket) == 0
    assert prospects.rows_by_table["crm.support_tickets"] == 0 and leads.rows_by_table["crm.support_tickets"] == 1


def test_a_resurrected_persons_unlinked_rows_are_erased_again(conn, policy: Policy, keys: Keys) -> None:
    email = "phoenix.rowan@rare-names.example"
    first = add_contact(conn, "prospect", date(2024, 1, 1), email=email)
    conn.commit()
    request = erasure.parse_request({"email": email, "request_id": "REQ-PHOENIX-1"}, today=TODAY)
    located = erasure.locate(conn, policy, keys, request)
    assert erasure.erase(conn, policy, keys, CTX, request, located, {}).outcome == "erased"
    assert first not in capture_persons(conn)
    again = add_contact(conn, "lead", date(2026, 6, 10), email=email)  # an import brings the person back ...
    ticket = new_id()
    conn.execute("INSERT INTO crm.support_tickets (ticket_id, contact_id, requester_email, subject, body, created_at)"
                 " VALUES (%s, NULL, %s, 'Help', 'Hello, Rowan here', now())", (ticket, " " + email.title()))
    conn.commit()  # ... with a ticket the import did not link

    result = optout.guard(conn, policy, keys, CTX, AS_OF)

    assert result["erased"] == 1 and result["rows"]["crm.support_tickets"] == 1
    assert _count(conn, "SELECT count(*) FROM crm.contacts WHERE contact_id = %s", again) == 0
    assert _count(conn, "SELECT count(*) FROM crm.support_tickets WHERE ticket_id = %s", ticket) == 0


def test_the_email_side_uses_the_recommended_index(conn, policy: Policy) -> None:
    """EXPLAIN: lower(btrim(col)) in the matcher is the expression of the index docs/policy.md recommends."""
    tickets = next(t for t in policy.tables if t.table == "crm.support_tickets")
    conn.execute("SET enable_seqscan = off")  # a small test table: ask whether the index CAN serve the predicate
    conn.execute("CREATE TEMP TABLE _gdpr_batch AS SELECT contact_id AS subject_id, ARRAY[]::text[] AS holds"
                 " FROM crm.contacts WHERE status = 'former_client' LIMIT 50")
    staged = matcher.stage(conn, policy, sweep.UNHELD)
    person = matcher.for_person(conn, policy, [1], "someone@rare-names.example")
    for persons in (staged, person):
        plan = "\n".join(r[0] for r in conn.execute(
            sql.SQL("EXPLAIN SELECT * FROM crm.support_tickets t WHERE {m}").format(
                m=matcher.rows(policy, tickets, persons, alias="t")), persons.params or None).fetchall())
        assert "support_tickets_email_idx" in plan and "support_tickets_contact_idx" in plan, plan
    conn.rollback()
