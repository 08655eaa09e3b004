"""How a decoded image becomes the fixed-size square the data workers hand to every model.

``image_aspect_ratio`` (a stage, eval, and the saved bundle's option), LLaVA's names:

- ``"stretch"``: resize to ``size × size`` ignoring the aspect ratio (PIL bicubic); movekd's
  historical behaviour and the default. A square image is only resized, as in the other modes.
- ``"square"``: LLaVA's default (``image_aspect_ratio`` unset, the official stage 1): the CLIP
  processor's own resize of the shortest side to ``size`` and centre crop of ``size × size``.
- ``"pad"``: LLaVA's ``expand2square`` (official stage 2 and evaluation): paste the image in the
  middle of a square of its longest side filled with the processor's mean colour
  (``int(mean * 255)`` per channel, LLaVA's rounding), then resize to ``size × size``.

The mode is applied once, here, so the student and every teacher see the same content; each
model's own preprocessing (:mod:`movekd.teachers.preprocess`) then only resizes the square. With
several models the fill colour is the *student's* mean (LLaVA pads with its vision tower's
processor mean). The official MoVE-KD code pads each teacher with its own processor's mean and
crops or pads per teacher in stage 1 (research/official-movekd.md §2, §11.11): the same image except
for SAM, whose ImageNet-mean padding differs from CLIP's by a few grey levels, and which, in the
official stage 1, saw a longest-side pad instead of the others' crop.

``square`` and ``pad`` resize with torchvision's antialiased bicubic on ``uint8`` (the transformers
torchvision backend's own resize, bit-exact); ``stretch`` keeps PIL's resize so that existing runs do
not change. When ``size`` differs from a model's input size, that model resizes once more (a
documented approximation of resizing the original once; ``size`` defaults to the largest model input).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SQUARE_ASPECT_RATIOS = ("stretch", "square", "pad")  # one square image each
IMAGE_ASPECT_RATIOS = (*SQUARE_ASPECT_RATIOS, "anyres")  # anyres: overview + tiles (movekd.data.anyres)


def fill_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """LLaVA's padding colour for a processor mean on 0..1: ``tuple(int(x * 255) for x in mean)``."""
    return tuple(int(x * 255) for x in mean)


def expand2square(img, fill: tuple[int, int, int]):
    """LLaVA's ``expand2square``: a square PIL image of the longest side, ``img`` pasted centred."""
    from PIL import Image

    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), tuple(fill))
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def _to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def prepare_image(img, mode: str, fill: Sequence[int], size: int, grid_pinpoints=None):
    """An RGB PIL image → ``uint8 [3, size, size]`` by ``mode`` (see the module docstring).

    ``fill``: the ``pad`` colour in 0..255 (:func:`fill_colour` of the student's mean). ``"anyres"``
    returns :class:`movekd.data.anyres.AnyResImages` of one image instead: its overview and tiles at
    ``size`` (the crop side) for ``grid_pinpoints``.
    """
    from movekd.teachers.preprocess import _resize, shortest_side_size

    if mode == "anyres":
        from movekd.data.anyres import AnyResImages, anyres_crops

        if not grid_pinpoints:
            raise ValueError("image_aspect_ratio 'anyres' needs image_grid_pinpoints")
        image = _to_tensor(img)
        return AnyResImages.single(anyres_crops(image, grid_pinpoints, size), tuple(image.shape[-2:]))

    if mode == "stretch":
        from PIL import Image

        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        return _to_tensor(img)
    if mode == "pad":
        return _resize(_to_tensor(expand2square(img, fill)), (size, size), "bicubic")
    if mode == "square":
        image = _to_tensor(img)
        image = _resize(image, shortest_side_size(image.shape[-2], image.shape[-1], size), "bicubic")
        top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2  # transformers' offsets
        return image[:, top:top + size, left:left + size].contiguous()
    raise ValueError(f"unknown image_aspect_ratio {mode!r}; expected one of {', '.join(IMAGE_ASPECT_RATIOS)}")
