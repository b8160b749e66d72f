"""warehouse-gdpr: GDPR retention, erasure and opt-out for a PostgreSQL warehouse, run by Airflow 3.

The folders are the architecture (docs/architecture.md says more):
  engine/      decides and changes data; never imports Airflow. Where a retention rule is evaluated:
               engine/candidates.py. The sweep: engine/sweep.py. Erasure: engine/erasure.py.
  transport/   the seam the engine calls for downstream systems (HTTP call, SQL statement); its
               Airflow adapters are airflow/transport.py (HttpHook, the connection's DB-API hook)
  airflow/     the Airflow layer: connections and keys, task bodies (tasks/), the DAG factory
  dags.py      the public `build_all(policy_file)` for a one-line dags file
  cli.py       the `warehouse-gdpr` command
  sql/         the control schema DDL (a link to include/sql in the repository; package data in a wheel)
The demo (seeded CRM, downstream services, embedded PostgreSQL) is the separate package
demo/warehouse_gdpr_demo, never in the wheel.
"""

__version__ = "0.1.0"
