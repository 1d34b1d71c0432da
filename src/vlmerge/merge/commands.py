"""``vlmerge merge``: merge a modality-specific checkpoint (or N models) from flags or a YAML config.

vlmerge merge --method interpolation --alpha 0.75 runs/msa runs/merged
vlmerge merge --method modality_arithmetic --lam 0.5 --base runs/vl-start runs/msa runs/merged
vlmerge merge --method regmean --gamma 1.0 --grams grams.safetensors runs/msa runs/merged
vlmerge merge --method average --inputs runs/a runs/b runs/c -o runs/soup
vlmerge merge --method dare_ties --density 0.5 --base runs/vl-start runs/msa runs/merged   (mergekit's methods too)
vlmerge merge --method slerp --param t=0.3 runs/msa runs/merged
vlmerge merge merge.yaml
vlmerge merge mergekit.yaml OUT_DIR       (a mergekit-style config: see vlmerge.merge.mergekit)
vlmerge merge mergekit.yaml OUT_DIR --out-shard-size 5GB --missing-keys base --device auto
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from ..cli import count
from ..config import parse_value, read_yaml, validate
from .base import METHODS, get_method
from .config import MergeConfig, load_merge_config, run_merge_config

# flag -> method parameter name
_PARAM_FLAGS: dict[str, str] = {
    "alpha": "alpha",
    "alpha_schedule": "alpha",
    "vl_ratio": "vl_ratio",
    "lam": "lam",
    "lam_schedule": "lam",
    "gamma": "gamma",
    "density": "density",
    "drop": "drop",
    "seed": "seed",
}


def _items(text: str) -> list[str]:
    """The comma-separated items of ``text``; an empty one (``0.5,,0.5``, a trailing comma) is refused: dropping
    it would shift every later value to the wrong layer or model."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"empty item {parts.index('') + 1} in {text!r}; expected comma-separated "
                                         "values, none empty")
    return parts


def _floats(text: str) -> list[float]:
    parts = _items(text)
    try:
        return [float(x) for x in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _schedule(text: str) -> list[float] | str:
    return "learned" if text.strip() == "learned" else _floats(text)


def _layers(text: str) -> list[int]:
    parts = _items(text)
    try:
        return [int(x) for x in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _weights(text: str) -> dict[str, float] | list[float]:
    """``0.5,0.5`` (one per model) or ``v=0.75,l=0.25,vl=0.33`` (per modality)."""
    parts = _items(text)
    try:
        if all("=" in p for p in parts):
            pairs = [(k.strip(), float(v)) for k, v in (p.split("=", 1) for p in parts)]
            if len({k for k, _ in pairs}) != len(pairs):
                raise argparse.ArgumentTypeError(f"a modality is given twice in {text!r}")
            return dict(pairs)
        return [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 0.5,0.5 or v=0.75,l=0.25; got {text!r}") from None


def _config_from_args(args: argparse.Namespace) -> MergeConfig:
    params: dict[str, Any] = {}
    learn_flags = {k: getattr(args, f"learn_{k}") for k in ("objective", "granularity", "batches", "steps", "seed")
                   if getattr(args, f"learn_{k}") is not None}
    learn = None
    learned = [f for f in ("alpha_schedule", "lam_schedule") if getattr(args, f) == "learned"]
    if len(learned) > 1:
        raise ValueError("--alpha-schedule learned and --lam-schedule learned: one method learns one coefficient")
    if learned:
        from .learned import LEARNABLE

        flag = "--" + learned[0].replace("_", "-")
        if LEARNABLE.get(args.method) != _PARAM_FLAGS[learned[0]]:
            want = next(m for m, p in LEARNABLE.items() if p == _PARAM_FLAGS[learned[0]])
            raise ValueError(f"{flag} learned: goes with --method {want}, not {args.method}")
        if args.keep_specific is not None or args.budget is not None:
            raise ValueError(f"{flag} learned: learns the coefficients of a full merge; drop --keep-specific / "
                             "--budget")
        learn = learn_flags
        setattr(args, learned[0], None)
    elif learn_flags:
        raise ValueError(f"--learn-{next(iter(learn_flags))}: goes with --alpha-schedule / --lam-schedule learned")
    for flag, name in _PARAM_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            if name in params:
                raise ValueError(f"give --{name} or --{name}-schedule, not both")
            params[name] = value
    if args.normalize is not None:
        params["normalize"] = args.normalize
    for kv in args.param or []:
        k, _, v = kv.partition("=")
        if not k.strip() or not _:
            raise ValueError(f"--param expects KEY=VALUE with a parameter name before '=', got {kv!r}")
        params[k.strip()] = parse_value(v, f"--param {k.strip()}")
    paths = list(args.paths) + ([args.output] if args.output else [])
    if args.inputs:
        if len(paths) != 1:
            raise ValueError("with --inputs give exactly one output: -o OUT_DIR")
        src: dict[str, Any] = {"inputs": args.inputs, "output": paths[0]}
    else:
        if len(paths) != 2:
            raise ValueError("give IN_DIR OUT_DIR, or CONFIG.yaml, or --inputs A B ... -o OUT_DIR")
        src = {"input": paths[0], "output": paths[1]}
    raw = dict(
        method=args.method,
        params=params,
        base=args.base,
        weights=args.weights,
        grams=args.grams,
        data=args.data,
        batches=args.batches,
        save_grams=args.save_grams,
        overwrite=args.overwrite,
        hash_inputs=args.hash_inputs,
        keep_specific=args.keep_specific,
        budget=args.budget,
        learn=learn,
        **src,
    )
    if args.inputs and isinstance(args.grams, (str, Path)):
        raw["grams"] = [g for g in str(args.grams).split(",")]
    return validate(MergeConfig, {k: v for k, v in raw.items() if v is not None}, "merge options")


# Flags that only a mergekit config takes (vlmerge's own merges write one model.safetensors on the CPU).
_MERGEKIT_FLAGS = ("missing_keys", "out_shard_size", "device")


def _merge(args: argparse.Namespace) -> int:
    if args.paths and args.paths[0].endswith((".yaml", ".yml")) and args.method is None and not args.inputs:
        from .mergekit import is_mergekit_config, run_mergekit_cli

        data = read_yaml(args.paths[0])
        if not data:  # an empty or comment-only file
            raise ValueError(f"{args.paths[0]}: empty config; expected vlmerge's merge schema (method, input/inputs, "
                             "output) or a mergekit config (merge_method, models)")
        if is_mergekit_config(data):
            return run_mergekit_cli(args)
    given = [f"--{f.replace('_', '-')}" for f in _MERGEKIT_FLAGS if getattr(args, f, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only for a mergekit config (vlmerge merge CONFIG.yaml OUT_DIR), "
                         "not for vlmerge's own merges")
    if (
        len(args.paths) == 1
        and args.paths[0].endswith((".yaml", ".yml"))
        and not args.inputs
        and not args.output
    ):
        if args.method is not None:
            raise ValueError("give either CONFIG.yaml or --method with IN_DIR OUT_DIR, not both")
        cfg, config_path = load_merge_config(args.paths[0]), args.paths[0]
        if args.overwrite:
            cfg = cfg.model_copy(update={"overwrite": True})
    else:
        if args.method is None:
            raise ValueError(
                f"--method is required without a CONFIG.yaml; one of {', '.join(sorted(METHODS))}"
            )
        get_method(args.method)
        cfg, config_path = _config_from_args(args), None
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    with warnings.catch_warnings(record=True) as caught:  # one line per kind of warning, not one per tensor
        warnings.simplefilter("always")
        out = run_merge_config(cfg, progress=progress, config_path=config_path)
    _summarise_warnings(caught)
    print(f"merged ({cfg.method}) -> {out}")
    if cfg.input is not None:
        _print_param_counts(cfg.input, out)
    return 0


def _print_param_counts(src: Path, out: Path) -> None:
    """Parameters before and after a modality merge (a partial merge's trade of parameters for accuracy)."""
    from ..models.checkpoint import load_model_config, read_json
    from ..models.vlmo import count_params

    try:
        before, after = count_params(load_model_config(src)), count_params(load_model_config(out))
    except (ValueError, OSError):  # a checkpoint without a vlmerge model config: nothing to count
        return
    partial = (read_json(out / "config.json").get("merge") or {}).get("partial")
    kept = f"; kept modality-specific: layers {partial['keep_specific']}" if partial else ""
    print(f"parameters: {before['total_params']:,} -> {after['total_params']:,} (modality experts "
          f"{before['mergeable_params']:,} -> {after['mergeable_params']:,}){kept}")


def _summarise_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Print each distinct warning once; RegMean's per-tensor "singular" notes become one line with a count."""
    singular = [str(w.message) for w in caught if "is singular" in str(w.message)]
    if singular:
        print(f"warning: {singular[0]}" + (f" (and {len(singular) - 1} more weights like it)" if len(singular) > 1
                                           else ""), file=sys.stderr)
    for text in dict.fromkeys(str(w.message) for w in caught if "is singular" not in str(w.message)):
        print(f"warning: {text}", file=sys.stderr)


def register(subparsers: argparse._SubParsersAction) -> None:
    methods = "\n".join("  " + METHODS[k].describe() for k in sorted(METHODS))
    p = subparsers.add_parser(
        "merge",
        help="merge the modality experts of a checkpoint (or N models) into one modality-agnostic model",
        description="Merge the v/l/vl copies of every block weight of IN_DIR into shared weights "
        "(merging paper "
        "§4.1), writing an MAA checkpoint to OUT_DIR; or merge N whole models (--inputs); or run "
        "a YAML config.",
        epilog=f"methods:\n{methods}\n\nexamples:\n"
        "  vlmerge merge --method interpolation --alpha 0.75 runs/msa runs/merged\n"
        "  vlmerge merge --method modality_arithmetic --lam 0.5 --base runs/vl-start runs/msa runs/out\n"
        "  vlmerge merge --method regmean --grams grams.safetensors runs/msa runs/out\n"
        "  vlmerge merge --method average --inputs runs/a runs/b runs/c -o runs/soup\n"
        "  vlmerge merge --method della --density 0.5 --param epsilon=0.1 --base runs/vl-start runs/msa runs/out\n"
        "  vlmerge merge --method slerp --param t=0.3 runs/msa runs/out\n"
        "  vlmerge merge merge.yaml\n"
        "  vlmerge merge mergekit.yaml OUT_DIR   (a mergekit-style config: see vlmerge.merge.mergekit)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="IN_DIR OUT_DIR, or CONFIG.yaml (a mergekit config: CONFIG.yaml OUT_DIR)")
    p.add_argument("-o", "--output", metavar="OUT_DIR", help="output directory (instead of the last PATH)")
    p.add_argument("--method", choices=sorted(METHODS), help="merge method")
    p.add_argument("--inputs", nargs="+", metavar="DIR", help="merge these whole models (same keys) instead")
    p.add_argument(
        "--base", help="base checkpoint W0 (required or optional per method: see the list below)"
    )
    p.add_argument("--alpha", type=float, help="interpolation: vision share α in [0, 1] (default 0.5)")
    p.add_argument(
        "--alpha-schedule", type=_schedule, metavar="A0,A1,...|learned",
        help="interpolation: one α per layer, or 'learned' on the world's validation split (--learn-*)"
    )
    p.add_argument("--learn-objective", choices=("supervised", "entropy"), default=None,
                   help="--alpha-schedule / --lam-schedule learned: contrastive loss on paired captions (default) "
                        "or AdaMerging's prediction entropy (no labels)")
    p.add_argument("--learn-granularity", choices=("layer", "module"), default=None,
                   help="learned: one coefficient per layer (default) or per layer and module (norm1/attn/norm2/mlp)")
    p.add_argument("--learn-batches", type=count(1, 10_000), default=None, help="learned: batches (default 4)")
    p.add_argument("--learn-steps", type=count(1, 100_000), default=None, help="learned: Adam steps (default 30)")
    p.add_argument("--learn-seed", type=count(0), default=None, help="learned: data seed (default 0)")
    p.add_argument(
        "--vl-ratio", type=float, help="interpolation: W_vl share in the top M layers (default 1/3)"
    )
    p.add_argument("--lam", type=float, help="modality_arithmetic / ties / dare / task-vector methods: scaling λ "
                   "(mergekit's lambda)")
    p.add_argument("--lam-schedule", type=_schedule, metavar="L0,L1,...|learned",
                   help="modality_arithmetic: one λ per layer, or 'learned' on the world's validation split "
                        "(--learn-*; needs --base)")
    p.add_argument("--gamma", type=float, help="regmean: off-diagonal scale γ in [0, 1] (default 1); breadcrumbs*: "
                   "fraction of largest entries dropped (default 0.01)")
    p.add_argument("--density", type=float, help="ties: kept fraction in (0, 1] (default 0.5); dare_* / "
                   "breadcrumbs* / della*: kept fraction ≥ 0 (default 1: all)")
    p.add_argument("--drop", type=float, help="dare: drop rate p in [0, 1) (default 0.5)")
    p.add_argument("--seed", type=count(0), help="dare / dare_* / della*: mask seed (default 0)")
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average / dare / task-vector methods: divide by the sum of weights (default per method)",
    )
    p.add_argument(
        "--weights", type=_weights, help="methods with weights (see the list below): 0.5,0.5 (per model) or "
        "v=0.75,l=0.25"
    )
    p.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="any other method parameter (YAML value)"
    )
    p.add_argument("--grams", help="regmean: Gram file (comma-separated, one per model, with --inputs)")
    p.add_argument("--data", help="regmean: collect Grams from this registered data source")
    p.add_argument("--batches", type=count(1), help="regmean: number of batches for --data")
    p.add_argument("--save-grams", help="regmean: also save the Grams collected with --data to this file")
    p.add_argument("--keep-specific", type=_layers, metavar="L0,L1,...",
                   help="partial merge: keep these layers modality-specific (0-based), merge the rest")
    p.add_argument("--budget", type=float, metavar="P",
                   help="partial merge: keep the riskiest round(P·n) of the n modality-specific layers (P in "
                        "[0, 1]; risk: vlmerge predict's relative L2 of the copies)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--hash-inputs", action="store_true", help="record full SHA-256 of the inputs (slower)")
    p.add_argument("--missing-keys", choices=("error", "base"), default=None,
                   help="mergekit config: a tensor some models lack is an error (default) or taken from the "
                   "base_model (base)")
    p.add_argument("--out-shard-size", metavar="SIZE",
                   help="mergekit config: split the output into model-0000i-of-0000N.safetensors of at most SIZE "
                   "bytes each (5GB, 500MB, 2GiB, 1000000; mergekit's 5B = 5e9) with model.safetensors.index.json; "
                   "a larger tensor gets a shard of its own (default: one model.safetensors)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                   help="mergekit config: where each tensor is merged (default cpu; auto: cuda if available)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    p.set_defaults(func=_merge)
