"""``vlmerge study``: reproduce a paper's experiments on the embedded world and write a report.

    vlmerge study --preset tiny --out runs/study                  # the merging paper (Tables 1-3, 5; Figs 3-4)
    vlmerge study --preset tiny --out runs/study --only table2,table5 --seeds 0,1,2
    vlmerge study unival --preset tiny --out runs/unival          # UnIVAL's task-model merging (Figs 2-3, Table 20)

Re-running a command with the same ``--out`` resumes: finished cells (pre-training runs, merges, fine-tunes)
are loaded from ``OUT/cells`` instead of recomputed. ``--out`` is locked while a study runs: a second
``vlmerge study`` on it fails at once.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli import MAX_COUNT

EXPERIMENTS = ("merging", "unival")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds expects comma-separated integers like 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds expects distinct comma-separated integers like 0,1,2, got {text!r}")
    if not all(0 <= s <= MAX_COUNT for s in seeds):
        raise ValueError(f"--seeds expects integers from 0 to {MAX_COUNT}, got {text!r}")
    return seeds


def parse_only(text: str | None) -> list[str] | None:
    """``--only``: None (every part) when the flag is not given; else a non-empty list of known parts."""
    from .runner import PARTS

    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = sorted({p for p in parts if p not in PARTS})
    if not parts or bad:
        raise ValueError(f"--only expects comma-separated parts from {', '.join(PARTS)}, got {text!r}")
    return list(dict.fromkeys(parts))


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    seeds = parse_seeds(args.seeds)
    if args.experiment == "unival":
        if args.only is not None:
            raise ValueError("--only applies to the merging study; the unival study always runs its three scenarios")
        from ..files import check_run_folder, locked_run_folder
        from .unival import load_unival_config, run_unival

        load_unival_config(args.preset, args.set)  # a bad preset or --set is refused before --out is created
        out = check_run_folder(args.out, "cells", "study")
        with locked_run_folder(out, "study folder"):
            report = run_unival(args.preset, out, seeds=seeds, overrides=args.set, progress=not args.no_progress)
    else:
        from .runner import run_study

        report = run_study(args.preset, args.out, only=parse_only(args.only), seeds=seeds, overrides=args.set,
                           progress=not args.no_progress)
    print(Path(report))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "study", help="reproduce the merging paper's (or UnIVAL's) experiments and write a report with plots",
        description="Run every cell of a study preset (configs/study/<preset>.yaml, or configs/unival/ for "
                    "'unival') and write OUT/report.md, OUT/results.json and PNG plots. Resumable.",
    )
    p.add_argument("experiment", nargs="?", choices=EXPERIMENTS, default="merging",
                   help="which paper's experiments (default: merging)")
    p.add_argument("--preset", default="tiny", help="micro | tiny (CPU, <= 15 min) | small (one GPU) | paper | a YAML")
    p.add_argument("--out", required=True, help="study directory (re-use it to resume)")
    p.add_argument("--only", default=None, help="comma-separated parts: table1,figure3,table2,figure4,table3,table5 "
                   "(default: all)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; several give mean ± std (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. --set steps=400 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log every cell and training step")
    p.set_defaults(func=_run)
