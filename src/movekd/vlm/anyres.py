"""LLaVA-NeXT's packing of AnyRes features into one token sequence per image (``spatial_unpad``).

Given the projected tokens of every crop (:mod:`movekd.data.anyres`: overview first, then the tiles
row by row, each crop a ``g × g`` token grid), an image's sequence is, as in HF
``LlavaNextModel.pack_image_features``:

    overview tokens (g·g)  +  for each row of the tiles' joint token grid (unpadded): the row, then
    ``image_newline``

The tiles' tokens are laid out as one ``(rows·g) × (cols·g)`` grid; :func:`unpad_bounds` cuts the
rows (or columns) that the processor's black padding produced, with HF's ``unpad_image`` rounding.
An image with a single crop (a text-only sample's blank) is its tokens plus one ``image_newline``
(HF's branch for ``num_patches == 1``). ``image_newline`` is a learnt vector of the LLM's width,
initialised ``N(0, 1/d)`` as HF does, trained with the projector (LLaVA-NeXT's ``tune_mm_mlp_adapter``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from movekd.data.anyres import AnyResImages, check_pinpoints, grid_shape


def unpad_bounds(original_size: tuple[int, int], current: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the unpadded region of a ``current`` ``(h, w)`` feature grid
    for an image of ``original_size`` ``(height, width)`` (HF ``unpad_image``)."""
    height, width = original_size
    cur_h, cur_w = current
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def count_tokens(original_size: tuple[int, int], pinpoints, crop_size: int, token_grid: int) -> int:
    """Tokens an image of ``original_size`` ``(height, width)`` becomes (HF
    ``LlavaNextProcessor._get_number_of_features`` with the CLS dropped): the overview's ``g·g``, then
    the unpadded tile grid's rows, each with its ``image_newline``."""
    rows, cols = grid_shape(original_size, pinpoints, crop_size)
    g = token_grid
    top, bottom, left, right = unpad_bounds(original_size, (rows * g, cols * g))
    return g * g + (bottom - top) * (right - left + 1)


class AnyResPacker(nn.Module):
    """Holds ``image_newline`` and the grid settings; :meth:`pack` builds each image's sequence.

    Args:
        pinpoints: ``[[height, width], ...]`` multiples of ``crop_size``.
        crop_size: the student's input side ``S``.
        token_grid: the student's tokens per side ``g`` (``S / patch``).
        hidden_size: the LLM's width (the projected tokens' width).
    """

    def __init__(self, pinpoints, crop_size: int, token_grid: int, hidden_size: int):
        super().__init__()
        self.pinpoints = check_pinpoints(pinpoints, crop_size)
        self.crop_size = int(crop_size)
        self.token_grid = int(token_grid)
        self.image_newline = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))

    def num_tokens(self, original_size: tuple[int, int]) -> int:
        """Tokens of an image of ``original_size`` (:func:`count_tokens`)."""
        return count_tokens(original_size, self.pinpoints, self.crop_size, self.token_grid)

    def token_counter(self) -> Callable[[tuple[int, int]], int]:
        """:meth:`num_tokens` as a plain function of the size, without the module: what a dataset
        holds to fit ``max_length`` to each image (picklable for DataLoader workers; no parameters)."""
        return partial(count_tokens, pinpoints=[list(p) for p in self.pinpoints], crop_size=self.crop_size,
                       token_grid=self.token_grid)

    def max_tokens(self) -> int:
        """An upper bound of :meth:`num_tokens` over all sizes (the unpadded grid at its largest)."""
        g = self.token_grid
        return g * g + max((h // self.crop_size) * g * ((w // self.crop_size) * g + 1) for h, w in self.pinpoints)

    def pack(self, features: Tensor, images: AnyResImages) -> list[Tensor]:
        """``features`` ``[C, g·g, D]`` (the crops of ``images``) → one ``[N_b, D]`` per image."""
        g = self.token_grid
        if features.shape[1] != g * g:
            raise ValueError(f"anyres: {features.shape[1]} tokens per crop, expected {g}x{g} (a projector that "
                             "pools tokens cannot be tiled)")
        newline = self.image_newline.to(features.dtype)
        out = []
        for feats, size, count in zip(torch.split(features, images.crop_counts.tolist()),
                                      images.image_sizes.tolist(), images.crop_counts.tolist()):
            if count == 1:
                out.append(torch.cat([feats[0], newline[None]]))
                continue
            rows, cols = grid_shape(tuple(size), self.pinpoints, self.crop_size)
            if count != 1 + rows * cols:
                raise ValueError(f"anyres: an image of size {tuple(size)} has {count} crops, expected "
                                 f"1 + {rows}x{cols} for image_grid_pinpoints {self.pinpoints}")
            tiles = feats[1:].reshape(rows, cols, g, g, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * g, cols * g)
            top, bottom, left, right = unpad_bounds(tuple(size), (rows * g, cols * g))
            tiles = tiles[:, top:bottom, left:right]
            tiles = torch.cat([tiles, newline[:, None, None].expand(-1, tiles.shape[1], 1)], dim=2)
            out.append(torch.cat([feats[0], tiles.flatten(1).transpose(0, 1)]))
        return out
