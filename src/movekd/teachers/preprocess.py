"""Batched image preprocessing on tensors: resize, centre crop or pad, normalise.

It reproduces the model libraries' own processors, on tensors and on the model's device:

- ``shortest_crop`` = HF ``CLIPImageProcessor`` (shortest edge, centre crop) and timm's eval
  transform (``crop_pct``: resize the shortest side to ``floor(size / crop_pct)``, then crop).
- ``longest_pad`` = HF ``SamImageProcessor`` (longest edge to ``size``, rounded half up; normalise;
  pad bottom/right with 0, i.e. with the mean colour).

Resizing is torchvision's antialiased ``resize``. A ``uint8`` batch is resized in ``uint8`` (rounded
like PIL and like transformers' torchvision backend, which this equals exactly); a float batch (0..1)
is resized in float, as timm's transforms do on tensors. PIL differs from the ``uint8`` path by at
most a couple of grey levels on a fraction of a percent of pixels (its own integer rounding).

The centre crop offset is ``(H - S) // 2`` (transformers' rule; torchvision rounds half to even,
which differs by one pixel only when the margin ``H - S`` is odd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_INTERP = {"bicubic": "BICUBIC", "bilinear": "BILINEAR"}


def _resize(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    import torchvision.transforms.v2.functional as tvF

    mode = getattr(tvF.InterpolationMode, _INTERP[interpolation])
    return tvF.resize(images, list(size), interpolation=mode, antialias=True)


def shortest_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(h, w) with the shortest side ``short`` (long side truncated, as torchvision / transformers)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def longest_side_size(height: int, width: int, long: int) -> tuple[int, int]:
    """(h, w) with the longest side ``long`` (rounded half up, as SAM's processor)."""
    scale = long / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess_images(
    images: torch.Tensor,
    *,
    image_size: int,
    resize: str = "shortest_crop",
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    mean: tuple[float, ...] = (0.0, 0.0, 0.0),
    std: tuple[float, ...] = (1.0, 1.0, 1.0),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[B, 3, H, W]`` uint8 (0..255) or float (0..1) → normalised ``[B, 3, S, S]`` in ``dtype``."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    is_uint8 = images.dtype == torch.uint8
    if not is_uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 (0..255) or floating point (0..1), got {images.dtype}")
    if not is_uint8:
        images = images.float()
    height, width = images.shape[-2:]
    S = image_size

    if resize == "shortest_crop":
        import math

        short = math.floor(S / crop_pct) if crop_pct < 1.0 else S
        images = _resize(images, shortest_side_size(height, width, short), interpolation)
        top, left = (images.shape[-2] - S) // 2, (images.shape[-1] - S) // 2
        images = images[..., top:top + S, left:left + S]
    elif resize == "longest_pad":
        images = _resize(images, longest_side_size(height, width, S), interpolation)
    else:
        raise ValueError(f"unknown resize mode {resize!r}")

    # Normalise in float32 whatever the model dtype; uint8 uses the fused form of transformers'
    # processors ((x - 255 m) / (255 s)), so the result is bit-identical to theirs.
    scale = 255.0 if is_uint8 else 1.0
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * scale
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * scale
    out = (images.float() - m) / s

    if resize == "longest_pad":
        pad_h, pad_w = S - out.shape[-2], S - out.shape[-1]
        if pad_h or pad_w:
            out = F.pad(out, (0, pad_w, 0, pad_h), value=0.0)
    return out.to(dtype)


@dataclass(frozen=True)
class _Params:
    image_size: int
    resize: str
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


class Preprocessor(nn.Module):
    """A teacher's (or the student's) preprocessing as a module without state (nothing to save)."""

    def __init__(self, image_size: int, resize: str = "shortest_crop", crop_pct: float = 1.0,
                 interpolation: str = "bicubic", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__()
        self.params = _Params(int(image_size), resize, float(crop_pct), interpolation, tuple(mean), tuple(std))

    @classmethod
    def from_spec(cls, spec) -> "Preprocessor":
        return cls(spec.image_size, spec.resize, spec.crop_pct, spec.interpolation, spec.mean, spec.std)

    def forward(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        p = self.params
        return preprocess_images(images, image_size=p.image_size, resize=p.resize, crop_pct=p.crop_pct,
                                 interpolation=p.interpolation, mean=p.mean, std=p.std, dtype=dtype)

    def extra_repr(self) -> str:
        p = self.params
        return f"size={p.image_size}, resize={p.resize}, crop_pct={p.crop_pct}, interpolation={p.interpolation}"
