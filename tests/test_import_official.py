"""``movekd import-official``: a tiny checkpoint in the official ``move_llava_llama`` key layout becomes
a bundle whose forward equals an independent re-implementation of the official MoLE CLIP forward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from movekd.cli import main
from movekd.teachers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from movekd.teachers.preprocess import preprocess_images
from movekd.vlm import MoveKDVLM, read_vlm_config
from tiny_vlm import make_llm, make_tokenizer

TOWER = "model.vision_tower.vision_tower.vision_model."
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
E, R, ALPHA = 3, 4, 2.0


def write_official_checkpoint(folder: Path) -> tuple[dict, object]:
    """The official finetune save: LLaMA + mm_projector + MoLE CLIP (+ an adapter), keys as in
    hey-cjj/MoVE-KD's move_llava_llama.py / moe_lora.py, random values."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    folder.mkdir(parents=True)
    clip_dir = folder / "clip"  # mm_vision_tower: a local CLIP folder (config only is needed)
    CLIPVisionConfig(**CLIP).save_pretrained(clip_dir)
    tower = CLIPVisionModel(CLIPVisionConfig(**CLIP)).state_dict()
    state = {}
    for key, value in tower.items():
        if "position_ids" in key:
            continue
        state[TOWER + key.replace(".mlp.fc", ".mlp.original_module.fc")] = torch.randn_like(value) * 0.2
    d, h = CLIP["hidden_size"], CLIP["intermediate_size"]
    for i in range(CLIP["num_hidden_layers"]):
        mlp = f"{TOWER}encoder.layers.{i}.mlp."
        state[mlp + "router.weight"] = torch.randn(E, d)
        state[mlp + "router.bias"] = torch.randn(E)
        for e in range(E):
            for side, (n_in, n_out) in (("moe_down", (d, h)), ("moe_up", (h, d))):
                state[f"{mlp}{side}.{e}.lora_A.weight"] = torch.randn(R, n_in) * 0.3
                state[f"{mlp}{side}.{e}.lora_A.bias"] = torch.randn(R) * 0.3
                state[f"{mlp}{side}.{e}.lora_B.weight"] = torch.randn(n_out, R) * 0.3
                state[f"{mlp}{side}.{e}.lora_B.bias"] = torch.randn(n_out) * 0.3
    tokenizer = make_tokenizer(bos=True)
    llm = make_llm(len(tokenizer), hidden=32)
    state.update({k: v for k, v in llm.state_dict().items()})  # model.embed_tokens, model.layers, lm_head
    state["model.mm_projector.0.weight"] = torch.randn(32, d) * 0.2
    state["model.mm_projector.0.bias"] = torch.randn(32) * 0.2
    state["model.mm_projector.2.weight"] = torch.randn(32, 32) * 0.2
    state["model.mm_projector.2.bias"] = torch.randn(32) * 0.2
    state["eva_adapter_1.weight"] = torch.randn(32, 16)  # training only: dropped by the import
    keys = sorted(state)
    half = len(keys) // 2  # two shards, as big checkpoints come
    save_file({k: state[k].contiguous() for k in keys[:half]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: state[k].contiguous() for k in keys[half:]}, str(folder / "model-00002-of-00002.safetensors"))
    config = {**llm.config.to_dict(), "model_type": "move_llava_llama", "architectures": ["MoVELlavaLlamaForCausalLM"],
              "mm_vision_tower": str(clip_dir), "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": d, "image_aspect_ratio": "pad",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
              "moe": {"moe_encoder": True, "moe_encoder_dense": False, "moe_encoder_lora_rank": R,
                      "moe_encoder_lora_alpha": ALPHA, "moe_encoder_num_experts": E},
              "kd": {"kd_mode": True}}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)
    return state, llm


def official_mole_clip(state: dict, pixel_values: torch.Tensor, select_layer: int = -2) -> torch.Tensor:
    """The official forward, written from moe_lora.py's semantics: HF CLIP embeddings and pre-LN,
    pre-norm blocks whose MLP is ``fc1(x) + lora_down[e*](x) -> quick_gelu -> fc2(.) + lora_up[e*](.)``
    with ``e* = argmax softmax(router(x))`` per token and ``lora(z) = (B (A z + a) + b) * alpha / r``;
    returns ``hidden_states[select_layer][:, 1:]`` (CLS dropped)."""
    p = lambda name: state[TOWER + name]  # noqa: E731
    d, heads = CLIP["hidden_size"], CLIP["num_attention_heads"]
    x = F.conv2d(pixel_values, p("embeddings.patch_embedding.weight"), stride=CLIP["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    cls = p("embeddings.class_embedding").expand(x.shape[0], 1, d)
    x = torch.cat([cls, x], 1) + p("embeddings.position_embedding.weight")
    ln = lambda t, name: F.layer_norm(t, (d,), p(f"{name}.weight"), p(f"{name}.bias"), 1e-5)  # noqa: E731
    x = ln(x, "pre_layrnorm")
    hidden = [x]
    quick_gelu = lambda t: t * torch.sigmoid(1.702 * t)  # noqa: E731

    def lora(z, prefix):
        return F.linear(F.linear(z, p(prefix + "lora_A.weight"), p(prefix + "lora_A.bias")),
                        p(prefix + "lora_B.weight"), p(prefix + "lora_B.bias")) * (ALPHA / R)

    for i in range(CLIP["num_hidden_layers"]):
        pre = f"encoder.layers.{i}."
        h = ln(x, pre + "layer_norm1")
        B, T, _ = h.shape
        q, k, v = (F.linear(h, p(f"{pre}self_attn.{n}_proj.weight"), p(f"{pre}self_attn.{n}_proj.bias"))
                   .view(B, T, heads, d // heads).transpose(1, 2) for n in ("q", "k", "v"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        x = x + F.linear(att.transpose(1, 2).reshape(B, T, d), p(pre + "self_attn.out_proj.weight"),
                         p(pre + "self_attn.out_proj.bias"))
        z = ln(x, pre + "layer_norm2")
        mlp = pre + "mlp."
        expert = torch.softmax(F.linear(z, p(mlp + "router.weight"), p(mlp + "router.bias")), -1).argmax(-1)
        h1 = F.linear(z, p(mlp + "original_module.fc1.weight"), p(mlp + "original_module.fc1.bias"))
        h1 = h1 + torch.stack([lora(z, f"{mlp}moe_down.{e}.") for e in range(E)], -2).gather(
            -2, expert[..., None, None].expand(B, T, 1, h1.shape[-1])).squeeze(-2)
        a = quick_gelu(h1)
        y = F.linear(a, p(mlp + "original_module.fc2.weight"), p(mlp + "original_module.fc2.bias"))
        y = y + torch.stack([lora(a, f"{mlp}moe_up.{e}.") for e in range(E)], -2).gather(
            -2, expert[..., None, None].expand(B, T, 1, d)).squeeze(-2)
        x = x + y
        hidden.append(x)
    return hidden[select_layer][:, 1:]


def test_import_official_matches_the_official_forward(tmp_path):
    state, llm = write_official_checkpoint(tmp_path / "official")
    out = tmp_path / "bundle"
    assert main(["import-official", str(tmp_path / "official"), str(out)]) == 0
    config = read_vlm_config(out)
    assert (config.template, config.bos, config.image_aspect_ratio) == ("v1", "auto", "pad")
    assert config.vision["mole_options"]["routing"] == "sparse"
    vlm = MoveKDVLM.from_pretrained(out).double()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pixels = preprocess_images(images, image_size=32, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, dtype=torch.float64)
    expected = official_mole_clip({k: v.double() for k, v in state.items()}, pixels)
    with torch.no_grad():
        got = vlm.vision(images).tokens
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
        projected = F.linear(F.gelu(F.linear(expected, state["model.mm_projector.0.weight"].double(),
                                             state["model.mm_projector.0.bias"].double())),
                             state["model.mm_projector.2.weight"].double(), state["model.mm_projector.2.bias"].double())
        torch.testing.assert_close(vlm.projector(got), projected, rtol=1e-9, atol=1e-9)
    for key, value in llm.state_dict().items():  # the LLM unchanged
        assert torch.equal(vlm.llm.state_dict()[key].float(), value)
    assert not any("adapter" in n for n, _ in vlm.named_parameters())


def test_import_official_refuses_other_checkpoints(tmp_path, capsys):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llava_llama"}))
    assert main(["import-official", str(folder), str(tmp_path / "out")]) == 2
    assert "move_llava_llama" in capsys.readouterr().err and not (tmp_path / "out").exists()
