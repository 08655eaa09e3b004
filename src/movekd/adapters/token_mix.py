"""The official encoder adapter (official-movekd.md §3): channel Linear -> GELU -> token Linear.

The paper (§3.2) calls the adapter "a two-layer MLP"; the code's second layer mixes *tokens*:

  u = ( GELU( (t W1^T + b1)^T ) W2^T + b2 )^T,   t: [B, N_t, C_t] -> u: [B, N, D]

W1: C_t -> D over channels, W2: N_t -> N over the token axis. The token Linear is the only thing that
brings e.g. EVA's 64x64 grid to CLIP's 24x24, so the adapter is tied to one teacher grid and one
student grid (a learned, position-specific resampling). Sizes at paper scale: EVA 3,409,472, ConvNeXt
3,737,152, SAM 2,623,040 parameters. ``resample_mlp`` is the resolution-agnostic alternative.
"""

from __future__ import annotations

from torch import Tensor, nn

from movekd.adapters.registry import register_adapter


@register_adapter("token_mix")
class TokenMixAdapter(nn.Module):
    """Official adapter: ``channel_proj`` (C_t -> D), exact-erf GELU, ``token_proj`` (N_t -> N).

    Official parameter names are ``{teacher}_adapter_1`` (= ``channel_proj``) and ``{teacher}_adapter_2``
    (= ``token_proj``); the init is PyTorch's ``nn.Linear`` default, as there.
    """

    def __init__(
        self,
        teacher_channels: int,
        teacher_grid: tuple[int, int],
        student_dim: int,
        student_grid: tuple[int, int],
    ) -> None:
        super().__init__()
        self.teacher_grid = tuple(teacher_grid)
        self.student_grid = tuple(student_grid)
        self.teacher_channels = teacher_channels
        self.teacher_tokens = teacher_grid[0] * teacher_grid[1]
        self.student_tokens = student_grid[0] * student_grid[1]
        self.channel_proj = nn.Linear(teacher_channels, student_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as the official nn.GELU()
        self.token_proj = nn.Linear(self.teacher_tokens, self.student_tokens)

    def forward(
        self, tokens: Tensor, teacher_grid: tuple[int, int] | None = None, student_grid: tuple[int, int] | None = None
    ) -> Tensor:
        """``[B, N_t, C_t]`` -> ``[B, N, D]``; the grids, if given, must be the ones built for."""
        if tokens.dim() != 3 or tokens.shape[1:] != (self.teacher_tokens, self.teacher_channels):
            raise ValueError(
                f"token_mix adapter expects teacher tokens [B, {self.teacher_tokens}, {self.teacher_channels}] "
                f"(grid {self.teacher_grid[0]}x{self.teacher_grid[1]}), got {list(tokens.shape)}; it is tied to "
                "one teacher grid (use 'resample_mlp' for other resolutions)"
            )
        grids = (("teacher", teacher_grid, self.teacher_grid), ("student", student_grid, self.student_grid))
        for which, given, built in grids:
            if given is not None and tuple(given) != built:
                raise ValueError(f"token_mix adapter was built for {which} grid {built}, got {tuple(given)}")
        h = self.act(self.channel_proj(tokens))  # [B, N_t, D]; GELU is elementwise, transpose later
        return self.token_proj(h.transpose(1, 2)).transpose(1, 2)  # mix over tokens: [B, N, D]

    def extra_repr(self) -> str:
        return f"teacher_grid={self.teacher_grid}, student_grid={self.student_grid}"
