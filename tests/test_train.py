"""End-to-end training on tiny random models: losses, trainable sets, checkpoints, resume, configs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from movekd.config.loader import ConfigError
from movekd.train import checkpoint as ckpt
from movekd.train.build import build_system
from movekd.train.config import load_config
from movekd.train.groups import named_groups
from movekd.train.loop import train
from train_fixtures import tiny_config


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _group_of(model):
    return {name: group for group, params in named_groups(model).items() for name, _ in params}


@pytest.fixture()
def tiny(tmp_path):
    return tiny_config(tmp_path)


def test_stages_train_the_intended_parameters_and_never_the_teachers(tiny):
    config = load_config(tiny)
    system = build_system(config)
    model = system.model
    groups = _group_of(model)
    teachers_before = {n: p.clone() for n, p in model.teachers.named_parameters()}
    start = _snapshot(model)
    config_one = load_config({**tiny, "stages": tiny["stages"][:1]})
    result = train(config_one, system=system, show_progress=False)
    changed = _changed(start, model)
    assert {groups[n] for n in changed} == {"mole", "adapters", "projector"}
    # every stage-1 parameter moved (gated routing gives the routers a task gradient)
    stage1 = {n for n, g in groups.items() if g in ("mole", "adapters", "projector")}
    assert stage1 <= changed
    first, last = result.stages[0].first, result.stages[0].last
    assert last["loss"] < first["loss"] and last["text"] < first["text"]
    for n, p in model.teachers.named_parameters():
        assert torch.equal(teachers_before[n], p) and not p.requires_grad
    # stage 2 trains everything else too, teachers still frozen
    mid = _snapshot(model)
    train(load_config({**tiny, "stages": tiny["stages"][1:]}), system=system, show_progress=False)
    changed = _changed(mid, model)
    assert {groups[n] for n in changed} == {"mole", "student", "adapters", "projector", "llm"}
    assert not any(n.startswith("teachers.") for n in changed)


def test_kd_loss_decreases_and_is_logged(tiny):
    tiny["stages"][0]["max_steps"] = 12
    config = load_config({**tiny, "stages": tiny["stages"][:1]})
    result = train(config, show_progress=False)
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"kd", "balance", "text", "kd_t0", "kd_t1", "w_t0", "w_t1", "expert0"} <= set(records[0])
    assert records[0]["w_t0"] == pytest.approx(0.8)  # CLIP role: fixed α (Eq. 4)
    assert result.stages[0].last["kd_t1"] < result.stages[0].first["kd_t1"]  # adapter + student learn the CNN


def test_checkpoint_reloads_to_identical_outputs_without_teachers(tiny):
    from movekd.inference import load_trained

    config = load_config(tiny)
    result = train(config, show_progress=False)
    vlm = result.system.model.vlm.eval()
    loaded = load_trained(result.final_dir)
    assert not any("teacher" in n or "adapter" in n for n, _ in loaded.vlm.named_parameters())
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ids = torch.tensor([[5, -200, 7, 8], [6, -200, 9, 10]])
    with torch.no_grad():
        expected = vlm(images, ids).logits
        got = loaded.vlm(images, ids).logits
    assert torch.equal(expected, got)


def test_resume_continues_the_same_trajectory(tmp_path):
    straight_cfg = tiny_config(tmp_path / "a", steps=(3, 4))
    straight = train(load_config(straight_cfg), show_progress=False)
    resumed_cfg = tiny_config(tmp_path / "b", steps=(3, 4))
    config = load_config(resumed_cfg)
    # stop in the middle of stage 2 (after 3 + 2 steps), then resume from the checkpoint on disk
    train(config, show_progress=False, stop_after_steps=5)
    assert ckpt.latest_checkpoint(config.run_dir).name == "step-0000005"
    resumed = train(config, resume=config.run_dir, show_progress=False)
    a = straight.system.checkpoint_weights()
    b = resumed.system.checkpoint_weights()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert [s.steps for s in resumed.stages] == [3, 4]


def test_checkpoint_holds_no_teacher_weights_and_loads_weights_only(tiny):
    config = load_config(tiny)
    train(config, show_progress=False, stop_after_steps=2)
    folder = ckpt.latest_checkpoint(config.run_dir)
    weights = ckpt.load_weights(folder / ckpt.WEIGHTS)
    assert weights and not any(k.startswith("teachers.") for k in weights)
    assert any(k.startswith("adapters.") for k in weights)
    ckpt.load_torch_state(folder / "optimizer.pt")  # weights_only=True must accept it
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and "rng" in state


def test_no_kd_baseline_has_no_teachers(tiny):
    tiny["kd"]["enabled"] = False
    tiny["model"]["student"]["mole"]["enabled"] = False
    system = build_system(load_config(tiny))
    assert len(system.model.teachers) == 0
    assert not named_groups(system.model)["mole"]


@pytest.mark.parametrize("override, message", [
    (["kd.lamda_kd=1"], "unknown config key 'kd.lamda_kd'"),
    (["stages.0.train=[mole, everything]"], "unknown parameter group 'everything'"),
    (["model.teachers.0.image_sise=3"], "unknown teacher spec key 'image_sise'"),
    (["precision=fp8"], "'precision' must be one of"),
    (["stages.0.min_lr_ratio=1.5"], "min_lr_ratio must be in"),
    (["stages.0.bos=sometimes"], "'stages.0.bos' must be one of"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", override)


def test_cli_train_reports_bad_key(capsys):
    from movekd.cli import main

    assert main(["train", "demo", "--set", "stages.0.lrr=1"]) == 2
    assert "unknown config key 'stages.0.lrr'" in capsys.readouterr().err


def test_paper_preset_dry_run_reports_mole_parameters():
    from movekd.train.dry_run import dry_run

    report = dry_run(load_config("paper_llava15_7b_v1.0"))
    assert report["mole_added_parameters"] == 24_040_008
    assert report["parameters"]["adapters"] == 3_409_472 + 3_737_152
    stage1, stage2 = report["stages"]
    assert stage1["groups"]["llm"]["trainable"] == 0 and stage1["groups"]["mole"]["trainable"] == 24_040_008
    assert stage2["groups"]["llm"]["trainable"] == stage2["groups"]["llm"]["frozen"] + stage2["groups"]["llm"]["trainable"]
    assert all(s["groups"]["teachers"]["trainable"] == 0 for s in report["stages"])
    # teachers' forward: CLIP-L/336 to layer -2 + EVA-02-L/16 @1024 + ConvNeXt-XXL @1024 (cpu-feasibility.md §3)
    assert report["step_flops"]["teachers_forward"] == pytest.approx(10.83e12, rel=0.01)
    assert report["step_flops"]["total"] > 3 * 8.5e12  # the 7B LLM alone: ~8.5 TFLOP forward over 640 tokens


def test_checkpoint_write_failure_names_folder_and_keeps_previous(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints" / "step-1"
    weights = {"w": torch.ones(3)}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    ckpt.save_checkpoint(folder, weights=weights, optimizer=opt, trainer_state={"global_step": 1}, config={})

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2048 vs 1984")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"step-1.*GB free.*unexpected pos"):
        ckpt.save_checkpoint(folder, weights={"w": torch.zeros(3)}, optimizer=opt,
                             trainer_state={"global_step": 2}, config={})
    assert ckpt.load_trainer_state(folder)["global_step"] == 1
    assert torch.equal(ckpt.load_weights(folder / ckpt.WEIGHTS)["w"], torch.ones(3))
    assert [p.name for p in folder.parent.iterdir()] == ["step-1"]  # no temporary folder left


def test_interpolate_adapter_and_text_token_weight_train(tmp_path):
    # Table 2's parameter-free adapter trains (empty adapter group) and the text-guided token weight
    # changes the KD loss of the very first step (same seed, same batch, same weights).
    first_kd = {}
    for source in ("cls_attention", "text"):
        cfg = tiny_config(tmp_path / source, steps=(0, 2), adapter="interpolate")
        cfg["stages"] = cfg["stages"][1:]  # the chat stage: prompts hold the question
        cfg["kd"].update(token_weight_source=source, token_weight_mode="renorm", text_token_weight_temperature=0.01)
        config = load_config(cfg)
        train(config, show_progress=False)
        records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["kd"]) for r in records)
        first_kd[source] = records[0]["kd"]
    assert first_kd["text"] != pytest.approx(first_kd["cls_attention"], rel=1e-6)
