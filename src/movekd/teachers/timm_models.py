"""timm models: ConvNeXt, EVA-02, EfficientNet, ViTs, ... (any ``timm.create_model`` name).

- ``layer=None``: ``forward_features``. A feature map ``[B, C, h, w]`` becomes ``[B, h * w, C]``
  (row-major); a token sequence ``[B, prefix + N, C]`` loses its prefix tokens (CLS, registers).
- ``layer=i``: ``forward_intermediates(indices=[i], norm=False)``, the output of block / stage ``i``
  (negative counts from the end) without the final norm; later blocks are pruned away. For a ViT
  with a CLS token the CLS at that block is returned too.

Weights: ``pretrained=True`` with ``checkpoint`` (a local file, a folder or ``asset:NAME``) loads it
through timm's own loader (``pretrained_cfg_overlay=dict(file=...)``: ``weights_only`` torch.load or
safetensors, the model's checkpoint filter, e.g. EVA's patch-embedding resampling); without
``checkpoint`` the weights come from the hub.
"""

from __future__ import annotations

import math

import torch

from movekd.teachers._load import loading, weights_file
from movekd.teachers.base import SpecError, Teacher, TeacherOutput, TeacherSpec
from movekd.teachers.registry import register_teacher


class TimmTeacher(Teacher):
    def __init__(self, spec: TeacherSpec, model: torch.nn.Module):
        super().__init__(spec)
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.has_cls = getattr(model, "cls_token", None) is not None
        self.indices: list[int] | None = None
        if spec.layer is not None:
            if not hasattr(model, "forward_intermediates"):
                raise SpecError(f"teacher '{spec.name}': {type(model).__name__} has no forward_intermediates; use layer=None")
            self.indices = list(model.prune_intermediate_layers([spec.layer], prune_norm=True, prune_head=True))

    def encode(self, pixel_values: torch.Tensor) -> TeacherOutput:
        cls = None
        if self.indices is None:
            features = self.model.forward_features(pixel_values)
            if features.ndim == 4:
                return _from_map(features, cls=None)
            if self.has_cls:
                cls = features[:, 0]
            tokens = features[:, self.num_prefix_tokens:]
            return TeacherOutput(tokens=tokens, cls=cls, attn=None, grid=_grid(self.model, pixel_values, tokens))
        kwargs = dict(indices=self.indices, norm=False, output_fmt="NCHW", intermediates_only=True)
        if self.num_prefix_tokens:
            kwargs["return_prefix_tokens"] = True
        (out,) = self.model.forward_intermediates(pixel_values, **kwargs)
        if isinstance(out, tuple):
            out, prefix = out
            cls = prefix[:, 0] if self.has_cls else None
        return _from_map(out, cls=cls)


def _from_map(feature_map: torch.Tensor, cls: torch.Tensor | None) -> TeacherOutput:
    tokens = feature_map.flatten(2).transpose(1, 2)  # [B, h*w, C], token y*w + x
    return TeacherOutput(tokens=tokens, cls=cls, attn=None, grid=tuple(feature_map.shape[-2:]))


def _grid(model, pixel_values: torch.Tensor, tokens: torch.Tensor) -> tuple[int, int]:
    patch = getattr(model, "patch_embed", None)
    if patch is not None and hasattr(patch, "dynamic_feat_size"):
        h, w = patch.dynamic_feat_size(tuple(pixel_values.shape[-2:]))
        if h * w == tokens.shape[1]:
            return int(h), int(w)
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise RuntimeError(f"cannot infer the token grid of {tokens.shape[1]} tokens")
    return side, side


def build_timm_model(spec: TeacherSpec) -> torch.nn.Module:
    import timm

    kwargs = dict(spec.config)
    kwargs.setdefault("num_classes", 0)
    if not spec.pretrained:
        return timm.create_model(spec.model, pretrained=False, **kwargs)
    if spec.checkpoint:
        with loading(spec, "checkpoint"):
            file = weights_file(spec.checkpoint)
            # source="" so a cfg that names the hub as its source still reads the file.
            kwargs["pretrained_cfg_overlay"] = dict(file=str(file), source="")
            return timm.create_model(spec.model, pretrained=True, **kwargs)
    cfg = timm.models.get_pretrained_cfg(spec.model)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    with loading(spec, "weights", hub_id=hub_id):
        return timm.create_model(spec.model, pretrained=True, **kwargs)


@register_teacher("timm")
def create_timm(spec: TeacherSpec) -> TimmTeacher:
    if spec.provides_cls_attention:
        raise SpecError(f"teacher '{spec.name}': timm teachers do not return attention; "
                        "use an hf_clip / hf_dinov2 teacher in the CLIP role")
    return TimmTeacher(spec, build_timm_model(spec))
