"""The paper's efficiency claim, measured: one MoVE-KD student against the multi-encoder VLM it replaces.

MoVE-KD (paper §1, §4) keeps the cost of one encoder at inference, where a multi-encoder VLM runs every
encoder (the paper: 2.1x faster inference and 38 % less memory than such VLMs). Both VLMs here share
the LLM and the number of image tokens; they differ in the vision side:

- **single**: the student (the CLIP-role ViT with MoLE, sparse routing as at inference) + projector;
- **multi** (Eagle-style channel concatenation): every teacher of the preset runs on the image at its
  own resolution, each feature map is resampled (bilinear) to the student's grid, the maps are
  concatenated on channels and an MLP projector of the same depth maps them to the LLM.

Two scales:

- ``paper`` (a paper preset, on the ``meta`` device, no weights): FLOPs of one prefill (image +
  ``text_tokens`` prompt tokens) counted with ``FlopCounterMode``; parameters; weight memory in the
  preset's dtypes; peak activation memory of the prefill (:class:`~movekd.bench.memory.PeakMemory`,
  KV cache included).
- ``embedded`` (the demo preset, random weights, this CPU): latency of the same prefill, medians of
  interleaved runs, and peak tensor memory (weights + activations).

Every ratio is multi / single: how many times the multi-encoder VLM costs what the student VLM costs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from movekd.bench.memory import PeakMemory, module_bytes
from movekd.train.config import TrainConfig, load_config

TEXT_TOKENS = 64  # prompt tokens after the image in one prefill


@dataclass
class _VisionOut:
    tokens: torch.Tensor


class MultiEncoderVision(nn.Module):
    """Eagle-style vision side: every encoder's tokens resampled to ``grid`` and concatenated on channels."""

    def __init__(self, encoders: list[nn.Module], grid: tuple[int, int]):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.grid = tuple(grid)

    def forward(self, images: torch.Tensor) -> _VisionOut:
        maps = []
        for encoder in self.encoders:
            out = encoder(images)
            b, n, c = out.tokens.shape
            h, w = out.grid
            grid = out.tokens.transpose(1, 2).reshape(b, c, h, w)
            if (h, w) != self.grid:
                grid = F.interpolate(grid.float(), size=self.grid, mode="bilinear", align_corners=False)
            maps.append(grid.flatten(2).transpose(1, 2).float())
        return _VisionOut(torch.cat(maps, dim=-1))


class PrefillVLM(nn.Module):
    """vision → projector → LLM prefill on ``[image tokens, text tokens]`` (what answering costs up to
    the first token)."""

    def __init__(self, vision: nn.Module, projector: nn.Module, llm: nn.Module):
        super().__init__()
        self.vision, self.projector, self.llm = vision, projector, llm

    def forward(self, images: torch.Tensor, text_tokens: int):
        tokens = self.vision(images).tokens
        weight = next(self.projector.parameters())
        image_embeds = self.projector(tokens.to(weight.dtype))
        ids = torch.zeros(images.shape[0], text_tokens, dtype=torch.long, device=images.device)
        text = self.llm.get_input_embeddings()(ids)
        embeds = torch.cat([image_embeds.to(text.dtype), text], dim=1)
        return self.llm(inputs_embeds=embeds, use_cache=True)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.vision, self.projector]


def _llm(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The preset's LLM architecture with random weights (cost does not depend on the values)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from movekd.train.build import resolve_path

    if config.model.llm_config:
        llm_config = AutoConfig.for_model(**config.model.llm_config)
    else:
        llm_config = AutoConfig.from_pretrained(str(resolve_path(config.model.llm)))
    llm_config._attn_implementation = "sdpa"
    with torch.device(device):
        return AutoModelForCausalLM.from_config(llm_config, dtype=dtype).eval()


def build_pair(config: TrainConfig, device: str | torch.device = "meta",
               dtype: torch.dtype | None = None) -> tuple[PrefillVLM, PrefillVLM, int]:
    """``(single, multi, image_size)`` for the preset ``config``: same LLM architecture and token count."""
    from movekd.mole import set_fold_inference
    from movekd.student import build_student
    from movekd.teachers import create_teacher
    from movekd.vlm import build_projector

    device = torch.device(device)
    dtype = dtype or getattr(torch, config.model.llm_dtype)
    mole = config.model.student.mole
    options = {"num_experts": mole.num_experts, "rank": mole.rank, "alpha": mole.alpha, "dropout": mole.dropout,
               "routing": mole.routing, "init": mole.init, "grouped_kernel": mole.grouped_kernel,
               **({"top_k": mole.top_k} if mole.routing == "topk" else {})}
    spec = config.model.student.spec.replace(pretrained=False, provides_cls_attention=False)
    with torch.device(device):
        student = build_student(spec, mole=mole.enabled, mole_options=options,
                                drop_unused=config.model.student.drop_unused,
                                mole_every_block=config.model.student.mole_every_block)
    student = student.to(dtype).eval()
    if device.type != "meta":
        set_fold_inference(student, "auto")  # what load_trained does: folded experts where routing allows
    grid = (spec.image_size // student.patch_size,) * 2
    teachers = [create_teacher(t.replace(pretrained=False, provides_cls_attention=False), device=device)
                for t in config.model.teachers]
    if not teachers:
        raise ValueError(f"preset '{config.name}' has no teachers: nothing to compare the student with")
    llm_single, llm_multi = _llm(config, device, dtype), _llm(config, device, dtype)
    hidden = llm_single.config.hidden_size
    channels = sum(_channels(t, device) for t in teachers)
    with torch.device(device):
        projector_single = build_projector(config.model.projector, student.hidden_size, hidden).to(dtype)
        projector_multi = build_projector(config.model.projector, channels, hidden).to(dtype)
    single = PrefillVLM(student, projector_single, llm_single)
    multi = PrefillVLM(MultiEncoderVision(teachers, grid), projector_multi, llm_multi)
    image_size = max([spec.image_size] + [t.spec.image_size for t in teachers])
    return single, multi, image_size


def _channels(teacher: nn.Module, device: torch.device) -> int:
    size = teacher.spec.image_size
    with torch.no_grad():
        out = teacher(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device))
    return int(out.tokens.shape[-1])


def _params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def count_costs(vlm: PrefillVLM, image_size: int, text_tokens: int = TEXT_TOKENS) -> dict:
    """FLOPs, parameters and memory of one prefill (batch 1); works on meta and real devices."""
    device = next(vlm.parameters()).device
    images = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as encoder_counter:
            tokens = vlm.vision(images).tokens
        with FlopCounterMode(display=False) as counter, PeakMemory() as memory:
            out = vlm(images, text_tokens)
        del out, tokens
    weights = module_bytes(vlm)
    return {
        "flops": counter.get_total_flops(), "encoder_flops": encoder_counter.get_total_flops(),
        "params": _params(vlm), "encoder_params": _params(*vlm.encoder_modules()),
        "weight_bytes": weights, "encoder_weight_bytes": module_bytes(*vlm.encoder_modules()),
        "activation_bytes": memory.peak, "memory_bytes": weights + memory.peak,
    }


def measure_latency(single: PrefillVLM, multi: PrefillVLM, image_size: int, *, text_tokens: int = TEXT_TOKENS,
                    repeats: int = 5, precision: str = "fp32") -> dict:
    """Median prefill seconds of both VLMs, interleaved (single, multi, single, ...) after a warm-up."""
    images = torch.randint(0, 256, (1, 3, image_size, image_size), dtype=torch.uint8)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times: dict[str, list[float]] = {"single": [], "multi": []}
    with torch.inference_mode(), autocast:
        for model in (single, multi):
            model(images, text_tokens)
        for _ in range(repeats):
            for name, model in (("single", single), ("multi", multi)):
                start = time.perf_counter()
                model(images, text_tokens)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _ratios(single: dict, multi: dict) -> dict:
    return {
        "vlm_flops_ratio": multi["flops"] / single["flops"],
        "encoder_flops_ratio": multi["encoder_flops"] / single["encoder_flops"],
        "param_ratio": multi["params"] / single["params"],
        "encoder_param_ratio": multi["encoder_params"] / single["encoder_params"],
        "memory_ratio": multi["memory_bytes"] / single["memory_bytes"],
    }


def run_efficiency_bench(paper: str | TrainConfig = "paper_llava15_7b_v1.0", embedded: str | TrainConfig | None = "demo",
                         *, text_tokens: int = TEXT_TOKENS, repeats: int = 5, threads: int | None = None,
                         precision: str = "fp32") -> dict:
    """Counted costs at paper scale (meta device) and measured ones at the embedded scale (this CPU).

    Returns ``{"config", "paper": {"single", "multi", ratios...}, "embedded": {...}}`` plus the headline
    keys ``vlm_flops_ratio``, ``encoder_flops_ratio``, ``param_ratio``, ``memory_ratio`` (paper scale)
    and ``measured_latency_ratio``, ``measured_memory_ratio`` (embedded scale), all multi / single.
    """
    if threads:
        torch.set_num_threads(threads)
    paper_config = paper if isinstance(paper, TrainConfig) else load_config(paper)
    single, multi, size = build_pair(paper_config, "meta")
    paper_single, paper_multi = count_costs(single, size, text_tokens), count_costs(multi, size, text_tokens)
    result = {
        "config": {"paper": paper_config.name, "embedded": None, "text_tokens": text_tokens, "repeats": repeats,
                   "threads": torch.get_num_threads(), "precision": precision,
                   "teachers": [t.name for t in paper_config.model.teachers]},
        "paper": {"single": paper_single, "multi": paper_multi, **_ratios(paper_single, paper_multi)},
    }
    result.update({k: v for k, v in result["paper"].items() if k.endswith("_ratio")})
    if embedded is not None:
        embedded_config = embedded if isinstance(embedded, TrainConfig) else load_config(embedded)
        result["config"]["embedded"] = embedded_config.name
        single, multi, size = build_pair(embedded_config, "cpu", torch.float32)
        costs_single, costs_multi = count_costs(single, size, text_tokens), count_costs(multi, size, text_tokens)
        seconds = measure_latency(single, multi, size, text_tokens=text_tokens, repeats=repeats, precision=precision)
        result["embedded"] = {"single": {**costs_single, "seconds": seconds["single"]},
                              "multi": {**costs_multi, "seconds": seconds["multi"]},
                              **_ratios(costs_single, costs_multi),
                              "latency_ratio": seconds["multi"] / seconds["single"]}
        result["measured_latency_ratio"] = result["embedded"]["latency_ratio"]
        result["measured_memory_ratio"] = result["embedded"]["memory_ratio"]
    return result


def format_efficiency(result: dict) -> str:
    """The benchmark as a table: one row per measure, single and multi side by side."""
    rows = [("prefill TFLOP", "flops", 1e-12, ".3f"), ("encoder TFLOP", "encoder_flops", 1e-12, ".3f"),
            ("parameters (M)", "params", 1e-6, ",.1f"), ("encoder parameters (M)", "encoder_params", 1e-6, ",.1f"),
            ("weights (GB)", "weight_bytes", 1e-9, ".2f"), ("activations (GB)", "activation_bytes", 1e-9, ".3f"),
            ("memory (GB)", "memory_bytes", 1e-9, ".2f"), ("prefill latency (ms)", "seconds", 1e3, ".1f")]
    config = result["config"]
    lines = [f"single student VLM vs multi-encoder VLM (teachers: {', '.join(config['teachers'])}); "
             f"one prefill of the image + {config['text_tokens']} text tokens, batch 1; ratio = multi / single"]
    for scale in ("paper", "embedded"):
        part = result.get(scale)
        if not part:
            continue
        how = "meta device, counted" if scale == "paper" else (
            f"this CPU, random weights, {config['threads']} threads, {config['precision']}, median of {config['repeats']}")
        lines += ["", f"{scale} scale ({config[scale]}; {how})",
                  f"{'':<24}{'single':>12}{'multi':>12}{'ratio':>8}"]
        for label, key, scale_by, fmt in rows:
            if key not in part["single"]:
                continue
            a, b = part["single"][key] * scale_by, part["multi"][key] * scale_by
            lines.append(f"{label:<24}{a:>12{fmt}}{b:>12{fmt}}{b / a:>8.2f}")
    lines.append("")
    lines.append("headline: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k.endswith("_ratio")))
    return "\n".join(lines)


def plot_efficiency(result: dict, path) -> None:
    """Bar chart of the multi / single ratios at both scales (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colours = [], [], []
    for scale, colour in (("paper", "tab:blue"), ("embedded", "tab:orange")):
        part = result.get(scale) or {}
        for key in ("vlm_flops_ratio", "encoder_flops_ratio", "param_ratio", "memory_ratio", "latency_ratio"):
            if key in part:
                labels.append(f"{scale}\n{key.replace('_ratio', '').replace('_', ' ')}")
                values.append(part[key])
                colours.append(colour)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4))
    ax.bar(range(len(values)), values, color=colours)
    ax.set_yscale("log")  # the encoder ratio is an order of magnitude above the others
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("multi-encoder / single student (log)")
    ax.set_title("Cost of the multi-encoder VLM relative to the MoVE-KD student VLM")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
