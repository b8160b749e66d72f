"""A small real HTTP server on 127.0.0.1 whose answers a test scripts route by route: the misbehaving
downstream systems an erasure must not take at their word (a 200 with an error in its body, a redirect to
a login page, 404 for everything, an answer trickled byte by byte, a slow answer).

    server = ScriptedServer([("GET", "/v3/account", json_answer(200, {...})),
                             ("DELETE", "/v3/contacts/", trickle(RAW_204, every=0.5))])
    ...
    server.stop()

Routes are (method, path prefix, behaviour), first match wins; anything else answers 404 JSON. Every
request's method and path are kept in `server.requests`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Behaviour = Callable[["_Handler"], None]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def _dispatch(self) -> None:
        length = self.headers.get("Content-Length", "0")
        if length.isdigit() and int(length):
            self.rfile.read(int(length))
        with self.server.lock:
            self.server.requests.append((self.command, self.path))
        for method, prefix, behaviour in self.server.routes:
            if self.command == method and self.path.startswith(prefix):
                return behaviour(self)
        return json_answer(404, {"code": "not_found", "message": "Unknown route"})(self)

    do_GET = do_POST = do_DELETE = do_PUT = _dispatch  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, routes: list[tuple[str, str, Behaviour]]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.clients: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.clients.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.clients.discard(request)
        super().shutdown_request(request)


class ScriptedServer:
    def __init__(self, routes: list[tuple[str, str, Behaviour]]) -> None:
        self._server = _Server(routes)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self._server.lock:
            return list(self._server.requests)

    def connection(self, **extra: str) -> str:
        """The Airflow HTTP connection (JSON) whose base URL is this server."""
        return json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": self.port, "schema": "http",
                           "extra": extra})

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        with self._server.lock:
            clients = list(self._server.clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join()


def json_answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Behaviour:
    def answer(handler: _Handler) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        if data:
            handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    return answer


def html_answer(status: int, text: str) -> Behaviour:
    def answer(handler: _Handler) -> None:
        data = text.encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "text/html; charset=utf-8")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    return answer


def redirect(location: str, status: int = 302) -> Behaviour:
    return json_answer(status, None, {"Location": location})


def trickle(raw: bytes, every: float) -> Behaviour:
    """Write the raw HTTP answer (status line, headers, body) one byte every `every` seconds."""
    def answer(handler: _Handler) -> None:
        handler.close_connection = True
        for byte in raw:
            if handler.server.stopping.wait(every):
                return
            try:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
            except OSError:  # the client cut the connection
                return
    return answer


def after(event: threading.Event, behaviour: Behaviour, started: threading.Event | None = None) -> Behaviour:
    """Answer with `behaviour` once `event` is set (a slow target whose answer the test releases)."""
    def answer(handler: _Handler) -> None:
        if started is not None:
            started.set()
        while not event.wait(0.05):
            if handler.server.stopping.is_set():
                return
        behaviour(handler)
    return answer


def raw_answer(status_line: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [status_line, *[f"{k}: {v}" for k, v in headers.items()], f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode() + body


def wait_for(predicate: Callable[[], bool], seconds: float = 30) -> None:
    """Poll until predicate() holds (a correctness wait with a generous bound, not a speed assertion)."""
    end = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.02)
