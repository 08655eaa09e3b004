"""HF transformers ``Dinov2Model`` (e.g. ``facebook/dinov2-small``, or the bundled ``asset:dinov2_s14``).

Tokens are the tapped block's output without the final layernorm; DINOv2 always interpolates its
position table to the input grid, so any multiple of the patch size works.
"""

from __future__ import annotations

from movekd.teachers._hf import HFViTTeacher, attn_implementation, load_hf_model
from movekd.teachers.base import TeacherSpec
from movekd.teachers.registry import register_teacher


@register_teacher("hf_dinov2")
def create_hf_dinov2(spec: TeacherSpec) -> HFViTTeacher:
    from transformers import Dinov2Config, Dinov2Model

    model = load_hf_model(spec, Dinov2Model, Dinov2Config, attn_implementation=attn_implementation(spec))
    return HFViTTeacher(spec, model, patch_size=model.config.patch_size)
