"""The import rules of docs/architecture.md: layers point down only (statistics <- models and engine <- certification
service <- HTTP app / CLI; the offline pipeline uses models and statistics, never the service or the server).

Reads every module's imports with ``ast`` (including imports inside functions), so a lazy import cannot hide a
dependency. Checked against the layout before the restructure: it reported server -> calibration (the old CLI) and
calibration -> server (evaluate.py read the server's settings).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("smoothing", "models", "certification", "calibration", "server", "cli", "bench")
# what each package may import, besides itself
ALLOWED = {
    "smoothing": set(),
    "models": {"smoothing"},
    "certification": {"models", "smoothing"},
    "calibration": {"models", "smoothing"},
    "server": {"certification", "models", "smoothing"},
    "cli": {"server", "certification", "calibration", "models", "smoothing", "bench"},
    "bench": {"server", "certification", "calibration", "models", "smoothing"},
}
THIRD_PARTY_BANNED = {
    "smoothing": {"torch", "fastapi", "starlette", "onnxruntime", "httpx", "uvicorn", "ray"},
    "models": {"fastapi", "starlette", "uvicorn", "httpx", "ray"},
    "certification": {"fastapi", "starlette", "uvicorn", "torch", "ray"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_lower_layers(package):
    bad = []
    for path in modules(package):
        for root in imported_roots(path) & set(PACKAGES) - {package} - ALLOWED[package]:
            bad.append(f"{path.relative_to(ROOT)} imports {root}")
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", sorted(THIRD_PARTY_BANNED))
def test_lower_layers_stay_light(package):
    bad = [f"{p.relative_to(ROOT)} imports {r}" for p in modules(package)
           for r in imported_roots(p) & THIRD_PARTY_BANNED[package]
           if not (package == "models" and p.name in ("networks.py", "export.py", "backends.py"))]
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli_root():
    users = [str(p.relative_to(ROOT)) for pkg in PACKAGES if pkg != "cli" for p in modules(pkg)
             if "cli" in imported_roots(p)]
    assert not users


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_stay_under_400_lines(package):
    long = [f"{p.relative_to(ROOT)}: {n}" for p in modules(package)
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long
