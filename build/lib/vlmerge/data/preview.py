"""A PNG grid of generated scenes, each with one caption and one question + answer under it."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from ..models.checkpoint import atomic_write_bytes
from .world import World, WorldConfig


def render_preview(out_path: str | Path, n: int = 8, image_size: int = 64, split: str = "train",
                   seed: int = 0, cols: int = 4) -> Path:
    """Write a grid of the first ``n`` scenes of ``split`` (``cols`` per row) to ``out_path`` as a PNG,
    atomically. Under scene ``k``: its first caption, and its question number ``k mod 5`` with the answer.
    Returns the path."""
    if n < 1:
        raise ValueError(f"n={n} is invalid; allowed values: an integer ≥ 1")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    world = World(WorldConfig(image_size=image_size), split, seed)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 4.2 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        scene = world[k]
        qa = scene.questions[k % len(scene.questions)]
        ax.imshow(scene.image, interpolation="nearest")
        text = "\n".join([*textwrap.wrap(scene.captions[0], 36), *textwrap.wrap(f"Q: {qa.question}", 36),
                          f"A: {qa.answer}"])
        ax.text(0.0, -0.03, text, transform=ax.transAxes, fontsize=8, va="top", ha="left")
    fig.suptitle(f"vlmerge world: split={split}, seed={seed}, {image_size} px", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_path, buf.getvalue())
    return Path(out_path)
