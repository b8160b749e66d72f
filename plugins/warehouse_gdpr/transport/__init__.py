"""The seam between the engine and the downstream systems it tells to erase a person.

The engine (engine/propagation.py) calls a downstream system only through these two small interfaces
and never imports Airflow; the Airflow layer (airflow/transport.py) implements them with HttpHook and the
connection's DB-API hook, and the task bodies pass that implementation in. A test or another
orchestrator can pass its own.

- `HttpCall`: one HTTP request to a path under the connection's base URL (which also gives the auth
  headers), with an overall deadline: the call ends by then whatever the peer does (a peer that trickles
  its answer byte by byte included). Redirects are never followed: a 3xx is returned as it is.
- `SqlRun`: statements with one `%(identifier)s` parameter, in one transaction, returning each
  statement's row count; committed only when the count is known and within `max_rows`, else rolled back.
- `SqlRead`: named queries with one `%(identifier)s` parameter, in one read-only transaction that is
  always rolled back, returning each query's column names and rows (an access request's export).
- `PackageStore`: where access packages are kept (a folder or object storage): write, read, list and
  delete files by name (airflow/storage.py implements it with `airflow.sdk.ObjectStoragePath`).

Errors are `TransportError`, whose message holds no personal data, no URL and no driver text (a URL or
a driver message can quote the identifier): the exception type and what happened only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class TransportError(RuntimeError):
    """A call that got no usable answer. The message holds no personal data."""


class DeadlineExceeded(TransportError):
    """The call's overall deadline passed before the whole answer arrived; the connection was cut."""


class ConnectionNotUsable(TransportError):
    """The Airflow connection is missing or invalid (a configuration problem, not a passing one)."""


@dataclass(frozen=True)
class HttpAnswer:
    """What the peer answered: status, headers (names lower-cased) and the whole body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class SqlOutcome:
    """Row counts of the statements that ran (in order); `committed` is False when it was rolled back."""

    rowcounts: tuple[int, ...]
    committed: bool


class HttpCall(Protocol):
    def __call__(
        self,
        method: str,
        endpoint: str,
        *,
        json_body: object | None = None,
        headers: Mapping[str, str] | None = None,
        deadline_seconds: float,
    ) -> HttpAnswer:
        """Send `method` to `endpoint` (a path under the base URL); never follow a redirect; raise
        TransportError (DeadlineExceeded at the deadline) when there is no whole answer."""
        ...


class SqlRun(Protocol):
    def __call__(
        self,
        statements: Sequence[str],
        params: Mapping[str, object],
        *,
        max_rows: int,
        deadline_seconds: float,
    ) -> SqlOutcome:
        """Run the statements in one transaction. Commit only when every row count is known and their sum
        is at most `max_rows`; otherwise roll back (stopping at the first statement that passes the limit)."""
        ...


@dataclass(frozen=True)
class QueryResult:
    """One query's answer: column names and rows (tuples, as the driver gives them)."""

    columns: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]


class SqlRead(Protocol):
    def __call__(
        self,
        queries: Mapping[str, str],
        params: Mapping[str, object],
        *,
        max_rows: int,
        deadline_seconds: float,
    ) -> dict[str, QueryResult]:
        """Run each query in one read-only transaction (rolled back at the end, never committed) and return
        its columns and rows; raise TransportError when one returns more than `max_rows` rows."""
        ...


class Transport(Protocol):
    """Gives the HTTP call or the SQL runner of one connection (by its id)."""

    def http(self, connection_id: str) -> HttpCall: ...

    def sql(self, connection_id: str) -> SqlRun: ...

    def sql_read(self, connection_id: str) -> SqlRead: ...


class StoreError(TransportError):
    """The package store could not be read or written. The message names the location, never a person."""


class PackageStore(Protocol):
    """A folder or object storage location holding access packages, by file name."""

    def location(self, name: str) -> str:
        """Where the file `name` is (a URL or path, for logs and XComs: it holds no personal data)."""
        ...

    def write(self, name: str, data: bytes) -> str:
        """Write the file (replacing it), return its location."""
        ...

    def read(self, name: str, size: int | None = None) -> bytes:
        """The file's bytes (its first `size` bytes when given); StoreError when it is missing."""
        ...

    def names(self) -> list[str]:
        """The names of the files there, sorted (an empty list when the location does not exist yet)."""
        ...

    def delete(self, name: str) -> None:
        """Delete the file (nothing when it is already gone)."""
        ...
