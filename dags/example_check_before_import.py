"""example_check_before_import: drop suppressed people from a staging table before they land.

The "check before import" pattern for any ingestion DAG (CRM import, form sync, bought list): load the
raw rows into a staging table, then in ONE transaction
  1. `optout.filter_suppressed` deletes every staged row whose email's keyed hash is on the
     suppression list: people who opted out, and people erased earlier, who must not come back;
  2. the remaining rows are inserted into the target table and the staging table is emptied.
The staging table is locked meanwhile, so no row slips in between the check and the load.

The loader's database role needs SELECT on gdpr.suppression_list (`GRANT gdpr_list_reader TO
<loader>`), DELETE on the staging table and INSERT on the target; the task also reads the keys
connection (the pepper), because only the keyed hashes can be compared. Logs carry counts only.
This example assumes a staging table with the target's columns (`CREATE TABLE staging.contact_import
(LIKE crm.contacts)`); a real pipeline writes its own INSERT ... SELECT.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task

QUALIFIED = r"^[a-z_][a-z0-9_]{0,62}\.[a-z_][a-z0-9_]{0,62}$"
log = logging.getLogger(__name__)


@dag(
    dag_id="example_check_before_import",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["gdpr", "opt-out", "example"],
    params={
        "connection_id": Param("warehouse", type="string", title="Connection",
                               description="Airflow connection of the loader (a PostgreSQL database)."),
        "staging_table": Param("staging.contact_import", type="string", pattern=QUALIFIED, title="Staging table",
                               description="schema.table holding the rows to import."),
        "email_column": Param("email", type="string", pattern=r"^[a-z_][a-z0-9_]{0,62}$", title="Email column",
                              description="The staging table's email column."),
        "target_table": Param("crm.contacts", type="string", pattern=QUALIFIED, title="Target table",
                              description="schema.table the remaining rows are inserted into."),
    },
    doc_md=__doc__,
)
def example_check_before_import() -> None:
    @task
    def import_without_suppressed() -> dict:
        import psycopg
        from airflow.providers.postgres.hooks.postgres import PostgresHook
        from psycopg import sql

        from warehouse_gdpr.airflow import connections as runtime
        from warehouse_gdpr.engine import optout
        from warehouse_gdpr.engine.policy import load_policy

        params = get_current_context()["params"]
        staging, target = params["staging_table"], params["target_table"]
        for name in (staging, target):
            if not re.fullmatch(QUALIFIED, name):
                raise ValueError("table names must be schema.table in lower case")
        policy = load_policy(runtime.policy_path())
        keys = runtime.load_keys(policy)
        conn = PostgresHook(postgres_conn_id=params["connection_id"]).get_conn()
        assert isinstance(conn, psycopg.Connection)
        with conn, conn.transaction():
            counts = optout.filter_suppressed(conn, keys, staging, params["email_column"],
                                              strip_plus_tags=policy.optout.strip_plus_tags)
            loaded = conn.execute(sql.SQL("INSERT INTO {t} SELECT * FROM {s}").format(
                t=sql.Identifier(*target.split(".")), s=sql.Identifier(*staging.split(".")))).rowcount
            conn.execute(sql.SQL("DELETE FROM {s}").format(s=sql.Identifier(*staging.split("."))))
        log.info("Import: %d staged row(s) with an email checked, %d suppressed person(s) dropped, %d row(s) loaded.",
                 counts["checked"], counts["dropped"], loaded)
        return {**counts, "loaded": loaded}

    import_without_suppressed()


example_check_before_import()
