"""``vlmerge data preview|cache``: look at the embedded world, or write a split of it to disk."""

from __future__ import annotations

import argparse
import sys

from ..cli import count
from .world import SPLITS


def _preview(args: argparse.Namespace) -> int:
    from ..files import guard_output_file
    from .preview import render_preview

    guard_output_file(args.out, [], args.overwrite, flag="--out")
    path = render_preview(args.out, n=args.n, image_size=args.image_size, split=args.split, seed=args.seed)
    print(f"wrote {path}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from ..files import check_output_path
    from .cache import write_cache
    from .world import World, WorldConfig

    check_output_path(args.out, "--out")

    world = World(WorldConfig(image_size=args.image_size), args.split, args.seed)
    out = write_cache(world, args.n, args.out, kind=args.kind, shard_size=args.shard_size,
                      progress=sys.stderr.isatty())  # a bar for people, not for logs
    print(f"cached {args.n} {args.split} {args.kind} examples ({args.image_size} px) in {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` with subcommands ``preview`` and ``cache``; each sets ``func(args) -> exit code``."""
    p = subparsers.add_parser("data", help="the embedded image-text world: preview it, cache it to disk",
                              description="The embedded, procedurally generated image-text world.")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    splits = list(SPLITS)

    pv = sub.add_parser("preview", help="write a PNG grid of scenes with a caption and a question each",
                        description="Write a PNG grid of generated scenes, each with one caption and one "
                                    "question + answer under it.")
    pv.add_argument("--out", required=True, metavar="FILE.png", help="output PNG path (written atomically)")
    pv.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    pv.add_argument("--n", type=count(1), default=8, help="number of scenes (default: 8)")
    pv.add_argument("--image-size", type=count(8), default=64, help="image side in pixels (default: 64)")
    pv.add_argument("--split", default="train", choices=splits, help="world split (default: train)")
    pv.add_argument("--seed", type=count(0), default=0, help="world seed (default: 0)")
    pv.set_defaults(func=_preview)

    ca = sub.add_parser("cache", help="write the first N examples of a split to .npz shards",
                        description="Generate the first N examples of a split into DIR (meta.json + .npz "
                                    "shards, no pickles); an interrupted run resumes, an existing cache of "
                                    "the same world is extended.")
    ca.add_argument("--split", required=True, choices=splits, help="world split")
    ca.add_argument("--n", type=count(1), required=True, help="number of examples")
    ca.add_argument("--out", required=True, metavar="DIR", help="cache directory")
    ca.add_argument("--kind", default="scenes", choices=["scenes", "nlvr2"],
                    help="scenes (images, masks, captions, questions, labels) or nlvr2 pairs "
                         "(default: scenes)")
    ca.add_argument("--image-size", type=count(8), default=32, help="image side in pixels (default: 32)")
    ca.add_argument("--seed", type=count(0), default=0, help="world seed (default: 0)")
    ca.add_argument("--shard-size", type=count(1), default=None,
                    help="examples per shard (default: the existing cache's, else about 64 MiB of pixels "
                         "per shard, at most 1000 examples)")
    ca.set_defaults(func=_cache)
