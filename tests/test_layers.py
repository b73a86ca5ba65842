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
    """Top-level packages a module imports; a relative import counts as the package it resolves to (``from ..server
    import x`` in calibration/ imports server)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            parts = path.relative_to(ROOT).parts[:-1]  # the module's package
            base = parts[:len(parts) - (node.level - 1)]
            if base or node.module:
                roots.add((*base, *(node.module or "").split("."))[0])
            else:  # ``from .. import a, b`` at the top: each name is a package
                roots.update(alias.name for alias in node.names)
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


@pytest.mark.parametrize("module, banned", [
    ("smoothing", {"torch", "fastapi", "starlette", "onnxruntime", "uvicorn", "ray"}),
    ("models.engine", {"torch", "fastapi", "starlette", "uvicorn", "ray"}),
    ("certification.service", {"torch", "fastapi", "starlette", "uvicorn", "ray"}),
])
def test_importing_a_lower_layer_loads_nothing_heavier(module, banned):
    """What the ast check cannot see (imports of imports, dynamic imports): a fresh interpreter imports the module and
    none of the heavier packages may be loaded. Run against a certification module importing torch lazily through a
    helper module of models/: it failed."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(set({sorted(banned)!r}) & {{m.split('.')[0] for m in sys.modules}}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True).stdout.strip()
    assert out == "[]", f"importing {module} loaded {out}"


def test_a_relative_import_counts_as_the_package_it_reaches(tmp_path, monkeypatch):
    """``from ..server import x`` inside calibration/ is an import of server. Run against the check that skipped
    relative imports (before 2026-12-06): it saw none."""
    module = ROOT / "calibration" / "_probe_relative.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from ..server import app\nfrom . import data\n")
    assert imported_roots(module) == {"server", "calibration"}


def test_every_name_of_a_relative_import_from_the_top_counts(monkeypatch):
    """``from .. import smoothing, server`` inside calibration/ imports both packages. Run against the check that kept
    only the first name (before 2026-12-06): it saw smoothing alone."""
    module = ROOT / "calibration" / "_probe_relative.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from .. import smoothing, server\n")
    assert imported_roots(module) == {"smoothing", "server"}


def test_nothing_imports_the_cli_root():
    users = [str(p.relative_to(ROOT)) for pkg in PACKAGES if pkg != "cli" for p in modules(pkg)
             if "cli" in imported_roots(p)]
    assert not users


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_stay_under_400_lines(package):
    long = [f"{p.relative_to(ROOT)}: {n}" for p in modules(package)
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long
