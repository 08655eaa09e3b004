"""``fashion-mnist``: Zalando's Fashion-MNIST (MIT), read from the Debian package
``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) or from a folder named by
``$MOVEKD_FASHION_MNIST`` holding the four IDX files (``train-images-idx3-ubyte[.gz]`` ...).
Greyscale 28x28 images are repeated to 3 channels.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from movekd.probe.datasets import ProbeData, ProbeDatasetError, register_probe_dataset, seeded_subset

CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DEBIAN_DIRS = ("/usr/share/dataset-fashion-mnist", "/usr/share/fashion-mnist", "/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find(root: Path, stem: str) -> Path | None:
    for path in sorted(root.rglob(f"{stem}*")):
        if path.name in (stem, stem + ".gz"):
            return path
    return None


def _read_idx(path: Path) -> np.ndarray:
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if data[2] != 0x08:
        raise ProbeDatasetError(f"{path}: not an unsigned-byte IDX file")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def locate() -> Path:
    candidates = ([os.environ["MOVEKD_FASHION_MNIST"]] if os.environ.get("MOVEKD_FASHION_MNIST") else []) + list(DEBIAN_DIRS)
    for folder in map(Path, candidates):
        if folder.is_dir() and all(_find(folder, stem) for pair in FILES.values() for stem in pair):
            return folder
    raise ProbeDatasetError(
        "fashion-mnist: IDX files not found in " + ", ".join(candidates)
        + "; install the Debian package (apt-get install dataset-fashion-mnist) or set MOVEKD_FASHION_MNIST "
        "to a folder holding train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), t10k-*")


@register_probe_dataset("fashion-mnist", "Fashion-MNIST, 10 classes (Debian dataset-fashion-mnist)")
def load(n_train: int | None, n_test: int | None, seed: int) -> ProbeData:
    root = locate()
    splits = []
    for split, n in (("train", n_train), ("test", n_test)):
        images = _read_idx(_find(root, FILES[split][0]))
        labels = _read_idx(_find(root, FILES[split][1]))
        keep = seeded_subset(len(labels), n, seed)
        grey = torch.from_numpy(images[keep].copy())[:, None]
        splits += [grey.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels[keep].astype(np.int64))]
    return ProbeData("fashion-mnist", CLASSES, *splits)
