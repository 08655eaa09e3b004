"""The Makefile's run environment: what `make demo` / `make test` set for speed (README "Performance")."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _recipe(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "movekd demo" in line or "pytest" in line]
    assert lines, out
    return lines[-1]


def test_demo_runs_with_mimalloc_kept_mapped_and_cached_bytecode():
    line = _recipe("demo")
    assert "MIMALLOC_PURGE_DELAY=-1" in line and "PYTHONPYCACHEPREFIX=" in line
    assert "-u PYTHONDONTWRITEBYTECODE" in line
    assert "MIMALLOC_PURGE_DELAY=-1" in _recipe("test")


def test_mimalloc_reads_the_purge_delay():
    """The option name is mimalloc's own: with a wrong name the setting would silently do nothing."""
    line = _recipe("demo")
    preload = re.search(r"LD_PRELOAD=(\S+)", line)
    if preload is None or not Path(preload.group(1)).is_file():
        pytest.skip("no mimalloc in .venv (make install puts it there)")
    env = {**os.environ, "LD_PRELOAD": preload.group(1), "MIMALLOC_VERBOSE": "1", "MIMALLOC_PURGE_DELAY": "-1"}
    out = subprocess.run(["true"], env=env, capture_output=True, text=True)
    assert re.search(r"option 'purge_delay': -1\b", out.stderr + out.stdout), out.stderr[-2000:]
