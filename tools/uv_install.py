"""Install requirement files into this interpreter's venv with uv, using the indexes pip is set up with.

Used by the Makefile to build ``.venv``: uv unpacks the ~5 GB of pinned wheels (torch's CUDA build and
its nvidia-* libraries) in parallel and does not byte-compile them; measured 18 s against pip's 117 s
for ``requirements/lock.txt`` (2026-12-03, 2-core AMD EPYC, local wheel mirror, empty uv cache). uv does
not read pip's configuration, so the index settings pip would use (``pip config list`` and the
``PIP_*`` environment) are passed on: index URL, extra index URLs, find-links and constraint files.
pip picks the best version over all its indexes, which is uv's ``unsafe-best-match`` strategy.

    python tools/uv_install.py [--no-deps] -r requirements/lock.txt ...

Exit status: uv's (the Makefile falls back to pip when it is not 0); 2 when uv is not installed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# pip setting -> (uv option, whether it holds several whitespace-separated values)
_OPTIONS = {
    "index-url": ("--index-url", False),
    "extra-index-url": ("--extra-index-url", True),
    "find-links": ("--find-links", True),
    "constraint": ("--constraint", True),
}


def parse_pip_config(listing: str) -> dict[str, str]:
    """``{setting: value}`` from ``pip config list`` output (``global.find-links='/opt/wheels'`` and
    ``:env:.find-links='...'`` lines); an ``:env:`` line wins over a file's, as in pip, else the later
    line (``install`` after ``global``)."""
    settings: dict[str, str] = {}
    from_env: set[str] = set()
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, name = key.strip().rpartition(".")
        if section not in ("global", "install", ":env:"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if section == ":env:":
            from_env.add(name)
        elif name in from_env:
            continue
        settings[name] = value
    return settings


def uv_index_args(settings: dict[str, str]) -> list[str]:
    """uv options giving uv the indexes of ``settings`` (pip's names, as :func:`parse_pip_config`)."""
    args: list[str] = []
    for name, (option, several) in _OPTIONS.items():
        value = settings.get(name, "").strip()
        if not value:
            continue
        for item in (value.split() if several else [value]):
            args += [option, item]
    if "--extra-index-url" in args or "--find-links" in args:  # several sources: pip's best-version rule
        args += ["--index-strategy", "unsafe-best-match"]
    return args


def pip_settings() -> dict[str, str]:
    """pip's effective install settings: its config files, then the ``PIP_*`` environment."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                             text=True, check=False).stdout
    settings = parse_pip_config(listing)
    for name in _OPTIONS:
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env:
            settings[name] = env
    return settings


def main(argv: list[str]) -> int:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        print("uv_install: uv is not installed", file=sys.stderr)
        return 2
    command = [uv, "pip", "install", "--quiet", "--python", sys.executable, *uv_index_args(pip_settings()), *argv]
    print("uv_install:", shlex.join(command[1:]), file=sys.stderr)
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
