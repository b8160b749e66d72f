"""`make lint` is part of CI (issue 12): `.ci/run` lints before it tests, `make lint` builds the venv itself
on a fresh clone, and the linters are pinned as every other dependency is (the dev extra and
constraints.txt agree), so a new ruff or mypy release cannot turn CI red on an unchanged tree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINTERS = ("ruff", "mypy", "types-PyYAML", "types-croniter")


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_ci_lints_before_it_tests() -> None:
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip().startswith("make ")]
    assert [s.split()[1] for s in steps] == ["lint", "test"], steps


def test_make_lint_creates_the_venv_and_runs_both_linters() -> None:
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^lint:(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert rule, "no lint target"
    assert "$(STAMP)" in rule.group(1), "make lint must depend on the venv stamp, as make test does"
    assert "ruff check" in rule.group(2) and "mypy" in rule.group(2)
    assert "ruff format" not in rule.group(2), "the repository is never reformatted"


def test_linters_are_pinned_in_the_dev_extra_and_the_constraints() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pinned = dict(d.split("==") for d in dev if "==" in d)
    pins = _constraints()
    for name in LINTERS:
        assert name in pinned, f"{name} is not pinned (==) in the dev extra"
        assert pins.get(name.lower()) == pinned[name], f"{name}: dev extra {pinned[name]}, constraints {pins.get(name)}"


def test_ci_installs_chromium_and_never_skips_the_browser_test() -> None:
    """Issue 16: CI runs the GDPR page's browser test: chromium installed before `make test`, and CI set, so
    that a missing browser fails the test instead of skipping it (tests/airflow/test_ui.py, `_chromium`)."""
    script = (ROOT / ".ci" / "run").read_text()
    install = script.index("apt-get install -y -qq chromium")
    assert 'export CI="${CI:-true}"' in script
    assert install < script.index("\nmake test"), "chromium must be installed before the tests run"
    source = (ROOT / "tests" / "airflow" / "test_ui.py").read_text()
    assert 'if os.environ.get("CI"):\n        pytest.fail(' in source
