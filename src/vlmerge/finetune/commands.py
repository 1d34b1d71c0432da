"""``vlmerge finetune TASK ...`` and ``vlmerge eval TASK CKPT ...``.

    vlmerge finetune vqa --init runs/pt/final --out runs/ft/vqa [--config my.yaml] [--set lr=1e-4 ...]
    vlmerge finetune cls --init CKPT --out DIR --data-format imagefolder --data-root ~/imagenet-mini
    vlmerge eval retrieval runs/pt/final --split ood            # zero-shot retrieval of a pre-trained model
    vlmerge eval vqa runs/ft/vqa --json                          # JSON on stdout instead of the table

Each prints its metrics next to the baseline (chance, or the best constant answer) and writes JSON:
``finetune`` to ``OUT/metrics.json``; ``eval`` to ``--out`` (default ``CKPT/eval/{task}-{split}.json``).
Neither replaces an existing ``--out`` without ``--overwrite``, nor writes into (or over) what it reads.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ..cli import count
from ..files import guard_output_file
from ..models.checkpoint import atomic_write_json
from .config import DATA_FORMATS
from .tasks import task_names


def format_metrics(metrics: dict[str, Any]) -> str:
    """A two-column-plus-baseline plain-text table of the scalar metrics."""
    base = metrics.get("baseline", {}) if isinstance(metrics.get("baseline"), dict) else {}
    lines = [f"{metrics.get('task', '?')} on {metrics.get('split', '?')}"
             + (f" (baseline: {base['kind']})" if "kind" in base else ""),
             f"{'metric':<12} {'value':>9} {'baseline':>9}"]

    def rows(d: dict[str, Any], prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or k == "score":
                continue
            b = base.get(k) if not prefix else None
            cell = f"{b:9.2f}" if isinstance(b, (int, float)) else f"{'':>9}"
            lines.append(f"{prefix + k:<12} {v:9.2f} {cell}")

    rows(metrics)
    if isinstance(metrics.get("rerank"), dict):
        rows(metrics["rerank"], "rerank.")
    if "score" in metrics:
        lines.append(f"{'score':<12} {metrics['score']:9.2f}")
    return "\n".join(lines)


def _sets(args: argparse.Namespace) -> list[str]:
    sets = list(args.set or [])
    if args.data_format:
        sets.append(f"data.format={args.data_format}")
    if args.data_root:
        sets.append(f"data.root={args.data_root}")
    return sets


def _finetune(args: argparse.Namespace) -> int:
    from .api import finetune

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = finetune(args.task, args.init, args.out, args.config, sets=_sets(args), preset=args.preset,
                   overwrite=args.overwrite)
    metrics = json.loads((out / "metrics.json").read_text())
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics))
    if not args.json:
        print(f"wrote {out} (model) and {out / 'metrics.json'}")
    return 0


def _eval_output(args: argparse.Namespace) -> Path:
    """Where ``eval`` writes, checked before anything is evaluated. The default ``CKPT/eval/TASK-SPLIT.json``
    is the command's own result, replaced by a re-run; an explicit ``--out`` may not be (or lie inside) the
    checkpoint, the config or the data, and replaces an existing file only with ``--overwrite``."""
    ckpt = Path(args.ckpt)
    if args.out is None:
        out = ckpt / "eval" / f"{args.task}-{args.split}.json"
        if out.is_dir():
            raise ValueError(f"{out} is a directory; expected the file of the result (or give --out FILE)")
        return out
    reads = [ckpt, *(sorted(ckpt.iterdir()) if ckpt.is_dir() else []), args.config, args.data_root]
    return guard_output_file(args.out, reads, args.overwrite, flag="--out")


def _eval(args: argparse.Namespace) -> int:
    from .api import evaluate

    sets = _sets(args)
    if args.rerank_k is not None:
        sets.append(f"rerank_k={args.rerank_k}")
    out = _eval_output(args)
    metrics = evaluate(args.task, args.ckpt, args.split, args.config, sets=sets)
    atomic_write_json(out, metrics)  # creates CKPT/eval/ only now, with the result
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics) + f"\nwrote {out}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML of FinetuneConfig keys, over the task/preset defaults")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (repeatable; dotted keys reach data.*: --set data.root=/x)")
    p.add_argument("--data-format", choices=DATA_FORMATS, help="where examples come from (default: embedded)")
    p.add_argument("--data-root", help="dataset folder for a real format")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")


def register(subparsers: argparse._SubParsersAction) -> None:
    ft = subparsers.add_parser("finetune", help="fine-tune a checkpoint on a downstream task and evaluate it")
    ft.add_argument("task", choices=task_names(trainable=True), help="downstream task")
    ft.add_argument("--init", required=True, help="checkpoint directory to start from (pre-trained or merged)")
    ft.add_argument("--out", required=True, help="output checkpoint directory")
    ft.add_argument("--preset", help="defaults section of configs/finetune/TASK.yaml (default: from the checkpoint)")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    _common(ft)
    ft.set_defaults(func=_finetune)

    ev = subparsers.add_parser("eval", help="evaluate a checkpoint on a task (zero-shot for retrieval / itm)")
    ev.add_argument("task", choices=task_names(), help="task (itm: zero-shot image-text matching accuracy)")
    ev.add_argument("ckpt", help="checkpoint directory")
    ev.add_argument("--split", default="test", help="split to score: test | ood | val | train (default: test)")
    ev.add_argument("--rerank-k", type=count(0), help="retrieval: rerank the top-k by ITM (needs an itm head)")
    ev.add_argument("--out", help="JSON output file (default: CKPT/eval/TASK-SPLIT.json, replaced by a re-run)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _common(ev)
    ev.set_defaults(func=_eval)
