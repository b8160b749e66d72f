"""warehouse-gdpr: GDPR retention, erasure and opt-out for a PostgreSQL warehouse, run by Airflow 3.

Where things are:
  policy.py     the policy file model (tables, rules, holds) and its validation
  catalog.py    checks the policy against the live database before any write
  rules.py      the SQL that evaluates a retention rule (clock, status, holds): start here
  sweep.py      plan / apply / purge / report of the weekly retention sweep
  crypto.py     keys from the Airflow connection, keyed hashes (chained on rotation), AES-256-GCM archive cipher
  optout.py     the hashed opt-out list: collect, resurrection guard, enforce, share; is_suppressed
                and filter_suppressed for import pipelines (tasks: optout_tasks.py)
  audit.py      the append-only audit log
  schema.py     installs or upgrades the control schema and roles (sql/gdpr_schema.sql, shipped in the wheel)
  register.py   the register of processing activities (GDPR art. 30), generated from the policy
  erasure.py    erasure on request (locate, holds, erase, verify); propagation.py: downstream targets
  dags.py       the DAG factory (build_all); *_tasks.py: what each task does
  cli.py        the warehouse-gdpr command (policy schema|check, schema sql|install, register, subject-hash)
  demo_data.py  the seeded demo CRM generator
  embedded.py   the embedded PostgreSQL used by the demo and the tests
"""

__version__ = "0.1.0"
