"""KD loss L_kd (paper Eq. 2): token- and teacher-weighted MSE between student and teacher tokens.

Eq. 2:  L_kd = sum_i W^(tea)_i sum_j (W^(tok)_j + 1/n) MSE(V^(t)_{i,j}, V^(s)_j),
per sample, then (official code, official-movekd.md §7) averaged over the batch. MSE is per token,
averaged over channels, on raw (unnormalised) features. lambda_kd (Eq. 5) is applied by the caller.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _per_token_mse(student: Tensor, teachers: Sequence[Tensor]) -> Tensor:
    """``l[b, k, j] = mean_d (S[b,j,d] - T_k[b,j,d])^2`` in float32, shape ``[B, K, N]``."""
    if len(teachers) == 0:
        raise ValueError("kd_loss needs at least one teacher")
    s = student.float()
    out = []
    for k, t in enumerate(teachers):
        if t.shape != student.shape:
            raise ValueError(
                f"teacher {k} tokens have shape {tuple(t.shape)}, student has {tuple(student.shape)}; "
                "adapt teacher tokens to the student grid and width first"
            )
        out.append((s - t.float()).square().mean(dim=-1))
    return torch.stack(out, dim=1)


def kd_loss_per_teacher(student: Tensor, teachers: Sequence[Tensor], token_weight: Tensor | None = None) -> Tensor:
    """Unweighted per-teacher KD terms ``L[b, k] = sum_j (w_j + 1/n) l[b, k, j]``, shape ``[B, K]``.

    Without ``token_weight`` this is the plain per-token MSE averaged over tokens. Useful for logging
    how far the student is from each teacher.
    """
    per_token = _per_token_mse(student, teachers)  # [B, K, N]
    loss = per_token.mean(dim=-1)  # the 1/n term of Eq. 2
    if token_weight is not None:
        if token_weight.shape != per_token[:, 0].shape:
            raise ValueError(
                f"token_weight must be [B, N] = {tuple(per_token[:, 0].shape)}, got {tuple(token_weight.shape)}"
            )
        loss = loss + (token_weight.float()[:, None, :] * per_token).sum(dim=-1)
    return loss


def kd_loss(
    student: Tensor,
    teachers: Sequence[Tensor],
    token_weight: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Eq. 2, averaged over the batch.

    Args:
        student: student patch tokens ``[B, N, D]``.
        teachers: K adapted teacher token tensors ``[B, N, D]`` (index 0 the CLIP-role teacher).
        token_weight: ``[B, N]`` (Eq. 3); when given, each token counts ``w_j + 1/n`` instead of ``1/n``.
        teacher_weight: ``[B, K]`` (Eq. 4); uniform ``1/K`` when omitted.
        reduction: ``"mean"``: scalar ``mean_b sum_k W[b,k] L[b,k]``; ``"none"``: the ``[B, K]`` terms
            ``W[b,k] L[b,k]`` whose ``.sum(1).mean()`` is that scalar (see ``kd_loss_per_teacher``
            for the unweighted ``L``).

    Returns:
        float32 scalar (or ``[B, K]``). Multiply by lambda_kd (0.5 in the paper) yourself.
    """
    per_teacher = kd_loss_per_teacher(student, teachers, token_weight)  # [B, K]
    if teacher_weight is None:
        weighted = per_teacher / per_teacher.shape[1]
    else:
        if teacher_weight.shape != per_teacher.shape:
            raise ValueError(
                f"teacher_weight must be [B, K] = {tuple(per_teacher.shape)}, got {tuple(teacher_weight.shape)}"
            )
        weighted = teacher_weight.float() * per_teacher
    if reduction == "none":
        return weighted
    if reduction == "mean":
        return weighted.sum(dim=1).mean()
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'none'")
