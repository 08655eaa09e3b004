"""Registry of probe datasets: name -> loader ``(n_train, n_test, seed) -> ProbeData``.

One file per source; each registers its datasets with :func:`register_probe_dataset`. Splits are
fixed: the source's own train/test split when it has one, a seeded subset of each (``n_train`` /
``n_test`` images; None = all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from movekd.errors import UserError


class ProbeDatasetError(UserError, ValueError):
    """A probe dataset is unknown or its files are missing; the message says how to get them."""


@dataclass
class ProbeData:
    name: str
    classes: list[str]
    train_images: torch.Tensor  # uint8 [N, 3, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def summary(self) -> dict:
        return {"dataset": self.name, "classes": len(self.classes), "train": len(self.train_labels),
                "test": len(self.test_labels), "image": list(self.train_images.shape[1:])}


Loader = Callable[[int | None, int | None, int], ProbeData]
PROBE_DATASETS: dict[str, Loader] = {}
DESCRIPTIONS: dict[str, str] = {}


def register_probe_dataset(name: str, description: str) -> Callable[[Loader], Loader]:
    def add(fn: Loader) -> Loader:
        if name in PROBE_DATASETS:
            raise ValueError(f"probe dataset {name!r} is already registered")
        PROBE_DATASETS[name], DESCRIPTIONS[name] = fn, description
        return fn

    return add


def seeded_subset(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``n`` out of ``n_total`` (all if None or larger)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


def load_probe_dataset(name: str, n_train: int | None = 500, n_test: int | None = 250, seed: int = 0) -> ProbeData:
    _import_sources()
    if name not in PROBE_DATASETS:
        raise ProbeDatasetError(f"unknown probe dataset {name!r}; available: {', '.join(sorted(PROBE_DATASETS))}")
    return PROBE_DATASETS[name](n_train, n_test, seed)


def list_probe_datasets() -> dict[str, str]:
    _import_sources()
    return dict(sorted(DESCRIPTIONS.items()))


def _import_sources() -> None:
    from movekd.probe.datasets import easyvqa, fashion_mnist, squares  # noqa: F401
