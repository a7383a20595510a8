"""The bench wing's place in the package: every bench lives in aimpre/bench/, imports only downward, and ships.

Imports are read with ``ast`` from the source files (function-level imports included), so the test fails as soon as
someone adds an upward import, wherever in a module it sits.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it is installed as (pyproject's package-dir)
WINGS = {
    "kernels": "aimpre.kernels",
    "scaling": "aimpre.scaling",
    "aimpre/model": "aimpre.model",
    "aimpre/data": "aimpre.data",
    "aimpre/train": "aimpre.train",
    "aimpre/objectives": "aimpre.objectives",
    "aimpre/eval": "aimpre.eval",
}
ABOVE = ("aimpre.bench", "aimpre.cli", "aimpre.gpucheck")  # what the wings must not import


def _imports(path: Path, package: str) -> set[str]:
    """Every module ``path`` (a module of ``package``) imports, absolute, with ``from X import y`` also as X.y
    (``from aimpre import bench`` is an import of aimpre.bench)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            out |= {base, *(f"{base}.{a.name}" for a in node.names)}
    return out


def _upward(module: str, above: tuple[str, ...]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in above)


def _modules(folder: str, package: str) -> list[tuple[Path, str]]:
    files = sorted((ROOT / folder).rglob("*.py"))
    return [(f, ".".join([package, *f.relative_to(ROOT / folder).parent.parts])) for f in files]


def test_the_wings_import_no_bench_and_no_cli() -> None:
    """Nothing in kernels/, scaling/ or aimpre/{model,data,train,objectives,eval} imports a bench, the CLI or the GPU
    check; the benches import neither the CLI nor the check; the check does not import the CLI."""
    checks = [(f, pkg, ABOVE) for folder, package in WINGS.items() for f, pkg in _modules(folder, package)]
    checks += [(f, pkg, ("aimpre.cli", "aimpre.gpucheck")) for f, pkg in _modules("aimpre/bench", "aimpre.bench")]
    checks.append((ROOT / "aimpre/gpucheck.py", "aimpre", ("aimpre.cli",)))
    assert len(checks) > 50  # the walk found the wings
    bad = [
        f"{f.relative_to(ROOT)} imports {m}"
        for f, pkg, above in checks
        for m in sorted(_imports(f, pkg))
        if _upward(m, above)
    ]
    assert not bad, bad


def test_the_import_walk_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The walk itself: an import inside a function and a relative one are both seen."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from aimpre.bench.timing import cell\n\nfrom .. import cli\nfrom . import x\n")
    found = _imports(f, "aimpre.train")
    assert {"aimpre.bench.timing", "aimpre.cli", "aimpre.train.x"} <= found
    assert _upward("aimpre.bench.timing", ABOVE) and not _upward("aimpre.benchmarks", ABOVE)


def test_every_bench_lives_in_the_bench_wing() -> None:
    """No module named bench* outside aimpre/bench/ (where kernels/, aimpre/train, aimpre/data and scaling/ each
    had one)."""
    stray = [
        str(f.relative_to(ROOT))
        for folder in (*WINGS, "aimpre")
        for f in (ROOT / folder).rglob("bench*.py")
        if "bench" not in f.relative_to(ROOT).parts[:-1]
    ]
    assert not stray, stray
    assert {p.stem for p in (ROOT / "aimpre/bench").glob("*.py")} >= {
        "timing",
        "attention",
        "ops",
        "step",
        "fp8",
        "loader",
        "fit",
    }


def test_pyproject_ships_every_package() -> None:
    """Every folder with an ``__init__.py`` under aimpre/, kernels/ and scaling/ is in setuptools' package list, so
    a non-editable ``pip install .`` ships it (aimpre.bench, and aimpre.eval, which the list once lacked)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {v: k for k, v in setup["package-dir"].items()}  # source folder -> package
    found = {
        ".".join([package, *init.parent.relative_to(ROOT / folder).parts])
        for folder, package in dirs.items()
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert {"aimpre", "aimpre.bench", "aimpre.kernels", "aimpre.scaling"} <= found
    assert found <= set(setup["packages"]), sorted(found - set(setup["packages"]))
