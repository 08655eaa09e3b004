"""Command line: ``movekd SUBCOMMAND ...``.

Each subcommand lives in its own module of this package, which defines ``register(subparsers)``;
``register`` adds the parser and sets ``func`` to a function ``(args) -> int`` that calls one library
function and prints its result. The library itself never prints and never reads ``sys.argv``.

Errors are handled here, once, for every subcommand: a user error (:class:`movekd.errors.UserError`,
or a file that does not exist or cannot be read) prints ``movekd: error: ...`` and exits non-zero
without a traceback; ``movekd --debug ...`` re-raises it with its traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from movekd.errors import UserError

# Order = order in `movekd --help`.
SUBCOMMANDS = ["demo", "train", "eval", "chat", "export", "import-official", "assets", "teachers", "probe", "viz", "cache", "ablate", "bench"]


def build_parser() -> argparse.ArgumentParser:
    from movekd import __version__

    parser = argparse.ArgumentParser(
        prog="movekd",
        description="MoVE-KD: distil several vision encoders into one student encoder of a VLM.",
    )
    parser.add_argument("--version", action="version", version=f"movekd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of errors in your input too (they print one line otherwise)")
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
        if args.debug:
            raise
        print("movekd: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        code = user_error_exit_code(error)
        if code is None or args.debug:
            raise
        print(f"movekd: error: {describe_user_error(error)}", file=sys.stderr)
        return code


# Builtin exceptions that, reaching the CLI, mean the user pointed at something that is not there
# or not readable (the message names the path), or a full disk: not bugs in movekd.
_USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def user_error_exit_code(error: BaseException) -> int | None:
    """The exit code for a user error, or None for a bug (which keeps its traceback)."""
    if isinstance(error, UserError):
        return error.exit_code
    if isinstance(error, _USER_OS_ERRORS) or (isinstance(error, OSError) and error.errno == errno.ENOSPC):
        return 2
    return None


def describe_user_error(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, UserError) and error.filename is not None:
        return f"{error.strerror or error}: {error.filename}"
    return str(error)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
