"""gdpr_subject_access airflow DAG: the right of access and portability (trigger it with params: see docs/runbook.md).

Built by warehouse_gdpr.dags from the policy file ($WAREHOUSE_GDPR_POLICY).
"""

from warehouse_gdpr.dags import build_subject_access

dag = build_subject_access()
