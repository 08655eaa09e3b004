"""The HF processor of an export: the student's preprocessing, the tokenizer with ``<image>``, and a
chat template that renders the prompt the model was trained with.

Image processor (``LlavaImageProcessor``, torchvision backend): movekd decodes an image to the
bundle's ``image_size`` square (``image_aspect_ratio``: ``stretch`` resizes, ``pad`` first pads to a
square with the mean colour as LLaVA-1.5, ``square`` centre-crops), then the student resizes it to its
input side ``S`` (``shortest_crop``: shortest side to ``floor(S / crop_pct)``, centre crop ``S``;
antialiased, on uint8) and normalises with its mean/std. The processor does one resize to ``S`` with
the same interpolation and normalisation, so it is exact when the input is already a square of the
decode size (easy-vqa's 64 x 64 images) and differs otherwise by the resampling of the intermediate
decode size only.

Chat template: a Jinja preamble turns the HF multimodal messages (``[{"type": "image"}, {"type":
"text", ...}]``) into movekd's text form (``"<image>\\n" + text``, LLaVA's image-first rule), adds the
trained system prompt when the conversation has none, then renders with the template the model was
trained with (``chat``: the tokenizer's own template; ``v1`` and ``plain``: LLaVA's, written out in
Jinja here), including the BOS exactly as training wrote it.
"""

from __future__ import annotations

import json
import math

from movekd.data.templates import IMAGE_TAG, V1_SYSTEM, get_template
from movekd.errors import UserError

_PREAMBLE = (
    "{%- set movekd = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set text = m['content'] -%}"
    "{%- else -%}{%- set part = namespace(img='', txt='') -%}"
    "{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}{%- set part.img = part.img + '<image>\\n' -%}"
    "{%- elif c['type'] == 'text' -%}{%- set part.txt = part.txt + c['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = part.img + part.txt -%}"
    "{%- endif -%}"
    "{%- set movekd.msgs = movekd.msgs + [{'role': m['role'], 'content': text}] -%}"
    "{%- endfor -%}"
)
_ADD_SYSTEM = (
    "{%- if movekd.msgs | length == 0 or movekd.msgs[0]['role'] != 'system' -%}"
    "{%- set movekd.msgs = [{'role': 'system', 'content': SYSTEM}] + movekd.msgs -%}"
    "{%- endif -%}"
)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def chat_template_for(tokenizer, template: str, *, bos: str = "auto", system_prompt: str | None = None) -> str:
    """A Jinja chat template rendering exactly what ``ConversationEncoder(tokenizer, template,
    system_prompt=..., bos=...).encode_prompt`` renders (HF multimodal or plain-text messages)."""
    resolved = get_template(template, tokenizer, bos)
    text = _PREAMBLE
    if system_prompt is not None:
        text += _ADD_SYSTEM.replace("SYSTEM", _literal(system_prompt))
    eos = _literal(tokenizer.eos_token or "")
    bos_text = _literal(resolved.bos) if resolved.name in ("plain", "v1") else '""'
    if resolved.name == "chat":
        return text + "{%- set messages = movekd.msgs -%}" + tokenizer.chat_template
    if resolved.name == "v1":
        return text + (
            "{%- set msgs = movekd.msgs -%}{%- set system = " + _literal(V1_SYSTEM) + " -%}"
            "{%- if msgs and msgs[0]['role'] == 'system' -%}{%- set system = msgs[0]['content'] -%}"
            "{%- set msgs = msgs[1:] -%}{%- endif -%}"
            "{{ " + bos_text + " + system + ' ' }}"
            "{%- for m in msgs -%}"
            "{%- if m['role'] == 'user' -%}{{ 'USER: ' + m['content'] + ' ' }}"
            "{%- else -%}{{ 'ASSISTANT: ' + m['content'] + " + eos + " }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
        )
    # plain (stage-1 captioning): the image alone, then the caption (the question text is dropped).
    return text + (
        "{{ " + bos_text + " }}"
        "{%- for m in movekd.msgs -%}"
        "{%- if m['role'] == 'user' -%}{{ '" + IMAGE_TAG + "' if '" + IMAGE_TAG + "' in m['content'] else '' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ m['content'] + " + eos + " }}{%- endif -%}"
        "{%- endfor -%}"
    )


def image_processor_for(spec: dict, *, decode_size: int, aspect_ratio: str = "stretch"):
    """A ``LlavaImageProcessor`` reproducing the student's preprocessing (``spec``: its TeacherSpec dict)."""
    from transformers import LlavaImageProcessor
    from transformers.image_utils import PILImageResampling

    if spec.get("resize", "shortest_crop") != "shortest_crop":
        raise UserError(f"export: student resize mode {spec.get('resize')!r} has no stock image-processor "
                         "equivalent (only shortest_crop)")
    size = int(spec["image_size"])
    crop_pct = float(spec.get("crop_pct", 1.0))
    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}[
        spec.get("interpolation", "bicubic")]
    common = dict(do_resize=True, resample=resample, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                  image_mean=list(spec["mean"]), image_std=list(spec["std"]), do_convert_rgb=True,
                  do_pad=aspect_ratio == "pad", crop_size={"height": size, "width": size})
    if aspect_ratio == "square" or crop_pct < 1.0:
        # centre crop of the shortest side (a square) then resize: LLaVA's "square" / timm's crop_pct
        short = math.floor(size / crop_pct) if crop_pct < 1.0 else size
        return LlavaImageProcessor(size={"shortest_edge": short}, do_center_crop=True, **common)
    return LlavaImageProcessor(size={"height": size, "width": size}, do_center_crop=False, **common)


def build_processor(tokenizer, config, *, patch_size: int, strip_cls: bool = True):
    """The ``LlavaProcessor`` of an export (``config``: the bundle's :class:`movekd.vlm.VLMConfig`).

    Returns ``(processor, image_token_id)``; ``tokenizer`` is copied, not changed."""
    import copy

    from transformers import LlavaProcessor

    tok = copy.deepcopy(tokenizer)
    if IMAGE_TAG not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TAG]}, replace_extra_special_tokens=False)
    template = chat_template_for(tokenizer, config.template, bos=config.bos, system_prompt=config.system_prompt)
    tok.chat_template = template
    spec = config.vision.get("spec", {})
    image_processor = image_processor_for(spec, decode_size=config.decode_size, aspect_ratio=config.image_aspect_ratio)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default" if strip_cls else "full",
                               chat_template=template, image_token=IMAGE_TAG,
                               num_additional_image_tokens=1 if strip_cls else 0)
    return processor, tok.convert_tokens_to_ids(IMAGE_TAG)
