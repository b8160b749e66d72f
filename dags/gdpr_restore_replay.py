"""gdpr_restore_replay airflow DAG: after a restore of the warehouse from a backup, erase again the people erased
since (and suppress, restrict, lift again), from the journal kept outside the warehouse.

Built by warehouse_gdpr.dags from the policy file ($WAREHOUSE_GDPR_POLICY).
"""

from warehouse_gdpr.dags import build_restore_replay

dag = build_restore_replay()
