"""Gradient accumulation is one big batch: every loss term is averaged over its items in *all* the
micro-batches of the optimiser step (movekd.train.distributed), so 2 micro-batches of 4 train as one
batch of 8, in one process and over 2 processes (2 x 2 per rank x 2 micro-batches)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from movekd.data import Collator
from movekd.train.build import build_system, stage_dataset
from movekd.train.config import load_config
from movekd.train.distributed import batch_item_counts
from movekd.train.loop import train
from movekd.train.sampler import ResumableSampler
from test_train_ddp import logged, rank_weights, run_workers
from train_fixtures import tiny_config


def _vary_items(data: Path, text_only: tuple[int, ...], seed: int) -> None:
    """Answers of 1-3 words, and (stage 2) some text-only samples: micro-batches then differ in
    supervised tokens and in distilled samples (``text_only``: positions in the stage's data order).
    Twice the samples (24): two steps of 8 stay in one
    epoch, where the last partial batch of 8 and of 4 would differ."""
    samples = json.loads(data.read_text())
    samples += [{**sample, "id": sample["id"] + "-again"} for sample in samples]
    text_only_ids = {ResumableSampler(len(samples), seed).order()[p] for p in text_only}
    for i, sample in enumerate(samples):
        sample["conversations"] = [dict(turn) for turn in sample["conversations"]]
        sample["conversations"][1]["value"] += " very" * (i % 3)
        if i in text_only_ids:
            del sample["image"]
            sample["conversations"][0]["value"] = sample["conversations"][0]["value"].replace("<image>\n", "")
    data.write_text(json.dumps(samples))


def _configs(tmp_path: Path, micro_batch: int, accum: int) -> tuple[dict, dict]:
    """(one batch of 8 per step, ``accum`` micro-batches of ``micro_batch`` per step), MoLE dropout off."""
    whole, split = tiny_config(tmp_path / "whole", steps=(2, 2)), tiny_config(tmp_path / "split", steps=(2, 2))
    for config, batch, steps in ((whole, 8, 1), (split, micro_batch, accum)):
        config["model"]["student"]["mole"]["dropout"] = 0.0
        for index, (stage, text_only) in enumerate(zip(config["stages"], ((), (0, 4, 5, 8, 12, 13, 14)))):
            stage.update(batch_size=batch, grad_accum=steps)
            _vary_items(Path(stage["data"]), text_only, config["seed"] + index)
    return whole, split


def _assert_same(a: dict, b: dict, whole_dir: Path, split_dir: Path, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < atol, f"weights differ by {worst:.2e}"
    for x, y in zip(logged(whole_dir), logged(split_dir), strict=True):
        for key in ("loss", "text", "kd", "balance"):
            assert x[key] == pytest.approx(y[key], abs=atol), (key, x["stage"], x["step"])


def test_the_micro_batches_have_different_token_counts(tmp_path):
    # Otherwise per-micro-batch means would equal the step mean and the tests below could not fail.
    config = load_config(_configs(tmp_path, 4, 2)[1])
    system = build_system(config)
    collate = Collator(system.pad_token_id, padding_side="right", image_size=system.image_size)
    for index, stage in enumerate(config.stages):
        dataset = stage_dataset(system, config, stage)
        order = ResumableSampler(len(dataset), config.seed + index).order()
        counts = [batch_item_counts(collate([dataset[i] for i in order[s:s + 4]]), config.kd) for s in (0, 4)]
        assert counts[0]["text"] != counts[1]["text"], (stage.name, counts)
        if stage.name == "finetune":
            assert counts[0]["kd"] != counts[1]["kd"], counts


def test_accumulating_two_micro_batches_of_four_equals_one_batch_of_eight(tmp_path):
    whole, split = _configs(tmp_path, 4, 2)
    a = train(load_config(whole), show_progress=False).system.checkpoint_weights()
    b = train(load_config(split), show_progress=False).system.checkpoint_weights()
    _assert_same(a, b, Path(whole["output_dir"]), Path(split["output_dir"]))


@pytest.mark.slow
def test_accumulation_over_two_processes_equals_one_batch_of_eight(tmp_path):
    whole, split = _configs(tmp_path, 2, 2)  # 2 ranks x 2 samples x 2 micro-batches
    a = train(load_config(whole), show_progress=False).system.checkpoint_weights()
    ranks = run_workers(split, tmp_path / "out")
    assert ranks[0]["steps"] == ranks[1]["steps"] == [2, 2]
    for rank in (0, 1):
        _assert_same(a, rank_weights(tmp_path / "out", rank), Path(whole["output_dir"]), Path(split["output_dir"]))
