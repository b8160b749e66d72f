"""The GDPR page's FastAPI app, served by the Airflow api-server under `URL_PREFIX` (plugin.py mounts it).

Authentication and authorisation are Airflow's own: the same dependencies as the api-server's core routes
(`airflow.api_fastapi.core_api.security`: the JWT of the `Authorization: Bearer` header or of the UI's
session cookie, checked by the configured auth manager), as the providers' UI plugins do (edge3).
  * `GET /`, `GET /api/summary`: any user Airflow authenticated; without a session: 401.
  * `POST /api/requests` (the form): only a user the auth manager allows to trigger the DAG of the
    request's kind (`is_authorized_dag(POST, RUN)`; for a kind no DAG runs yet, every DAG); otherwise 403.
    JSON only (a cross-site HTML form cannot send it without a CORS preflight, which this app never grants),
    from this origin when the browser says where it comes from.

The page reads the warehouse through the DAGs' own connection and policy ($WAREHOUSE_GDPR_POLICY), and
the form encrypts with the keys connection, as `warehouse-gdpr request new` does. No response, log line
or error carries the subject's address: a refused value is never echoed (FastAPI's own validation, which
quotes the input, is not used for the body).
"""

from __future__ import annotations

import json
import logging
from datetime import date, datetime, timezone
from typing import Annotated, Any
from urllib.parse import urlsplit

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.core_api.security import get_user
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from . import page

log = logging.getLogger(__name__)

URL_PREFIX = "/gdpr"
UI_DAG_ID = "warehouse-gdpr-ui"  # the audit log's dag_id for what the page writes (the CLI's is warehouse-gdpr)
MAX_BODY = 4096
BODY_FIELDS = {"kind", "request_id", "received_on", "identifier"}

User = Annotated[BaseUser, Depends(get_user)]


def base_path() -> str:
    """The Airflow UI's path ([api] base_url), without a trailing slash: '' at the root."""
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def prefix() -> str:
    return base_path() + URL_PREFIX


# -- reading -------------------------------------------------------------------------------------


def read_summary() -> dict[str, Any]:
    """The summary, through the DAGs' connection and policy. Raises ConfigurationError (no policy, no
    connection) or psycopg.Error."""
    from warehouse_gdpr.airflow import connections
    from warehouse_gdpr.engine import summary
    from warehouse_gdpr.engine.policy import load_policy

    policy = load_policy(connections.policy_path())
    with connections.connect(policy) as conn:
        conn.read_only = True
        # The heads the DAG runs export to the policy's evidence.location (the api-server needs access to it).
        return summary.summary(conn, policy, datetime.now(timezone.utc), connections.evidence_store(policy).latest)


def _failure(exc: Exception) -> str:
    """Why the summary could not be read, without anything a data error could quote."""
    import psycopg

    from warehouse_gdpr.engine.catalog import sql_error
    from warehouse_gdpr.engine.errors import ConfigurationError

    if isinstance(exc, psycopg.Error):
        return f"the warehouse could not be read: {sql_error(exc)}"
    if isinstance(exc, ConfigurationError):
        return str(exc)  # the engine's messages name files, settings and ids, never a person
    return f"the summary could not be read ({type(exc).__name__}); see the api-server log"


def may_trigger(user: BaseUser, dag_id: str | None) -> bool:
    """May `user` trigger `dag_id` (None: every DAG), as the auth manager decides for Airflow's own trigger."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    team = DagModel.get_team_name(dag_id) if dag_id else None
    return get_auth_manager().is_authorized_dag(method="POST", access_entity=DagAccessEntity.RUN,
                                                details=DagDetails(id=dag_id, team_name=team), user=user)


# -- the form ------------------------------------------------------------------------------------


class Refused(Exception):
    """A request the form refuses: HTTP status and a message that never quotes a submitted value."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_body(raw: bytes) -> dict[str, str]:
    """The form's JSON object, every field a string; Refused (400) otherwise, naming fields, never values."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Refused(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object")
    unknown = sorted(k for k in body if k not in BODY_FIELDS)
    if unknown:
        raise Refused(400, f"{len(unknown)} unknown field(s); the form sends {', '.join(sorted(BODY_FIELDS))}")
    bad = sorted(k for k, v in body.items() if v is not None and not isinstance(v, str))
    if bad:
        raise Refused(400, f"{', '.join(bad)} must be text")
    return {k: v for k, v in body.items() if isinstance(v, str)}


def _received_on(body: dict[str, str]) -> date:
    text = body.get("received_on", "").strip()
    if not text:
        return date.today()
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise Refused(400, "received_on must be a date, YYYY-MM-DD") from None


def register_and_trigger(body: dict[str, str], user: BaseUser) -> dict[str, Any]:
    """Check the permission, register the request (identifier encrypted), trigger the DAG of its kind with
    {"request_id": ID} alone and audit the trigger. Blocking: run it in a worker thread."""
    from warehouse_gdpr.engine import requests

    kind = body.get("kind", "")
    if kind not in requests.KINDS:
        raise Refused(400, f"unknown request kind: give one of {', '.join(requests.KINDS)}")
    dag_id = requests.DAG_FOR_KIND.get(kind)
    if not may_trigger(user, dag_id):
        raise Refused(403, "registering this request needs the permission to trigger "
                           + (dag_id or "the GDPR DAGs") + " in Airflow")
    received = _received_on(body)
    if not body.get("identifier", "").strip():
        raise Refused(400, "give the subject's email address")
    registered = _register(kind, body.get("request_id", ""), body["identifier"], received)
    out: dict[str, Any] = {"request_id": registered["request_id"], "kind": kind,
                           "received_at": registered["received_at"], "due_date": registered["due_date"],
                           "dag_id": dag_id, "run_id": None, "paused": None}
    if dag_id is None:
        out["message"] = (f"Registered {kind} request {out['request_id']}, due {out['due_date']}. No DAG of this "
                          "package runs this kind yet: handle it by hand and record its outcome.")
        return out
    return _trigger(out, user)


def _register(kind: str, request_id: str, identifier: str, received: date) -> dict[str, Any]:
    from warehouse_gdpr.airflow import connections
    from warehouse_gdpr.engine import requests
    from warehouse_gdpr.engine.audit import RunContext
    from warehouse_gdpr.engine.policy import load_policy

    policy = load_policy(connections.policy_path())
    keys = connections.load_keys(policy)
    ctx = RunContext(dag_id=UI_DAG_ID, run_id=f"ui__{datetime.now(timezone.utc).isoformat()}", task_id="request_new")
    with connections.connect(policy) as conn:
        try:
            return requests.register(conn, keys, ctx, kind=kind, request_id=request_id, identifier=identifier,
                                     received_at=received, today=date.today(),
                                     strip_plus_tags=policy.optout.strip_plus_tags)
        except requests.RequestStoreError as exc:
            raise Refused(400, str(exc)) from None  # names the request id and the rule, never the identifier


def _trigger(out: dict[str, Any], user: BaseUser) -> dict[str, Any]:
    """Trigger out['dag_id'] for the registered request, as Airflow's trigger does; audit which run."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.models.dag import DagModel
    from airflow.utils.types import DagRunTriggeredByType

    dag_id, request_id = out["dag_id"], out["request_id"]
    rerun = (f"airflow dags trigger {dag_id} --conf '{json.dumps({'request_id': request_id})}'")
    try:
        run = trigger_dag(dag_id, conf={"request_id": request_id}, triggered_by=DagRunTriggeredByType.UI,
                          triggering_user_name=user.get_name())
    except Exception as exc:  # noqa: BLE001 - any failure leaves a registered request to trigger by hand
        log.warning("Request %s registered; triggering %s failed (%s)", request_id, dag_id, type(exc).__name__)
        out["message"] = (f"Registered {out['kind']} request {request_id}, due {out['due_date']}, but {dag_id} could "
                          f"not be triggered ({type(exc).__name__}): run {rerun}")
        return out
    assert run is not None
    model = DagModel.get_current(dag_id)
    out["run_id"] = run.run_id
    out["paused"] = bool(model and model.is_paused)
    _audit_trigger(request_id, out["kind"], dag_id, run.run_id)
    out["message"] = (f"Registered {out['kind']} request {request_id}, due {out['due_date']}; triggered {dag_id} "
                      f"(run {run.run_id}) with the request id alone."
                      + (f" The DAG is paused: the run waits until {dag_id} is unpaused." if out["paused"] else ""))
    return out


def _audit_trigger(request_id: str, kind: str, dag_id: str, run_id: str) -> None:
    """Which DAG run the page started for the request (the page's link to it until the run writes its own)."""
    from warehouse_gdpr.airflow import connections
    from warehouse_gdpr.engine import audit
    from warehouse_gdpr.engine.audit import RunContext
    from warehouse_gdpr.engine.policy import load_policy

    policy = load_policy(connections.policy_path())
    ctx = RunContext(dag_id=UI_DAG_ID, run_id=f"ui__{datetime.now(timezone.utc).isoformat()}",
                     task_id="trigger_request")
    with connections.connect(policy) as conn, conn.transaction():
        audit.record(conn, ctx, action="trigger_request", outcome="queued",
                     details={"request_id": request_id, "kind": kind, "triggered_dag_id": dag_id,
                              "triggered_run_id": run_id})


def _same_origin(request: Request) -> bool:
    """A browser's Origin, when it sends one, is this server's own."""
    origin = request.headers.get("origin")
    if not origin:
        return True
    host = request.headers.get("x-forwarded-host") or request.headers.get("host", "")
    return urlsplit(origin).netloc == host


async def register_response(request: Request, user: BaseUser) -> JSONResponse:
    """`POST /api/requests`: 201 with what was registered and triggered; otherwise an error that names the
    field and the rule, never a submitted value."""
    try:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise Refused(415, "send the form as application/json")
        if not _same_origin(request):
            raise Refused(403, "cross-origin request refused")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise Refused(413, "the body is too large")
        result = await run_in_threadpool(register_and_trigger, parse_body(raw), user)
    except Refused as exc:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers={"Cache-Control": "no-store"})
    except Exception as exc:  # noqa: BLE001 - never a traceback or a value in the answer
        log.warning("The GDPR page could not register a request: %s", _failure(exc))
        return JSONResponse({"error": _failure(exc)}, status_code=503, headers={"Cache-Control": "no-store"})
    return JSONResponse(result, status_code=201, headers={"Cache-Control": "no-store"})


# -- the app -------------------------------------------------------------------------------------

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="currentColor" '
        'stroke-width="2" stroke-linecap="round" stroke-linejoin="round"><path d="M12 22s8-4 8-10V5l-8-3-8 3v7c0 '
        '6 8 10 8 10z"/><path d="M9 12l2 2 4-4"/></svg>')


def create_app() -> FastAPI:
    app = FastAPI(title="warehouse-gdpr", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def gdpr_page(user: User) -> HTMLResponse:
        from warehouse_gdpr.engine import requests

        try:
            data = await run_in_threadpool(read_summary)
        except Exception as exc:  # noqa: BLE001 - the page says what to fix
            log.warning("The GDPR page could not be read: %s", _failure(exc))
            return HTMLResponse(page.error_page(_failure(exc), prefix()), status_code=503, headers=SECURITY_HEADERS)
        can_register = await run_in_threadpool(may_trigger, user, requests.DAG_FOR_KIND.get("erasure"))
        html = page.render(data, base_path=base_path(), prefix=prefix(), kinds=list(requests.KINDS),
                           dag_for_kind=dict(requests.DAG_FOR_KIND), can_register=can_register)
        return HTMLResponse(html, headers=SECURITY_HEADERS)

    @app.get("/api/summary")
    async def api_summary(user: User) -> JSONResponse:
        try:
            data = await run_in_threadpool(read_summary)
        except Exception as exc:  # noqa: BLE001 - the answer says what to fix
            log.warning("The GDPR page's summary could not be read: %s", _failure(exc))
            return JSONResponse({"error": _failure(exc)}, status_code=503, headers={"Cache-Control": "no-store"})
        return JSONResponse(data, headers={"Cache-Control": "no-store"})

    @app.post("/api/requests")
    async def api_register(request: Request, user: User) -> JSONResponse:
        return await register_response(request, user)

    @app.get("/page.js")
    async def page_js(user: User) -> Response:
        return Response(page.SCRIPT, media_type="text/javascript", headers={"Cache-Control": "no-store"})

    @app.get("/icon.svg")
    async def icon() -> Response:
        return Response(ICON, media_type="image/svg+xml")

    return app
