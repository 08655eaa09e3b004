"""Save and load the inference bundle: student encoder + projector + LLM (no teachers, no adapters).

Layout of a bundle folder::

    movekd_config.json      {"format": "movekd-vlm", "format_version": 1, "vision": {...},
                             "projector": {"type", "in_dim", "out_dim"}, "image_token_index": -200, ...}
    vision.safetensors      state dict of ``vlm.vision``
    projector.safetensors   state dict of ``vlm.projector``
    llm/                    the LLM in Hugging Face format (``save_pretrained``, safetensors),
                            plus the tokenizer when one is given: ``AutoModelForCausalLM`` /
                            ``AutoTokenizer.from_pretrained(bundle / "llm")`` work on their own.

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
from movekd.vlm.model import MoveKDVLM
from movekd.vlm.projector import build_projector

CONFIG_NAME = "movekd_config.json"
VISION_FILE = "vision.safetensors"
PROJECTOR_FILE = "projector.safetensors"
LLM_DIR = "llm"
FORMAT = "movekd-vlm"
FORMAT_VERSION = 1


def save_vlm(vlm: MoveKDVLM, path: str | os.PathLike, *, tokenizer=None, extra: dict | None = None,
             overwrite: bool = False) -> Path:
    """Write the inference bundle of ``vlm`` to the folder ``path`` (atomically); returns ``path``.

    ``extra`` is stored under ``"extra"`` in the JSON config (e.g. the training config, the image
    size and template name). ``overwrite`` replaces an existing bundle, else it is an error.
    """
    from movekd import __version__

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    projector_cfg = getattr(vlm.projector, "config", None)
    if not projector_cfg:
        raise ValueError("vlm.projector has no .config; build it with movekd.vlm.build_projector")
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "movekd_version": __version__,
        "vision": vlm.vision_config,
        "projector": dict(projector_cfg),
        "image_token_index": vlm.image_token_index,
        "llm_subfolder": LLM_DIR,
        "extra": extra or {},
    }
    config_text = json.dumps(config, indent=2, sort_keys=True)  # fails here, before any write, if not JSON-able
    with atomic_folder(path) as tmp:
        metadata = {"format": "pt"}
        save_model(vlm.vision, str(tmp / VISION_FILE), metadata=metadata)
        save_model(vlm.projector, str(tmp / PROJECTOR_FILE), metadata=metadata)
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
        raise ValueError(f"{file}: format {config.get('format')!r} is not {FORMAT!r}")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {config['format_version']} is newer than this movekd supports")
    return config


def load_vlm(path: str | os.PathLike, build_vision: Callable[[dict], nn.Module], *,
             dtype: torch.dtype | None = None, device: str | torch.device | None = None,
             **llm_kwargs) -> MoveKDVLM:
    """Rebuild a :class:`MoveKDVLM` from a bundle.

    ``build_vision(config["vision"])`` must return the vision module (weights are then loaded
    strictly). ``dtype``/``device`` apply to the whole model; ``llm_kwargs`` go to
    ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``). Returns it in eval mode.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = read_config(path)
    vision = build_vision(dict(config["vision"]))
    load_model(vision, str(path / VISION_FILE), strict=True)
    pcfg = config["projector"]
    projector = build_projector(pcfg["type"], pcfg["in_dim"], pcfg["out_dim"])
    load_model(projector, str(path / PROJECTOR_FILE), strict=True)
    llm = AutoModelForCausalLM.from_pretrained(path / config.get("llm_subfolder", LLM_DIR), **llm_kwargs)
    vlm = MoveKDVLM(vision, projector, llm, vision_config=config["vision"],
                    image_token_index=config.get("image_token_index", -200))
    if dtype is not None or device is not None:
        vlm.to(device=device, dtype=dtype)
    return vlm.eval()


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved with the bundle (``save_vlm(..., tokenizer=...)``)."""
    from transformers import AutoTokenizer

    config = read_config(path)
    return AutoTokenizer.from_pretrained(Path(path) / config.get("llm_subfolder", LLM_DIR))
