"""open_clip image towers (optional: ``pip install open_clip_torch``).

``model`` is an open_clip model name (``open_clip.list_models()``), ``checkpoint`` a local weights
file (or an open_clip pretrained tag when not a path). Tokens come from the visual tower's
``forward_intermediates`` (open_clip >= 2.26) at ``layer`` (default: last block), without the final
norm. This source is not exercised by the test suite when open_clip is not installed.
"""

from __future__ import annotations

import torch

from movekd.teachers._load import is_local, loading, resolve_reference
from movekd.teachers.base import SpecError, Teacher, TeacherLoadError, TeacherOutput, TeacherSpec
from movekd.teachers.registry import register_teacher

class OpenClipTeacher(Teacher):
    def __init__(self, spec: TeacherSpec, visual: torch.nn.Module):
        super().__init__(spec)
        self.visual = visual
        if not hasattr(visual, "forward_intermediates"):
            raise SpecError(f"teacher '{spec.name}': this open_clip version has no forward_intermediates; upgrade open_clip_torch")
        layer = -1 if spec.layer is None else spec.layer
        self.indices = list(visual.prune_intermediate_layers([layer], prune_norm=True, prune_head=True))

    def encode(self, pixel_values: torch.Tensor) -> TeacherOutput:
        out = self.visual.forward_intermediates(pixel_values, indices=self.indices, normalize_intermediates=False,
                                                intermediates_only=True, output_fmt="NCHW")
        (feature_map,) = out["image_intermediates"] if isinstance(out, dict) else out
        tokens = feature_map.flatten(2).transpose(1, 2)
        return TeacherOutput(tokens=tokens, cls=None, attn=None, grid=tuple(feature_map.shape[-2:]))


@register_teacher("open_clip")
def create_open_clip(spec: TeacherSpec) -> OpenClipTeacher:
    try:
        import open_clip
    except ImportError as exc:  # optional dependency
        raise TeacherLoadError(
            f"teacher '{spec.name}' needs open_clip, which is not installed: pip install open_clip_torch"
        ) from exc
    pretrained = None
    if spec.pretrained:
        pretrained = spec.checkpoint
        if pretrained is None:
            raise SpecError(f"teacher '{spec.name}': give checkpoint (a local file or an open_clip pretrained tag)")
        pretrained = resolve_reference(pretrained) if pretrained.startswith("asset:") or is_local(pretrained) else pretrained
    with loading(spec, "weights"):
        model = open_clip.create_model(spec.model, pretrained=pretrained, **dict(spec.config))
    return OpenClipTeacher(spec, model.visual)
