"""gdpr_erasure_retry airflow DAG: the former id of gdpr_propagation_retry, kept for one release (deprecated).

Built by warehouse_gdpr.dags from the policy file ($WAREHOUSE_GDPR_POLICY). README, "Upgrading": unpause
gdpr_propagation_retry and pause this one; the next release removes it.
"""

from warehouse_gdpr.dags import build_erasure_retry

dag = build_erasure_retry(dag_id="gdpr_erasure_retry")
