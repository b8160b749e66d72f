"""gdpr_optout_sync airflow DAG: The hashed opt-out list, daily: collect, resurrection guard, enforce, share.

Built by warehouse_gdpr.dags from the policy file ($WAREHOUSE_GDPR_POLICY).
"""

from warehouse_gdpr.dags import build_optout_sync

dag = build_optout_sync()
