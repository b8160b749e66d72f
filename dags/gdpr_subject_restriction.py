"""gdpr_subject_restriction airflow DAG: Restriction of processing on request, and its lift (GDPR art. 18).

Built by warehouse_gdpr.dags from the policy file ($WAREHOUSE_GDPR_POLICY).
"""

from warehouse_gdpr.dags import build_subject_restriction

dag = build_subject_restriction()
