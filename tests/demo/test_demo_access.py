"""The demo's downstream tools hold a history of each synced contact, and answer it whole to an access
request's GET by email: what `make demo` shows in the access report's "Held by the services we use"."""

from __future__ import annotations

import json
import urllib.request
from urllib.parse import quote

import psycopg

from warehouse_gdpr_demo import run

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, headers: dict[str, str]) -> dict:
    with DIRECT.open(urllib.request.Request(url, headers=headers), timeout=5) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def test_the_demo_sync_gives_each_tool_a_history_its_get_answers_by_email(warehouse: str, downstream) -> None:  # type: ignore[no-untyped-def]
    services = {"emailing_url": downstream.emailing.base_url, "telephony_url": downstream.telephony.base_url,
                "desk_url": downstream.desk_url}
    with psycopg.connect(warehouse) as conn:
        shared = run.share_with_downstream(conn, services, limit=3, api_key="test-api-key", token="test-token")
        email, first, last = conn.execute(
            "SELECT email, first_name, last_name FROM crm.contacts WHERE status IN ('prospect', 'lead', 'client')"
            " AND pseudonymised_at IS NULL ORDER BY contact_id LIMIT 1").fetchone()  # type: ignore[misc]
    assert shared == 3

    held = _get(f"{services['emailing_url']}/v3/contacts/{quote(email, safe='')}", {"api-key": "test-api-key"})
    assert held["email"] == email.strip().lower() and held["attributes"] == {"FIRSTNAME": first, "LASTNAME": last}
    assert held["statistics"]["messagesSent"] and held["statistics"]["opened"]
    calls = _get(f"{services['telephony_url']}/contacts/{quote(email, safe='')}",
                 {"Authorization": "Bearer test-token"})
    assert calls["name"] == f"{first} {last}" and calls["calls"][0]["direction"] == "outbound"
