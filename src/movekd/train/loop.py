"""The training loop: stages on HF Accelerate, gradient accumulation, logging, checkpoints, resume.

Accelerate owns devices, mixed precision (bf16/fp16 autocast) and multi-process wrapping (DDP);
this loop owns the MoVE-KD specifics: which parameters train in each stage, the loss terms, and a
data order that a resumed run continues exactly (``ResumableSampler``, RNG states in checkpoints).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from movekd.atomic import atomic_write_text
from movekd.data import Collator, SkipCounter, check_skip_budget
from movekd.errors import TrainingInterrupted, UserError
from movekd.train import checkpoint as ckpt
from movekd.train import sharding
from movekd.train.build import System, build_system, stage_dataset
from movekd.train.config import TrainConfig, config_dict
from movekd.train.data_check import scan_stages
from movekd.train.distributed import (
    RankSync,
    agree_on_step,
    batch_item_counts,
    global_record,
    step_item_totals,
    step_record,
)
from movekd.train.groups import set_trainable
from movekd.train.llm_lora import set_llm_lora_active
from movekd.train.metrics_log import MetricsLog, truncate_metrics
from movekd.train.optim import build_optimizer, build_scheduler
from movekd.train.precision import match_checkpoint_dtypes, upcast_trainable
from movekd.train.sampler import ModalityLengthGroupedBatchSampler, ResumableSampler
from movekd.train.signals import StopRequest, ignore_stop_signals, stop_on_signals

log = logging.getLogger(__name__)

MAX_BAD_STEPS = 10  # consecutive non-finite losses before giving up


class NonFiniteLossError(UserError, RuntimeError):
    """The loss stayed non-finite for MAX_BAD_STEPS steps: the run diverged (learning rate, precision)."""


@dataclass
class StageResult:
    name: str
    steps: int
    seconds: float
    first: dict = field(default_factory=dict)  # mean of the first logged window
    last: dict = field(default_factory=dict)  # mean of the last logged window
    stopped_early: bool = False
    skipped_samples: int = 0
    bad_steps: int = 0
    skipped_by_reason: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    stages: list[StageResult]
    seconds: float
    system: System | None = None


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    from accelerate.utils import DistributedDataParallelKwargs

    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.precision]
    # Top-1 routing leaves experts that no token chose in a batch without gradient: DDP must expect
    # unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # cpu=True when no accelerator is present keeps gloo + CPU autocast; on GPUs nothing changes.
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
    sharding.enable_cpu_fsdp(accelerator)
    return accelerator


def _inner(optimizer):
    """The torch optimiser inside Accelerate's wrapper."""
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


class _StateDict:
    """An already gathered optimiser state, saved as ``optimizer.state_dict()`` would be."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def _trained_by(system: System, stages) -> list[torch.nn.Parameter]:
    """The parameters some of ``stages`` trains."""
    from movekd.train.groups import named_groups

    trained = {g for stage in stages for g in stage.train}
    return [p for g, params in named_groups(system.model).items() if g in trained
            for name, p in params if name not in system.always_frozen]


def _consolidate(accelerator, system: System, prepared) -> None:
    """Sharded run: full weights back into the model on rank 0 (bundle, checkpoint_weights)."""
    weights = sharding.full_weights(prepared)
    if accelerator.is_main_process:
        sharding.consolidate(system.model, weights)
    accelerator.wait_for_everyone()


def _mean(records: list[dict]) -> dict:
    keys = {k for r in records for k, v in r.items() if isinstance(v, (int, float))}
    return {k: sum(r[k] for r in records if k in r) / sum(1 for r in records if k in r) for k in sorted(keys)}


def _stop_checks(accelerator, stop: StopRequest, runtime_skips: int) -> tuple[bool, int]:
    """(stop requested on any process, samples skipped at run time on all processes): one all-reduce
    when several processes train, so that every rank takes the same decision at the same step."""
    if accelerator.num_processes == 1:
        return stop.requested, runtime_skips
    flags = torch.tensor([int(stop.requested), runtime_skips], device=accelerator.device)
    flags = accelerator.reduce(flags, reduction="sum")
    return bool(flags[0].item()), int(flags[1].item())


def train(config: TrainConfig, *, resume: Path | None = None, show_progress: bool = True,
          system: System | None = None, accelerator=None, on_log: Callable[[dict], None] | None = None,
          stop_after_steps: int | None = None) -> TrainResult:
    """Run every stage of ``config``; return where the run lives and what each stage did.

    ``resume``: a checkpoint folder or a run folder (its newest checkpoint). ``stop_after_steps``
    stops after that many optimiser steps in all (a checkpoint is written first): for tests.
    SIGTERM/SIGINT write a checkpoint at the next step boundary, then raise :class:`TrainingInterrupted`.
    """
    with stop_on_signals() as stop:
        return _train(config, resume=resume, show_progress=show_progress, system=system, accelerator=accelerator,
                      on_log=on_log, stop_after_steps=stop_after_steps, stop=stop)


def _train(config: TrainConfig, *, resume: Path | None, show_progress: bool, system: System | None, accelerator,
           on_log: Callable[[dict], None] | None, stop_after_steps: int | None, stop: StopRequest) -> TrainResult:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = accelerator or make_accelerator(config)
    run_dir = config.run_dir
    state = {"stage": 0, "step": 0, "epoch": 0, "position": 0, "global_step": 0, "skips": {},
             "bad_steps": 0, "results": []}
    resume_dir = None
    if resume is not None:
        resume_dir = ckpt.latest_checkpoint(Path(resume))
        if resume_dir is None:
            raise FileNotFoundError(f"no checkpoint found in {resume}")
        state.update(ckpt.load_trainer_state(resume_dir))
        log.info("resuming from %s (stage %d, step %d)", resume_dir, state["stage"], state["step"])
    scans = scan_stages(config, first_stage=state["stage"])  # fail fast: the data before any model
    set_seed(config.seed)
    system = system or build_system(config, device=accelerator.device)
    model = system.model
    if resume_dir is not None:
        match_checkpoint_dtypes(model, resume_dir / ckpt.WEIGHTS)  # fp32 trained copies stay fp32
        ckpt.load_model_weights(model, resume_dir)
    sharded = sharding.is_sharded(accelerator)
    launch = {"strategy": sharding.strategy_name(accelerator), "processes": accelerator.num_processes,
              "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device)}
    log.info("launch: %s", launch)
    if launch["strategy"] == "deepspeed_zero3":
        raise NotImplementedError("DeepSpeed ZeRO-3 is not supported (checkpoints would hold partitioned "
                                  "weights); shard parameters with FSDP: configs/accelerate/fsdp_*.yaml")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(config_dict(config), indent=1))
        atomic_write_text(run_dir / "launch.json", json.dumps(launch, indent=1))
        if resume_dir is not None:  # steps logged after the checkpoint are run (and logged) again
            truncate_metrics(run_dir, state["global_step"])
    metrics = MetricsLog(run_dir, enabled=accelerator.is_main_process)
    ranks = RankSync(accelerator)
    results = [StageResult(**r) for r in state.pop("results", [])]
    prepared = None
    start_time = time.perf_counter()
    total_steps_done = 0

    # The stage the checkpoint was written in: only there are its RNG states and optimiser restored
    # (state["stage"] moves on as stages finish, so it must not be compared again later).
    resume_stage = state["stage"] if resume_dir is not None else None
    for stage_index, stage in enumerate(config.stages):
        if stage_index < state["stage"]:
            continue
        resuming_here = stage_index == resume_stage
        fresh = not (resuming_here and state["step"] > 0)
        state["stage"] = stage_index
        if not fresh:
            log.info("stage %s: continuing at step %d", stage.name, state["step"])
        if sharded:  # before the optimiser is built: its parameters must be the sharded ones
            sharding.shard_model(accelerator, model, _trained_by(system, config.stages), _trained_by(system, [stage]))
        if config.model.llm_lora is not None:
            # zero adapters are skipped until a stage trains them (or has trained them)
            set_llm_lora_active(system.model.vlm.llm, any("llm" in s.train for s in config.stages[:stage_index + 1]))
        groups = set_trainable(system, stage.train)
        if upcast_trainable(groups, keep_dtype=not config.trainable_fp32):
            log.info("stage %s: half-precision trainable parameters cast to float32", stage.name)
        if accelerator.is_main_process:
            for line in system.describe_trainable(stage.name).splitlines():
                log.info(line)
        lrs = {name: stage.lrs.get(name, stage.lr) for name in groups}
        optimizer = build_optimizer(groups, lrs, stage.weight_decay)
        scan = scans[stage_index]
        dataset = stage_dataset(system, config, stage, samples=scan.samples)
        per_step = stage.batch_size * stage.grad_accum * accelerator.num_processes
        steps_per_epoch = max(1, len(dataset) // per_step)
        total = stage.max_steps or max(1, math.ceil(stage.epochs * len(dataset) / per_step))
        scheduler = build_scheduler(optimizer, total, stage.warmup_ratio, stage.min_lr_ratio)
        if not fresh:
            if not sharded:  # under FSDP: after prepare, into the sharded parameters
                optimizer.load_state_dict(ckpt.load_torch_state(resume_dir / "optimizer.pt"))
            scheduler.load_state_dict(ckpt.load_torch_state(resume_dir / "scheduler.pt"))
        else:
            state.update(step=0, epoch=0, position=0, skips={}, bad_steps=0)
        if resuming_here:
            # each rank continues its own random stream (dropout masks differ across ranks)
            per_rank = state.get("rank_rng") or []
            same_world = len(per_rank) == accelerator.num_processes
            ckpt.set_rng_state(per_rank[accelerator.process_index] if same_world else state["rng"])
        sharding.configure_deepspeed_stage(accelerator, stage_index, stage.batch_size, stage.grad_accum)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        if sharded:
            sharding.after_prepare(prepared)
            if not fresh:
                sharding.load_full_optimizer_state(prepared, _inner(optimizer),
                                                   ckpt.load_torch_state(resume_dir / "optimizer.pt"))
        prepared.train()
        # The norm is taken over the parameters the optimiser updates *after* prepare: FSDP2's root
        # fully_shard replaces the root's parameters (embeddings, projector, adapters, lm_head) with new
        # sharded ones, so the pre-prepare ``groups`` would leave them out of the norm (their stale
        # objects never get a gradient) and clip by a smaller norm than the one-process run.
        clipped = [p for group in _inner(optimizer).param_groups for p in group["params"]]
        skips = SkipCounter()
        skips.load_state_dict(state["skips"])
        if fresh:  # the scan's problems count towards the stage's skips (and max_skip_ratio)
            for problem in scan.problems:
                skips.by_reason[problem.reason] += 1
                skips.examples.setdefault(problem.reason, [])
                if len(skips.examples[problem.reason]) < SkipCounter.EXAMPLES:
                    skips.examples[problem.reason].append(problem.id)
        collate = Collator(system.pad_token_id, padding_side="right", image_size=system.image_size)
        stage_start = time.perf_counter()
        window: list[dict] = []
        first: dict = {}
        last: dict = {}
        stopped_early = False
        bar = tqdm(total=total, initial=state["step"], desc=f"stage {stage.name}", unit="step",
                   disable=not (show_progress and accelerator.is_main_process), dynamic_ncols=True)
        step_records: list[dict] = []
        pending: list[dict] = []  # micro-batches of the optimiser step being gathered

        def save(tag: str) -> None:
            accelerator.wait_for_everyone()
            rank_rng = ranks.gather(ckpt.rng_state()) if ranks.active else []
            if sharded:  # consolidated on rank 0; every rank takes part in the gathers
                weights = sharding.full_weights(prepared)
                optimizer_state = _StateDict(sharding.full_optimizer_state(prepared, _inner(optimizer)))
            if accelerator.is_main_process:
                if not sharded:
                    weights, optimizer_state = system.checkpoint_weights(), _inner(optimizer)
                weights, weights_meta = system.resumable_weights(weights)
                trainer_state = {**state, "results": [r.__dict__ for r in results],
                                 "skips": skips.state_dict(), "rank_rng": rank_rng}
                folder = ckpt.save_checkpoint(run_dir / "checkpoints" / tag, weights=weights,
                                              optimizer=optimizer_state, scheduler=scheduler,
                                              trainer_state=trainer_state, config=config_dict(config),
                                              weights_meta=weights_meta)
                ckpt.prune_checkpoints(run_dir, config.keep_checkpoints, protect=[folder])
            accelerator.wait_for_everyone()

        done = state["step"] >= total
        while not done:
            if stage.group_by_modality_length:
                # LLaVA's modality-grouped batches; each modality's last partial step is kept.
                batches = ModalityLengthGroupedBatchSampler(
                    dataset.modality_lengths(), stage.batch_size, config.seed + stage_index, state["epoch"],
                    state["position"], rank=accelerator.process_index, world=accelerator.num_processes)
                loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                    num_workers=config.num_workers, persistent_workers=False,
                                    worker_init_fn=ignore_stop_signals,
                                    generator=torch.Generator().manual_seed(config.seed))
            else:
                sampler = ResumableSampler(len(dataset), config.seed + stage_index, state["epoch"],
                                           state["position"], rank=accelerator.process_index,
                                           world=accelerator.num_processes)
                loader = DataLoader(dataset, batch_size=stage.batch_size, sampler=sampler, collate_fn=collate,
                                    num_workers=config.num_workers, drop_last=True, persistent_workers=False,
                                    worker_init_fn=ignore_stop_signals,
                                    generator=torch.Generator().manual_seed(config.seed))
            for batch in loader:
                state["position"] += stage.batch_size * accelerator.num_processes
                skips.update(batch)
                # Agreed across ranks: a rank with an empty batch makes every rank skip it, so the
                # gradient all-reduces keep pairing the same micro-batches (movekd.train.distributed).
                if ranks.any(batch["input_ids"].shape[0] == 0):
                    continue
                pending.append(batch)
                if len(pending) < stage.grad_accum:
                    continue
                # One optimiser step over the pending micro-batches: every loss term is normalised by
                # its item count over all of them and over all ranks (movekd.train.distributed).
                micro_counts = [batch_item_counts(b, config.kd) for b in pending]
                totals = step_item_totals(ranks, micro_counts)
                step, pending = pending, []
                for index, (batch, counts) in enumerate(zip(step, micro_counts)):
                    last = index == len(step) - 1
                    context = accelerator.no_sync(prepared) if not last else nullcontext()
                    with context, accelerator.autocast():
                        losses = prepared(
                            images=batch["images"].to(accelerator.device),
                            input_ids=batch["input_ids"].to(accelerator.device),
                            attention_mask=batch["attention_mask"].to(accelerator.device),
                            labels=batch["labels"].to(accelerator.device),
                            has_image=batch["has_image"].to(accelerator.device),
                            image_keys=[dataset.image_key(i) for i in batch["indices"]],
                            use_kd=stage.kd,
                            segment_ids=(batch["segment_ids"].to(accelerator.device)
                                         if "segment_ids" in batch else None),
                        )
                        losses, finite = agree_on_step(ranks, losses, config.kd.lambda_kd, config.kd.lambda_balance,
                                                       counts, totals)
                        if not finite:  # on some rank: every rank drops this optimiser step
                            break
                        accelerator.backward(losses.total)
                    step_records.append(losses.scalars())
                if not finite:
                    state["bad_steps"] += 1
                    optimizer.zero_grad(set_to_none=True)
                    sharding.forget_routed_experts(prepared)
                    step_records = []
                    log.warning("non-finite loss at stage %s step %d (%s); step skipped",
                                stage.name, state["step"], losses.scalars())
                    if state["bad_steps"] >= MAX_BAD_STEPS:
                        save(f"nonfinite-step{state['global_step']}")
                        raise NonFiniteLossError(
                            f"{MAX_BAD_STEPS} non-finite losses in stage {stage.name}; last terms "
                            f"{losses.scalars()}. A checkpoint before the failure is in {run_dir}/checkpoints; "
                            "try a lower learning rate or precision=fp32")
                    continue
                if sharded:  # before the norm: FSDP2 gave the unrouted experts zeros, not None
                    sharding.drop_unrouted_expert_grads(prepared, ranks)
                accelerator.clip_grad_norm_(clipped, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["global_step"] += 1
                state["bad_steps"] = 0
                total_steps_done += 1
                bar.update()
                record = global_record(ranks, step_record(step_records))
                step_records = []
                window.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", **({"kd": f"{record['kd']:.3f}"} if "kd" in record else {}))
                if state["step"] % config.log_every == 0 or state["step"] == total:
                    mean = _mean(window)
                    window = []
                    first = first or mean
                    last = mean
                    entry = {"stage": stage.name, "step": state["step"], "global_step": state["global_step"],
                             "lr": scheduler.get_last_lr()[0], "elapsed": round(time.perf_counter() - stage_start, 2),
                             "skipped": skips.total, **{f"skipped_{k}": n for k, n in sorted(skips.by_reason.items())},
                             **mean}
                    metrics.write(entry)
                    if on_log:
                        on_log(entry)
                out_of_time = stage.max_minutes is not None and (time.perf_counter() - stage_start) > 60 * stage.max_minutes
                stop_now = stop_after_steps is not None and total_steps_done >= stop_after_steps
                signalled, runtime_skips = _stop_checks(accelerator, stop, skips.total - len(scan.problems))
                drawn = state["epoch"] * len(dataset) + state["position"]
                check_skip_budget(skips.state_dict()["counts"] if accelerator.num_processes == 1
                                  else {"all kinds, all processes": runtime_skips + len(scan.problems)},
                                  source=scan.source, total=scan.total, drawn=drawn + len(scan.problems),
                                  max_skip_ratio=stage.max_skip_ratio, strict=stage.strict)
                if signalled:
                    tag = f"step-{state['global_step']:07d}"
                    save(tag)
                    bar.close()
                    metrics.close()
                    name = signal.Signals(stop.signum).name if stop.signum else "a stop signal"
                    raise TrainingInterrupted(
                        f"stopped by {name} at stage {stage.name} step {state['step']}; checkpoint written to "
                        f"{run_dir / 'checkpoints' / tag}. Continue exactly where it stopped with: movekd train "
                        f"<the same config> --resume {run_dir}", stop.signum or signal.SIGTERM)
                if config.save_every and state["step"] % config.save_every == 0 or stop_now:
                    save(f"step-{state['global_step']:07d}")
                if stop_now:
                    bar.close()
                    metrics.close()
                    if sharded:
                        _consolidate(accelerator, system, prepared)
                    return TrainResult(run_dir, run_dir / "final", results, time.perf_counter() - start_time, system)
                if state["step"] >= total or out_of_time:
                    stopped_early = out_of_time and state["step"] < total
                    done = True
                    break
            else:
                state["epoch"] += 1
                state["position"] = 0
        bar.close()
        if window:
            mean = _mean(window)
            first = first or mean
            last = mean
        if stopped_early:
            log.info("stage %s stopped at its time limit after %d of %d steps", stage.name, state["step"], total)
        results.append(StageResult(stage.name, state["step"], round(time.perf_counter() - stage_start, 2),
                                   first, last, stopped_early, skips.total, state["bad_steps"],
                                   dict(skips.by_reason)))
        if skips.total:
            log.warning("stage %s: %d samples skipped (%s; first ids: %s)", stage.name, skips.total,
                        dict(skips.by_reason), skips.examples)
        state.update(stage=stage_index + 1, step=0, epoch=0, position=0, skips={}, bad_steps=0)
        save(f"stage-{stage_index}-{stage.name}")
        accelerator.free_memory()
        model = system.model

    metrics.close()
    final = run_dir / "final"
    if sharded and prepared is not None:
        _consolidate(accelerator, system, prepared)
    if accelerator.is_main_process:
        system.save_inference(final, extra={"train_config": config_dict(config)})
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, final, results, time.perf_counter() - start_time, system)
