"""How far the tiny study's MSA (K_seed = 0) learns per pre-training setting and training seed.

    /work/main/.venv/bin/python benchmarks/tiny_lr_sweep.py [--lrs 1e-3 7e-4 5e-4] [--seeds 1 3]
        [--steps 300] [--workdir /tmp/lr-sweep] [--out benchmarks/results/tiny_lr_sweep.md]

Each row is the study's own cell (:meth:`vlmerge.study.runner.Study.pretrain` of ``msa`` at K_seed = 0, the
``tiny`` study preset with ``optim.lr`` and ``steps`` replaced), scored as the study scores it: zero-shot
retrieval on 1,000 test images, a hit for every image a caption is true of. *progress* = (R − chance) /
(100 − chance), the issue's measure (≥ 0.5 wanted for every model and seed). Reference, measured in the same
run: the preset's own learning rate (the first of ``--lrs`` should be it); *Δ vs ref* is each row's retrieval
minus the reference's on the same seed. A finished cell is reused from ``--workdir`` (rerunning resumes).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from vlmerge.study.runner import Study, _cpu_name, load_study_config


def run_cell(lr: str, steps: int, seed: int, workdir: Path) -> dict[str, float]:
    cfg = load_study_config("tiny")
    sets = [f"optim.lr={lr}" if s.startswith("optim.lr=") else s for s in cfg.pretrain_set]
    cfg = cfg.model_copy(update={"pretrain_set": sets, "steps": steps})
    out = workdir / f"lr{lr}-steps{steps}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    r = Study(cfg, out, seed, progress=False).pretrain("msa", 0.0)["retrieval"]
    chance = r["chance"]["r_mean"]
    return {"avg_tr": r["avg_tr"], "avg_ir": r["avg_ir"], "r_mean": r["r_mean"], "chance": chance,
            "progress": (r["r_mean"] - chance) / (100 - chance), "seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lrs", nargs="+", default=["1e-3", "7e-4", "5e-4"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lr-sweep"))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rows = {(lr, s): run_cell(lr, a.steps, s, a.workdir) for s in a.seeds for lr in a.lrs}
    lines = [f"Machine: {_cpu_name()}, Python {platform.python_version()}; K = {a.steps} steps; "
             f"seconds include a cell reused from --workdir as ~0.", "",
             "| lr | seed | Avg TR | Avg IR | retrieval | Δ vs ref | progress | s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (lr, s), r in rows.items():
        d = r["r_mean"] - rows[(a.lrs[0], s)]["r_mean"]
        lines.append(f"| {lr} | {s} | {r['avg_tr']:.1f} | {r['avg_ir']:.1f} | {r['r_mean']:.2f} | {d:+.2f} | "
                     f"{r['progress']:.3f} | {r['seconds']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
