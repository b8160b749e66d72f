"""gdpr_retention_sweep airflow DAG: The weekly retention sweep.

Built by warehouse_gdpr.dags from the policy file ($WAREHOUSE_GDPR_POLICY).
"""

from warehouse_gdpr.dags import build_retention_sweep

dag = build_retention_sweep()
