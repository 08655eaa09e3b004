"""The training config: one typed dataclass tree, loaded from YAML, overridable with ``--set``.

Presets live in ``movekd/configs/*.yaml`` (``demo``, ``paper_llava15_7b_v1.0``/``v1.1``). Every
checkpoint stores the resolved config as JSON, so a run can be reproduced and resumed from it.
Defaults follow the paper and the official scripts (research/official-movekd.md §8): λ_kd 0.5,
λ_bal 0.01, α 0.8, token and teacher weights on, 3 experts of rank 32 with alpha 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from movekd.config.answer import AnswerWord
from movekd.config.loader import apply_overrides, from_dict, load_yaml, to_dict
from movekd.teachers.base import TeacherSpec

# A model entry in a config: a preset name ("efficientnet_lite0"), a full spec mapping, or a preset
# with overrides ({"preset": "dinov2_s14_imgfocus", "image_size": 112}).
SpecRef = Union[str, dict]


def resolve_spec_ref(ref: Any) -> TeacherSpec:
    from movekd.teachers.registry import resolve_spec

    if isinstance(ref, TeacherSpec):
        return ref
    if isinstance(ref, str):
        return resolve_spec(ref)
    data = dict(ref)
    preset = data.pop("preset", None)
    return resolve_spec(preset, **data) if preset else TeacherSpec.from_dict(data)

# Parameter groups a stage can train (each parameter belongs to the first group that claims it).
GROUPS = ("mole", "adapters", "projector", "student", "llm")


@dataclass
class MoLEConfig:
    """Mixture-of-LoRA-Experts in every FFN of the student (paper §3.2, Eq. 1)."""

    enabled: bool = True
    num_experts: int = 3
    rank: int = 32
    alpha: float = 1.0
    dropout: float = 0.05
    routing: Literal["sparse", "gated", "dense", "topk"] = "sparse"
    top_k: int = 2
    init: Literal["paper", "zero_b"] = "paper"
    # How top-1 routing (sparse/gated) runs, same numbers either way: "segments" sorts tokens by
    # expert and runs each expert's LoRA on its own rows; "dense_masked" runs every expert on every
    # token in one GEMM per side masked by the gates (fewer GEMM calls, E times the LoRA FLOPs:
    # measured no faster at CLIP-L shapes on CPU, README Performance). See movekd.mole.layer.
    grouped_kernel: Literal["segments", "dense_masked"] = "segments"


@dataclass
class StudentConfig:
    """The student: a ViT initialised from the CLIP-role model (spec in teacher format), with MoLE."""

    spec: SpecRef
    mole: MoLEConfig = field(default_factory=MoLEConfig)
    # Drop the blocks after the select layer (outputs unchanged, less compute). The official code
    # keeps them and puts MoLE in every block: drop_unused false + mole_every_block true.
    drop_unused: bool = True
    mole_every_block: bool = False

    def __post_init__(self):
        self.spec = resolve_spec_ref(self.spec)


@dataclass
class LLMLoraConfig:
    """LoRA adapters on the LLM (movekd.train.llm_lora): a stage training ``llm`` trains only them.
    Defaults: LLaVA's finetune_lora.sh (rank 128, alpha 256, all linear layers but the head)."""

    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    # peft's target_modules: "all-linear" or module names ("q_proj", "v_proj", ...)
    target_modules: Union[str, list[str]] = "all-linear"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module (or be 'all-linear')")


@dataclass
class ModelConfig:
    student: StudentConfig
    # Index 0 plays the CLIP role: it gives the [CLS] attention (Eq. 3) and CLS state (Eq. 4).
    teachers: list[SpecRef] = field(default_factory=list)
    adapter: str = "resample_mlp"
    projector: str = "mlp2x_gelu"
    # HF causal LM: hub id, local folder, or "asset:smollm2".
    llm: str = "asset:smollm2"
    # Architecture of the LLM when it is built without weights (dry runs on the meta device).
    llm_config: dict = field(default_factory=dict)
    llm_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "eager" is faster than "sdpa" for short sequences on CPU (measured: 2.0 vs 2.7 s per SmolLM2
    # training step at batch 8 x 90 tokens, bf16); use "sdpa" or "flash_attention_2" on GPUs.
    llm_attn_implementation: str = "sdpa"
    # LoRA on the LLM instead of training its weights (null: off); see movekd.train.llm_lora.
    llm_lora: Optional[LLMLoraConfig] = None
    # LLaVA-NeXT AnyRes (stages or eval with image_aspect_ratio: anyres): the [height, width]
    # resolutions an image may be tiled to, multiples of the student's image_size. null: LLaVA-NeXT's
    # default grid (1x2, 2x1, 2x2, 3x1, 1x3 crops) at the student's size (movekd.data.anyres).
    image_grid_pinpoints: Optional[list[list[int]]] = None

    def __post_init__(self):
        self.teachers = [resolve_spec_ref(t) for t in self.teachers]
        if self.image_grid_pinpoints is not None:
            from movekd.data.anyres import check_pinpoints

            self.image_grid_pinpoints = check_pinpoints(self.image_grid_pinpoints, self.student.spec.image_size)

    @property
    def grid_pinpoints(self) -> list[list[int]]:
        """``image_grid_pinpoints``, or LLaVA-NeXT's default grid at the student's input size."""
        from movekd.data.anyres import default_pinpoints

        return self.image_grid_pinpoints or default_pinpoints(self.student.spec.image_size)


@dataclass
class KDConfig:
    """Eq. 2–5. ``enabled=False`` trains the plain VLM (the LLaVA baseline)."""

    enabled: bool = True
    lambda_kd: float = 0.5
    lambda_balance: float = 0.01
    alpha: float = 0.8  # fixed weight of the CLIP-role teacher (Eq. 4)
    token_weight: bool = True  # Eq. 3
    teacher_weight: bool = True  # adaptive (Eq. 4); False: (1-α)/(K-1) each
    # The official code computes KD on zero images for text-only samples; we mask them by default.
    kd_on_text_only: bool = False
    # Eq. 3 as computed (docs/method.md): "official" = softmax of the head-mean CLS attention row over
    # the patches (a double softmax, near uniform); "renorm" = that row renormalised to sum 1.
    token_weight_mode: Literal["official", "renorm"] = "official"
    # Where the token weight comes from: the CLIP-role teacher's [CLS] attention (Eq. 3, the paper's
    # choice), or the question ("text": mean cosine of each projected visual token to the prompt's
    # text-token embeddings, softmax / text_token_weight_temperature; §5.1 reports it worse).
    token_weight_source: Literal["cls_attention", "text"] = "cls_attention"
    text_token_weight_temperature: float = 0.1
    # Eq. 4's 1/sqrt(d) on the CLS-token scores: "none" (official code: raw dot products) or "sqrt_d".
    teacher_weight_scale: Literal["none", "sqrt_d"] = "none"
    # Official batch-level hack: re-softmax the non-CLIP weights when a teacher's batch-mean weight
    # exceeds this; null turns it off (the paper has no such step).
    teacher_weight_flatten_threshold: Optional[float] = 0.8
    # AnyRes stages (docs/method.md "KD under AnyRes"): distil the overview and every tile, each crop
    # a batch item of the student and the teachers with its own Eq. 3/4 weights ("all_crops"), or
    # the overview only ("overview": the teachers run on one crop per image instead of up to 1+9).
    anyres_distill: Literal["all_crops", "overview"] = "all_crops"

    def __post_init__(self):
        if self.text_token_weight_temperature <= 0:
            raise ValueError(f"text_token_weight_temperature must be > 0, got {self.text_token_weight_temperature}")
        t = self.teacher_weight_flatten_threshold
        if t is not None and not 0.0 < t <= 1.0:
            raise ValueError(f"teacher_weight_flatten_threshold must be in (0, 1] or null, got {t}")


@dataclass
class StageConfig:
    name: str
    # LLaVA-format JSON (or JSONL): a path, or "asset:easyvqa/pretrain.json".
    data: str
    image_root: Optional[str] = None  # default: the JSON's folder
    template: Literal["plain", "chat", "v1"] = "chat"
    # A system message for conversations that have none (None: the chat template's own default;
    # "" an empty one, e.g. to drop SmolLM2's 20-token default prompt).
    system_prompt: Optional[str] = None
    # plain/v1 only: start with the tokenizer's BOS when it adds one itself ("auto", LLaVA), always
    # (so the image is never the LLM's first token), or never.
    bos: Literal["auto", "always", "never"] = "auto"
    train: list[str] = field(default_factory=lambda: ["mole", "adapters", "projector"])
    lr: float = 2e-5
    lrs: dict[str, float] = field(default_factory=dict)  # per-group learning rates
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to lr * this (0: to zero, as LLaVA)
    epochs: float = 1.0
    max_steps: Optional[int] = None  # optimiser steps; overrides epochs
    max_minutes: Optional[float] = None  # stop the stage early when this much time has passed
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 2048
    max_samples: Optional[int] = None  # first N samples after a seeded shuffle
    # One item per image: its questions share the image and the prompt prefix in one sequence, each
    # seeing only the prefix and itself (movekd.data.shared_prefix). batch_size then counts images.
    # Under anyres, max_length counts each image's own tokens (its tile grid), so a wide image keeps
    # fewer questions than a small one.
    group_by_image: bool = False
    max_questions_per_image: Optional[int] = None  # split bigger groups
    kd: bool = True  # KD and balance losses active in this stage (both stages in the paper)
    # How images become squares, once for the student and every teacher (movekd.data.images):
    # "stretch" (resize, aspect ratio lost), "square" (shortest side + centre crop: LLaVA's default,
    # official stage 1), "pad" (expand2square with the student's mean colour: official stage 2),
    # "anyres" (LLaVA-NeXT: an overview plus tiles at the student's size, model.image_grid_pinpoints).
    image_aspect_ratio: Literal["stretch", "square", "pad", "anyres"] = "stretch"
    # LLaVA's LengthGroupedSampler with modality grouping (official stage 2): per-device batches of
    # only image or only text-only samples, grouped by length (movekd.train.sampler).
    group_by_modality_length: bool = False
    # Bad samples (structure, missing or corrupt images, answers cut by max_length) are skipped and
    # counted; strict refuses the file instead. More than max_skip_ratio of them stops the run.
    strict: bool = False
    max_skip_ratio: float = 0.01

    def __post_init__(self):
        unknown = [g for g in list(self.train) + list(self.lrs) if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown parameter group '{unknown[0]}' (groups: {', '.join(GROUPS)})")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.max_skip_ratio <= 1.0:
            raise ValueError(f"max_skip_ratio must be in [0, 1], got {self.max_skip_ratio}")


@dataclass
class EvalConfig:
    data: str
    image_root: Optional[str] = None
    max_samples: Optional[int] = 500
    seed: int = 0
    # How the max_samples subset is drawn: "question" (questions at random) or "image" (images at
    # random with all their questions, the last one cut to max_samples): several questions per image
    # then share the image's prompt prefix (share_image_prefix), at the cost of a clustered sample.
    sample_by: Literal["question", "image"] = "question"
    batch_size: int = 32
    max_new_tokens: int = 4
    # Which word of a generated answer is compared with the reference (movekd.eval.vqa): "first"
    # (single-word answers), "last" (answers trained to end a rationale, as the demo's yes/no answers
    # "a blue circle; not red: yes"), "all". The bundle records a training config's value; None here
    # means the bundle's ("first" for bundles that record none).
    answer_word: Optional[AnswerWord] = None
    # Run each image's common prompt prefix (the image tokens) once for all its questions in a batch
    # (movekd.eval.shared_prefix): same greedy answers up to float rounding.
    share_image_prefix: bool = True
    # Prompt format: None (default) = the bundle's own (the last training stage's); set only to
    # evaluate a model under a different prompt. system_prompt None also means the bundle's.
    template: Optional[Literal["plain", "chat", "v1"]] = None
    system_prompt: Optional[str] = None
    bos: Optional[Literal["auto", "always", "never"]] = None
    # None: the bundle's (the last training stage's, or its eval section's); LLaVA evaluates with "pad".
    image_aspect_ratio: Optional[Literal["stretch", "square", "pad", "anyres"]] = None
    # Training split used for the answer-prior baseline (most frequent answer per question type).
    prior_data: Optional[str] = None


@dataclass
class TrainConfig:
    name: str
    model: ModelConfig
    stages: list[StageConfig]
    kd: KDConfig = field(default_factory=KDConfig)
    eval: Optional[EvalConfig] = None
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: int = 0
    output_dir: str = "runs/{name}"
    num_workers: int = 2
    image_size: int = 0  # size images are decoded to in the workers; 0 = the largest model input
    log_every: int = 10
    save_every: int = 0  # optimiser steps between checkpoints; 0 = at the end of each stage
    keep_checkpoints: int = 2
    teacher_cache: bool = True  # keep frozen-teacher outputs per image for the run
    # A folder written by `movekd cache CONFIG` (movekd.train.feature_cache): teacher outputs read
    # from disk; refused if written with other teacher settings or images. None: computed online.
    teacher_cache_dir: Optional[str] = None
    # Hold and update every trained parameter in float32 (frozen parts keep their loaded dtype;
    # compute follows `precision`). False with bf16 weights in a stage's `train` is an error.
    trainable_fp32: bool = True
    # Recompute the activations of every LLM and student block in the backward instead of storing
    # them (MoLE layers included): far less activation memory for about one more forward of compute.
    gradient_checkpointing: bool = False
    # The multi-GPU strategy this config is planned for (the dry run's memory plan). The strategy a
    # run uses is the Accelerate config it is launched with (configs/accelerate/); see README.
    strategy: Literal["ddp", "fsdp", "zero2", "zero3"] = "ddp"

    def __post_init__(self):
        from movekd.train.precision import check_trainable_dtypes

        check_trainable_dtypes(self)
        anyres = [s.name for s in self.stages if s.image_aspect_ratio == "anyres"]
        if anyres and self.teacher_cache_dir is not None and self.kd.enabled:
            raise ValueError(f"teacher_cache_dir: the disk cache of `movekd cache` does not hold AnyRes crops "
                             f"(stage {anyres[0]}); use the in-run cache (teacher_cache: true) instead")

    @property
    def uses_anyres(self) -> bool:
        """A stage or the evaluation tiles images (the VLM then has an ``image_newline``)."""
        return any(s.image_aspect_ratio == "anyres" for s in self.stages) or (
            self.eval is not None and self.eval.image_aspect_ratio == "anyres")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> TrainConfig:
    """Build a ``TrainConfig`` from a preset name, a YAML path or a dict, then apply ``--set`` strings."""
    if isinstance(source, dict):
        data = source
    else:
        data = load_yaml(resolve_preset(source))
    return from_dict(TrainConfig, apply_overrides(data, overrides or []))


def resolve_preset(source: str | Path) -> Path:
    """A YAML path, or the name of a bundled preset (``demo``, ``paper_llava15_7b_v1.0``, ...)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    bundled = Path(__file__).resolve().parent.parent / "configs" / f"{source}.yaml"
    if bundled.is_file():
        return bundled
    known = sorted(p.stem for p in bundled.parent.glob("*.yaml"))
    raise FileNotFoundError(f"no config file '{source}' and no preset of that name (presets: {', '.join(known)})")


def config_dict(config: TrainConfig) -> dict:
    return to_dict(config)
