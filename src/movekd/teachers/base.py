"""The teacher contract: a typed spec, a frozen module, its output, and the helpers that keep
teachers out of optimisers and checkpoints.

A teacher is built from a :class:`TeacherSpec` by a factory registered under ``spec.source``
(:mod:`movekd.teachers.registry`). It is an ``nn.Module`` so that ``.to()``, dtype casts and DDP see
it, but it is frozen: ``requires_grad`` is False on every parameter, it stays in eval mode whatever
``train()`` is called with, and ``forward`` runs under ``torch.no_grad()``.

Input contract of ``Teacher.forward(images)``: a batch ``[B, 3, H, W]`` of RGB images, either
``uint8`` in 0..255 (the normal case: decoded images) or floating point in 0..1. Each teacher
resizes, crops or pads and normalises the batch itself, on its own device (:mod:`.preprocess`).

Keeping teachers out of training state (the trainer's convention):

- optimiser: build it from :func:`trainable_parameters` (never from ``model.parameters()``);
- checkpoint: save :func:`state_dict_without_teachers` (teachers are rebuilt from their specs);
- :func:`is_teacher_param` tells for one qualified name, given the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from movekd.errors import UserError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESIZE_MODES = ("shortest_crop", "longest_pad")
INTERPOLATIONS = ("bicubic", "bilinear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SpecError(UserError, ValueError):
    """A teacher (or student) spec is invalid; the message names the bad key."""


class TeacherLoadError(UserError, RuntimeError):
    """A teacher's weights (or architecture) could not be loaded; the message says how to fix it."""


@dataclass(frozen=True)
class TeacherSpec:
    """Everything needed to build one teacher (or the student's source model).

    Attributes:
        name: short name used in logs, losses and configs (e.g. ``"clip"``).
        source: registered factory (``movekd teachers`` lists them): ``hf_clip``, ``hf_dinov2``,
            ``hf_sam``, ``timm``, ``open_clip``.
        model: HF hub id or local folder (``save_pretrained`` layout); timm architecture name (with
            an optional ``.tag``); open_clip model name. ``"asset:NAME"`` means the folder returned
            by ``movekd.assets.ensure(NAME)``.
        pretrained: load weights; False builds the real architecture with random weights.
        checkpoint: local weights for sources whose ``model`` is an architecture name (timm,
            open_clip): a ``.safetensors``/``.pth``/``.bin`` file, a folder holding one, or
            ``"asset:NAME"``. Ignored when ``pretrained`` is False.
        image_size: side of the square input the model sees.
        resize: ``"shortest_crop"`` (shortest side to ``image_size / crop_pct``, centre crop) or
            ``"longest_pad"`` (longest side to ``image_size``, pad bottom/right with the mean colour).
        crop_pct: timm's crop fraction for ``shortest_crop`` (1.0 = CLIP / LLaVA).
        interpolation: ``"bicubic"`` or ``"bilinear"`` (antialiased, as the libraries' processors).
        mean, std: per-channel normalisation, on 0..1 pixel values.
        layer: which representation to tap. HF ViTs: index into ``hidden_states`` (0 = embeddings,
            -1 = last block, -2 = the LLaVA choice), always without the final norm. timm: None =
            ``forward_features``, an int = ``forward_intermediates`` index (no norm). SAM: None (neck).
        provides_cls_attention: also return the CLS token and the attention probabilities at the
            tapped layer (needs eager attention; HF ViTs only). Required for the CLIP-role teacher.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        config: architecture. timm / open_clip: keyword arguments of ``create_model`` (always
            applied, e.g. ``img_size``). HF: the config (``to_dict`` form) used to build random weights
            when ``pretrained`` is False, so presets never need the network; a pretrained model brings
            its own ``config.json``.
    """

    name: str
    source: str
    model: str
    pretrained: bool = True
    checkpoint: str | None = None
    image_size: int = 224
    resize: str = "shortest_crop"
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    layer: int | None = None
    provides_cls_attention: bool = False
    dtype: str = "float32"
    config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise sequences from YAML/JSON (lists) and validate every field once, here.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "config", dict(self.config or {}))
        for key in ("name", "source", "model"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise SpecError(f"teacher spec key '{key}' must be a non-empty string, got {getattr(self, key)!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise SpecError(f"teacher '{self.name}': 'image_size' must be a positive int, got {self.image_size!r}")
        if self.resize not in RESIZE_MODES:
            raise SpecError(f"teacher '{self.name}': 'resize' must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise SpecError(
                f"teacher '{self.name}': 'interpolation' must be one of {INTERPOLATIONS}, got {self.interpolation!r}"
            )
        if not 0.0 < float(self.crop_pct) <= 1.0:
            raise SpecError(f"teacher '{self.name}': 'crop_pct' must be in (0, 1], got {self.crop_pct!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise SpecError(f"teacher '{self.name}': 'mean' and 'std' need 3 values (std > 0)")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise SpecError(f"teacher '{self.name}': 'layer' must be an int or None, got {self.layer!r}")
        if self.dtype not in DTYPES:
            raise SpecError(f"teacher '{self.name}': 'dtype' must be one of {tuple(DTYPES)}, got {self.dtype!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TeacherSpec":
        """Build from a dict (YAML/JSON); an unknown key is an error that names it."""
        unknown = [k for k in data if k not in cls.field_names()]
        if unknown:
            raise SpecError(
                f"unknown teacher spec key '{unknown[0]}' (valid keys: {', '.join(cls.field_names())})"
            )
        missing = [k for k in ("name", "source", "model") if k not in data]
        if missing:
            raise SpecError(f"teacher spec is missing required key '{missing[0]}'")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (saved inside checkpoints)."""
        out = dataclasses.asdict(self)
        out["mean"], out["std"], out["config"] = list(self.mean), list(self.std), dict(self.config)
        return out

    def replace(self, **overrides: Any) -> "TeacherSpec":
        """A copy with some fields changed; an unknown key is an error that names it."""
        unknown = [k for k in overrides if k not in self.field_names()]
        if unknown:
            raise SpecError(
                f"unknown teacher spec key '{unknown[0]}' (valid keys: {', '.join(self.field_names())})"
            )
        return dataclasses.replace(self, **overrides)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class TeacherOutput:
    """What a teacher returns for a batch.

    Attributes:
        tokens: ``[B, N, C]`` features, channels last, tokens in row-major grid order: token
            ``y * w + x`` comes from grid cell (row ``y``, column ``x``). No CLS / prefix tokens.
        cls: ``[B, C]`` CLS token at the tapped layer, or None.
        attn: ``[B, heads, 1 + N, 1 + N]`` attention probabilities at the tapped layer (index 0 is
            CLS), or None.
        grid: ``(h, w)`` with ``h * w == N``.
    """

    tokens: torch.Tensor
    cls: torch.Tensor | None
    attn: torch.Tensor | None
    grid: tuple[int, int]


class Teacher(nn.Module):
    """Base class: preprocessing + a frozen encoder. Subclasses implement :meth:`encode`.

    Subclasses register their model as submodules in ``__init__``; :func:`create_teacher` then calls
    :meth:`freeze` and casts to ``spec.dtype``.
    """

    def __init__(self, spec: TeacherSpec):
        super().__init__()
        from movekd.teachers.preprocess import Preprocessor

        self.spec = spec
        self.preprocess = Preprocessor.from_spec(spec)

    @property
    def name(self) -> str:
        return self.spec.name

    def encode(self, pixel_values: torch.Tensor) -> TeacherOutput:
        """Run the model on preprocessed ``pixel_values`` ``[B, 3, S, S]`` (already on device/dtype)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """``images``: ``[B, 3, H, W]``, uint8 0..255 or float 0..1 (moved to the teacher's device)."""
        with torch.no_grad():
            ref = self._reference_tensor()
            pixel_values = self.preprocess(images.to(ref.device, non_blocking=True), dtype=ref.dtype)
            return self.encode(pixel_values)

    def _reference_tensor(self) -> torch.Tensor:
        for tensor in self.parameters():
            return tensor
        for tensor in self.buffers():
            return tensor
        return torch.empty(0)

    def freeze(self) -> "Teacher":
        """``requires_grad=False`` everywhere and eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        # A parent's model.train() must not switch dropout / BN statistics on, nor unfreeze.
        return self.freeze()

    def extra_repr(self) -> str:
        s = self.spec
        return f"name={s.name!r}, source={s.source!r}, model={s.model!r}, image_size={s.image_size}, layer={s.layer}"


# --- keeping teachers out of optimisers and checkpoints ---------------------------------------------

def teacher_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Qualified names (with a trailing dot) of the teachers inside ``model``; ``("",)`` if it is one."""
    if isinstance(model, Teacher):
        return ("",)
    return tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, Teacher))


def is_teacher_param(name: str, model: nn.Module | tuple[str, ...]) -> bool:
    """True if the parameter/buffer ``name`` of ``model`` belongs to a teacher.

    ``model`` may also be the tuple from :func:`teacher_prefixes` (compute it once for many names).
    """
    prefixes = model if isinstance(model, tuple) else teacher_prefixes(model)
    return any(name.startswith(p) for p in prefixes)


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` with ``requires_grad`` that are not inside a teacher (for optimisers)."""
    prefixes = teacher_prefixes(model)
    for name, p in model.named_parameters():
        if p.requires_grad and not is_teacher_param(name, prefixes):
            yield name, p


def state_dict_without_teachers(model: nn.Module, **kwargs: Any) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` minus every teacher entry (checkpoints rebuild teachers from specs)."""
    prefixes = teacher_prefixes(model)
    return {k: v for k, v in model.state_dict(**kwargs).items() if not is_teacher_param(k, prefixes)}


def iter_teachers(model: nn.Module) -> Iterator[tuple[str, Teacher]]:
    """``(qualified name, teacher)`` for every teacher inside ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, Teacher):
            yield name, m
