"""gdpr_propagation_retry airflow DAG: Hourly retry of pending propagations (every kind) and deadline check.

Built by warehouse_gdpr.dags from the policy file ($WAREHOUSE_GDPR_POLICY).
"""

from warehouse_gdpr.dags import build_erasure_retry

dag = build_erasure_retry()
