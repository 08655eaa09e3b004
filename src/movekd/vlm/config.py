"""``VLMConfig``: everything inference needs to rebuild and prompt a VLM, saved beside its weights.

A bundle describes itself (nanoVLM's ``VisionLanguageModel``): the vision recipe (the student with its
MoLE options, or any module's rebuild dict), the projector, how images are decoded, the prompt format
the model was trained with (template, BOS, system prompt), and the precision and attention
implementation to run it in. Eval, chat and export read this, never the training config.

Bundles written before this config existed (``format_version`` 1) carried the prompt settings only
inside ``extra.train_config``; :func:`settings_from_train_config` reads them from there, for both the
trainer (when it writes a bundle) and the loader of old bundles, so the mapping exists once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Optional

from movekd.config.answer import AnswerWord
from movekd.config.loader import from_dict
from movekd.data.templates import IMAGE_TOKEN_INDEX



@dataclass
class ProjectorConfig:
    type: str
    in_dim: int
    out_dim: int


@dataclass
class VLMConfig:
    """The typed config of a :class:`movekd.vlm.MoveKDVLM` bundle (``movekd_config.json``)."""

    # Rebuild recipe of the vision module (``Student.config`` for the MoLE student: architecture,
    # select layer, preprocessing, MoLE options).
    vision: dict
    projector: ProjectorConfig
    # Side of the square images are decoded to before the vision module's own preprocessing (the
    # trainer's ``image_size``); None: the vision module's input size.
    image_size: Optional[int] = None
    # How a non-square image becomes that square (movekd.data.images: stretch | square | pad), or
    # "anyres": LLaVA-NeXT tiles at the vision input size (movekd.data.anyres).
    image_aspect_ratio: Literal["stretch", "square", "pad", "anyres"] = "stretch"
    # AnyRes grid ([height, width] resolutions); set when the VLM has an image_newline (anyres.safetensors).
    image_grid_pinpoints: Optional[list[list[int]]] = None
    template: Literal["plain", "chat", "v1"] = "chat"
    bos: Literal["auto", "always", "never"] = "auto"
    # As in training: None keeps the chat template's default system message, "" an empty one.
    system_prompt: Optional[str] = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    attn_implementation: str = "sdpa"
    # The answer format it was trained to: which word of an answer evaluation compares
    # (movekd.eval.vqa): "last" for answers after a rationale (the demo's "a blue circle; not red: yes").
    answer_word: AnswerWord = "first"
    image_token_index: int = IMAGE_TOKEN_INDEX

    def __post_init__(self):
        if self.image_aspect_ratio == "anyres" and not self.image_grid_pinpoints:
            raise ValueError("image_aspect_ratio 'anyres' needs image_grid_pinpoints (a VLM trained with anyres "
                             "has them in its bundle)")

    @classmethod
    def from_dict(cls, data: dict) -> "VLMConfig":
        """From the JSON form; an unknown or ill-typed key raises ``ConfigError`` naming it."""
        return from_dict(cls, dict(data))

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes: Any) -> "VLMConfig":
        return replace(self, **changes)

    @property
    def vision_input_size(self) -> int | None:
        """The vision module's own input side (the student spec's ``image_size``), if it has one."""
        spec = self.vision.get("spec") if isinstance(self.vision, dict) else None
        return int(spec["image_size"]) if isinstance(spec, dict) and "image_size" in spec else None

    @property
    def decode_size(self) -> int:
        """The square images are decoded to; under anyres the crop side, i.e. the vision input size."""
        size = (self.vision_input_size if self.image_aspect_ratio == "anyres" else None) or self.image_size \
            or self.vision_input_size
        if not size:
            raise ValueError("VLMConfig: image_size is not set and the vision recipe has no spec.image_size")
        return int(size)


def settings_from_train_config(train: dict | None) -> dict:
    """The inference settings a training config implies: the last stage's prompt format, the run's
    decode size, precision and LLM attention implementation (keys of :class:`VLMConfig`)."""
    train = train or {}
    stage = (train.get("stages") or [{}])[-1]
    settings: dict[str, Any] = {
        "template": stage.get("template", "chat"),
        "bos": stage.get("bos", "auto"),
        "system_prompt": stage.get("system_prompt"),
        # the eval section's if set, else the last stage's (LLaVA: pad in both; movekd.data.images)
        "image_aspect_ratio": (train.get("eval") or {}).get("image_aspect_ratio")
        or stage.get("image_aspect_ratio") or "stretch",
        "precision": train.get("precision", "fp32"),
        "attn_implementation": train.get("model", {}).get("llm_attn_implementation", "sdpa"),
        "answer_word": (train.get("eval") or {}).get("answer_word") or "first",
    }
    if train.get("image_size"):
        settings["image_size"] = int(train["image_size"])
    return settings


def config_for(vlm, **settings: Any) -> VLMConfig:
    """A :class:`VLMConfig` for a built ``MoveKDVLM`` (its vision recipe and projector) plus ``settings``."""
    projector = getattr(vlm.projector, "config", None)
    if not projector:
        raise ValueError("vlm.projector has no .config; build it with movekd.vlm.build_projector")
    if getattr(vlm, "anyres", None) is not None:
        settings.setdefault("image_grid_pinpoints", vlm.anyres.pinpoints)
    return VLMConfig(vision=dict(vlm.vision_config), projector=ProjectorConfig(**projector),
                     image_token_index=vlm.image_token_index, **settings)


__all__ = ["ProjectorConfig", "VLMConfig", "config_for", "settings_from_train_config"]
