"""Named teacher specs: the paper's teachers (v1.0, v1.1) and the embedded offline default.

Paper presets carry their architecture (``config``), so ``pretrained=False`` and ``device="meta"``
work offline: ``describe_teacher`` checks shapes, parameters and FLOPs without any weights.

| preset               | source    | input            | tokens x channels | role                           |
|----------------------|-----------|------------------|-------------------|--------------------------------|
| clip_vit_l14_336     | hf_clip   | 336 crop         | 576 x 1024        | CLIP (layer -2, CLS + attn)     |
| eva02_l16_1024       | timm      | 1024 crop        | 4096 x 1024       | EVA-02-L, patch 16             |
| convnext_xxl_1024    | timm      | 1024 crop        | 1024 x 3072       | ConvNeXt-XXL (CLIP-LAION)       |
| sam_vit_l_1024       | hf_sam    | 1024 pad         | 4096 x 256        | SAM ViT-L neck (v1.1)           |
| dinov2_s14_imgfocus  | hf_dinov2 | 224 crop         | 256 x 384         | embedded CLIP role (CLS + attn) |
| efficientnet_lite0   | timm      | 224 crop         | 49 x 1280         | embedded CNN teacher            |
| efficientnet_lite2   | timm      | 260 crop         | 81 x 1280         | embedded CNN teacher            |

Differences from the official teachers, by necessity or on purpose:

- EVA-02: the official checkpoint is the ViTDet COCO detector (windowed attention in 20 of 24
  blocks), which timm does not provide. The preset is timm's EVA-02-L (MIM on Merged-38M, the
  detector's initialisation) rebuilt at patch 16 / 1024 px, so the grid is the paper's 64 x 64;
  timm resamples the patch embedding and the position table when loading, and every block attends
  globally (more FLOPs than ViTDet).
- ConvNeXt: ``convnext_xxlarge.clip_laion2b_soup_ft_in1k``, the weights the official code actually
  loads (its hard-coded tag is ignored by timm; see research/official-movekd.md section 2).
- SAM: tokens in row-major order (the official layout scramble is a bug, not reproduced).
"""

from __future__ import annotations

from typing import Any

import torch

from movekd.teachers.base import (IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SpecError,
                                  TeacherSpec)

CLIP_VIT_L14_336 = dict(
    hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
SAM_VIT_L = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23],
    output_channels=256, image_size=1024, patch_size=16, window_size=14, mlp_dim=4096,
)
DINOV2_S14 = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=14,
    image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu",
)

_CLIP_PROCESSING = dict(resize="shortest_crop", interpolation="bicubic", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)

PRESETS: dict[str, TeacherSpec] = {
    spec.name: spec
    for spec in [
        # --- paper scale (official MoVE-KD), bf16 as the official code runs them ---------------------
        TeacherSpec(name="clip_vit_l14_336", source="hf_clip", model="openai/clip-vit-large-patch14-336",
                    image_size=336, layer=-2, provides_cls_attention=True, dtype="bfloat16",
                    config=CLIP_VIT_L14_336, **_CLIP_PROCESSING),
        TeacherSpec(name="eva02_l16_1024", source="timm", model="eva02_large_patch14_224.mim_m38m",
                    image_size=1024, layer=-1, dtype="bfloat16",
                    config=dict(img_size=1024, patch_size=16), **_CLIP_PROCESSING),
        TeacherSpec(name="convnext_xxl_1024", source="timm", model="convnext_xxlarge.clip_laion2b_soup_ft_in1k",
                    image_size=1024, dtype="bfloat16", **_CLIP_PROCESSING),
        TeacherSpec(name="sam_vit_l_1024", source="hf_sam", model="facebook/sam-vit-large",
                    image_size=1024, resize="longest_pad", interpolation="bilinear",
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype="bfloat16", config=SAM_VIT_L),
        # --- embedded default: real weights from pip packages, offline -------------------------------
        TeacherSpec(name="dinov2_s14_imgfocus", source="hf_dinov2", model="asset:dinov2_s14",
                    image_size=224, resize="shortest_crop", interpolation="bicubic",
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, layer=-2, provides_cls_attention=True,
                    config=DINOV2_S14),
        TeacherSpec(name="efficientnet_lite0", source="timm", model="efficientnet_lite0",
                    checkpoint="asset:efficientnet_lite0", image_size=224, interpolation="bicubic",
                    mean=IMAGENET_MEAN, std=IMAGENET_STD),
        TeacherSpec(name="efficientnet_lite2", source="timm", model="efficientnet_lite2",
                    checkpoint="asset:efficientnet_lite2", image_size=260, interpolation="bicubic",
                    mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ]
}

# Teacher sets, CLIP role first (the token and teacher weights of Eq. 3-4 read teacher 0).
TEACHER_SETS: dict[str, tuple[str, ...]] = {
    "paper_v1.0": ("clip_vit_l14_336", "eva02_l16_1024", "convnext_xxl_1024"),
    "paper_v1.1": ("clip_vit_l14_336", "sam_vit_l_1024", "eva02_l16_1024", "convnext_xxl_1024"),
    "embedded": ("dinov2_s14_imgfocus", "efficientnet_lite0", "efficientnet_lite2"),
}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> TeacherSpec:
    if name not in PRESETS:
        raise SpecError(f"unknown teacher preset '{name}' (presets: {', '.join(PRESETS)})")
    return PRESETS[name]


def teacher_set(name: str) -> list[TeacherSpec]:
    """The specs of a named set (``paper_v1.0``, ``paper_v1.1``, ``embedded``), CLIP role first."""
    if name not in TEACHER_SETS:
        raise SpecError(f"unknown teacher set '{name}' (sets: {', '.join(TEACHER_SETS)})")
    return [PRESETS[n] for n in TEACHER_SETS[name]]


def describe_teacher(spec_or_name: TeacherSpec | dict | str, **overrides: Any) -> dict[str, Any]:
    """Shape, size and cost of a teacher, computed on the meta device (no weights, no memory).

    Returns ``dict(name, source, model, image_size, tokens, channels, grid, params, gflops, cls, attn)``:
    ``params`` counts the parameters the teacher runs (blocks after the tapped layer are dropped),
    ``gflops`` is one image's forward (2 x multiply-accumulates, ``FlopCounterMode``).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from movekd.teachers.registry import create_teacher, resolve_spec

    spec = resolve_spec(spec_or_name, **overrides)
    teacher = create_teacher(spec, device="meta")
    images = torch.empty(1, 3, spec.image_size, spec.image_size, device="meta")  # float 0..1, no resize
    counter = FlopCounterMode(display=False)
    with counter:
        out = teacher(images)
    return {
        "name": spec.name, "source": spec.source, "model": spec.model, "image_size": spec.image_size,
        "tokens": int(out.tokens.shape[1]), "channels": int(out.tokens.shape[2]), "grid": tuple(out.grid),
        "params": sum(p.numel() for p in teacher.parameters()),
        "gflops": counter.get_total_flops() / 1e9,
        "cls": out.cls is not None, "attn": out.attn is not None,
    }
