"""``movekd export --format hf-llava-next``: an AnyRes bundle as a Hugging Face
``LlavaNextForConditionalGeneration`` folder with its ``LlavaNextProcessor``.

The mapping is the LLaVA one (:mod:`movekd.export.hf_llava`: vision tower, ``vision_feature_layer``,
``"default"`` select strategy, projector, LLM) plus what LLaVA-NeXT adds:

- ``image_grid_pinpoints``: the bundle's; ``image_newline``: the bundle's learnt vector
  (``anyres.safetensors``).
- the image processor (``LlavaNextImageProcessor``): tiles at the student's side ``S``
  (``size`` and ``crop_size`` ``S × S``, no centre crop), the student's mean/std and interpolation.
  It computes the crops exactly as :func:`movekd.data.anyres.anyres_crops` (tested bit-exact), and
  the processor's ``<image>`` count equals :meth:`movekd.vlm.anyres.AnyResPacker.num_tokens`.
- HF derives the tile grid from ``vision_config.image_size // patch_size``: the tower is written
  at the student's input side, its position embeddings resampled to that grid as the student does
  at run time (:mod:`movekd.export.position_grid`).
"""

from __future__ import annotations

import torch

from movekd.errors import UserError


def check_next_exportable(vlm) -> None:
    if getattr(vlm, "anyres", None) is None or not vlm.config or not vlm.config.image_grid_pinpoints:
        raise UserError("export hf-llava-next: the bundle was not trained with image_aspect_ratio: anyres (no "
                        "image_newline / image_grid_pinpoints); export it with --format hf-llava")
    spec = vlm.config.vision.get("spec", {})
    if spec.get("resize", "shortest_crop") != "shortest_crop" or float(spec.get("crop_pct", 1.0)) != 1.0:
        raise UserError("export hf-llava-next: the student's preprocessing must be a plain resize of each "
                        f"crop (resize shortest_crop, crop_pct 1), not {spec.get('resize')} / {spec.get('crop_pct')}")


def image_processor_next(spec: dict, pinpoints):
    """A ``LlavaNextImageProcessor`` giving the student's input for each AnyRes crop."""
    from transformers import LlavaNextImageProcessor
    from transformers.image_utils import PILImageResampling

    size = int(spec["image_size"])
    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}[
        spec.get("interpolation", "bicubic")]
    return LlavaNextImageProcessor(size={"height": size, "width": size}, crop_size={"height": size, "width": size},
                                   image_grid_pinpoints=[list(p) for p in pinpoints], do_center_crop=False,
                                   do_resize=True, resample=resample, do_rescale=True, rescale_factor=1 / 255,
                                   do_normalize=True, image_mean=list(spec["mean"]), image_std=list(spec["std"]),
                                   do_convert_rgb=True, do_pad=True)


def build_processor_next(tokenizer, config, *, patch_size: int):
    """``(LlavaNextProcessor, image_token_id)`` of an export (``config``: the bundle's VLMConfig)."""
    from transformers import LlavaNextProcessor

    from movekd.export.processor import build_processor

    llava, image_token_id = build_processor(tokenizer, config.replace(image_aspect_ratio="stretch"),
                                            patch_size=patch_size)
    image_processor = image_processor_next(config.vision.get("spec", {}), config.image_grid_pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=llava.tokenizer, patch_size=patch_size,
                                   vision_feature_select_strategy="default", chat_template=llava.chat_template,
                                   image_token=llava.image_token, num_additional_image_tokens=1)
    return processor, image_token_id


def build_hf_llava_next(vlm, vision_tower, image_token_id: int):
    """A ``LlavaNextForConditionalGeneration`` of ``vision_tower``, ``vlm``'s projector, LLM and
    ``image_newline`` (built as the LLaVA export, then moved into the LLaVA-NeXT classes)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from movekd.export.hf_llava import build_hf_llava

    crop = vlm.anyres.crop_size
    if int(getattr(vision_tower.config, "image_size", crop)) != crop:
        raise UserError(f"export hf-llava-next: the vision tower's image_size {vision_tower.config.image_size} is not "
                        f"the student's input side {crop}; LLaVA-NeXT derives the tile grid from it")
    llava = build_hf_llava(vlm, vision_tower, image_token_id)
    src = llava.config
    config = LlavaNextConfig(vision_config=src.vision_config.to_dict(), text_config=src.text_config.to_dict(),
                             image_token_index=image_token_id, projector_hidden_act=src.projector_hidden_act,
                             vision_feature_select_strategy="default", vision_feature_layer=src.vision_feature_layer,
                             image_grid_pinpoints=[list(p) for p in vlm.anyres.pinpoints],
                             image_seq_length=vlm.anyres.token_grid ** 2, multimodal_projector_bias=True,
                             tie_word_embeddings=src.tie_word_embeddings)
    with torch.device("meta"):
        hf = LlavaNextForConditionalGeneration(config)
    hf.model.vision_tower = llava.model.vision_tower
    hf.model.language_model = llava.model.language_model
    hf.model.multi_modal_projector = llava.model.multi_modal_projector
    hf.model.image_newline = torch.nn.Parameter(vlm.anyres.image_newline.detach().clone())
    hf.lm_head = llava.lm_head
    hf.generation_config = llava.generation_config
    meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"export: {meta[0]} was not filled")
    return hf.eval()
