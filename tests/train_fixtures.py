"""A tiny end-to-end training setup on disk: random tiny ViTs and LLM, coloured-shape images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tiny_vlm import make_llm, make_tokenizer, write_json

TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                patch_size=8)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_dataset(root: Path, per_colour: int = 4) -> tuple[Path, Path]:
    """Captions (stage 1) and questions (stage 2) about squares of three colours."""
    from PIL import Image

    captions, questions = [], []
    rng = np.random.default_rng(0)
    for colour, rgb in COLOURS.items():
        for i in range(per_colour):
            arr = np.full((32, 32, 3), 255, np.uint8)
            y, x = rng.integers(0, 16, size=2)
            arr[y:y + 16, x:x + 16] = rgb
            rel = f"images/{colour}{i}.png"
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / rel)
            captions.append({"id": f"c-{colour}{i}", "image": rel, "conversations": [
                {"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": f"a {colour} rectangle"}]})
            questions.append({"id": f"q-{colour}{i}", "image": rel, "type": "color", "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": colour}]})
    return write_json(root / "pretrain.json", captions), write_json(root / "train.json", questions)


def write_llm(folder: Path) -> Path:
    tokenizer = make_tokenizer()
    llm = make_llm(len(tokenizer), hidden=32)
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_config(tmp: Path, *, steps=(6, 6), kd=True, mole=True, routing="gated", adapter="resample_mlp",
                precision="fp32") -> dict:
    pretrain, train = write_dataset(tmp / "data")
    llm = write_llm(tmp / "llm")
    vit = lambda name, **kw: {"name": name, "source": "hf_dinov2", "model": "tiny", "pretrained": False,  # noqa: E731
                              "image_size": 32, "layer": -2, "config": TINY_VIT, **kw}
    return {
        "name": "tiny",
        "precision": precision,
        "seed": 0,
        "output_dir": str(tmp / "run"),
        "num_workers": 0,
        "image_size": 32,
        "log_every": 1,
        "keep_checkpoints": 5,
        "model": {
            "student": {"spec": vit("student"), "mole": {"enabled": mole, "rank": 4, "alpha": 4.0, "dropout": 0.1,
                                                         "routing": routing, "init": "zero_b"}},
            "teachers": [vit("clip_role", provides_cls_attention=True),
                         {"name": "cnn", "source": "timm", "model": "resnet10t", "pretrained": False,
                          "image_size": 64, "config": {"num_classes": 0}}],
            "adapter": adapter,
            "llm": str(llm),
        },
        "kd": {"enabled": kd},
        "stages": [
            {"name": "pretrain", "data": str(pretrain), "template": "plain", "train": ["mole", "adapters", "projector"],
             "lr": 3e-3, "max_steps": steps[0], "batch_size": 4, "max_length": 64, "warmup_ratio": 0.0},
            {"name": "finetune", "data": str(train), "template": "chat",
             "train": ["mole", "student", "adapters", "projector", "llm"], "lr": 1e-3, "max_steps": steps[1],
             "batch_size": 4, "max_length": 64, "warmup_ratio": 0.0},
        ],
        "eval": {"data": str(train), "max_samples": None, "batch_size": 6, "max_new_tokens": 3,
                 "prior_data": str(train)},
    }


CANVASES = [(32, 64), (64, 32), (48, 48), (32, 96), (40, 70)]  # (height, width): several tile grids


def write_canvas_dataset(root: Path, yes_no: bool = False) -> Path:
    """Coloured squares on white canvases of several aspect ratios; 'what color is the shape?' and,
    with ``yes_no``, 'is the shape red?' etc. (four questions per image, for ``group_by_image``)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    samples = []
    for c, (colour, rgb) in enumerate(COLOURS.items()):
        for i, (h, w) in enumerate(CANVASES):
            arr = np.full((h, w, 3), 255, np.uint8)
            y, x = int(rng.integers(0, h - 12)), int(rng.integers(0, w - 12))
            arr[y:y + 12, x:x + 12] = rgb
            rel = f"canvas/{colour}{i}.png"
            (root / "canvas").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / rel)
            samples.append({"id": f"a-{colour}{i}", "image": rel, "type": "color", "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": colour}]})
            for asked in COLOURS if yes_no else ():
                samples.append({"id": f"a-{colour}{i}-{asked}", "image": rel, "type": "yes/no", "conversations": [
                    {"from": "human", "value": f"<image>\nis the shape {asked}?"},
                    {"from": "gpt", "value": "yes" if asked == colour else "no"}]})
    samples.append({"id": "text-only", "conversations": [  # a text-only sample: one blank crop, no KD
        {"from": "human", "value": "what is a circle?"}, {"from": "gpt", "value": "a shape"}]})
    path = root / "anyres.json"
    path.write_text(json.dumps(samples))
    return path


def anyres_config(tmp: Path, distill: str = "all_crops", steps: int = 8, grouped: bool = False) -> dict:
    """One AnyRes stage on the canvases; ``grouped``: four questions per image, ``group_by_image``."""
    raw = tiny_config(tmp, steps=(steps, steps))
    data = write_canvas_dataset(tmp / "data", yes_no=grouped)
    stage = {**raw["stages"][1], "data": str(data), "image_aspect_ratio": "anyres", "max_steps": steps,
             "batch_size": 4, "max_length": 256 if grouped else 128, "lr": 2e-3, "group_by_image": grouped}
    raw["stages"] = [stage]
    raw["kd"] = {"enabled": True, "anyres_distill": distill}
    raw["eval"] = {"data": str(data), "max_samples": None, "batch_size": 4, "max_new_tokens": 2}
    return raw
