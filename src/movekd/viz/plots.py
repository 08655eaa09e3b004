"""Matplotlib figures (Agg backend, fixed size and dpi, so every PNG's pixel size is known:
``FIGURE_SIZES`` in inches at ``DPI``). Every panel has a title; every colour scale a colour bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

DPI = 100
PANEL = 2.6  # inches per panel side


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def _image(ax, image, title: str):
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _overlay(fig, ax, image, heat, title: str, cmap="inferno"):
    size = image.shape[-1]
    ax.imshow(image.permute(1, 2, 0).numpy())
    h = ax.imshow(heat.numpy(), cmap=cmap, alpha=0.6, extent=(0, size, size, 0), interpolation="nearest")
    bar = fig.colorbar(h, ax=ax, fraction=0.046, pad=0.04)
    bar.formatter.set_useOffset(False)  # show 1.0004, not "+1" and 0.0004
    bar.update_ticks()
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def token_weight_figure(path: Path, image, maps: dict, mode: str) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(3 * PANEL + 0.6, PANEL))
    _image(axes[0], image, "image")
    n = maps["token_weight"].numel()
    _overlay(fig, axes[1], image, maps["token_weight"] * n, f"Eq. 3 token weight x N ({mode})")
    _overlay(fig, axes[2], image, maps["cls_attention"] * n, "[CLS] attention, renorm x N")
    fig.suptitle("CLIP-role teacher: which tokens the KD loss weights (1 = uniform)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def experts_figure(path: Path, image, experts, num_experts: int) -> Path:
    plt = _plt()
    from matplotlib.colors import BoundaryNorm, ListedColormap

    layers = experts.shape[0]
    cols = min(6, layers + 1)
    rows = math.ceil((layers + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL * 0.6 + 0.8, rows * PANEL * 0.6 + 0.4), squeeze=False)
    colours = plt.get_cmap("tab10").colors[:num_experts]
    cmap, norm = ListedColormap(colours), BoundaryNorm(np.arange(num_experts + 1) - 0.5, num_experts)
    _image(axes[0, 0], image, "image")
    handle = None
    for layer in range(layers):
        ax = axes[(layer + 1) // cols, (layer + 1) % cols]
        handle = ax.imshow(experts[layer].numpy(), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(f"layer {layer + 1}", fontsize=8)
        ax.axis("off")
    for k in range(layers + 1, rows * cols):
        axes[k // cols, k % cols].axis("off")
    fig.suptitle("student: routed expert per token (argmax of the MoLE router)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    cax = fig.add_axes((0.88, 0.15, 0.02, 0.7))
    fig.colorbar(handle, cax=cax, ticks=range(num_experts), label="expert")
    return _save(fig, path)


def pca_figure(path: Path, image, pca: dict) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(pca) + 1, figsize=((len(pca) + 1) * PANEL, PANEL + 0.3))
    _image(axes[0], image, "image")
    for ax, (name, rgb) in zip(axes[1:], pca.items()):
        ax.imshow(rgb.numpy(), interpolation="nearest")
        ax.set_title(f"{name} ({rgb.shape[0]}x{rgb.shape[1]})", fontsize=9)
        ax.axis("off")
    fig.suptitle("features: first 3 principal components as RGB (per image, per encoder)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def teacher_weight_figure(path: Path, weights, names: list[str]) -> Path:
    plt = _plt()
    k = weights.shape[1]
    fig, axes = plt.subplots(1, k, figsize=(k * PANEL, PANEL), squeeze=False)
    for j, ax in enumerate(axes[0]):
        ax.hist(weights[:, j].numpy(), bins=30, color=f"C{j}")
        ax.set_title(f"{names[j]}: mean {weights[:, j].mean():.3f}", fontsize=9)
        ax.set_xlabel("teacher weight (Eq. 4)")
        ax.set_ylabel("images" if j == 0 else "")
    fig.suptitle(f"teacher weights over {weights.shape[0]} images", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def expert_usage_figure(path: Path, usage) -> Path:
    plt = _plt()
    layers, experts = usage.shape
    fig, ax = plt.subplots(figsize=(max(3.5, experts * 0.9 + 1.8), max(2.5, layers * 0.35 + 1.2)))
    h = ax.imshow(usage.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(layers):
        for j in range(experts):
            ax.text(j, i, f"{usage[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if usage[i, j] < 0.5 else "black")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers), [str(i + 1) for i in range(layers)])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoLE layer")
    fig.colorbar(h, ax=ax, label="fraction of patch tokens")
    ax.set_title("expert usage per layer", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


CURVE_GROUPS = (("loss", ("loss",)), ("text (L_text)", ("text",)), ("KD (L_kd)", ("kd",)),
                ("balance (L_bal)", ("balance",)), ("KD per teacher", ("kd_t",)), ("teacher weight", ("w_t",)),
                ("expert usage", ("expert",)), ("learning rate", ("lr",)))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def curves_figure(path: Path, records: list[dict]) -> Path:
    """Every loss term against the global step; stage boundaries as dotted lines."""
    plt = _plt()
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float))})
    panels = []
    for title, prefixes in CURVE_GROUPS:
        members = [k for k in keys if k in prefixes or any(k.startswith(p) and k[len(p):].isdigit() for p in prefixes)]
        if members:
            panels.append((title, members))
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL, rows * PANEL * 0.8), squeeze=False)
    steps = [r.get("global_step", i) for i, r in enumerate(records)]
    boundaries = [steps[i] for i in range(1, len(records)) if records[i].get("stage") != records[i - 1].get("stage")]
    for ax, (title, members) in zip(axes.flat, panels):
        for key in members:
            pts = [(s, r[key]) for s, r in zip(steps, records) if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, linewidth=1)
        for b in boundaries:
            ax.axvline(b, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if len(members) > 1:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("training curves (metrics.jsonl; dotted: stage change)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
