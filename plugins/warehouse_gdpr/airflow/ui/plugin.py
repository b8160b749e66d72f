"""The Airflow plugin of warehouse-gdpr: the GDPR page (a FastAPI app mounted by the api-server under
/gdpr) and its "GDPR" entry in the UI's navigation.

Registered twice, so that it works however the package is deployed: by the wheel's `airflow.plugins`
entry point (pyproject.toml), and by `plugins/warehouse_gdpr_ui.py` for an Airflow whose plugins folder is
this repository's `plugins/` (the docker compose stack, `make ui`), which defers to the entry point when the
wheel is installed too (one plugin, no "already registered" import error).

Importing this module is cheap (Airflow imports plugins in every component, and in task processes): the
FastAPI app, and with it the api-server's security dependencies, is built on the first request it serves.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

NAME = "warehouse_gdpr"
URL_PREFIX = "/gdpr"  # = app.URL_PREFIX, not imported from there to keep this module light
URL_ROUTE = "gdpr"  # the UI's own route for the page: <base_url>/plugin/gdpr


class LazyApp:
    """An ASGI app that builds the real one (app.create_app) when it first serves a request."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            from warehouse_gdpr.airflow.ui.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


def _base_path() -> str:
    from urllib.parse import urlsplit

    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


class WarehouseGdprPlugin(AirflowPlugin):
    """The GDPR page: open requests, sweeps, backlog, archive, suppression list, a chart, the request form."""

    name = NAME
    fastapi_apps = [{"name": "warehouse_gdpr", "app": LazyApp(), "url_prefix": URL_PREFIX}]
    external_views = [{
        "name": "GDPR",
        "href": f"{_base_path()}{URL_PREFIX}/",
        "url_route": URL_ROUTE,
        "destination": "nav",
        "nav_top_level": True,
        "icon": f"{_base_path()}{URL_PREFIX}/icon.svg",
    }]
