"""Cost of a MoLE FFN against the plain FFN it wraps, at CLIP ViT-L shapes by default.

Both modules share the same fc1/fc2 weights and run in the same process, interleaved (plain, MoLE,
plain, MoLE, ...) so drift on a shared machine hits both; each figure is the median of ``repeats``.

- inference: ``eval()`` + ``torch.inference_mode()``, one forward (the default grouped path).
- inference_folded: the same with ``fold_inference=True`` (sparse routing only): every expert folded
  into its own copy of fc1/fc2, pre-packed on CPU; no LoRA FLOPs, E extra copies of the FFN weights.
- train: ``train()``, forward + backward of ``sum(y * g)`` (+ 0.01 * balance loss for MoLE), every
  parameter trainable and the input requiring grad (what a block in the middle of a ViT sees:
  stage-2 finetuning). No optimizer step.
- train_frozen_base: the same with fc1/fc2 frozen (stage 1: only the MoLE trains).

On a shared machine prefer ``min_ratio``: with 2 threads and another busy process, every parallel
region waits for a descheduled thread, which penalises MoLE's extra small ops far beyond their cost.
glibc's allocator also adds page faults that differ between the two (jemalloc or
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` remove them); the figures include them.
"""

from __future__ import annotations

import copy
import contextlib
import statistics
import time
from typing import Callable

import torch
from torch import nn

from movekd.functional import balance_loss
from movekd.mole.inject import wrap_ffn


class _PlainFFN(nn.Module):
    """CLIP's MLP: fc1 -> quick_gelu -> fc2 (what ``inject_mole`` wraps in CLIP-L)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPMLP
        from transformers import CLIPVisionConfig

        config = CLIPVisionConfig(
            hidden_size=dim, intermediate_size=hidden, num_attention_heads=1, hidden_act="quick_gelu"
        )
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _forward_gflops(tokens: int, dim: int, hidden: int, experts: int, rank: int, routing: str) -> dict:
    """Analytic forward GFLOPs (2 per multiply-add; FlopCounterMode misses the in-place/out= GEMMs)."""
    plain = 2 * tokens * (dim * hidden + hidden * dim)
    lora = 2 * tokens * (dim * rank + rank * hidden + hidden * rank + rank * dim)
    active = 1 if routing in ("sparse", "gated") else experts  # stacked modes run every expert
    return {"plain": plain / 1e9, "mole": (plain + 2 * tokens * dim * experts + active * lora) / 1e9}


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_mole_bench(
    tokens: int = 577,
    batch: int = 1,
    repeats: int = 7,
    warmup: int = 2,
    dim: int = 1024,
    hidden: int = 4096,
    num_experts: int = 3,
    rank: int = 32,
    routing: str = "sparse",
    dropout: float = 0.05,
    precision: str = "fp32",
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """Time the plain FFN and its MoLE version; return medians (seconds), ratios and forward FLOPs.

    Returns a dict with ``config``, ``seconds`` (medians, ``{mode: {"plain": s, "mole": s}}``),
    ``ratio`` (``{mode: mole / plain}`` of the medians), ``min_seconds`` / ``min_ratio`` (the same for
    the fastest run, less sensitive to other processes on a shared machine) and ``gflops`` (analytic,
    one forward each, ``{"plain": ..., "mole": ...}``); modes are ``inference``, ``train`` and
    ``train_frozen_base`` (and ``inference_folded`` for sparse routing).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        torch.manual_seed(seed)
        plain = _PlainFFN(dim, hidden)
        mole = wrap_ffn(
            copy.deepcopy(plain.mlp), num_experts=num_experts, rank=rank, dropout=dropout,
            routing=routing,
        )
        folded = None
        if routing == "sparse":
            folded = copy.deepcopy(mole)
            folded.fold_inference = True
        x = torch.randn(batch, tokens, dim)
        grad = torch.randn(batch, tokens, dim)

        def autocast():
            if precision == "bf16":
                return torch.autocast(x.device.type, dtype=torch.bfloat16)
            return contextlib.nullcontext()

        def infer(module: nn.Module) -> Callable[[], None]:
            def run() -> None:
                module.eval()
                with torch.inference_mode(), autocast():
                    module(x)
            return run

        def train(module: nn.Module, frozen_base: bool) -> Callable[[], None]:
            def run() -> None:
                module.train()
                for name, p in module.named_parameters():
                    p.requires_grad_(not (frozen_base and name.split(".")[-2] in ("fc1", "fc2")))
                    p.grad = None
                xi = x.detach().requires_grad_(True)
                with autocast():
                    y = module(xi)
                loss = (y.float() * grad).sum()
                if module is mole:
                    loss = loss + 0.01 * balance_loss([mole.router_probs])
                loss.backward()
            return run

        cases = {
            "inference": (infer(plain), infer(mole)),
            **({"inference_folded": (infer(plain), infer(folded))} if folded is not None else {}),
            "train": (train(plain, False), train(mole, False)),
            "train_frozen_base": (train(plain, True), train(mole, True)),
        }
        seconds: dict[str, dict[str, float]] = {}
        fastest: dict[str, dict[str, float]] = {}
        for mode, (run_plain, run_mole) in cases.items():
            for _ in range(warmup):
                run_plain()
                run_mole()
            times_plain, times_mole = [], []
            for _ in range(repeats):
                times_plain.append(_timed(run_plain))
                times_mole.append(_timed(run_mole))
            seconds[mode] = {"plain": statistics.median(times_plain), "mole": statistics.median(times_mole)}
            fastest[mode] = {"plain": min(times_plain), "mole": min(times_mole)}

    finally:
        torch.set_num_threads(previous_threads)

    return {
        "config": {
            "tokens": tokens, "batch": batch, "repeats": repeats, "dim": dim, "hidden": hidden,
            "num_experts": num_experts, "rank": rank, "routing": routing, "dropout": dropout,
            "precision": precision, "threads": used_threads,
        },
        "seconds": seconds,
        "ratio": {mode: s["mole"] / s["plain"] for mode, s in seconds.items()},
        "min_seconds": fastest,
        "min_ratio": {mode: s["mole"] / s["plain"] for mode, s in fastest.items()},
        "gflops": _forward_gflops(batch * tokens, dim, hidden, num_experts, rank, routing),
    }
