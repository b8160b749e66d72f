"""gdpr_subject_rectification airflow DAG: Rectification on request (GDPR art. 16; params: see docs/runbook.md).

Built by warehouse_gdpr.dags from the policy file ($WAREHOUSE_GDPR_POLICY).
"""

from warehouse_gdpr.dags import build_subject_rectification

dag = build_subject_rectification()
