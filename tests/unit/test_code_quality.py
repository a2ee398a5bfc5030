"""The core stays ruff- and mypy-clean (STYLE.md), checked with the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    exe = BIN / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed (pip install -e '.[test]')")
    return found


def test_ruff_clean():
    r = subprocess.run([tool("ruff"), "check", "monitor", "plugins", "tests", "bench"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


@pytest.mark.timeout(600)
def test_mypy_clean_core():
    r = subprocess.run([tool("mypy"), "monitor"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


@pytest.mark.timeout(300)
def test_layers_hold():
    """The import-linter contracts in pyproject.toml: no lower layer imports a higher one, the core
    imports no layer, no circle between sibling modules (it fails naming the import that breaks one)."""
    r = subprocess.run([tool("lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_every_core_module_is_in_the_core_contract():
    """A new top-level module of ``monitor`` is core and must be listed, or the contract would not see it;
    so must a sub-package that is no layer (``monitor.fate``)."""
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    core = next(c for c in contracts if c["type"] == "forbidden")["source_modules"]
    layers = {m.strip() for c in contracts if c["type"] == "layers" for layer in c["layers"] for m in layer.split("|")}
    on_disk = {f"monitor.{p.stem}" for p in (REPO / "monitor").glob("*.py") if p.stem not in ("__init__", "__main__")}
    on_disk |= {f"monitor.{p.name}" for p in (REPO / "monitor").iterdir()
                if (p / "__init__.py").is_file() and f"monitor.{p.name}" not in layers}
    assert set(core) == on_disk


def test_no_getattr_probe_of_a_plugin():
    """Optional plugin members are declared with defaults (monitor.protocols); the core reads them
    directly. ``complete()`` is the one place that looks them up."""
    probes = ("wants_calls", "record_of_truth", "encode_prepared", "to_device", "cache_id", "specificity", '"prepare"', '"index"', '"path"')
    found = []
    for p in list((REPO / "monitor").rglob("*.py")):
        if p.name == "protocols.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "getattr(" in line and "_font(" not in line and any(name in line for name in probes):  # a font is no plugin
                found.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert found == []


@pytest.mark.timeout(300)
def test_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link, anchor or page in docs/ fails the suite."""
    r = subprocess.run([tool("mkdocs"), "build", "--strict", "-d", str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
                       env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (tmp_path / "site" / "benchmarks" / "index.html").exists()


def test_readme_quick_start_is_what_ci_runs():
    """The README's test command is the one `.ci/run` runs, word for word."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    line = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    assert line in readme and line in ci
