"""A resolution-agnostic encoder adapter: resample the teacher grid to the student grid, then a
2-layer MLP over channels (the paper's §3.2 description, "a two-layer MLP", applied per token).

Unlike ``token_mix`` it has no parameter tied to a grid, so one adapter serves any input resolution
(and any teacher patch size), and a token keeps its spatial position (the official token Linear can
move information between arbitrary positions).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from movekd.adapters.registry import register_adapter


def resample_tokens(tokens: Tensor, grid: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """``[B, h_t*w_t, C]`` (row-major over ``grid``) -> ``[B, h*w, C]`` on ``target``.

    Area averaging when shrinking both sides (every teacher token counts, no aliasing), bilinear
    (``align_corners=False``, antialiased if one side shrinks) otherwise.
    """
    (ht, wt), (h, w) = grid, target
    b, n, c = tokens.shape
    if n != ht * wt:
        raise ValueError(f"tokens have {n} positions, which is not the teacher grid {ht}x{wt}")
    if (ht, wt) == (h, w):
        return tokens
    image = tokens.transpose(1, 2).reshape(b, c, ht, wt)
    if h <= ht and w <= wt:
        image = F.adaptive_avg_pool2d(image, (h, w))
    else:
        image = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False, antialias=h < ht or w < wt)
    return image.flatten(2).transpose(1, 2)


@register_adapter("resample_mlp")
class ResampleMLPAdapter(nn.Module):
    """Resample to the student grid, then ``fc1`` (C_t -> D), GELU, ``fc2`` (D -> D) per token.

    ``teacher_grid`` / ``student_grid`` given at construction are defaults for ``forward``; any grid
    works at call time.
    """

    def __init__(
        self,
        teacher_channels: int,
        teacher_grid: tuple[int, int],
        student_dim: int,
        student_grid: tuple[int, int],
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or student_dim
        self.teacher_grid = tuple(teacher_grid)
        self.student_grid = tuple(student_grid)
        self.teacher_channels = teacher_channels
        self.fc1 = nn.Linear(teacher_channels, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, student_dim)

    def forward(
        self, tokens: Tensor, teacher_grid: tuple[int, int] | None = None, student_grid: tuple[int, int] | None = None
    ) -> Tensor:
        """``[B, h_t*w_t, C_t]`` -> ``[B, h*w, D]``."""
        grid = tuple(teacher_grid) if teacher_grid is not None else self.teacher_grid
        target = tuple(student_grid) if student_grid is not None else self.student_grid
        if tokens.dim() != 3 or tokens.shape[-1] != self.teacher_channels:
            raise ValueError(
                f"resample_mlp adapter expects tokens [B, N, {self.teacher_channels}], got {list(tokens.shape)}"
            )
        # fc1 and both resamplings are linear and their weights sum to 1 per output position, so
        # fc1(resample(t)) == resample(fc1(t)): run fc1 on whichever grid has fewer tokens.
        if grid[0] * grid[1] > target[0] * target[1]:
            h = self.fc1(resample_tokens(tokens, grid, target))
        else:
            h = resample_tokens(self.fc1(tokens), grid, target)
        return self.fc2(self.act(h))

    def extra_repr(self) -> str:
        return f"teacher_grid={self.teacher_grid}, student_grid={self.student_grid}"
