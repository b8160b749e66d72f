"""gdpr_subject_erasure airflow DAG: Erasure on request (trigger it with params: see docs/runbook.md).

Built by warehouse_gdpr.dags from the policy file ($WAREHOUSE_GDPR_POLICY).
"""

from warehouse_gdpr.dags import build_subject_erasure

dag = build_subject_erasure()
