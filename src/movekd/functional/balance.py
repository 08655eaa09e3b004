"""Load-balance loss of the MoLE routers (official code; the paper's Eq. 5 omits it).

Official (official-movekd.md §4): for each sample, flatten the router probabilities of every MoLE
layer and token, then  bal_b = sum_e mean(p_e) * mean(onehot(argmax p)_e),  with the one-hot
frequency detached; the loss is the batch mean, added with weight 0.01. Unlike Switch Transformer
there is no factor E, so a perfectly balanced router scores 1/E and a collapsed one 1.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def balance_loss(router_probs: Sequence[Tensor] | Tensor) -> Tensor:
    """Official balance loss over all MoLE layers.

    Args:
        router_probs: per-layer softmax probabilities ``[B, S, E]`` (as returned by
            ``movekd.mole.collect_router_probs``), or one such tensor. Layers may have different
            token counts S: they are concatenated over the token axis, so each token of each layer
            counts once (identical to the official stack-and-flatten when all S are equal).

    Returns:
        float32 scalar in [1/E, 1]; the gradient reaches the routers through ``mean(p_e)`` only.
    """
    if isinstance(router_probs, Tensor):
        router_probs = [router_probs]
    if len(router_probs) == 0:
        raise ValueError(
            "balance_loss got no router probabilities; were they collected after a training-mode "
            "forward of a model with MoLE layers?"
        )
    probs = torch.cat([p.float().flatten(1, -2) for p in router_probs], dim=1)  # [B, L*S, E]
    num_experts = probs.shape[-1]
    importance = probs.mean(dim=1)  # [B, E], differentiable
    with torch.no_grad():
        load = F.one_hot(probs.argmax(dim=-1), num_experts).float().mean(dim=1)  # [B, E], detached
    return (importance * load).sum(dim=-1).mean()
