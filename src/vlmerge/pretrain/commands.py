"""``vlmerge pretrain --config configs/<preset>.yaml --out DIR [--set key=value ...]``.

The same command runs on one CPU process, N CPU processes or N GPUs::

    vlmerge pretrain --config configs/tiny.yaml --out runs/tiny
    torchrun --nproc_per_node 8 -m vlmerge.pretrain --config configs/paper.yaml --out runs/paper

Re-running the command with the same ``--out`` resumes from the last checkpoint; while a run is going, its
``--out`` is locked (a second ``vlmerge pretrain`` on it fails at once).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..cli import count
from .config import load_config
from .dist import rank
from .engine import pretrain


def _run(args: argparse.Namespace) -> int:
    """Read and check the config and the flags (nothing is written before that), then run; the run folder
    is locked for the whole run (:func:`~.engine.pretrain`): a second run on it fails at once, exit code 1."""
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be a step >= 1, got {args.stop_after}")
    config = load_config(args.config, args.set)
    path = pretrain(config, args.out, stop_after=args.stop_after, progress=not args.no_progress)
    if rank() == 0:
        print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pre-train a VLMo-family model (recipes: scratch, seed, stagewise); resumable",
        description="Pre-train with ITC + ITM (global hard negatives) + MLM, optionally after seed or stagewise "
                    "stages. Writes OUT/final (the model), OUT/w0 (weights at the start of VL pre-training), "
                    "OUT/metrics.jsonl and OUT/retrieval.json. Run under torchrun for several processes.",
    )
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/micro.yaml, tiny, small, paper")
    p.add_argument("--out", required=True, help="run directory (re-use it to resume)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 --set recipe.name=seed (repeatable)")
    p.add_argument("--stop-after", type=count(0), default=None, metavar="STEP",
                   help="checkpoint and exit once this global step is reached (resume later with the same --out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlmerge.pretrain ...``: the ``pretrain`` command on its own (for ``torchrun -m``)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="vlmerge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pretrain", *(sys.argv[1:] if argv is None else argv)])
    from ..cli import BAD_INPUT, error_message

    try:
        return args.func(args)
    except (*BAD_INPUT, OSError) as e:  # exit codes and one-line messages as ``vlmerge pretrain``'s
        msg, code = error_message(e)
        print(f"vlmerge pretrain: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return code
