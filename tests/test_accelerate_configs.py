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


@pytest.mark.parametrize("nodes", [1, 2])
def test_zero2_configs_are_accepted_by_deepspeeds_own_parser(nodes, monkeypatch):
    # What `accelerate launch` hands each process (its deepspeed_launcher's environment), then the
    # plugin Accelerate builds from it, with the stage's batch filled in by the loop, into DeepSpeed's
    # config parser. One process: DeepSpeed checks train_batch_size against its world size, which is
    # 1 without a process group (the loop writes batch x processes; tested above).
    # DeepSpeed is an extra (pip install movekd[deepspeed]), not in the default lock: importing
    # accelerate imports it once installed, which slows every run's start-up.
    pytest.importorskip("deepspeed", reason="DeepSpeed is the optional extra movekd[deepspeed]")
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env
    from deepspeed.runtime.config import DeepSpeedConfig

    from movekd.train.sharding import configure_deepspeed_stage

    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(CONFIGS / f"zero2_{nodes}x8.yaml"), "train.py"]))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(args.mixed_precision)
    accelerator = _deepspeed_accelerator(processes=1)
    accelerator.state.deepspeed_plugin = plugin
    configure_deepspeed_stage(accelerator, 1, batch_size=8, grad_accum=1)
    parsed = DeepSpeedConfig(plugin.deepspeed_config)
    assert parsed.zero_optimization_stage == 2 and parsed.gradient_clipping == 1.0
    assert parsed.train_micro_batch_size_per_gpu == 8 and parsed.bfloat16_config.enabled


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
