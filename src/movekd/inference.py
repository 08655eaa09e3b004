"""Inference: load a trained VLM bundle (student + projector + LLM only) and ask it questions.

Teachers and adapters are never loaded: the bundle does not contain them (paper: "only the student
encoder is used during inference").
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from movekd.errors import UserError
from movekd.vlm.config import VLMConfig


class NotAnyResError(UserError, ValueError):
    """AnyRes asked of a model that has no ``image_newline`` / grid."""


@dataclass
class LoadedVLM:
    """A model ready for inference, with the bundle's :class:`movekd.vlm.VLMConfig` (prompt format,
    image decoding, precision). ``vlm`` is a :class:`movekd.vlm.MoveKDVLM` or anything with its
    ``generate(images, input_ids, attention_mask, ...)`` (e.g. an exported HF LLaVA folder)."""

    vlm: object
    tokenizer: object
    config: VLMConfig
    precision_override: str | None = None

    @property
    def image_size(self) -> int:
        return self.config.decode_size

    @property
    def template(self) -> str:
        return self.config.template

    @property
    def system_prompt(self) -> str | None:
        return self.config.system_prompt

    @property
    def bos(self) -> str:
        return self.config.bos

    @property
    def image_aspect_ratio(self) -> str:
        return self.config.image_aspect_ratio

    @image_aspect_ratio.setter
    def image_aspect_ratio(self, mode: str) -> None:  # e.g. chat --image-aspect-ratio
        if mode == "anyres" and not self.config.image_grid_pinpoints:
            raise NotAnyResError("image_aspect_ratio 'anyres': the model was not trained with anyres (its bundle "
                                 "has no image_grid_pinpoints / image_newline)")
        self.config = self.config.replace(image_aspect_ratio=mode)

    @property
    def grid_pinpoints(self) -> list[list[int]] | None:
        """The AnyRes grid of an ``anyres`` bundle (:mod:`movekd.data.anyres`)."""
        return self.config.image_grid_pinpoints

    @property
    def answer_word(self) -> str:
        """Which word of an answer evaluation compares (``first``, or ``last`` after a rationale)."""
        return self.config.answer_word

    @property
    def precision(self) -> str:
        return self.precision_override or self.config.precision

    @property
    def fill(self) -> tuple[int, int, int]:
        """The ``pad`` colour: the student's mean, LLaVA's rounding (:func:`movekd.data.fill_colour`)."""
        from movekd.data import fill_colour

        spec = self.config.vision.get("spec") or {}
        return fill_colour(spec.get("mean", (0.0, 0.0, 0.0)))

    def autocast(self):
        device = next(self.vlm.parameters()).device.type
        if self.precision == "bf16":
            return torch.autocast(device, dtype=torch.bfloat16)
        if self.precision == "fp16":
            return torch.autocast(device, dtype=torch.float16)
        return nullcontext()


def resolve_bundle(path: str | Path) -> Path:
    """A bundle folder, or a run folder (its ``final`` bundle)."""
    path = Path(path)
    if (path / "movekd_config.json").is_file():
        return path
    if (path / "final" / "movekd_config.json").is_file():
        return path / "final"
    raise FileNotFoundError(f"{path} is neither a movekd VLM bundle, nor a run folder with one in final/, "
                            "nor a movekd export (hf-llava)")


def load_trained(path: str | Path, device: str | torch.device = "cpu", precision: str | None = None,
                 fold_experts: bool | str = "auto") -> LoadedVLM:
    """Load a bundle, a run folder or an ``movekd export`` folder for inference (eval mode).

    ``fold_experts``: run sparse-routed MoLE layers on per-expert folded FFN weights (no LoRA FLOPs;
    E extra copies of each FFN in memory, e.g. +604M values for CLIP-L with E=3); other routings are
    unaffected. ``"auto"`` (default) folds where the copies can be pre-packed (CPU with oneDNN), where
    ``movekd bench mole`` measured folding faster than the LoRA path in fp32 and bf16; ``False`` keeps
    the LoRA path (less memory). ``precision`` overrides the bundle's."""
    from movekd.mole import set_fold_inference
    from movekd.vlm import load_tokenizer, load_vlm

    from movekd.export.hf_llava_runner import is_hf_llava_export, load_hf_llava_export

    if is_hf_llava_export(path):
        model, tokenizer, config = load_hf_llava_export(path, device=device)
        return LoadedVLM(model, tokenizer, config, precision)
    bundle = resolve_bundle(path)
    vlm = load_vlm(bundle, device=device)
    set_fold_inference(vlm.vision, fold_experts)
    return LoadedVLM(vlm, load_tokenizer(bundle), vlm.config, precision)


def read_query_image(image_path: str | Path, size: int = 16, image_aspect_ratio: str = "stretch",
                     fill: tuple[int, int, int] = (0, 0, 0), grid_pinpoints=None):
    """A user's image as ``uint8 [3, size, size]``; :class:`~movekd.errors.ImageError` naming the file
    when it is missing or cannot be decoded (call it before loading a model to fail fast)."""
    from movekd.data import read_image
    from movekd.errors import ImageError

    image_path = Path(image_path)
    if not image_path.is_file():
        raise ImageError(f"image not found: {image_path}")
    try:
        return read_image(image_path, size, image_aspect_ratio, fill, grid_pinpoints)
    except (OSError, ValueError, SyntaxError) as error:  # PIL: UnidentifiedImageError, truncated files, ...
        raise ImageError(f"cannot read image {image_path}: {type(error).__name__}: {error}") from error


def answer(loaded: LoadedVLM, image_path: str | Path, question: str, max_new_tokens: int = 32) -> str:
    """Greedy answer to one question about one image."""
    from movekd.data import ConversationEncoder

    image = read_query_image(image_path, loaded.image_size, loaded.image_aspect_ratio, loaded.fill,
                             loaded.grid_pinpoints)
    if isinstance(image, torch.Tensor):
        image = image[None]
    encoder = ConversationEncoder(loaded.tokenizer, loaded.template, system_prompt=loaded.system_prompt,
                                  bos=loaded.bos)
    prompt = encoder.encode_prompt([{"from": "human", "value": f"<image>\n{question}"}], has_image=True)
    device = next(loaded.vlm.parameters()).device
    with loaded.autocast():
        out = loaded.vlm.generate(image.to(device), prompt.input_ids[None].to(device), max_new_tokens=max_new_tokens,
                                  eos_token_id=loaded.tokenizer.eos_token_id)
    return loaded.tokenizer.decode(out[0], skip_special_tokens=True).strip()
