"""``movekd demo [--preset demo|demo_next] [--out DIR] [--compare]``: the embedded default, end to end, offline."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="MoVE-KD end to end on the embedded default (easy-vqa, real models, offline)",
        description="Prepare the offline assets, train both stages of the demo preset with MoVE-KD, "
        "evaluate the student-only VLM on 500 held-out easy-vqa questions, print a table and write "
        "OUT/results.json. --compare also trains the LLaVA-1.5 recipe (no KD, no MoLE, frozen encoder).")
    parser.add_argument("--out", default=None, help="output folder (default runs/PRESET)")
    parser.add_argument("--preset", default="demo", choices=["demo", "demo_next"],
                        help="demo: LLaVA-1.5-style (default); demo_next: LLaVA-NeXT AnyRes tiling on easy-vqa "
                        "images placed on larger canvases")
    parser.add_argument("--compare", action="store_true", help="also train and evaluate the no-KD baseline")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the demo preset (repeatable)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from movekd.demo import format_results, run_demo

    out = args.out or f"runs/{args.preset}"
    results = run_demo(out, compare=args.compare, overrides=args.overrides, show_progress=not args.no_progress,
                       preset=args.preset)
    print(format_results(results))
    print(f"results: {out}/results.json")
    return 0
