"""The model card (``README.md``) of an export: how it was trained, with which teachers, what the
merge cost (as measured), and how to load it."""

from __future__ import annotations

import json


def _teachers(train_config: dict) -> list[str]:
    out = []
    for ref in train_config.get("model", {}).get("teachers", []):
        if isinstance(ref, dict):
            out.append(f"{ref.get('name', '?')} ({ref.get('source', '?')}: {ref.get('model', '?')}, "
                       f"{ref.get('image_size', '?')} px)")
        else:
            out.append(str(ref))
    return out


def _cost_lines(result) -> list[str]:
    cost = result.cost
    if result.merge == "none":
        return ["Exact export: the routed MoLE student is kept (`model_type: movekd_student`); logits equal the "
                "bundle's. Loading needs `pip install movekd` and `import movekd` (no `trust_remote_code`)."]
    lines = [f"Dense merge `{result.merge}`: the MoLE experts are folded into plain fc1/fc2, so the vision "
             "tower is a stock transformers model (loads without movekd). This is lossy; measured cost:"]
    if "bundle" in cost:
        lines += ["", "| model | accuracy | correct / n |", "|---|---|---|",
                  f"| bundle (routed MoLE) | {cost['bundle']['accuracy']:.3f} | "
                  f"{cost['bundle']['correct']}/{cost['bundle']['n']} |",
                  f"| merged ({result.merge}) | {cost['merged']['accuracy']:.3f} | "
                  f"{cost['merged']['correct']}/{cost['merged']['n']} |",
                  "", f"on `{cost['eval_data']}` (exact match, greedy)."]
    elif "feature_distance" in cost:
        d = cost["feature_distance"]
        lines += ["", f"student tokens vs the routed student on {d['tokens']} calibration tokens: relative L2 "
                  f"error {d['relative_l2']:.4f}, cosine similarity {d['cosine']:.4f}."]
    else:
        lines += ["", "not measured (no held-out or calibration data was given)."]
    return lines


def model_card(result, config, train_config: dict) -> str:
    """Markdown text of the card."""
    student = config.vision.get("spec", {})
    mole = config.vision.get("mole_options", {})
    teachers = _teachers(train_config)
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [llava, movekd, knowledge-distillation, mixture-of-lora-experts]",
        "---",
        "",
        f"# {train_config.get('name', 'movekd')} (MoVE-KD student, LLaVA format)",
        "",
        "A LLaVA-style VLM whose vision encoder was distilled from several teachers with MoVE-KD "
        "(CVPR 2025) with movekd and exported with `movekd export --format hf-llava "
        f"--merge {result.merge}`.",
        "",
        "## Model",
        f"- vision: {student.get('source', '?')} `{student.get('model', '?')}` at {student.get('image_size', '?')} px, "
        f"select layer {result.vision_feature_layer} (CLS dropped), {result.num_image_tokens} image tokens",
        f"- MoLE: {json.dumps(mole) if config.vision.get('mole') else 'none'}",
        f"- projector: {config.projector.type}",
        f"- teachers (training only): {', '.join(teachers) if teachers else 'none recorded'}",
        f"- prompt: template `{config.template}`, bos `{config.bos}`, system prompt "
        f"{json.dumps(config.system_prompt)} (the processor's chat template renders exactly this)",
        f"- images: decoded to {config.decode_size} px ({config.image_aspect_ratio}), precision {config.precision}",
        "",
        "## Merge cost",
        *_cost_lines(result),
        "",
        "## Use",
        "```python",
        *(["import movekd  # registers the movekd_student vision tower"] if result.merge == "none" else []),
        "from PIL import Image",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "",
        'model = LlavaForConditionalGeneration.from_pretrained("PATH").eval()',
        'processor = AutoProcessor.from_pretrained("PATH")',
        'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is in the image?"}]}]',
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(images=Image.open("image.png"), text=prompt, return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=8, do_sample=False)",
        'print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "lmms-eval: `python -m lmms_eval --model llava_hf --model_args pretrained=PATH --tasks TASK`.",
        "",
        "## Training config",
        "```json",
        json.dumps(train_config, indent=1, sort_keys=True) if train_config else "{}",
        "```",
        "",
    ]
    return "\n".join(lines)
