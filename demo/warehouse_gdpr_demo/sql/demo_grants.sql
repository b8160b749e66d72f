-- Demo only: the login role the demo's Airflow connection uses, and the privileges the engine needs
-- on the demo CRM. In production a DBA grants gdpr_engine the same on the mapped tables.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'gdpr_dag') THEN
        CREATE ROLE gdpr_dag LOGIN IN ROLE gdpr_engine;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA crm TO gdpr_engine;
GRANT SELECT, UPDATE, DELETE ON ALL TABLES IN SCHEMA crm TO gdpr_engine;
