"""Cost of a MoLE FFN against the plain FFN it wraps, at CLIP ViT-L shapes by default.

The variants share the same fc1/fc2 (and, for the MoLE ones, the same experts and router):

- ``plain``: the HF CLIP MLP (fc1 -> quick_gelu -> fc2), what ``inject_mole`` wraps;
- ``lora``: our ``MoLEFFN`` on its grouped path (tokens sorted by expert, one fused kernel per linear);
- ``dense_masked``: the same layer with ``grouped_kernel="dense_masked"`` (token order, every expert's
  LoRA in one GEMM per side masked by the gates: fewer GEMM calls, E times the LoRA FLOPs);
- ``folded``: the same with ``fold_inference=True`` (sparse routing, inference only): each expert
  folded into its own pre-packed copy of fc1/fc2, no LoRA FLOPs, E extra copies of the FFN weights
  (``fold_extra_bytes``);
- ``index_scatter``: the official approach written plainly (``movekd.bench.mole_reference``): base
  linear on all tokens, per-expert boolean index, LoRA on the gathered rows, scatter into a zero
  tensor, add (sparse routing only).

Modes: ``inference`` (``eval()`` + ``inference_mode``, one forward), ``train`` (``train()``, forward +
backward of ``sum(y * g)`` + 0.01 * balance loss, every parameter trainable and the input requiring
grad: a block in the middle of a ViT in stage 2) and ``train_frozen_base`` (fc1/fc2 frozen: stage 1).

For every precision, batch and mode the variants run interleaved (one run of each per repeat, in an
order rotated every repeat), so drift on a shared machine hits all of them; figures are medians over
the repeats and ratios are variant / plain. Wall time is the reported figure; process CPU time is
recorded too (``cpu_ratio``): with one thread on a loaded machine it excludes the time the process
waited for a core, so it is the steadier of the two there (with 2+ threads it also counts spin-waits).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from typing import Callable, Sequence

import torch
from torch import nn

from movekd.bench.mole_reference import IndexScatterMoLE
from movekd.functional import balance_loss
from movekd.mole.inject import wrap_ffn

PRECISIONS = ("fp32", "bf16")
MODES = ("inference", "train", "train_frozen_base")
VARIANTS = ("plain", "lora", "dense_masked", "folded", "index_scatter")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _plain_ffn(dim: int, hidden: int) -> nn.Module:
    """CLIP's MLP: fc1 -> quick_gelu -> fc2 (what ``inject_mole`` wraps in CLIP-L)."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPMLP

    config = CLIPVisionConfig(hidden_size=dim, intermediate_size=hidden, num_attention_heads=1, hidden_act="quick_gelu")
    return CLIPMLP(config)


def _forward_gflops(tokens: int, dim: int, hidden: int, experts: int, rank: int, routing: str) -> dict:
    """Analytic forward GFLOPs (2 per multiply-add; FlopCounterMode misses the in-place/out= GEMMs)."""
    plain = 2 * tokens * (dim * hidden + hidden * dim)
    lora = 2 * tokens * (dim * rank + rank * hidden + hidden * rank + rank * dim)
    active = 1 if routing in ("sparse", "gated") else experts  # stacked modes run every expert
    return {"plain": plain / 1e9, "mole": (plain + 2 * tokens * dim * experts + active * lora) / 1e9}


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def fold_extra_bytes(ffn: nn.Module, num_experts: int, dtype: torch.dtype) -> int:
    """Bytes of the E folded copies of fc1/fc2 (weights and biases) that folded inference keeps per
    FFN layer, in the compute ``dtype`` (on CPU they are stored packed, the same element count)."""
    numel = sum(p.numel() for layer in (ffn.fc1, ffn.fc2) for p in layer.parameters())
    return num_experts * numel * torch.empty((), dtype=dtype).element_size()


def run_mole_bench(
    tokens: int = 577,
    batches: Sequence[int] = (1, 8),
    precisions: Sequence[str] = PRECISIONS,
    modes: Sequence[str] = MODES,
    repeats: int = 7,
    warmup: int = 2,
    dim: int = 1024,
    hidden: int = 4096,
    num_experts: int = 3,
    rank: int = 32,
    routing: str = "sparse",
    dropout: float = 0.05,
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """Time plain, LoRA-path (both top-1 kernels), folded and index-and-scatter FFNs interleaved;
    return medians and ratios.

    Defaults are the paper preset at CLIP ViT-L/14-336 (E=3 experts, rank 32, dropout 0.05, sparse
    top-1, 577 tokens); ``modes`` is any of ``MODES``. Returns ``config``; ``cases``: one entry per (precision, batch, mode) with
    ``seconds`` / ``cpu_seconds`` (medians per variant), ``ratio`` / ``cpu_ratio`` / ``min_ratio``
    (variant / plain of the medians, of the CPU-time medians, of the fastest runs); ``fold_extra_bytes``
    and ``ffn_weight_bytes`` per precision (one FFN layer); ``gflops`` per batch (analytic forward).
    """
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ValueError(f"precision must be among {PRECISIONS}, got {list(precisions)!r}")
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes must be among {MODES}, got {list(modes)!r}")
    if not batches or any(int(b) < 1 for b in batches):
        raise ValueError(f"batches must be positive integers, got {list(batches)!r}")
    if repeats < 1 or warmup < 0 or tokens < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, tokens >= 1; got {repeats}, {warmup}, {tokens}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        torch.manual_seed(seed)
        plain = _plain_ffn(dim, hidden)
        lora = wrap_ffn(copy.deepcopy(plain), num_experts=num_experts, rank=rank, dropout=dropout, routing=routing)
        modules: dict[str, nn.Module] = {"plain": plain, "lora": lora, "dense_masked": lora}
        if routing == "sparse":
            modules["folded"] = lora  # run with fold_inference switched on (see _run_cases)
            modules["index_scatter"] = IndexScatterMoLE(lora)
        cases = []
        for precision in precisions:
            for batch in batches:
                cases += _run_cases(modules, int(batch), tokens, dim, precision, modes, repeats, warmup)
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "config": {
            "tokens": tokens, "batches": [int(b) for b in batches], "precisions": list(precisions),
            "modes": list(modes), "repeats": repeats, "dim": dim, "hidden": hidden, "num_experts": num_experts, "rank": rank,
            "routing": routing, "dropout": dropout, "threads": used_threads,
        },
        "variants": [v for v in VARIANTS if v in modules],
        "cases": cases,
        "fold_extra_bytes": {p: fold_extra_bytes(plain, num_experts, _DTYPES[p]) for p in precisions},
        "ffn_weight_bytes": {p: fold_extra_bytes(plain, 1, torch.float32) for p in precisions},
        "gflops": {str(b): _forward_gflops(int(b) * tokens, dim, hidden, num_experts, rank, routing) for b in batches},
    }


def _run_cases(
    modules: dict[str, nn.Module], batch: int, tokens: int, dim: int, precision: str, modes: Sequence[str],
    repeats: int, warmup: int,
) -> list[dict]:
    # A fresh input per run (the same one for every variant within a repeat): the routing, hence the
    # expert segment sizes, then change from run to run as they do from batch to batch in training.
    # With one fixed input every run reused the first run's segment shapes, which hid a per-shape cost
    # (oneDNN builds a GEMM kernel for every new shape in bf16 on CPU).
    generator = torch.Generator().manual_seed(batch)
    grad = torch.randn(batch, tokens, dim, generator=generator)
    current: dict[str, torch.Tensor] = {}

    def new_input() -> None:  # drawn outside the timed region
        current["x"] = torch.randn(batch, tokens, dim, generator=generator)

    def autocast():
        if precision == "bf16":
            return torch.autocast(grad.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def kernel(variant: str, module: nn.Module) -> None:
        # ``lora`` and ``dense_masked`` are one module run with either top-1 kernel
        if variant in ("lora", "dense_masked"):
            module.grouped_kernel = "dense_masked" if variant == "dense_masked" else "segments"

    def infer(module: nn.Module, fold: bool = False, variant: str = "") -> Callable[[], None]:
        def run() -> None:
            kernel(variant, module)
            module.eval()
            if fold:
                module.fold_inference = True
            try:
                with torch.inference_mode(), autocast():
                    module(current["x"])
            finally:
                if fold:
                    module.fold_inference = False
        return run

    def train(module: nn.Module, frozen_base: bool, variant: str = "") -> Callable[[], None]:
        def run() -> None:
            kernel(variant, module)
            module.train()
            for name, p in module.named_parameters():
                p.requires_grad_(not (frozen_base and name.split(".")[-2] in ("fc1", "fc2")))
                p.grad = None
            xi = current["x"].detach().requires_grad_(True)
            with autocast():
                y = module(xi)
            loss = (y.float() * grad).sum()
            probs = getattr(module, "router_probs", None)
            if probs is not None:
                loss = loss + 0.01 * balance_loss([probs])
            loss.backward()
        return run

    results = []
    for mode in modes:
        runs = {
            name: infer(m, name == "folded", name) if mode == "inference" else train(m, mode == "train_frozen_base", name)
            for name, m in modules.items() if mode == "inference" or name != "folded"
        }
        names = list(runs)
        for _ in range(warmup):
            new_input()
            for name in names:
                runs[name]()
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeats):
            new_input()
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotated order
                w, c = _timed(runs[name])
                wall[name].append(w)
                cpu[name].append(c)
        med = {n: statistics.median(v) for n, v in wall.items()}
        med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
        results.append({
            "precision": precision, "batch": batch, "mode": mode,
            "seconds": med, "cpu_seconds": med_cpu,
            "ratio": {n: med[n] / med["plain"] for n in names if n != "plain"},
            "cpu_ratio": {n: med_cpu[n] / med_cpu["plain"] for n in names if n != "plain"},
            "min_ratio": {n: min(wall[n]) / min(wall["plain"]) for n in names if n != "plain"},
        })
    if "folded" in modules:
        modules["folded"].clear_fold_cache()  # free the E copies before the next precision / batch
    return results


def format_mole_bench(result: dict) -> str:
    """A table: one row per (precision, batch, mode), plain ms and each variant's ratio to plain."""
    config = result["config"]
    lines = [" ".join(f"{k}={v}" for k, v in config.items())]
    variants = [v for v in result["variants"] if v != "plain"]
    header = f"{'precision':<10}{'batch':>5}  {'mode':<18}{'plain ms':>9}" + "".join(f"{v:>14}" for v in variants)
    lines += ["ratio to plain: median wall time (median CPU time)", header]
    for case in result["cases"]:
        cells = []
        for v in variants:
            if v in case["ratio"]:
                cells.append(f"{case['ratio'][v]:>7.3f} ({case['cpu_ratio'][v]:.2f})")
            else:
                cells.append(f"{'-':>14}")
        lines.append(f"{case['precision']:<10}{case['batch']:>5}  {case['mode']:<18}"
                     f"{case['seconds']['plain'] * 1e3:>9.1f}" + "".join(f"{c:>14}" for c in cells))
    if "folded" in result["variants"]:
        extra = ", ".join(f"{p} {b / 2**20:.0f} MiB" for p, b in result["fold_extra_bytes"].items())
        base = next(iter(result["ffn_weight_bytes"].values())) / 2**20
        lines.append(f"folded: extra memory per FFN layer {extra} (the FFN's own fp32 weights: {base:.0f} MiB)")
    gflops = ", ".join(f"batch {b}: plain {g['plain']:.2f}, mole {g['mole']:.2f}" for b, g in result["gflops"].items())
    lines.append(f"forward GFLOPs: {gflops}")
    return "\n".join(lines)


def plot_mole_bench(result: dict, path) -> None:
    """Grouped bars: each variant's time / plain FFN, one group per (precision, batch, mode) (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in result["variants"] if v != "plain"]
    cases = result["cases"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cases) + 2), 4.5))
    width = 0.8 / max(len(variants), 1)
    for k, v in enumerate(variants):
        xs = [i + (k - (len(variants) - 1) / 2) * width for i in range(len(cases))]
        ax.bar(xs, [c["ratio"].get(v, float("nan")) for c in cases], width, label=v)
    ax.axhline(1.0, color="black", linewidth=0.8)
    labels = [f"{c['precision']}\nb{c['batch']}\n{c['mode'].replace('train_frozen_base', 'frozen')}" for c in cases]
    ax.set_xticks(range(len(cases)), labels, fontsize=7)
    ax.set_ylabel("time / plain FFN (median)")
    config = result["config"]
    ax.set_title(f"MoLE FFN cost: {config['tokens']} tokens, d={config['dim']}, H={config['hidden']}, "
                 f"E={config['num_experts']}, r={config['rank']}, {config['threads']} thread(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
