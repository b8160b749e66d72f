"""The engine never imports Airflow: importing every engine module in a fresh interpreter loads no
`airflow` module (the Airflow layer is the only place that does)."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_modules_import_without_airflow() -> None:
    engine = ROOT / "plugins" / "warehouse_gdpr" / "engine"
    modules = [f"warehouse_gdpr.engine.{m.name}" for m in pkgutil.iter_modules([str(engine)])]
    assert "warehouse_gdpr.engine.candidates" in modules and "warehouse_gdpr.engine.sweep" in modules
    probe = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + (
        "print(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"the engine imported Airflow: {out.stdout[:500]}"


def test_no_engine_module_imports_airflow_even_inside_a_function() -> None:
    """The probe above misses an import deferred into a function body (engine/optout.py once imported
    HttpHook there): scan every import statement of the engine's source."""
    import ast

    offenders = []
    for path in sorted((ROOT / "plugins" / "warehouse_gdpr" / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n == "airflow" or n.startswith("airflow.")]
    assert offenders == []
