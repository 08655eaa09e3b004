"""``movekd bench efficiency`` on tiny configs: schema, invariants, the memory counter, CLI and plot."""

from __future__ import annotations

import json

import pytest
import torch

from movekd.bench.efficiency import build_pair, run_efficiency_bench
from movekd.bench.memory import PeakMemory, module_bytes
from movekd.train.config import load_config
from train_fixtures import tiny_config


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_peak_memory_counts_live_tensors_not_views(device):
    with PeakMemory() as memory:
        a = torch.zeros(1000, device=device)  # 4,000 bytes
        b = a * 2  # 8,000 live
        view = b.view(10, 100)  # a view: no new memory
        b.add_(1)  # in place: no new memory
        del a  # 4,000 live
        c = torch.ones(2000, device=device)  # 12,000 live
    assert memory.peak == 12_000 and memory.live == 12_000
    del b, view, c
    assert memory.live == 0
    assert module_bytes(torch.nn.Linear(10, 4)) == (40 + 4) * 4


def test_multi_encoder_concatenates_every_teacher_on_the_student_grid(tmp_path):
    config = load_config(tiny_config(tmp_path))
    single, multi, size = build_pair(config, "meta", torch.float32)
    images = torch.zeros(1, 3, size, size, dtype=torch.uint8, device="meta")
    student_tokens = single.vision(images).tokens
    teacher_outs = [t(images) for t in multi.vision.encoders]
    tokens = multi.vision(images).tokens
    assert tokens.shape[1] == student_tokens.shape[1]  # the same number of image tokens for the LLM
    assert tokens.shape[2] == sum(o.tokens.shape[2] for o in teacher_outs)
    assert multi.projector[0].in_features == tokens.shape[2]


def test_efficiency_bench_reports_ratios_of_its_own_figures(tmp_path, capsys):
    config = load_config(tiny_config(tmp_path))
    result = run_efficiency_bench(config, config, repeats=1, text_tokens=8)
    for scale in ("paper", "embedded"):
        single, multi = result[scale]["single"], result[scale]["multi"]
        for costs in (single, multi):
            assert costs["flops"] > costs["encoder_flops"] > 0
            assert costs["params"] > costs["encoder_params"] > 0
            assert costs["memory_bytes"] == costs["weight_bytes"] + costs["activation_bytes"]
            assert costs["activation_bytes"] > 0
        assert result[scale]["vlm_flops_ratio"] == pytest.approx(multi["flops"] / single["flops"])
        assert result[scale]["memory_ratio"] == pytest.approx(multi["memory_bytes"] / single["memory_bytes"])
        # Both VLMs share the LLM architecture: the difference is the vision side.
        assert multi["params"] - multi["encoder_params"] == single["params"] - single["encoder_params"]
    assert result["embedded"]["single"]["seconds"] > 0 and result["embedded"]["multi"]["seconds"] > 0
    for key in ("vlm_flops_ratio", "encoder_flops_ratio", "param_ratio", "memory_ratio",
                "measured_latency_ratio", "measured_memory_ratio"):
        assert result[key] > 0
    # Teachers: the CLIP-role ViT (same as the student) plus a CNN, so the multi-encoder side costs more.
    assert result["encoder_flops_ratio"] > 1 and result["encoder_param_ratio"] > 1
    json.dumps(result)  # --json must be able to print it


def test_efficiency_cli_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    import yaml

    from movekd.cli import main

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    plot = tmp_path / "eff.png"
    assert main(["bench", "efficiency", "--paper", str(path), "--embedded", "none", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "prefill TFLOP" in out and "vlm_flops_ratio" in out and "embedded scale" not in out
    from PIL import Image

    with Image.open(plot) as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_train_bench_splits_each_step_and_compares_kd_modes(tmp_path, capsys):
    from movekd.bench.train_step import PARTS, run_train_bench

    config = load_config(tiny_config(tmp_path))
    result = run_train_bench(config, steps=2, warmup=1)
    assert set(result["stages"]) == {"pretrain", "finetune"}
    assert result["matmul_gflops"]["fp32"] > 0 and result["matmul_gflops"]["bf16"] > 0
    for stage in result["stages"].values():
        assert set(stage["modes"]) == {"no_kd", "online", "cached"}
        for mode, values in stage["modes"].items():
            seconds = values["seconds"]
            assert all(seconds[p] >= 0 for p in PARTS)
            assert seconds["student"] > 0 and seconds["llm_forward"] > 0 and seconds["backward"] > 0
            assert seconds["step"] >= seconds["student"] + seconds["llm_forward"] + seconds["backward"]
            assert values["flops"] > 0 and values["mfu_bf16"] > 0
        modes = stage["modes"]
        assert modes["no_kd"]["seconds"]["teachers"] == 0  # no teacher runs without KD
        assert modes["online"]["seconds"]["teachers"] > 0
        assert modes["cached"]["seconds"]["teachers"] == 0  # every output came from the cache
        # Online KD adds the teachers' forward and the adapters' forward + backward to the count.
        assert modes["online"]["flops"] > modes["cached"]["flops"] > modes["no_kd"]["flops"]
        assert stage["online_over_no_kd"] == pytest.approx(modes["online"]["seconds"]["step"] / modes["no_kd"]["seconds"]["step"])


def test_flop_counter_counts_cpu_attention_as_on_meta():
    from movekd.bench.flops import flop_counter

    q = torch.randn(1, 2, 16, 8)
    counts = {}
    for device in ("cpu", "meta"):
        x = q.to(device)
        with flop_counter() as counter:
            torch.nn.functional.scaled_dot_product_attention(x, x, x)
        counts[device] = counter.get_total_flops()
    assert counts["cpu"] == counts["meta"] == 2 * (2 * 2 * 16 * 16 * 8)  # QK^T and AV, 2 FLOPs per MAC
    x = q.clone().requires_grad_()
    with flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(x, x, x).sum().backward()
    # The flash backward recomputes QK^T: 5 products of that size against the forward's 2.
    assert counter.get_total_flops() == counts["cpu"] * 7 // 2
