"""The engine: everything that decides and changes data in the warehouse. It never imports Airflow.

  policy.py       the policy file model (pydantic) and its error messages
  catalog.py      checks the policy against the live catalog and data before any write
  candidates.py   where a retention rule is evaluated: the SQL of its clock, statuses and holds
  matcher.py      the rows of a person in each mapped table (link or email): sweep, erasure, opt-out guard
  sweep.py        plan / apply (keyset batches) / archive purge of the weekly retention sweep
  erasure.py      erasure on request (locate, holds, erase, verify)
  propagation.py  the outbox towards downstream systems, and the erasure certificate
  requests.py     the request store: every kind of request, registered, run by id, extended, listed, purged
  optout.py       the hashed opt-out list: collect, resurrection guard, enforce, share, re-key
  crypto.py       keys, keyed hashes (chained on rotation), the AES-256-GCM archive cipher
  audit.py        the append-only audit log
  register.py     the register of processing activities (GDPR art. 30), generated from the policy
  schema.py       installs or upgrades the control schema (sql/gdpr_schema.sql); sqlfiles.py finds it
  errors.py       ConfigurationError (fail at once) and TransientError (retry): every engine exception is one
"""
