"""The dry run's memory plan: per-device parts under DDP / FSDP / ZeRO, and the paper presets fit."""

from __future__ import annotations

import json

import pytest

from movekd.cli import main
from movekd.train.config import load_config
from movekd.train.build import build_system
from movekd.train.memory_plan import memory_plan

PARTS = ("parameters", "gradients", "optimizer_states", "master_weights", "teachers", "activations", "runtime")


@pytest.fixture(scope="module")
def paper_plans():
    system = build_system(load_config("paper_llava15_7b_v1.0"), device="meta")
    return {(s, n): memory_plan(system, s, n, 80.0) for s in ("ddp", "fsdp", "zero2", "zero3") for n in (1, 16)}


def test_parts_add_up_and_sharding_divides_the_trained_state(paper_plans):
    for plan in paper_plans.values():
        for stage in plan["stages"]:
            gb = stage["per_device_gb"]
            assert gb["total"] == pytest.approx(sum(gb[p] for p in PARTS), abs=0.05)
    ddp, fsdp = paper_plans["ddp", 16]["stages"][1]["per_device_gb"], paper_plans["fsdp", 16]["stages"][1]["per_device_gb"]
    # 7.08B trained parameters: fp32 weights, gradients and two Adam moments, 16 bytes each
    assert ddp["parameters"] + ddp["gradients"] + ddp["optimizer_states"] > 100
    assert fsdp["optimizer_states"] == pytest.approx(ddp["optimizer_states"] / 16, rel=0.01)
    assert paper_plans["zero2", 16]["stages"][1]["per_device_gb"]["master_weights"] > 0
    assert ddp["teachers"] == fsdp["teachers"] > 2  # teachers replicated under every strategy
    # one device: sharding changes nothing but DeepSpeed's extra fp32 copy
    assert paper_plans["fsdp", 1]["per_device_gb"]["total"] == pytest.approx(paper_plans["ddp", 1]["per_device_gb"]["total"], rel=0.05)


def test_checkpointing_shrinks_activations(paper_plans):
    gb = paper_plans["fsdp", 16]["stages"][0]["per_device_gb"]
    assert gb["gradient_checkpointing"] and gb["activations"] == gb["activations_with_checkpointing"]
    assert gb["activations_without_checkpointing"] > 5 * gb["activations_with_checkpointing"]


def test_ddp_does_not_fit_stage_2_of_the_paper_on_80gb(paper_plans):
    assert not paper_plans["ddp", 16]["fits"] and paper_plans["ddp", 16]["worst_stage"] == "finetune"


@pytest.mark.parametrize("preset", ["paper_llava15_7b_v1.0", pytest.param("paper_llava15_7b_v1.1", marks=pytest.mark.slow)])
def test_paper_presets_fit_80gb_on_16_devices_with_their_strategy(preset, capsys):
    assert main(["train", preset, "--dry-run", "--devices", "16", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["strategy"] == load_config(preset).strategy != "ddp" and memory["devices"] == 16
    assert memory["fits"] and memory["per_device_gb"]["total"] < 80
    assert set(PARTS) <= set(memory["per_device_gb"])


def test_cli_rejects_zero_devices(capsys):
    assert main(["train", "paper_llava15_7b_v1.0", "--dry-run", "--devices", "0"]) == 2
    assert "--devices" in capsys.readouterr().err
