"""``easyvqa-colour`` / ``easyvqa-shape``: one label per easy-vqa image (8 colours / 3 shapes),
derived from what the image's questions state (``movekd.assets.easyvqa.image_labels``), read from
the converted asset (``movekd assets``). The asset's own train/test image split is kept; images
whose label the questions leave open are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from movekd.assets.easyvqa import COLOURS, IMAGE_TOKEN, SHAPES, image_labels
from movekd.probe.datasets import ProbeData, register_probe_dataset, seeded_subset


def _split(root: Path, split: str, which: int, classes: tuple[str, ...], n: int | None, seed: int):
    from PIL import Image

    samples = json.loads((root / f"{split}.json").read_text())
    paths: dict[int, str] = {}
    questions = []
    for s in samples:
        image_id = int(Path(s["image"]).stem)
        paths[image_id] = s["image"]
        human, answer = s["conversations"][0]["value"], s["conversations"][1]["value"]
        questions.append((human.replace(IMAGE_TOKEN, "").strip(), answer, image_id))
    labelled = sorted((i, lab[which]) for i, lab in image_labels(questions).items() if lab[which] is not None)
    keep = seeded_subset(len(labelled), n, seed)
    images, labels = [], []
    for j in keep:
        image_id, word = labelled[j]
        with Image.open(root / paths[image_id]) as im:
            images.append(np.asarray(im.convert("RGB")))
        labels.append(classes.index(word))
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(labels, dtype=torch.long))


def _load(name: str, which: int, classes: tuple[str, ...], n_train, n_test, seed) -> ProbeData:
    from movekd.assets import ensure

    root = ensure("easyvqa")
    return ProbeData(name, list(classes), *_split(root, "train", which, classes, n_train, seed),
                     *_split(root, "test", which, classes, n_test, seed))


@register_probe_dataset("easyvqa-colour", "easy-vqa images, 8 colours (asset easyvqa)")
def load_colour(n_train, n_test, seed) -> ProbeData:
    return _load("easyvqa-colour", 0, COLOURS, n_train, n_test, seed)


@register_probe_dataset("easyvqa-shape", "easy-vqa images, 3 shapes (asset easyvqa)")
def load_shape(n_train, n_test, seed) -> ProbeData:
    return _load("easyvqa-shape", 1, SHAPES, n_train, n_test, seed)
