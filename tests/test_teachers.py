"""Teachers: spec, registry, every source on a tiny random config, token layout, preprocessing against
the libraries' own processors, paper presets on the meta device, freezing, load errors, real assets."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from movekd.teachers import (IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PRESETS, TEACHER_SETS,
                             SpecError, Teacher, TeacherLoadError, TeacherOutput, TeacherSpec, create_teacher,
                             describe_teacher, is_teacher_param, list_teachers, preprocess_images,
                             register_teacher, state_dict_without_teachers, teacher_prefixes, trainable_parameters)
from movekd.teachers import registry as registry_module

TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                patch_size=8)
TINY_SAM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, output_channels=16, image_size=64,
                patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=64)
TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
TINY_EVA = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)


def tiny_spec(kind: str, **overrides) -> TeacherSpec:
    specs = {
        "hf_clip": dict(source="hf_clip", model="tiny", image_size=32, layer=-2, provides_cls_attention=True,
                        config=TINY_VIT),
        "hf_dinov2": dict(source="hf_dinov2", model="tiny", image_size=32, layer=-2, provides_cls_attention=True,
                          config=TINY_VIT),
        "hf_sam": dict(source="hf_sam", model="tiny", image_size=64, resize="longest_pad", interpolation="bilinear",
                       mean=IMAGENET_MEAN, std=IMAGENET_STD, config=TINY_SAM),
        "convnext": dict(source="timm", model="convnext_atto", image_size=128, config=TINY_CONVNEXT),
        "eva": dict(source="timm", model="eva02_tiny_patch14_224", image_size=32, layer=-1, config=TINY_EVA),
        "efficientnet": dict(source="timm", model="efficientnet_lite0", image_size=64, mean=IMAGENET_MEAN,
                             std=IMAGENET_STD),
    }
    return TeacherSpec(name=kind, **{"pretrained": False, **specs[kind], **overrides})


def chelsea_uint8() -> torch.Tensor:
    from skimage.data import chelsea

    return torch.from_numpy(np.ascontiguousarray(chelsea())).permute(2, 0, 1)[None]  # [1,3,300,451]


# --- spec and registry ------------------------------------------------------------------------------

def test_spec_unknown_key_is_named():
    with pytest.raises(SpecError, match="'imagesize'"):
        TeacherSpec.from_dict({"name": "a", "source": "timm", "model": "x", "imagesize": 3})
    with pytest.raises(SpecError, match="'resolution'"):
        create_teacher("efficientnet_lite0", resolution=3)
    with pytest.raises(SpecError, match="'resize'"):
        TeacherSpec(name="a", source="timm", model="x", resize="squash")
    with pytest.raises(SpecError, match="unknown teacher source 'nope'"):
        create_teacher({"name": "a", "source": "nope", "model": "x"})
    with pytest.raises(SpecError, match="unknown teacher preset"):
        create_teacher("clip_vit_b")


def test_spec_round_trips_through_json():
    spec = PRESETS["clip_vit_l14_336"]
    again = TeacherSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


def test_registry_lists_sources_and_accepts_a_one_file_plugin():
    assert {"hf_clip", "hf_dinov2", "hf_sam", "timm", "open_clip"} <= set(list_teachers())

    class Mean(Teacher):  # a whole new source in a few lines
        def __init__(self, spec):
            super().__init__(spec)
            self.proj = nn.Conv2d(3, 4, 8, stride=8)

        def encode(self, pixel_values):
            fmap = self.proj(pixel_values)
            return TeacherOutput(fmap.flatten(2).transpose(1, 2), None, None, tuple(fmap.shape[-2:]))

    @register_teacher("test_plugin")
    def _make(spec):
        return Mean(spec)

    try:
        teacher = create_teacher({"name": "p", "source": "test_plugin", "model": "-", "image_size": 16})
        out = teacher(torch.zeros(2, 3, 20, 20, dtype=torch.uint8))
        assert out.tokens.shape == (2, 4, 4) and out.grid == (2, 2)
        assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    finally:
        registry_module._REGISTRY.pop("test_plugin")


# --- each source on a tiny config -------------------------------------------------------------------

@pytest.mark.parametrize("kind, tokens, channels, has_cls, has_attn", [
    ("hf_clip", 16, 32, True, True),
    ("hf_dinov2", 16, 32, True, True),
    ("hf_sam", 64, 16, False, False),
    ("convnext", 16, 64, False, False),
    ("eva", 16, 32, True, False),
    ("efficientnet", 4, 1280, False, False),
])
def test_each_source_tiny(kind, tokens, channels, has_cls, has_attn):
    torch.manual_seed(0)
    teacher = create_teacher(tiny_spec(kind))
    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    out = teacher(images)
    side = int(tokens ** 0.5)
    assert out.tokens.shape == (2, tokens, channels) and out.grid == (side, side)
    assert (out.cls is not None) == has_cls and (out.attn is not None) == has_attn
    if has_cls:
        assert out.cls.shape == (2, channels)
    if has_attn:
        assert out.attn.shape == (2, 4, 1 + tokens, 1 + tokens)
        torch.testing.assert_close(out.attn.sum(-1), torch.ones(2, 4, 1 + tokens))
    assert not out.tokens.requires_grad and torch.isfinite(out.tokens).all()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("source", ["hf_clip", "hf_dinov2"])
def test_hf_vit_tap_equals_library_hidden_state(source, tmp_path):
    """Loaded from a local folder; tokens, CLS and attention equal the full model's layer -2."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    model_cls, config_cls = {"hf_clip": (CLIPVisionModel, CLIPVisionConfig),
                             "hf_dinov2": (Dinov2Model, Dinov2Config)}[source]
    torch.manual_seed(0)
    reference = model_cls._from_config(config_cls(**TINY_VIT), attn_implementation="eager").eval()
    reference.save_pretrained(tmp_path)
    teacher = create_teacher(tiny_spec(source, model=str(tmp_path), pretrained=True, config={}))
    assert len(teacher.model.config.to_dict()) and teacher.model.config.num_hidden_layers == 2  # last block dropped
    images = torch.rand(2, 3, 32, 32)
    out = teacher(images)
    pixel_values = preprocess_images(images, image_size=32, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    with torch.no_grad():
        ref = reference(pixel_values=pixel_values, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(out.tokens, ref.hidden_states[-2][:, 1:])
    torch.testing.assert_close(out.cls, ref.hidden_states[-2][:, 0])
    torch.testing.assert_close(out.attn, ref.attentions[-2])


def test_timm_layer_equals_unpruned_forward_intermediates():
    import timm

    torch.manual_seed(0)
    teacher = create_teacher(tiny_spec("eva", layer=0))  # block 0 of 2: block 1 and the norm are pruned
    assert len(teacher.model.blocks) == 1
    full = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, **TINY_EVA).eval()
    missing, _ = full.load_state_dict(teacher.model.state_dict(), strict=False)
    assert all(k.startswith(("blocks.1.", "norm.", "fc_norm.", "head")) for k in missing)
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        (ref,) = full.forward_intermediates(pixel_values, indices=[0], norm=False, output_fmt="NCHW",
                                            intermediates_only=True)
    out = teacher.encode(pixel_values)
    torch.testing.assert_close(out.tokens, ref.flatten(2).transpose(1, 2))


def test_sam_teacher_loads_a_full_sam_model_folder(tmp_path):
    """facebook/sam-vit-large is a SamModel checkpoint: the vision encoder is read out of it."""
    from transformers import SamConfig, SamModel

    torch.manual_seed(0)
    config = SamConfig(vision_config=TINY_SAM,
                       prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, image_embedding_size=8),
                       mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                                iou_head_hidden_dim=16))
    sam = SamModel(config).eval()
    sam.save_pretrained(tmp_path)
    teacher = create_teacher(tiny_spec("hf_sam", model=str(tmp_path), pretrained=True, config={}))
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        neck = sam.vision_encoder(pixel_values=pixel_values).last_hidden_state
    torch.testing.assert_close(teacher.encode(pixel_values).tokens, neck.flatten(2).transpose(1, 2))


# --- token layout -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, patch", [("hf_clip", 8), ("convnext", 32)])
def test_token_at_grid_yx_comes_from_image_region_yx(kind, patch):
    """Perturb one image cell; the token that changes most is the one at that cell (row-major)."""
    torch.manual_seed(0)
    spec = tiny_spec(kind, layer=1) if kind == "hf_clip" else tiny_spec(kind)
    teacher = create_teacher(spec)
    size = spec.image_size
    images = torch.rand(1, 3, size, size)  # already the teacher's size: no resize, no crop
    base = teacher(images)
    h, w = base.grid
    for y, x in [(1, 3), (3, 0), (2, 2)]:
        perturbed = images.clone()
        perturbed[..., y * patch:(y + 1) * patch, x * patch:(x + 1) * patch] = torch.rand(1, 3, patch, patch)
        change = (teacher(perturbed).tokens - base.tokens).norm(dim=-1)[0]
        assert int(change.argmax()) == y * w + x, (y, x, change.view(h, w))


def test_sam_tokens_are_a_pure_permutation_of_the_neck():
    torch.manual_seed(0)
    teacher = create_teacher(tiny_spec("hf_sam"))
    captured = {}
    teacher.model.vision_encoder.neck.register_forward_hook(lambda m, a, o: captured.update(neck=o))
    out = teacher(torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8))
    neck = captured["neck"]  # [B, C, h, w] channels first
    assert neck.shape == (2, 16, 8, 8) and out.tokens.shape == (2, 64, 16)
    for y, x in [(0, 0), (2, 5), (7, 1)]:
        torch.testing.assert_close(out.tokens[:, y * 8 + x], neck[:, :, y, x], rtol=0, atol=0)
    assert torch.equal(out.tokens.flatten().sort().values, neck.flatten().sort().values)


# --- preprocessing = the libraries' own processors ---------------------------------------------------

def test_preprocess_equals_hf_clip_image_processor():
    from transformers import CLIPImageProcessor

    image = chelsea_uint8()
    ours = preprocess_images(image, image_size=336, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    ref = processor(images=image[0].permute(1, 2, 0).numpy(), return_tensors="pt").pixel_values
    assert ours.shape == ref.shape == (1, 3, 336, 336)
    assert (ours - ref).abs().max() <= 1e-5


def test_preprocess_equals_hf_sam_image_processor():
    from transformers import SamImageProcessor

    image = chelsea_uint8()
    ours = preprocess_images(image, image_size=256, resize="longest_pad", interpolation="bilinear",
                             mean=IMAGENET_MEAN, std=IMAGENET_STD)
    processor = SamImageProcessor(size={"longest_edge": 256}, pad_size={"height": 256, "width": 256})
    ref = processor(images=image[0].permute(1, 2, 0).numpy(), return_tensors="pt").pixel_values
    assert ours.shape == ref.shape == (1, 3, 256, 256)
    assert (ours - ref).abs().max() <= 1e-5
    assert (ours[..., 171:, :] == 0).all()  # 300x451 -> 170x256, padded at the bottom


def test_preprocess_equals_timm_eval_transform():
    import timm
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=timm.create_model("efficientnet_lite0", pretrained=False))
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    transform = create_transform(**cfg)
    image = chelsea_uint8().float() / 255  # timm's transforms on a float tensor
    ours = preprocess_images(image, image_size=224, crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"],
                             mean=cfg["mean"], std=cfg["std"])
    ref = transform(image[0])[None]
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert (ours - ref).abs().max() <= 1e-5


def test_preprocess_close_to_pil_processors():
    """PIL resizes in integers with its own rounding: 1e-5 is impossible, so we bound the difference
    (a couple of grey levels on well under 1% of values), with the uint8 tensor path."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = chelsea_uint8()
    pil = Image.fromarray(image[0].permute(1, 2, 0).numpy())
    ours = preprocess_images(image, image_size=336, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    ref = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})(
        images=pil, return_tensors="pt").pixel_values
    grey_levels = (ours - ref).abs() * 255 * torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    assert grey_levels.max() <= 2.01 and (grey_levels > 0.01).float().mean() < 0.01


# --- paper presets on the meta device ----------------------------------------------------------------

@pytest.mark.parametrize("name, tokens, channels, params_m", [
    ("clip_vit_l14_336", 576, 1024, 291),   # 24 blocks minus the last (layer -2)
    ("eva02_l16_1024", 4096, 1024, 307),
    ("convnext_xxl_1024", 1024, 3072, 843),
    ("sam_vit_l_1024", 4096, 256, 308),
])
def test_paper_presets_on_meta(name, tokens, channels, params_m):
    info = describe_teacher(name)
    assert (info["tokens"], info["channels"]) == (tokens, channels)
    assert info["grid"][0] * info["grid"][1] == tokens
    assert abs(info["params"] / 1e6 - params_m) < 1.5
    assert info["gflops"] > 100
    assert info["attn"] == (name == "clip_vit_l14_336")


def test_teacher_sets_put_the_clip_role_first():
    assert TEACHER_SETS["paper_v1.0"] == ("clip_vit_l14_336", "eva02_l16_1024", "convnext_xxl_1024")
    assert TEACHER_SETS["paper_v1.1"][:2] == ("clip_vit_l14_336", "sam_vit_l_1024")
    for names in TEACHER_SETS.values():
        assert PRESETS[names[0]].provides_cls_attention


def test_embedded_presets_describe_without_assets():
    info = describe_teacher("dinov2_s14_imgfocus")
    assert (info["tokens"], info["channels"], info["cls"], info["attn"]) == (256, 384, True, True)
    assert describe_teacher("efficientnet_lite2")["grid"] == (9, 9)


# --- frozen, and out of optimisers and checkpoints ---------------------------------------------------

class _Trainee(nn.Module):
    def __init__(self):
        super().__init__()
        self.teacher = create_teacher(tiny_spec("hf_clip"))
        self.head = nn.Linear(32, 32)

    def forward(self, images):
        return self.head(self.teacher(images).tokens)


@pytest.mark.parametrize("naive", [False, True])
def test_teachers_never_change_under_an_optimizer_step(naive):
    torch.manual_seed(0)
    model = _Trainee()
    model.train()  # a parent's train() must leave the teacher in eval mode
    assert model.training and not model.teacher.training
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    params = model.parameters() if naive else [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    for _ in range(2):
        loss = model(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.teacher.parameters())


def test_teacher_exclusion_helpers():
    model = _Trainee()
    assert teacher_prefixes(model) == ("teacher.",)
    assert [n for n, _ in trainable_parameters(model)] == ["head.weight", "head.bias"]
    assert is_teacher_param("teacher.model.embeddings.patch_embedding.weight", model)
    assert not is_teacher_param("head.weight", model)
    assert set(state_dict_without_teachers(model)) == {"head.weight", "head.bias"}
    # registered submodule: .to() reaches it
    model.to(torch.float64)
    assert next(model.teacher.parameters()).dtype == torch.float64


def test_dtype_is_applied_and_preprocessing_stays_float32():
    teacher = create_teacher(tiny_spec("convnext", dtype="bfloat16"))
    assert next(teacher.parameters()).dtype == torch.bfloat16
    out = teacher(torch.randint(0, 256, (1, 3, 130, 140), dtype=torch.uint8))
    assert out.tokens.dtype == torch.bfloat16 and out.tokens.shape == (1, 16, 64)


# --- load errors -------------------------------------------------------------------------------------

def test_unreachable_hub_gives_one_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TeacherLoadError, match="local folder"):
        create_teacher(tiny_spec("hf_clip", model="openai/clip-vit-base-patch32", pretrained=True))
    with pytest.raises(TeacherLoadError, match="checkpoint to a local weights file"):
        create_teacher(tiny_spec("efficientnet", pretrained=True))
    with pytest.raises(TeacherLoadError, match="does not exist"):
        create_teacher(tiny_spec("efficientnet", pretrained=True, checkpoint="/nonexistent/weights.safetensors"))


def test_timm_checkpoint_from_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("convnext_atto", pretrained=False, num_classes=10, **TINY_CONVNEXT)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    teacher = create_teacher(tiny_spec("convnext", pretrained=True, checkpoint=str(tmp_path)))
    torch.testing.assert_close(teacher.model.stem[0].weight, source.stem[0].weight)


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip is installed")
def test_open_clip_missing_says_how_to_install():
    with pytest.raises(TeacherLoadError, match="pip install open_clip_torch"):
        create_teacher({"name": "oc", "source": "open_clip", "model": "ViT-B-32", "checkpoint": "openai"})


# --- CLI ---------------------------------------------------------------------------------------------

def test_cli_lists_presets(capsys):
    import argparse

    from movekd.cli import teachers as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["teachers", "--json", "--meta", "convnext_xxl_1024", "efficientnet_lite0"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert "timm" in data["sources"] and data["sets"]["paper_v1.0"][0] == "clip_vit_l14_336"
    assert [(r["tokens"], r["channels"]) for r in data["presets"]] == [(1024, 3072), (49, 1280)]
    args = parser.parse_args(["teachers"])
    assert args.func(args) == 0 and "sam_vit_l_1024" in capsys.readouterr().out


# --- real embedded teachers (bundled weights) ----------------------------------------------------------

def _assets():
    assets = pytest.importorskip("movekd.assets")
    return assets


@pytest.mark.assets
def test_embedded_efficientnet_teachers_on_a_photo():
    assets = _assets()
    image = chelsea_uint8()
    for name, grid in [("efficientnet_lite0", (7, 7)), ("efficientnet_lite2", (9, 9))]:
        try:
            teacher = create_teacher(name)
        except TeacherLoadError as exc:
            pytest.skip(f"asset unavailable: {exc}")
        out = teacher(image)
        assert out.grid == grid and out.tokens.shape == (1, grid[0] * grid[1], 1280)
        # Real ImageNet weights: the classifier on the pooled tokens sees an Egyptian cat (285).
        classifier = assets.load_efficientnet_lite(assets.ensure(name)).classifier
        assert int(classifier(out.tokens.mean(1)).argmax()) == 285


@pytest.mark.assets
def test_embedded_dinov2_teacher_on_a_photo():
    _assets()
    from skimage.data import coffee

    try:
        teacher = create_teacher("dinov2_s14_imgfocus")
    except TeacherLoadError as exc:
        pytest.skip(f"asset unavailable: {exc}")
    cat = chelsea_uint8()
    cup = torch.from_numpy(np.ascontiguousarray(coffee())).permute(2, 0, 1)[None]
    out = teacher(torch.cat([cat, cup[..., :300, :451]]))
    assert out.tokens.shape == (2, 256, 384) and out.cls.shape == (2, 384) and out.attn.shape == (2, 6, 257, 257)
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(2, 6, 257), atol=1e-5, rtol=0)
    similarity = torch.nn.functional.cosine_similarity(out.cls[0], out.cls[1], dim=0)
    assert similarity < 0.95  # pretrained features tell a cat from a coffee cup
