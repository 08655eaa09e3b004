"""A parameter-free adapter: the paper's "KD by interpolation" baseline (Table 2, first row).

Teacher tokens are resampled to the student grid exactly as in ``resample_mlp``
(:func:`resample_tokens`: area averaging when shrinking, bilinear otherwise), then the channel axis
is resampled to the student width the same way, treating channels as a 1-D signal: adaptive average
pooling when the teacher is wider (every teacher channel counts once, e.g. 1280 -> 384 averages
groups of 3-4 neighbouring channels), linear interpolation (``align_corners=False``) when narrower.
The paper does not say how its interpolation baseline matches widths; this is our choice, and it
has no parameters, so the student alone must move towards the teachers' features.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from movekd.adapters.registry import register_adapter
from movekd.adapters.resample_mlp import resample_tokens


def resample_channels(tokens: Tensor, width: int) -> Tensor:
    """``[B, N, C]`` -> ``[B, N, width]`` (average pooling when shrinking, linear when growing)."""
    b, n, c = tokens.shape
    if c == width:
        return tokens
    flat = tokens.reshape(b * n, 1, c)
    flat = F.adaptive_avg_pool1d(flat, width) if width < c else F.interpolate(flat, size=width, mode="linear",
                                                                               align_corners=False)
    return flat.reshape(b, n, width)


@register_adapter("interpolate")
class InterpolateAdapter(nn.Module):
    """Resample tokens to the student grid and channels to the student width; no parameters."""

    def __init__(self, teacher_channels: int, teacher_grid: tuple[int, int], student_dim: int,
                 student_grid: tuple[int, int]) -> None:
        super().__init__()
        self.teacher_channels, self.student_dim = teacher_channels, student_dim
        self.teacher_grid, self.student_grid = tuple(teacher_grid), tuple(student_grid)

    def forward(self, tokens: Tensor, teacher_grid: tuple[int, int] | None = None,
                student_grid: tuple[int, int] | None = None) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.teacher_channels:
            raise ValueError(
                f"interpolate adapter expects tokens [B, N, {self.teacher_channels}], got {list(tokens.shape)}")
        grid = tuple(teacher_grid) if teacher_grid is not None else self.teacher_grid
        target = tuple(student_grid) if student_grid is not None else self.student_grid
        # Channels first when they shrink, so the spatial resampling runs on the narrower tensor.
        if self.student_dim < self.teacher_channels:
            return resample_tokens(resample_channels(tokens, self.student_dim), grid, target)
        return resample_channels(resample_tokens(tokens, grid, target), self.student_dim)

    def extra_repr(self) -> str:
        return (f"channels {self.teacher_channels}->{self.student_dim}, grid {self.teacher_grid}->"
                f"{self.student_grid}")
