"""A PNG grid of generated scenes, each with one caption and one question + answer under it."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from ..models.checkpoint import atomic_write_bytes
from .world import World, WorldConfig


def render_preview(out_path: str | Path, n: int = 8, image_size: int = 64, split: str = "train", seed: int = 0,
                   cols: int = 4) -> Path:
    """Write a grid of the first ``n`` scenes of ``split`` to ``out_path`` (PNG, atomically)."""
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    world = World(WorldConfig(image_size=image_size), split, seed)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.4 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        scene = world[k]
        qa = scene.questions[k % len(scene.questions)]
        ax.imshow(scene.image, interpolation="nearest")
        text = "\n".join(textwrap.wrap(scene.captions[0], 34)) + f"\nQ: {qa.question}\nA: {qa.answer}"
        ax.set_title(text, fontsize=8, loc="left")
    fig.suptitle(f"vlmerge world: split={split}, seed={seed}, {image_size}px", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_path, buf.getvalue())
    return Path(out_path)
