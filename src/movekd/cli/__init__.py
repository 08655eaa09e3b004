"""Command line: ``movekd SUBCOMMAND ...``.

Each subcommand lives in its own module of this package, which defines ``register(subparsers)``;
``register`` adds the parser and sets ``func`` to a function ``(args) -> int`` that calls one library
function and prints its result. The library itself never prints and never reads ``sys.argv``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Order = order in `movekd --help`.
SUBCOMMANDS = ["demo", "train", "eval", "chat", "export", "import-official", "assets", "teachers", "bench"]


def build_parser() -> argparse.ArgumentParser:
    from movekd import __version__

    parser = argparse.ArgumentParser(
        prog="movekd",
        description="MoVE-KD: distil several vision encoders into one student encoder of a VLM.",
    )
    parser.add_argument("--version", action="version", version=f"movekd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"movekd.cli.{name.replace('-', '_')}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
