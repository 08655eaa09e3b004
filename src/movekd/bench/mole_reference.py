"""A straightforward sparse MoLE FFN, the way the official code computes it: a bench reference.

The official ``MoE_LoRA_CLIP`` (official-movekd.md §4, "Forward, sparse mode") runs the base linear on
every token, then for each expert finds the tokens routed to it (``torch.where(index == e)``), runs that
expert's LoRA (with its own input dropout) on the gathered rows and writes the result into a zero
tensor of the output's size at those rows (an index-put scatter), and adds the two:

    h = fc1(x) + scatter_e(down_e(drop(x[rows_e])));  a = act(h);  y = fc2(a) + scatter_e(up_e(drop(a[rows_e])))

``IndexScatterMoLE`` is our own plain restatement of that, sharing the weights of a ``MoLEFFN`` so
``movekd bench mole`` can time both on the same parameters and a test can check they agree. It is not
used for training: the H-wide zero tensor, the H-wide gathers and scatters and the separate add are
exactly the passes ``movekd.mole.kernels.mole_linear`` avoids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from movekd.mole.layer import MoLEFFN


class IndexScatterMoLE(nn.Module):
    """Sparse top-1 MoLE FFN computed per expert by boolean index and scatter (official approach).

    Wraps the modules of ``mole`` (shared, not copied) under the same names, so ``fc1``/``fc2`` keep
    their parameter names. Router probabilities of the last forward are kept in ``router_probs``
    (float32 ``[..., E]``) for the balance loss.
    """

    def __init__(self, mole: MoLEFFN) -> None:
        super().__init__()
        if mole.routing != "sparse":
            raise ValueError(f"IndexScatterMoLE implements sparse routing only, got routing={mole.routing!r}")
        self.fc1, self.fc2, self.router = mole.fc1, mole.fc2, mole.router
        self.moe_down, self.moe_up = mole.moe_down, mole.moe_up
        self.mid = nn.ModuleList(getattr(mole, name) for name in mole._mid_names)
        self.post = nn.ModuleList(getattr(mole, name) for name in mole._post_names)
        self.num_experts = mole.num_experts
        self.lora_dropout = mole.lora_dropout
        self.router_probs: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        # Softmax in float32 like MoLEFFN, so both pick the same expert under bf16 autocast.
        probs = torch.softmax(self.router(x).float(), dim=-1)
        self.router_probs = probs
        index = probs.argmax(-1)
        h = self._routed_linear(x, self.fc1, self.moe_down, index)
        for module in self.mid:
            h = module(h)
        y = self._routed_linear(h, self.fc2, self.moe_up, index)
        for module in self.post:
            y = module(y)
        return y

    def _routed_linear(self, z: Tensor, base: nn.Linear, experts: nn.ModuleList, index: Tensor) -> Tensor:
        out = base(z)
        lora = torch.zeros_like(out)
        for e in range(self.num_experts):
            rows = torch.where(index == e)  # (batch indices, token indices)
            picked = F.dropout(z[rows], self.lora_dropout, self.training)
            lora[rows] = experts[e](picked).to(lora.dtype)
        return out + lora
