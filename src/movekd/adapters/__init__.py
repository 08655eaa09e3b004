"""Encoder adapters: map each teacher's tokens ``[B, N_t, C_t]`` to the student's ``[B, N, D]``.

``build_adapter(name, teacher_channels, teacher_grid, student_dim, student_grid, **kw)`` with name
``"token_mix"`` (official: channel Linear, GELU, token Linear; tied to one grid) or ``"resample_mlp"``
(resolution-agnostic: resample the grid, then a per-token 2-layer MLP).
"""

from movekd.adapters.registry import ADAPTERS, build_adapter, register_adapter
from movekd.adapters.resample_mlp import ResampleMLPAdapter, resample_tokens
from movekd.adapters.token_mix import TokenMixAdapter

__all__ = [
    "ADAPTERS",
    "ResampleMLPAdapter",
    "TokenMixAdapter",
    "build_adapter",
    "register_adapter",
    "resample_tokens",
]
