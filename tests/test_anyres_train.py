"""KD under AnyRes on tiny random models: per-crop shapes, losses that decrease, bundle round trip."""

from __future__ import annotations

import json

import pytest
import torch

from movekd.data.anyres import default_pinpoints, num_crops
from movekd.train.build import build_system, stage_dataset
from movekd.train.config import load_config
from train_fixtures import CANVASES, anyres_config


@pytest.mark.parametrize("distill", ["all_crops", "overview"])
def test_every_crop_is_distilled_with_the_right_shapes(tmp_path, monkeypatch, distill):
    import movekd.train.kd_model as kd_model
    from movekd.data import Collator

    config = load_config(anyres_config(tmp_path, distill))
    system = build_system(config)
    dataset = stage_dataset(system, config, config.stages[0])
    items = [dataset[i] for i in (0, 1, 3, len(dataset.inner) - 1)]  # three canvases and the text-only sample
    batch = Collator(system.pad_token_id)(items)
    images = batch["images"]
    pinpoints = default_pinpoints(32)
    sizes = [(32, 64), (64, 32), (32, 96)]
    assert images.crop_counts.tolist() == [num_crops(s, pinpoints, 32) for s in sizes] + [1]
    assert images.crops.shape[1:] == (3, 32, 32)

    seen = {}
    original = kd_model.kd_loss_per_teacher

    def record(student, adapted, weight):
        seen["student"], seen["adapted"] = student.shape, [a.shape for a in adapted]
        seen["weight"] = None if weight is None else weight.shape
        return original(student, adapted, weight)

    teacher_inputs = []
    for teacher in system.model.teachers:
        teacher.register_forward_pre_hook(lambda module, args: teacher_inputs.append(args[0].shape))
    monkeypatch.setattr(kd_model, "kd_loss_per_teacher", record)
    system.model.cache = None
    losses = system.model(images, batch["input_ids"], batch["attention_mask"], batch["labels"],
                          has_image=batch["has_image"], image_keys=[dataset.image_key(i) for i in batch["indices"]])
    image_crops = sum(num_crops(s, pinpoints, 32) for s in sizes)
    distilled = image_crops if distill == "all_crops" else len(sizes)  # never the text-only sample's blank
    tokens, dim = (32 // 8) ** 2, 32
    assert seen["student"] == (distilled, tokens, dim)
    assert seen["adapted"] == [(distilled, tokens, dim)] * 2  # every teacher, mapped to each crop's grid
    assert seen["weight"] == (distilled, tokens)  # Eq. 3 per crop
    assert teacher_inputs == [(distilled, 3, 32, 32)] * 2  # the teachers see the same crops
    assert losses.counts["kd"] == distilled and len(losses.teacher_weights) == 2
    assert torch.isfinite(losses.total)


def test_anyres_training_decreases_losses_and_round_trips(tmp_path):
    from movekd.inference import answer, load_trained
    from movekd.train.loop import train

    raw = anyres_config(tmp_path, steps=10)
    config = load_config(raw)
    system = build_system(config)
    newline = system.model.vlm.anyres.image_newline.detach().clone()
    result = train(config, system=system, show_progress=False)
    first, last = result.stages[0].first, result.stages[0].last
    assert last["text"] < first["text"] and last["kd"] < first["kd"]
    assert not torch.equal(newline, system.model.vlm.anyres.image_newline.detach())  # trained with the projector

    loaded = load_trained(result.final_dir)
    assert loaded.config.image_aspect_ratio == "anyres"
    assert loaded.config.image_grid_pinpoints == default_pinpoints(32)
    assert torch.equal(loaded.vlm.anyres.image_newline, system.model.vlm.anyres.image_newline.detach())
    image = tmp_path / "data" / "canvas" / "red3.png"  # 32 x 96: a 1 x 3 grid
    trained = system.model.vlm.eval()
    from movekd.inference import LoadedVLM

    assert answer(loaded, image, "what color is the shape?", 3) == answer(
        LoadedVLM(trained, loaded.tokenizer, loaded.config), image, "what color is the shape?", 3)
    from movekd.train.evaluate import run_eval

    evaluated = run_eval(loaded, config.eval, return_predictions=True)
    assert evaluated["n"] == len(CANVASES) * 3 + 1 and not evaluated["skipped"]  # + the text-only sample
    assert any(p["prediction"] for p in evaluated["predictions"])  # something was generated


def test_anyres_config_errors_name_the_key(tmp_path):
    raw = anyres_config(tmp_path)
    raw["model"]["image_grid_pinpoints"] = [[32, 50]]
    with pytest.raises(Exception, match=r"image_grid_pinpoints.*\[32, 50\]"):
        load_config(raw)


def test_paper_llava_next_preset_dry_run(capsys):
    """Parameters, FLOPs of the largest grid (1 + 2x2 crops) and the memory plan on 16 x 80 GB."""
    from movekd.cli import main

    config = load_config("paper_llava_next_7b")
    assert config.stages[-1].image_aspect_ratio == "anyres" and config.stages[0].image_aspect_ratio == "square"
    assert main(["train", "paper_llava_next_7b", "--dry-run", "--devices", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    flops = report["step_flops"]
    # 576 overview tokens + the 2x2 tiles' 48 x 48 grid with one image_newline per row (HF's count)
    assert flops["crops"] == 5 and flops["image_tokens"] == 576 + 48 * 49
    # every crop through the teachers: 5 x LLaVA-1.5's one image at 336 px upsampled (10.83 + SAM's 2.99 TFLOP)
    assert flops["teachers_forward"] == pytest.approx(5 * 13.82e12, rel=0.01)
    finetune = report["stages"][1]["groups"]
    assert finetune["projector"]["trainable"] == 20_979_712 + 4096  # the MLP projector + image_newline
    assert report["memory"]["fits"] and report["memory"]["strategy"] == "fsdp"
