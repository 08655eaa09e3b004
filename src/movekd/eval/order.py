"""Evaluation order: samples batched with others of about the same length.

Batched greedy generation left-pads every prompt of a batch to the batch's longest, and the prefill
(the whole prompt through the LLM) is most of an evaluation's time. Under AnyRes an image becomes
as many crops' worth of tokens as its aspect ratio's tile grid gives (``movekd.data.anyres``), so a
batch drawn in file order is padded to its largest grid (``demo_next``'s five canvas shapes give 3 to
5 crops per image). Sorting by the image's crop count, then by the
prompt's word count, makes each batch nearly uniform. Predictions are keyed by sample index, so the
order changes no score (up to the float rounding of differently shaped batches).

The key needs no decoding: PIL reads an image's size from its header. An unreadable image sorts
first; the dataset then skips it and counts it, as in any order.
"""

from __future__ import annotations

import os
from typing import Sequence

from movekd.data.llava_json import resolve_image


def _prompt_words(sample: dict) -> int:
    return sum(len(turn["value"].split()) for turn in sample["conversations"][:-1])


def _crops(sample: dict, image_root: str | os.PathLike, grid_pinpoints, crop_size: int) -> int:
    if sample.get("image") is None:
        return 1
    from PIL import Image

    from movekd.data.anyres import num_crops

    try:
        with Image.open(resolve_image(sample, image_root)) as img:
            width, height = img.size
    except Exception:  # missing or corrupt: the dataset reports it when the batch is built
        return 0
    return num_crops((height, width), grid_pinpoints, crop_size)


def length_sorted_order(samples: Sequence[dict], *, image_root: str | os.PathLike = ".",
                        image_aspect_ratio: str = "stretch", grid_pinpoints=None, crop_size: int = 224) -> list[int]:
    """Sample indices sorted by (AnyRes crop count, prompt words); stable, so ties keep file order."""
    if image_aspect_ratio == "anyres" and grid_pinpoints:
        keys = [(_crops(s, image_root, grid_pinpoints, crop_size), _prompt_words(s)) for s in samples]
    else:
        keys = [(0, _prompt_words(s)) for s in samples]
    return sorted(range(len(samples)), key=keys.__getitem__)
