"""What the pictures need from a finished run folder: the trained student (``final/`` bundle), the
teachers rebuilt from ``config.json`` (the training config), the adapters from the newest checkpoint
(for Eq. 4; None when no checkpoint holds them), and images decoded the way the run decoded them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from movekd.errors import ImageError


@dataclass
class LoadedRun:
    folder: Path
    config: object  # TrainConfig
    student: nn.Module
    teachers: list[nn.Module]
    adapters: list[nn.Module | None] | None  # None: no checkpoint with adapters (Eq. 4 not drawn)
    decode_size: int
    aspect_ratio: str
    fill: tuple[int, int, int]

    @property
    def student_grid(self) -> tuple[int, int]:
        side = self.student.spec.image_size // self.student.patch_size
        return side, side

    def load_images(self, paths: list[str | Path]) -> torch.Tensor:
        """uint8 ``[B, 3, S, S]`` decoded as in training (the run's size and image_aspect_ratio)."""
        from PIL import Image

        from movekd.data import prepare_image

        out = []
        for path in paths:
            try:
                with Image.open(path) as im:
                    out.append(prepare_image(im.convert("RGB"), self.aspect_ratio, self.fill, self.decode_size))
            except (OSError, ValueError) as exc:
                raise ImageError(f"cannot read image {path}: {exc}") from exc
        return torch.stack(out)


def load_run(folder: str | Path, *, with_teachers: bool = True) -> LoadedRun:
    from movekd.data import fill_colour
    from movekd.probe.encoders import bundle_path, load_trained_student
    from movekd.teachers import create_teacher
    from movekd.train.config import load_config
    from movekd.vlm.io import read_vlm_config

    folder = Path(folder)
    bundle = bundle_path(folder)
    if bundle is None or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a run folder (needs final/ and config.json written by movekd train)")
    config = load_config(json.loads((folder / "config.json").read_text()))
    vlm_config = read_vlm_config(bundle)
    student = load_trained_student(bundle)
    teachers = [create_teacher(spec) for spec in config.model.teachers] if with_teachers else []
    adapters = _load_adapters(folder, config, teachers, student) if teachers else None
    # AnyRes runs: the pictures are of the overview crop (the whole image stretched to the student's side)
    aspect = "stretch" if vlm_config.image_aspect_ratio == "anyres" else vlm_config.image_aspect_ratio
    return LoadedRun(folder, config, student, teachers, adapters, vlm_config.decode_size,
                     aspect, fill_colour(student.spec.mean))


def _load_adapters(folder: Path, config, teachers, student) -> list[nn.Module | None] | None:
    from movekd.adapters import build_adapter
    from movekd.train import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(folder)
    if latest is None:
        return None
    weights = ckpt.load_weights(latest / ckpt.WEIGHTS)
    side = student.spec.image_size // student.patch_size
    adapters: list[nn.Module | None] = [None]
    for k, teacher in enumerate(teachers[1:], start=1):
        size = teacher.spec.image_size
        probe = teacher(torch.zeros(1, 3, size, size, dtype=torch.uint8))
        adapter = build_adapter(config.model.adapter, probe.tokens.shape[-1], tuple(probe.grid),
                                student.hidden_size, (side, side))
        prefix = f"adapters.{k}."
        state = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
        if set(state) != set(adapter.state_dict()):
            return None  # checkpoint from another adapter layout: skip Eq. 4 rather than guess
        adapter.load_state_dict(state)
        adapters.append(adapter.eval())
    return adapters
