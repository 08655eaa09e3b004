"""Token weight W^(tok) (paper Eq. 3): how much each patch token counts in the KD loss (Eq. 2).

Paper, Eq. 3:  W^(tok) = Softmax( (V_cls W_Q) (V_res W_V)^T / sqrt(d) ), over the n patch tokens.

The official code does not build that from W_V. It takes the CLIP teacher's ordinary attention
probabilities at the distilled layer (softmax of Q K^T / sqrt(d_h) over all 1+n keys), averages the
heads, keeps the CLS query row over the patch keys, and applies a *second* softmax over those n
entries (official-movekd.md §5). Since the entries are probabilities in [0, 1], the result is close
to uniform (w_i / w_j <= e). ``token_weight(attn)`` reproduces that; ``mode="renorm"`` keeps the
attention map's shape instead (restrict to patch keys and renormalise to sum 1), and
``token_weight_qv`` is Eq. 3 literally, for callers that can supply the projected query and values.
"""

from __future__ import annotations

import torch
from torch import Tensor

TOKEN_WEIGHT_MODES = ("official", "renorm")


def token_weight(attn: Tensor, mode: str = "official") -> Tensor:
    """Per-token KD weight from the CLIP-role teacher's [CLS] attention (Eq. 3 as the code does it).

    Args:
        attn: attention probabilities at the distilled layer, ``[B, H, 1+N, 1+N]`` (index 0 = CLS),
            or only the CLS query rows ``[B, H, 1+N]`` (saves keeping the full map around).
        mode: ``"official"``: mean over heads, CLS row, patch keys ``[:, 0, 1:]``, then softmax over
            the N entries (double softmax, near uniform). ``"renorm"``: same row, divided by its sum,
            so the weights keep the attention map's contrast and sum to 1.

    Returns:
        ``[B, N]`` float32 weights, each row summing to 1. Not differentiable in practice (the teacher
        runs under no_grad), but nothing here detaches.
    """
    if attn.dim() == 4:
        row = attn[:, :, 0, 1:]  # CLS query, patch keys: [B, H, N]
    elif attn.dim() == 3:
        row = attn[:, :, 1:]
    else:
        raise ValueError(f"attn must be [B, H, 1+N, 1+N] or [B, H, 1+N], got {tuple(attn.shape)}")
    # Average only the row we need (not the whole map), in float32: the second softmax of values
    # in [0, 1] is near uniform and bf16 cannot resolve the differences.
    a = row.float().mean(dim=1)  # [B, N]
    if mode == "official":
        return torch.softmax(a, dim=-1)
    if mode == "renorm":
        return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    raise ValueError(f"unknown token_weight mode {mode!r}; expected one of {TOKEN_WEIGHT_MODES}")


def token_weight_qv(query: Tensor, values: Tensor, scale: float | None = None) -> Tensor:
    """Eq. 3 literally: softmax over patches of (V_cls W_Q)(V_res W_V)^T / sqrt(d), mean over heads.

    Args:
        query: the CLS token's projected query, ``[B, H, d_h]`` (or ``[B, d]`` for one head).
        values: the patch tokens' projected values, ``[B, H, N, d_h]`` (or ``[B, N, d]``).
        scale: logit scale; default ``d_h ** -0.5`` as in Eq. 3.

    Returns:
        ``[B, N]`` float32 weights summing to 1.
    """
    if query.dim() == 2:
        query, values = query[:, None], values[:, None]
    if query.dim() != 3 or values.dim() != 4 or values.shape[:2] != query.shape[:2]:
        raise ValueError(
            f"expected query [B, H, d_h] and values [B, H, N, d_h], got {tuple(query.shape)} and "
            f"{tuple(values.shape)}"
        )
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhd,bhnd->bhn", query.float(), values.float()) * scale
    return torch.softmax(logits, dim=-1).mean(dim=1)
