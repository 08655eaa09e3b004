"""The self-describing bundle, and ``movekd export --format hf-llava`` (exact and merged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from movekd.cli import main
from movekd.inference import load_trained
from movekd.train.build import build_system
from movekd.train.config import load_config
from movekd.vlm import MoveKDVLM, VLMConfig, read_vlm_config
from train_fixtures import tiny_config


def _make_bundle(root: Path, *, routing: str = "sparse", system_prompt: str | None = "") -> tuple[Path, dict]:
    raw = tiny_config(root, kd=False, routing=routing)
    raw["model"]["student"]["mole"]["init"] = "paper"  # experts that differ from the base FFN and each other
    raw["stages"][1]["system_prompt"] = system_prompt
    config = load_config(raw)
    torch.manual_seed(0)
    system = build_system(config)
    with torch.no_grad():  # routers that really spread tokens over the experts
        for name, p in system.model.vlm.vision.named_parameters():
            if ".router." in name:
                p.normal_(0, 1.0)
    path = system.save_inference(root / "bundle", extra={"train_config": raw})
    return path, raw


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _make_bundle(tmp_path_factory.mktemp("export"))


def _prompt_batch(loaded, question="what color is the shape?"):
    from movekd.data import ConversationEncoder

    enc = ConversationEncoder(loaded.tokenizer, loaded.template, system_prompt=loaded.system_prompt, bos=loaded.bos)
    return enc.encode_prompt([{"from": "human", "value": f"<image>\n{question}"}], has_image=True).input_ids[None]


def test_bundle_describes_itself_and_round_trips(bundle, tmp_path):
    path, raw = bundle
    config = read_vlm_config(path)
    assert isinstance(config, VLMConfig)
    assert (config.template, config.bos, config.system_prompt) == ("chat", "auto", "")
    assert config.image_size == 32 and config.precision == "fp32" and config.image_aspect_ratio == "stretch"
    assert config.vision["mole_options"]["routing"] == "sparse" and config.projector.type == "mlp2x_gelu"
    vlm = MoveKDVLM.from_pretrained(path)
    assert vlm.config == config
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ids = torch.tensor([[5, -200, 7, 8], [6, -200, 9, 10]])
    with torch.no_grad():
        before = vlm(images, ids).logits
    vlm.save_pretrained(tmp_path / "again")
    again = MoveKDVLM.from_pretrained(tmp_path / "again")
    assert again.config == config
    with torch.no_grad():
        assert torch.equal(again(images, ids).logits, before)


def test_version1_bundle_still_loads(bundle, tmp_path):
    import shutil

    path, raw = bundle
    old = tmp_path / "v1"
    shutil.copytree(path, old)
    document = json.loads((old / "movekd_config.json").read_text())
    legacy = {"format": "movekd-vlm", "format_version": 1, "movekd_version": "0.1.0", "vision": document["vision"],
              "projector": document["projector"], "image_token_index": -200, "llm_subfolder": "llm",
              "extra": {"train_config": raw}}
    (old / "movekd_config.json").write_text(json.dumps(legacy))
    assert read_vlm_config(old) == read_vlm_config(path)
    assert load_trained(old).system_prompt == ""
    legacy.pop("vision")
    (old / "movekd_config.json").write_text(json.dumps(legacy))
    from movekd.errors import CheckpointError

    with pytest.raises(CheckpointError, match="version-1 bundle"):
        read_vlm_config(old)


def test_unknown_config_key_is_named(bundle, tmp_path):
    import shutil

    from movekd.config.loader import ConfigError

    path, _ = bundle
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    document = json.loads((bad / "movekd_config.json").read_text())
    document["templat"] = "chat"
    (bad / "movekd_config.json").write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="templat"):
        read_vlm_config(bad)


def test_exact_export_gives_identical_logits(bundle, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path, raw = bundle
    out = tmp_path / "exact"
    assert main(["export", str(path), str(out), "--merge", "none"]) == 0
    assert json.loads((out / "config.json").read_text())["vision_config"]["model_type"] == "movekd_student"
    assert "Exact export" in (out / "README.md").read_text()
    loaded = load_trained(path)
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    with torch.no_grad():
        ours = loaded.vlm(image[None], _prompt_batch(loaded)).logits
        theirs = hf(**inputs).logits
    vocab = ours.shape[-1]
    assert theirs.shape[1] == ours.shape[1]  # same prompt length once the image is expanded
    torch.testing.assert_close(theirs[..., :vocab], ours, rtol=0, atol=1e-5)


def test_eval_on_exact_export_equals_eval_on_the_bundle(bundle, tmp_path):
    from movekd.train.config import EvalConfig
    from movekd.train.evaluate import run_eval

    path, raw = bundle
    out = tmp_path / "exact"
    assert main(["export", str(path), str(out)]) == 0
    config = EvalConfig(data=raw["stages"][1]["data"], max_samples=12, max_new_tokens=3, batch_size=5)
    expected = run_eval(load_trained(path), config, return_predictions=True)["predictions"]
    got = run_eval(load_trained(out), config, return_predictions=True)["predictions"]
    assert [r["prediction"] for r in got] == [r["prediction"] for r in expected]
    assert any(r["prediction"] for r in got)  # something was generated


STOCK_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.append(sys.argv.pop(1))  # site-packages only: run with -I -S, so no .pth (movekd's editable install)
    try:
        import movekd
    except ImportError:
        pass
    else:
        raise SystemExit("movekd is importable in the stock process")
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    folder, *images = sys.argv[1:]
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    answers = []
    for path in images:
        inputs = processor(images=Image.open(path), text=prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answers.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    print(json.dumps(answers))
""")


def _stock_python(script: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a Python that cannot import movekd: isolated (-I: no PYTHONPATH, no script
    folder, no user site) and without site (-S: no .pth files, so no editable install); only the
    installed packages' folder is on the path."""
    import sysconfig

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-I", "-S", str(script), sysconfig.get_paths()["purelib"], *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("merge", ["mean", "usage"])
def test_merged_export_answers_in_stock_transformers_like_movekd(bundle, tmp_path, merge):
    path, raw = bundle
    data = raw["stages"][1]["data"]
    out = tmp_path / merge
    args = ["export", str(path), str(out), "--merge", merge, "--calib", data]
    assert main(args) == 0
    info = json.loads((out / "movekd_export.json").read_text())
    assert info["merge"] == merge and info["cost"]["feature_distance"]["relative_l2"] > 0
    if merge == "usage":
        usage = info["expert_usage"]
        assert usage and all(abs(sum(w) - 1) < 1e-5 for w in usage.values())  # sparse: routed fractions
    assert json.loads((out / "config.json").read_text())["vision_config"]["model_type"] == "dinov2"

    # movekd's own answers with the merged weights: a MoveKDVLM whose student holds them, and the
    # export folder run through movekd's data path
    from movekd.export import expert_usage, merge_weights, merged_student
    from movekd.export.hf_llava import calibration_batches
    from movekd.inference import LoadedVLM, answer

    samples = json.loads(Path(data).read_text())
    images = sorted({str(Path(data).parent / s["image"]) for s in samples})[:4]
    loaded = load_trained(path)
    student = loaded.vlm.vision
    usage = expert_usage(student, calibration_batches(data, 32)) if merge == "usage" else None
    plain = merged_student(student, merge_weights(student, merge, usage))
    merged = LoadedVLM(MoveKDVLM(plain, loaded.vlm.projector, loaded.vlm.llm), loaded.tokenizer, loaded.config)
    ours = [answer(merged, image, "what color is the shape?", max_new_tokens=3) for image in images]
    assert [answer(load_trained(out), image, "what color is the shape?", max_new_tokens=3) for image in images] == ours
    script = tmp_path / "stock.py"
    script.write_text(STOCK_SCRIPT)
    proc = _stock_python(script, str(out), *images)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [t.strip() for t in theirs] == ours


def test_merged_eval_equals_movekd_merged_weights(bundle, tmp_path, capsys):
    """movekd eval on a merged export = movekd's evaluation of the same merged weights in a MoveKDVLM."""
    from movekd.export import merge_weights, merged_student
    from movekd.inference import LoadedVLM
    from movekd.train.config import EvalConfig
    from movekd.train.evaluate import run_eval

    path, raw = bundle
    data = raw["stages"][1]["data"]
    out = tmp_path / "mean"
    assert main(["export", str(path), str(out), "--merge", "mean", "--eval-data", data, "--eval-samples", "12"]) == 0
    printed = capsys.readouterr().out
    assert "merge cost on" in printed and "(bundle) ->" in printed
    info = json.loads((out / "movekd_export.json").read_text())
    loaded = load_trained(path)
    plain = merged_student(loaded.vlm.vision, merge_weights(loaded.vlm.vision, "mean"))
    merged = LoadedVLM(MoveKDVLM(plain, loaded.vlm.projector, loaded.vlm.llm), loaded.tokenizer, loaded.config)
    config = EvalConfig(data=data, max_samples=12, max_new_tokens=3)
    expected = run_eval(merged, config, return_predictions=True)
    got = run_eval(load_trained(out), config, return_predictions=True)
    assert [r["prediction"] for r in got["predictions"]] == [r["prediction"] for r in expected["predictions"]]
    assert info["cost"]["merged"]["accuracy"] == pytest.approx(expected["accuracy"])


def test_export_refuses_unmappable_projector(bundle, tmp_path, capsys):
    import shutil

    path, _ = bundle
    pooled = tmp_path / "pooled"
    shutil.copytree(path, pooled)
    document = json.loads((pooled / "movekd_config.json").read_text())
    document["projector"]["type"] = "pool2_mlp2x_gelu"  # token pooling: no LLaVA equivalent
    (pooled / "movekd_config.json").write_text(json.dumps(document))
    from safetensors.torch import load_file, save_file

    weights = load_file(pooled / "projector.safetensors")
    save_file({f"inner.{k}": v for k, v in weights.items()}, pooled / "projector.safetensors")
    assert main(["export", str(pooled), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pool2_mlp2x_gelu" in err and "Traceback" not in err and not (tmp_path / "out").exists()
    assert main(["export", str(path), str(tmp_path / "u"), "--merge", "usage"]) == 2
    assert "--calib" in capsys.readouterr().err
    assert main(["export", str(path), str(pooled)]) == 2  # an existing folder is not replaced silently
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["stretch", "square", "pad"])
def test_exported_image_processor_reproduces_movekd_preprocessing(mode):
    """Non-square image, decoded at the student's size: the stock processor gives the student's input."""
    import numpy as np
    from PIL import Image

    from movekd.data import fill_colour
    from movekd.data.images import prepare_image
    from movekd.export.processor import image_processor_for
    from movekd.teachers.base import IMAGENET_MEAN, IMAGENET_STD
    from movekd.teachers.preprocess import preprocess_images

    spec = {"image_size": 28, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 44, 3), dtype=np.uint8))
    fill = fill_colour(IMAGENET_MEAN)
    ours = preprocess_images(prepare_image(image, mode, fill, 28)[None], image_size=28, mean=IMAGENET_MEAN,
                             std=IMAGENET_STD)
    processor = image_processor_for(spec, decode_size=28, aspect_ratio=mode)
    theirs = processor(images=image, return_tensors="pt")["pixel_values"]
    assert theirs.shape == ours.shape == (1, 3, 28, 28)
    # stretch: movekd resizes with PIL, the processor with torchvision (measured: at most one grey level)
    tolerance = 1.01 / (255 * min(IMAGENET_STD)) if mode == "stretch" else 1e-6
    assert (theirs - ours).abs().max() < tolerance


@pytest.mark.parametrize("grid", [32, 64], ids=["native", "resampled"])
@pytest.mark.parametrize("source", ["hf_clip", "hf_dinov2"])
def test_towers_feed_llava_the_student_tokens(source, grid):
    """Stock (merged) and exact towers: LLaVA's hidden_states[vision_feature_layer][:, 1:] on the
    processor's pixels are the student's tokens, for both student families; also for a student run
    at 32 px whose checkpoint has a 64 px position grid (the export is written at 32 px)."""
    from movekd.export import merge_weights, merged_student
    from movekd.export.hf_llava import exact_vision_tower, stock_vision_tower
    from movekd.student import build_student
    from movekd.teachers.preprocess import preprocess_images

    arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=grid,
                patch_size=8)
    spec = {"name": "s", "source": source, "model": "tiny", "pretrained": False, "image_size": 32, "layer": -2,
            "config": arch}
    torch.manual_seed(0)
    student = build_student(spec, mole_options={"num_experts": 3, "rank": 4, "alpha": 4.0, "init": "paper"}).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    p = student.spec
    pixels = preprocess_images(images, image_size=32, mean=p.mean, std=p.std)
    plain = merged_student(student, merge_weights(student, "mean"))
    with torch.no_grad():
        for module, tower in ((plain, stock_vision_tower(plain)), (student, exact_vision_tower(student))):
            assert tower.config.image_size == 32  # the side it runs at (LLaVA-NeXT's token grid)
            hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
            torch.testing.assert_close(hidden[student.select_layer][:, 1:], module(images).tokens, rtol=1e-5,
                                       atol=1e-5)
        assert not torch.allclose(plain(images).tokens, student(images).tokens)  # the merge changed something
