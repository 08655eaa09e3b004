"""``movekd bench WHICH``: run one benchmark and print its figures (a table, or JSON with ``--json``).

Each benchmark is a library function returning a dict; ``BENCHES`` maps its name to a runner that
calls it with the parsed options and a formatter that turns the dict into the printed table.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _precision_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ("fp32", "bf16")]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"precision must be fp32, bf16 or both comma-separated, got {text!r}")
    return values


def _mode_list(text: str) -> list[str]:
    modes = ("inference", "train", "train_frozen_base")
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in modes for v in values):
        raise argparse.ArgumentTypeError(f"mode must be among {', '.join(modes)} (comma-separated), got {text!r}")
    return values


def _single_precision(args: argparse.Namespace) -> str:
    if args.precision is None:
        return "fp32"
    if len(args.precision) != 1:
        raise SystemExit(f"movekd bench {args.which}: --precision takes one value here, got {','.join(args.precision)}")
    return args.precision[0]


def _bench_mole(args: argparse.Namespace) -> dict:
    from movekd.bench.mole import run_mole_bench

    kwargs = {"tokens": args.tokens, "batches": args.batch, "repeats": args.repeats, "threads": args.threads,
              "precisions": args.precision, "modes": args.mode}
    return run_mole_bench(**{k: v for k, v in kwargs.items() if v is not None})


def _format_mole(result: dict) -> str:
    from movekd.bench.mole import format_mole_bench

    return format_mole_bench(result)


def _plot_mole(result: dict, path: str) -> None:
    from movekd.bench.mole import plot_mole_bench

    plot_mole_bench(result, path)


def _bench_efficiency(args: argparse.Namespace) -> dict:
    from movekd.bench.efficiency import TEXT_TOKENS, run_efficiency_bench

    embedded = None if args.embedded == "none" else args.embedded
    return run_efficiency_bench(args.paper, embedded, text_tokens=args.text_tokens or TEXT_TOKENS,
                                repeats=args.repeats or 5, threads=args.threads,
                                precision=_single_precision(args))


def _format_efficiency(result: dict) -> str:
    from movekd.bench.efficiency import format_efficiency

    return format_efficiency(result)


def _plot_efficiency(result: dict, path: str) -> None:
    from movekd.bench.efficiency import plot_efficiency

    plot_efficiency(result, path)


def _bench_train(args: argparse.Namespace) -> dict:
    from movekd.bench.train_step import run_train_bench

    return run_train_bench(args.config or "demo", steps=args.repeats or 4, threads=args.threads,
                           overrides=args.set)


def _format_train(result: dict) -> str:
    from movekd.bench.train_step import format_train_bench

    return format_train_bench(result)


def _plot_train(result: dict, path: str) -> None:
    from movekd.bench.train_step import plot_train_bench

    plot_train_bench(result, path)


# name -> (runner, formatter, plotter or None)
BENCHES: dict[str, tuple[Callable[[argparse.Namespace], dict], Callable[[dict], str], Callable | None]] = {
    "mole": (_bench_mole, _format_mole, _plot_mole),
    "efficiency": (_bench_efficiency, _format_efficiency, _plot_efficiency),
    "train": (_bench_train, _format_train, _plot_train),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure costs (MoLE FFN overhead, single student vs multi-encoder VLM) and print ratios",
        description="Run a benchmark in this process and print its figures. 'mole': plain FFN vs MoLE FFN "
        "at CLIP ViT-L shapes (paper preset: 3 experts, rank 32): our LoRA path, our folded experts and "
        "a plain per-expert index-and-scatter layer (the official approach), for inference, a training "
        "step with all weights trainable and one with the base frozen, at each batch and precision; "
        "medians of interleaved runs as ratios to the plain FFN, and the folded path's extra memory. 'efficiency': the MoVE-KD student VLM against the multi-encoder VLM it "
        "replaces (every teacher run and concatenated on channels, Eagle-style): FLOPs, parameters and "
        "memory of one prefill counted at paper scale on the meta device, and latency and memory "
        "measured at the embedded scale on this CPU; ratios are multi / single. 'train': each stage's "
        "training step split into data, teachers, student, LLM forward, the rest of the forward, backward "
        "and optimiser, without KD, with online teachers and with cached teachers; the step's FLOPs and "
        "its rate against the fp32 and bf16 matmul rates measured in the same run.",
    )
    parser.add_argument("which", choices=sorted(BENCHES), help="benchmark to run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="PNG", default=None, help="also write a plot (PNG)")
    parser.add_argument("--tokens", type=int, default=None, help="mole: tokens per image (default 577: CLIP-L/14 at 336)")
    parser.add_argument("--batch", type=_int_list, default=None, metavar="N[,N...]",
                        help="mole: images per step, comma-separated for several (default 1,8)")
    parser.add_argument("--mode", type=_mode_list, default=None, metavar="MODE[,MODE...]",
                        help="mole: inference, train, train_frozen_base, comma-separated (default all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per case (train: steps per stage and mode); the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: current setting)")
    parser.add_argument("--precision", type=_precision_list, default=None, metavar="fp32|bf16[,...]",
                        help="run every timed case in fp32 or under bf16 autocast (efficiency: default fp32; "
                        "mole: comma-separated for both, default fp32,bf16)")
    parser.add_argument("--paper", default="paper_llava15_7b_v1.0",
                        help="efficiency: preset counted at paper scale (default paper_llava15_7b_v1.0)")
    parser.add_argument("--embedded", default="demo",
                        help="efficiency: preset measured on this CPU, or 'none' (default demo)")
    parser.add_argument("--config", default=None, help="train: preset or YAML to time (default demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="train: override a config value (repeatable)")
    parser.add_argument("--text-tokens", type=int, default=None, help="efficiency: prompt tokens after the image (64)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    runner, formatter, plotter = BENCHES[args.which]
    if args.plot and plotter is None:
        raise SystemExit(f"movekd bench {args.which}: --plot is not available for this benchmark")
    result = runner(args)
    if args.plot:
        plotter(result, args.plot)
    print(json.dumps(result, indent=1) if args.json else formatter(result))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0
