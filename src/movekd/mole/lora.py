"""One LoRA expert half: ``lora(z) = scaling * (B (A z + a) + b)`` with ``scaling = alpha / rank``.

As in the official code (official-movekd.md §4) both low-rank maps are ``nn.Linear`` *with* bias and
the biases are scaled too. Parameter names ``lora_A`` / ``lora_B`` match the official checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LORA_INITS = ("paper", "zero_b")


class LoRAExpert(nn.Module):
    """Low-rank residual ``in_features -> rank -> out_features`` (one expert on one of fc1 / fc2).

    Dropout on the input is applied by the owning ``MoLEFFN`` (one mask per token, shared by the
    experts), so this module is a pure affine map; ``forward`` is the plain reference computation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        init: str = "paper",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=True, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=True, device=device, dtype=dtype)
        self.rank = rank
        self.scaling = alpha / rank
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "paper") -> None:
        """``"paper"``: official init, both A and B ~ U(+-sqrt(6 / fan_in)) (kaiming-uniform, relu
        gain), biases zero: the student differs from its base model at step 0.
        ``"zero_b"``: A as above, B weight and bias zero: output unchanged at step 0 (usual LoRA)."""
        if init not in LORA_INITS:
            raise ValueError(f"unknown LoRA init {init!r}; expected one of {LORA_INITS}")
        nn.init.kaiming_uniform_(self.lora_A.weight, a=0.0, nonlinearity="relu")
        nn.init.zeros_(self.lora_A.bias)
        if init == "paper":
            nn.init.kaiming_uniform_(self.lora_B.weight, a=0.0, nonlinearity="relu")
        else:
            nn.init.zeros_(self.lora_B.weight)
        nn.init.zeros_(self.lora_B.bias)

    def forward(self, z: Tensor) -> Tensor:
        return self.scaling * self.lora_B(self.lora_A(z))

    def delta_weight(self) -> tuple[Tensor, Tensor]:
        """The expert as a dense update of the wrapped Linear: ``(scaling * B A, scaling * (B a + b))``.

        Used to fold the expert into its own copy of fc1 / fc2 for inference. Computed in float32.
        """
        a_w, a_b = self.lora_A.weight.float(), self.lora_A.bias.float()
        b_w, b_b = self.lora_B.weight.float(), self.lora_B.bias.float()
        return self.scaling * (b_w @ a_w), self.scaling * (b_w @ a_b + b_b)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"
