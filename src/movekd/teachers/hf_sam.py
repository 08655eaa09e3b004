"""HF transformers SAM image encoder (``SamVisionModel``; loads ``facebook/sam-vit-large`` directly).

The output is the neck, channels first ``[B, 256, 64, 64]``; tokens are its pixels in row-major order,
``[B, 64 * 64, 256]``, so token ``y * 64 + x`` is the feature vector at (y, x). (The official code
flattens the channels-first tensor as if it were channels last, which scrambles rows, columns and
channels; that bug is not reproduced.)
"""

from __future__ import annotations

import torch

from movekd.teachers._hf import load_hf_model
from movekd.teachers.base import SpecError, Teacher, TeacherOutput, TeacherSpec
from movekd.teachers.registry import register_teacher


class HFSamTeacher(Teacher):
    def __init__(self, spec: TeacherSpec, model: torch.nn.Module):
        super().__init__(spec)
        self.model = model

    def encode(self, pixel_values: torch.Tensor) -> TeacherOutput:
        neck = self.model(pixel_values=pixel_values).last_hidden_state  # [B, C, h, w]
        return TeacherOutput(tokens=neck_to_tokens(neck), cls=None, attn=None, grid=tuple(neck.shape[-2:]))


def neck_to_tokens(neck: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, h * w, C]``, token ``y * w + x`` = ``neck[:, :, y, x]``."""
    return neck.flatten(2).transpose(1, 2)


@register_teacher("hf_sam")
def create_hf_sam(spec: TeacherSpec) -> HFSamTeacher:
    from transformers import SamVisionConfig, SamVisionModel

    if spec.layer not in (None, -1):
        raise SpecError(f"teacher '{spec.name}': SAM gives only its neck output; 'layer' must be None")
    if spec.provides_cls_attention:
        raise SpecError(f"teacher '{spec.name}': SAM has no CLS token; set provides_cls_attention to False")
    model = load_hf_model(spec, SamVisionModel, SamVisionConfig)
    if spec.image_size != model.config.image_size:
        # SAM's absolute position table is not interpolated by transformers.
        raise SpecError(f"teacher '{spec.name}': image_size must be {model.config.image_size} for this SAM model")
    return HFSamTeacher(spec, model)
