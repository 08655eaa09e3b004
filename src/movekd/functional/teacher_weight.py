"""Teacher weight W^(tea) (paper Eq. 4): how much each teacher's KD term counts (Eq. 2).

Paper, Eq. 4:  W^(tea)_i = Softmax_i( mean_j <V_cls, V^(t)_{i,j}> / sqrt(d) ), with CLIP at a fixed
high weight. Official code (official-movekd.md §6): plain dot products (no 1/sqrt(d)) between the
CLIP teacher's raw CLS hidden state and every teacher's tokens (adapter outputs for k >= 1), mean over
tokens; softmax over the non-CLIP teachers only; then a batch-level "flatten" hack: if the batch mean
of that softmax exceeds 0.8 for some teacher, softmax it once more (the code adds 0.2 first, which a
softmax ignores). Finally CLIP gets the fixed ``alpha`` and the others share ``1 - alpha``.
The result is not detached: its gradient reaches the adapters through the scores.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def teacher_weight(
    cls: Tensor,
    tokens: Sequence[Tensor],
    alpha: float = 0.8,
    adaptive: bool = True,
    *,
    flatten_threshold: float | None = 0.8,
    scale: float | None = None,
) -> Tensor:
    """Per-sample teacher weights ``[B, K]`` (Eq. 4 as the official code does it).

    Args:
        cls: the CLIP-role teacher's CLS hidden state at the distilled layer, ``[B, D]``.
        tokens: K tensors ``[B, N, D]``; index 0 is the CLIP-role teacher's own patch tokens (its score
            is not used: CLIP's weight is the constant ``alpha``), the others the adapted tokens.
        alpha: fixed weight of teacher 0 (official ``kd_memory_w`` 0.8).
        adaptive: False gives ``[alpha, (1-alpha)/(K-1), ...]`` (official ``--teacher_weight False``).
        flatten_threshold: the official batch-level hack; ``None`` disables it.
        scale: multiply the scores by this before the softmax; official ``None`` (1), Eq. 4 says
            ``D ** -0.5``.

    Returns:
        ``[B, K]`` float32; ``[B, 1]`` of ones when K = 1.
    """
    k = len(tokens)
    if k == 0:
        raise ValueError("teacher_weight needs at least one teacher")
    batch = cls.shape[0]
    if k == 1:
        return torch.ones(batch, 1, device=cls.device, dtype=torch.float32)
    if not adaptive:
        rest = torch.full((batch, k - 1), (1.0 - alpha) / (k - 1), device=cls.device)
        return torch.cat([torch.full((batch, 1), alpha, device=cls.device), rest], dim=1)
    for i, t in enumerate(tokens[1:], start=1):
        if t.dim() != 3 or t.shape[0] != batch or t.shape[-1] != cls.shape[-1]:
            raise ValueError(
                f"teacher {i}: expected tokens [B={batch}, N, D={cls.shape[-1]}], got {tuple(t.shape)}"
            )
    c = cls.float()
    # mean_j <cls, t_j> == <cls, mean_j t_j>: one reduction over tokens instead of N dot products;
    # ``dtype=`` accumulates bf16 inputs in float32 without materialising a float32 copy.
    scores = torch.stack([(t.mean(dim=1, dtype=torch.float32) * c).sum(-1) for t in tokens[1:]], dim=1)
    if scale is not None:
        scores = scores * scale
    p = torch.softmax(scores, dim=-1)  # [B, K-1]
    if flatten_threshold is not None:
        # Batch-level condition, so a sample's weights depend on the rest of the batch (as in the
        # official code). torch.where instead of `if` keeps this traceable (no host sync).
        fire = p.mean(dim=0).max() > flatten_threshold
        p = torch.where(fire, torch.softmax(p, dim=-1), p)
    head = torch.full((batch, 1), alpha, device=cls.device, dtype=torch.float32)
    return torch.cat([head, (1.0 - alpha) * p], dim=1)
