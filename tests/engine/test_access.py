"""Access (art. 15) and portability (art. 20) at engine level (warehouse_gdpr.engine.access), on a real
PostgreSQL and the demo's real downstream services on 127.0.0.1.

What the unpacked package holds is compared with what the database and the services hold, counted here
independently with plain SQL and the services' own stores.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from pypdf import PdfReader

from helpers import AS_OF, add_activity, add_contact, add_contract, add_invoice, new_id
from scripted_http import ScriptedServer, json_answer, redirect
from warehouse_gdpr.airflow.storage import ObjectStoragePackages
from warehouse_gdpr.airflow.transport import AirflowTransport
from warehouse_gdpr.engine import access, propagation, sweep
from warehouse_gdpr.engine.audit import RunContext
from warehouse_gdpr.engine.crypto import KeyConfigError, Keys, archive_aad, generate_extra
from warehouse_gdpr.engine.erasure import RequestError
from warehouse_gdpr.engine.policy import Policy, load_policy

ROOT = Path(__file__).resolve().parents[2]
TODAY = date(2026, 6, 15)
CTX = RunContext("gdpr_subject_access", "run-1", "answer")
TRANSPORT = AirflowTransport()
CRM = {"crm.contacts": "contact_id", "crm.activities": "activity_id", "crm.notes": "note_id",
       "crm.contracts": "contract_id", "crm.invoices": "invoice_id", "crm.support_tickets": "ticket_id"}


@pytest.fixture
def packages(tmp_path: Path) -> ObjectStoragePackages:
    return ObjectStoragePackages("packages", tmp_path)


def _answer(conn: psycopg.Connection, policy: Policy, keys: Keys, params: dict[str, Any],
            packages: ObjectStoragePackages, preflights: set[str] | None = None) -> access.Answered:
    request = access.parse_request(params, today=TODAY)
    return access.answer(conn, policy, keys, CTX, request, TRANSPORT, packages, preflights or set())


def _preflight(conn: psycopg.Connection, policy: Policy) -> set[str]:
    for target in access.http_targets_to_preflight(policy):
        propagation.preflight(conn, policy, CTX, target, TRANSPORT)
    return set(access.http_targets_to_preflight(policy))


def _ticket(conn: psycopg.Connection, contact_id: int | None, email: str) -> int:
    tid = new_id()
    conn.execute(
        "INSERT INTO crm.support_tickets (ticket_id, contact_id, requester_email, subject, body, created_at)"
        " VALUES (%s, %s, %s, 'Question about my invoice', 'Hello, could you resend it?', now())",
        (tid, contact_id, email))
    return tid


def _client(conn: psycopg.Connection) -> tuple[int, str]:
    """A client with a row in every mapped table, and a support ticket found by email only."""
    cid = add_contact(conn, "client", date(2024, 1, 10))
    email = str(conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0])  # type: ignore[index]
    add_activity(conn, cid, "email_open", date(2026, 1, 1))
    add_activity(conn, cid, "call_attempt", date(2026, 2, 1))
    add_contract(conn, cid, date(2024, 2, 1), None)
    add_invoice(conn, cid, date(2025, 3, 1))
    conn.execute("INSERT INTO crm.notes (note_id, contact_id, author, body, created_at) VALUES"
                 " (%s, %s, 'Claire Martin', 'Wants a demo of the API', now())", (new_id(), cid))
    _ticket(conn, cid, email)
    _ticket(conn, None, f"  {email.upper()} ")  # sent before the account existed: found by email only
    _ticket(conn, None, "someone.else@example.com")
    conn.commit()
    return cid, email


def _expected(conn: psycopg.Connection, ids: list[int], email: str | None) -> dict[str, set[int]]:
    """The person's primary keys per mapped table, counted independently with plain SQL."""
    out = {}
    for table, pk in CRM.items():
        link = "contact_id" if table != "crm.contacts" else "contact_id"
        query = f"SELECT {pk} FROM {table} WHERE {link} = ANY(%s)"  # fixed names only
        params: list[Any] = [ids]
        if table == "crm.support_tickets" and email:
            query += " OR lower(btrim(requester_email)) = %s"
            params.append(email.lower())
        out[table] = {r[0] for r in conn.execute(query, params).fetchall()}
    conn.rollback()
    return out


def _held(document: dict[str, Any]) -> dict[str, set[int]]:
    return {t["table"]: {r[CRM[t["table"]]] for r in t["rows"]} for t in document["warehouse"]}


def test_the_package_holds_exactly_what_the_warehouse_and_the_downstream_systems_hold(
    conn, policy: Policy, keys: Keys, downstream, packages
) -> None:
    cid, email = _client(conn)
    downstream.add_person(email)
    downstream.add_person("someone.else@example.com")
    preflights = _preflight(conn, policy)

    answered = _answer(conn, policy, keys, {"email": f" {email.upper()}", "request_id": "ACC-1"}, packages, preflights)

    header, files = access.open_package(packages, keys, "ACC-1")
    assert header["request_id"] == "ACC-1" and header["kind"] == "access" and header["key_id"] == keys.archive_key_id
    assert sorted(files) == sorted(["report.pdf", "data.json", "manifest.json", *(
        f"csv/{t}.csv" for t in CRM), "csv/downstream.emailing.csv", "csv/downstream.telephony.csv",
        "csv/downstream.support_desk.tickets.csv", "csv/downstream.support_desk.ticket_messages.csv"])
    document = json.loads(files["data.json"])
    expected = _expected(conn, [cid], email)
    assert _held(document) == expected
    assert len(expected["crm.support_tickets"]) == 2 and all(expected.values())
    contact = document["warehouse"][0]["rows"][0]
    assert contact["email"] == email and contact["first_name"] == "Zoé"
    # downstream: what each service holds on the person, and nothing on anyone else
    answers = {a["target"]: a for a in document["downstream"]}
    assert answers["emailing"]["status"] == "holds data"
    assert answers["emailing"]["answer"]["email"] == email.lower()
    assert answers["emailing"]["answer"]["attributes"] == {"FIRSTNAME": "Zoé"}
    assert answers["telephony"]["answer"]["phone"] == "+33 6 00 00 00 00"
    desk = {s["name"]: s["rows"] for s in answers["support_desk"]["sections"]}
    with psycopg.connect(downstream.desk_url) as desk_conn:
        tickets = {r[0] for r in desk_conn.execute(
            "SELECT ticket_id FROM desk.tickets WHERE lower(requester_email) = lower(%s)", (email,)).fetchall()}
        messages = {r[0] for r in desk_conn.execute(
            "SELECT m.message_id FROM desk.ticket_messages m JOIN desk.tickets t USING (ticket_id)"
            " WHERE lower(t.requester_email) = lower(%s)", (email,)).fetchall()}
    assert {r["ticket_id"] for r in desk["tickets"]} == tickets and len(tickets) == 1
    assert {r["message_id"] for r in desk["ticket_messages"]} == messages and len(messages) == 1
    # what article 15(1) asks, from the policy
    contacts = document["warehouse"][0]
    assert contacts["title"] == "Your contact record" and contacts["purpose"] and contacts["source"]
    assert contacts["legal_basis"].startswith("Our legitimate interest")
    assert document["warehouse"][1]["retention"][0].startswith("No retention period runs for your record as it "
                                                                "is now (status client)")
    assert document["warehouse"][4]["retention"][1:] == [
        "Invoices are kept 10 years after issue (French Commercial Code, art. L123-22)",
        "When your record is pseudonymised, the originals of this table are kept encrypted for 10 years after its "
        "issued on date as required by French Commercial Code L123-22 (accounting records), then destroyed"]
    assert "CNIL" in document["about"]["complaint"]
    assert document["about"]["automated_decisions"].startswith("No decision based solely on automated processing")
    assert {r["name"] for r in document["about"]["recipients"]} >= {"Brevo, emailing, opt-out blocklist (FR)",
                                                                  "Aircall, telephony (FR)"}
    # the manifest: each file's SHA-256 and the row counts; the CSV files have named columns
    manifest = json.loads(files["manifest.json"])
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    assert manifest["rows"] == answered.rows == {**{t: len(v) for t, v in expected.items()},
                                                 "downstream:emailing": 1, "downstream:telephony": 1,
                                                 "downstream:support_desk": 2}
    contacts_csv = list(csv.DictReader(io.StringIO(files["csv/crm.contacts.csv"].decode())))
    assert contacts_csv[0]["do_not_contact"] == "false" and contacts_csv[0]["pseudonymised_at"] == ""
    tickets_csv = list(csv.DictReader(io.StringIO(files["csv/crm.support_tickets.csv"].decode())))
    assert {int(r["ticket_id"]) for r in tickets_csv} == expected["crm.support_tickets"]
    # the PDF is readable: the request, a section per table with labelled columns
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(files["report.pdf"])).pages)
    for needle in ("ACC-1", "Your contact record", "Your support requests", "First name", "Zoé", "Purpose",
                   "Legal basis", "Retention", "Aircall", "CNIL", "Who receives your data",
                   "Automated decisions and profiling", "art. 22"):
        assert needle in text, needle
    # the XCom-sized result and the audit row carry no personal data
    result = json.dumps(answered.as_dict())
    assert "@" not in result and "Zoé" not in result
    assert answered.written is not None and answered.written.location.endswith("/ACC-1.wgdpr")
    audit = conn.execute("SELECT outcome, subject_hash, details::text FROM gdpr.audit_log"
                         " WHERE action = 'access_request'").fetchall()
    assert [(o, h) for o, h, _ in audit] == [("answered", keys.subject_hash(email))]
    assert "@" not in audit[0][2] and "Zoé" not in audit[0][2]


def test_the_package_is_encrypted_and_bound_to_its_header(conn, no_targets: Policy, keys: Keys, packages) -> None:
    cid, email = _client(conn)
    _answer(conn, no_targets, keys, {"subject_id": cid, "request_id": "ACC-ENC"}, packages)
    raw = packages.read("ACC-ENC.wgdpr")
    assert raw.startswith(access.MAGIC)
    assert email.encode() not in raw and "Zoé".encode() not in raw and b"Testperson" not in raw
    later = raw.replace(b'"expires_at":"', b'"expires_at":"9', 1)  # keep it forever: the header is bound
    with pytest.raises(access.PackageError, match="does not decrypt"):
        access.unseal(later, keys)
    other = generate_extra()  # a key listed under the same key id, but another key
    other["archive_keys"] = {keys.archive_key_id: other["archive_keys"]["archive-1"]}
    other["archive_key_id"] = keys.archive_key_id
    with pytest.raises(access.PackageError, match="does not decrypt"):
        access.unseal(raw, Keys.from_extra(other))
    packages.write("ACC-OTHER.wgdpr", raw)
    with pytest.raises(access.PackageError, match="another request's"):
        access.open_package(packages, keys, "ACC-OTHER")
    with pytest.raises(access.PackageError, match="never written, or purged"):
        access.open_package(packages, keys, "ACC-NONE")


def test_pseudonymised_and_archived_rows_are_in_the_package(conn, policy: Policy, keys: Keys, packages) -> None:
    """A former client the sweep pseudonymised: the pseudonymised rows as they are now, and the originals the
    archive keeps, decrypted."""
    cid = add_contact(conn, "former_client", date(2015, 1, 1))
    add_contract(conn, cid, date(2015, 2, 1), date(2019, 12, 31))
    add_invoice(conn, cid, date(2019, 6, 1))
    add_activity(conn, cid, "email_open", date(2019, 1, 1))
    original = conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0]  # type: ignore[index]
    conn.commit()
    sweep.apply_rule(conn, policy, policy.rule("former_clients"), keys, RunContext("sweep", "s-1", "apply"), AS_OF)
    assert conn.execute("SELECT pseudonymised_at IS NOT NULL FROM crm.contacts WHERE contact_id = %s",
                        (cid,)).fetchone() == (True,)
    archived = conn.execute("SELECT source_table, source_pk FROM gdpr_archive.archived_row WHERE subject_id = %s",
                            (str(cid),)).fetchall()
    conn.rollback()
    assert archived, "the sweep archived originals of this person"

    _answer(conn, policy, keys, {"subject_id": cid, "request_id": "ACC-PSEUDO"}, packages)

    document = json.loads(access.open_package(packages, keys, "ACC-PSEUDO")[1]["data.json"])
    assert _held(document) == _expected(conn, [cid], None)
    contact = document["warehouse"][0]["rows"][0]
    assert contact["pseudonymised_at"] and contact["first_name"] is None and "@" not in contact["email"]
    found = {(a["table"], str(r[CRM[a["table"]]])) for a in document["archive"] for r in a["rows"]}
    assert found == set(archived)
    contacts_archive = [a for a in document["archive"] if a["table"] == "crm.contacts"]
    if contacts_archive:  # the originals, decrypted
        assert contacts_archive[0]["rows"][0]["email"] == original
    assert all(r["destroyed_after"] for a in document["archive"] for r in a["rows"])
    statuses = {a["target"]: a["status"] for a in document["downstream"]}
    assert statuses["emailing"].startswith("not asked")  # no email in clear is known for this person


def test_a_pseudonymised_person_is_found_by_email_with_their_unlinked_ticket_and_archived_invoices(
    conn, no_targets: Policy, keys: Keys, packages
) -> None:
    """After the sweep, the email survives only as a keyed hash (subject row, hashed ticket): the access request
    by email finds the person, their pseudonymised rows and their archived originals."""
    cid = add_contact(conn, "former_client", date(2015, 1, 1))
    add_contract(conn, cid, date(2015, 2, 1), date(2019, 12, 31))
    add_invoice(conn, cid, date(2019, 6, 1))  # kept 10 years after issue: archived
    email = str(conn.execute("SELECT email FROM crm.contacts WHERE contact_id = %s", (cid,)).fetchone()[0])  # type: ignore[index]
    unlinked = _ticket(conn, None, email.upper())
    conn.commit()
    sweep.apply_rule(conn, no_targets, no_targets.rule("former_clients"), keys, RunContext("sweep", "s-1", "apply"),
                     AS_OF)
    assert conn.execute("SELECT count(*) FROM crm.contacts WHERE email = %s", (email,)).fetchone() == (0,)
    archived = {r[0] for r in conn.execute(
        "SELECT source_pk FROM gdpr_archive.archived_row WHERE subject_id = %s AND source_table = 'crm.invoices'",
        (str(cid),)).fetchall()}
    conn.rollback()
    assert len(archived) == 1

    answered = _answer(conn, no_targets, keys, {"email": email, "request_id": "ACC-HASH"}, packages)

    document = json.loads(access.open_package(packages, keys, "ACC-HASH")[1]["data.json"])
    held = _held(document)
    assert held["crm.contacts"] == {cid} and held["crm.support_tickets"] == {unlinked}
    assert held["crm.invoices"] == {r[0] for r in conn.execute(
        "SELECT invoice_id FROM crm.invoices WHERE contact_id = %s", (cid,)).fetchall()}
    tickets = document["warehouse"][5]["rows"]
    assert tickets[0]["requester_email"] == keys.subject_hash(email)  # as it is held now: pseudonymised
    invoices = [a for a in document["archive"] if a["table"] == "crm.invoices"][0]["rows"]
    assert {str(r["invoice_id"]) for r in invoices} == archived
    assert invoices[0]["billing_name"] == "Zoé Testperson"  # the original, decrypted
    assert answered.rows["archive:crm.invoices"] == 1


def test_archives_under_an_old_symmetric_key_and_a_public_key_are_both_answered_with_the_private_connection(
    conn, no_targets: Policy, key_extra: dict[str, Any], private_extra: dict[str, Any], packages
) -> None:
    """A deployment switched from the earlier layout (one symmetric key, archive-1) to a public archive key:
    the row archived before the switch and the one the sweep archives after it (with the keys connection
    only) are both in the answer, read with the private connection; without it, the answer is refused
    naming the connection, and nothing is written."""
    legacy_extra = generate_extra()
    legacy = Keys.from_extra(legacy_extra)
    cid = add_contact(conn, "former_client", date(2015, 1, 1))
    add_contract(conn, cid, date(2015, 2, 1), date(2019, 12, 31))
    add_invoice(conn, cid, date(2019, 6, 1))
    note = new_id()
    conn.execute("INSERT INTO crm.notes (note_id, contact_id, author, body, created_at) VALUES"
                 " (%s, %s, 'Claire Martin', 'Archived in 2025', now())", (note, cid))
    # Archived in 2025 by the former policy, under the symmetric key.
    key_id, nonce, ciphertext = legacy.archive_encrypt(
        json.dumps({"note_id": note, "body": "Archived in 2025"}).encode(),
        archive_aad("crm.notes", str(note), legacy.archive_key_id))
    assert key_id == "archive-1"
    conn.execute(
        "INSERT INTO gdpr_archive.archived_row (source_table, source_pk, subject_id, rule, run_id, purge_after, key_id,"
        " nonce, ciphertext) VALUES ('crm.notes', %s, %s, 'former_clients', 'old-run', '2036-06-15T00:00:00+00:00',"
        " %s, %s, %s)", (str(note), str(cid), key_id, nonce, ciphertext))
    conn.commit()
    # The switch: the store key and the public key as the active archive key; archive-1 stays listed.
    engine = Keys.from_extra({**key_extra, "archive_keys": legacy_extra["archive_keys"]})
    sweep.apply_rule(conn, no_targets, no_targets.rule("former_clients"), engine, RunContext("sweep", "s-1", "apply"),
                     AS_OF)
    archived = dict(conn.execute("SELECT source_table, key_id FROM gdpr_archive.archived_row WHERE subject_id = %s",
                                 (str(cid),)).fetchall())
    conn.rollback()
    assert archived == {"crm.notes": "archive-1", "crm.invoices": "archive-x1"}

    with pytest.raises(KeyConfigError, match="'gdpr_archive_private'"):
        _answer(conn, no_targets, engine, {"subject_id": cid, "request_id": "ACC-SWITCH-0"}, packages)
    conn.rollback()
    with pytest.raises(access.PackageError, match="never written"):
        access.open_package(packages, engine, "ACC-SWITCH-0")

    # Legal / the access request: archive-1 moved to the private connection, beside the private key.
    legal = Keys.from_extra(key_extra).with_private(
        {**private_extra, "archive_keys": legacy_extra["archive_keys"]})
    answered = _answer(conn, no_targets, legal, {"subject_id": cid, "request_id": "ACC-SWITCH-1"}, packages)
    assert answered.rows["archive:crm.invoices"] == answered.rows["archive:crm.notes"] == 1
    document = json.loads(access.open_package(packages, legal, "ACC-SWITCH-1")[1]["data.json"])
    archive = {a["table"]: a["rows"] for a in document["archive"]}
    assert archive["crm.notes"][0]["body"] == "Archived in 2025"
    assert archive["crm.invoices"][0]["billing_name"] == "Zoé Testperson"
    with pytest.raises(KeyConfigError, match="'gdpr_archive_private'"):  # the package: to the public key too
        access.open_package(packages, engine, "ACC-SWITCH-1")


def test_portability_gives_only_the_columns_the_person_provided(conn, policy: Policy, keys: Keys, packages) -> None:
    cid, email = _client(conn)

    answered = _answer(conn, policy, keys, {"email": email, "request_id": "PORT-1", "portability": True}, packages)

    header, files = access.open_package(packages, keys, "PORT-1")
    assert header["kind"] == answered.kind == "portability"
    assert "report.pdf" not in files
    document = json.loads(files["data.json"])
    assert set(document) == {"request", "warehouse"}  # no archive, no downstream, no art. 15 information
    columns = {t["table"]: t["columns"] for t in document["warehouse"]}
    assert columns == {
        "crm.contacts": ["email", "first_name", "last_name", "direct_phone", "job_title"],
        "crm.invoices": ["billing_name"],
        "crm.support_tickets": ["requester_email", "body"],
    }
    for table in document["warehouse"]:
        for row in table["rows"]:
            assert set(row) == set(columns[table["table"]])  # no id, status, score, note or date
    assert len(document["warehouse"][2]["rows"]) == 2  # both tickets, the one found by email too
    header_row = files["csv/crm.contacts.csv"].decode().splitlines()[0]
    assert header_row == "email,first_name,last_name,direct_phone,job_title"
    assert not [n for n in files if "notes" in n or "activities" in n or "downstream" in n]


def test_a_person_nobody_holds_gets_an_answer_saying_so(conn, no_targets: Policy, keys: Keys, packages) -> None:
    answered = _answer(conn, no_targets, keys, {"email": "nobody.here@example.org", "request_id": "ACC-NONE1"},
                       packages)
    assert answered.outcome == "not_found" and not any(answered.rows.values())
    document = json.loads(access.open_package(packages, keys, "ACC-NONE1")[1]["data.json"])
    assert all(not t["rows"] for t in document["warehouse"]) and document["archive"] == []


def test_a_dry_run_counts_and_writes_no_package(conn, policy: Policy, keys: Keys, packages) -> None:
    cid, email = _client(conn)
    answered = _answer(conn, policy, keys, {"email": email, "request_id": "ACC-DRY", "dry_run": True}, packages)
    assert answered.outcome == "dry_run" and answered.written is None
    assert answered.rows["crm.support_tickets"] == 2
    assert packages.names() == []


@pytest.mark.parametrize(("params", "field"), [
    ({"request_id": "ACC-1"}, "exactly one of `email` or `subject_id`"),
    ({"email": "a@b.example", "subject_id": 3, "request_id": "ACC-1"}, "exactly one"),
    ({"email": "a@b.example", "request_id": "ACC-1", "portability": "yes"}, "`portability` must be true or false"),
    ({"email": "a@b.example", "request_id": "ACC-1", "portabilty": True}, "unknown param(s) `portabilty`"),
    ({"email": "a@b.example", "request_id": "ACC-1", "jane@x.example": 1}, "1 other(s) (name not shown)"),
    ({"email": "jané@b.example", "request_id": "ACC-1"}, "`email` is not a plain ASCII address"),
])
def test_bad_params_are_refused_without_echoing_them(params: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as info:
        access.parse_request(params, today=TODAY)
    assert field in str(info.value)
    assert "jane@" not in str(info.value) and "jané" not in str(info.value)


def test_the_answer_refuses_a_policy_that_cannot_say_why_it_holds_the_data(
    conn, tmp_path: Path, keys: Keys, packages
) -> None:
    data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
    del data["tables"][2]["purpose"]
    data["tables"][4]["source"] = ""
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(access.AccessError) as info:
        _answer(conn, load_policy(path), keys, {"email": "a@b.example", "request_id": "ACC-P"}, packages)
    assert "tables[2] (crm.notes): purpose missing" in str(info.value)
    assert "tables[4] (crm.invoices): source missing" in str(info.value)
    assert packages.names() == []


def test_the_weekly_purge_deletes_packages_past_keep_for_and_audits_it(
    conn, policy: Policy, keys: Keys, packages
) -> None:
    created = datetime(2026, 5, 1, tzinfo=timezone.utc)
    for request_id, day in (("OLD-1", created), ("NEW-1", created + timedelta(days=20))):
        files = {"data.json": b"{}", "manifest.json": b"{}"}
        packages.write(access.package_name(request_id), access.seal(
            files, keys, request_id, "access", day, access.expiry(day, policy.access.keep_for)))
    packages.write("notes.txt", b"not a package")
    as_of = datetime(2026, 6, 10, tzinfo=timezone.utc)  # OLD-1 expired on 2026-05-31, NEW-1 on 2026-06-20

    dry = access.purge(conn, packages, RunContext("sweep", "r-1", "purge", dry_run=True), as_of)
    assert dry == {"purged": 1, "kept": 1, "not_packages": 1} and len(packages.names()) == 3
    done = access.purge(conn, packages, RunContext("sweep", "r-2", "purge"), as_of)

    assert done == dry and packages.names() == ["NEW-1.wgdpr", "notes.txt"]
    rows = conn.execute("SELECT run_id, outcome, row_count, details->>'request_id' FROM gdpr.audit_log"
                        " WHERE action = 'purge_access_package' ORDER BY audit_id").fetchall()
    assert rows == [("r-1", "dry_run", 1, "OLD-1"), ("r-2", "done", 1, "OLD-1")]
    again = access.purge(conn, packages, RunContext("sweep", "r-3", "purge"), as_of + timedelta(days=5))
    assert again["purged"] == 0


def test_expiry_adds_calendar_periods() -> None:
    start = datetime(2026, 1, 31, 12, tzinfo=timezone.utc)
    assert access.expiry(start, "P30D") == datetime(2026, 3, 2, 12, tzinfo=timezone.utc)
    assert access.expiry(start, "P1M") == datetime(2026, 2, 28, 12, tzinfo=timezone.utc)
    assert access.expiry(start, "P1Y2W") == datetime(2027, 2, 14, 12, tzinfo=timezone.utc)


# -- downstream systems that misbehave ---------------------------------------------------------------------


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    servers: list[ScriptedServer] = []

    def start(routes: list) -> Policy:
        server = ScriptedServer(routes)
        servers.append(server)
        monkeypatch.setenv("AIRFLOW_CONN_FAULTY", server.connection())
        data = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text())
        data["erasure"]["targets"] = [{"name": "faulty", "kind": "http", "connection_id": "faulty", "preset": "brevo"}]
        path = tmp_path / "faulty.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_policy(path)

    yield start
    for server in servers:
        server.stop()


ACCOUNT = ("GET", "/v3/account", json_answer(200, {"companyName": "Acme"}))


@pytest.mark.parametrize(("route", "error", "message"), [
    (("GET", "/v3/contacts/", redirect("/login")), access.ExportMisconfigured, "a redirect, not followed"),
    (("GET", "/v3/contacts/", json_answer(503, {"message": "down"})), access.ExportFailed, "HTTP 503"),
    (("GET", "/v3/contacts/", json_answer(404, {"message": "no route"})), access.ExportMisconfigured,
     "not the API's not-found answer"),
    (("GET", "/v3/contacts/", json_answer(200, {"code": "unauthorized", "error": "bad key"})),
     access.ExportMisconfigured, "an error in the body"),
], ids=["redirect", "5xx", "wrong-404", "error-body"])
def test_a_downstream_answer_that_is_not_an_answer_stops_the_request_before_any_package(
    conn, keys: Keys, packages, faulty, route: tuple, error: type, message: str
) -> None:
    policy = faulty([ACCOUNT, route, ("GET", "/login", json_answer(200, {"login": True}))])
    _, email = _client(conn)
    preflights = _preflight(conn, policy)
    with pytest.raises(error, match=message) as info:
        _answer(conn, policy, keys, {"email": email, "request_id": "ACC-F"}, packages, preflights)
    assert "@" not in str(info.value)
    assert packages.names() == []


def test_nothing_is_asked_of_a_target_without_a_passed_preflight(conn, keys: Keys, packages, faulty) -> None:
    policy = faulty([("GET", "/v3/contacts/", json_answer(200, {"email": "x"}))])
    _, email = _client(conn)
    with pytest.raises(access.ExportMisconfigured, match="no passed preflight"):
        _answer(conn, policy, keys, {"email": email, "request_id": "ACC-NP"}, packages, set())
    assert packages.names() == []


def test_a_404_with_the_apis_not_found_answer_means_it_holds_nothing(conn, keys: Keys, packages, faulty) -> None:
    policy = faulty([ACCOUNT, ("GET", "/v3/contacts/", json_answer(404, {"code": "document_not_found"}))])
    _, email = _client(conn)
    preflights = _preflight(conn, policy)
    answered = _answer(conn, policy, keys, {"email": email, "request_id": "ACC-404"}, packages, preflights)
    assert answered.downstream == {"faulty": "holds nothing"} and answered.rows["downstream:faulty"] == 0


def test_the_answer_is_recorded_as_completed_and_its_request_id_is_not_answered_twice(
    conn, no_targets: Policy, keys: Keys, packages
) -> None:
    cid, email = _client(conn)
    answered = _answer(conn, no_targets, keys, {"email": email, "request_id": "ACC-REC", "received_at": "2026-06-01"},
                       packages)
    row = conn.execute("SELECT kind, status, outcome, subject_hash, received_at, due_date, completed_at IS NOT NULL,"
                       " details FROM gdpr.request WHERE request_id = 'ACC-REC'").fetchone()
    conn.rollback()
    assert row[:7] == ("access", "completed", "answered", keys.subject_hash(email), date(2026, 6, 1),
                       date(2026, 7, 1), True)
    assert row[7]["package"]["sha256"] == answered.written.sha256 and row[7]["rows"] == answered.rows  # type: ignore[union-attr]
    assert "@" not in json.dumps(row[7])
    with pytest.raises(RequestError, match="request ACC-REC was already answered on"):
        _answer(conn, no_targets, keys, {"subject_id": cid, "request_id": "ACC-REC"}, packages)
    with pytest.raises(RequestError, match="request ACC-REC is of kind access, not portability"):
        _answer(conn, no_targets, keys, {"subject_id": cid, "request_id": "ACC-REC", "portability": True}, packages)
    assert conn.execute("SELECT count(*) FROM gdpr.audit_log WHERE action = 'access_request'").fetchone() == (1,)
