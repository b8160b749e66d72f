"""How a task's failure reaches Airflow: one decorator, `task_errors`, on every task body.

- Configuration errors (`warehouse_gdpr.engine.errors.ConfigurationError`: a bad policy, an unknown key
  id, the catalog not matching, a control schema too old, a malformed request), a refused grant, a
  constraint or a SQL expression of the policy that the data refuses, and an encrypted value that
  does not decrypt: the task fails at once (`AirflowFailException`, no retry). A person must fix
  something first.
- Transient errors (`TransientError`: a target answered 5xx or not at all; a lost connection, a lock
  or statement timeout, a deadlock, a serialization failure, the server shutting down): the task
  raises a retryable exception and Airflow retries it with backoff.
- Anything else (a bug) goes through unchanged.

Errors from the warehouse can carry personal data: the primary message ("invalid input syntax for
type integer: "jane@acme.example""), the DETAIL line ("Failing row contains (...)", "Key (email)=(...)
already exists"). They are scrubbed here, before any log: what is logged and raised names the error
class, the SQLSTATE and the identifiers psycopg's diagnostics give (schema, table, column, constraint,
data type), never a message, a detail or a value. The new exception is raised outside the `except`
block, so it carries no reference to the original (no chained traceback for Airflow to print).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from airflow.sdk.exceptions import AirflowFailException
from cryptography.exceptions import InvalidTag

from warehouse_gdpr.engine.errors import ConfigurationError, TransientError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# What a warehouse error means for the operator, by SQLSTATE (exact code, then its two-letter class).
_HINTS = {
    "42501": "the role of the warehouse connection lacks a grant (README, 'Control schema and roles')",
    "23": "a constraint of the warehouse refused the change: compare the policy's treatment of that column "
          "with the constraint",
    "22": "a value did not fit the SQL: check the policy's predicates and column treatments against the data",
    "42": "the SQL does not match the warehouse: check the policy against the catalog (warehouse-gdpr policy check)",
    "08": "the connection to the warehouse was lost or refused",
    "40": "the transaction was rolled back by the server (deadlock or serialization failure)",
    "53": "the warehouse server is short of resources",
    "55": "a lock was not available in time",
    "57": "the statement was cancelled, or the server ended the connection (restart, failover, administrator)",
}


def warehouse_error(exc: psycopg.Error) -> str:
    """A psycopg error described without personal data: class, SQLSTATE, identifiers from its diagnostics."""
    parts = [f"warehouse error {type(exc).__name__}"]
    if exc.sqlstate:
        parts.append(f"(SQLSTATE {exc.sqlstate})")
    diag = exc.diag
    table = ".".join(n for n in (diag.schema_name, diag.table_name) if n)
    names = [("table", table), ("column", diag.column_name), ("constraint", diag.constraint_name),
             ("type", diag.datatype_name)]
    where = ", ".join(f"{what} {name}" for what, name in names if name)
    if where:
        parts.append(f"on {where}")
    state = exc.sqlstate or ""
    hint = _HINTS.get(state) or _HINTS.get(state[:2])
    if hint is None and isinstance(exc, psycopg.OperationalError):
        hint = _HINTS["08"]
    message = " ".join(parts)
    return f"{message}: {hint}" if hint else message


def classify(exc: BaseException) -> tuple[bool, str] | None:
    """(retryable, message without personal data) for an error this layer knows; None for any other."""
    if isinstance(exc, ConfigurationError):
        return False, str(exc)
    if isinstance(exc, TransientError):
        return True, str(exc)
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return True, warehouse_error(exc)
    if isinstance(exc, psycopg.Error):
        return False, warehouse_error(exc)
    if isinstance(exc, InvalidTag):
        return False, ("InvalidTag: an encrypted value does not decrypt (its ciphertext was altered, or the key "
                       "listed under its key id in the keys connection changed)")
    return None


def task_errors(func: F) -> F:
    """Map a task body's failures: configuration errors fail at once, transient ones retry, warehouse
    errors are scrubbed first (see the module docstring)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # classified below; an unknown error is re-raised untouched
            known = classify(exc)
            if known is None:
                raise
            retryable, message = known
            original = exc if isinstance(exc, TransientError) else None
        # Raised outside the except block: the new exception has no __context__ (the warehouse error).
        if retryable:
            log.warning("%s: %s. Airflow retries the task with backoff.", func.__name__, message)
            raise original if original is not None else TransientError(message)
        log.error("%s: %s. Not retried: fix the cause, then clear the task.", func.__name__, message)
        raise AirflowFailException(message)

    return wrapper  # type: ignore[return-value]
