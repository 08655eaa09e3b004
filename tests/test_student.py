"""Student: MoLE-injected CLIP-role ViT; tokens of the select layer, CLS, router probabilities."""

from __future__ import annotations

import json

import pytest
import torch

from movekd.student import StudentOutput, build_student
from movekd.teachers import SpecError, TeacherLoadError, TeacherSpec, create_teacher, preprocess_images

TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                patch_size=8)
MOLE = dict(rank=4)


def tiny_spec(source: str = "hf_clip", **overrides) -> TeacherSpec:
    fields = dict(name="student", source=source, model="tiny", pretrained=False, image_size=32, layer=-2,
                  config=TINY_VIT)
    return TeacherSpec(**{**fields, **overrides})


def images(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, 36, 44), dtype=torch.uint8)


@pytest.mark.parametrize("source", ["hf_clip", "hf_dinov2"])
@pytest.mark.parametrize("mole", [True, False])
def test_student_outputs_and_every_trainable_parameter_gets_a_gradient(source, mole):
    torch.manual_seed(0)
    student = build_student(tiny_spec(source), mole=mole, mole_options=MOLE).train()
    out = student(images())
    assert isinstance(out, StudentOutput)
    assert out.tokens.shape == (2, 16, 32) and out.cls.shape == (2, 32) and out.grid == (4, 4)
    assert student.num_tokens == 16 and student.hidden_size == 32
    # layer -2 of 3 blocks: 2 blocks run, one MoLE layer each
    assert len(out.router_probs) == (2 if mole else 0)
    for probs in out.router_probs:
        assert probs.shape[-1] == 3 and probs.shape[0] * probs.shape[1] == 2 * 17
    loss = out.tokens.square().mean() + out.cls.square().mean() + sum(p.square().sum() for p in out.router_probs)
    loss.backward()
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert trainable
    # Sparse top-1 routing: an expert that no token picked gets no gradient in this step.
    missing = [n for n, p in trainable if p.grad is None and ".moe_" not in n]
    assert not missing, missing
    if mole:
        assert any(p.grad is not None for n, p in trainable if ".moe_" in n)


@pytest.mark.parametrize("source", ["hf_clip", "hf_dinov2"])
def test_plain_student_equals_source_model_select_layer(source, tmp_path):
    """Initialised from a local pretrained folder; tokens = hidden_states[-2][:, 1:] of the source."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    model_cls, config_cls = {"hf_clip": (CLIPVisionModel, CLIPVisionConfig),
                             "hf_dinov2": (Dinov2Model, Dinov2Config)}[source]
    torch.manual_seed(0)
    reference = model_cls(config_cls(**TINY_VIT)).eval()
    reference.save_pretrained(tmp_path)
    student = build_student(tiny_spec(source, model=str(tmp_path), pretrained=True, config={}), mole=False).eval()
    batch = images()
    pixel_values = preprocess_images(batch, image_size=32, mean=student.spec.mean, std=student.spec.std)
    with torch.no_grad():
        ref = reference(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        out = student(batch)
    torch.testing.assert_close(out.tokens, ref[:, 1:])
    torch.testing.assert_close(out.cls, ref[:, 0])


def test_mole_with_zero_b_starts_equal_to_the_plain_student():
    torch.manual_seed(0)
    plain = build_student(tiny_spec(), mole=False).eval()
    mole = build_student(tiny_spec(), mole=True, mole_options=dict(rank=4, init="zero_b"))
    missing, unexpected = mole.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".moe_" in k or ".router." in k for k in missing)
    mole.eval()
    batch = images()
    with torch.no_grad():
        torch.testing.assert_close(mole(batch).tokens, plain(batch).tokens)


def test_drop_unused_keeps_outputs_and_freezes_nothing_on_the_path():
    torch.manual_seed(0)
    full = build_student(tiny_spec(), mole=False, drop_unused=False).eval()
    lean = build_student(tiny_spec(), mole=False, drop_unused=True).eval()
    assert len(full.encoder.encoder.layers) == 3 and len(lean.encoder.encoder.layers) == 2
    lean.load_state_dict({k: v for k, v in full.state_dict().items() if k in lean.state_dict()})
    batch = images()
    with torch.no_grad():
        torch.testing.assert_close(full(batch).tokens, lean(batch).tokens)
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("encoder.encoder.layers.2.", "encoder.post_layernorm.")) for n in frozen)
    # MoLE goes only into blocks that run for the select layer
    with_mole = build_student(tiny_spec(), mole=True, mole_options=MOLE, drop_unused=False)
    assert not any(".moe_" in n for n, _ in with_mole.named_parameters() if n.startswith("encoder.encoder.layers.2."))


def test_config_rebuilds_the_same_student_offline():
    torch.manual_seed(0)
    student = build_student(tiny_spec("hf_dinov2"), mole=True, mole_options=MOLE).eval()
    config = json.loads(json.dumps(student.config))  # JSON-able, as saved in bundles
    again = build_student(config)
    again.load_state_dict(student.state_dict(), strict=True)
    again.eval()
    batch = images()
    with torch.no_grad():
        torch.testing.assert_close(again(batch).tokens, student(batch).tokens)


def test_student_preprocessing_is_its_source_spec():
    student = build_student(tiny_spec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), mole=False)
    params = student.preprocess.params
    assert (params.image_size, params.mean, params.std, params.resize) == (32, (0.5,) * 3, (0.25,) * 3,
                                                                             "shortest_crop")


def test_student_rejects_non_vit_sources():
    with pytest.raises(SpecError, match="student source"):
        build_student(TeacherSpec(name="s", source="timm", model="efficientnet_lite0", pretrained=False))


@pytest.mark.assets
def test_embedded_student_matches_its_teacher_at_init():
    """Student from the bundled DINOv2 with zero-initialised experts = the CLIP-role teacher's tokens."""
    pytest.importorskip("movekd.assets")
    from skimage.data import chelsea

    try:
        teacher = create_teacher("dinov2_s14_imgfocus")
        student = build_student("dinov2_s14_imgfocus", mole_options=dict(init="zero_b")).eval()
    except TeacherLoadError as exc:
        pytest.skip(f"asset unavailable: {exc}")
    image = torch.from_numpy(chelsea().copy()).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = student(image)
    ref = teacher(image)
    assert out.tokens.shape == (1, 256, 384)
    torch.testing.assert_close(out.tokens, ref.tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.cls, ref.cls, atol=1e-4, rtol=1e-4)
