"""The Airflow side of the transport seam (warehouse_gdpr.transport): what the engine's downstream calls go through.

- HTTP: `HttpHook` gives the base URL, auth and headers of the target's HTTP connection (its extras:
  `verify`, `proxies`, ...). The request never follows a redirect and has an overall deadline: a
  watchdog timer shuts the call's socket down when the deadline passes, so a peer that trickles its
  status line, headers or body byte by byte is cut (requests' own timeout is per read, not overall).
  The answer is read whole (at most `MAX_BODY` bytes) so that the engine can judge the body.
- SQL: the connection's own DB-API hook (`BaseHook.get_connection(id).get_hook()`), `log_sql` off (the
  statements would be logged with their parameter's name, never its value, but the hook logs nothing
  here), autocommit off: the statements run in one transaction, committed only within `max_rows`. On a
  PostgreSQL connection each statement gets `statement_timeout` = the deadline.

Messages keep exception types only: requests and driver messages can quote the URL or the identifier.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from warehouse_gdpr.transport import (
    ConnectionNotUsable,
    DeadlineExceeded,
    HttpAnswer,
    QueryResult,
    SqlOutcome,
    TransportError,
)

MAX_BODY = 1 << 20  # bytes of an answer we read; a longer one is not an answer we can judge
QUERY_CANCELED = "57014"  # PostgreSQL's SQLSTATE when statement_timeout cut a statement


class _Watchdog:
    """Shuts down every socket opened for one call when the call's deadline passes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # the blocked recv() of the calling thread returns at once


def _pool_classes(watchdog: _Watchdog) -> dict[str, type[HTTPConnectionPool]]:
    """urllib3 pool classes whose connections hand their socket to the watchdog as soon as it exists."""

    class Connection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            watchdog.watch(sock)
            return sock

    class TlsConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            watchdog.watch(sock)  # the raw socket: shutting it down also ends the TLS layer above it
            return sock

    class Pool(HTTPConnectionPool):
        ConnectionCls = Connection

    class TlsPool(HTTPSConnectionPool):
        ConnectionCls = TlsConnection

    return {"http": Pool, "https": TlsPool}


class _DeadlineAdapter(HTTPAdapter):
    """A requests adapter (no retries) whose connections, direct or through a proxy, are watched."""

    def __init__(self, watchdog: _Watchdog) -> None:
        self._watchdog = watchdog
        super().__init__(max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self._watchdog)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _pool_classes(self._watchdog)
        return manager


class AirflowHttpCall:
    """`transport.HttpCall` through the Airflow HTTP connection `connection_id`."""

    def __init__(self, connection_id: str) -> None:
        self.connection_id = connection_id

    def __call__(
        self,
        method: str,
        endpoint: str,
        *,
        json_body: object | None = None,
        headers: Mapping[str, str] | None = None,
        deadline_seconds: float,
    ) -> HttpAnswer:
        from airflow.providers.http.hooks.http import HttpHook

        watchdog = _Watchdog(deadline_seconds)
        hook = HttpHook(method=method, http_conn_id=self.connection_id, adapter=_DeadlineAdapter(watchdog))
        try:
            session = hook.get_conn()  # base URL, auth and header extras from the connection
        except Exception as exc:  # noqa: BLE001 - e.g. the connection is not defined
            raise ConnectionNotUsable(f"connection {self.connection_id!r} not usable ({type(exc).__name__})") from None
        send = {"Accept": "application/json", **(headers or {})}
        if json_body is not None:
            send["Content-Type"] = "application/json"
        watchdog.start()
        try:
            response = session.request(
                method, hook.url_from_endpoint(endpoint),
                data=json.dumps(json_body) if json_body is not None else None, headers=send,
                allow_redirects=False, stream=True, timeout=(deadline_seconds, deadline_seconds),
            )
            try:
                body = _read(response, watchdog)
            finally:
                response.close()
        except TransportError:
            raise
        except Exception as exc:  # noqa: BLE001 - requests' messages contain the URL (personal data): type only
            if watchdog.expired:
                raise DeadlineExceeded(f"no whole answer within the {deadline_seconds:g} s deadline (cut)") from None
            raise TransportError(f"no answer ({type(exc).__name__})") from None
        finally:
            watchdog.cancel()
            session.close()
        if watchdog.expired:  # the answer ended because its socket was shut: it may be cut short
            raise DeadlineExceeded(f"no whole answer within the {deadline_seconds:g} s deadline (cut)")
        return HttpAnswer(response.status_code, {k.lower(): v for k, v in response.headers.items()}, body)


def _read(response: Any, watchdog: _Watchdog) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(8192):
        size += len(chunk)
        if size > MAX_BODY:
            raise TransportError(f"answer longer than {MAX_BODY} bytes")
        if watchdog.expired:
            raise DeadlineExceeded(f"no whole answer within the {watchdog.seconds:g} s deadline (cut)")
        chunks.append(chunk)
    return b"".join(chunks)


class AirflowSqlRun:
    """`transport.SqlRun` through the Airflow connection `connection_id` (any DB-API hook)."""

    def __init__(self, connection_id: str) -> None:
        self.connection_id = connection_id

    def __call__(
        self, statements: Sequence[str], params: Mapping[str, object], *, max_rows: int, deadline_seconds: float
    ) -> SqlOutcome:
        from airflow.sdk import BaseHook

        try:
            connection = BaseHook.get_connection(self.connection_id)
            hook = connection.get_hook()
        except Exception as exc:  # noqa: BLE001 - unknown connection, no hook for its type
            raise ConnectionNotUsable(f"connection {self.connection_id!r} not usable ({type(exc).__name__})") from None
        if hasattr(hook, "log_sql"):
            hook.log_sql = False
        try:
            conn = hook.get_conn()
        except Exception as exc:  # noqa: BLE001 - unreachable server, bad credentials: a failed attempt
            raise TransportError(f"cannot connect ({type(exc).__name__})") from None
        try:
            if hasattr(hook, "set_autocommit"):
                hook.set_autocommit(conn, False)
            return _run(conn, connection.conn_type == "postgres", statements, params, max_rows, deadline_seconds)
        except TransportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a driver message may quote the parameter: type only
            _rollback(conn)
            if QUERY_CANCELED in (getattr(exc, "sqlstate", None), getattr(exc, "pgcode", None)):
                raise DeadlineExceeded(f"a statement ran past the {deadline_seconds:g} s deadline (cancelled, "
                                       "rolled back)") from None
            raise TransportError(f"SQL error ({type(exc).__name__})") from None
        finally:
            with contextlib.suppress(Exception):
                conn.close()


def _run(conn: Any, postgres: bool, statements: Sequence[str], params: Mapping[str, object], max_rows: int,
         deadline_seconds: float) -> SqlOutcome:
    rowcounts: list[int] = []
    cur = conn.cursor()
    try:
        if postgres:
            cur.execute("SELECT set_config('statement_timeout', %s, true)", (str(int(deadline_seconds * 1000)),))
        for statement in statements:
            cur.execute(statement, dict(params))
            rowcounts.append(cur.rowcount)
            if cur.rowcount < 0 or sum(rowcounts) > max_rows:
                conn.rollback()
                return SqlOutcome(tuple(rowcounts), committed=False)
    finally:
        cur.close()
    conn.commit()
    return SqlOutcome(tuple(rowcounts), committed=True)


def _rollback(conn: Any) -> None:
    # The connection may be gone; closing it discards the transaction.
    with contextlib.suppress(Exception):
        conn.rollback()


def _connect(connection_id: str) -> tuple[Any, Any, Any]:
    """(connection, hook, DB-API connection) of an Airflow connection, autocommit off, `log_sql` off."""
    from airflow.sdk import BaseHook

    try:
        connection = BaseHook.get_connection(connection_id)
        hook = connection.get_hook()
    except Exception as exc:  # noqa: BLE001 - unknown connection, no hook for its type
        raise ConnectionNotUsable(f"connection {connection_id!r} not usable ({type(exc).__name__})") from None
    if hasattr(hook, "log_sql"):
        hook.log_sql = False
    try:
        conn = hook.get_conn()
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad credentials: a failed attempt
        raise TransportError(f"cannot connect ({type(exc).__name__})") from None
    if hasattr(hook, "set_autocommit"):
        hook.set_autocommit(conn, False)
    return connection, hook, conn


class AirflowSqlRead:
    """`transport.SqlRead` through the Airflow connection `connection_id` (any DB-API hook): the queries run in
    one transaction that is rolled back (read-only on PostgreSQL, with `statement_timeout` = the deadline)."""

    def __init__(self, connection_id: str) -> None:
        self.connection_id = connection_id

    def __call__(
        self, queries: Mapping[str, str], params: Mapping[str, object], *, max_rows: int, deadline_seconds: float
    ) -> dict[str, QueryResult]:
        connection, _, conn = _connect(self.connection_id)
        try:
            cur = conn.cursor()
            try:
                if connection.conn_type == "postgres":
                    cur.execute("SET TRANSACTION READ ONLY")
                    cur.execute("SELECT set_config('statement_timeout', %s, true)",
                                (str(int(deadline_seconds * 1000)),))
                out: dict[str, QueryResult] = {}
                for name, query in queries.items():
                    cur.execute(query, dict(params))
                    rows = cur.fetchmany(max_rows + 1)
                    if len(rows) > max_rows:
                        raise TransportError(f"query {name} returned more than {max_rows} rows for one person "
                                             "(a condition that matches other people?)")
                    columns = tuple(d[0] for d in cur.description or ())
                    out[name] = QueryResult(columns, tuple(tuple(r) for r in rows))
                return out
            finally:
                cur.close()
        except TransportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a driver message may quote the parameter: type only
            if QUERY_CANCELED in (getattr(exc, "sqlstate", None), getattr(exc, "pgcode", None)):
                raise DeadlineExceeded(f"a query ran past the {deadline_seconds:g} s deadline (cancelled)") from None
            raise TransportError(f"SQL error ({type(exc).__name__})") from None
        finally:
            _rollback(conn)
            with contextlib.suppress(Exception):  # the connection may be gone: closing it discards the transaction
                conn.close()


class AirflowTransport:
    """The transport the DAGs' task bodies pass to the engine (propagation.propagate / preflight, access)."""

    def http(self, connection_id: str) -> AirflowHttpCall:
        return AirflowHttpCall(connection_id)

    def sql(self, connection_id: str) -> AirflowSqlRun:
        return AirflowSqlRun(connection_id)

    def sql_read(self, connection_id: str) -> AirflowSqlRead:
        return AirflowSqlRead(connection_id)
