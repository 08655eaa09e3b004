"""``movekd probe MODEL... --dataset NAME``: linear-probe and kNN accuracy of frozen encoders."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "probe",
        help="linear-probe and kNN accuracy of teachers, students and trained runs",
        description="Mean-pooled frozen features of each MODEL, then a multinomial logistic regression (L2 chosen "
                    "on a fixed hold-out) and a cosine kNN, on a fixed seeded train/test split. MODEL: a teacher "
                    "preset (movekd teachers), student:PRESET (the student before distillation), or a bundle / "
                    "run folder (its trained student encoder).",
    )
    p.add_argument("models", nargs="*", metavar="MODEL")
    p.add_argument("--dataset", default="easyvqa-colour", help="probe dataset (--list shows them)")
    p.add_argument("--list", action="store_true", help="list the probe datasets and exit")
    p.add_argument("--train", type=int, default=500, help="training images (default 500; 0 = all)")
    p.add_argument("--test", type=int, default=250, help="test images (default 250; 0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-k", type=int, default=20, help="neighbours of the kNN probe (default 20)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from movekd.errors import OptionError
    from movekd.probe import format_table, list_probe_datasets, probe

    if args.list:
        for name, text in list_probe_datasets().items():
            print(f"{name:<16} {text}")
        return 0
    if not args.models:
        raise OptionError("probe: give at least one MODEL (a teacher preset, student:PRESET, or a run folder)")
    last = {}

    def progress(model: str, done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            print(f"\r{model}: {done}/{total} images", end="\n" if done == total else "", file=sys.stderr)
        last[model] = done

    result = probe(args.models, args.dataset, n_train=args.train or None, n_test=args.test or None,
                   seed=args.seed, k=args.k, batch_size=args.batch_size, progress=progress)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
