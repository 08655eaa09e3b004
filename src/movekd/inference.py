"""Inference: load a trained VLM bundle (student + projector + LLM only) and ask it questions.

Teachers and adapters are never loaded: the bundle does not contain them (paper: "only the student
encoder is used during inference").
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class LoadedVLM:
    vlm: object
    tokenizer: object
    image_size: int
    template: str
    precision: str
    system_prompt: str | None = None
    bos: str = "auto"
    # How images become squares (movekd.data.images), as in training; fill: the student's mean colour.
    image_aspect_ratio: str = "stretch"
    fill: tuple[int, int, int] = (0, 0, 0)

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
    raise FileNotFoundError(f"{path} is neither a movekd VLM bundle nor a run folder with one in final/")


def load_trained(path: str | Path, device: str | torch.device = "cpu", precision: str | None = None,
                 fold_experts: bool = True) -> LoadedVLM:
    """Load a bundle for inference (eval mode). ``fold_experts``: run sparse-routed MoLE layers on
    per-expert folded FFN weights (no LoRA FLOPs; E extra copies of each FFN in memory, e.g. +604M
    values for CLIP-L with E=3); other routings are unaffected."""
    from movekd.data import fill_colour
    from movekd.mole import set_fold_inference
    from movekd.student import build_student
    from movekd.vlm import load_vlm, read_config
    from movekd.vlm.io import load_tokenizer

    bundle = resolve_bundle(path)
    config = read_config(bundle)
    train = config.get("extra", {}).get("train_config", {})
    attn = train.get("model", {}).get("llm_attn_implementation", "sdpa")
    vlm = load_vlm(bundle, build_vision=build_student, device=device, attn_implementation=attn)
    vlm.eval()
    set_fold_inference(vlm.vision, fold_experts)
    image_size = int(train.get("image_size") or vlm.vision.spec.image_size)
    stages = train.get("stages") or [{}]
    # The eval section's image_aspect_ratio if set, else the last stage's (LLaVA: pad in both).
    aspect = (train.get("eval") or {}).get("image_aspect_ratio") or stages[-1].get("image_aspect_ratio", "stretch")
    return LoadedVLM(vlm, load_tokenizer(bundle), image_size, stages[-1].get("template", "chat"),
                     precision or train.get("precision", "fp32"), stages[-1].get("system_prompt"),
                     stages[-1].get("bos", "auto"), aspect, fill_colour(vlm.vision.spec.mean))


def answer(loaded: LoadedVLM, image_path: str | Path, question: str, max_new_tokens: int = 32) -> str:
    """Greedy answer to one question about one image."""
    from movekd.data import ConversationEncoder, read_image

    image_path = Path(image_path)
    if not image_path.is_file():
        raise FileNotFoundError(f"image not found: {image_path}")
    image = read_image(image_path, loaded.image_size, loaded.image_aspect_ratio, loaded.fill)[None]
    encoder = ConversationEncoder(loaded.tokenizer, loaded.template, system_prompt=loaded.system_prompt,
                                  bos=loaded.bos)
    prompt = encoder.encode_prompt([{"from": "human", "value": f"<image>\n{question}"}], has_image=True)
    device = next(loaded.vlm.parameters()).device
    with loaded.autocast():
        out = loaded.vlm.generate(image.to(device), prompt.input_ids[None].to(device), max_new_tokens=max_new_tokens,
                                  eos_token_id=loaded.tokenizer.eos_token_id)
    return loaded.tokenizer.decode(out[0], skip_special_tokens=True).strip()
