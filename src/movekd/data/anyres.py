"""LLaVA-NeXT's AnyRes tiling (``image_aspect_ratio: anyres``): an image becomes a low-resolution
overview plus high-resolution tiles, every crop at the student's input side ``S``.

Behaviour of Hugging Face ``LlavaNextImageProcessor`` (transformers 5, torchvision backend), which
follows LLaVA-NeXT's ``process_anyres_image``:

1. :func:`select_best_resolution`: among ``image_grid_pinpoints`` (``[height, width]``, multiples of
   ``S``) the one that keeps most of the image's pixels when it is fitted inside, ties broken by
   the least wasted area.
2. The image is resized into that resolution keeping its aspect ratio (:func:`fit_size`: the
   limiting side exactly, the other ``ceil``-ed), antialiased bicubic on uint8, then padded with
   black to the full resolution, centred (``divmod`` of the margin: the extra pixel goes right/bottom).
3. The padded image is cut into ``S × S`` tiles in row-major order.
4. The overview is the whole image resized (stretched) to ``S × S``; it comes first.

The model side (unpadding of the tile features, the ``image_newline`` per row) is in
:mod:`movekd.vlm.anyres`. :class:`AnyResImages` is how a batch carries the crops: the crops of
every image concatenated, with each image's original size and crop count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

# LLaVA-NeXT's default grid (its 336-px pinpoints [[336, 672], [672, 336], [672, 672], [1008, 336],
# [336, 1008]]) in units of the crop side.
DEFAULT_GRID = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def default_pinpoints(crop_size: int) -> list[list[int]]:
    """LLaVA-NeXT's default pinpoints for a ``crop_size`` encoder (``[[S, 2S], [2S, S], ...]``)."""
    return [[rows * crop_size, cols * crop_size] for rows, cols in DEFAULT_GRID]


def check_pinpoints(pinpoints: Sequence[Sequence[int]], crop_size: int, *, key: str = "image_grid_pinpoints"
                    ) -> list[list[int]]:
    """``pinpoints`` as a list of ``[height, width]``, each a positive multiple of ``crop_size``;
    otherwise a ``ValueError`` naming ``key`` and the bad entry."""
    out = []
    if not pinpoints:
        raise ValueError(f"{key}: empty; give [height, width] pairs, multiples of the crop side {crop_size}")
    for entry in pinpoints:
        if len(entry) != 2 or any(int(v) <= 0 or int(v) % crop_size for v in entry):
            raise ValueError(f"{key}: {list(entry)} is not a [height, width] pair of positive multiples of the "
                             f"crop side {crop_size} (the student's image_size)")
        out.append([int(entry[0]), int(entry[1])])
    return out


def select_best_resolution(original_size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` for an image of ``original_size`` ``(height, width)``: most
    effective pixels (the image fitted inside, never more than it has), then least waste."""
    height, width = original_size
    best, best_effective, best_waste = None, 0, float("inf")
    for target_h, target_w in pinpoints:
        scale = min(target_w / width, target_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = target_h * target_w - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(target_h), int(target_w)), effective, waste
    return best


def fit_size(original_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of the image resized into ``target`` keeping its aspect ratio."""
    height, width = original_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def grid_shape(original_size: tuple[int, int], pinpoints, crop_size: int) -> tuple[int, int]:
    """``(rows, cols)`` of tiles for an image of ``original_size`` (HF ``get_anyres_image_grid_shape``)."""
    best_h, best_w = select_best_resolution(original_size, pinpoints)
    return best_h // crop_size, best_w // crop_size


def num_crops(original_size: tuple[int, int], pinpoints, crop_size: int) -> int:
    """Overview + tiles (HF ``image_size_to_num_patches``)."""
    rows, cols = grid_shape(original_size, pinpoints, crop_size)
    return 1 + rows * cols


def anyres_crops(image: torch.Tensor, pinpoints, crop_size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """``uint8 [3, H, W]`` → ``uint8 [1 + rows·cols, 3, S, S]``: the overview, then the tiles row by row."""
    from movekd.teachers.preprocess import _resize

    height, width = image.shape[-2:]
    best = select_best_resolution((height, width), pinpoints)
    new_h, new_w = fit_size((height, width), best)
    resized = _resize(image, (new_h, new_w), interpolation)
    top, bottom = divmod(best[0] - new_h, 2)
    left, right = divmod(best[1] - new_w, 2)
    padded = torch.nn.functional.pad(resized, (left, left + right, top, top + bottom), value=0)
    tiles = [padded[:, i:i + crop_size, j:j + crop_size]
             for i in range(0, best[0], crop_size) for j in range(0, best[1], crop_size)]
    overview = _resize(image, (crop_size, crop_size), interpolation)
    return torch.stack([overview, *tiles]).contiguous()


@dataclass
class AnyResImages:
    """A batch of AnyRes images: ``crops`` ``uint8 [C, 3, S, S]`` (each image's overview then its
    tiles, images one after the other), ``image_sizes`` ``long [B, 2]`` (original height, width) and
    ``crop_counts`` ``long [B]`` (``sum == C``). A text-only sample holds one blank crop."""

    crops: torch.Tensor
    image_sizes: torch.Tensor
    crop_counts: torch.Tensor

    def __post_init__(self):
        if int(self.crop_counts.sum()) != self.crops.shape[0] or self.image_sizes.shape[0] != self.crop_counts.shape[0]:
            raise ValueError(f"AnyResImages: {self.crops.shape[0]} crops, counts {self.crop_counts.tolist()}, "
                             f"{self.image_sizes.shape[0]} image sizes")

    @classmethod
    def single(cls, crops: torch.Tensor, size: tuple[int, int]) -> "AnyResImages":
        return cls(crops, torch.tensor([list(size)], dtype=torch.long), torch.tensor([crops.shape[0]]))

    @classmethod
    def blank(cls, crop_size: int) -> "AnyResImages":
        return cls.single(torch.zeros(1, 3, crop_size, crop_size, dtype=torch.uint8), (crop_size, crop_size))

    @classmethod
    def cat(cls, items: Sequence["AnyResImages"], crop_size: int = 0) -> "AnyResImages":
        if not items:
            return cls(torch.zeros(0, 3, crop_size, crop_size, dtype=torch.uint8),
                       torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        return cls(torch.cat([i.crops for i in items]), torch.cat([i.image_sizes for i in items]),
                   torch.cat([i.crop_counts for i in items]))

    def __len__(self) -> int:
        return int(self.crop_counts.shape[0])

    @property
    def device(self) -> torch.device:
        return self.crops.device

    def to(self, *args, **kwargs) -> "AnyResImages":
        crops = self.crops.to(*args, **kwargs)
        return AnyResImages(crops, self.image_sizes.to(crops.device), self.crop_counts.to(crops.device))

    def image_of_crop(self) -> torch.Tensor:
        """``long [C]``: the image each crop belongs to."""
        return torch.repeat_interleave(torch.arange(len(self), device=self.crop_counts.device), self.crop_counts)

    def is_overview(self) -> torch.Tensor:
        """``bool [C]``: True on each image's first crop (its overview)."""
        first = torch.zeros(self.crops.shape[0], dtype=torch.bool, device=self.crop_counts.device)
        starts = torch.cumsum(self.crop_counts, 0) - self.crop_counts
        first[starts[self.crop_counts > 0]] = True
        return first

    def select(self, keep: torch.Tensor) -> "AnyResImages":
        """The images where ``keep`` (``bool [B]``) is True."""
        keep = keep.to(self.crop_counts.device)
        return AnyResImages(self.crops[keep[self.image_of_crop()].to(self.crops.device)],
                            self.image_sizes[keep], self.crop_counts[keep])
