"""``squares``: synthetic coloured squares on white (4 colours), generated from the seed.

Needs no files: for tests and for checking a probe set-up end to end in seconds.
"""

from __future__ import annotations

import numpy as np
import torch

from movekd.probe.datasets import ProbeData, register_probe_dataset

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "black": (20, 20, 20)}


def _images(n: int, rng: np.random.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    labels = rng.integers(0, len(COLOURS), size=n)
    images = np.full((n, size, size, 3), 255, np.uint8)
    rgb = np.array(list(COLOURS.values()), np.uint8)
    for i, label in enumerate(labels):
        side = int(rng.integers(size // 4, size // 2 + 1))
        y, x = rng.integers(0, size - side + 1, size=2)
        images[i, y:y + side, x:x + side] = rgb[label]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()


@register_probe_dataset("squares", "synthetic coloured squares, 4 colours (no files needed)")
def load(n_train: int | None, n_test: int | None, seed: int) -> ProbeData:
    rng = np.random.default_rng(seed)
    train = _images(n_train or 200, rng)
    test = _images(n_test or 100, rng)
    return ProbeData("squares", list(COLOURS), *train, *test)
