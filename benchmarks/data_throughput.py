"""Images/s of the procedural world on one core, at several resolutions, against the training step budget.

Run: ``python benchmarks/data_throughput.py [--n 500]``. The reference, measured in the same run, is the
images/s one tiny-preset training step consumes (ITC+ITM+MLM on a batch of 64 pairs): generation must
be several times faster than training so it never bottlenecks it.
"""

from __future__ import annotations

import argparse
import time

import torch

from vlmerge.data import World, WorldConfig, normalize, to_tensor


def images_per_s(size: int, n: int) -> float:
    w = World(WorldConfig(image_size=size), split="train", seed=0)
    t0 = time.perf_counter()
    for i in range(n):
        to_tensor(w[i].image)
    return n / (time.perf_counter() - t0)


def training_images_per_s(steps: int = 4) -> float:
    """Forward + backward of the tiny preset MSA on 64 pairs, ITC + ITM-sized fusion + MLM."""
    import torch.nn.functional as F

    from vlmerge.models import VLMo, preset_config

    m = VLMo(preset_config("tiny", "msa", heads=("itc", "itm", "mlm"), vocab_size=300))
    opt = torch.optim.AdamW(m.parameters(), 1e-4)
    img, ids = normalize(torch.rand(64, 3, 32, 32)), torch.randint(5, 300, (64, 24))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        a, b = m.encode_image(img), m.encode_text(ids)
        loss = F.cross_entropy(a @ b.T * 10, torch.arange(64))
        h = m.forward_fusion(img.repeat(3, 1, 1, 1), ids.repeat(3, 1))
        loss = loss + m.heads["itm"](h[:, 0]).logsumexp(-1).mean() + m.heads["mlm"](h[:64, :24]).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return 64 / min(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=500, help="images per resolution")
    args = p.parse_args()
    torch.set_num_threads(1)
    ref = training_images_per_s()
    print(f"reference: tiny-preset training step consumes {ref:.0f} images/s (1 thread)\n")
    print("| resolution | images/s (1 core) | ratio vs training |")
    print("|---|---|---|")
    for size in (32, 64, 224):
        n = args.n if size < 224 else max(50, args.n // 10)
        ips = images_per_s(size, n)
        print(f"| {size} px | {ips:.0f} | {ips / ref:.1f}x |")


if __name__ == "__main__":
    main()
