"""HF transformers ``CLIPVisionModel`` (e.g. ``openai/clip-vit-large-patch14-336``, LLaVA's tower).

Tokens are ``hidden_states[layer][:, 1:]`` (no post-layernorm), CLS is ``hidden_states[layer][:, 0]``,
attention is that block's probabilities: exactly what the official MoVE-KD code reads at layer -2.
"""

from __future__ import annotations

from movekd.teachers._hf import HFViTTeacher, attn_implementation, load_hf_model
from movekd.teachers.base import TeacherSpec
from movekd.teachers.registry import register_teacher


@register_teacher("hf_clip")
def create_hf_clip(spec: TeacherSpec) -> HFViTTeacher:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = load_hf_model(spec, CLIPVisionModel, CLIPVisionConfig, attn_implementation=attn_implementation(spec))
    config = model.config
    # CLIP's position table is fixed to config.image_size; other sizes need interpolation.
    interpolate = spec.image_size != config.image_size
    return HFViTTeacher(spec, model, patch_size=config.patch_size,
                        forward_kwargs={"interpolate_pos_encoding": interpolate} if interpolate else None)
