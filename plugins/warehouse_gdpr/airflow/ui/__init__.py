"""The GDPR page in the Airflow UI: an Airflow plugin (plugin.py) that mounts a FastAPI app (app.py) in the
api-server and adds a "GDPR" entry to the UI's navigation; the page's HTML (page.py). What it shows is
read by `warehouse_gdpr.engine.summary` (no Airflow there); this package adds Airflow's authentication,
links and rendering."""
