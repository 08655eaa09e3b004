"""``movekd bench WHICH``: run one benchmark and print its figures (a table, or JSON with ``--json``).

Each benchmark is a library function returning a dict; ``BENCHES`` maps its name to a runner that
calls it with the parsed options. Add ``efficiency``, ``train``, ... there.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable


def _bench_mole(args: argparse.Namespace) -> dict:
    from movekd.bench.mole import run_mole_bench

    kwargs = {"tokens": args.tokens, "batch": args.batch, "repeats": args.repeats, "threads": args.threads,
              "precision": args.precision}
    return run_mole_bench(**{k: v for k, v in kwargs.items() if v is not None})


BENCHES: dict[str, Callable[[argparse.Namespace], dict]] = {"mole": _bench_mole}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure costs (MoLE FFN overhead, ...) and print ratios",
        description="Run a benchmark in this process and print its figures. 'mole': plain FFN vs MoLE FFN "
        "at CLIP ViT-L shapes (inference with the grouped and the folded path, training step with all "
        "weights trainable, training step with the base frozen); medians of interleaved runs and "
        "mole/plain ratios.",
    )
    parser.add_argument("which", choices=sorted(BENCHES), help="benchmark to run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per image (default 577: CLIP-L/14 at 336)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: current setting)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="run every case in fp32 or under bf16 autocast (default fp32)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    result = BENCHES[args.which](args)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(" ".join(f"{k}={v}" for k, v in result.get("config", {}).items()))
    seconds, fastest = result.get("seconds", {}), result.get("min_seconds", {})
    if seconds:
        print(f"{'case':<20}{'plain ms':>10}{'mole ms':>10}{'ratio':>8}{'min ratio':>11}")
        for mode, pair in seconds.items():
            best = fastest.get(mode)
            best_ratio = f"{best['mole'] / best['plain']:.3f}" if best else "-"
            print(f"{mode:<20}{pair['plain'] * 1e3:>10.1f}{pair['mole'] * 1e3:>10.1f}"
                  f"{pair['mole'] / pair['plain']:>8.3f}{best_ratio:>11}")
    for key, value in result.items():
        if key not in ("config", "seconds", "min_seconds", "ratio", "min_ratio"):
            print(f"{key}: {value}")
    return 0
