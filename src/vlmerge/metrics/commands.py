"""``vlmerge distance``: how far apart are the vision and language weights? (merging paper §7, Table 5)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..cli import count, finite_float
from .checkpoint import METRICS, check_distance_source, checkpoint_distances

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
    _register_predict(subparsers)


def _predict(args: argparse.Namespace) -> int:
    from ..config import parse_value
    from ..files import guard_output_file
    from ..merge import get_method
    from .predict import format_report, layer_report, load_calibration, plot_risk, recommend, state_merge_features

    check_distance_source(args.ckpt_dir)
    method = get_method(args.method)  # an unknown method is refused before anything is read
    params: dict[str, Any] = {"alpha": args.alpha} if args.alpha is not None else {}
    for kv in args.param or []:
        k, eq, v = kv.partition("=")
        if not k.strip() or not eq:
            raise ValueError(f"--param expects KEY=VALUE, got {kv!r}")
        params[k.strip()] = parse_value(v, f"--param {k.strip()}")
    method.parse_params(dict(params))  # an unknown or out-of-range parameter is refused here
    if args.method == "interpolation" and "alpha" not in params:
        params["alpha"] = 0.5
    if args.batches is not None and args.data is None:
        raise ValueError("--batches needs --data NAME (where the activation batches come from)")
    if args.data is not None and method.uses_grams:
        raise ValueError(f"--method {args.method}: needs Gram matrices; predict's drift merges in memory with a "
                         "method that does not (e.g. interpolation)")
    if args.data is not None and method.base == "required" and args.base is None:
        raise ValueError(f"--method {args.method}: needs --base W0 for the in-memory merge")
    points = load_calibration(args.calibration) if args.calibration else None
    plot = guard_output_file(args.plot, [args.ckpt_dir], args.overwrite, "--plot") if args.plot else None
    batches = None
    if args.data is not None:
        from ..merge.grams import check_gram_data, gram_batches
        from ..models import load_model

        check_gram_data(args.data)
        batches = list(gram_batches(args.data, load_model(args.ckpt_dir), args.batches or 2, args.seed))
    report = layer_report(args.ckpt_dir, base=args.base, batches=batches, method=args.method, params=params)
    advice = None
    if points is not None:
        moved = state_merge_features(args.ckpt_dir, args.base, batches, measured=report)
        advice = recommend(report, points, moved, extra=[(args.method, params)])
    if plot is not None:
        plot_risk(report, plot)
    if args.json:
        print(json.dumps({**report, "advice": advice, "plot": None if plot is None else str(plot)}, indent=2))
    else:
        print(format_report(report, advice) + (f"\nwrote {plot}" if plot else ""))
    return 0


def _register_predict(subparsers: argparse._SubParsersAction) -> None:
    from ..merge import METHODS

    p = subparsers.add_parser(
        "predict",
        help="before merging: per-layer risk, the estimated drop with an interval, and a recommendation",
        description="Per layer: the paper's four distances and the relative L2 between W^v and W^l (with --base: "
                    "of the task vectors too); with --data: each layer's activation drift under the merge, on its "
                    "own modality's inputs. Layers ranked by risk. With --calibration (the study's "
                    "predict-calibration.json): the estimated drop of each calibrated merge and of --method / "
                    "--alpha / --param, with its 95 %% prediction interval (pooled over every calibrated method and "
                    "coefficient where the merge can be computed in memory), and a recommendation.",
    )
    p.add_argument("ckpt_dir", metavar="CKPT", help="a modality-specific checkpoint directory")
    p.add_argument("--base", default=None, metavar="W0", help="the seed weights W0 (task-vector features)")
    p.add_argument("--data", default=None, metavar="NAME", help="activation batches from this source (e.g. world)")
    p.add_argument("--batches", type=count(1, 10_000), default=None, help="activation batches (default 2)")
    p.add_argument("--seed", type=count(0, 2**31 - 1), default=0, help="data seed (default 0)")
    p.add_argument("--method", default="interpolation", choices=sorted(METHODS),
                   help="the merge whose drift --data measures (default interpolation, alpha 0.5)")
    p.add_argument("--alpha", type=finite_float, default=None, help="interpolation's α (default 0.5)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="another merge parameter (repeatable)")
    p.add_argument("--calibration", default=None, metavar="FILE", help="measured merges (predict-calibration.json)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a risk-per-layer bar chart")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_predict)
