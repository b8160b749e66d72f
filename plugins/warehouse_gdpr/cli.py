"""`warehouse-gdpr` command line, for use outside Airflow (CI, a DBA's shell).

    warehouse-gdpr policy schema                     JSON Schema of the policy file (editor completion, CI)
    warehouse-gdpr policy check POLICY [--url URL]   validate POLICY against a live warehouse; print what
                                                     each rule would select (counts only); changes nothing
    warehouse-gdpr schema sql                        print the control schema DDL shipped in the package
    warehouse-gdpr schema install [--url URL]        install or upgrade it (run as the warehouse owner)
    warehouse-gdpr subject-hash POLICY < email       the person's keyed hashes (audit log, suppression list);
                                                     reads the email on stdin, keys from the Airflow connection
    warehouse-gdpr register POLICY [--out DIR]       write the article 30 register (register.md and
                                                     register.html); fails while a required field is missing
    warehouse-gdpr audit verify [--url URL] [--policy POLICY | --evidence LOCATION] [--json]
                                                     recompute the audit log's hash chain and compare its end
                                                     with the head exported outside the warehouse; exit 0
                                                     when it holds, 1 naming the first broken row, 2 when
                                                     it could not be checked. Read rights suffice.

URL defaults to $WAREHOUSE_URL, which keeps a password out of the process list (`ps`) and shell history.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from warehouse_gdpr.engine.policy import Policy, PolicyError, load_policy

if TYPE_CHECKING:
    from warehouse_gdpr.engine.auditchain import StoragePath


def _schema(_: argparse.Namespace) -> int:
    print(json.dumps(Policy.model_json_schema(), indent=2))
    return 0


def _check(args: argparse.Namespace) -> int:
    import psycopg

    from warehouse_gdpr.engine import catalog, sweep

    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    from warehouse_gdpr.engine import register

    for problem in register.problems(policy):
        print(f"warning: register: {problem}")
    url = args.url or os.environ.get("WAREHOUSE_URL")
    if not url:
        print(f"{args.policy}: valid. Give --url (or set WAREHOUSE_URL) to check it against a warehouse.")
        return 0
    as_of = args.as_of or datetime.now(timezone.utc).isoformat()
    step = "connecting to the warehouse"
    try:
        with psycopg.connect(url) as conn:
            conn.read_only = True  # a check never writes
            step = "checking the policy against the warehouse"
            try:
                report = catalog.check_policy(conn, policy)
            except catalog.CatalogError as exc:
                print(f"{args.policy}: {exc}", file=sys.stderr)
                return 1
            step = "counting what each rule would select (holds and clocks are evaluated here)"
            plans = sweep.plan(conn, policy, policy.rules, as_of)
            rows = sweep.subject_rows(conn, policy)
    except psycopg.Error as exc:
        # A runtime SQL error (a hold that divides by zero, a timeout, a revoked grant): no traceback, and
        # no value a data error could quote.
        print(f"{args.policy}: the check failed while {step}; nothing was changed: {catalog.sql_error(exc)}",
              file=sys.stderr)
        return 1
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(f"{args.policy}: matches the warehouse ({report.tables} tables, {report.columns} personal columns).")
    print(f"What each rule would select as of {as_of} ({rows} rows in {policy.subject.table}):")
    print(sweep.format_table(
        ["rule", "action", "candidates", "held", "to process", "% of table"],
        [[p.rule, p.action, p.candidates, p.held, p.candidates - p.held,
          f"{100 * (p.candidates - p.held) / rows:.1f}" if rows else "-"] for p in plans],
    ))
    over = sweep.blast_radius({p.rule: p.candidates - p.held for p in plans}, rows, policy.blast_radius_percent)
    if over:
        confirm = json.dumps({"confirm_blast_radius": {b.rule: b.to_process for b in over}})
        print(f"Above blast_radius_percent ({policy.blast_radius_percent:g} %): {', '.join(b.rule for b in over)}. "
              f"A sweep stops before changing anything unless triggered with {confirm}")
    return 0


def _schema_sql(_: argparse.Namespace) -> int:
    from warehouse_gdpr.engine.sqlfiles import read_sql

    print(read_sql("gdpr_schema.sql"))
    return 0


def _schema_install(args: argparse.Namespace) -> int:
    import psycopg

    from warehouse_gdpr.engine import schema

    url = args.url or os.environ.get("WAREHOUSE_URL")
    if not url:
        print("give --url (or set WAREHOUSE_URL): the warehouse, as its owner or a DBA role", file=sys.stderr)
        return 2
    with psycopg.connect(url) as conn:
        try:
            ran = schema.ensure_schema(conn)
        except schema.SchemaError as exc:
            print(exc, file=sys.stderr)
            return 1
    print(f"control schema version {schema.SCHEMA_VERSION} " + ("installed." if ran else "already installed."))
    return 0


def _subject_hash(args: argparse.Namespace) -> int:
    """Keyed hashes of one email read on stdin (never an argument: it would land in shell history)."""
    from warehouse_gdpr.airflow import connections
    from warehouse_gdpr.engine.crypto import KeyConfigError

    try:
        policy = load_policy(args.policy)
        keys = connections.load_keys(policy)
    except (PolicyError, KeyConfigError, RuntimeError) as exc:
        print(exc, file=sys.stderr)
        return 2
    email = sys.stdin.readline().strip()
    if "@" not in email:
        print("give the email on stdin, e.g.: read -rs EMAIL; printf '%s' \"$EMAIL\" | warehouse-gdpr "
              "subject-hash POLICY", file=sys.stderr)
        return 2
    for key_id, value in keys.subject_hashes(email, policy.optout.strip_plus_tags).items():
        current = " (current)" if key_id == keys.hmac_key_id else ""
        print(f"{key_id}\t{value}{current}")
    return 0


def _register(args: argparse.Namespace) -> int:
    from warehouse_gdpr.engine import register

    try:
        policy = load_policy(args.policy)
        rendered = register.render(policy, args.date or date.today(), Path(args.policy).name)
    except PolicyError as exc:
        print(exc, file=sys.stderr)  # already names the file
        return 2
    except register.RegisterIncomplete as exc:
        print(f"{args.policy}: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else register.output_dir(policy, Path.cwd())
    try:
        files = register.write(rendered, out)
    except OSError as exc:
        print(f"cannot write the register under {out}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"Register of processing activities ({files.activities} activities):")
    print(f"  {files.markdown}\n  {files.html}\n  sha256 {files.sha256}")
    return 0


def _evidence_root(args: argparse.Namespace) -> tuple[StoragePath | None, str]:
    """Where the exported chain heads are: --evidence (a folder, relative to the current directory, or an
    ObjectStoragePath URL), else the policy's evidence.location (relative: under $AIRFLOW_HOME, as the
    DAGs resolve it). (None, why) without either."""
    location = args.evidence
    if location is None and args.policy:
        from warehouse_gdpr.airflow.connections import airflow_home

        location = load_policy(args.policy).evidence.location
        if "://" not in location and not Path(location).expanduser().is_absolute():
            location = str(airflow_home() / location)
    if location is None:
        return None, "no --policy or --evidence given"
    if "://" in location:
        from airflow.sdk import ObjectStoragePath

        return ObjectStoragePath(location), location
    return Path(location).expanduser(), location


def _audit_verify(args: argparse.Namespace) -> int:
    import psycopg

    from warehouse_gdpr.engine import auditchain
    from warehouse_gdpr.engine.catalog import sql_error

    url = args.url or os.environ.get("WAREHOUSE_URL")
    if not url:
        print("give --url (or set WAREHOUSE_URL): the warehouse, as any role that may read gdpr.audit_log "
              "(gdpr_auditor suffices)", file=sys.stderr)
        return 2
    try:
        root, where = _evidence_root(args)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    store = auditchain.PathHeadStore(root) if root is not None else None
    try:
        with psycopg.connect(url) as conn:
            conn.read_only = True  # verifying never writes
            chain_id = auditchain.read_head(conn).chain_id
            conn.rollback()
            exported = store.latest(chain_id) if store else None
            result = auditchain.verify(conn, exported=exported)
    except auditchain.ChainUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        print(f"the audit chain could not be read: {sql_error(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"the exported heads at {where} could not be read ({type(exc).__name__}: {exc.strerror or exc})",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result.as_dict(), "evidence": where if store else None}, indent=2))
    else:
        if store is None:
            head_note = f"Not compared with an exported head ({where}): a truncated tail cannot be seen."
        elif exported is None:
            head_note = (f"No head of chain {chain_id} was exported to {where} yet: a truncated tail cannot be seen "
                         "(every DAG run exports one when it ends).")
        else:
            head_note = f"Compared with the last head exported to {where}: {exported.describe()}."
        if result.ok:
            print(f"The audit chain {chain_id} holds: {result.rows_checked} row(s) recomputed, positions 1 to "
                  f"{result.last.chain_seq} (last audit id {result.last.audit_id}, hash {result.last.row_hash}).")
        print(head_note)
    if result.broken is not None:
        print(f"The audit chain {chain_id} is BROKEN at {result.broken.describe()} "
              f"({result.rows_checked} row(s) before it hold).", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="warehouse-gdpr", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    policy = commands.add_parser("policy", help="work with a policy file").add_subparsers(dest="action", required=True)
    policy.add_parser("schema", help="print the JSON Schema of the policy file").set_defaults(run=_schema)
    check = policy.add_parser("check", help="validate a policy file, optionally against a live warehouse")
    check.add_argument("policy", help="path to the policy YAML file")
    check.add_argument("--url", help="libpq URL of the warehouse (default: $WAREHOUSE_URL)")
    check.add_argument("--as-of", help="ISO instant the clocks are measured against (default: now)")
    check.set_defaults(run=_check)
    ddl = commands.add_parser("schema", help="the control schema (gdpr, gdpr_archive, roles)").add_subparsers(
        dest="action", required=True)
    ddl.add_parser("sql", help="print the DDL, for a DBA to review or run").set_defaults(run=_schema_sql)
    install = ddl.add_parser("install", help="install or upgrade the control schema (idempotent)")
    install.add_argument("--url", help="libpq URL of the warehouse as its owner (default: $WAREHOUSE_URL)")
    install.set_defaults(run=_schema_install)
    hashes = commands.add_parser("subject-hash", help="a person's keyed hashes, to search the audit log")
    hashes.add_argument("policy", help="path to the policy YAML file (names the keys connection)")
    hashes.set_defaults(run=_subject_hash)
    reg = commands.add_parser("register", help="write the register of processing activities (GDPR art. 30)")
    reg.add_argument("policy", help="path to the policy YAML file")
    reg.add_argument("--out", help="output directory (default: processing_register.output_dir, under the current "
                                   "directory)")
    reg.add_argument("--date", type=date.fromisoformat, help="date printed as generation date (default: today)")
    reg.set_defaults(run=_register)
    audit_log = commands.add_parser("audit", help="the audit log's evidence").add_subparsers(
        dest="action", required=True)
    verify = audit_log.add_parser("verify", help="recompute the audit log's hash chain (read rights suffice)")
    verify.add_argument("--url", help="libpq URL of the warehouse, e.g. as a gdpr_auditor member "
                                      "(default: $WAREHOUSE_URL)")
    where = verify.add_mutually_exclusive_group()
    where.add_argument("--policy", help="the policy file: its evidence.location holds the exported heads")
    where.add_argument("--evidence", help="the exported heads' location: a folder or an ObjectStoragePath URL")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(run=_audit_verify)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
