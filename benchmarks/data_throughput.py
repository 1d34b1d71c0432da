"""Images/s of the procedural world on one core at several resolutions, against references measured in the
same run: drawing a uniform-noise image of the same size with ``numpy.random`` (the floor cost of producing
an image at all), and the images/s one tiny-preset training step consumes (ITC + ITM-sized fusion + MLM on
64 pairs at 32 px; the project's budget is about 64 pairs / 1.3 s). Generation must stay well above the
training rate so that it never bottlenecks training.

Columns: ``scenes/s`` — ``world[i]`` (objects, 5 captions, 5 questions, image, mask); ``items/s`` — an
``ImageTextDataset`` item (scene + float tensor); ``cache reads/s`` — random-order reads of scenes from a
shard cache (memory-mapped ``.npz``). Every figure is the best of 3 repeats.

Run: ``python benchmarks/data_throughput.py [--n 2000]`` (``--n``: scenes at 32 px; fewer at larger sizes).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy loads
    os.environ[_var] = "1"

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vlmerge.data import CachedWorld, ImageTextDataset, World, WorldConfig, write_cache  # noqa: E402


def rate(fn: Callable[[int], object], n: int, repeats: int = 3) -> float:
    """Best calls/s of ``fn(i)`` for i in 0..n-1 over ``repeats`` runs."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - t0)
    return n / best


def training_images_per_s(steps: int = 4) -> float:
    """Images/s consumed by forward + backward + AdamW of the tiny-preset MSA model on 64 pairs at 32 px."""
    import torch.nn.functional as F

    from vlmerge.models import VLMo, preset_config

    model = VLMo(preset_config("tiny", "msa", heads=("itc", "itm", "mlm"), vocab_size=300))
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    img, ids = torch.rand(64, 3, 32, 32) * 2 - 1, torch.randint(5, 300, (64, 24))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model.encode_image(img) @ model.encode_text(ids).T * 10, torch.arange(64))
        h = model.forward_fusion(img.repeat(3, 1, 1, 1), ids.repeat(3, 1))
        loss = loss + model.heads["itm"](h[:, 0]).logsumexp(-1).mean()
        loss = loss + model.heads["mlm"](h[:64, :24]).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return 64 / min(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="scenes per measurement at 32 px (default: 2000)")
    args = p.parse_args()
    torch.set_num_threads(1)
    train = training_images_per_s()
    print(f"reference: one tiny-preset training step (64 pairs, 32 px) consumes {train:.0f} images/s "
          "on 1 thread\n")
    print("| resolution | scenes/s | items/s | cache reads/s | np.random noise images/s | scenes / noise "
          "| scenes / training |")
    print("|---|---|---|---|---|---|---|")
    for size, n in ((32, args.n), (64, args.n // 2), (224, args.n // 10), (384, args.n // 20)):
        world = World(WorldConfig(image_size=size), split="train", seed=0)
        scenes = rate(world.__getitem__, n)
        items = rate(ImageTextDataset(world, n, pairs=False).__getitem__, n)
        with tempfile.TemporaryDirectory() as tmp:
            cached = CachedWorld(write_cache(world, n, tmp, shard_size=max(1, n // 4), progress=False))
            order = np.random.default_rng(0).permutation(n).tolist()
            reads = rate(lambda i, c=cached, o=order: c[o[i]], n)
        rng = np.random.default_rng(0)
        noise = rate(lambda _, r=rng, s=size: r.integers(0, 256, (s, s, 3), dtype=np.uint8), n)
        print(f"| {size} px | {scenes:.0f} | {items:.0f} | {reads:.0f} | {noise:.0f} | {scenes / noise:.2f}x "
              f"| {scenes / train:.1f}x |")


if __name__ == "__main__":
    main()
