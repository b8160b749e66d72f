"""Issue 11.3: each broken policy that did damage on the demo is refused by `warehouse-gdpr policy check`
and by the sweep's first task, before any change; a runtime SQL error in the check is a clear message.

Each case is a change to include/policy.yaml (and, where the damage needs it, to the warehouse: a
warehouse without foreign keys, a column that is not the subject's key). The figures in the comments
are what the accepted policy did on the 10 000-contact demo before these checks.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from helpers import CRM_TABLES, table_checksum
from warehouse_gdpr.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "include" / "policy.yaml"
RUN_AFTER = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
AS_OF = "2026-06-15T00:00:00+00:00"
WATCHED = [*CRM_TABLES, "crm.support_tickets", "gdpr_archive.archived_row"]
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")

DROP_FOREIGN_KEYS = """
DO $$ DECLARE c record; BEGIN
  FOR c IN SELECT conrelid::regclass AS t, conname FROM pg_constraint
           WHERE contype = 'f' AND connamespace = 'crm'::regnamespace LOOP
    EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.t, c.conname);
  END LOOP;
END $$
"""


@dataclass(frozen=True)
class Broken:
    id: str
    mutate: Callable[[dict[str, Any]], None]
    message: str  # what the refusal says (a line of the CLI's stderr and of the first task's log)
    prepare: str = ""  # SQL run on the warehouse first, as its owner
    exit_code: int = 1  # 2: refused by the policy model, before any database is read


def _kinds_typo(d: dict[str, Any]) -> None:
    kinds = d["interactions"]["subject_initiated"]
    kinds[kinds.index("email_reply")] = "email_replied"


def _primary_key_everywhere(d: dict[str, Any]) -> None:
    d["subject"]["primary_key"] = "company_id"
    d["tables"][0].update(primary_key="company_id", subject_column="company_id")


BROKEN = [
    # 828 wrongful deletions: replies no longer restart the clock of people who only reply.
    Broken("kinds_typo", _kinds_typo,
           "interactions.subject_initiated: 'email_replied' occurs nowhere in crm.activities.kind (a typo?); "
           "if that is intended, list it under interactions.expect_absent"),
    # 2,368 expired former clients kept: the rule never fires.
    Broken("status_typo", lambda d: d["rules"][2]["statuses"].update(values=["former_clients"]),
           "rules[2].statuses.values: 'former_clients' occurs nowhere in crm.contacts.status"),
    # 3,402 wrongful deletions on a warehouse without foreign keys (61 under litigation, 1,117 with an
    # active contract): every colleague of an expired person's company goes with them.
    Broken("subject_primary_key_not_the_key", lambda d: d["subject"].update(primary_key="company_id"),
           "subject.primary_key (company_id) and the subject_column of crm.contacts in `tables` (contact_id) "
           "must name the same column", prepare=DROP_FOREIGN_KEYS, exit_code=2),
    Broken("primary_key_not_a_key", _primary_key_everywhere,
           "subject.primary_key: crm.contacts.company_id is not a key (no primary key, unique constraint or "
           "unique index on that column alone)", prepare=DROP_FOREIGN_KEYS),
    Broken("subject_column_references_another_table", lambda d: d["tables"][2].update(subject_column="company_id"),
           "tables[2].subject_column: crm.notes.company_id has a foreign key (notes_company_id_fkey) to "
           "crm.companies.company_id, not to the subject key crm.contacts.contact_id",
           prepare="ALTER TABLE crm.notes ADD COLUMN company_id bigint REFERENCES crm.companies;"
                   " UPDATE crm.notes n SET company_id = c.company_id FROM crm.contacts c"
                   " WHERE c.contact_id = n.contact_id"),
    Broken("subject_column_type", lambda d: d["tables"][2].update(subject_column="contact_ref"),
           "tables[2].subject_column: crm.notes.contact_ref is text, but the subject key crm.contacts.contact_id "
           "is bigint",
           prepare="ALTER TABLE crm.notes ADD COLUMN contact_ref text; UPDATE crm.notes SET contact_ref = contact_id"),
    # 218 support tickets of pseudonymised former clients left in clear.
    # (its requester email is also no rectifiable copy then: issue 14's rectification lists it)
    Broken("unmapped_table", lambda d: (d["tables"].pop(5), d["rectification"]["columns"]["email"].pop("copies")),
           "tables: crm.support_tickets has a foreign key (support_tickets_contact_id_fkey) to crm.contacts but is "
           "not mapped"),
    # The DAG disappeared at import.
    Broken("bad_schedule", lambda d: d["airflow"].update(sweep_schedule="every sunday"),
           "airflow.sweep_schedule: not a schedule Airflow accepts", exit_code=2),
    # Read as batch_size 1.
    Broken("batch_size_true", lambda d: d.update(batch_size=True), "batch_size: Input should be a valid integer",
           exit_code=2),
]


def _write(tmp_path: Path, case: Broken) -> Path:
    data = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    data = copy.deepcopy(data)
    case.mutate(data)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _prepare(url: str, case: Broken) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        if case.prepare:
            with conn.transaction():
                conn.execute(case.prepare)  # type: ignore[arg-type]
        return table_checksum(conn, WATCHED)


@pytest.mark.parametrize("case", BROKEN, ids=[c.id for c in BROKEN])
def test_policy_check_refuses_the_broken_policy(
    warehouse: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: Broken
) -> None:
    before = _prepare(warehouse, case)
    path = _write(tmp_path, case)

    code = main(["policy", "check", str(path), "--url", warehouse, "--as-of", AS_OF])

    out, err = capsys.readouterr()
    assert code == case.exit_code, out + err
    assert case.message in err
    assert str(path) in err
    assert "Traceback" not in err and not EMAIL.search(out + err)
    with psycopg.connect(warehouse) as conn:
        assert table_checksum(conn, WATCHED) == before


@pytest.mark.parametrize("case", BROKEN, ids=[c.id for c in BROKEN])
def test_the_sweeps_first_task_refuses_the_broken_policy(
    airflow_home: Path, airflow_conns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], case: Broken,
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    before = _prepare(airflow_conns, case)
    monkeypatch.setenv("WAREHOUSE_GDPR_POLICY", str(_write(tmp_path, case)))

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}, "a broken policy must not make a DAG disappear at import"
    dag = bag.get_dag("gdpr_retention_sweep")
    assert dag is not None
    with caplog.at_level(logging.INFO):
        dag_run = dag.test(run_after=RUN_AFTER, logical_date=RUN_AFTER)
    logs = "".join(capfd.readouterr()) + caplog.text

    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "failed"
    assert states["check_policy"] == "failed"
    assert states["apply"] == "upstream_failed"
    assert case.message in logs
    with psycopg.connect(airflow_conns) as conn:
        assert table_checksum(conn, WATCHED) == before
        assert conn.execute("SELECT count(*) FROM gdpr.audit_log").fetchone()[0] == 0  # type: ignore[index]


# -- a runtime SQL error in the check ------------------------------------------------------------


@pytest.mark.parametrize(
    ("predicate", "expected"),
    [
        # compiles (EXPLAIN), fails on the first row: the plan step evaluates the holds
        ("s.contact_id / (s.contact_id - s.contact_id) > 0", "DivisionByZero (SQLSTATE 22012)"),
        # the server's message would quote a person's email: only the error's class is printed
        ("s.email::int > 0", "InvalidTextRepresentation (SQLSTATE 22P02)"),
    ],
    ids=["division_by_zero", "error_quoting_a_value"],
)
def test_a_runtime_sql_error_in_the_check_is_a_clear_message(
    warehouse: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], predicate: str, expected: str
) -> None:
    path = _write(tmp_path, Broken("hold", lambda d: d["holds"][2].update(predicate=predicate), ""))

    assert main(["policy", "check", str(path), "--url", warehouse, "--as-of", AS_OF]) == 1

    out, err = capsys.readouterr()
    assert err.startswith(f"{path}: the check failed while counting what each rule would select")
    assert "nothing was changed" in err and expected in err
    assert "Traceback" not in err and not EMAIL.search(out + err)


def test_a_warehouse_that_cannot_be_reached_is_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "check", str(DEMO), "--url", "postgresql://nobody@127.0.0.1:1/none"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{DEMO}: the check failed while connecting to the warehouse; nothing was changed:")
    assert "Traceback" not in err


def test_policy_check_shows_each_rules_share_and_the_confirmation_a_sweep_needs(
    warehouse: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # As of the sweep's reference instant (test_dag_retention_sweep.py runs at RUN_AFTER): the same counts.
    assert main(["policy", "check", str(DEMO), "--url", warehouse, "--as-of", RUN_AFTER.isoformat()]) == 0
    out = capsys.readouterr().out
    assert "(1500 rows in crm.contacts)" in out and "% of table" in out
    assert ("Above blast_radius_percent (10 %): prospects_never_converted, leads_not_converted. A sweep stops before "
            'changing anything unless triggered with {"confirm_blast_radius": {"prospects_never_converted": 346, '
            '"leads_not_converted": 222}}') in out
