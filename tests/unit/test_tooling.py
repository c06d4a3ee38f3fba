"""The linter, the formatter and the type checker pass on the repository, with the configuration of
pyproject.toml and no arguments but the repository (what a contributor types, what CI runs).
Each test also checks that the tool looked at what it should: an exclude that drops a folder
would otherwise pass silently."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINTED = ("vllm_plugin", "analysis", "tests", "scripts", "notebooks")  # every folder of Python or notebooks
TYPED = ("vllm_plugin", "analysis")  # pyproject.toml: [tool.mypy] files
SKIPPED_PARTS = {"__pycache__", ".ipynb_checkpoints"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def _sources(folders: tuple[str, ...], suffixes: tuple[str, ...]) -> set[Path]:
    return {
        p.resolve()
        for folder in folders
        for p in (REPO / folder).rglob("*")
        if p.suffix in suffixes and p.is_file() and not SKIPPED_PARTS & set(p.relative_to(REPO).parts)
    }


def _report(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"


def test_ruff_check_passes():
    r = _run("ruff", "check", ".")
    assert r.returncode == 0, _report(r)


def test_ruff_format_check_passes():
    r = _run("ruff", "format", "--check", ".")
    assert r.returncode == 0, _report(r)


def test_ruff_sees_every_source_file():
    r = _run("ruff", "check", "--show-files", ".")
    assert r.returncode == 0, _report(r)
    shown = {Path(line).resolve() for line in r.stdout.splitlines() if line.strip()}
    missing = sorted(str(p.relative_to(REPO)) for p in _sources(LINTED, (".py", ".ipynb")) - shown)
    assert not missing, f"ruff skips {missing}"


def test_mypy_passes_on_the_configured_packages():
    r = _run("mypy")
    assert r.returncode == 0, _report(r)
    m = re.search(r"no issues found in (\d+) source files?", r.stdout)
    assert m, _report(r)
    assert int(m.group(1)) == len(_sources(TYPED, (".py",))), _report(r)
