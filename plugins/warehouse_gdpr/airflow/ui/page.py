"""The GDPR page's HTML, from `engine.summary.summary`: tables, an inline SVG chart, the request form.

Server-rendered, every value escaped; no script but the page's own `page.js` (the form), no external
resource (no CDN): the page works on an air-gapped Airflow. It shows what the summary holds and nothing
else: ids, dates, counts, policy names; never personal data.
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

ACTION_LABELS = {
    "delete": "deleted (retention)",
    "pseudonymise": "pseudonymised",
    "archive": "archived",
    "purge_archive": "archive purged",
    "erase": "erased (requests)",
}
ACTION_COLOURS = {
    "delete": "#c0392b",
    "pseudonymise": "#2874a6",
    "archive": "#7d3c98",
    "purge_archive": "#7f8c8d",
    "erase": "#d68910",
}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 16px 24px; color: #1a202c;
       background: #fff; font-size: 14px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
h3 { font-size: 14px; margin: 14px 0 6px; }
.muted { color: #5f6b7a; } .error { color: #b00020; }
table { border-collapse: collapse; margin: 4px 0 8px; }
th, td { border-bottom: 1px solid #e2e8f0; padding: 4px 10px; text-align: left; vertical-align: top;
         white-space: nowrap; }
th { background: #f7fafc; font-weight: 600; } td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.overdue, .overdue a { color: #c53030; font-weight: 700; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { border: 1px solid #e2e8f0; border-radius: 6px; padding: 10px 14px; min-width: 150px; }
.card b { display: block; font-size: 20px; }
form.register { display: grid; grid-template-columns: max-content 260px; gap: 6px 10px; align-items: center; }
form.register button { grid-column: 2; justify-self: start; padding: 4px 14px; }
#register-result { margin-top: 8px; white-space: pre-wrap; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
"""


def _e(value: object) -> str:
    return escape("-" if value is None else str(value))


def _when(instant: str) -> str:
    """An ISO instant (UTC) to the minute's second, as `2026-12-03 01:05:36`."""
    return escape(instant[:19].replace("T", " "))


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] | None = None,
           row_classes: list[str] | None = None) -> str:
    """A table of already-escaped cells."""
    numeric = numeric or set()
    head = "".join(f'<th{" class=n" if i in numeric else ""}>{escape(h)}</th>' for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        cells = "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>' for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _by_hold(counts: dict[str, Any]) -> str:
    return ", ".join(f"{_e(k)}: {_e(v)}" for k, v in sorted(counts.items()))


def run_url(base_path: str, dag_id: str, run_id: str) -> str:
    """The Airflow 3 UI's page of one DAG run."""
    return f"{base_path}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def _requests(data: dict[str, Any], base_path: str) -> str:
    reqs = data["requests"]
    if not reqs["open"]:
        return "<p>No open request.</p>"
    rows, classes = [], []
    for r in reqs["open"]:
        days = r["days_left"]
        left = f"{_e(days)} (overdue by {-days} d)" if r["overdue"] else _e(days)
        targets = "<br>".join(
            f"{_e(name)}: {_e(t['status'])} ({_e(t['attempts'])} attempt{'s' if t['attempts'] != 1 else ''})"
            for name, t in sorted(r["targets"].items())) or "-"
        run = r.get("dag_run")
        link = (f'<a target="_top" href="{escape(run_url(base_path, run["dag_id"], run["run_id"]))}">'
                f'{_e(run["dag_id"])}</a>' if run else "not run yet")
        rows.append([_e(r["request_id"]), _e(r["kind"]), _e(r["status"]), _e(r["received_at"]), _e(r["due_date"]),
                     left, f"from {_e(r['first_due_date'])}" if r["extended"] else "-", targets, link])
        classes.append("overdue" if r["overdue"] else "")
    return _table(["Request", "Kind", "Status", "Received", "Due", "Days left", "Extension", "Targets",
                   "DAG run"], rows, {5}, classes)


def _sweeps(data: dict[str, Any]) -> str:
    if not data["sweeps"]:
        return "<p>No sweep has finished yet.</p>"
    parts = []
    for run in data["sweeps"]:
        parts.append(f"<h3>{_e(run['run_id'])} <span class=muted>finished {_when(run['finished_at'])} UTC, "
                     f"{run['seconds']:.0f} s</span></h3>")
        rows = [[_e(r["rule"]), _e(r["action"]), _e(r["deleted"]), _e(r["pseudonymised"]), _e(r["rows_changed"]),
                 _e(r["held"]), _by_hold(r["held_by_hold"]) or "-", _e(r["archived"]), f"{r['seconds']:.1f}"]
                for r in run["rules"]]
        parts.append(_table(["Rule", "Action", "Deleted", "Pseudonymised", "Rows changed", "Held",
                             "Held by hold (planned)", "Archived rows", "Seconds"], rows, {2, 3, 4, 5, 7, 8}))
    return "".join(parts)


def _backlog(data: dict[str, Any]) -> str:
    backlog = data["backlog"]
    if backlog.get("error"):
        return f'<p class="error">The backlog could not be computed: {_e(backlog["error"])}</p>'
    rows = [[_e(r["rule"]), _e(r["action"]), _e(r["candidates"]), _e(r["held"]),
             _by_hold(r["held_by_hold"]) or "-", _e(r["to_process"])] for r in backlog["rules"]]
    return (f"<p class=muted>Subjects past their retention date as of {_when(backlog['as_of'])} UTC, "
            "which the next sweep treats unless a hold keeps them.</p>"
            + _table(["Rule", "Action", "Past their date", "Held", "Held by hold", "Next sweep treats"], rows,
                     {2, 3, 5}))


def _cards(data: dict[str, Any]) -> str:
    archive, supp, reqs = data["archive"], data["suppression"], data["requests"]
    cards = [("Open requests", reqs["open_count"]), ("Overdue", reqs["overdue_count"]),
             ("Archived rows", archive["rows"]), ("Next archive purge", archive["next_purge"] or "-"),
             ("Suppression list", supp["entries"])]
    chain = data.get("audit_chain")
    if chain is not None:
        cards.append(("Audit chain", chain["status"].replace("_", " ")))
    alarming = {"Overdue": lambda v: bool(v), "Audit chain": lambda v: v in ("broken", "unavailable")}
    items = "".join(f'<div class="card{" overdue" if alarming.get(label, lambda v: False)(value) else ""}">'
                    f"{escape(label)}<b>{_e(value)}</b></div>" for label, value in cards)
    return f'<div class="cards">{items}</div>'


def _archive_and_list(data: dict[str, Any]) -> str:
    archive, supp = data["archive"], data["suppression"]
    rows = [[_e(t), _e(v["rows"]), _e(v["next_purge"])] for t, v in archive["by_table"].items()]
    out = "<h2>Archive</h2>" + (_table(["Source table", "Rows", "Next purge"], rows, {1}) if rows
                                else "<p>The archive is empty.</p>")
    out += "<h2>Suppression list</h2>" + (
        _table(["Reason", "Entries"], [[_e(k), _e(v)] for k, v in supp["by_reason"].items()], {1})
        if supp["by_reason"] else "<p>The suppression list is empty.</p>")
    return out


def _chain(chain: dict[str, Any] | None) -> str:
    """The audit chain's state; nothing when the audit log is not chained (control schema before 8)."""
    if chain is None:
        return ""
    cls = ' class="overdue"' if chain["status"] in ("broken", "unavailable") else ""
    return (f"<h2>Audit chain</h2><p{cls}>{_e(chain['description'])}</p>"
            f"<p class=muted>The database's head: position {_e(chain['position'])} (audit id {_e(chain['audit_id'])}). "
            "Every DAG run ends by recomputing the rows since the head the previous run exported, and exports "
            "its own.</p>")


def chart_svg(weekly: dict[str, Any], width: int = 900, height: int = 220) -> str:
    """Rows treated per week by action: stacked bars, one per week, oldest on the left. Inline SVG."""
    weeks: list[str] = weekly["weeks"]
    actions = [a for a in ACTION_LABELS if a in weekly["actions"]]
    totals = [sum(weekly["actions"][a][i] for a in actions) for i in range(len(weeks))]
    top = max(totals, default=0) or 1
    left, plot_h = 56, height - 30
    step = (width - left - 10) / max(len(weeks), 1)
    bars = []
    for i, week in enumerate(weeks):
        y = plot_h
        for action in actions:
            n = weekly["actions"][action][i]
            if not n:
                continue
            h = max(n / top * (plot_h - 10), 1.0)
            y -= h
            bars.append(f'<rect x="{left + i * step + 1:.1f}" y="{y:.1f}" width="{max(step - 2, 1):.1f}" '
                        f'height="{h:.1f}" fill="{ACTION_COLOURS[action]}"><title>week of {escape(week)}: '
                        f"{n} rows {escape(ACTION_LABELS[action])}</title></rect>")
    ticks = [f'<text x="{left + i * step:.1f}" y="{height - 4}" font-size="10" fill="#5f6b7a">{escape(w[:7])}</text>'
             for i, w in enumerate(weeks) if i % 8 == 0]
    axis = (f'<line x1="{left}" y1="{plot_h}" x2="{width - 10}" y2="{plot_h}" stroke="#a0aec0"/>'
            f'<text x="{left - 6}" y="14" font-size="10" text-anchor="end" fill="#5f6b7a">{top:,}</text>'
            f'<text x="{left - 6}" y="{plot_h}" font-size="10" text-anchor="end" fill="#5f6b7a">0</text>')
    legend = "".join(f'<span><i style="background:{ACTION_COLOURS[a]}"></i>{escape(ACTION_LABELS[a])}</span>'
                     for a in actions)
    return (f'<svg id="weekly-chart" role="img" aria-label="Rows treated per week over the last year, by action" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
            f'{axis}{"".join(bars)}{"".join(ticks)}</svg><div class="legend">{legend}</div>')


def _form(kinds: list[str], dag_for_kind: dict[str, str], can_register: bool, today: str) -> str:
    if not can_register:
        return ("<p class=muted>Registering a request needs the permission to trigger the GDPR DAGs "
                "(Airflow's auth manager); ask your Airflow administrator.</p>")
    options = "".join(f'<option value="{escape(k)}"{" selected" if k == "erasure" else ""}>{escape(k)}'
                      f'{"" if k in dag_for_kind else " (registered only: no DAG runs it yet)"}</option>'
                      for k in kinds)
    return f"""
<p class=muted>Stores the request the way <code>warehouse-gdpr request new</code> does: the address is encrypted in
the warehouse, never shown again, and the DAG of its kind is triggered with the request id alone, so the address
never enters the run's configuration. Every kind has a due date one month after receipt.</p>
<form class="register" id="register-form" autocomplete="off">
  <label for="kind">Kind</label><select id="kind" name="kind">{options}</select>
  <label for="request_id">Request id</label>
  <input id="request_id" name="request_id" required minlength="3" maxlength="64"
         pattern="[A-Za-z0-9._:\\-]{{3,64}}" placeholder="REQ-2026-0042">
  <label for="received_on">Received on</label><input id="received_on" name="received_on" type="date" value="{today}">
  <label for="identifier">Subject's email</label>
  <input id="identifier" name="identifier" type="email" required maxlength="254" spellcheck="false">
  <button type="submit" id="register-submit">Register and run</button>
</form>
<div id="register-result" role="status"></div>"""


def render(data: dict[str, Any], *, base_path: str, prefix: str, kinds: list[str], dag_for_kind: dict[str, str],
           can_register: bool) -> str:
    """The whole page. `base_path`: the Airflow UI's path (links to DAG runs); `prefix`: the plugin's."""
    chain_html = _chain(data.get("audit_chain"))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>GDPR</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body data-prefix="{escape(prefix)}">
<h1>GDPR</h1>
<p class=muted>warehouse-gdpr, as of {_when(data["generated_at"])} UTC. No personal data: request ids, dates and
counts only. The same data as JSON: <a href="{escape(prefix)}/api/summary">{escape(prefix)}/api/summary</a>.</p>
{_cards(data)}
<h2>Open requests</h2>{_requests(data, base_path)}
<h2>Last sweeps</h2>{_sweeps(data)}
<h2>Retention backlog now</h2>{_backlog(data)}
{_archive_and_list(data)}{chain_html}
<h2>Rows treated per week, last year</h2>{chart_svg(data["weekly"])}
<h2>Register a request</h2>{_form(kinds, dag_for_kind, can_register, data["today"])}
<script src="{escape(prefix)}/page.js"></script>
</body></html>"""


def error_page(message: str, prefix: str) -> str:
    """The page when the summary cannot be read (no policy, no connection): what to fix, nothing else."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>GDPR</title><style>{STYLE}</style>'
            f'</head><body><h1>GDPR</h1><p class="error">{_e(message)}</p>'
            f'<p class=muted>JSON: {escape(prefix)}/api/summary</p></body></html>')


SCRIPT = """
(function () {
  var form = document.getElementById("register-form");
  if (!form) { return; }
  var prefix = document.body.getAttribute("data-prefix");
  var result = document.getElementById("register-result");
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var body = {kind: form.kind.value, request_id: form.request_id.value.trim(),
                received_on: form.received_on.value, identifier: form.identifier.value};
    result.className = ""; result.textContent = "Registering...";
    fetch(prefix + "/api/requests", {method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})
      .then(function (answer) { return answer.json().then(function (data) { return [answer.ok, data]; }); })
      .then(function (pair) {
        var ok = pair[0], data = pair[1];
        result.className = ok ? "" : "error";
        result.textContent = ok ? data.message : (data.error || data.detail || "refused");
        if (ok) { form.identifier.value = ""; form.request_id.value = ""; }
      })
      .catch(function () { result.className = "error"; result.textContent = "The request could not be sent."; });
  });
})();
"""
