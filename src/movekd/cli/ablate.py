"""``movekd ablate CONFIG --out DIR [--seeds 3] [--rows a,b,...]``: the paper's ablations, resumable."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate",
        help="the paper's ablation ladder (Tables 2-5) at equal steps over seeds, resumable",
        description="Train and evaluate each ROW x seed of the ablation (config deltas: movekd.ablate.ladder) in "
                    "DIR/rows/ROW/seed-S, with the config's stages and steps for every row; finished cells are "
                    "skipped on a re-run. Writes DIR/ablation.md (mean ± std over seeds) and DIR/ablation.json. "
                    "Set teacher_cache_dir (movekd cache) to read the teachers from disk.",
    )
    p.add_argument("config", help="YAML path or preset name (the 'full' row)")
    p.add_argument("--out", required=True, help="ablation folder")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per row (default 3)")
    p.add_argument("--rows", help="comma-separated rows (default: the standard ladder; --list shows all)")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells run at once, each in its own process with threads/jobs threads (default 1; "
                        "2 on a 2-core CPU: 1.6x the throughput measured on the demo)")
    p.add_argument("--no-estimate", dest="estimate", action="store_false",
                   help="skip timing a few steps for the expected training time printed before starting")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every row (repeatable)")
    p.add_argument("--probe", default="easyvqa-colour", help="probe dataset for each trained student ('none': skip)")
    p.add_argument("--probe-images", default=(300, 200), type=_image_counts, metavar="TRAIN,TEST",
                   help="probe train,test images (default 300,200)")
    p.set_defaults(func=_run)


def _image_counts(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected two positive integers TRAIN,TEST, got {text!r}")
    return int(parts[0]), int(parts[1])


def _run(args: argparse.Namespace) -> int:
    from movekd.ablate import DEFAULT_ROWS, ROWS, run_ablation
    from movekd.config.loader import apply_overrides, load_yaml
    from movekd.train.config import load_config, resolve_preset

    if args.list:
        for name, (text, _) in ROWS.items():
            print(f"{name:<18} {text}{'' if name in DEFAULT_ROWS else '  (not in the default ladder)'}")
        return 0
    data = apply_overrides(load_yaml(resolve_preset(args.config)), args.overrides)
    load_config(data)  # validate once, with the key named on error
    rows = args.rows.split(",") if args.rows else list(DEFAULT_ROWS)
    table = run_ablation(data, args.out, rows=rows, seeds=list(range(args.seeds)),
                         probe_dataset=None if args.probe == "none" else args.probe,
                         probe_images=args.probe_images, jobs=args.jobs, estimate=args.estimate,
                         on_event=lambda m: print(m, file=sys.stderr))
    from movekd.ablate import format_markdown

    print(format_markdown(table), end="")
    return 0
