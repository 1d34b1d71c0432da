"""Pre-training throughput per model preset: images/s, achieved FLOP/s, MFU on CUDA, vs a plain encoder.

    /work/main/.venv/bin/python benchmarks/pretrain_throughput.py [--presets micro tiny vit-tiny vit-base]
        [--steps 3] [--out benchmarks/results/pretrain_throughput.md]

What one step is: the VL stage's full optimizer step of :class:`vlmerge.pretrain.losses.PretrainObjective`
on an MSA model (ITC on the retrieval route, ITM on 3·B fusion pairs with hard negatives, MLM on B fusion
pairs; RandAugment off; AdamW), on random pixels and token ids of the preset's shapes, after two warm-up
steps (median step time). FLOPs are the analytic count of :mod:`vlmerge.pretrain.flops` (3 × forward matmul FLOPs).

Reference, measured in the same run: forward + backward + AdamW of a plain ``torch.nn.TransformerEncoder``
of the same width, depth, heads and FFN (pre-LN, GELU) on the image sequence (1 + P tokens), with its FLOPs
counted by the same formula. ``ratio`` = our achieved FLOP/s ÷ the reference's: how much of a plain
encoder's efficiency the multi-route VLMo step keeps (expert routing, 4 passes of different shapes,
sampling, the vocabulary projection on masked tokens only).

On CUDA both run under bf16 autocast and MFU = achieved FLOP/s ÷ the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from vlmerge.models import VLMo, preset_config
from vlmerge.pretrain.flops import block_flops, peak_flops, train_flops
from vlmerge.pretrain.losses import ObjectiveSettings, PretrainObjective, SpecialTokens
from vlmerge.pretrain.optim import build_optimizer

# Batch per preset (CPU, CUDA): small enough for a few CPU steps in minutes.
BATCH = {"micro": (64, 512), "tiny": (64, 512), "vit-tiny": (8, 256), "vit-base": (2, 128)}
VOCAB = {"micro": 1000, "tiny": 1000, "vit-tiny": 30522, "vit-base": 30522}  # small world vocab vs BERT's


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(step, steps: int, device: torch.device) -> float:
    """Median seconds per call of ``step`` over ``steps`` calls, after two warm-up calls (the median resists
    other processes sharing the CPU)."""
    times = []
    for i in range(steps + 2):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_vlmo(preset: str, batch: int, steps: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = preset_config(preset, "msa", vocab_size=VOCAB[preset], heads=("itc", "itm", "mlm"))
    model = VLMo(cfg).to(device)
    special = SpecialTokens(pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=cfg.vocab_size)
    obj = PretrainObjective(model, "vl", ObjectiveSettings(), special, (0.5,) * 3, (0.5,) * 3).to(device).train()
    opt = build_optimizer(model, 1e-4, 0.01, (0.9, 0.98), 1e-8)
    g = torch.Generator(device=device).manual_seed(0)
    length = cfg.max_text_len
    batch_in = {
        "image": torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device, generator=g),
        "input_ids": torch.randint(5, cfg.vocab_size, (batch, length), device=device, generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
        "image_id": torch.arange(batch, device=device),
    }
    batch_in["input_ids"][:, 0], batch_in["input_ids"][:, -1] = 1, 2
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            out = obj(batch_in, g)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = _time_steps(step, steps, device)
    flops = train_flops(cfg, "vl", batch, length)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch, "s_per_step": sec,
            "images_per_s": batch / sec, "tflops": flops / sec / 1e12}


def bench_reference(preset: str, batch: int, steps: int, device: torch.device) -> dict[str, float]:
    cfg = preset_config(preset, "maa")
    seq = cfg.num_patches + 1
    layer = nn.TransformerEncoderLayer(cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    enc = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False).to(device)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    x = torch.randn(batch, seq, cfg.embed_dim, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            y = enc(x)
        y.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = _time_steps(step, steps, device)
    flops = 3.0 * batch * cfg.depth * block_flops(seq, cfg.embed_dim, cfg.mlp_hidden)
    return {"s_per_step": sec, "tflops": flops / sec / 1e12}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["micro", "tiny", "vit-tiny", "vit-base"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after two warm-up steps)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_flops(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"device: {where}; torch {torch.__version__}; python {platform.python_version()}; "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; median of {args.steps} timed steps after 2 warm-up",
        "",
        "| preset | params | batch | s/step | images/s | TFLOP/s | MFU | reference TFLOP/s | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for preset in args.presets:
        batch = BATCH[preset][device.type == "cuda"]
        ours = bench_vlmo(preset, batch, args.steps, device)
        ref = bench_reference(preset, batch, args.steps, device)
        mfu = f"{100 * ours['tflops'] * 1e12 / peak:.1f} %" if peak else "n/a (CPU)"
        row = (f"| {preset} | {ours['params_m']:.1f}M | {batch} | {ours['s_per_step']:.3f} | "
               f"{ours['images_per_s']:.1f} | {ours['tflops']:.3f} | {mfu} | {ref['tflops']:.3f} | "
               f"{ours['tflops'] / ref['tflops']:.2f} |")
        print(row, flush=True)
        lines.append(row)
    if args.out:
        cmd = "/work/main/.venv/bin/python benchmarks/pretrain_throughput.py " + " ".join(argv or sys.argv[1:])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Pre-training throughput\n\n" + (__doc__ or "").split("\n\n", 2)[2] + "\n"
                            f"Command: `{cmd.strip()}`\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
