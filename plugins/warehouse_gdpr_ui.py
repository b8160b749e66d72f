"""The GDPR page for an Airflow whose plugins folder is this `plugins/` directory (the docker compose
stack, `make ui`). Airflow imports every module of its plugins folder; the package itself is skipped
(.airflowignore). When the warehouse-gdpr wheel is installed too, its `airflow.plugins` entry point
registers the same plugin and this file stays silent (one plugin, no "already registered" error)."""

from importlib.metadata import entry_points

if not any(ep.name == "warehouse_gdpr" for ep in entry_points(group="airflow.plugins")):
    from warehouse_gdpr.airflow.ui.plugin import WarehouseGdprPlugin

    __all__ = ["WarehouseGdprPlugin"]
