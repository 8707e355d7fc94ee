"""The import graph of centime/, ledger/, wallet/, topup/ and reconcile/ follows the dependency
rules of design.md, and no Python string in a domain package holds SQL (it lives in sql/*.sql)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("centime", "ledger", "wallet", "topup", "reconcile")
DOMAIN = ("ledger", "wallet", "topup", "reconcile")
KERNEL = (
    "centime.errors",
    "centime.money",
    "centime.settings",
    "centime.sql",
    "centime.metrics",
    "centime.logs",
)
FACE = (
    "centime.app",
    "centime.cli",
    "centime.auth",
    "centime.migrate",
    "centime.embedded",
    "centime.fast_debits",
    "centime.access",
    "centime.api_reference",
    "centime.__main__",
)

# What each domain package must not import (besides the face, bench and stripe, checked apart).
FORBIDDEN_SIBLINGS = {
    "ledger": ("wallet", "topup", "reconcile"),
    "wallet": ("topup", "reconcile"),
    "topup": ("reconcile",),
    "reconcile": ("wallet",),
}

_SQL = re.compile(
    r"\bSELECT\s|\bINSERT\s+INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
    r"|\bCREATE\s+(?:UNIQUE\s+)?(?:TABLE|INDEX|FUNCTION|TRIGGER|DATABASE)\b|\bALTER\s+TABLE\b"
    r"|\bTRUNCATE\s|\bON\s+CONFLICT\b|\bRETURNING\s"
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module a source imports, anywhere in it (also inside functions), as
    absolute dotted names; `from a import b` yields both `a` and `a.b`."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, node.module] if node.module else base_parts)
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def python_files(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def import_graph() -> dict[str, set[str]]:
    return {
        module_name(path): imports_of(
            path.read_text(encoding="utf-8"), module_name(path), is_package=path.name == "__init__.py"
        )
        for path in python_files(*PACKAGES)
    }


def hits(imported: set[str], targets: tuple[str, ...]) -> set[str]:
    return {name for name in imported for t in targets if name == t or name.startswith(t + ".")}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


GRAPH = import_graph()


# The scanner itself ------------------------------------------------------------


def test_the_scanner_sees_every_kind_of_import() -> None:
    source = (
        "import stripe\n"
        "import wallet.cache as c\n"
        "from ledger import repo\n"
        "from . import sibling\n"
        "from ..ledger.writer import LedgerWriter\n"
        "def late():\n"
        "    from topup.service import Topups\n"
    )
    found = imports_of(source, "wallet.service")
    assert {"stripe", "wallet.cache", "ledger", "ledger.repo", "wallet.sibling", "topup.service"} <= found
    assert "ledger.writer" in found
    assert hits(found, ("topup",)) == {"topup.service", "topup.service.Topups"}
    assert hits(imports_of("import os\nfrom msgspec import Struct\n", "ledger.x"), DOMAIN) == set()


def test_the_scan_covers_the_packages_and_sees_real_edges() -> None:
    assert {"centime.app", "ledger.writer", "wallet.service", "wallet.cache", *KERNEL} <= set(GRAPH)
    # Known edges: if these vanish the scan is reading nothing.
    assert hits(GRAPH["wallet.service"], ("ledger",))
    assert hits(GRAPH["centime.app"], ("wallet",))
    assert hits(GRAPH["ledger.repo"], ("centime.sql",))


# The dependency rules -------------------------------------------------------------


@pytest.mark.parametrize("package", DOMAIN)
def test_domain_packages_import_no_forbidden_sibling_and_not_the_face(package: str) -> None:
    violations = {
        module: sorted(hits(imported, FORBIDDEN_SIBLINGS[package] + FACE))
        for module, imported in GRAPH.items()
        if in_package(module, package) and hits(imported, FORBIDDEN_SIBLINGS[package] + FACE)
    }
    assert violations == {}


def test_ledger_imports_no_sibling_domain_package() -> None:
    ledger_imports = set().union(*(i for m, i in GRAPH.items() if in_package(m, "ledger")))
    assert hits(ledger_imports, ("wallet", "topup", "reconcile", *FACE)) == set()


@pytest.mark.parametrize("kernel_module", KERNEL)
def test_kernel_imports_no_domain_package_and_not_the_face(kernel_module: str) -> None:
    assert kernel_module in GRAPH, f"{kernel_module} is missing"
    assert hits(GRAPH[kernel_module], (*DOMAIN, "bench", *FACE)) == set()


WALLET_INSIDES = ("wallet.repo", "wallet.cache", "wallet.changes")
"""The wallet's SQL, Redis and change layers: topup/ reaches them only through wallet.for_topups."""


def test_topup_reaches_the_wallet_through_its_api_for_topups() -> None:
    violations = {
        module: sorted(hits(imported, WALLET_INSIDES))
        for module, imported in GRAPH.items()
        if in_package(module, "topup") and hits(imported, WALLET_INSIDES)
    }
    assert violations == {}
    assert hits(GRAPH["topup.service"], ("wallet.for_topups",))  # the rule reads real edges
    assert hits(GRAPH["wallet.for_topups"], WALLET_INSIDES)


def test_wallet_repo_does_not_depend_on_the_redis_cache() -> None:
    assert hits(GRAPH["wallet.repo"], ("wallet.cache",)) == set()


def test_only_topup_and_reconcile_import_stripe() -> None:
    offenders = {
        module
        for module, imported in GRAPH.items()
        if hits(imported, ("stripe",))
        and not (in_package(module, "topup") or in_package(module, "reconcile"))
    }
    assert offenders == set()


def test_nothing_imports_bench() -> None:
    offenders = {module for module, imported in GRAPH.items() if hits(imported, ("bench",))}
    assert offenders == set()


# SQL lives in .sql files --------------------------------------------------------------


def sql_literals(source: str) -> list[tuple[int, str]]:
    """String literals (not docstrings) that look like SQL, with their line numbers."""
    tree = ast.parse(source)
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and _SQL.search(node.value)
    ]


def test_the_sql_scanner_flags_queries_and_spares_docstrings() -> None:
    source = (
        '"""Module docs: we SELECT nothing here and INSERT INTO nothing."""\n'
        "def f(conn):\n"
        '    """Runs SELECT 1 on conn."""\n'
        '    return conn.fetch("SELECT id FROM t WHERE x = $1")\n'
        'Q = f"INSERT INTO {name} VALUES (1)"\n'
        'LABEL = "selected rows"\n'
    )
    assert sorted(line for line, _ in sql_literals(source)) == [4, 5]


@pytest.mark.parametrize("package", DOMAIN)
def test_no_sql_in_python_strings_of_domain_packages(package: str) -> None:
    found = {
        f"{path.relative_to(ROOT)}:{line}": text[:60]
        for path in python_files(package)
        for line, text in sql_literals(path.read_text(encoding="utf-8"))
    }
    assert found == {}


def test_queries_live_in_sql_files_beside_the_code() -> None:
    for package in ("ledger", "wallet"):
        text = (ROOT / package / "sql" / "queries.sql").read_text(encoding="utf-8")
        assert re.search(r"^-- name: \w+", text, re.MULTILINE), package
        assert _SQL.search(text), package  # the pattern recognises the real queries
