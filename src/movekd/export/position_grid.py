"""A stock HF ViT moved to the input side the student actually runs at.

A student may run at another side than its checkpoint's position grid (the demo's DINOv2-S/14 has
a 518 px grid and runs at 84 px): at run time the model resamples its position embeddings to the
input's patch grid (``interpolate_pos_encoding``: bicubic, ``align_corners=False``). An export that
keeps the checkpoint's ``image_size`` is still right for LLaVA when the stock class always resamples
(DINOv2), but not when it needs a flag stock LLaVA does not pass (CLIP), nor for LLaVA-NeXT, which
derives its tile token grid from ``vision_config.image_size // patch_size``.

So the export writes the tower at the input side, its position embeddings resampled once by the
model's own ``interpolate_pos_encoding`` (the function the student runs): at that side the stock
model then takes its no-resampling path with the very same embeddings, so its outputs are the
student's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from movekd.errors import UserError

# Where each stock class keeps its position embeddings (state-dict key) and its embeddings module
# (transformers 5: CLIPVisionModel holds the embeddings directly, no vision_model level).
_POSITION_KEYS = {"Dinov2Model": ("embeddings.position_embeddings", "embeddings"),
                  "CLIPVisionModel": ("embeddings.position_embedding.weight", "embeddings")}


def at_input_side(model: nn.Module, side: int) -> nn.Module:
    """``model`` (a stock ``Dinov2Model`` or ``CLIPVisionModel``) rebuilt with ``image_size = side``.

    Every weight is copied; the position embeddings are the ones ``model`` computes for a
    ``side × side`` input. Returns ``model`` itself if it is already at that side.
    """
    config = model.config
    if int(config.image_size) == side:
        return model
    kind = type(model).__name__
    if kind not in _POSITION_KEYS:
        raise UserError(f"export: cannot move a {kind} to input side {side} (known: {', '.join(_POSITION_KEYS)})")
    patch = int(config.patch_size)
    if side % patch:
        raise UserError(f"export: the student's input side {side} is not a multiple of its patch size {patch}")
    key, embeddings_path = _POSITION_KEYS[kind]
    embeddings = model.get_submodule(embeddings_path)
    tokens = 1 + (side // patch) ** 2
    with torch.no_grad():
        probe = torch.zeros(1, tokens, int(config.hidden_size), dtype=next(model.parameters()).dtype)
        positions = embeddings.interpolate_pos_encoding(probe, side, side)  # (1, tokens, hidden)
    new_config = copy.deepcopy(config)
    new_config.image_size = side
    moved = type(model)(new_config)
    state = dict(model.state_dict())
    state[key] = positions.reshape(moved.state_dict()[key].shape).clone()
    moved.load_state_dict(state, strict=True)
    return moved.to(next(model.parameters()).dtype).eval()
