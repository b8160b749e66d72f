"""Locate the reviewable SQL files (include/sql in the repository, package data in a wheel)."""

from __future__ import annotations

import os
from pathlib import Path


def sql_dir() -> Path:
    """The folder holding the DDL: $WAREHOUSE_GDPR_SQL_DIR, else the package's own copy (in the
    repository, plugins/warehouse_gdpr/sql links to include/sql; in a wheel it holds the files)."""
    override = os.environ.get("WAREHOUSE_GDPR_SQL_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "sql"


def read_sql(name: str) -> str:
    path = sql_dir() / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FileNotFoundError(
            f"SQL file {name} not found in {path.parent} ({exc.strerror}); set WAREHOUSE_GDPR_SQL_DIR to the folder "
            "holding warehouse-gdpr's include/sql"
        ) from None
