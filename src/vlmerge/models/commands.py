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
    register_convert(subparsers)


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_from, convert_to

    if args.from_layout:
        record = convert_from(args.from_layout, args.src, args.out, overwrite=args.overwrite,
                              image_size=args.image_size, num_heads=args.num_heads)
        kept = record["kept_aside"]
        print(f"{args.src} ({args.from_layout}) -> {args.out}: arch {record['arch']}, {record['depth']} layers, "
              f"fusion {record['fusion']}, {record['mapped_tensors']} tensors")
        for why, keys in kept.items():
            print(f"  kept aside in source_extras.safetensors ({why}): {len(keys)}: {', '.join(keys[:6])}"
                  f"{' ...' if len(keys) > 6 else ''}")
    else:
        record = convert_to(args.to_layout, args.src, args.out, overwrite=args.overwrite, extras=args.extras)
        print(f"{args.src} -> {args.out}/model.safetensors ({args.to_layout}): {record['tensors']} tensors, "
              f"{record['params'] / 1e6:.2f}M parameters")
    return 0


def register_convert(subparsers: argparse._SubParsersAction) -> None:
    from .convert import LAYOUTS

    p = subparsers.add_parser(
        "convert", help="import a VLMo / vl-merging / BEiT-3 / FLAVA checkpoint, or export one back to its layout",
        description="--from LAYOUT SRC OUT_DIR: a vlmerge checkpoint from SRC (.safetensors file or folder, or a "
                    ".pt / .pth / .ckpt / .bin read with torch.load(weights_only=True)); tensors without a slot are "
                    "kept in OUT_DIR/source_extras.safetensors and listed. --to LAYOUT CKPT OUT_DIR: a vlmerge "
                    "checkpoint (merged or not) as OUT_DIR/model.safetensors in LAYOUT's names. Layouts: "
                    + "; ".join(f"{n}: {lay.description}" for n, lay in LAYOUTS.items()))
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="from_layout", choices=sorted(LAYOUTS), help="import from this layout")
    way.add_argument("--to", dest="to_layout", choices=sorted(LAYOUTS), help="export to this layout")
    p.add_argument("src", metavar="SRC", help="the checkpoint to convert")
    p.add_argument("out", metavar="OUT_DIR", help="output folder (new or empty, or --overwrite)")
    p.add_argument("--num-heads", type=count(1, 1 << 16), default=None,
                   help="attention heads, where the weights cannot tell (BEiT-3, a FLAVA without config.json; default: "
                        "width / 64)")
    p.add_argument("--image-size", type=count(1, 1 << 16), default=None,
                   help="image size in pixels, where the weights cannot tell (VLMo; default: 224)")
    p.add_argument("--extras", default=None, metavar="FILE",
                   help="--to: the source_extras.safetensors an import kept aside (default: CKPT's own, if any; a "
                        "merged model has none: give the imported folder's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds an earlier output")
    p.set_defaults(func=_convert)
