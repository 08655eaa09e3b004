"""What a training step costs, part by part, and what knowledge distillation adds to it.

For every stage of a preset (the demo by default) the same batches run in three modes:

- ``no_kd``: the VLM's text loss only (the LLaVA baseline's step);
- ``online``: MoVE-KD with every teacher run on every batch;
- ``cached``: MoVE-KD with the teachers' outputs read from the in-run cache (``teacher_cache``),
  filled beforehand, as from the second visit of an image on (or from a cache on disk).

Each step is split into data (decode + collate, done by loader workers during training), teachers,
student, LLM forward, the rest of the forward (projector, adapters, losses), backward and optimiser
(with gradient clipping), timed with module hooks; medians over ``steps`` after ``warmup`` steps.
The step's FLOPs are counted on the same tensors (:func:`movekd.bench.flops.flop_counter`) and its
achieved rate is set against the fp32 and bf16 matmul rates measured in the same run (``mfu_*``).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from movekd.bench.flops import flop_counter, matmul_rate
from movekd.train.config import TrainConfig, load_config

MODES = ("no_kd", "online", "cached")
PARTS = ("data", "teachers", "student", "llm_forward", "other_forward", "backward", "optimizer")


@contextmanager
def _module_timer(modules: dict[str, list[torch.nn.Module]], into: dict[str, float]):
    """Add the wall time spent inside each named group of modules to ``into`` (outermost calls only)."""
    handles, starts = [], {}
    for name, group in modules.items():
        for module in group:
            def pre(_module, _args, name=name):
                if starts.get(name) is None:
                    starts[name] = (time.perf_counter(), _module)

            def post(_module, _args, _out, name=name):
                start = starts.get(name)
                if start is not None and start[1] is _module:
                    into[name] += time.perf_counter() - start[0]
                    starts[name] = None

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _batches(system, config: TrainConfig, stage, count: int) -> tuple[list[dict], list[float], object]:
    from torch.utils.data import DataLoader

    from movekd.data import Collator
    from movekd.train.build import stage_dataset

    dataset = stage_dataset(system, config, stage)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed)).tolist()
    collate = Collator(system.pad_token_id, padding_side="right", image_size=system.image_size)
    loader = DataLoader(dataset, batch_size=stage.batch_size, sampler=order, collate_fn=collate, num_workers=0,
                        drop_last=True)
    batches, seconds = [], []
    iterator = iter(loader)
    while len(batches) < count:
        start = time.perf_counter()
        batch = next(iterator)
        seconds.append(time.perf_counter() - start)
        if batch["input_ids"].shape[0]:
            batches.append(batch)
    return batches, seconds, dataset


def _forward(model, batch: dict, dataset, use_kd: bool):
    return model(images=batch["images"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"], has_image=batch["has_image"],
                 image_keys=[dataset.image_key(i) for i in batch["indices"]], use_kd=use_kd,
                 segment_ids=batch.get("segment_ids"))


def _step(system, optimizer, params, batch, dataset, mode: str, autocast) -> dict[str, float]:
    model = system.model
    parts: dict[str, float] = defaultdict(float)
    llm = model.vlm.llm
    # Training runs the LLM's base model and its head separately (supervised positions only).
    llm_parts = [llm, getattr(llm, llm.base_model_prefix), llm.get_output_embeddings()]
    timed = {"teachers": list(model.teachers), "student": [model.vlm.vision], "llm_forward": llm_parts}
    start = time.perf_counter()
    with _module_timer(timed, parts), autocast:
        losses = _forward(model, batch, dataset, use_kd=mode != "no_kd")
    forward_end = time.perf_counter()
    losses.total.backward()
    backward_end = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    parts["other_forward"] = forward_end - start - sum(parts[k] for k in timed)
    parts["backward"] = backward_end - forward_end
    parts["optimizer"] = end - backward_end
    parts["step"] = end - start
    return dict(parts)


def _count_flops(system, batch, dataset, mode: str, autocast) -> int:
    counter = flop_counter()
    with counter:
        with autocast:
            losses = _forward(system.model, batch, dataset, use_kd=mode != "no_kd")
        losses.total.backward()
    for p in system.model.parameters():
        p.grad = None
    return counter.get_total_flops()


def run_train_bench(config: str | TrainConfig = "demo", *, steps: int = 4, warmup: int = 1,
                    threads: int | None = None, overrides: list[str] | None = None) -> dict:
    """Time ``steps`` training steps per stage and mode of ``config``; see the module docstring."""
    from movekd.train.build import build_system
    from movekd.train.groups import set_trainable
    from movekd.train.llm_lora import set_llm_lora_active
    from movekd.train.optim import build_optimizer
    from movekd.train.teacher_cache import TeacherCache

    if threads:
        torch.set_num_threads(threads)
    config = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    torch.manual_seed(config.seed)
    system = build_system(config, device="cpu")
    system.model.train()
    bf16 = config.precision == "bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    result = {"config": {"preset": config.name, "precision": config.precision, "steps": steps, "warmup": warmup,
                         "threads": torch.get_num_threads()},
              "matmul_gflops": {k: v / 1e9 for k, v in rates.items()}, "stages": {}}
    for index, stage in enumerate(config.stages):
        if config.model.llm_lora is not None:  # as the loop: zero adapters off until a stage trains them
            set_llm_lora_active(system.model.vlm.llm, any("llm" in s.train for s in config.stages[:index + 1]))
        groups = set_trainable(system, stage.train)
        params = [p for group in groups.values() for p in group]
        optimizer = build_optimizer(groups, {g: stage.lrs.get(g, stage.lr) for g in groups}, stage.weight_decay)
        batches, data_seconds, dataset = _batches(system, config, stage, warmup + steps)
        stage_result = {"batch_size": stage.batch_size, "group_by_image": stage.group_by_image,
                        "tokens": [int(b["input_ids"].shape[1]) for b in batches], "modes": {}}
        modes = MODES if (config.kd.enabled and stage.kd and len(system.model.teachers)) else ("no_kd",)
        for mode in modes:
            system.model.cache = TeacherCache() if mode == "cached" else None
            if mode == "cached":  # fill the cache with these batches' teacher outputs
                with torch.no_grad(), autocast:
                    for batch in batches:
                        _forward(system.model, batch, dataset, use_kd=True)
            samples = defaultdict(list)
            for index, batch in enumerate(batches):
                parts = _step(system, optimizer, params, batch, dataset, mode, autocast)
                if index >= warmup:
                    for key, value in parts.items():
                        samples[key].append(value)
            seconds = {key: statistics.median(values) for key, values in samples.items()}
            seconds["data"] = statistics.median(data_seconds[warmup:] or data_seconds)
            flops = _count_flops(system, batches[-1], dataset, mode, autocast)
            achieved = flops / seconds["step"]
            stage_result["modes"][mode] = {
                "seconds": {k: seconds.get(k, 0.0) for k in PARTS + ("step",)}, "flops": flops,
                "gflops_per_s": achieved / 1e9, "mfu_bf16": achieved / rates["bf16"], "mfu_fp32": achieved / rates["fp32"],
            }
        system.model.cache = None
        base = stage_result["modes"]["no_kd"]["seconds"]["step"]
        for mode in modes[1:]:
            stage_result[f"{mode}_over_no_kd"] = stage_result["modes"][mode]["seconds"]["step"] / base
        result["stages"][stage.name] = stage_result
    return result


TARGETS = {"cached_over_no_kd": ("<=", 1.15), "online_over_no_kd": ("<=", 1.5), "mfu_bf16": (">=", 0.15)}


def format_train_bench(result: dict) -> str:
    config, rates = result["config"], result["matmul_gflops"]
    lines = [f"training steps of '{config['preset']}' ({config['precision']}, {config['threads']} threads, median of "
             f"{config['steps']} after {config['warmup']} warm-up); 2048² matmul here: "
             f"{rates['fp32']:.0f} GFLOP/s fp32, {rates['bf16']:.0f} GFLOP/s bf16"]
    for name, stage in result["stages"].items():
        lines += ["", f"stage {name}: batch {stage['batch_size']}"
                      f"{' images (shared-prefix groups)' if stage['group_by_image'] else ''}, "
                      f"{stage['tokens'][0]} tokens wide",
                  f"{'seconds':<14}" + "".join(f"{m:>10}" for m in stage["modes"])]
        for part in PARTS + ("step",):
            lines.append(f"{part:<14}" + "".join(f"{v['seconds'][part]:>10.3f}" for v in stage["modes"].values()))
        lines.append(f"{'TFLOP/step':<14}" + "".join(f"{v['flops'] / 1e12:>10.3f}" for v in stage["modes"].values()))
        lines.append(f"{'GFLOP/s':<14}" + "".join(f"{v['gflops_per_s']:>10.1f}" for v in stage["modes"].values()))
        lines.append(f"{'mfu_bf16':<14}" + "".join(f"{v['mfu_bf16']:>10.3f}" for v in stage["modes"].values()))
        for key in ("online_over_no_kd", "cached_over_no_kd"):
            if key in stage:
                op, target = TARGETS[key]
                lines.append(f"{key}: {stage[key]:.2f} (target {op} {target})")
    return "\n".join(lines)


def plot_train_bench(result: dict, path) -> None:
    """Stacked bars: the parts of each mode's step, one group per stage (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = [(stage, mode, values) for stage, s in result["stages"].items() for mode, values in s["modes"].items()]
    bottoms = [0.0] * len(bars)
    colours = plt.get_cmap("tab10")
    for k, part in enumerate(PARTS):
        heights = [values["seconds"][part] for _, _, values in bars]
        ax.bar(range(len(bars)), heights, bottom=bottoms, label=part, color=colours(k))
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    labels = [f"{stage}\n{mode}\nmfu {values['mfu_bf16']:.2f}" for stage, mode, values in bars]
    ax.set_xticks(range(len(bars)), labels, fontsize=8)
    ax.set_ylabel("seconds per step (data: in loader workers)")
    ax.set_title(f"Training step of '{result['config']['preset']}' by part")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
