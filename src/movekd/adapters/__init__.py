"""Encoder adapters: map each teacher's tokens ``[B, N_t, C_t]`` to the student's ``[B, N, D]``.

``build_adapter(name, teacher_channels, teacher_grid, student_dim, student_grid, **kw)`` with name
``"token_mix"`` (official: channel Linear, GELU, token Linear; tied to one grid) or ``"resample_mlp"``
(resolution-agnostic: resample the grid, then a per-token 2-layer MLP) or ``"interpolate"`` (no
parameters: grid and channels resampled; the paper's Table 2 baseline).
"""

from movekd.adapters.interpolate import InterpolateAdapter, resample_channels
from movekd.adapters.registry import ADAPTERS, build_adapter, register_adapter
from movekd.adapters.resample_mlp import ResampleMLPAdapter, resample_tokens
from movekd.adapters.token_mix import TokenMixAdapter

__all__ = [
    "ADAPTERS",
    "InterpolateAdapter",
    "ResampleMLPAdapter",
    "TokenMixAdapter",
    "build_adapter",
    "register_adapter",
    "resample_channels",
    "resample_tokens",
]
