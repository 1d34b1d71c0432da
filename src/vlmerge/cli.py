"""The ``vlmerge`` command line: each subpackage registers its own subcommands."""

from __future__ import annotations

import argparse
import errno
import importlib
import math
import os
import pickle
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

import yaml

from . import __version__
from .files import final_name

# Modules exposing ``register(subparsers)``, in the order they appear in ``vlmerge --help``.
COMMAND_MODULES = (
    "vlmerge.data.commands",
    "vlmerge.models.commands",
    "vlmerge.pretrain.commands",
    "vlmerge.merge.commands",
    "vlmerge.metrics.commands",
    "vlmerge.finetune.commands",
    "vlmerge.study.commands",
)


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors in one line (``vlmerge merge: error: argument --n: ... (see --help)``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vlmerge",
        description="Merge modality-specific vision-language transformers into one modality-agnostic model.",
    )
    parser.add_argument("--version", action="version", version=f"vlmerge {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also: VLMERGE_DEBUG=1)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


MAX_COUNT = 2**31 - 1  # counts, sizes and seeds above this overflow index types (torch, numpy) downstream


def count(minimum: int = 1, maximum: int = MAX_COUNT) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[minimum, maximum]`` (``--n -1`` and ``--batches 1e20`` are refused
    by argparse, in one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected an integer from {minimum} to {maximum}, got {text!r}")
        return value

    parse.__name__ = f"integer in [{minimum}, {maximum}]"
    return parse


def finite_float(text: str) -> float:
    """An argparse ``type``: a finite number (``nan``, ``inf`` and ``1e400`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# Exit codes: 2 = bad input (a file, key, flag or value the user gave), 1 = the environment failed (disk
# full, read-only, permissions, a lock held) or an internal error. Bad input is any of these types; a
# RecursionError is what json/yaml raise on absurdly nested files.
BAD_INPUT = (
    ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
    yaml.YAMLError, pickle.UnpicklingError, RecursionError,
)


# OSError numbers that mean the path the user gave is bad, not that the environment failed.
BAD_PATH_ERRNOS = (errno.ENAMETOOLONG, errno.ELOOP)


def error_message(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for an exception raised by a command."""
    if isinstance(e, BAD_INPUT) or (isinstance(e, OSError) and e.errno in BAD_PATH_ERRNOS):
        if isinstance(e, KeyError) and e.args:
            msg = str(e.args[0])
        elif isinstance(e, RecursionError):
            msg = "input nested too deeply to read"
        elif isinstance(e, OSError) and e.filename is not None and e.strerror:
            msg = f"{final_name(e.filename)}: {e.strerror}"
        else:
            msg = str(e)
        return msg, 2
    if isinstance(e, ArithmeticError):  # a run that diverged (NaN loss): not a bug, not bad input as such
        return str(e), 1
    if isinstance(e, OSError):
        where = f"{final_name(e.filename)}: " if e.filename is not None else ""
        what = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            what = "no space left on device"
        return f"{where}{what}", 1
    return f"internal error {type(e).__name__}: {e} (run with --debug for the traceback)", 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("VLMERGE_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"vlmerge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        msg, code = error_message(e)
        one_line = " ".join(str(msg).split())
        sub = getattr(args, f"{args.command}_command", None)  # "model info", "data cache": as usage errors say
        print(f"vlmerge {args.command}{f' {sub}' if sub else ''}: error: {one_line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
