"""`warehouse-gdpr request new|extend` and `warehouse-gdpr requests`, as a gdpr_engine member through
$WAREHOUSE_URL, keys from the Airflow connection: the identifier only on stdin, never in the output."""

from __future__ import annotations

import io
import json
import os
from datetime import date, timedelta

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from warehouse_gdpr.cli import main
from warehouse_gdpr.engine import requests
from warehouse_gdpr.engine.crypto import Keys

TODAY = date.today()  # the CLI's today: the real one
EMAIL = "  Jane.Doe@ACME.example \n"


@pytest.fixture
def engine_url(airflow_conns: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """$WAREHOUSE_URL as the least-privileged gdpr_dag login (a gdpr_engine member); keys from
    AIRFLOW_CONN_GDPR_KEYS."""
    url = airflow_conns if os.environ.get("WAREHOUSE_TEST_URL") else make_conninfo(
        **{**conninfo_to_dict(airflow_conns), "user": "gdpr_dag"})  # type: ignore[arg-type]
    monkeypatch.setenv("WAREHOUSE_URL", url)
    return airflow_conns


def _new(monkeypatch: pytest.MonkeyPatch, *args: str, stdin: str = EMAIL) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(["request", "new", *args])


def _state(url: str) -> tuple[object, ...]:
    with psycopg.connect(url) as conn:
        return (conn.execute("SELECT * FROM gdpr.request ORDER BY request_id").fetchall(),
                conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0])  # type: ignore[index]


def test_request_new_reads_the_identifier_on_stdin(
    engine_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    received = TODAY - timedelta(days=3)
    assert _new(monkeypatch, "--kind", "erasure", "--request-id", "REQ-CLI-1",
                "--received-on", received.isoformat()) == 0
    out, err = capsys.readouterr()
    due = requests.due_date(received).isoformat()
    assert out == (f"Registered erasure request REQ-CLI-1: received {received.isoformat()}, due {due}.\n"
                   "Run it: airflow dags trigger gdpr_subject_erasure --conf '{\"request_id\": \"REQ-CLI-1\"}'\n")
    assert err == ""
    assert _new(monkeypatch, "--kind", "access", "--request-id", "REQ-CLI-2", stdin="subject_id:12") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Registered access request REQ-CLI-2: received {TODAY.isoformat()}, "
                          f"due {requests.due_date(TODAY).isoformat()}.\n")
    assert "Run it: airflow dags trigger gdpr_subject_access --conf '{\"request_id\": \"REQ-CLI-2\"}'" in out
    # a rectification: the corrections follow the identifier on stdin, one column=new value per line
    assert _new(monkeypatch, "--kind", "rectification", "--request-id", "REQ-CLI-3",
                stdin="subject_id:12\ndirect_phone= +33 1 23 45 67 89\n\nlast_name=Durand\n") == 0
    out = capsys.readouterr().out
    assert "Run it: airflow dags trigger gdpr_subject_rectification --conf '{\"request_id\": \"REQ-CLI-3\"}'" in out
    assert "45 67" not in out and "Durand" not in out
    with psycopg.connect(engine_url) as conn:
        rows = conn.execute("SELECT request_id, kind, status, received_at, identifier_ciphertext IS NOT NULL"
                            " FROM gdpr.request ORDER BY 1").fetchall()
    assert rows == [("REQ-CLI-1", "erasure", "registered", received, True),
                    ("REQ-CLI-2", "access", "registered", TODAY, True),
                    ("REQ-CLI-3", "rectification", "registered", TODAY, True)]
    keys = Keys.from_extra(json.loads(os.environ["AIRFLOW_CONN_GDPR_KEYS"])["extra"])
    with psycopg.connect(engine_url) as conn:
        registered = requests.load(conn, keys, "REQ-CLI-3", "rectification")
    assert registered.subject_id == 12
    assert registered.changes == {"direct_phone": "+33 1 23 45 67 89", "last_name": "Durand"}


@pytest.mark.parametrize(
    ("stdin", "message", "secret"),
    [
        ("subject_id:12\n", "`changes` must be an object of column -> new value", None),
        ("subject_id:12\ndirect_phone +33 1 23 45 67 89\n", "line 2 of stdin is not `column=new value`", "45 67"),
        ("subject_id:12\nstatus=client\n", "names column(s) the policy does not let a person rectify: `status`",
         "client"),
        ("subject_id:12\ndirect_phone=call me at home\n", "`changes.direct_phone` does not match", "call me"),
    ],
)
def test_request_new_refuses_bad_changes_without_echo_and_changes_nothing(
    engine_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    stdin: str, message: str, secret: str | None,
) -> None:
    before = _state(engine_url)
    assert _new(monkeypatch, "--kind", "rectification", "--request-id", "REQ-CLI-RECT", stdin=stdin) == 2
    out, err = capsys.readouterr()
    assert message in err and out == "" and "nothing was registered" in err
    if secret:
        assert secret not in err, "a refused value was echoed"
    assert _state(engine_url) == before


@pytest.mark.parametrize(
    ("args", "stdin", "code", "message", "secret"),
    [
        (["--kind", "jane.doe@acme.example"], EMAIL, 2, "unknown --kind: give one of access, portability", "jane.doe"),
        (["--kind", "erasure", "--received-on", "15/06/2026"], EMAIL, 2, "--received-on must be a date, YYYY-MM-DD",
         "15/06"),
        (["--kind", "erasure"], "", 2, "give the person's email (or subject_id:N) on stdin", None),
        (["--kind", "erasure"], "jane.doe@acme", 1, "the identifier is neither a plain ASCII email address",
         "jane.doe"),
        (["--kind", "erasure"], "j\u0430ne@acme.example", 1, "the identifier is neither", "ne@acme"),
        (["--kind", "erasure", "--received-on", (TODAY + timedelta(days=1)).isoformat()], EMAIL, 1,
         "the date of receipt is in the future", None),
    ],
)
def test_request_new_refuses_bad_input_and_changes_nothing(
    engine_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    args: list[str], stdin: str, code: int, message: str, secret: str | None,
) -> None:
    before = _state(engine_url)
    assert _new(monkeypatch, "--request-id", "REQ-CLI-BAD", *args, stdin=stdin) == code
    out, err = capsys.readouterr()
    assert err.startswith(message) and out == ""
    if secret:
        assert secret not in err, "a refused value was echoed"
    assert _state(engine_url) == before


@pytest.mark.parametrize(
    "extra", [["jane.doe@acme.example"], ["--email", "jane.doe@acme.example"], ["--email=jane.doe@acme.example"]],
    ids=["positional", "option", "option="],
)
def test_an_identifier_on_the_command_line_is_refused_without_echo(
    engine_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    """The email typed as an argument by mistake (argparse would quote it back on stderr): refused, not shown."""
    before = _state(engine_url)
    with pytest.raises(SystemExit) as info:
        _new(monkeypatch, "--kind", "erasure", "--request-id", "REQ-CLI-ARGV", *extra)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert "jane" not in out + err and "@" not in out + err
    assert f"error: {len(extra)} unrecognized argument(s), not shown" in err and "on stdin" in err
    assert _state(engine_url) == before


def test_request_new_refuses_a_bad_or_used_request_id(
    engine_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _new(monkeypatch, "--kind", "erasure", "--request-id", "REQ-CLI-1") == 0
    capsys.readouterr()
    before = _state(engine_url)
    assert _new(monkeypatch, "--kind", "access", "--request-id", "REQ-CLI-1", stdin="other@example.com") == 1
    assert capsys.readouterr().err.startswith(
        "request REQ-CLI-1 already exists (erasure, registered): nothing was changed")
    assert _new(monkeypatch, "--kind", "access", "--request-id", "jane@acme.example") == 1
    err = capsys.readouterr().err
    assert err.startswith("the request id must be 3-64 characters") and "jane" not in err
    assert _state(engine_url) == before


def test_request_new_needs_the_warehouse_and_the_policy(
    engine_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("WAREHOUSE_GDPR_POLICY")
    assert _new(monkeypatch, "--kind", "erasure", "--request-id", "REQ-CLI-1") == 2
    assert capsys.readouterr().err.startswith("give --policy (or set WAREHOUSE_GDPR_POLICY)")
    monkeypatch.delenv("WAREHOUSE_URL")
    assert main(["requests"]) == 2
    assert capsys.readouterr().err.startswith("set WAREHOUSE_URL (or give --url)")


def test_request_extend(engine_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    received = TODAY - timedelta(days=3)
    assert _new(monkeypatch, "--kind", "erasure", "--request-id", "REQ-CLI-1",
                "--received-on", received.isoformat()) == 0
    late = TODAY - timedelta(days=40)
    assert _new(monkeypatch, "--kind", "access", "--request-id", "REQ-CLI-LATE", "--received-on", late.isoformat()) == 0
    capsys.readouterr()

    first_due, new_due = requests.due_date(received), requests.add_months(received, 3)
    assert main(["request", "extend", "REQ-CLI-1", "--reason", "Twelve systems to search"]) == 0
    assert capsys.readouterr().out == (
        f"Request REQ-CLI-1 (erasure) extended: due {new_due.isoformat()} (was {first_due.isoformat()}). Tell the "
        f"person, with the reason, before {first_due.isoformat()} (GDPR art. 12(3)).\n")
    with psycopg.connect(engine_url) as conn:
        assert conn.execute("SELECT extended_due_date, extension_reason FROM gdpr.request"
                            " WHERE request_id = 'REQ-CLI-1'").fetchone() == (new_due, "Twelve systems to search")

    before = _state(engine_url)
    refused = [
        (["REQ-CLI-1", "--reason", "again"], "request REQ-CLI-1 was already extended on"),
        (["REQ-CLI-LATE", "--reason", "complex"],
         f"request REQ-CLI-LATE was due on {requests.due_date(late).isoformat()}: an extension is decided"),
        (["REQ-CLI-NONE", "--reason", "complex"], "no request REQ-CLI-NONE: nothing was changed"),
        (["REQ-CLI-LATE", "--reason", "Jane Doe, jane@acme.example " * 20], "the reason must be 1-500 characters"),
    ]
    for args, message in refused:
        assert main(["request", "extend", *args]) == 1, args
        out, err = capsys.readouterr()
        assert err.startswith(message) and out == "", err
        assert "Jane" not in err and "@" not in err
    assert _state(engine_url) == before


def test_requests_lists_every_request_without_personal_data(
    engine_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    late = TODAY - timedelta(days=40)
    assert _new(monkeypatch, "--kind", "erasure", "--request-id", "REQ-CLI-LATE",
                "--received-on", late.isoformat()) == 0
    assert _new(monkeypatch, "--kind", "access", "--request-id", "REQ-CLI-NEW", stdin="subject_id:3") == 0
    assert main(["request", "extend", "REQ-CLI-NEW", "--reason", "complex"]) == 0
    with psycopg.connect(engine_url) as conn:  # a completed erasure with its downstream targets
        conn.execute(
            "INSERT INTO gdpr.request (request_id, kind, subject_hash, received_at, due_date, status, outcome,"
            " completed_at) VALUES ('REQ-CLI-DONE', 'erasure', repeat('e', 64), '2026-01-05', '2026-02-05',"
            " 'completed', 'erased', '2026-01-20')")
        conn.execute("INSERT INTO gdpr.erasure_propagation (request_id, target, status) VALUES"
                     " ('REQ-CLI-DONE', 'emailing', 'acknowledged'), ('REQ-CLI-DONE', 'telephony', 'acknowledged')")
        hashes = [r[0] for r in conn.execute("SELECT subject_hash FROM gdpr.request").fetchall()]
    capsys.readouterr()

    assert main(["requests"]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split() == ["request", "kind", "status", "outcome", "received", "due", "days", "left", "extended",
                                "targets"]
    assert [line.split()[0] for line in lines[2:]] == ["REQ-CLI-LATE", "REQ-CLI-NEW", "REQ-CLI-DONE"]
    assert "OVERDUE" in lines[2] and "emailing: acknowledged, telephony: acknowledged" in lines[4]
    assert f"from {requests.due_date(TODAY).isoformat()}" in lines[3]

    assert main(["requests", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["request_id"], r["kind"], r["status"], r["outcome"]) for r in listed] == [
        ("REQ-CLI-LATE", "erasure", "registered", None), ("REQ-CLI-NEW", "access", "registered", None),
        ("REQ-CLI-DONE", "erasure", "completed", "erased")]
    late_row, new_row, done_row = listed
    assert late_row["due_date"] == requests.due_date(late).isoformat() and late_row["overdue"] is True
    assert late_row["days_left"] == (requests.due_date(late) - TODAY).days
    assert new_row["due_date"] == requests.add_months(TODAY, 3).isoformat() and new_row["extended"] is True
    assert done_row["targets"] == {"emailing": "acknowledged", "telephony": "acknowledged"}
    assert done_row["days_left"] is None

    assert main(["requests", "--open", "--json"]) == 0
    assert [r["request_id"] for r in json.loads(capsys.readouterr().out)] == ["REQ-CLI-LATE", "REQ-CLI-NEW"]
    assert main(["requests", "--overdue"]) == 0
    out = capsys.readouterr().out
    assert "REQ-CLI-LATE" in out and "REQ-CLI-NEW" not in out and "REQ-CLI-DONE" not in out

    printed = table + json.dumps(listed)
    assert "@" not in printed and "jane" not in printed.lower() and "complex" not in printed
    assert not any(h in printed for h in hashes)

