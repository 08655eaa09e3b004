"""Save and load the inference bundle: student encoder + projector + LLM (no teachers, no adapters).

Layout of a bundle folder::

    movekd_config.json      {"format": "movekd-vlm", "format_version": 2, "movekd_version": ...,
                             **asdict(VLMConfig), "extra": {...}}: the typed config of
                             :mod:`movekd.vlm.config` (vision recipe, projector, image decoding,
                             template / bos / system prompt, precision, attention implementation)
    vision.safetensors      state dict of ``vlm.vision``
    projector.safetensors   state dict of ``vlm.projector``
    anyres.safetensors      ``image_newline`` (LLaVA-NeXT AnyRes VLMs only; the grid is
                            ``image_grid_pinpoints`` in the config)
    llm/                    the LLM in Hugging Face format (``save_pretrained``, safetensors),
                            plus the tokenizer when one is given: ``AutoModelForCausalLM`` /
                            ``AutoTokenizer.from_pretrained(bundle / "llm")`` work on their own.

Version 1 bundles (movekd 0.1: ``vision``, ``projector``, ``image_token_index`` and the prompt
settings only inside ``extra.train_config``) still load: :func:`read_vlm_config` derives the
missing fields from the training config they carry.

The folder is written under a temporary name next to the target and renamed into place, so a
crash never leaves a half-written bundle under the final name. The vision module is rebuilt by a
factory the caller passes (``build_vision(config_dict) -> nn.Module``): this module does not know
which encoders exist. Only ``vlm.vision``'s own state dict is saved: a vision module that holds
frozen teachers as submodules would save them too, so teachers belong outside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from movekd.atomic import atomic_folder
from movekd.errors import CheckpointError
from movekd.vlm.config import VLMConfig, config_for, settings_from_train_config
from movekd.vlm.model import MoveKDVLM
from movekd.vlm.projector import build_projector

CONFIG_NAME = "movekd_config.json"
VISION_FILE = "vision.safetensors"
PROJECTOR_FILE = "projector.safetensors"
ANYRES_FILE = "anyres.safetensors"
LLM_DIR = "llm"
FORMAT = "movekd-vlm"
FORMAT_VERSION = 2
_FORMAT_KEYS = ("format", "format_version", "movekd_version", "extra", "llm_subfolder")


def save_vlm(vlm: MoveKDVLM, path: str | os.PathLike, *, tokenizer=None, config: VLMConfig | None = None,
             extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the inference bundle of ``vlm`` to the folder ``path`` (atomically); returns ``path``.

    ``config``: the bundle's :class:`VLMConfig` (default: ``vlm.config`` if set, else one built
    from the modules with default prompt settings). ``extra`` is stored under ``"extra"`` (e.g. the
    training config, for the record). ``overwrite`` replaces an existing bundle, else it is an error.
    """
    from movekd import __version__

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    config = config or getattr(vlm, "config", None) or config_for(vlm)
    if (getattr(vlm, "anyres", None) is not None) != bool(config.image_grid_pinpoints):
        raise ValueError("save_vlm: the VLM's anyres packer and config.image_grid_pinpoints must come together")
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "movekd_version": __version__,
                **config.to_dict(), "extra": extra or {}}
    config_text = json.dumps(document, indent=2, sort_keys=True)  # fails here, before any write, if not JSON-able
    with atomic_folder(path) as tmp:
        metadata = {"format": "pt"}
        save_model(vlm.vision, str(tmp / VISION_FILE), metadata=metadata)
        save_model(vlm.projector, str(tmp / PROJECTOR_FILE), metadata=metadata)
        if getattr(vlm, "anyres", None) is not None:
            save_model(vlm.anyres, str(tmp / ANYRES_FILE), metadata=metadata)
        vlm.llm.save_pretrained(tmp / LLM_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / LLM_DIR)
        (tmp / CONFIG_NAME).write_text(config_text)
    return path


def read_config(path: str | os.PathLike) -> dict:
    """The bundle's ``movekd_config.json``, checked for format and version."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a movekd VLM bundle (no {CONFIG_NAME})")
    config = json.loads(file.read_text())
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {config.get('format')!r} is not {FORMAT!r}")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {config['format_version']} is newer than this movekd "
                              "supports (upgrade movekd)")
    return config


def read_vlm_config(path: str | os.PathLike) -> VLMConfig:
    """The bundle's :class:`VLMConfig`; for a version-1 bundle, derived from its training config."""
    document = read_config(path)
    if document.get("format_version", 1) >= 2:
        return VLMConfig.from_dict({k: v for k, v in document.items() if k not in _FORMAT_KEYS})
    if "vision" not in document or "projector" not in document:
        raise CheckpointError(f"{path}: a version-1 bundle config without 'vision'/'projector'; it cannot be loaded")
    settings = settings_from_train_config(document.get("extra", {}).get("train_config"))
    if "image_size" not in settings and document.get("extra", {}).get("image_size"):
        settings["image_size"] = int(document["extra"]["image_size"])
    return VLMConfig.from_dict({"vision": document["vision"], "projector": document["projector"],
                                "image_token_index": document.get("image_token_index", -200), **settings})


def load_vlm(path: str | os.PathLike, build_vision: Callable[[dict], nn.Module] | None = None, *,
             dtype: torch.dtype | None = None, device: str | torch.device | None = None,
             **llm_kwargs) -> MoveKDVLM:
    """Rebuild a :class:`MoveKDVLM` from a bundle (its ``.config`` set to the bundle's :class:`VLMConfig`).

    ``build_vision(config.vision)`` must return the vision module (weights are then loaded
    strictly); default: :func:`movekd.student.build_student`. ``dtype``/``device`` apply to the whole
    model; ``llm_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (default
    ``attn_implementation``: the bundle's). Returns it in eval mode.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = read_vlm_config(path)
    if build_vision is None:
        from movekd.student import build_student as build_vision
    vision = build_vision(dict(config.vision))
    load_model(vision, str(path / VISION_FILE), strict=True)
    pcfg = config.projector
    projector = build_projector(pcfg.type, pcfg.in_dim, pcfg.out_dim)
    load_model(projector, str(path / PROJECTOR_FILE), strict=True)
    llm_kwargs.setdefault("attn_implementation", config.attn_implementation)
    llm = AutoModelForCausalLM.from_pretrained(path / LLM_DIR, **llm_kwargs)
    anyres = None
    if config.image_grid_pinpoints:
        from movekd.vlm.anyres import AnyResPacker

        crop = config.vision_input_size
        anyres = AnyResPacker(config.image_grid_pinpoints, crop, crop // int(vision.patch_size), pcfg.out_dim)
        load_model(anyres, str(path / ANYRES_FILE), strict=True)
    vlm = MoveKDVLM(vision, projector, llm, vision_config=config.vision, image_token_index=config.image_token_index,
                    config=config, anyres=anyres)
    if dtype is not None or device is not None:
        vlm.to(device=device, dtype=dtype)
    return vlm.eval()


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved with the bundle (``save_vlm(..., tokenizer=...)``)."""
    from transformers import AutoTokenizer

    read_config(path)  # checks that this is a bundle
    return AutoTokenizer.from_pretrained(Path(path) / LLM_DIR)
