"""Public entry point of the DAG factory, kept at this path for the one-line dags file:

    # airflow dags of warehouse-gdpr
    from warehouse_gdpr.dags import build_all; globals().update(build_all("/opt/airflow/include/policy.yaml"))

The factory itself is `warehouse_gdpr.airflow.dag_factory`.
"""

from warehouse_gdpr.airflow.dag_factory import (
    build_all,
    build_erasure_retry,
    build_optout_sync,
    build_restore_replay,
    build_retention_sweep,
    build_subject_access,
    build_subject_erasure,
    build_subject_rectification,
    build_subject_restriction,
)

__all__ = ["build_all", "build_erasure_retry", "build_optout_sync", "build_restore_replay", "build_retention_sweep",
           "build_subject_access", "build_subject_erasure", "build_subject_rectification", "build_subject_restriction"]
