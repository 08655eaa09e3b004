"""Vision → LLM projectors (LLaVA's ``mm_projector``), built by name.

``mlp2x_gelu`` is ``Linear(D_v, D_llm) → GELU → Linear(D_llm, D_llm)`` as an ``nn.Sequential``, so
its state-dict keys (``0.weight``, ``2.weight``, ...) match LLaVA's ``model.mm_projector.*`` and an
official projector can be loaded after stripping that prefix. ``mlp{N}x_gelu`` generalises to N
linear layers (LLaVA's regex). ``linear`` is a single ``Linear(D_v, D_llm)``.

``pool{K}_{name}`` (e.g. ``pool2_mlp2x_gelu``) first average-pools the square token grid by K x K
(64 tokens of an 8 x 8 grid become 16), then applies ``{name}``: the LLM sees K² times fewer image
tokens, while the KD loss still uses every student token.

Every projector carries ``.config = {"type", "in_dim", "out_dim"}``, from which
:func:`build_projector` rebuilds it (used by :mod:`movekd.vlm.io`).
"""

from __future__ import annotations

import math
import re
from typing import Callable

from torch import nn

_PROJECTORS: dict[str, Callable[[int, int], nn.Module]] = {}


def register_projector(name: str):
    """Decorator: register ``fn(in_dim, out_dim) -> nn.Module`` under ``name``."""

    def deco(fn):
        if name in _PROJECTORS:
            raise ValueError(f"projector {name!r} is already registered")
        _PROJECTORS[name] = fn
        return fn

    return deco


def list_projectors() -> list[str]:
    return sorted(_PROJECTORS) + ["mlp{N}x_gelu"]


def _mlp_gelu(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


@register_projector("linear")
def linear_projector(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


@register_projector("mlp2x_gelu")
def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    return _mlp_gelu(2, in_dim, out_dim)


@register_projector("identity")
def identity_projector(in_dim: int, out_dim: int) -> nn.Module:
    if in_dim != out_dim:
        raise ValueError(f"identity projector needs in_dim == out_dim, got {in_dim} and {out_dim}")
    return nn.Identity()


class GridPoolProjector(nn.Module):
    """K x K average pooling of a square row-major token grid, then a projector."""

    def __init__(self, pool: int, inner: nn.Module):
        super().__init__()
        self.pool = pool
        self.inner = inner

    def forward(self, tokens):
        batch, count, dim = tokens.shape
        side = math.isqrt(count)
        if side * side != count or side % self.pool:
            raise ValueError(f"pool{self.pool} projector needs a square grid divisible by {self.pool}, "
                             f"got {count} tokens")
        grid = tokens.transpose(1, 2).reshape(batch, dim, side, side)
        pooled = nn.functional.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)
        return self.inner(pooled)


def projected_tokens(name: str, count: int) -> int:
    """How many tokens projector ``name`` hands the LLM for ``count`` vision tokens."""
    m = re.fullmatch(r"pool(\d+)_(.+)", name)
    return count // int(m.group(1)) ** 2 if m else count


def build_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """Build a registered projector (or ``mlp{N}x_gelu``); the result has a ``.config`` dict."""
    if (m := re.fullmatch(r"pool(\d+)_(.+)", name)) and int(m.group(1)) >= 1:
        module = GridPoolProjector(int(m.group(1)), build_projector(m.group(2), in_dim, out_dim))
    elif name in _PROJECTORS:
        module = _PROJECTORS[name](in_dim, out_dim)
    elif (m := re.fullmatch(r"mlp(\d+)x_gelu", name)) and int(m.group(1)) >= 1:
        module = _mlp_gelu(int(m.group(1)), in_dim, out_dim)
    else:
        raise ValueError(f"unknown projector {name!r}; available: {', '.join(list_projectors())}")
    module.config = {"type": name, "in_dim": in_dim, "out_dim": out_dim}
    return module
