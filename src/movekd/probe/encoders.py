"""Frozen encoders to probe, named by one string each:

- a teacher preset (``movekd teachers``), e.g. ``efficientnet_lite0``: the teacher's tokens;
- ``student:PRESET``: the student before distillation, i.e. the plain ViT built from that spec
  (no MoLE: with ``mole.init: zero_b`` the untrained MoLE student computes exactly this);
- a bundle folder (``movekd_config.json``) or a run folder (its ``final`` bundle): the trained
  student encoder of that VLM (projector and LLM are not loaded).

Features are the select-layer / tapped tokens mean-pooled over the grid (every encoder the same
way, so rows are comparable; CNN teachers have no CLS token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from movekd.errors import OptionError

STUDENT_PREFIX = "student:"


@dataclass
class Encoder:
    name: str
    kind: str  # "teacher" | "student" | "trained"
    module: nn.Module


def bundle_path(path: str | Path) -> Path | None:
    """The bundle folder for a bundle or a run folder, None if ``path`` is neither."""
    from movekd.vlm.io import CONFIG_NAME

    path = Path(path)
    for candidate in (path, path / "final"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    return None


def load_trained_student(path: str | Path) -> nn.Module:
    """The student encoder of a bundle (weights loaded strictly), in eval mode."""
    from safetensors.torch import load_model

    from movekd.student import build_student
    from movekd.vlm.io import VISION_FILE, read_vlm_config

    bundle = bundle_path(path)
    if bundle is None:
        raise FileNotFoundError(f"{path}: neither a movekd bundle nor a run folder with final/")
    vision = build_student(dict(read_vlm_config(bundle).vision))
    load_model(vision, str(bundle / VISION_FILE), strict=True)
    return vision.eval()


def load_encoder(name: str) -> Encoder:
    """``name``: see the module docstring; a preset may end in ``@SIZE`` (input side, e.g.
    ``student:dinov2_s14_imgfocus@84``, the demo's student input)."""
    from movekd.student import build_student
    from movekd.teachers import create_teacher, list_presets

    if bundle_path(name) is not None:
        return Encoder(name, "trained", load_trained_student(name))
    preset, _, size = name.partition("@")
    overrides = {}
    if size:
        if not size.isdigit() or int(size) <= 0:
            raise OptionError(f"encoder {name!r}: the size after '@' must be a positive integer")
        overrides["image_size"] = int(size)
    if preset.startswith(STUDENT_PREFIX):
        return Encoder(name, "student", build_student(preset[len(STUDENT_PREFIX):], mole=False, **overrides).eval())
    if preset in list_presets():
        return Encoder(name, "teacher", create_teacher(preset, **overrides))
    raise OptionError(f"unknown encoder {name!r}: expected a teacher preset ({', '.join(list_presets())}), "
                     f"'{STUDENT_PREFIX}PRESET', either with an optional '@SIZE', or a bundle / run folder")


def pooled_features(module: nn.Module, images: torch.Tensor, batch_size: int = 32,
                    progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Mean-pooled tokens ``[N, C]`` (float32, CPU) of ``images`` uint8 ``[N, 3, H, W]``."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            result = module(images[start:start + batch_size])
            out.append(result.tokens.float().mean(dim=1).cpu())
            if progress:
                progress(min(batch_size, len(images) - start))
    return torch.cat(out)
