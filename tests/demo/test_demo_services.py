"""Demo downstream services (warehouse_gdpr_demo.services), spoken to over real HTTP on 127.0.0.1.

No database needed: these tests request no DB fixture.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from warehouse_gdpr_demo.services import DemoService, start_emailing, start_telephony

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-brevo-key"
TOKEN = "test-aircall-token"
EMAIL = "a+tag@x.example"
ENCODED = "a%2Btag%40x.example"
BREVO_NOT_FOUND = {"code": "document_not_found", "message": "Contact does not exist"}

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy


def call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One real HTTP request; returns (status, decoded JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with DIRECT.open(request, timeout=5) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    return status, json.loads(raw) if raw else None


KEY = {"api-key": API_KEY}
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def emailing() -> Iterator[DemoService]:
    service = start_emailing(API_KEY)
    yield service
    service.stop()


@pytest.fixture
def telephony() -> Iterator[DemoService]:
    service = start_telephony(TOKEN)
    yield service
    service.stop()


def test_emailing_create_get_delete(emailing: DemoService) -> None:
    url = f"{emailing.base_url}/v3/contacts"
    status, body = call("POST", url, {"email": "Jane@Example.com", "attributes": {"FIRSTNAME": "Jane"}}, KEY)
    assert (status, body) == (201, {"id": 1})
    status, body = call("POST", url, {"email": "bob@example.com"}, KEY)
    assert (status, body) == (201, {"id": 2})
    assert emailing.has_contact(" JANE@example.com ") and emailing.contact_count() == 2

    status, body = call("GET", f"{url}/jane%40example.com", headers=KEY)
    assert status == 200
    assert body == {"id": 1, "email": "jane@example.com", "attributes": {"FIRSTNAME": "Jane"}}

    status, body = call("DELETE", f"{url}/jane%40example.com", headers=KEY)
    assert (status, body) == (204, None)
    assert call("GET", f"{url}/jane%40example.com", headers=KEY) == (404, BREVO_NOT_FOUND)
    assert not emailing.has_contact("jane@example.com") and emailing.contact_count() == 1


def test_emailing_rejects_duplicates_and_bad_emails(emailing: DemoService) -> None:
    url = f"{emailing.base_url}/v3/contacts"
    assert call("POST", url, {"email": "x@y.example"}, KEY)[0] == 201
    assert call("POST", url, {"email": " X@Y.example"}, KEY)[1]["code"] == "duplicate_parameter"
    assert call("POST", url, {"email": "not-an-email"}, KEY)[0] == 400
    assert call("POST", url, None, KEY)[0] == 400
    assert emailing.contact_count() == 1


def test_telephony_create_get_delete(telephony: DemoService) -> None:
    url = f"{telephony.base_url}/contacts"
    status, body = call("POST", url, {"email": "jane@example.com", "phone": "+33100000000"}, BEARER)
    assert status == 201 and body["email"] == "jane@example.com" and body["phone"] == "+33100000000"

    status, body = call("GET", f"{url}/{quote('jane@example.com', safe='')}", headers=BEARER)
    assert status == 200 and body["phone"] == "+33100000000"

    assert call("DELETE", f"{url}/jane@example.com", headers=BEARER) == (200, {"deleted": True})
    assert call("DELETE", f"{url}/jane@example.com", headers=BEARER)[0] == 404
    assert telephony.contact_count() == 0


@pytest.mark.parametrize(
    "headers",
    [{}, {"api-key": "wrong"}, {"Authorization": f"Bearer {API_KEY}"}],
    ids=["none", "wrong-key", "bearer-instead"],
)
def test_emailing_requires_api_key(emailing: DemoService, headers: dict[str, str]) -> None:
    emailing.add_contact(EMAIL)
    url = f"{emailing.base_url}/v3/contacts"
    for method, target, body in [("POST", url, {"email": "new@x.example"}), ("GET", f"{url}/{ENCODED}", None),
                                 ("DELETE", f"{url}/{ENCODED}", None)]:
        status, answer = call(method, target, body, headers)
        assert status == 401 and answer["code"] == "unauthorized"
    assert emailing.has_contact(EMAIL) and emailing.contact_count() == 1


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"api-key": TOKEN}],
    ids=["none", "wrong-token", "no-bearer-prefix", "api-key-instead"],
)
def test_telephony_requires_bearer_token(telephony: DemoService, headers: dict[str, str]) -> None:
    telephony.add_contact(EMAIL, phone="+33100000000")
    assert call("DELETE", f"{telephony.base_url}/contacts/{ENCODED}", headers=headers)[0] == 401
    assert call("POST", f"{telephony.base_url}/contacts", {"email": "n@x.example"}, headers)[0] == 401
    assert telephony.has_contact(EMAIL) and telephony.contact_count() == 1


def test_unknown_delete_is_404_with_brevo_body(emailing: DemoService) -> None:
    status, body = call("DELETE", f"{emailing.base_url}/v3/contacts/nobody%40x.example", headers=KEY)
    assert (status, body) == (404, BREVO_NOT_FOUND)


def test_url_encoded_identifiers(emailing: DemoService, telephony: DemoService) -> None:
    assert quote(EMAIL, safe="") == ENCODED
    assert call("POST", f"{emailing.base_url}/v3/contacts", {"email": EMAIL}, KEY)[0] == 201
    # '+' in a path is a literal plus (not a space), encoded or not.
    assert call("GET", f"{emailing.base_url}/v3/contacts/{ENCODED}", headers=KEY)[1]["email"] == EMAIL
    assert call("GET", f"{emailing.base_url}/v3/contacts/{EMAIL}", headers=KEY)[0] == 200
    assert call("GET", f"{emailing.base_url}/v3/contacts/a%20tag%40x.example", headers=KEY)[0] == 404
    assert call("DELETE", f"{emailing.base_url}/v3/contacts/A%2BTAG%40X.example", headers=KEY)[0] == 204
    assert not emailing.has_contact(EMAIL)

    telephony.add_contact(EMAIL, phone="+33100000000")
    assert call("DELETE", f"{telephony.base_url}/contacts/{ENCODED}", headers=BEARER) == (200, {"deleted": True})
    assert telephony.contact_count() == 0


def test_fail_next_fails_exactly_n_requests_then_recovers(emailing: DemoService) -> None:
    emailing.add_contact(EMAIL)
    target = f"{emailing.base_url}/v3/contacts/{ENCODED}"
    emailing.fail_next(2, 500)
    assert call("GET", f"{emailing.base_url}/_control/contacts/count")[0] == 200  # control: not counted
    assert call("DELETE", target, headers=KEY)[0] == 500
    assert call("DELETE", target, headers={})[0] == 500  # an outage answers before auth
    assert emailing.has_contact(EMAIL)
    assert call("DELETE", target, headers=KEY)[0] == 204
    assert call("GET", target, headers=KEY)[0] == 404


def test_fail_control_endpoint(telephony: DemoService) -> None:
    url = f"{telephony.base_url}/contacts"
    assert call("POST", f"{telephony.base_url}/_control/fail", {"count": 1, "status": 503}) == (
        200,
        {"count": 1, "status": 503},
    )
    assert call("POST", url, {"email": "a@x.example"}, BEARER)[0] == 503
    assert call("POST", url, {"email": "a@x.example"}, BEARER)[0] == 201
    assert call("POST", f"{telephony.base_url}/_control/fail", {"count": 1, "status": 200})[0] == 400
    assert call("POST", f"{telephony.base_url}/_control/fail", {"count": -1})[0] == 400
    with pytest.raises(ValueError):
        telephony.fail_next(1, 302)
    assert call("GET", f"{telephony.base_url}/_control/contacts/count") == (200, {"count": 1})


def test_request_log_and_logging_never_contain_the_email(
    emailing: DemoService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="warehouse_gdpr_demo.services")
    url = f"{emailing.base_url}/v3/contacts"
    call("POST", url, {"email": EMAIL, "attributes": {"LASTNAME": "Secretname"}}, KEY)
    call("GET", f"{url}/{ENCODED}?email={ENCODED}", headers=KEY)
    call("GET", f"{url}/{ENCODED}", headers={})
    emailing.fail_next(1)
    call("DELETE", f"{url}/{ENCODED}", headers=KEY)
    call("DELETE", f"{url}/{ENCODED}", headers=KEY)
    call("DELETE", f"{url}/{ENCODED}", headers=KEY)
    call("PATCH", f"{url}/{ENCODED}", {"email": EMAIL}, KEY)  # unsupported method: 501 from http.server
    call("GET", f"{emailing.base_url}/somewhere/{ENCODED}", headers=KEY)
    # A malformed request line quoting the email: http.server's default error page and log would echo it.
    with socket.create_connection(("127.0.0.1", emailing.port), timeout=5) as raw:
        raw.sendall(f"GET /v3/contacts/{EMAIL} extra HTTP/1.1\r\n\r\n".encode())
        answer = raw.recv(4096)
    assert answer.startswith(b"HTTP/1.0 400") and EMAIL.encode() not in answer  # not echoed back either

    status, log = call("GET", f"{emailing.base_url}/_control/requests")
    assert status == 200
    assert [(r["method"], r["path"], r["status"]) for r in log] == [
        ("POST", "/v3/contacts", 201),
        ("GET", "/v3/contacts/<redacted>", 200),
        ("GET", "/v3/contacts/<redacted>", 401),
        ("DELETE", "/v3/contacts/<redacted>", 500),
        ("DELETE", "/v3/contacts/<redacted>", 204),
        ("DELETE", "/v3/contacts/<redacted>", 404),
        ("PATCH", "/v3/contacts/<redacted>", 501),
        ("GET", "/<redacted>", 404),
    ]
    assert all(set(r) == {"method", "path", "status", "time"} for r in log)
    for text in (json.dumps(log), caplog.text):
        for secret in ("a+tag", "a%2Btag", "x.example", "Secretname", "tag@"):
            assert secret.lower() not in text.lower()
    assert "DELETE /v3/contacts/<redacted> 204" in caplog.text


def test_stop_then_restart_on_same_port_keeps_given_contacts() -> None:
    first = start_emailing(API_KEY)
    first.add_contact(EMAIL, attributes={"FIRSTNAME": "A"})
    first.add_contact("b@x.example")
    port, snapshot = first.port, first.contacts_snapshot()
    first.stop()
    first.stop()  # idempotent
    with pytest.raises(OSError):
        call("GET", f"{first.base_url}/_control/contacts/count")

    empty = start_emailing(API_KEY, port=port)
    assert empty.port == port and empty.contact_count() == 0
    empty.stop()

    second = start_emailing(API_KEY, port=port, contacts=snapshot)
    try:
        assert second.base_url == first.base_url and second.contact_count() == 2
        status, body = call("GET", f"{second.base_url}/v3/contacts/{ENCODED}", headers=KEY)
        assert status == 200 and body["attributes"] == {"FIRSTNAME": "A"}
        assert call("POST", f"{second.base_url}/v3/contacts", {"email": "c@x.example"}, KEY) == (201, {"id": 3})
        snapshot.clear()  # the new store is a copy
        assert second.contact_count() == 3
    finally:
        second.stop()


def _demo_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("demo-")]


def test_stop_frees_the_port_and_threads_even_with_an_idle_client() -> None:
    before = set(threading.enumerate())
    service = start_telephony(TOKEN)
    call("GET", f"{service.base_url}/_control/contacts/count")
    idle = socket.create_connection(("127.0.0.1", service.port), timeout=5)  # connects, never sends
    time.sleep(0.1)
    started = time.monotonic()
    service.stop()
    assert time.monotonic() - started < 3
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", service.port), timeout=2).close()
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not _demo_threads()


def test_binds_to_loopback_only(emailing: DemoService) -> None:
    assert emailing.base_url == f"http://127.0.0.1:{emailing.port}"
    assert emailing._server.server_address[0] == "127.0.0.1"


def test_command_line_runs_both_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT / 'demo'}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "warehouse_gdpr_demo.services", "--api-key", API_KEY, "--token", TOKEN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        urls = dict(process.stdout.readline().split() for _ in range(2))
        assert set(urls) == {"emailing", "telephony"}
        assert call("POST", f"{urls['emailing']}/v3/contacts", {"email": EMAIL}, KEY) == (201, {"id": 1})
        assert call("DELETE", f"{urls['telephony']}/contacts/{ENCODED}", headers=BEARER)[0] == 404
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
        assert process.returncode == 0, stderr
        assert EMAIL not in stderr
        assert "warning" not in stderr  # loopback by default: nothing to warn about
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_host_option_binds_all_interfaces_with_a_warning() -> None:
    """`--host 0.0.0.0` (the compose stack's downstream container): reachable, warned about on stderr;
    the key and token may come from the environment instead of the command line."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT / 'demo'}",
           "DEMO_EMAILING_API_KEY": API_KEY, "DEMO_TELEPHONY_TOKEN": TOKEN}
    process = subprocess.Popen(
        [sys.executable, "-m", "warehouse_gdpr_demo.services", "--host", "0.0.0.0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert process.stdout is not None
        urls = dict(process.stdout.readline().split() for _ in range(2))
        assert urls["emailing"].startswith("http://0.0.0.0:")
        port = urls["emailing"].rsplit(":", 1)[1]
        assert call("POST", f"http://127.0.0.1:{port}/v3/contacts", {"email": EMAIL}, KEY) == (201, {"id": 1})
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
        assert process.returncode == 0, stderr
        assert "warning: demo services listening on 0.0.0.0" in stderr
        assert "no TLS" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_api_key_comes_from_args_or_env() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DEMO_EMAILING_API_KEY", "DEMO_TELEPHONY_TOKEN")}
    env["PYTHONPATH"] = f"{ROOT / 'plugins'}:{ROOT / 'demo'}"
    missing = subprocess.run([sys.executable, "-m", "warehouse_gdpr_demo.services", "--token", TOKEN],
                             capture_output=True, text=True, env=env, timeout=30)
    assert missing.returncode == 2 and "--api-key (or $DEMO_EMAILING_API_KEY) is required" in missing.stderr


def test_host_parameter_and_loopback_check() -> None:
    from warehouse_gdpr_demo.services import is_loopback

    service = start_emailing(API_KEY, host="0.0.0.0")
    try:
        assert service._server.server_address[0] == "0.0.0.0"
        assert call("GET", f"http://127.0.0.1:{service.port}/_control/contacts/count") == (200, {"count": 0})
    finally:
        service.stop()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("downstream")


def test_account_routes_need_the_key_and_are_not_redacted(emailing: DemoService, telephony: DemoService) -> None:
    """What the erasure preflight calls: an authenticated account route on each tool."""
    assert call("GET", f"{emailing.base_url}/v3/account", headers=KEY) == (
        200, {"companyName": "Demo emailing", "plan": [{"type": "free", "credits": 300}]})
    assert call("GET", f"{emailing.base_url}/v3/account", headers={"api-key": "wrong"})[0] == 401
    assert call("GET", f"{telephony.base_url}/company", headers=BEARER) == (
        200, {"company": {"name": "Demo telephony", "users_count": 1}})
    assert call("GET", f"{telephony.base_url}/company", headers={})[0] == 401
    assert call("DELETE", f"{telephony.base_url}/company", headers=BEARER)[0] == 404
    paths = [r["path"] for r in call("GET", f"{emailing.base_url}/_control/requests")[1]]
    assert paths == ["/v3/account", "/v3/account"]


def test_fail_next_can_target_one_method(emailing: DemoService) -> None:
    emailing.add_contact(EMAIL)
    target = f"{emailing.base_url}/v3/contacts/{ENCODED}"
    emailing.fail_next(1, 503, method="DELETE")
    assert call("GET", f"{emailing.base_url}/v3/account", headers=KEY)[0] == 200  # a GET is not failed
    assert call("DELETE", target, headers=KEY)[0] == 503
    assert call("DELETE", target, headers=KEY)[0] == 204
    assert call("POST", f"{emailing.base_url}/_control/fail", {"count": 1, "status": 500, "method": "PATCH"})[0] == 400
    assert call("POST", f"{emailing.base_url}/_control/fail", {"count": 1, "status": 500, "method": "GET"}) == (
        200, {"count": 1, "status": 500, "method": "GET"})


def test_updates_correct_and_restrict_a_contact_as_the_apis_do(emailing: DemoService, telephony: DemoService) -> None:
    """PUT on a contact (issue 14): Brevo's attributes and emailBlacklisted (EMAIL moves the contact), the
    telephony tool's fields; an unknown contact or a taken address answers without changing anything."""
    url = f"{emailing.base_url}/v3/contacts"
    call("POST", url, {"email": EMAIL, "attributes": {"SMS": "+33 6 00 00 00 00"}}, KEY)
    call("POST", url, {"email": "taken@x.example"}, KEY)
    assert call("PUT", f"{url}/{ENCODED}", {"attributes": {"SMS": "+33 1 23 45 67 89"}}, KEY) == (204, None)
    assert call("PUT", f"{url}/{ENCODED}", {"emailBlacklisted": True}, KEY) == (204, None)
    assert emailing.contact(EMAIL)["attributes"] == {"SMS": "+33 1 23 45 67 89"}
    assert emailing.contact(EMAIL)["emailBlacklisted"] is True
    assert call("PUT", f"{url}/{ENCODED}", {"attributes": {"EMAIL": "TAKEN@x.example"}}, KEY)[0] == 400
    assert call("PUT", f"{url}/{ENCODED}", {"attributes": {"EMAIL": "b@x.example"}}, KEY) == (204, None)
    assert emailing.has_contact("b@x.example") and not emailing.has_contact(EMAIL)
    assert call("PUT", f"{url}/{ENCODED}", {"emailBlacklisted": False}, KEY) == (
        404, {"code": "document_not_found", "message": "Contact does not exist"})  # answered, no lock held
    phones = f"{telephony.base_url}/contacts"
    call("POST", phones, {"email": EMAIL, "phone": "+33 6 00 00 00 00"}, BEARER)
    assert call("PUT", f"{phones}/{ENCODED}", {"phone": "+33 1 23 45 67 89", "restricted": True}, BEARER) == (
        200, {"updated": True})
    assert telephony.contact(EMAIL)["phone"] == "+33 1 23 45 67 89" and telephony.contact(EMAIL)["restricted"]
    assert call("PUT", f"{phones}/nobody%40x.example", {"restricted": True}, BEARER)[0] == 404
    assert call("PUT", f"{phones}/{ENCODED}", {"restricted": False}, {})[0] == 401


def test_the_sales_team_webhook_keeps_what_it_is_told_and_can_be_down() -> None:
    from warehouse_gdpr_demo.services import start_webhook

    webhook = start_webhook("hook-token")
    try:
        hook = f"{webhook.base_url}/hooks/gdpr-restriction"
        body = {"event": "restricted", "request_id": "R-1", "subject_table": "crm.contacts", "subject_ids": ["7"]}
        assert call("POST", hook, body, {})[0] == 401
        webhook.fail_next(1)
        assert call("POST", hook, body, {"Authorization": "Bearer hook-token"})[0] == 503
        assert call("POST", hook, body, {"Authorization": "Bearer hook-token"}) == (202, {"received": True})
        assert webhook.notifications() == [body]
        assert call("GET", f"{webhook.base_url}/_control/notifications") == (200, [body])
    finally:
        webhook.stop()
