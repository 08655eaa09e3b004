"""Named parameter groups and the trainable set of each stage (paper §4.1).

Groups: ``mole`` (routers and LoRA experts of the student), ``student`` (the rest of the student:
its pretrained ViT weights), ``adapters``, ``projector``, ``llm``. Stage 1 trains
``mole + adapters + projector``; stage 2 trains everything but the teachers, which belong to no
group and never train. Parameters that the model froze on purpose at build time (e.g. DINOv2's
pre-training mask token) stay frozen.
"""

from __future__ import annotations

from torch import nn

from movekd.mole import mole_parameters
from movekd.train.config import GROUPS


def named_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every non-teacher parameter of a ``MoveKDModel``, by group (each in exactly one group)."""
    vision = model.vlm.vision
    mole_ids = {id(p) for _, p in mole_parameters(vision)}
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in vision.named_parameters():
        groups["mole" if id(p) in mole_ids else "student"].append((f"vlm.vision.{name}", p))
    groups["adapters"] = [(f"adapters.{n}", p) for n, p in model.adapters.named_parameters()]
    groups["projector"] = [(f"vlm.projector.{n}", p) for n, p in model.vlm.projector.named_parameters()]
    if getattr(model.vlm, "anyres", None) is not None:  # image_newline trains with the projector (LLaVA-NeXT)
        groups["projector"] += [(f"vlm.anyres.{n}", p) for n, p in model.vlm.anyres.named_parameters()]
    groups["llm"] = [(f"vlm.llm.{n}", p) for n, p in model.vlm.llm.named_parameters()]
    return groups


def set_trainable(system, train: list[str]) -> dict[str, list[nn.Parameter]]:
    """Make exactly the parameters of the ``train`` groups trainable; return them by group."""
    trainable: dict[str, list[nn.Parameter]] = {}
    for group, params in named_groups(system.model).items():
        on = group in train
        kept = []
        for name, p in params:
            allowed = on and name not in system.always_frozen
            p.requires_grad_(allowed)
            if allowed:
                kept.append(p)
        if kept:
            trainable[group] = kept
    for p in system.model.teachers.parameters():
        p.requires_grad_(False)
    return trainable


def parameter_table(model: nn.Module, train: list[str], always_frozen: set[str]) -> list[tuple[str, int, int]]:
    """(group, trainable, frozen) parameter counts for a stage, plus the teachers' (all frozen)."""
    rows = []
    for group, params in named_groups(model).items():
        on = sum(p.numel() for n, p in params if group in train and n not in always_frozen)
        total = sum(p.numel() for _, p in params)
        rows.append((group, on, total - on))
    rows.append(("teachers", 0, sum(p.numel() for p in model.teachers.parameters())))
    return rows


def format_table(title: str, rows: list[tuple[str, int, int]]) -> str:
    lines = [title, f"  {'group':<10} {'trainable':>14} {'frozen':>14}"]
    for group, on, off in rows:
        lines.append(f"  {group:<10} {on:>14,} {off:>14,}")
    lines.append(f"  {'total':<10} {sum(r[1] for r in rows):>14,} {sum(r[2] for r in rows):>14,}")
    return "\n".join(lines)
