"""LoRA on the LLM (model.llm_lora): only the adapters train, resume is exact, the bundle is merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from movekd.config.loader import ConfigError
from movekd.train import checkpoint as ckpt
from movekd.train.build import build_system
from movekd.train.config import load_config
from movekd.train.groups import named_groups
from movekd.train.llm_lora import is_lora_parameter
from movekd.train.loop import train
from train_fixtures import tiny_config

RANK = 4
# the tiny LLM (hidden 32, MLP 64, 2 layers, 2 kv heads of 8): q,k,v,o,gate,up,down per layer
TINY_LORA_PARAMS = 2 * RANK * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64))


def lora_config(tmp_path, *, steps=(2, 8), llm_dtype="float32", dropout=0.0, **extra) -> dict:
    raw = tiny_config(tmp_path, steps=steps)
    raw["model"]["llm_dtype"] = llm_dtype
    raw["model"]["llm_lora"] = {"rank": RANK, "alpha": 2.0 * RANK, "dropout": dropout}
    raw["stages"][1]["train"] = ["projector", "llm"]
    raw["stages"][1]["lrs"] = {"llm": 1e-2}
    raw.update(extra)
    return raw


def _llm_params(system) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in named_groups(system.model)["llm"]}


def test_lora_trains_only_the_adapters_of_a_bf16_llm(tmp_path):
    # trainable_fp32 false with a bf16 LLM is accepted: what trains in the LLM is the fp32 LoRA
    raw = lora_config(tmp_path, llm_dtype="bfloat16", trainable_fp32=False)
    raw["stages"][1]["kd"] = False
    config = load_config({**raw, "stages": raw["stages"][1:]})
    system = build_system(config)
    before = _llm_params(system)
    assert sum(p.numel() for n, p in before.items() if is_lora_parameter(n)) == TINY_LORA_PARAMS
    train(config, system=system, show_progress=False, stop_after_steps=8)
    after = dict(named_groups(system.model)["llm"])
    for name, old in before.items():
        new = after[name].detach()
        if is_lora_parameter(name):
            assert new.dtype == torch.float32 and after[name].requires_grad
        else:  # the LLM's own weights: frozen, bit-identical, still bf16
            assert new.dtype == torch.bfloat16 and not after[name].requires_grad
            assert torch.equal(old, new), name
    changed = {n for n, old in before.items() if not torch.equal(old, after[n].detach())}
    assert changed and all(is_lora_parameter(n) for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    losses = [json.loads(line)["text"] for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_lora_resume_continues_the_same_trajectory(tmp_path):
    straight = train(load_config(lora_config(tmp_path / "a", steps=(2, 4), dropout=0.1)), show_progress=False,
                     stop_after_steps=6)
    config = load_config(lora_config(tmp_path / "b", steps=(2, 4), dropout=0.1))
    train(config, show_progress=False, stop_after_steps=4)  # stops in stage 2, after 2 LoRA steps
    resumed = train(config, resume=config.run_dir, show_progress=False, stop_after_steps=2)
    a = straight.system.checkpoint_weights()
    b = resumed.system.checkpoint_weights()
    assert a.keys() == b.keys() and any(is_lora_parameter(k) for k in a)
    saved = ckpt.load_weights(ckpt.latest_checkpoint(config.run_dir) / ckpt.WEIGHTS)
    assert any(is_lora_parameter(k) for k in saved)  # checkpoints hold the adapters
    # ... and not the LLM's own frozen weights: resume reloaded them from model.llm
    base = {k for k in a if k.startswith("vlm.llm.") and not is_lora_parameter(k)}
    assert base and not base & set(saved)
    assert set(saved) == set(a) - base
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_adapters_are_off_until_a_stage_trains_the_llm(tmp_path):
    # stage 1 (LLM frozen) skips the zero adapters' matmuls; stage 2 switches them on and trains them
    from peft.tuners.lora import LoraLayer

    config = load_config(lora_config(tmp_path, steps=(2, 2)))
    system = build_system(config)
    states = []

    def on_log(record):
        layers = [m for m in system.model.vlm.llm.modules() if isinstance(m, LoraLayer)]
        trained_b = sum(float(p.abs().sum()) for n, p in named_groups(system.model)["llm"] if "lora_B" in n)
        states.append((record["stage"], {m.disable_adapters for m in layers}, trained_b > 0))

    train(config, system=system, show_progress=False, on_log=on_log)
    assert states == [("pretrain", {True}, False)] * 2 + [("finetune", {False}, True)] * 2


def test_lora_resume_refuses_a_changed_base_llm(tmp_path):
    from safetensors.torch import load_file, save_file

    config = load_config(lora_config(tmp_path, steps=(1, 2)))
    train(config, show_progress=False, stop_after_steps=2)  # one LoRA step, checkpoint without the base
    weights_file = next(Path(config.model.llm).glob("*.safetensors"))
    state = load_file(str(weights_file))
    name = next(k for k in state if k.endswith("q_proj.weight"))
    state[name] = state[name] + 1e-3
    save_file(state, str(weights_file), metadata={"format": "pt"})
    with pytest.raises(ckpt.CheckpointError, match="frozen weights it reloads from model.llm"):
        train(config, resume=config.run_dir, show_progress=False)


def test_merged_bundle_gives_the_unmerged_logits_without_peft(tmp_path):
    from movekd.inference import load_trained

    config = load_config(lora_config(tmp_path, steps=(1, 4)))
    system = build_system(config)
    train(config, system=system, show_progress=False, stop_after_steps=5)
    vlm = system.model.vlm.eval()
    lora_b = [p for n, p in vlm.llm.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)  # the adapters changed the LLM
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ids = torch.tensor([[5, -200, 7, 8], [6, -200, 9, 10]])
    with torch.no_grad():
        unmerged = vlm(images, ids).logits
    system.save_inference(tmp_path / "bundle")
    loaded = load_trained(tmp_path / "bundle")
    names = [n for n, _ in loaded.vlm.llm.named_parameters()]
    assert not any(is_lora_parameter(n) or "base_layer" in n for n in names)
    assert all(type(m).__module__.split(".")[0] != "peft" for m in loaded.vlm.modules())
    with torch.no_grad():
        merged = loaded.vlm(images, ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


def test_full_run_writes_a_merged_bundle(tmp_path):
    from movekd.inference import load_trained

    config = load_config(lora_config(tmp_path, steps=(1, 2)))
    result = train(config, show_progress=False)
    loaded = load_trained(result.final_dir)
    assert not any(is_lora_parameter(n) for n, _ in loaded.vlm.llm.named_parameters())
    assert not any(is_lora_parameter(n) for n, _ in result.system.model.vlm.llm.named_parameters())


def test_dry_run_counts_lora_as_the_trainable_llm(tmp_path):
    from movekd.train.dry_run import dry_run

    raw = lora_config(tmp_path)
    with_lora = dry_run(load_config(raw), devices=2)
    stage2 = with_lora["stages"][1]["groups"]["llm"]
    assert stage2["trainable"] == TINY_LORA_PARAMS
    full = dry_run(load_config({**raw, "model": {**raw["model"], "llm_lora": None}}), devices=2)
    assert full["stages"][1]["groups"]["llm"]["trainable"] == stage2["frozen"]  # the LLM's own weights


def test_paper_preset_with_llava_lora_plan():
    from movekd.train.memory_plan import memory_plan

    plans = {}
    for lora in (True, False):
        config = load_config("paper_llava15_7b_v1.0", ["strategy=ddp"] + (
            ["model.llm_lora.rank=128", "model.llm_lora.alpha=256"] if lora else []))
        system = build_system(config, device="meta")
        rows = {g: (on, off) for g, on, off in system.parameter_rows(config.stages[1].train)}
        plans[lora] = memory_plan(system, "ddp", 8, 80.0)["stages"][1]["per_device_gb"]
        if lora:  # LLaVA-1.5 LoRA of Vicuna-7B, all linear layers, rank 128: 32 x 128 x (4·8192 + 3·15104)
            assert rows["llm"][0] == 319_815_680
            sharded = memory_plan(system, "fsdp", 8, 80.0)["stages"][1]["per_device_gb"]
    # under plain DDP the frozen LLM has no gradients, Adam moments or fp32 copy: far less memory
    assert plans[True]["optimizer_states"] < plans[False]["optimizer_states"] / 10
    assert plans[True]["gradients"] < plans[False]["gradients"] / 10
    assert plans[True]["total"] < 80 < plans[False]["total"]
    # FSDP also shards the frozen bf16 LLM
    assert sharded["parameters"] == pytest.approx(plans[True]["parameters"] / 8, rel=0.05)


@pytest.mark.parametrize("override, message", [
    (["model.llm_lora.rnk=4"], "unknown config key 'model.llm_lora.rnk'"),
    (["model.llm_lora.rank=0"], "'model.llm_lora': rank must be >= 1"),
    (["model.llm_lora.dropout=1.5"], "'model.llm_lora': dropout must be in"),
    (["model.llm_lora=8"], "'model.llm_lora' must be a mapping"),
])
def test_lora_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", override)


def test_lora_target_modules_that_match_nothing_name_the_key(tmp_path):
    raw = lora_config(tmp_path)
    raw["model"]["llm_lora"]["target_modules"] = ["no_such_proj"]
    with pytest.raises(ConfigError, match="model.llm_lora.target_modules"):
        build_system(load_config(raw))


def test_fsdp_units_of_a_lora_llm_take_one_gradient_dtype(tmp_path):
    # FSDP2 fixes a unit's gradient dtype at the first forward, from the parameters that need a
    # gradient then. With the fp32 adapters inside their bf16 decoder layer's unit and stage 1 not
    # training them, no dtype was fixed and stage 2's backward failed (2 CPU processes, precision bf16:
    # "attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float").
    from movekd.train.loop import _trained_by
    from movekd.train.sharding import _blocks, fsdp_units, units_without_gradient_dtype

    config = load_config(lora_config(tmp_path, llm_dtype="bfloat16"))
    system = build_system(config)
    model = system.model
    trained, first = _trained_by(system, config.stages), _trained_by(system, config.stages[:1])
    assert {p.dtype for p in trained} == {torch.float32}
    layers = ["vlm.llm.model.layers.0", "vlm.llm.model.layers.1"]  # the tiny Llama's decoder layers
    names = {id(m): n for n, m in model.named_modules()}
    whole_blocks = [(names[id(block)], [block]) for block in _blocks(model)]  # the wrapping before the fix
    assert units_without_gradient_dtype(model, whole_blocks, trained, first) == layers
    units = fsdp_units(model)
    assert [n for n, _ in units if "LoRA" in n] == [f"{n} (LoRA adapters)" for n in layers]
    assert units_without_gradient_dtype(model, units, trained, first) == []
    # the root keeps the bf16 embeddings and head next to the fp32 projector: fine while the first
    # sharded stage trains one of its parameters, refused when only a later stage does
    lora_only = [p for n, p in named_groups(model)["llm"] if is_lora_parameter(n)]
    assert units_without_gradient_dtype(model, units, trained, lora_only) == ["root"]
