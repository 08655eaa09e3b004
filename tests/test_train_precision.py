"""Mixed precision done right: trained weights are updated in float32 even when loaded in bf16."""

from __future__ import annotations

import pytest
import torch

from movekd.config.loader import ConfigError
from movekd.train.build import build_system
from movekd.train.config import load_config
from movekd.train.loop import train
from train_fixtures import tiny_config


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: earlier tests made it fp32, these run bf16 autocast."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _finetune_llm_only(tmp_path, **top):
    config = tiny_config(tmp_path, steps=(3, 3), precision="bf16")
    config["model"]["llm_dtype"] = "bfloat16"
    stage = {**config["stages"][1], "train": ["llm"], "lr": 2e-5, "max_steps": 3}
    return {**config, "stages": [stage], **top}


def test_bf16_loaded_llm_weights_of_magnitude_003_change_at_lr_2e5(tmp_path):
    config = load_config(_finetune_llm_only(tmp_path))
    system = build_system(config)
    llm = system.model.vlm.llm
    assert all(p.dtype == torch.bfloat16 for p in llm.parameters())
    before = {n: p.detach().float().clone() for n, p in llm.named_parameters()}
    train(config, system=system, show_progress=False)
    moved, total = 0, 0
    for name, p in llm.named_parameters():
        assert p.dtype == torch.float32, name  # the trained copy is float32
        if "embed_tokens" in name:  # rows of tokens absent from the data get no gradient
            continue
        band = (before[name].abs() > 0.02) & (before[name].abs() < 0.04)
        total += int(band.sum())
        moved += int((p.detach()[band] != before[name][band]).sum())
    # In bf16 (spacing 1.2e-4 at 0.03) three AdamW steps of ~2e-5 are all rounded away; in fp32 they stay.
    assert total > 1000 and moved / total > 0.95


def test_frozen_parts_keep_their_loaded_dtype(tmp_path):
    config = _finetune_llm_only(tmp_path)
    config["stages"][0]["train"] = ["projector"]
    system = build_system(load_config(config))
    train(load_config(config), system=system, show_progress=False)
    assert all(p.dtype == torch.bfloat16 for p in system.model.vlm.llm.parameters())


def test_training_bf16_weights_without_an_fp32_copy_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.llm_dtype"):
        load_config(_finetune_llm_only(tmp_path, trainable_fp32=False))
