"""Text-guided token weight: the alternative to Eq. 3 that the paper tried and rejected (§5.1).

SparseVLM-style relevance: a visual token matters as much as it resembles the question. With the
visual tokens as the LLM sees them (``v_i``: the student's tokens after the projector, ``[B, N, H]``)
and the prompt's text tokens (``t_j``: the LLM's input embeddings, ``[B, L, H]``, mask ``m_j``)::

    s_i = sum_j m_j cos(v_i, t_j) / sum_j m_j          (mean cosine similarity to the prompt)
    w_i = softmax_i(s_i / tau)                          (over the N visual tokens)

A sample without any text token gets uniform weights. The paper reports this worse than the
[CLS]-attention weight: what is foreground changes with the question, while distillation should
weight a fixed foreground.
"""

from __future__ import annotations

import torch
from torch import Tensor


def text_token_weight(visual: Tensor, text: Tensor, text_mask: Tensor, temperature: float = 0.1) -> Tensor:
    """``[B, N]`` float32 weights summing to 1 per row (see the module docstring for the formula)."""
    if visual.dim() != 3 or text.dim() != 3 or visual.shape[0] != text.shape[0] or visual.shape[-1] != text.shape[-1]:
        raise ValueError(f"expected visual [B, N, H] and text [B, L, H], got {tuple(visual.shape)} and {tuple(text.shape)}")
    if text_mask.shape != text.shape[:2]:
        raise ValueError(f"text_mask must be [B, L] = {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    v = torch.nn.functional.normalize(visual.float(), dim=-1)
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    m = text_mask.float()
    sim = torch.einsum("bnh,blh->bnl", v, t)
    score = (sim * m[:, None, :]).sum(-1) / m.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.softmax(score / temperature, dim=-1)
