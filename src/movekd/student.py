"""The student encoder: the CLIP-role ViT with MoLE in its FFNs (paper Eq. 1), trainable.

It is initialised from the same kind of spec as a teacher (``hf_clip`` or ``hf_dinov2``; e.g. the
presets ``clip_vit_l14_336`` or ``dinov2_s14_imgfocus``) and returns the select layer's patch tokens
``[B, N, D]`` (``spec.layer``, LLaVA's ``mm_vision_select_layer``; CLS dropped, no post-norm, before
any projector), the CLS token at that layer, and the router probabilities of every MoLE layer.

``drop_unused=True`` (default) removes what the select layer never uses: the blocks after it and the
final norm. Outputs are unchanged, compute is saved, and every trainable parameter gets a gradient
(DDP without ``find_unused_parameters``). The DINOv2 mask token (pre-training only) is frozen.
``mole=False`` gives the plain student of the no-KD baseline.

``Student.config`` is a JSON-able dict from which :func:`build_student` rebuilds the same module
(random weights, no network, no assets) for loading a saved state dict; it holds the full source
architecture, so the bundle format of :mod:`movekd.vlm.io` can use it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from movekd.teachers._hf import BlockTap, keep_blocks, load_hf_model, resolve_layer
from movekd.teachers.base import SpecError, TeacherSpec
from movekd.teachers.preprocess import Preprocessor
from movekd.teachers.registry import resolve_spec

CONFIG_TYPE = "movekd_student"
# Final norms applied after the last block (unused by the select-layer tokens).
_FINAL_NORMS = ("post_layernorm", "layernorm")


@dataclass
class StudentOutput:
    """What the student returns.

    Attributes:
        tokens: ``[B, N, D]`` patch tokens of the select layer, row-major grid order.
        cls: ``[B, D]`` CLS token of the select layer (None if not asked for).
        router_probs: ``[B, 1 + N, E]`` router probabilities per MoLE layer, in depth order (recorded
            when autograd records the forward, in any mode; empty for a plain student or under no_grad).
        grid: ``(h, w)``.
    """

    tokens: torch.Tensor
    cls: torch.Tensor | None
    router_probs: list[torch.Tensor] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)


def _model_classes(source: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    classes = {"hf_clip": (CLIPVisionModel, CLIPVisionConfig), "hf_dinov2": (Dinov2Model, Dinov2Config)}
    if source not in classes:
        raise SpecError(f"student source must be one of {sorted(classes)}, got '{source}'")
    return classes[source]


class Student(nn.Module):
    """MoLE student ViT. Build it with :func:`build_student`."""

    def __init__(self, spec: TeacherSpec, *, mole: bool = True, mole_options: Mapping[str, Any] | None = None,
                 drop_unused: bool = True, mole_every_block: bool = False):
        super().__init__()
        model_cls, config_cls = _model_classes(spec.source)
        model = load_hf_model(spec, model_cls, config_cls, attn_implementation="sdpa")
        architecture = model.config.to_dict()
        num_layers = model.config.num_hidden_layers
        k = resolve_layer(spec.layer, num_layers, spec.name)
        self.spec = spec
        self.select_layer = k  # number of blocks run; tokens are hidden_states[k]
        self.patch_size = int(model.config.patch_size)
        self.hidden_size = int(model.config.hidden_size)
        if spec.image_size % self.patch_size:
            raise SpecError(f"student: image_size {spec.image_size} is not a multiple of patch {self.patch_size}")
        self.forward_kwargs: dict[str, Any] = {}
        if spec.source == "hf_clip" and spec.image_size != model.config.image_size:
            self.forward_kwargs["interpolate_pos_encoding"] = True

        if drop_unused:
            keep_blocks(model, k)
            for name in _FINAL_NORMS:
                if isinstance(getattr(model, name, None), nn.LayerNorm):
                    setattr(model, name, nn.Identity())
        blocks = _blocks(model)
        for block in list(blocks)[k:]:  # only when drop_unused is False
            block.requires_grad_(False)
        for name in _FINAL_NORMS:
            if isinstance(getattr(model, name, None), nn.Module):
                getattr(model, name).requires_grad_(False)
        mask_token = getattr(getattr(model, "embeddings", None), "mask_token", None)
        if isinstance(mask_token, nn.Parameter):
            mask_token.requires_grad_(False)

        self._tap = BlockTap(model, blocks[k - 1], attention=False)
        self.mole = bool(mole)
        self.mole_options = dict(mole_options or {})
        if self.mole:
            from movekd.mole import inject_mole

            module_filter = None
            # Official MoVE-KD also wraps the blocks after the select layer (24 of 24 on CLIP-L: their
            # routers still get the balance loss). ``mole_every_block`` reproduces that; by default
            # blocks that never feed the select layer get no experts.
            if not drop_unused and not mole_every_block:
                prefix = _blocks_prefix(model)
                kept = {f"{prefix}.{i}." for i in range(k)}
                module_filter = lambda path: any(path.startswith(p) for p in kept)  # noqa: E731
            inject_mole(model, **self.mole_options, **({"module_filter": module_filter} if module_filter else {}))
        self.encoder = model
        self.preprocess = Preprocessor.from_spec(spec)
        self.config = {
            "type": CONFIG_TYPE,
            "spec": spec.replace(pretrained=False, config=architecture).to_dict(),
            "mole": self.mole,
            "mole_options": self.mole_options,
            "drop_unused": bool(drop_unused),
            "mole_every_block": bool(mole_every_block),
        }

    @property
    def num_tokens(self) -> int:
        return (self.spec.image_size // self.patch_size) ** 2

    def forward(self, images: torch.Tensor, *, return_cls: bool = True) -> StudentOutput:
        """``images``: ``[B, 3, H, W]`` uint8 (0..255) or float (0..1)."""
        ref = next(self.encoder.parameters())
        with torch.no_grad():
            pixel_values = self.preprocess(images.to(ref.device, non_blocking=True), dtype=ref.dtype)
        self.encoder(pixel_values=pixel_values, **self.forward_kwargs)
        hidden, _ = self._tap.take()
        side = self.spec.image_size // self.patch_size
        probs: list[torch.Tensor] = []
        if self.mole:
            from movekd.mole import collect_router_probs

            probs = collect_router_probs(self.encoder)
        return StudentOutput(tokens=hidden[:, 1:], cls=hidden[:, 0] if return_cls else None,
                             router_probs=probs, grid=(side, side))


def _blocks(model: nn.Module) -> nn.ModuleList:
    from movekd.teachers._hf import block_list

    return block_list(model)


def _blocks_prefix(model: nn.Module) -> str:
    blocks = _blocks(model)
    return next(name for name, m in model.named_modules() if m is blocks)


def build_student(spec_or_config: TeacherSpec | Mapping[str, Any] | str, *, mole: bool = True,
                  mole_options: Mapping[str, Any] | None = None, drop_unused: bool = True,
                  mole_every_block: bool = False, **overrides: Any) -> Student:
    """A :class:`Student` from a spec / spec dict / preset name, or from a saved ``Student.config``.

    ``mole_options`` are keyword arguments of ``movekd.mole.inject_mole`` (``num_experts``, ``rank``,
    ``alpha``, ``dropout``, ``routing``, ``init``, ...). ``overrides`` change spec fields.
    """
    if isinstance(spec_or_config, Mapping) and spec_or_config.get("type") == CONFIG_TYPE:
        config = spec_or_config
        spec = resolve_spec(config["spec"], **overrides)
        return Student(spec, mole=config["mole"], mole_options=config.get("mole_options"),
                       drop_unused=config.get("drop_unused", True),
                       mole_every_block=config.get("mole_every_block", False))
    spec = resolve_spec(spec_or_config, **overrides)
    return Student(spec, mole=mole, mole_options=mole_options, drop_unused=drop_unused,
                   mole_every_block=mole_every_block)
