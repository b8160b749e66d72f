"""`warehouse-gdpr` command line, for use outside Airflow (CI, a DBA's shell).

    warehouse-gdpr policy schema                     JSON Schema of the policy file (editor completion, CI)
    warehouse-gdpr policy check POLICY --url URL     validate POLICY against a live warehouse; print what
                                                     each rule would select (counts only); changes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone

from .policy import Policy, PolicyError, load_policy


def _schema(_: argparse.Namespace) -> int:
    print(json.dumps(Policy.model_json_schema(), indent=2))
    return 0


def _check(args: argparse.Namespace) -> int:
    import psycopg

    from . import catalog, sweep

    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    url = args.url or os.environ.get("WAREHOUSE_URL")
    if not url:
        print(f"{args.policy}: valid. Give --url (or set WAREHOUSE_URL) to check it against a warehouse.")
        return 0
    as_of = args.as_of or datetime.now(timezone.utc).isoformat()
    with psycopg.connect(url) as conn:
        conn.read_only = True  # a check never writes
        try:
            report = catalog.check_policy(conn, policy)
        except catalog.CatalogError as exc:
            print(f"{args.policy}: {exc}", file=sys.stderr)
            return 1
        plans = sweep.plan(conn, policy, policy.rules, as_of)
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(f"{args.policy}: matches the warehouse ({report.tables} tables, {report.columns} personal columns).")
    print(f"What each rule would select as of {as_of}:")
    print(sweep.format_table(
        ["rule", "action", "candidates", "held", "to process"],
        [[p.rule, p.action, p.candidates, p.held, p.candidates - p.held] for p in plans],
    ))
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
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
