"""The shipped Accelerate configs (configs/accelerate/) parse, and launch the strategy they name."""

from __future__ import annotations

from pathlib import Path

import pytest

import movekd

CONFIGS = Path(movekd.__file__).parent / "configs" / "accelerate"


def _launch_args(path: Path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    return _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "train.py"]))[0]


def test_every_layout_is_shipped():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == [
        "fsdp_1x8.yaml", "fsdp_2x8.yaml", "zero2_1x8.yaml", "zero2_2x8.yaml"]


@pytest.mark.parametrize("nodes", [1, 2])
def test_fsdp_configs_give_movekd_an_fsdp2_plugin_without_auto_wrap(nodes, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = _launch_args(CONFIGS / f"fsdp_{nodes}x8.yaml")
    assert (args.num_machines, args.num_processes, args.mixed_precision) == (nodes, 8 * nodes, "bf16")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.auto_wrap_policy is None and plugin.reshard_after_forward


@pytest.mark.parametrize("nodes", [1, 2])
def test_zero2_configs_parse_as_deepspeed_stage_2(nodes):
    args = _launch_args(CONFIGS / f"zero2_{nodes}x8.yaml")
    assert args.use_deepspeed and int(args.zero_stage) == 2
    assert (args.num_machines, args.num_processes, args.mixed_precision) == (nodes, 8 * nodes, "bf16")


def _deepspeed_accelerator(processes: int = 2):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2},
                                               "train_micro_batch_size_per_gpu": "auto"})
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=processes,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


def test_deepspeed_gets_the_stage_micro_batch_before_prepare():
    # without it Accelerate's prepare raises: the loop passes it no DataLoader to read the batch size from
    from movekd.train.sharding import configure_deepspeed_stage

    accelerator = _deepspeed_accelerator()
    configure_deepspeed_stage(accelerator, 1, batch_size=4, grad_accum=1)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (4, 1, 8)


def test_deepspeed_with_gradient_accumulation_is_refused_naming_the_key():
    from movekd.train.sharding import configure_deepspeed_stage

    with pytest.raises(NotImplementedError, match=r"stages\.1\.grad_accum is 2"):
        configure_deepspeed_stage(_deepspeed_accelerator(), 1, batch_size=4, grad_accum=2)
