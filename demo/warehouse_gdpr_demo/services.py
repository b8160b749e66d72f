"""Small real HTTP servers standing in for the downstream tools an erasure is propagated to.

Two flavours, each with an in-memory contact store keyed by normalised email (strip + lower):

- emailing tool, a Brevo-compatible subset: ``POST /v3/contacts`` -> 201 ``{"id": n}``,
  ``GET|DELETE /v3/contacts/{url-encoded email}`` (DELETE -> 204), header ``api-key``; and the
  hashed block list the opt-out sync shares: ``POST /v3/contacts/blocklist/hashes`` with
  ``{"hashes": ["<64 hex>", ...]}`` -> 200 ``{"received": n, "total": m}`` (anything but 64-hex
  strings -> 400, so an email never gets in); ``GET /v3/account`` -> 200 with the account's details
  (what the erasure preflight calls to prove the base URL and key);
- telephony tool, Aircall-like: ``POST /contacts`` -> 201, ``GET|DELETE /contacts/{email}``
  (DELETE -> 200 ``{"deleted": true}``), ``GET /company`` -> 200 ``{"company": {...}}`` (its
  preflight), header ``Authorization: Bearer <token>``.

Both take corrections and restrictions as their API would: the emailing tool ``PUT /v3/contacts/{email}``
with ``{"attributes": {...}}`` (``EMAIL`` changes the address) and ``{"emailBlacklisted": true|false}`` ->
204; the telephony tool ``PUT /contacts/{email}`` with top-level fields (``email``, ``phone``,
``restricted``, ...) -> 200 ``{"updated": true}``. A third server, the sales team's webhook
(`start_webhook`), takes ``POST /hooks/<name>`` (bearer token) -> 202 and keeps the JSON bodies (internal
ids only) for ``GET /_control/notifications``.

Every route but the control routes needs the key or token (401 otherwise). A missing contact answers
404 with the tool's own not-found body; an unknown route answers 404 ``{"code": "not_found", ...}``.
``GET`` of a contact answers everything the tool holds on that person, by email: the record as it was
created, with whatever history it was given (the demo sync gives the emailing tool Brevo's
``statistics`` and the telephony tool a ``calls`` list). That is the export an access request reads
(the policy's ``access_endpoint``; Brevo's own "get a contact's details" route for the emailing tool).

Both serve, without auth, ``POST /_control/fail`` ``{"count": N, "status": 500}`` (the next N
non-control requests answer that status; ``"method": "DELETE"`` limits it to that method),
``GET /_control/requests`` (method, redacted path, status and time of each non-control request;
bodies are never kept) and ``GET /_control/contacts/count`` (and ``GET /_control/blocklist/count``).
Emails are personal data: paths are stored and logged with the identifier replaced by ``<redacted>``
and query strings dropped. Servers bind to 127.0.0.1 unless
told otherwise (``host=``, ``--host``): plain HTTP, demo credentials, no auth on the control routes.

``python -m warehouse_gdpr_demo.services --emailing-port P1 --telephony-port P2 --api-key K
--token T [--webhook-port P3] [--host H]`` runs the three in the foreground until SIGTERM or Ctrl-C. The key
and token may come from ``$DEMO_EMAILING_API_KEY`` and ``$DEMO_TELEPHONY_TOKEN`` instead (kept out of ``ps``).
In a container, ``--host 0.0.0.0`` lets the other containers reach them (a warning says so).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)
HOST = "127.0.0.1"  # the default bind address: loopback only
API_KEY_ENV = "DEMO_EMAILING_API_KEY"
TOKEN_ENV = "DEMO_TELEPHONY_TOKEN"
WEBHOOK_TOKEN_ENV = "DEMO_WEBHOOK_TOKEN"
REDACTED = "<redacted>"
CONTROL = "/_control/"
REQUEST_LOG_SIZE = 10_000  # most recent requests kept for /_control/requests


@dataclass(frozen=True)
class _Flavour:
    """What differs between the two tools: paths, auth and response shapes."""

    name: str
    prefix: str
    authorised: Callable[[Message], bool]
    unauthorised: dict[str, Any]
    not_found: dict[str, Any]
    delete_status: int
    delete_body: dict[str, Any] | None
    created: Callable[[dict[str, Any]], dict[str, Any]]
    blocklist_path: str | None = None  # POST {"hashes": [...]}: the shared opt-out list (emailing only)
    account_path: str | None = None  # GET: the account's details, behind the same auth (the erasure preflight)
    account: dict[str, Any] | None = None
    # PUT /prefix/{email}: merge the body into the contact; returns the contact's new email when it changes
    update: Callable[[dict[str, Any], dict[str, Any]], str | None] | None = None
    update_status: int = 200
    update_body: dict[str, Any] | None = None


def normalise(email: str) -> str:
    """Store key of an email: surrounding blanks stripped, lowercased."""
    return email.strip().lower()


class _State:
    """Contacts, injected failures and the request log of one server, behind one lock."""

    def __init__(self, flavour: _Flavour, contacts: Mapping[str, dict[str, Any]] | None) -> None:
        self.flavour = flavour
        self.lock = threading.Lock()
        self.contacts = {normalise(k): copy.deepcopy(dict(v)) for k, v in (contacts or {}).items()}
        self.next_id = 1 + max((int(c.get("id", 0)) for c in self.contacts.values()), default=0)
        self.fail_remaining = 0
        self.fail_status = 500
        self.fail_method: str | None = None  # only requests of this method fail (None: any)
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_SIZE)
        self.blocklist: set[str] = set()

    def add(self, email: str, fields: Mapping[str, Any]) -> dict[str, Any] | None:
        """Store a contact; None when the email is already known."""
        key = normalise(email)
        with self.lock:
            if key in self.contacts:
                return None
            record = {**copy.deepcopy(dict(fields)), "id": self.next_id, "email": key}
            self.contacts[key] = record
            self.next_id += 1
            return copy.deepcopy(record)

    def take_failure(self, method: str) -> int | None:
        """The status to fail the current request with, if a failure is pending (for its method)."""
        with self.lock:
            if self.fail_remaining <= 0 or self.fail_method not in (None, method):
                return None
            self.fail_remaining -= 1
            return self.fail_status

    def redact(self, path: str) -> str:
        """``path`` without query string and with any identifier replaced by ``<redacted>``."""
        path = urlsplit(path).path
        flavour = self.flavour
        if path in (flavour.prefix, flavour.blocklist_path, flavour.account_path) or path.startswith(CONTROL):
            return path
        if path.startswith(self.flavour.prefix + "/"):
            return f"{self.flavour.prefix}/{REDACTED}"
        return f"/{REDACTED}"


class _Server(ThreadingHTTPServer):
    """Threading server that tracks its handler threads so that stop() can end and join them all.

    (socketserver does not join daemon handler threads on close, and a non-daemon one would block exit.)
    """

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, port: int, state: _State, host: str = HOST) -> None:
        self.state = state
        self.clients: dict[socket.socket, threading.Thread] = {}  # open connection -> its handler thread
        super().__init__((host, port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        name = f"demo-{self.state.flavour.name}-request"
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address), name=name)
        thread.daemon = True
        with self.state.lock:
            self.clients[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self.state.lock:
            self.clients.pop(request, None)
        super().shutdown_request(request)

    def disconnect_clients(self) -> None:
        """Cut every open connection (an idle client would otherwise hold its thread) and join the threads."""
        with self.state.lock:
            clients = list(self.clients.items())
        for client, _ in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        for _, thread in clients:
            thread.join()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds an idle client may hold a handler thread (stop() cuts connections at once)
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        state, flavour = self.server.state, self.server.state.flavour
        length = self.headers.get("Content-Length", "0")
        raw = self.rfile.read(int(length)) if length.isdigit() and int(length) > 0 else b""
        path = urlsplit(self.path).path
        if path.startswith(CONTROL):
            return self._control(state, path, raw)
        failure = state.take_failure(self.command)
        if failure is not None:
            return self._send(failure, {"code": "simulated_failure", "message": "Simulated outage"})
        if not flavour.authorised(self.headers):
            return self._send(401, flavour.unauthorised)
        if flavour.blocklist_path and path == flavour.blocklist_path and self.command == "POST":
            return self._blocklist(state, raw)
        if flavour.account_path and path == flavour.account_path and self.command == "GET":
            return self._send(200, flavour.account)
        if path == flavour.prefix and self.command == "POST":
            body = _json_object(raw) or {}
            email = body.get("email")
            if not isinstance(email, str) or "@" not in email:
                return self._send(400, {"code": "invalid_parameter", "message": "Invalid email address"})
            record = state.add(email, {k: v for k, v in body.items() if k not in ("id", "email")})
            if record is None:
                return self._send(400, {"code": "duplicate_parameter", "message": "Contact already exist"})
            return self._send(201, flavour.created(record))
        return self._contact(state, path, raw)

    def _contact(self, state: _State, path: str, raw: bytes) -> None:
        """GET, DELETE or PUT (an update) of one contact, by its url-encoded email."""
        flavour = state.flavour
        segment = path[len(flavour.prefix) + 1 :] if path.startswith(flavour.prefix + "/") else ""
        if not segment or "/" in segment or self.command == "POST":
            return self._send(404, {"code": "not_found", "message": "Unknown route"})
        key = normalise(unquote(segment))
        if self.command == "PUT":
            return self._update(state, key, raw)
        with state.lock:
            record = state.contacts.pop(key, None) if self.command == "DELETE" else state.contacts.get(key)
            record = copy.deepcopy(record)
        if record is None:
            return self._send(404, flavour.not_found)
        if self.command == "DELETE":
            return self._send(flavour.delete_status, flavour.delete_body)
        return self._send(200, record)

    def _update(self, state: _State, key: str, raw: bytes) -> None:
        """PUT on a contact: the tool's update (a correction, a restriction); the email may change (re-keyed)."""
        flavour = state.flavour
        body = _json_object(raw)
        if flavour.update is None or body is None:
            return self._send(400 if body is None else 404, {"code": "invalid_parameter", "message": "Bad update"})
        answer: tuple[int, dict[str, Any] | None] = (flavour.update_status, flavour.update_body)
        with state.lock:  # (answered once the lock is released: log_request takes it too)
            record = state.contacts.get(key)
            changed = copy.deepcopy(record) if record is not None else None
            new_email = flavour.update(changed, body) if changed is not None else None
            if changed is None:
                answer = (404, flavour.not_found)
            elif new_email is not None and normalise(new_email) != key and normalise(new_email) in state.contacts:
                answer = (400, {"code": "duplicate_parameter", "message": "Contact already exist"})
            else:
                if new_email is not None and normalise(new_email) != key:
                    del state.contacts[key]
                    changed["email"] = key = normalise(new_email)
                state.contacts[key] = changed
        return self._send(*answer)

    def _blocklist(self, state: _State, raw: bytes) -> None:
        body = _json_object(raw)
        hashes = body.get("hashes") if body is not None else None
        if not isinstance(hashes, list) or not all(isinstance(h, str) and _is_hash(h) for h in hashes):
            return self._send(400, {"code": "invalid_parameter", "message": "hashes must be 64 hex characters each"})
        with state.lock:
            state.blocklist.update(hashes)
            total = len(state.blocklist)
        return self._send(200, {"received": len(hashes), "total": total})

    def _control(self, state: _State, path: str, raw: bytes) -> None:
        if path == CONTROL + "fail" and self.command == "POST":
            body = _json_object(raw) or {}
            count, status, method = body.get("count", 1), body.get("status", 500), body.get("method")
            if not (isinstance(count, int) and count >= 0 and isinstance(status, int) and 400 <= status <= 599
                    and method in (None, "GET", "POST", "DELETE")):
                return self._send(400, {"code": "invalid_parameter",
                                        "message": "count >= 0, status 4xx/5xx, method GET, POST, DELETE or null"})
            with state.lock:
                state.fail_remaining, state.fail_status, state.fail_method = count, status, method
            return self._send(200, {"count": count, "status": status, **({"method": method} if method else {})})
        if path == CONTROL + "requests" and self.command == "GET":
            with state.lock:
                requests = list(state.requests)
            return self._send(200, requests)
        if path == CONTROL + "contacts/count" and self.command == "GET":
            with state.lock:
                count = len(state.contacts)
            return self._send(200, {"count": count})
        if path == CONTROL + "blocklist/count" and self.command == "GET":
            with state.lock:
                count = len(state.blocklist)
            return self._send(200, {"count": count})
        return self._send(404, {"code": "not_found", "message": "Unknown control route"})

    def _send(self, status: int, body: Any) -> None:
        data = b"" if body is None or status == 204 else json.dumps(body).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """JSON error without echoing the request line (http.server's page quotes it, email included)."""
        self.close_connection = True
        self._send(code, {"code": "http_error", "message": HTTPStatus(code).phrase})

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Record and DEBUG-log method, redacted path and status; never the raw path or body."""
        if not getattr(self, "command", None):
            return
        state, path = self.server.state, self.server.state.redact(self.path)
        status = int(code) if str(code).isdigit() else 0
        log.debug("%s %s %s %s", state.flavour.name, self.command, path, status)
        if not path.startswith(CONTROL):
            now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
            with state.lock:
                state.requests.append({"method": self.command, "path": path, "status": status, "time": now})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        """Errors from http.server may quote the request line (an email): keep only a redacted line."""
        path = self.server.state.redact(getattr(self, "path", "") or "")
        name, method = self.server.state.flavour.name, getattr(self, "command", None)
        log.debug("%s %s %s: request error (details withheld)", name, method, path)


def _is_hash(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw or b"null")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class DemoService:
    """One running demo server, served by a daemon thread on ``host`` (default 127.0.0.1)."""

    def __init__(self, flavour: _Flavour, port: int, contacts: Mapping[str, dict[str, Any]] | None,
                 host: str = HOST) -> None:
        self._state = _State(flavour, contacts)
        self._server = _Server(port, self._state, host)
        self.name: str = flavour.name
        self.port: int = self._server.server_address[1]
        self.base_url: str = f"http://{host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"demo-{self.name}", daemon=True
        )
        self._thread.start()
        self._stopped = False

    def add_contact(self, email: str, **fields: Any) -> None:
        """Store a contact directly (fields as in a POST body, e.g. ``attributes={...}`` or ``phone=...``)."""
        self._state.add(email, fields)

    def has_contact(self, email: str) -> bool:
        """Whether the (normalised) email is in the store."""
        with self._state.lock:
            return normalise(email) in self._state.contacts

    def contact_count(self) -> int:
        """Number of contacts in the store."""
        with self._state.lock:
            return len(self._state.contacts)

    def blocklist_hashes(self) -> set[str]:
        """The hashes received on the block-list route (emailing tool), as a set."""
        with self._state.lock:
            return set(self._state.blocklist)

    def contact(self, email: str) -> dict[str, Any] | None:
        """A copy of the contact stored under the (normalised) email, or None."""
        with self._state.lock:
            return copy.deepcopy(self._state.contacts.get(normalise(email)))

    def contacts_snapshot(self) -> dict[str, dict[str, Any]]:
        """A deep copy of the store, to pass as ``contacts=`` when restarting on the same port."""
        with self._state.lock:
            return copy.deepcopy(self._state.contacts)

    def fail_next(self, count: int, status: int = 500, method: str | None = None) -> None:
        """Make the next ``count`` non-control requests (of ``method`` only, if given) answer ``status``
        (a recovering outage)."""
        if count < 0 or not 400 <= status <= 599:
            raise ValueError("count must be >= 0 and status a 4xx/5xx code")
        with self._state.lock:
            self._state.fail_remaining, self._state.fail_status, self._state.fail_method = count, status, method

    def stop(self) -> None:
        """Stop serving, wait for the threads and close the socket (idempotent); the port is free afterwards."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.disconnect_clients()
        self._server.server_close()
        self._thread.join()


def _header_is(name: str, expected: str) -> Callable[[Message], bool]:
    """Auth check: header ``name`` equals ``expected`` (constant-time comparison)."""
    return lambda headers: hmac.compare_digest(headers.get(name, "").encode(), expected.encode())


def _brevo_update(record: dict[str, Any], body: dict[str, Any]) -> str | None:
    """Brevo's PUT /v3/contacts/{identifier}: `attributes` merged (EMAIL changes the address), `emailBlacklisted`."""
    attributes = body.get("attributes") or {}
    record["attributes"] = {**(record.get("attributes") or {}), **{k: v for k, v in attributes.items() if k != "EMAIL"}}
    if "emailBlacklisted" in body:
        record["emailBlacklisted"] = bool(body["emailBlacklisted"])
    new = attributes.get("EMAIL")
    return new if isinstance(new, str) else None


def _fields_update(record: dict[str, Any], body: dict[str, Any]) -> str | None:
    """The telephony tool's PUT /contacts/{email}: top-level fields merged (`email` changes the address)."""
    record.update({k: v for k, v in body.items() if k not in ("id", "email")})
    new = body.get("email")
    return new if isinstance(new, str) else None


def start_emailing(api_key: str, port: int = 0, contacts: Mapping[str, dict[str, Any]] | None = None,
                   host: str = HOST) -> DemoService:
    """Start the Brevo-compatible emailing tool (port 0: any free port), optionally with ``contacts``."""
    flavour = _Flavour(
        name="emailing",
        prefix="/v3/contacts",
        authorised=_header_is("api-key", api_key),
        unauthorised={"code": "unauthorized", "message": "Key not found"},
        not_found={"code": "document_not_found", "message": "Contact does not exist"},
        delete_status=204,
        delete_body=None,
        created=lambda record: {"id": record["id"]},
        blocklist_path="/v3/contacts/blocklist/hashes",
        account_path="/v3/account",
        account={"companyName": "Demo emailing", "plan": [{"type": "free", "credits": 300}]},
        update=_brevo_update,
        update_status=204,
    )
    return DemoService(flavour, port, contacts, host)


def start_telephony(token: str, port: int = 0, contacts: Mapping[str, dict[str, Any]] | None = None,
                    host: str = HOST) -> DemoService:
    """Start the Aircall-like telephony tool (port 0: any free port), optionally with ``contacts``."""
    flavour = _Flavour(
        name="telephony",
        prefix="/contacts",
        authorised=_header_is("Authorization", f"Bearer {token}"),
        unauthorised={"error": "Unauthorized", "troubleshoot": "Check your bearer token"},
        not_found={"error": "Not found", "troubleshoot": "Contact does not exist"},
        delete_status=200,
        delete_body={"deleted": True},
        created=lambda record: record,
        account_path="/company",
        account={"company": {"name": "Demo telephony", "users_count": 1}},
        update=_fields_update,
        update_status=200,
        update_body={"updated": True},
    )
    return DemoService(flavour, port, contacts, host)


class _WebhookHandler(BaseHTTPRequestHandler):
    """The sales team's webhook: ``POST /hooks/...`` with ``Authorization: Bearer <token>`` -> 202; the JSON
    bodies (internal ids, never an email) are kept for ``GET /_control/notifications``."""

    server: _WebhookServer
    timeout = 10
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # noqa: N802
        if urlsplit(self.path).path == CONTROL + "notifications":
            with self.server.lock:
                return self._send(200, list(self.server.notifications))
        return self._send(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        length = self.headers.get("Content-Length", "0")
        raw = self.rfile.read(int(length)) if length.isdigit() and int(length) > 0 else b""
        with self.server.lock:
            failure = self.server.fail_remaining > 0
            if failure:
                self.server.fail_remaining -= 1
        if failure:
            return self._send(self.server.fail_status, {"error": "simulated outage"})
        expected = f"Bearer {self.server.token}".encode()
        if not hmac.compare_digest(self.headers.get("Authorization", "").encode(), expected):
            return self._send(401, {"error": "unauthorized"})
        body = _json_object(raw)
        if not urlsplit(self.path).path.startswith("/hooks/") or body is None:
            return self._send(404 if body is not None else 400, {"error": "unknown hook or not JSON"})
        with self.server.lock:
            self.server.notifications.append(body)
        return self._send(202, {"received": True})

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("webhook %s %s", getattr(self, "command", None), urlsplit(getattr(self, "path", "") or "").path)


class _WebhookServer(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, port: int, token: str, host: str) -> None:
        self.token = token
        self.lock = threading.Lock()
        self.notifications: list[dict[str, Any]] = []
        self.fail_remaining = 0
        self.fail_status = 500
        super().__init__((host, port), _WebhookHandler)


class WebhookService:
    """The demo's sales-team webhook (restriction notifications), served by a daemon thread."""

    def __init__(self, token: str, port: int = 0, host: str = HOST) -> None:
        self._server = _WebhookServer(port, token, host)
        self.name = "webhook"
        self.port: int = self._server.server_address[1]
        self.base_url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="demo-webhook", daemon=True)
        self._thread.start()
        self._stopped = False

    def notifications(self) -> list[dict[str, Any]]:
        """The JSON bodies received, oldest first."""
        with self._server.lock:
            return copy.deepcopy(self._server.notifications)

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next `count` POSTs with `status` (an outage)."""
        with self._server.lock:
            self._server.fail_remaining, self._server.fail_status = count, status

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_webhook(token: str, port: int = 0, host: str = HOST) -> WebhookService:
    """Start the sales team's webhook (port 0: any free port): ``POST /hooks/<name>``, bearer token."""
    return WebhookService(token, port, host)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the services on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def build_parser() -> argparse.ArgumentParser:
    """The command line of `main` (the key and token default to their environment variables)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emailing-port", type=int, default=0)
    parser.add_argument("--telephony-port", type=int, default=0)
    parser.add_argument("--host", default=HOST, help=f"address to bind (default {HOST}, this machine only)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"value the emailing tool expects in 'api-key' (default ${API_KEY_ENV})")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"bearer token the telephony tool expects (default ${TOKEN_ENV})")
    parser.add_argument("--webhook-port", type=int, default=0)
    parser.add_argument("--webhook-token", default=os.environ.get(WEBHOOK_TOKEN_ENV),
                        help=f"bearer token the sales team's webhook expects (default ${WEBHOOK_TOKEN_ENV}, "
                             "else the telephony token)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run both services in the foreground until SIGTERM or Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, env in (("--api-key", API_KEY_ENV), ("--token", TOKEN_ENV)):
        if not getattr(args, option[2:].replace("-", "_")):
            parser.error(f"{option} (or ${env}) is required")
    if not is_loopback(args.host):
        print(f"warning: demo services listening on {args.host}: demo only, plain HTTP (no TLS), demo "
              "credentials, control routes without auth; keep them on a private demo network.",
              file=sys.stderr, flush=True)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    services: list[DemoService | WebhookService] = []
    try:
        services.append(start_emailing(args.api_key, args.emailing_port, host=args.host))
        services.append(start_telephony(args.token, args.telephony_port, host=args.host))
        services.append(start_webhook(args.webhook_token or args.token, args.webhook_port, host=args.host))
        for service in services:
            print(f"{service.name} {service.base_url}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for service in services:
            service.stop()


if __name__ == "__main__":
    main()
