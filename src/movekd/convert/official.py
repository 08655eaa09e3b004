"""Import a checkpoint of the official MoVE-KD code (``move_llava_llama``) as a movekd bundle.

The official finetune saves one Hugging Face folder (research/official-movekd.md §9): a LLaMA config
with LLaVA's ``mm_*`` fields plus a ``moe`` dict, the tokenizer, and the weights of
``MoVELlavaLlamaForCausalLM``:

- LLaMA: ``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head``;
- projector: ``model.mm_projector.{0,2}.*`` (``mm_projector_type``, e.g. ``mlp2x_gelu``);
- MoLE CLIP tower: ``model.vision_tower.vision_tower.vision_model.*``, with every MLP wrapped as
  ``mlp.original_module.fc{1,2}`` plus ``mlp.moe_down.{e}.lora_{A,B}``, ``mlp.moe_up.{e}.lora_{A,B}``
  and ``mlp.router`` (the names movekd's ``MoLEFFN`` uses, minus ``original_module.``);
- the encoder adapters (``{eva,convnext,sam,pix2struct}_adapter_{1,2}``): training only, dropped.

The student becomes a movekd ``Student`` (``hf_clip``, the official select layer, sparse top-1 routing
or dense as the config says; blocks after the select layer dropped, outputs unchanged); the prompt is
LLaVA v1 (``--version v1``) with the tokenizer's BOS; images are padded to square when the config
says ``image_aspect_ratio: pad``. The checkpoint does not record the CLIP architecture (the official
code loads it from ``mm_vision_tower``): it is taken from ``vision_config`` if given, else from a local
``mm_vision_tower`` folder, else from movekd's preset when the name is ``openai/clip-vit-large-patch14-336``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from movekd.errors import CheckpointError

OFFICIAL_MODEL_TYPE = "move_llava_llama"
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
CLIP_L14_336 = "openai/clip-vit-large-patch14-336"
_ADAPTER_NAMES = ("eva_adapter_", "convnext_adapter_", "sam_adapter_", "pix2struct_adapter_")


class OfficialCheckpointError(CheckpointError, ValueError):
    """The folder is not an official MoVE-KD checkpoint movekd can import; the message says why."""


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise OfficialCheckpointError(f"{folder}: no *.safetensors or pytorch_model*.bin weight files")
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """One state dict per file (torch ``.bin`` files loaded with ``weights_only=True``)."""
    from safetensors.torch import load_file

    for file in files:
        if file.suffix == ".safetensors":
            yield file, load_file(str(file))
        else:
            yield file, torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def _vision_architecture(config: dict, folder: Path, vision_config: dict | str | Path | None) -> dict:
    from transformers import CLIPVisionConfig

    if vision_config is not None and not isinstance(vision_config, dict):
        path = Path(vision_config)
        path = path / "config.json" if path.is_dir() else path
        vision_config = json.loads(path.read_text())
    if vision_config is None:
        tower = config.get("mm_vision_tower") or config.get("vision_tower")
        local = Path(tower) if tower else None
        if local is not None and not local.is_absolute():
            local = folder / local if (folder / local).exists() else local
        if local is not None and (local / "config.json").is_file():
            vision_config = json.loads((local / "config.json").read_text())
        elif tower == CLIP_L14_336:
            from movekd.teachers.registry import resolve_spec

            vision_config = dict(resolve_spec("clip_vit_l14_336").config)
        else:
            raise OfficialCheckpointError(
                f"the checkpoint's vision tower {tower!r} is neither {CLIP_L14_336} nor a local folder with a "
                "config.json: pass vision_config (--vision-config CONFIG.json) with its CLIP architecture")
    if vision_config.get("model_type") == "clip":  # a full CLIP config: take its vision part
        vision_config = vision_config.get("vision_config", {})
    arch = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"}).to_dict()
    return arch


def _student_config(config: dict, arch: dict) -> dict:
    from movekd.student import CONFIG_TYPE
    from movekd.teachers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if config.get("mm_vision_select_feature", "patch") != "patch":
        raise OfficialCheckpointError(f"mm_vision_select_feature {config['mm_vision_select_feature']!r}: only "
                                      "'patch' (CLS dropped) is supported")
    moe = config.get("moe") or {}
    if not moe.get("moe_encoder", True):
        raise OfficialCheckpointError("the checkpoint has no MoLE encoder (moe.moe_encoder is false)")
    spec = {"name": "student", "source": "hf_clip", "model": config.get("mm_vision_tower", CLIP_L14_336),
            "pretrained": False, "image_size": int(arch["image_size"]), "resize": "shortest_crop",
            "crop_pct": 1.0, "interpolation": "bicubic", "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
            "layer": int(config.get("mm_vision_select_layer", -2)), "provides_cls_attention": False,
            "dtype": "float32", "config": arch}
    mole = {"num_experts": int(moe.get("moe_encoder_num_experts", 3)), "rank": int(moe.get("moe_encoder_lora_rank", 32)),
            "alpha": float(moe.get("moe_encoder_lora_alpha", 1)), "dropout": 0.05,
            "routing": "dense" if moe.get("moe_encoder_dense") else "sparse", "init": "paper"}
    return {"type": CONFIG_TYPE, "spec": spec, "mole": True, "mole_options": mole, "drop_unused": True,
            "mole_every_block": False}


def _student_key(official: str) -> str:
    return "encoder." + official[len(TOWER_PREFIX):].replace(".mlp.original_module.", ".mlp.")


def _llm_config(config: dict):
    from transformers import LlamaConfig

    known = set(LlamaConfig().to_dict())
    return LlamaConfig(**{k: v for k, v in config.items() if k in known and k not in ("model_type", "architectures")})


def import_official(folder: str | Path, out: str | Path, *, vision_config: dict | str | Path | None = None,
                    overwrite: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Convert the official checkpoint ``folder`` into the movekd bundle ``out`` (written atomically)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from movekd import __version__
    from movekd.atomic import atomic_folder
    from movekd.student import build_student
    from movekd.vlm import ProjectorConfig, VLMConfig, build_projector
    from movekd.vlm.io import CONFIG_NAME, FORMAT, FORMAT_VERSION, LLM_DIR, PROJECTOR_FILE, VISION_FILE

    say = progress or (lambda message: None)
    folder, out = Path(folder), Path(out)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise OfficialCheckpointError(f"{folder}: no config.json")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != OFFICIAL_MODEL_TYPE:
        raise OfficialCheckpointError(f"{config_file}: model_type {config.get('model_type')!r} is not "
                                      f"{OFFICIAL_MODEL_TYPE!r} (an official MoVE-KD checkpoint)")
    if config.get("mm_use_im_start_end"):
        raise OfficialCheckpointError("mm_use_im_start_end checkpoints (image start/end tokens) are not supported")
    if out.exists() and not overwrite:
        raise OfficialCheckpointError(f"{out} exists (pass overwrite / --overwrite to replace it)")

    arch = _vision_architecture(config, folder, vision_config)
    student_config = _student_config(config, arch)
    student = build_student(student_config)
    projector_type = config.get("mm_projector_type", "linear")
    llm_config = _llm_config(config)
    projector = build_projector(projector_type, int(config.get("mm_hidden_size", arch["hidden_size"])),
                                int(llm_config.hidden_size))
    tokenizer = AutoTokenizer.from_pretrained(folder)

    student_state = dict(student.state_dict())
    vision, proj, shards, weight_map = {}, {}, [], {}  # shards: (temporary file, its keys)
    files = _weight_files(folder)
    with atomic_folder(out) as tmp:
        (tmp / LLM_DIR).mkdir()
        for index, (file, tensors) in enumerate(_iter_tensors(files)):
            say(f"reading {file.name}")
            llm_part = {}
            for key, value in tensors.items():
                if key.startswith(TOWER_PREFIX):
                    name = _student_key(key)
                    if name in student_state:  # blocks after the select layer are dropped
                        vision[name] = value
                elif key.startswith(PROJECTOR_PREFIX):
                    proj[key[len(PROJECTOR_PREFIX):]] = value
                elif key.startswith("model.") or key.startswith("lm_head."):
                    llm_part[key] = value.contiguous()
                elif not key.startswith(_ADAPTER_NAMES):
                    raise OfficialCheckpointError(f"{file.name}: unexpected weight {key!r}")
            if llm_part:
                part = tmp / LLM_DIR / f"part-{index}.safetensors"
                save_file(llm_part, str(part), metadata={"format": "pt"})
                shards.append((part, list(llm_part)))
            del tensors
        missing = sorted(set(student_state) - set(vision))
        if missing:
            raise OfficialCheckpointError(f"the checkpoint has no weight for the student's {missing[0]} "
                                          f"(expected {TOWER_PREFIX}...)")
        student.load_state_dict(vision, strict=True)
        projector.load_state_dict(proj, strict=True)
        if not shards:
            raise OfficialCheckpointError(f"{folder}: no LLaMA weights (model.layers.*, lm_head.*)")
        for number, (part, keys) in enumerate(shards, 1):  # HF shard names (or one model.safetensors)
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
            part.rename(tmp / LLM_DIR / name)
            weight_map.update({k: name for k in keys})
        if len(shards) > 1:
            (tmp / LLM_DIR / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        llm_config.architectures = ["LlamaForCausalLM"]
        llm_config.save_pretrained(tmp / LLM_DIR)
        tokenizer.save_pretrained(tmp / LLM_DIR)
        save_file(student.state_dict(), str(tmp / VISION_FILE), metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, str(tmp / PROJECTOR_FILE),
                  metadata={"format": "pt"})
        aspect = config.get("image_aspect_ratio", "square")
        vlm_config = VLMConfig(vision=student.config, projector=ProjectorConfig(**projector.config),
                               image_size=int(arch["image_size"]),
                               image_aspect_ratio={"pad": "pad", "square": "square"}.get(aspect, "stretch"),
                               template="v1", bos="auto", system_prompt=None, precision="fp32",
                               attn_implementation="sdpa")
        document: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "movekd_version": __version__,
                                    **vlm_config.to_dict(),
                                    "extra": {"imported_from": {"format": OFFICIAL_MODEL_TYPE, "path": str(folder)}}}
        (tmp / CONFIG_NAME).write_text(json.dumps(document, indent=2, sort_keys=True))
    return out
