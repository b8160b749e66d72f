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
    warehouse-gdpr access unpack REQUEST_ID --out DIR
                                                     decrypt the package gdpr_subject_access wrote for a request
                                                     into DIR (report.pdf, data.json, csv/, manifest.json)

URL defaults to $WAREHOUSE_URL, which keeps a password out of the process list (`ps`) and shell history.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date, datetime, timezone
from pathlib import Path

from warehouse_gdpr.engine.policy import Policy, PolicyError, load_policy


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
        from warehouse_gdpr.engine.catalog import access_warnings

        for warning in access_warnings(policy):
            print(f"warning: access: {warning}")
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


def _access_unpack(args: argparse.Namespace) -> int:
    """Decrypt an access package into a new folder (files readable by the current user only)."""
    from warehouse_gdpr.airflow import connections
    from warehouse_gdpr.airflow.storage import ObjectStoragePackages
    from warehouse_gdpr.engine import access
    from warehouse_gdpr.engine.errors import ConfigurationError
    from warehouse_gdpr.transport import StoreError

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"{out} exists and is not an empty folder: give a new folder (nothing was written)", file=sys.stderr)
        return 2
    try:
        policy = load_policy(args.policy or connections.policy_path())
        keys = connections.load_keys(policy)
        store = ObjectStoragePackages(policy.access.location, connections.airflow_home())
        header, files = access.open_package(store, keys, args.request_id)
    except (ConfigurationError, StoreError) as exc:
        print(exc, file=sys.stderr)
        return 1
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in sorted(files.items()):
        target = out / name
        target.parent.mkdir(mode=0o700, exist_ok=True)
        target.touch(mode=0o600)
        target.write_bytes(data)
    print(f"Request {header['request_id']} ({header['kind']}), written {header['created_at']}, deleted from "
          f"{store.url} after {header['expires_at']}:")
    for name, data in sorted(files.items()):
        print(f"  {out / name}  ({len(data)} bytes)")
    print("Every file matches the SHA-256 of manifest.json. Send them to the person through a secure channel.")
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
    reg.add_argument("--out", help="output directory (default: processing_register.output_dir, under the current directory)")
    reg.add_argument("--date", type=date.fromisoformat, help="date printed as generation date (default: today)")
    reg.set_defaults(run=_register)
    acc = commands.add_parser("access", help="answers to access and portability requests (GDPR art. 15, 20)")
    acc_actions = acc.add_subparsers(dest="action", required=True)
    unpack = acc_actions.add_parser("unpack", help="decrypt a request's package into a new folder")
    unpack.add_argument("request_id", help="the request id the package was written for")
    unpack.add_argument("--out", required=True, help="a new (or empty) folder for report.pdf, data.json, csv/, manifest.json")
    unpack.add_argument("--policy", help="the policy file (default: $WAREHOUSE_GDPR_POLICY): its access.location and keys")
    unpack.set_defaults(run=_access_unpack)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
