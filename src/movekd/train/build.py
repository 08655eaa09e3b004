"""Assemble the training system from a ``TrainConfig``: student, projector, LLM, teachers, adapters.

``build_system(config, device="meta")`` builds the whole model without weights or data (dry runs at
paper scale); on a real device, weights come from the specs (local folders, ``asset:NAME``, or a hub).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from movekd.config.loader import ConfigError
from movekd.errors import UserError
from movekd.train.config import StageConfig, TrainConfig
from movekd.train.groups import format_table, parameter_table
from movekd.train.kd_model import MoveKDModel
from movekd.train.feature_cache import open_teacher_cache

log = logging.getLogger(__name__)

ASSET_PREFIX = "asset:"


class ModelLoadError(UserError, OSError):
    """The LLM named in the config could not be loaded (missing folder, no weights, offline hub id)."""


def resolve_path(ref: str) -> Path:
    """``asset:NAME/relative/path`` → that file inside the converted asset; other strings → a Path."""
    if ref.startswith(ASSET_PREFIX):
        from movekd.assets import ensure

        name, _, rest = ref[len(ASSET_PREFIX):].partition("/")
        return ensure(name) / rest if rest else ensure(name)
    return Path(ref).expanduser()


def load_llm(config: TrainConfig, device):
    """The causal LM and its tokenizer (a random-weight LM of ``llm_config`` on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, config.model.llm_dtype)
    ref = config.model.llm
    if torch.device(device).type == "meta":
        if config.model.llm_config:
            llm_config = AutoConfig.for_model(**config.model.llm_config)
        else:
            llm_config = AutoConfig.from_pretrained(str(resolve_path(ref)))
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(llm_config, dtype=dtype)
        return llm, None
    path = str(resolve_path(ref)) if ref.startswith(ASSET_PREFIX) else ref
    if not ref.startswith(ASSET_PREFIX) and ref.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        raise ModelLoadError(f"model.llm: no folder {ref} (a local LLM is a folder with config.json, "
                             "safetensors weights and the tokenizer)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        llm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                   attn_implementation=config.model.llm_attn_implementation)
    except OSError as error:
        raise ModelLoadError(f"could not load the LLM '{ref}': {error}. Offline, point model.llm at a local folder "
                      "(config.json + safetensors + tokenizer) or use asset:smollm2") from error
    return llm.to(device), tokenizer


@dataclass
class System:
    """The built model plus what the data path needs to feed it."""

    model: MoveKDModel
    tokenizer: object
    config: TrainConfig
    image_size: int
    num_image_tokens: int
    always_frozen: set[str] = field(default_factory=set)
    _reloadable_fingerprint: str | None = field(default=None, init=False, repr=False)

    @property
    def pad_token_id(self) -> int:
        from movekd.data import pad_token_id_of

        return pad_token_id_of(self.tokenizer)

    def parameter_rows(self, train: list[str]):
        return parameter_table(self.model, train, self.always_frozen)

    def describe_trainable(self, stage: str) -> str:
        train = next(s.train for s in self.config.stages if s.name == stage)
        return format_table(f"stage {stage}: parameters", self.parameter_rows(train))

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        from movekd.teachers import state_dict_without_teachers

        return state_dict_without_teachers(self.model)

    def stage_num_image_tokens(self, stage: StageConfig) -> int:
        """Tokens an image placeholder becomes in ``stage`` (AnyRes: the most any image can take; the
        dataset fits ``max_length`` to each image's own count, ``AnyResPacker.token_counter``)."""
        if stage.image_aspect_ratio == "anyres":
            return self.model.vlm.anyres.max_tokens()
        return self.num_image_tokens

    def resumable_weights(self, weights: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """``(weights, metadata)`` of a training checkpoint: ``weights`` (default
        :meth:`checkpoint_weights`; under FSDP the gathered ones) without the LLM's own tensors when
        ``model.llm_lora`` is set (they never train: resume reloads them from ``model.llm``, checked
        by a fingerprint in the metadata); only the LoRA adapters of the LLM are kept."""
        from movekd.train import checkpoint as ckpt
        from movekd.train.llm_lora import is_lora_parameter

        weights = self.checkpoint_weights() if weights is None else weights
        if self.config.model.llm_lora is None:
            return weights, {}
        omitted = {k: v for k, v in weights.items() if k.startswith("vlm.llm.") and not is_lora_parameter(k)}
        if self._reloadable_fingerprint is None:  # frozen: the same for every checkpoint of the run
            self._reloadable_fingerprint = ckpt.fingerprint(omitted)
        meta = {ckpt.OMITTED: {"keys": sorted(omitted), "fingerprint": self._reloadable_fingerprint,
                               "source": f"model.llm ({self.config.model.llm})"}}
        return {k: v for k, v in weights.items() if k not in omitted}, meta

    def save_inference(self, path: Path, extra: dict | None = None) -> Path:
        """Student + projector + LLM (+ tokenizer): what inference loads; no teachers, no adapters. The
        bundle's config carries the last stage's prompt format and the run's image decoding. LoRA
        adapters of the LLM (``model.llm_lora``) are merged into its weights first, in place: the
        bundle holds a plain transformers LLM."""
        from movekd.train.llm_lora import has_llm_lora, merge_llm_lora
        from movekd.train.config import config_dict
        from movekd.vlm import config_for, save_vlm
        from movekd.vlm.config import settings_from_train_config

        if has_llm_lora(self.model.vlm.llm):
            log.info("merged LoRA into %d LLM layers", merge_llm_lora(self.model.vlm.llm))
        settings = {**settings_from_train_config(config_dict(self.config)), "image_size": self.image_size}
        if self.model.vlm.anyres is not None:
            settings["image_grid_pinpoints"] = self.model.vlm.anyres.pinpoints
        return save_vlm(self.model.vlm, path, tokenizer=self.tokenizer, config=config_for(self.model.vlm, **settings),
                        extra=extra, overwrite=True)


def build_system(config: TrainConfig, device: str | torch.device = "cpu") -> System:
    from movekd.student import build_student
    from movekd.teachers import create_teacher
    from movekd.vlm import MoveKDVLM, build_projector

    device = torch.device(device)
    meta = device.type == "meta"
    student_spec = config.model.student.spec.replace(pretrained=False) if meta else config.model.student.spec
    mole = config.model.student.mole
    mole_options = {"num_experts": mole.num_experts, "rank": mole.rank, "alpha": mole.alpha,
                    "dropout": mole.dropout, "routing": mole.routing, "init": mole.init,
                    "grouped_kernel": mole.grouped_kernel}
    if mole.routing == "topk":
        mole_options["top_k"] = mole.top_k
    with torch.device("meta") if meta else torch.device("cpu"):
        student = build_student(student_spec, mole=mole.enabled, mole_options=mole_options,
                                drop_unused=config.model.student.drop_unused,
                                mole_every_block=config.model.student.mole_every_block)
    always_frozen = {f"vlm.vision.{n}" for n, p in student.named_parameters() if not p.requires_grad}
    llm, tokenizer = load_llm(config, device)
    if config.model.llm_lora is not None:
        from movekd.train.llm_lora import add_llm_lora

        # the LLM's own weights never train; only its adapters form the "llm" group's trainable part
        always_frozen |= {f"vlm.llm.{n}" for n in add_llm_lora(llm, config.model.llm_lora)}
    projector = build_projector(config.model.projector, student.hidden_size, llm.config.hidden_size)
    if meta:
        projector = projector.to("meta")
    anyres = None
    if config.uses_anyres:
        from movekd.vlm.anyres import AnyResPacker

        with torch.device("meta") if meta else torch.device("cpu"):
            anyres = AnyResPacker(config.model.grid_pinpoints, student.spec.image_size,
                                  student.spec.image_size // student.patch_size, llm.config.hidden_size)
        anyres = anyres.to(device)
    vlm = MoveKDVLM(student.to(device), projector.to(device), llm, anyres=anyres)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(vlm)

    teachers, adapters = [], []
    kd = config.kd
    use_teachers = kd.enabled and any(stage.kd for stage in config.stages)
    grid = (student.spec.image_size // student.patch_size,) * 2
    for k, spec in enumerate(config.model.teachers if use_teachers else []):
        teacher = create_teacher(spec, device=device)
        teachers.append(teacher)
        adapters.append(None if k == 0 else _adapter_for(config, teacher, student.hidden_size, grid, device))
    if teachers and (kd.token_weight or kd.teacher_weight) and not teachers[0].spec.provides_cls_attention:
        raise ConfigError(f"teacher 0 ('{teachers[0].name}') plays the CLIP role: token and teacher weights "
                         "(Eq. 3, 4) need its [CLS] attention; set provides_cls_attention: true on it, or "
                         "turn kd.token_weight and kd.teacher_weight off")
    cache = open_teacher_cache(config) if teachers and not meta else None
    model = MoveKDModel(vlm, teachers, adapters, kd, grid, [t.name for t in teachers], cache=cache)
    image_size = config.image_size or max([student.spec.image_size] + [t.spec.image_size for t in teachers])
    from movekd.vlm.projector import projected_tokens

    return System(model, tokenizer, config, image_size, projected_tokens(config.model.projector, student.num_tokens),
                  always_frozen)


def enable_gradient_checkpointing(vlm: nn.Module) -> None:
    """Activation checkpointing of every block of the LLM and of the student encoder.

    Non-reentrant checkpointing: the first forward runs with autograd on, so the MoLE router
    probabilities recorded there stay in the graph for the balance loss, and RNG states (dropout)
    are replayed in the recomputation, so gradients equal those without checkpointing."""
    options = {"use_reentrant": False}
    for name, module in (("llm", vlm.llm), ("student", getattr(vlm.vision, "encoder", None))):
        if module is None or not getattr(module, "supports_gradient_checkpointing", False):
            raise ValueError(f"gradient_checkpointing: the {name} ({type(module).__name__}) does not support it")
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=options)


def _adapter_for(config: TrainConfig, teacher: nn.Module, dim: int, grid: tuple[int, int], device) -> nn.Module:
    """An adapter sized from one dummy forward of the teacher (free on the meta device)."""
    from movekd.adapters import build_adapter

    size = teacher.spec.image_size
    probe = teacher(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device))
    channels = probe.tokens.shape[-1]
    adapter = build_adapter(config.model.adapter, teacher_channels=channels, teacher_grid=tuple(probe.grid),
                            student_dim=dim, student_grid=grid)
    return adapter.to(device)


class StageDataset(torch.utils.data.Dataset):
    """A stage's LLaVA dataset, with the image path of each sample as its teacher-cache key."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        return self.inner[index]

    def image_key(self, index: int) -> str:
        key = str(self.inner.sample(index).get("image") or f"#text{index}")
        # The same file cropped and padded are different teacher inputs (stage 1 square, stage 2 pad).
        mode = self.inner.image_aspect_ratio
        return key if mode == "stretch" else f"{key}|{mode}"

    def modality_lengths(self) -> list[int]:
        return self.inner.modality_lengths()


def stage_dataset(system: System, config: TrainConfig, stage: StageConfig,
                  samples: list[dict] | None = None) -> StageDataset:
    """``samples``: the stage's usable samples when already scanned (``train.data_check``)."""
    from movekd.data import ConversationEncoder, LlavaDataset, fill_colour, load_llava_json

    path = resolve_path(stage.data)
    root = resolve_path(stage.image_root) if stage.image_root else path.parent
    if samples is None:
        samples = load_llava_json(path, image_root=root)
    if stage.max_samples is not None and stage.max_samples < len(samples):
        samples = random.Random(config.seed).sample(samples, stage.max_samples)
    encoder = ConversationEncoder(system.tokenizer, stage.template, max_length=stage.max_length,
                                  num_image_tokens=system.stage_num_image_tokens(stage),
                                  system_prompt=stage.system_prompt, bos=stage.bos)
    anyres = stage.image_aspect_ratio == "anyres"
    # AnyRes crops are at the student's input size (HF LLaVA-NeXT's tiles are the vision tower's
    # input); the teachers resize each crop to their own input, as they resize the square otherwise.
    image_size = config.model.student.spec.image_size if anyres else system.image_size
    return StageDataset(LlavaDataset(samples, encoder, image_root=root, image_size=image_size,
                                     group_by_image=stage.group_by_image,
                                     max_questions_per_image=stage.max_questions_per_image,
                                     image_aspect_ratio=stage.image_aspect_ratio,
                                     fill=fill_colour(config.model.student.spec.mean),
                                     grid_pinpoints=config.model.grid_pinpoints if anyres else None,
                                     image_tokens=system.model.vlm.anyres.token_counter() if anyres else None))
