"""``vlmerge model ...`` subcommands."""

from __future__ import annotations

import argparse
import json

from ..cli import count
from .vlmo import ARCHS, PRESETS, count_params, preset_config

# The merging paper's Table 7 (ViT-B/16 backbone with a VQA head), in millions of parameters.
PAPER_TABLE7_M = {"msa": 217, "custom-attn": 151, "custom-ffn": 184, "custom-ln": 118, "maa": 118}


def _info(args: argparse.Namespace) -> int:
    heads = tuple(h.strip() for h in args.heads.split(","))
    if args.heads.strip() and not all(heads):
        raise ValueError(f"--heads {args.heads!r}: expected comma-separated head names (e.g. vqa,itc), or '' for none")
    heads = tuple(h for h in heads if h)
    archs = list(ARCHS) if args.arch == "all" else [args.arch]
    rows = []
    for arch in archs:
        cfg = preset_config(args.preset, arch, heads=heads, vocab_size=args.vocab_size, num_answers=args.num_answers)
        table = count_params(cfg)
        table["preset"] = args.preset
        table["config"] = cfg.to_dict()
        rows.append(table)
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        return 0
    print(format_table(rows, paper=args.preset == "vit-base" and heads == ("vqa",)))
    return 0


def format_table(rows: list[dict], paper: bool = False) -> str:
    """A plain-text table of parameter counts (millions) per part for each architecture."""
    parts = sorted({p for r in rows for p in r["parts"]})
    cols = ["arch", *parts, "mergeable", "total"] + (["paper (Table 7)", "diff"] if paper else [])
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        cells = [r["arch"], *(f"{r['parts'].get(p, 0) / 1e6:.2f}M" for p in parts),
                 f"{r['mergeable_params'] / 1e6:.2f}M", f"{r['total_params'] / 1e6:.2f}M"]
        if paper:
            ref = PAPER_TABLE7_M[r["arch"]]
            cells += [f"{ref}M", f"{100 * (r['total_params'] / 1e6 - ref) / ref:+.1f}%"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("model", help="inspect model presets and architectures")
    sub = p.add_subparsers(dest="model_command", required=True)
    info = sub.add_parser("info", help="parameter counts per part (embeddings, experts, heads) and mergeable params")
    info.add_argument("--preset", default="vit-base", choices=sorted(PRESETS), help="model size preset")
    info.add_argument("--arch", default="all", choices=[*ARCHS, "all"], help="architecture (default: all)")
    info.add_argument("--heads", default="vqa", help="comma-separated heads to include (default: vqa, as Table 7)")
    info.add_argument("--vocab-size", type=count(1), default=30522, help="text vocabulary (default: bert-base-uncased)")
    info.add_argument("--num-answers", type=count(1), default=3129, help="VQA answers (default: 3129, the paper's)")
    info.add_argument("--json", action="store_true", help="print JSON (a key total_params per architecture)")
    info.set_defaults(func=_info)
