"""``vlmerge distance``: how far apart are the vision and language weights? (merging paper §7, Table 5)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..cli import finite_float
from .checkpoint import METRICS, checkpoint_distances

# Table 5 (ViT-B/16, COCO retrieval drop after interpolation) for context in the text output.
PAPER_TABLE5 = {
    "k_seed": [0, 50_000, 100_000, 150_000],
    "tssd": [0.066, 0.037, 0.015, 0.006],
    "drop": [9.16, 4.50, 2.80, 2.60],
}


def _fmt_row(row: dict[str, Any], label: str) -> str:
    return f"{label:<16} " + " ".join(f"{row[m]:>12.6g}" for m in METRICS) + f" {row['numel']:>12d}"


def format_distances(d: dict[str, Any]) -> str:
    """The distances as a plain-text table (global, then per layer / module when present)."""
    lines = [
        f"{'':<16} " + " ".join(f"{m:>12}" for m in METRICS) + f" {'entries':>12}",
        _fmt_row(d["global"], "global"),
    ]
    for row in d.get("per_layer", []):
        lines.append(_fmt_row(row, f"layer {row['layer']}"))
    for row in d.get("per_module", []):
        lines.append(_fmt_row(row, (f"layer {row['layer']} " if "layer" in row else "") + row["module"]))
    t = d["global"]["tssd"]
    ref = ", ".join(f"{s} {d_:.2f}" for s, d_ in zip(PAPER_TABLE5["tssd"], PAPER_TABLE5["drop"], strict=True))
    lines.append(
        f"\nTSSD (k={d['k']}) = {t:.4f}. Paper Table 5 (ViT-B/16, TSSD -> COCO drop after merging): {ref}."
    )
    if t >= PAPER_TABLE5["tssd"][1]:
        lines.append(
            "warning: TSSD is as high as the paper's models that lost ≥ 4.5 points when merged; "
            "consider (longer) seed pre-training before merging."
        )
    return "\n".join(lines)


def _distance(args: argparse.Namespace) -> int:
    d = checkpoint_distances(
        args.ckpt_dir,
        per_layer=args.per_layer,
        per_module=args.per_module,
        k=args.k,
        matrices_only=args.matrices_only,
    )
    print(json.dumps(d, indent=2) if args.json else format_distances(d))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distance",
        help="L2, cosine, SSD and TSSD between a checkpoint's vision and language weights",
        description="Distances between the vision and language block weights of a modality-specific "
        "checkpoint "
        "(merging paper §7): all v and l copies flattened and concatenated, embeddings excluded.",
    )
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a modality-specific checkpoint directory")
    p.add_argument("--per-layer", action="store_true", help="also one row per layer")
    p.add_argument(
        "--per-module", action="store_true", help="also one row per module (per layer with --per-layer)"
    )
    p.add_argument(
        "--k", type=finite_float, default=0.5, help="TSSD: fraction of smallest entries zeroed (default 0.5)"
    )
    p.add_argument("--matrices-only", action="store_true", help="only 2-D weights (no LayerNorm, no biases)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_distance)
