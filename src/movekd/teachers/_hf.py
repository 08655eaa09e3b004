"""Shared code of the transformers sources: loading, and tapping a hidden state of a CLS-token ViT.

Tapping layer ``k`` (index into ``hidden_states``) keeps only the first ``k`` blocks: later blocks
would run and be thrown away (LLaVA's ``-2`` skips the last block of 24). The output of block
``k - 1`` and, if asked, the attention probabilities of that block are read with forward hooks, so
no other layer's attention is kept in memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from movekd.teachers._load import loading, resolve_reference
from movekd.teachers.base import SpecError, Teacher, TeacherOutput, TeacherSpec


def load_hf_model(spec: TeacherSpec, model_cls: type, config_cls: type, *, attn_implementation: str = "sdpa"):
    """``model_cls`` from ``spec``: pretrained (hub id or local folder) or random from ``spec.config``."""
    if spec.pretrained:
        where = resolve_reference(spec.model)
        with loading(spec, "weights"):
            model = model_cls.from_pretrained(where, attn_implementation=attn_implementation)
        return model
    if spec.config:
        config = config_cls.from_dict(dict(spec.config))
    else:
        where = resolve_reference(spec.model)
        with loading(spec, "config"):
            config = config_cls.from_pretrained(where)
    return model_cls._from_config(config, attn_implementation=attn_implementation)


def recordable_class(model: nn.Module, key: str) -> type:
    """The module class transformers records for ``key`` (``"hidden_states"``, ``"attentions"``)."""
    spec = getattr(type(model), "_can_record_outputs", {}).get(key)
    spec = getattr(spec, "target_class", spec)
    if not isinstance(spec, type):
        raise TypeError(f"{type(model).__name__} does not declare which modules produce '{key}'")
    return spec


def block_list(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of transformer blocks."""
    block_cls = recordable_class(model, "hidden_states")
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(isinstance(b, block_cls) for b in module):
            return module
    raise TypeError(f"no list of {block_cls.__name__} blocks in {type(model).__name__}")


def resolve_layer(layer: int | None, num_layers: int, name: str) -> int:
    """``hidden_states`` index (may be negative; None = last) → number of blocks to run, 1..L."""
    layer = -1 if layer is None else layer
    if not -(num_layers + 1) <= layer <= num_layers:
        raise SpecError(f"teacher '{name}': 'layer' {layer} is out of range for {num_layers} blocks")
    k = layer % (num_layers + 1)
    if k == 0:
        raise SpecError(f"teacher '{name}': 'layer' {layer} selects the embeddings; tap a block output (>= 1)")
    return k


def keep_blocks(model: nn.Module, k: int) -> nn.ModuleList:
    """Drop the blocks after the first ``k`` (and keep ``config.num_hidden_layers`` in sync)."""
    blocks = block_list(model)
    del blocks[k:]
    model.config.num_hidden_layers = k
    return blocks


class BlockTap:
    """Forward hooks recording the output of one block and, optionally, its attention probabilities."""

    def __init__(self, model: nn.Module, block: nn.Module, attention: bool):
        self.hidden: torch.Tensor | None = None
        self.attn: torch.Tensor | None = None
        block.register_forward_hook(self._on_block)
        if attention:
            attn_cls = recordable_class(model, "attentions")
            modules = [m for m in block.modules() if isinstance(m, attn_cls)]
            if len(modules) != 1:
                raise TypeError(f"expected one {attn_cls.__name__} in the tapped block, found {len(modules)}")
            modules[0].register_forward_hook(self._on_attention)

    def _on_block(self, module, args, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output

    def _on_attention(self, module, args, output) -> None:
        self.attn = output[1] if isinstance(output, tuple) and len(output) > 1 else None

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, attn = self.hidden, self.attn
        self.hidden = self.attn = None
        if hidden is None:
            raise RuntimeError("the tapped block did not run")
        return hidden, attn


class HFViTTeacher(Teacher):
    """A transformers CLS-token ViT (CLIP, DINOv2): tokens, CLS and attention at ``spec.layer``."""

    def __init__(self, spec: TeacherSpec, model: nn.Module, *, patch_size: int, num_prefix_tokens: int = 1,
                 forward_kwargs: dict[str, Any] | None = None):
        super().__init__(spec)
        self.model = model
        if spec.image_size % patch_size:
            raise SpecError(f"teacher '{spec.name}': image_size {spec.image_size} is not a multiple of patch {patch_size}")
        self.patch_size = patch_size
        self.num_prefix_tokens = num_prefix_tokens
        self.forward_kwargs = dict(forward_kwargs or {})
        if spec.provides_cls_attention and not num_prefix_tokens:
            raise SpecError(f"teacher '{spec.name}': this model has no CLS token; set provides_cls_attention to False")
        k = resolve_layer(spec.layer, model.config.num_hidden_layers, spec.name)
        blocks = keep_blocks(model, k)
        self._tap = BlockTap(model, blocks[k - 1], attention=spec.provides_cls_attention)

    def encode(self, pixel_values: torch.Tensor) -> TeacherOutput:
        self.model(pixel_values=pixel_values, **self.forward_kwargs)
        hidden, attn = self._tap.take()
        h, w = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        tokens = hidden[:, self.num_prefix_tokens:]
        if self.spec.provides_cls_attention and attn is None:
            raise RuntimeError(f"teacher '{self.name}': no attention probabilities (is attention eager?)")
        cls = hidden[:, 0] if self.num_prefix_tokens else None
        return TeacherOutput(tokens=tokens, cls=cls, attn=attn, grid=(h, w))


def attn_implementation(spec: TeacherSpec) -> str:
    # Only eager attention returns the probabilities; the others (sdpa) are faster.
    return "eager" if spec.provides_cls_attention else "sdpa"
