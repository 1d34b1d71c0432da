"""``vlmerge data ...`` subcommands."""

from __future__ import annotations

import argparse

from .world import SPLITS


def _preview(args: argparse.Namespace) -> int:
    from .preview import render_preview

    path = render_preview(args.out, n=args.n, image_size=args.image_size, split=args.split, seed=args.seed)
    print(f"wrote {path}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from .cache import write_cache
    from .world import World, WorldConfig

    out = write_cache(World(WorldConfig(image_size=args.image_size), args.split, args.seed), args.n, args.out)
    print(f"cached {args.n} {args.split} scenes in {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="the embedded image-text world: preview, cache")
    sub = p.add_subparsers(dest="data_command", required=True)
    pv = sub.add_parser("preview", help="a PNG grid of generated images with a caption and a question each")
    pv.add_argument("--out", required=True, help="output PNG path")
    pv.add_argument("--n", type=int, default=8, help="number of scenes (default 8)")
    pv.add_argument("--image-size", type=int, default=64, help="pixels per side (default 64)")
    pv.add_argument("--split", default="train", choices=sorted(SPLITS), help="split (default train)")
    pv.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    pv.set_defaults(func=_preview)
    ca = sub.add_parser("cache", help="generate a split to .npz shards on disk")
    ca.add_argument("--split", default="train", choices=sorted(SPLITS))
    ca.add_argument("--n", type=int, required=True, help="number of scenes")
    ca.add_argument("--out", required=True, help="cache directory")
    ca.add_argument("--image-size", type=int, default=32)
    ca.add_argument("--seed", type=int, default=0)
    ca.set_defaults(func=_cache)
