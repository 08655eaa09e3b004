"""``export_hf_llava``: a movekd bundle as a Hugging Face LLaVA folder (``LlavaForConditionalGeneration``
+ ``AutoProcessor``), the format lmms-eval, VLMEvalKit, vLLM, SGLang and the hub consume.

Mapping (transformers 5 ``LlavaForConditionalGeneration``):

- vision tower (``model.vision_tower``): ``merge="none"``: the routed MoLE student itself as the
  registered ``movekd_student`` type (exact; needs movekd installed to load). ``merge="mean"|"usage"``:
  the experts folded into fc1/fc2 (:mod:`movekd.export.merge`), saved as the stock architecture the
  student came from (``Dinov2Model``, ``CLIPVisionModel``): loads with transformers alone. The blocks
  after the select layer are not exported (movekd never runs them); the final norm, unused by the
  select layer, is written as the identity-initialised LayerNorm the stock class expects.
- ``vision_feature_layer`` = the student's select layer k (``hidden_states[k]``, pre-norm, as
  movekd's student returns) and ``vision_feature_select_strategy="default"`` (drop the CLS token, as
  movekd does).
- projector (``model.multi_modal_projector``): ``mlp2x_gelu`` → ``linear_1``, GELU, ``linear_2``;
  ``linear`` → ``linear_1`` with ``projector_hidden_act="linear"`` and an identity ``linear_2``.
  Other projectors (token pooling, deeper MLPs) have no LLaVA equivalent and are refused.
- LLM: ``model.language_model`` + ``lm_head``. The ``<image>`` token is added to the tokenizer; if
  its id is outside the LLM's vocabulary the embeddings grow by zero rows (the row's embedding is
  replaced by image features anyway) and generation suppresses the token.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from movekd.atomic import atomic_folder
from movekd.errors import UserError
from movekd.export.merge import MERGES, expert_usage, feature_distance, merge_weights, merged_student

log = logging.getLogger(__name__)

EXPORT_INFO = "movekd_export.json"
FORMATS = ("hf-llava", "hf-llava-next")
_PROJECTOR_ACT = {"mlp2x_gelu": "gelu", "linear": "linear"}
_STOCK_VISION = {"hf_dinov2": ("Dinov2Config", "Dinov2Model"), "hf_clip": ("CLIPVisionConfig", "CLIPVisionModel")}
_FINAL_NORMS = {"hf_dinov2": "layernorm", "hf_clip": "post_layernorm"}


class ExportError(UserError, ValueError):
    """A bundle that cannot be exported as asked (the message says why and what would work)."""


@dataclass
class ExportResult:
    path: Path
    merge: str
    image_token_id: int
    num_image_tokens: int
    vision_feature_layer: int
    cost: dict = field(default_factory=dict)  # what the merge costs, as measured
    usage: dict[str, list[float]] | None = None


def calibration_batches(data: str | Path, image_size: int, *, max_images: int = 256, batch_size: int = 16,
                        image_root: str | Path | None = None, image_aspect_ratio: str = "stretch",
                        fill: tuple[int, int, int] = (0, 0, 0), grid_pinpoints=None) -> list[torch.Tensor]:
    """The distinct images of a LLaVA JSON (a path or ``asset:easyvqa/test.json``), decoded as movekd
    decodes them, in uint8 batches (AnyRes: every crop of each image is an item)."""
    from movekd.data import load_llava_json, read_image
    from movekd.data.llava_json import resolve_image

    from movekd.train.build import resolve_path

    path = resolve_path(str(data))  # a path or asset:NAME/file
    root = Path(image_root) if image_root else path.parent
    seen, images = set(), []
    for sample in load_llava_json(path, require_answer=False):
        if sample.get("image") is None or sample["image"] in seen:
            continue
        seen.add(sample["image"])
        file = resolve_image(sample, root)
        if not file.is_file():
            raise FileNotFoundError(2, f"{data}: image not found", str(file))
        image = read_image(file, image_size, image_aspect_ratio, fill, grid_pinpoints)
        images.extend(image.crops if image_aspect_ratio == "anyres" else [image])
        if len(images) >= max_images:
            break
    if not images:
        raise ExportError(f"{data}: no images to calibrate on")
    return [torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def _check_mappable(vlm) -> None:
    from movekd.student import Student

    kind = vlm.projector.config["type"]
    if kind not in _PROJECTOR_ACT:
        raise ExportError(f"export hf-llava: projector {kind!r} has no LLaVA equivalent (LLaVA's "
                         f"multi_modal_projector is linear_1 -> act -> linear_2); exportable: "
                         f"{', '.join(_PROJECTOR_ACT)}")
    if not isinstance(vlm.vision, Student):
        raise ExportError(f"export hf-llava: the vision module is a {type(vlm.vision).__name__}, not a movekd Student")
    if vlm.vision.spec.source not in _STOCK_VISION:
        raise ExportError(f"export hf-llava: student source {vlm.vision.spec.source!r} is not exportable "
                         f"({', '.join(_STOCK_VISION)})")


def stock_vision_tower(student) -> nn.Module:
    """The plain (merged, ``mole=False``) student as the stock HF vision model it came from."""
    import transformers

    from movekd.export.position_grid import at_input_side

    source = student.spec.source
    config_name, model_name = _STOCK_VISION[source]
    arch = dict(student.config["spec"]["config"])
    arch["num_hidden_layers"] = len(_blocks(student.encoder))
    for key in ("model_type", "out_features", "out_indices", "stage_names", "_out_features", "_out_indices"):
        arch.pop(key, None)  # backbone bookkeeping that depends on the (now smaller) depth
    config = getattr(transformers, config_name)(**arch)
    model = getattr(transformers, model_name)(config)
    state = dict(student.encoder.state_dict())
    norm = _FINAL_NORMS[source]
    own = model.state_dict()
    for suffix in ("weight", "bias"):
        key = f"{norm}.{suffix}"
        if key not in state:  # dropped by movekd (unused by the select layer): identity-initialised
            state[key] = torch.ones_like(own[key]) if suffix == "weight" else torch.zeros_like(own[key])
    model.load_state_dict(state, strict=True)
    # Written at the side the student runs at (position embeddings resampled as at run time): stock
    # CLIP does not resample without a flag LLaVA never passes, and LLaVA-NeXT reads its token grid
    # from image_size.
    return at_input_side(model, int(student.spec.image_size)).eval()


def exact_vision_tower(student) -> nn.Module:
    """The routed MoLE student as the registered ``movekd_student`` HF model (same weights)."""
    from movekd.export.hf_student import MoveKDStudentConfig, MoveKDStudentModel

    config = MoveKDStudentConfig(student=student.config, hidden_size=student.hidden_size,
                                 patch_size=student.patch_size, image_size=student.spec.image_size)
    model = MoveKDStudentModel(config)
    model.student.load_state_dict(student.state_dict(), strict=True)
    return model.eval()


def _blocks(model):
    from movekd.teachers._hf import block_list

    return block_list(model)


def build_hf_llava(vlm, vision_tower: nn.Module, image_token_id: int):
    """A ``LlavaForConditionalGeneration`` made of ``vision_tower`` and ``vlm``'s projector and LLM
    (the LLM's modules are reused, not copied; its embeddings grow if ``image_token_id`` needs it)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    student, llm = vlm.vision, vlm.llm
    kind = vlm.projector.config["type"]
    vocab = int(llm.config.vocab_size)
    if image_token_id >= vocab:  # zero rows: replaced by image features anyway; suppressed in generate
        old = vocab
        llm.resize_token_embeddings(image_token_id + 1, mean_resizing=False)
        with torch.no_grad():
            llm.get_input_embeddings().weight[old:] = 0
            llm.get_output_embeddings().weight[old:] = 0
    config = LlavaConfig(vision_config=vision_tower.config.to_dict(), text_config=llm.config.to_dict(),
                         image_token_index=image_token_id, image_seq_length=student.num_tokens,
                         projector_hidden_act=_PROJECTOR_ACT[kind], vision_feature_select_strategy="default",
                         vision_feature_layer=student.select_layer, multimodal_projector_bias=True,
                         tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)))
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    hf.model.vision_tower = vision_tower
    hf.model.language_model = getattr(llm, llm.base_model_prefix)
    hf.lm_head = llm.get_output_embeddings()
    hf.model.multi_modal_projector = LlavaMultiModalProjector(config)
    hf.model.multi_modal_projector.load_state_dict(_projector_state(vlm.projector, kind), strict=True)
    hf.generation_config = llm.generation_config
    if image_token_id >= vocab:
        hf.generation_config.suppress_tokens = [image_token_id]
    meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"export: {meta[0]} was not filled")
    return hf.eval()


def _projector_state(proj: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    if kind == "mlp2x_gelu":
        first, second = proj[0], proj[2]
        return {"linear_1.weight": first.weight, "linear_1.bias": first.bias,
                "linear_2.weight": second.weight, "linear_2.bias": second.bias}
    dim = proj.out_features  # linear: linear_1 = the projector, act = identity, linear_2 = identity
    return {"linear_1.weight": proj.weight, "linear_1.bias": proj.bias,
            "linear_2.weight": torch.eye(dim, dtype=proj.weight.dtype),
            "linear_2.bias": torch.zeros(dim, dtype=proj.weight.dtype)}


def export_hf_llava(source: str | Path, out: str | Path, *, merge: str = "none", calib: str | Path | None = None,
                    eval_data: str | Path | None = None, eval_samples: int | None = 500, calib_images: int = 256,
                    overwrite: bool = False, measure: bool = True, format: str = "hf-llava",
                    progress: Callable[[str], None] | None = None) -> ExportResult:
    """Export the bundle (or run folder) ``source`` to the HF LLaVA folder ``out`` (written atomically).

    ``format``: ``"hf-llava"`` (``LlavaForConditionalGeneration``) or ``"hf-llava-next"``
    (``LlavaNextForConditionalGeneration``, for bundles trained with ``image_aspect_ratio: anyres``;
    :mod:`movekd.export.hf_llava_next`).

    ``merge``: ``"none"`` (exact, needs movekd to load), ``"mean"`` or ``"usage"`` (stock
    transformers; ``usage`` needs ``calib``, a LLaVA JSON whose images measure the expert usage).
    The merge's cost is measured when ``measure``: accuracy of the bundle and of the merged weights
    on ``eval_data`` (first ``eval_samples`` of a seeded subset) when given, else the feature distance
    of the student tokens on the ``calib`` images.
    """
    from movekd.inference import load_trained, resolve_bundle
    from movekd.vlm import MoveKDVLM

    say = progress or (lambda message: None)
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if merge not in ("none", *MERGES):
        raise ExportError(f"unknown merge {merge!r}; expected none, {', '.join(MERGES)}")
    if merge == "usage" and calib is None:
        raise ExportError("merge 'usage' weights experts by their usage on calibration images: pass calib (--calib DATA.json)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists (pass overwrite / --overwrite to replace it)")
    bundle = resolve_bundle(source)
    loaded = load_trained(bundle, fold_experts=False)
    vlm, config = loaded.vlm, loaded.config
    _check_mappable(vlm)
    next_format = format == "hf-llava-next"
    if next_format:
        from movekd.export.hf_llava_next import check_next_exportable

        check_next_exportable(vlm)
    elif config.image_aspect_ratio == "anyres":
        raise ExportError("export hf-llava: the bundle tiles images (image_aspect_ratio: anyres), which "
                          "LlavaForConditionalGeneration cannot; use --format hf-llava-next")
    student = vlm.vision
    batches = calibration_batches(calib, config.decode_size, max_images=calib_images,
                                  image_aspect_ratio=config.image_aspect_ratio, fill=loaded.fill,
                                  grid_pinpoints=config.image_grid_pinpoints) if calib else None

    cost: dict = {}
    usage = None
    if merge == "none":
        tower = exact_vision_tower(student)
    else:
        if merge == "usage":
            say(f"measuring expert usage on {sum(len(b) for b in batches)} calibration images")
            usage = expert_usage(student, batches)
        plain = merged_student(student, merge_weights(student, merge, usage))
        tower = stock_vision_tower(plain)
        if measure:
            merged_vlm = MoveKDVLM(plain, vlm.projector, vlm.llm, config=config.replace(vision=plain.config),
                                   anyres=vlm.anyres)
            if eval_data is not None:
                say(f"measuring accuracy on {eval_data} (bundle, then merged)")
                cost = _accuracy_cost(loaded, merged_vlm, eval_data, eval_samples)
            elif batches is not None:
                say("measuring the feature distance of the merged student")
                cost = {"feature_distance": feature_distance(student, plain, batches)}
            else:
                log.warning("merge cost not measured: give eval_data or calib images")
    from movekd.export.card import model_card
    from movekd.export.processor import build_processor

    if next_format:
        from movekd.export.hf_llava_next import build_hf_llava_next, build_processor_next

        processor, image_token_id = build_processor_next(loaded.tokenizer, config, patch_size=student.patch_size)
        say("assembling the LLaVA-NeXT model")
        hf = build_hf_llava_next(vlm, tower, image_token_id)
    else:
        processor, image_token_id = build_processor(loaded.tokenizer, config, patch_size=student.patch_size)
        say("assembling the LLaVA model")
        hf = build_hf_llava(vlm, tower, image_token_id)
    result = ExportResult(out, merge, image_token_id, student.num_tokens, student.select_layer, cost,
                          {k: v.tolist() for k, v in usage.items()} if usage else None)
    info = {"format": "movekd-" + format, "format_version": 1, "merge": merge, "source": str(bundle),
            "vlm": config.to_dict(), "cost": cost, "expert_usage": result.usage,
            "image_token_id": image_token_id}
    train_config = _train_config(bundle)
    with atomic_folder(out) as tmp:
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
        (tmp / "README.md").write_text(model_card(result, config, train_config))
    return result


def _accuracy_cost(loaded, merged_vlm, eval_data, eval_samples) -> dict:
    from movekd.inference import LoadedVLM
    from movekd.train.config import EvalConfig
    from movekd.train.evaluate import run_eval

    # 16 tokens: room for answers after a rationale (the demo's are up to 10 tokens; generation stops at EOS)
    eval_config = EvalConfig(data=str(eval_data), max_samples=eval_samples, max_new_tokens=16)
    routed = run_eval(loaded, eval_config)
    merged = run_eval(LoadedVLM(merged_vlm, loaded.tokenizer, merged_vlm.config, loaded.precision_override),
                      eval_config)
    keep = ("accuracy", "correct", "n")
    return {"eval_data": str(eval_data), "bundle": {k: routed[k] for k in keep},
            "merged": {k: merged[k] for k in keep},
            "accuracy_drop": routed["accuracy"] - merged["accuracy"]}


def _train_config(bundle: Path) -> dict:
    from movekd.vlm import read_config

    return read_config(bundle).get("extra", {}).get("train_config", {})
