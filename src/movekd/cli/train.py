"""``movekd train CONFIG [--set key=value ...] [--resume DIR] [--dry-run]``."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a MoVE-KD VLM (both stages) from a YAML config or preset",
        description="Train a MoVE-KD VLM: CONFIG is a YAML file or a bundled preset (demo, "
        "paper_llava15_7b_v1.0, paper_llava15_7b_v1.1). Checkpoints go to OUTPUT_DIR/checkpoints, the "
        "inference bundle (student + projector + LLM) to OUTPUT_DIR/final.")
    parser.add_argument("config", help="YAML path or preset name")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set stages.0.max_steps=10 (repeatable)")
    parser.add_argument("--resume", metavar="DIR", help="continue from a checkpoint or run folder")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the whole model on the meta device; print parameters per stage, the "
                        "FLOPs of one training step and the memory per device (no weights, no data)")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    parser.add_argument("--devices", type=int, default=1, metavar="N",
                        help="with --dry-run: devices (GPUs) of the memory plan (default 1)")
    parser.add_argument("--strategy", choices=["ddp", "fsdp", "zero2", "zero3"],
                        help="with --dry-run: strategy of the memory plan (default: the config's `strategy`)")
    parser.add_argument("--device-memory", type=float, default=80.0, metavar="GB",
                        help="with --dry-run: memory of one device, in GB (default 80)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--strict", action="store_true",
                        help="refuse data files with any bad sample (sets strict: true on every stage); by "
                        "default bad samples are skipped and counted, up to max_skip_ratio")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from movekd.train.config import load_config

    overrides = list(args.overrides)
    if args.strict:
        overrides += [f"stages.{i}.strict=true" for i in range(len(load_config(args.config, overrides).stages))]
    config = load_config(args.config, overrides)
    if args.dry_run:
        from movekd.train.dry_run import dry_run, format_dry_run

        if args.devices < 1:
            print(f"error: --devices must be >= 1, got {args.devices}", file=sys.stderr)
            return 2
        report = dry_run(config, devices=args.devices, strategy=args.strategy,
                         device_memory_gb=args.device_memory)
        print(json.dumps(report, indent=1) if args.json else format_dry_run(report))
        return 0
    from movekd.train.loop import train

    result = train(config, resume=args.resume, show_progress=not args.no_progress)
    for stage in result.stages:
        skipped = ""
        if stage.skipped_samples:
            kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(stage.skipped_by_reason.items()))
            skipped = f", {stage.skipped_samples} samples skipped ({kinds})"
        print(f"stage {stage.name}: {stage.steps} steps in {stage.seconds / 60:.1f} min, "
              f"loss {stage.first.get('loss', float('nan')):.3f} → {stage.last.get('loss', float('nan')):.3f}"
              f"{skipped}")
    print(f"inference bundle: {result.final_dir}")
    return 0
