"""The demo's SQL files (demo CRM, support desk, grants): demo data, never shipped in the wheel."""

from __future__ import annotations

from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent / "sql"


def read_sql(name: str) -> str:
    return (SQL_DIR / name).read_text(encoding="utf-8")
