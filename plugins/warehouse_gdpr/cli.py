"""`warehouse-gdpr` command line, for use outside Airflow (CI, a DBA's shell).

    warehouse-gdpr policy schema                     JSON Schema of the policy file (editor completion, CI)
    warehouse-gdpr policy check POLICY [--url URL]   validate POLICY against a live warehouse; print what
                                                     each rule would select (counts only); changes nothing
    warehouse-gdpr schema sql                        print the control schema DDL shipped in the package
    warehouse-gdpr schema install [--url URL] [--policy POLICY]
                                                     install or upgrade it (run as the warehouse owner); with a
                                                     policy enabling restriction.database_guard, also the guard
                                                     trigger on every mapped table
    warehouse-gdpr subject-hash POLICY < email       the person's keyed hashes (audit log, suppression list);
                                                     reads the email on stdin, keys from the Airflow connection
    warehouse-gdpr register POLICY [--out DIR]       write the article 30 register (register.md and
                                                     register.html); fails while a required field is missing
    warehouse-gdpr request new --kind KIND --request-id ID [--received-on DATE] [--policy POLICY] < identifier
                                                     register a person's request before running it: the email
                                                     (or subject_id:N) is read on stdin and stored encrypted
                                                     (a rectification: then one column=new value per line);
                                                     then trigger the subject DAG with {"request_id": ID} alone
    warehouse-gdpr request extend ID --reason TEXT   extend the due date once, to three months after receipt
    warehouse-gdpr requests [--open] [--overdue] [--json]
                                                     every request: kind, status, outcome, dates, targets
    warehouse-gdpr access unpack REQUEST_ID --out DIR
                                                     decrypt the package gdpr_subject_access wrote for a request
                                                     into DIR (report.pdf, data.json, csv/, manifest.json);
                                                     reads the archive's private connection too
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
from typing import TYPE_CHECKING, NoReturn

from warehouse_gdpr.engine.policy import Policy, PolicyError, load_policy

if TYPE_CHECKING:  # imported where used, so that `warehouse-gdpr policy check` stays light
    import psycopg

    from warehouse_gdpr.engine.audit import RunContext
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
    try:
        policy = load_policy(args.policy) if args.policy else None
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    with psycopg.connect(url) as conn:
        try:
            ran = schema.ensure_schema(conn)
        except schema.SchemaError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"control schema version {schema.SCHEMA_VERSION} " + ("installed." if ran else "already installed."))
        if policy is not None and policy.restriction.database_guard:
            return _install_guard(conn, policy)
    return 0


def _install_guard(conn: psycopg.Connection, policy: Policy) -> int:
    """The restriction guard trigger on every mapped table (policy `restriction.database_guard`)."""
    import psycopg

    from warehouse_gdpr.engine import restriction

    try:
        tables = restriction.install_guard(conn, policy, _cli_context("schema_install"))
    except psycopg.errors.InsufficientPrivilege as exc:
        print(f"the restriction guard needs the mapped tables' owner ({exc.diag.message_primary}): nothing was "
              "changed", file=sys.stderr)
        return 1
    print(f"restriction guard ({restriction.GUARD_TRIGGER}) installed on {len(tables)} table(s): {', '.join(tables)}.")
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


def _warehouse(args: argparse.Namespace) -> psycopg.Connection | None:
    """A connection to $WAREHOUSE_URL (or --url) with the control schema checked, or None (error printed)."""
    import psycopg

    from warehouse_gdpr.engine import schema

    url = args.url or os.environ.get("WAREHOUSE_URL")
    if not url:
        print("set WAREHOUSE_URL (or give --url): the warehouse, as a member of gdpr_engine", file=sys.stderr)
        return None
    conn = psycopg.connect(url)
    try:
        schema.ensure_schema(conn)
    except schema.SchemaError as exc:
        print(exc, file=sys.stderr)
        conn.close()
        return None
    return conn


def _cli_context(task: str) -> RunContext:
    from warehouse_gdpr.engine.audit import RunContext

    return RunContext(dag_id="warehouse-gdpr", run_id=f"cli__{datetime.now(timezone.utc).isoformat()}", task_id=task)


def _read_identifier() -> str:
    """The person's email or subject_id:N from stdin; typed at a terminal, it is not echoed."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("email or subject_id:N (not echoed): ")
    return sys.stdin.readline()


def _read_changes(policy: Policy) -> dict[str, str]:
    """A rectification's changes from stdin, after the identifier: one `column=value` per line (at a terminal, not
    echoed; an empty line ends them), checked against the policy's `rectification.columns`. Raises ValueError
    naming the line or the column and the rule, never a value."""
    from warehouse_gdpr.engine import rectification

    lines: list[str] = []
    if sys.stdin.isatty():
        import getpass

        while line := getpass.getpass("column=new value (not echoed; an empty line ends): "):
            lines.append(line)
    else:
        lines = sys.stdin.read().splitlines()
    changes: dict[str, str] = {}
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        column, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"line {number} of stdin is not `column=new value` (the line is not shown)")
        changes[column.strip()] = value
    return rectification.check_changes(changes, policy)


def _request_new(args: argparse.Namespace) -> int:
    """Register a request; the identifier comes on stdin (never argv: shell history, `ps`)."""
    from warehouse_gdpr.airflow import connections
    from warehouse_gdpr.engine import requests
    from warehouse_gdpr.engine.crypto import KeyConfigError

    if args.kind not in requests.KINDS:
        print(f"unknown --kind: give one of {', '.join(requests.KINDS)}", file=sys.stderr)
        return 2
    try:
        received = date.fromisoformat(args.received_on) if args.received_on else date.today()
    except ValueError:
        print("--received-on must be a date, YYYY-MM-DD", file=sys.stderr)
        return 2
    policy_file = args.policy or os.environ.get(connections.POLICY_ENV)
    if not policy_file:
        print(f"give --policy (or set {connections.POLICY_ENV}): it names the keys connection", file=sys.stderr)
        return 2
    try:
        policy = load_policy(policy_file)
        keys = connections.load_keys(policy)
    except (PolicyError, KeyConfigError, RuntimeError) as exc:
        print(exc, file=sys.stderr)
        return 2
    identifier = _read_identifier()
    if not identifier.strip():
        print("give the person's email (or subject_id:N) on stdin, e.g.: read -rs EMAIL; printf '%s' \"$EMAIL\" | "
              "warehouse-gdpr request new --kind KIND --request-id ID", file=sys.stderr)
        return 2
    try:  # a rectification: the corrections follow the identifier, one column=value per line
        changes = _read_changes(policy) if args.kind == "rectification" else None
    except ValueError as exc:
        print(f"{exc}: nothing was registered. On stdin: the email (or subject_id:N) on the first line, then one "
              "`column=new value` per line", file=sys.stderr)
        return 2
    conn = _warehouse(args)
    if conn is None:
        return 2
    with conn:
        try:
            registered = requests.register(
                conn, keys, _cli_context("request_new"), kind=args.kind, request_id=args.request_id,
                identifier=identifier, received_at=received, today=date.today(),
                strip_plus_tags=policy.optout.strip_plus_tags, changes=changes,
            )
        except requests.RequestStoreError as exc:
            print(exc, file=sys.stderr)
            return 1
        finally:
            del identifier, changes
    print(f"Registered {registered['kind']} request {registered['request_id']}: received {registered['received_at']}, "
          f"due {registered['due_date']}.")
    dag_id = requests.DAG_FOR_KIND.get(args.kind)
    conf = json.dumps({"request_id": registered["request_id"]})
    print(f"Run it: airflow dags trigger {dag_id} --conf '{conf}'" if dag_id
          else f"No DAG of this package runs {args.kind} requests yet.")
    return 0


def _request_extend(args: argparse.Namespace) -> int:
    from warehouse_gdpr.engine import requests

    conn = _warehouse(args)
    if conn is None:
        return 2
    with conn:
        try:
            extended = requests.extend(conn, _cli_context("request_extend"), args.request_id, args.reason, date.today())
        except requests.RequestStoreError as exc:
            print(exc, file=sys.stderr)
            return 1
    print(f"Request {extended['request_id']} ({extended['kind']}) extended: due {extended['extended_due_date']} "
          f"(was {extended['due_date']}). Tell the person, with the reason, before {extended['due_date']} "
          "(GDPR art. 12(3)).")
    return 0


def _requests(args: argparse.Namespace) -> int:
    """Every request, no personal data (no subject hash, no reason text)."""
    from warehouse_gdpr.engine import requests
    from warehouse_gdpr.engine.sweep import format_table

    conn = _warehouse(args)
    if conn is None:
        return 2
    with conn:
        rows = requests.listing(conn, date.today(), open_only=args.open, overdue_only=args.overdue)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("No request" + (" overdue." if args.overdue else " open." if args.open else "."))
        return 0
    print(format_table(
        ["request", "kind", "status", "outcome", "received", "due", "days left", "extended", "targets"],
        [[r["request_id"], r["kind"], r["status"], r["outcome"] or "-", r["received_at"], r["due_date"],
          "-" if r["days_left"] is None else f"{r['days_left']} OVERDUE" if r["overdue"] else r["days_left"],
          f"from {r['first_due_date']}" if r["extended"] else "-",
          ", ".join(f"{t}: {st}" for t, st in r["targets"].items()) or "-"] for r in rows],
    ))
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
        keys = connections.load_keys(policy, archive_private=True)  # the package is encrypted to the public key
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


class _Parser(argparse.ArgumentParser):
    """argparse, except that an argument it does not know is never quoted back: it may be a person's email
    typed on the command line by mistake (`request new` reads it on stdin)."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            count = len(message.split(":", 1)[1].split())
            message = (f"{count} unrecognized argument(s), not shown (they may be personal data: `request new` "
                       "reads the person's email, or subject_id:N, on stdin, never from the command line)")
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="warehouse-gdpr", description=__doc__.splitlines()[0])
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
    install.add_argument("--policy", help="the policy file: with restriction.database_guard, also install the "
                                          "restriction guard trigger on every mapped table")
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
    from warehouse_gdpr.engine.requests import KINDS

    url_help = "libpq URL of the warehouse (default: $WAREHOUSE_URL, which keeps a password out of `ps`)"
    req = commands.add_parser("request", help="a person's request (GDPR art. 15-21)").add_subparsers(
        dest="action", required=True)
    new = req.add_parser("new", help="register a request before running it; the email (or subject_id:N) on stdin")
    new.add_argument("--kind", required=True, help="one of: " + ", ".join(KINDS))
    new.add_argument("--request-id", required=True,
                     help="the ticket reference (3-64 letters, digits, '.', '_', ':', '-')")
    new.add_argument("--received-on", help="the date the request arrived, YYYY-MM-DD (default: today)")
    new.add_argument("--policy", help="the policy file, for its keys connection (default: $WAREHOUSE_GDPR_POLICY)")
    new.add_argument("--url", help=url_help)
    new.set_defaults(run=_request_new)
    extend = req.add_parser("extend", help="extend the due date once, to three months after receipt (art. 12(3))")
    extend.add_argument("request_id", help="the request's id")
    extend.add_argument("--reason", required=True, help="why (the controller's words, at most 500 characters)")
    extend.add_argument("--url", help=url_help)
    extend.set_defaults(run=_request_extend)
    listing = commands.add_parser("requests", help="every request: kind, status, outcome, dates, targets")
    listing.add_argument("--open", action="store_true", help="only requests not complete yet")
    listing.add_argument("--overdue", action="store_true", help="only open requests past their due date")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.add_argument("--url", help=url_help)
    listing.set_defaults(run=_requests)
    acc = commands.add_parser("access", help="answers to access and portability requests (GDPR art. 15, 20)")
    acc_actions = acc.add_subparsers(dest="action", required=True)
    unpack = acc_actions.add_parser("unpack", help="decrypt a request's package into a new folder")
    unpack.add_argument("request_id", help="the request id the package was written for")
    unpack.add_argument("--out", required=True,
                        help="a new (or empty) folder for report.pdf, data.json, csv/, manifest.json")
    unpack.add_argument("--policy",
                        help="the policy file (default: $WAREHOUSE_GDPR_POLICY): its access.location and keys")
    unpack.set_defaults(run=_access_unpack)
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
