"""No module of the package reaches into another module's private names (issue 12): a name starting
with one underscore is its module's business. What another module needs is public, with a docstring.

The scan reads every module under plugins/warehouse_gdpr with `ast` and fails on
- `from <our module> import _name` (relative or absolute), and
- `<our module>._name` where `<our module>` is bound by an import (`from warehouse_gdpr.engine import
  erasure`, `from . import erasure`, `import warehouse_gdpr.engine.erasure as erasure`).
Dunder names (`__version__`) are public by convention and allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "plugins" / "warehouse_gdpr"
TOP = "warehouse_gdpr"


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name `from ... import` refers to in `module`."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def violations(base: Path) -> list[str]:
    """Every cross-module private import or attribute use in the package rooted at base/TOP."""
    files = sorted((base / TOP).rglob("*.py"))
    modules = {_module_name(f, base) for f in files}
    found = []
    for path in files:
        module = _module_name(path, base)
        tree = ast.parse(path.read_text(), filename=str(path))
        where = f"{path.relative_to(base)}"
        aliases = _imports(tree, module, path.name == "__init__.py", modules, where, found)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            owner = ast.unparse(node.value)
            owner_module = aliases.get(owner, owner if owner in modules else module)
            if owner_module != module:
                found.append(f"{where}:{node.lineno}: {owner}.{node.attr} ({owner_module})")
    return found


def _imports(tree: ast.Module, module: str, is_package: bool, modules: set[str], where: str,
             found: list[str]) -> dict[str, str]:
    """{local name: our module it is bound to}; private names imported from another module go to `found`."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {alias.asname: alias.name for alias in node.names if alias.asname and alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            if not (source == TOP or source.startswith(TOP + ".")):
                continue
            for alias in node.names:
                if _is_private(alias.name) and source != module:
                    found.append(f"{where}:{node.lineno}: from {source} import {alias.name}")
                if f"{source}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    return aliases


def test_no_module_uses_another_modules_private_names() -> None:
    assert (PACKAGE / "engine" / "erasure.py").exists()
    found = violations(PACKAGE.parent)
    assert not found, "private names used across modules (make them public, with a docstring, or move them):\n" + (
        "\n".join(found))


def test_the_scan_finds_each_kind_of_reach(tmp_path: Path) -> None:
    """The scan itself: each form of reaching in is reported, module-local use and dunders are not."""
    pkg = tmp_path / TOP / "engine"
    pkg.mkdir(parents=True)
    (tmp_path / TOP / "__init__.py").write_text("__version__ = '1'\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def _helper():\n    return 1\n\n\ndef public():\n    return _helper()\n")
    (pkg / "b.py").write_text(
        "from . import a\n"
        "from .a import _helper\n"
        "from warehouse_gdpr.engine.a import _helper as h2\n"
        "import warehouse_gdpr.engine.a as aa\n"
        "from warehouse_gdpr import __version__\n"
        "x = a._helper() + aa._helper() + a.public()\n"
        "class C:\n"
        "    def _own(self):\n"
        "        return self._own\n"
    )
    found = violations(tmp_path)
    assert sorted(line.split(":", 2)[1] for line in found) == ["2", "3", "6", "6"], found
    assert all("b.py" in line for line in found)
