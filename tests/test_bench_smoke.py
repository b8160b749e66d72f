"""Smoke run of the benchmark (bench/run.py) at a tiny N: it runs end to end and every comparison ends
in the same state on both sides. Speed is not checked here (`make bench` measures it at 1M contacts)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "run.py"


def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    results = tmp_path_factory.mktemp("bench") / "latest.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--contacts", "300", "--rss-small", "300", "--rss-large", "600",
         "--per-row-sample", "20", "--erasure-subjects", "10", "--access-subjects", "5", "--results", str(results),
         "--db-prefix", f"bench_smoke_{uuid.uuid4().hex[:8]}", "--drop-templates"],
        env={**os.environ, "WAREHOUSE_URL": server_url}, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(results.read_text()), proc.stdout


def test_bench_runs_and_writes_the_required_keys(smoke: tuple[dict, str]) -> None:
    out, stdout = smoke
    for key in ("contacts", "delete_ratio", "pseudonymise_ratio", "per_row_speedup", "erasure_median_ms",
                "erasure_p95_ms", "access_median_ms", "access_p95_ms", "access_db_median_ms", "access_pdf_median_ms",
                "peak_rss_mb_small", "peak_rss_mb_large"):
        assert out[key] is not None, key
    assert out["contacts"] == 300
    assert {"cores", "memory_gib", "postgresql_version"} <= set(out["machine"])
    assert set(out["targets"]) >= {"delete_ratio", "pseudonymise_ratio", "per_row_speedup", "erasure_median_ms",
                                   "access_median_ms", "peak_rss_mb_large", "peak_rss_growth_pct"}
    assert all(isinstance(t["met"], bool) for t in out["targets"].values())
    assert (out["memory"]["small"]["contacts"], out["memory"]["large"]["contacts"]) == (300, 600)
    assert 0 < out["peak_rss_mb_small"] < 2000 and 0 < out["peak_rss_mb_large"] < 2000
    # The Markdown table is on stdout, one row per measure.
    for measure in ("1. Delete path", "2. Pseudonymise + archive", "3. Per-row baseline", "4. Single-subject erasure",
                    "4b. Single-subject access request", "5. Peak RSS"):
        assert f"| {measure}" in stdout
    assert out["table_markdown"].startswith("| Measure")


def test_both_sides_of_every_comparison_end_in_the_same_state(smoke: tuple[dict, str]) -> None:
    out, _ = smoke
    delete, pseudo = out["delete"], out["pseudonymise"]
    assert delete["end_state_match"], delete["differences"]
    assert pseudo["end_state_match"], pseudo["differences"]
    assert pseudo["per_row"]["end_state_match"], pseudo["per_row"]
    assert out["erasure"]["end_state_match"] and out["erasure"]["verify_failures"] == 0
    # Each access package holds as many rows per table as plain SQL counts, and decrypts with its PDF.
    assert out["access"]["end_state_match"] and out["access"]["subjects"] == 5 and out["access"]["median_rows"] > 0
    assert out["access"]["pdf"]["median_ms"] > 0 and out["access"]["db"]["median_ms"] > 0
    assert out["all_valid"]
    # Real work on both paths, holds included (the seed's first contacts cover every scenario).
    assert delete["subjects_deleted"] > 0 and delete["held"] > 0 and delete["rows_by_table"]["crm.activities"] > 0
    assert pseudo["subjects_pseudonymised"] > 0
    assert pseudo["rows_updated"] > pseudo["subjects_pseudonymised"]
    # Only the invoices carry a legal obligation: fewer rows archived than pseudonymised, none from other tables.
    assert 0 < pseudo["rows_archived"] <= pseudo["rows_by_table"]["crm.invoices"] < pseudo["rows_updated"]
    assert pseudo["per_row"]["sample_rows"] == 20 and out["erasure"]["subjects"] == 10


def test_end_state_checks_see_a_single_changed_row(warehouse: str, policy, keys) -> None:  # type: ignore[no-untyped-def]
    """The checksums the comparisons rely on notice one deleted row and one changed column, while the
    hash function itself is masked (md5 and HMAC-SHA256 pseudonyms compare equal, by design)."""
    bench = _bench_module()
    before_delete = bench.delete_state(warehouse, policy)
    before_pseudo = bench.pseudonymise_state(warehouse, policy, keys)
    with psycopg.connect(warehouse) as conn:
        conn.execute("DELETE FROM crm.activities WHERE activity_id = (SELECT max(activity_id) FROM crm.activities)")
    diffs = bench.diff_states(before_delete, bench.delete_state(warehouse, policy))
    assert [d.split(":")[0] for d in diffs] == [
        "crm.activities.rows", "crm.activities.pk_md5", "crm.activities.rows_checksum"]
    with psycopg.connect(warehouse) as conn:
        conn.execute("UPDATE crm.contacts SET email = md5(email) WHERE contact_id = 1")
    hashed = bench.pseudonymise_state(warehouse, policy, keys)
    assert "crm.contacts.rows_checksum" in [d.split(":")[0] for d in bench.diff_states(before_pseudo, hashed)]
    with psycopg.connect(warehouse) as conn:
        conn.execute("UPDATE crm.contacts SET email = encode(sha256(email::bytea), 'hex') WHERE contact_id = 1")
    assert not bench.diff_states(hashed, bench.pseudonymise_state(warehouse, policy, keys))
