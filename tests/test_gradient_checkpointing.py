"""Activation checkpointing (``gradient_checkpointing: true``) changes memory, never gradients."""

from __future__ import annotations

import torch

from movekd.data import Collator
from movekd.mole import mole_layers
from movekd.train.build import build_system, enable_gradient_checkpointing, stage_dataset
from movekd.train.config import load_config
from movekd.train.groups import set_trainable
from train_fixtures import tiny_config


def _grads(model, batch, calls):
    model.zero_grad(set_to_none=True)
    calls.clear()
    torch.manual_seed(1)  # MoLE dropout is on: the recomputation must replay the same masks
    losses = model(**batch)
    assert losses.balance is not None and losses.kd is not None
    recorded = [layer.router_probs for layer in mole_layers(model.vlm.vision)]
    losses.total.backward()
    # the backward's recomputation did not overwrite the records the balance loss used
    assert all(a is b for a, b in zip(recorded, [layer.router_probs for layer in mole_layers(model.vlm.vision)]))
    return float(losses.total.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_on_and_off_give_the_same_gradients(tmp_path):
    config = load_config(tiny_config(tmp_path))
    system = build_system(config)
    model = system.model.train()
    set_trainable(system, config.stages[1].train)
    dataset = stage_dataset(system, config, config.stages[1])
    raw = Collator(system.pad_token_id, padding_side="right", image_size=system.image_size)([dataset[i] for i in range(4)])
    batch = {k: raw[k] for k in ("images", "input_ids", "attention_mask", "labels", "has_image")}
    calls = []
    first_mole = mole_layers(model.vlm.vision)[0]
    first_mole.register_forward_hook(lambda *args: calls.append(1))

    loss_plain, plain = _grads(model, batch, calls)
    assert len(calls) == 1
    enable_gradient_checkpointing(model.vlm)
    loss_ckpt, ckpt = _grads(model, batch, calls)
    assert len(calls) == 2  # the student's block really was recomputed in the backward
    assert model.vlm.llm.is_gradient_checkpointing
    assert loss_ckpt == loss_plain
    assert plain.keys() == ckpt.keys() and any(n.startswith("vlm.llm.") for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_config_key_turns_it_on_for_training(tmp_path):
    from movekd.train.loop import train

    config = load_config({**tiny_config(tmp_path, steps=(1, 1)), "gradient_checkpointing": True})
    result = train(config, show_progress=False)
    vlm = result.system.model.vlm
    assert vlm.llm.is_gradient_checkpointing and vlm.vision.encoder.is_gradient_checkpointing
    assert [s.steps for s in result.stages] == [1, 1]
