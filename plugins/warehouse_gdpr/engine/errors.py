"""The two kinds of failure the engine reports, so that a caller knows whether to try again.

- `ConfigurationError`: trying again cannot help until a person fixes something (a bad policy file,
  an unknown key id, a missing grant, the policy not matching the catalog, a control schema too old,
  a malformed request). Airflow fails the task at once, without retries.
- `TransientError`: the same call may succeed later (a downstream target answered 5xx or not at
  all, another worker holds the row). Airflow retries with backoff.

Each engine exception subclasses one of them (and keeps its historical base, ValueError or
RuntimeError, for callers that catch those). Messages name fields, tables, key ids and request ids,
never a personal value. Errors raised by the warehouse driver (psycopg) are classified and scrubbed
in the Airflow layer (`warehouse_gdpr.airflow.errors`), the one place they meet a log.
"""

from __future__ import annotations


class ConfigurationError(Exception):
    """Retrying cannot fix it: a person must change the policy, the keys, a grant or the request."""


class TransientError(Exception):
    """It may work later: retry with backoff."""


class UnmappedForeignKey(ConfigurationError, RuntimeError):
    """A delete is blocked by a foreign key from a table the policy does not map (add that table)."""
