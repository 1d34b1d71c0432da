"""The ``vlmerge`` command line: each subpackage registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmerge",
        description="Merge modality-specific vision-language transformers into one modality-agnostic model.",
    )
    parser.add_argument("--version", action="version", version=f"vlmerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"vlmerge {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
