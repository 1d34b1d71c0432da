"""Merge throughput and peak memory: vlmerge's streaming merges vs the IO floor and vs mergekit.

    /work/main/.venv/bin/python benchmarks/merge_throughput.py [--layers 12 --dim 1024 --ffn 4096]
        [--mergekit-python /work/main/.venv-bench/bin/python] [--out benchmarks/results/merge_throughput.md]

Data (random float32 tensors, generated into a temp dir, deleted at the end unless --keep):

* three whole "models" A, B, C with Llama tensor names (an HF-style dir with a LlamaForCausalLM config.json,
  so mergekit can read them): A + B is the ≥ 1.5 GB pair, C the base (W0);
* an MSA checkpoint made of the same tensors (A's as the ``v`` experts, B's as ``l``, random ``vl`` experts
  in the top 2 layers) and a seed checkpoint (C under the ``shared`` names) for the paper's modality merge.

Every measurement runs in a fresh subprocess; its time is measured inside the process around the merge call
(imports excluded) and its peak RSS is the child's ``ru_maxrss`` (``os.wait4``). Floors, in the same run:
reading every input tensor once through ``CheckpointReader`` and writing the output once through
``SafetensorsStreamWriter`` (same shapes, same names). The files sit in the page cache (just written, and
24 GiB RAM), so these are warm-cache numbers: the floor is memory-bandwidth bound, not disk bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------------------------ data
def llama_specs(layers: int, dim: int, ffn: int, vocab: int) -> dict[str, tuple[int, ...]]:
    specs: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, dim),
        "model.norm.weight": (dim,),
        "lm_head.weight": (vocab, dim),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs[f"{p}self_attn.{n}.weight"] = (dim, dim)
        specs[f"{p}mlp.gate_proj.weight"] = (ffn, dim)
        specs[f"{p}mlp.up_proj.weight"] = (ffn, dim)
        specs[f"{p}mlp.down_proj.weight"] = (dim, ffn)
        specs[f"{p}input_layernorm.weight"] = (dim,)
        specs[f"{p}post_attention_layernorm.weight"] = (dim,)
    return specs


def block_name(llama: str, expert: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blocks.3.attn.{expert}.q_proj.weight (vlmerge role names)."""
    parts = llama.split(".")
    if parts[0] != "model" or parts[1] != "layers":
        return llama
    i, kind = parts[2], parts[3]
    module = {
        "self_attn": "attn",
        "mlp": "mlp",
        "input_layernorm": "norm1",
        "post_attention_layernorm": "norm2",
    }[kind]
    suffix = ".".join(parts[4:]) if kind in ("self_attn", "mlp") else "weight"
    return f"blocks.{i}.{module}.{expert}.{suffix}"


def generate(work: Path, layers: int, dim: int, ffn: int, vocab: int, vl_layers: int) -> dict[str, Path]:
    import torch

    from vlmerge.models.checkpoint import CheckpointReader, SafetensorsStreamWriter, atomic_write_json

    specs = llama_specs(layers, dim, ffn, vocab)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, dim // 128),
        "num_key_value_heads": max(1, dim // 128),
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "hidden_act": "silu",
    }
    dirs = {}
    for j, name in enumerate(("A", "B", "C")):
        d = work / name
        g = torch.Generator().manual_seed(j)
        with SafetensorsStreamWriter(
            d / "model.safetensors", {k: (torch.float32, s) for k, s in specs.items()}, {"format": "pt"}
        ) as w:
            for k, s in specs.items():
                w.write(k, torch.randn(s, generator=g) * 0.02 + (0.0 if name == "C" else 0.001 * j))
        atomic_write_json(d / "config.json", cfg)
        dirs[name] = d
    # the MSA checkpoint: v = A, l = B, vl (top layers) random; the seed: C under shared names
    msa_specs: dict[str, tuple[int, ...]] = {}
    for k, s in specs.items():
        if k.startswith("model.layers."):
            msa_specs[block_name(k, "v")] = s
            msa_specs[block_name(k, "l")] = s
            if int(k.split(".")[2]) >= layers - vl_layers:
                msa_specs[block_name(k, "vl")] = s
        else:
            msa_specs[k] = s
    g = torch.Generator().manual_seed(7)
    with (
        CheckpointReader(dirs["A"]) as ra,
        CheckpointReader(dirs["B"]) as rb,
        SafetensorsStreamWriter(
            work / "msa" / "model.safetensors",
            {k: (torch.float32, s) for k, s in msa_specs.items()},
            {"format": "pt"},
        ) as w,
    ):
        for k in specs:
            if not k.startswith("model.layers."):
                w.write(k, ra.get(k))
                continue
            w.write(block_name(k, "v"), ra.get(k))
            w.write(block_name(k, "l"), rb.get(k))
            if block_name(k, "vl") in msa_specs:
                w.write(block_name(k, "vl"), torch.randn(specs[k], generator=g) * 0.02)
    atomic_write_json(work / "msa" / "config.json", {"format": "vlmerge/1", "benchmark": True})
    with (
        CheckpointReader(dirs["C"]) as rc,
        SafetensorsStreamWriter(
            work / "seed" / "model.safetensors",
            {block_name(k, "shared"): (torch.float32, s) for k, s in specs.items()},
            {"format": "pt"},
        ) as w,
    ):
        for k in specs:
            w.write(block_name(k, "shared"), rc.get(k))
    dirs["msa"], dirs["seed"] = work / "msa", work / "seed"
    return dirs


# ------------------------------------------------------------------------------------------- child tasks
def child(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task in this (fresh) process; return its in-process wall time."""
    kind = task["kind"]
    if kind == "mergekit":
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        cfg = MergeConfiguration.model_validate(yaml.safe_load(task["yaml"]))
        opts = MergeOptions(
            copy_tokenizer=False, lazy_unpickle=True, write_model_card=False, quiet=True, random_seed=0
        )
        t0 = time.perf_counter()
        run_merge(cfg, task["out"], options=opts)
        return {"seconds": time.perf_counter() - t0}

    from vlmerge.merge import merge_checkpoint, merge_models
    from vlmerge.merge.io import StreamingReader
    from vlmerge.models.checkpoint import SafetensorsStreamWriter
    from vlmerge.models.roles import merge_groups

    t0 = time.perf_counter()
    if kind == "ours_models":
        merge_models(task["method"], task["inputs"], task["out"], base_dir=task.get("base"), **task["params"])
    elif kind == "ours_modality":
        merge_checkpoint(
            task["method"], task["input"], task["out"], base_dir=task.get("base"), **task["params"]
        )
    elif kind == "floor_models":
        readers = [StreamingReader(d) for d in task["inputs"]]
        ref = readers[0]
        specs = {k: (ref.dtype(k), ref.shape(k)) for k in ref}
        with SafetensorsStreamWriter(Path(task["out"]) / "model.safetensors", specs) as w:
            for k in sorted(specs):
                ts = [r.get(k) for r in readers]
                w.write(k, ts[0])
    elif kind == "floor_modality":
        r = StreamingReader(task["input"])
        base = StreamingReader(task["base"]) if task.get("base") else None
        groups = merge_groups(r.keys())
        grouped = {s for g in groups for s in g.sources.values()}
        out: dict[str, list[str]] = {k: [k] for k in r if k not in grouped}
        for g in groups:
            out[g.target] = list(g.sources.values())
        specs = {k: (r.dtype(v[0]), r.shape(v[0])) for k, v in out.items()}
        with SafetensorsStreamWriter(Path(task["out"]) / "model.safetensors", specs) as w:
            for k in sorted(out):
                ts = [r.get(s) for s in out[k]]
                if base is not None and k not in r:
                    ts.append(base.get(k))
                w.write(k, ts[0])
    else:
        raise ValueError(kind)
    return {"seconds": time.perf_counter() - t0}


def run_child_measured(python: str, task: dict[str, Any]) -> dict[str, Any]:
    """Run ``task`` in a fresh ``python`` process (fork + exec); return its in-process time, the process wall
    time and the child's own peak RSS (``os.wait4``'s ``ru_maxrss``, KiB on Linux)."""
    env = dict(os.environ)
    t0 = time.perf_counter()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: exec the interpreter with stdout -> pipe
        os.close(rfd)
        os.dup2(wfd, 1)
        errfile = os.open(task["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(errfile, 2)
        os.execve(python, [python, str(HERE), "--child", json.dumps(task)], env)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        out = f.read()
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        lines = Path(task["err"]).read_text().strip().splitlines()
        return {
            "error": (lines or [f"exit {code}"])[-1][:300],
            "wall": wall,
            "rss_mb": usage.ru_maxrss / 1024,
        }
    res = json.loads(out.strip().splitlines()[-1])
    res.update(wall=wall, rss_mb=usage.ru_maxrss / 1024)
    return res


def max_abs_diff(a: Path, b: Path) -> float:
    import torch

    from vlmerge.models.checkpoint import CheckpointReader

    worst = 0.0
    with CheckpointReader(a) as ra, CheckpointReader(b) as rb:
        if set(ra.keys()) != set(rb.keys()):
            return float("nan")
        for k in ra:
            worst = max(worst, float((ra.get(k) - rb.get(k)).abs().max()))
    del torch
    return worst


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------- driver
def mergekit_yaml(method: str, a: Path, b: Path, c: Path) -> str:
    if method == "interpolation":
        return (
            f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.75}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.25}}\ndtype: float32\n"
        )
    name, params = {
        "modality_arithmetic": ("task_arithmetic", "{weight: 0.5}"),
        "ties": ("ties", "{weight: 1.0, density: 0.5}"),
        "dare": ("dare_linear", "{weight: 1.0, density: 0.5}"),
    }[method]
    norm = "false" if method == "modality_arithmetic" else "true"
    return (
        f"merge_method: {name}\nbase_model: {c}\nparameters: {{normalize: {norm}}}\nmodels:\n"
        f"  - model: {a}\n    parameters: {params}\n"
        f"  - model: {b}\n    parameters: {params}\ndtype: float32\n"
    )


OURS_PARAMS: dict[str, dict[str, Any]] = {
    "interpolation": {"alpha": 0.75},
    "modality_arithmetic": {"lam": 0.5},
    "ties": {"density": 0.5},
    "dare": {"drop": 0.5, "seed": 0},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--vl-layers", type=int, default=2)
    ap.add_argument("--methods", default="interpolation,modality_arithmetic,ties,dare")
    ap.add_argument("--mergekit-python", default=str(HERE.parents[1] / ".venv-bench" / "bin" / "python"))
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest is reported")
    ap.add_argument("--workdir", help="where to generate the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--out", default=str(HERE.parent / "results" / "merge_throughput.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vlmerge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    methods = [m for m in args.methods.split(",") if m]
    rows: list[dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        dirs = generate(work, args.layers, args.dim, args.ffn, args.vocab, args.vl_layers)
        gen_s = time.perf_counter() - t0
        sizes = {k: dir_bytes(v) / 1e9 for k, v in dirs.items()}
        print(
            f"generated in {gen_s:.0f}s: " + ", ".join(f"{k} {v:.2f} GB" for k, v in sizes.items()),
            flush=True,
        )
        a, b, c = dirs["A"], dirs["B"], dirs["C"]

        # Every row is one spec; the specs run in rounds (each round runs every row once, in this order)
        # so slow spells of the VM or its disk spread over all rows instead of hitting one row's repeats.
        specs: list[dict[str, Any]] = []

        def spec(label: str, group: str, task: dict[str, Any], floor: str | None = None, **kw: Any) -> None:
            specs.append({"label": label, "group": group, "task": task, "floor": floor, **kw})

        spec("floor: read A,B + write", "models", {"kind": "floor_models", "inputs": [str(a), str(b)]})
        spec("floor: read A,B,C + write", "models", {"kind": "floor_models", "inputs": [str(a), str(b), str(c)]})
        for m in methods:
            base = None if m == "interpolation" else str(c)
            floor = "floor: read A,B + write" if base is None else "floor: read A,B,C + write"
            task = {"kind": "ours_models", "method": m, "inputs": [str(a), str(b)], "base": base,
                    "params": OURS_PARAMS[m]}
            spec(f"vlmerge {m}", "models", task, floor, keep_output=True)
            if Path(args.mergekit_python).exists():
                yaml_text = mergekit_yaml(m, a, b, c)
                spec(f"mergekit {yaml_text.split()[1]}", "models", {"kind": "mergekit", "yaml": yaml_text}, floor,
                     python=args.mergekit_python, compare=m != "dare")
        msa, seed = dirs["msa"], dirs["seed"]
        spec("floor: read MSA + write", "modality", {"kind": "floor_modality", "input": str(msa)})
        spec("floor: read MSA,seed + write", "modality",
             {"kind": "floor_modality", "input": str(msa), "base": str(seed)})
        for m in methods:
            base = None if m == "interpolation" else str(seed)
            floor = "floor: read MSA + write" if base is None else "floor: read MSA,seed + write"
            task = {"kind": "ours_modality", "method": m, "input": str(msa), "base": base, "params": OURS_PARAMS[m]}
            spec(f"vlmerge {m}", "modality", task, floor)

        out, keep_ours = work / "out", work / "ours_out"
        best: dict[tuple[str, str], dict[str, Any]] = {}
        times: dict[tuple[str, str], list[float]] = {}  # every round's time, for the medians
        diffs: dict[tuple[str, str], float] = {}
        for rnd in range(args.repeat):
            for sp in specs:
                key = (sp["group"], sp["label"])
                if "error" in best.get(key, {}):
                    continue
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # no writeback of the previous output during this run
                task = {**sp["task"], "out": str(out), "err": str(work / "child.err")}
                res = run_child_measured(sp.get("python", py), task)
                if "error" not in res:
                    times.setdefault(key, []).append(res["seconds"])
                if "error" in res or key not in best or res["seconds"] < best[key]["seconds"]:
                    best[key] = {**res, "label": sp["label"], "group": sp["group"]}
                print(
                    f"round {rnd + 1}/{args.repeat}  {sp['group']:<9} {sp['label']:<32} "
                    + (f"ERROR {res['error']}" if "error" in res else
                       f"{res['seconds']:7.2f}s  rss {res['rss_mb']:7.0f} MB"),
                    flush=True,
                )
                if rnd == 0 and sp.get("keep_output"):  # compared with mergekit's output, next row
                    shutil.rmtree(keep_ours, ignore_errors=True)
                    if out.exists():
                        os.rename(out, keep_ours)
                if rnd == 0 and sp.get("compare") and "error" not in res and keep_ours.exists():
                    diffs[key] = max_abs_diff(keep_ours, out)
                    print(f"          max |vlmerge − mergekit| = {diffs[key]:.3g}", flush=True)
        shutil.rmtree(keep_ours, ignore_errors=True)
        for sp in specs:
            key = (sp["group"], sp["label"])
            row = best[key]
            if key in times:
                row["median"] = statistics.median(times[key])
            if key in diffs:
                row["max_abs_diff_vs_vlmerge"] = diffs[key]
            if sp["floor"] is not None:
                ref = best[(sp["group"], sp["floor"])]
                row["floor"], row["floor_rss"] = ref.get("seconds"), ref.get("rss_mb")
                row["floor_median"] = ref.get("median")
            rows.append(row)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    report = render(rows, sizes, args, gen_s)
    print("\n" + report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(f"\nwritten to {args.out}")
    return 0


def render(
    rows: list[dict[str, Any]], sizes: dict[str, float], args: argparse.Namespace, gen_s: float
) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    mk_ver = (
        subprocess.run(
            [
                args.mergekit_python,
                "-c",
                "import mergekit.merge, importlib.metadata as m;print(m.version('mergekit'))",
            ],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if Path(args.mergekit_python).exists()
        else "not installed"
    )
    cmd = "/work/main/.venv/bin/python benchmarks/merge_throughput.py" + "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}"
        for k in ("layers", "dim", "ffn", "vocab")
        if getattr(args, k) != {"layers": 12, "dim": 1024, "ffn": 4096, "vocab": 8000}[k]
    ) + f" --repeat {args.repeat}"
    lines = [
        "# Merge throughput and peak memory",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU; "
        f"Python {platform.python_version()}, "
        f"torch {torch.__version__}; mergekit {mk_ver} (separate venv `.venv-bench`).",
        "",
        "Inputs (random float32, Llama-shaped tensors: "
        f"{args.layers} layers, dim {args.dim}, ffn {args.ffn}, vocab {args.vocab}; "
        f"generated in {gen_s:.0f} s): " + ", ".join(f"{k} {v:.2f} GB" for k, v in sizes.items()) + ". "
        f"Pair A+B = {sizes['A'] + sizes['B']:.2f} GB; "
        "MSA = A's tensors as `v`, B's as `l`, random `vl` in the top "
        f"{args.vl_layers} layers; seed = C under the `shared` names.",
        "",
        f"Each row is the fastest of {args.repeat} fresh processes (`os.sync()` before each), run in "
        f"{args.repeat} rounds that each run every row once, so slow spells of the VM spread over all rows. "
        "*time*: in-process wall time of the merge call (imports excluded), the fastest round, and "
        "*× floor* its ratio to the fastest floor; *median*: the median round, and its ratio to the floor's "
        "median (the VM's disk makes single rounds vary by up to ~50 %); "
        "*process*: the whole child process; *RSS*: the child's peak resident set (`ru_maxrss`). "
        "Floors, measured "
        "in the same run: read every input tensor once (`vlmerge.merge.io.StreamingReader`, pread into fresh "
        "memory) and write the output once (`SafetensorsStreamWriter`), single-threaded. vlmerge's merges "
        "read and merge the next two slots in worker threads while the main thread writes the current one, "
        "into recycled output buffers; the linear merges and DARE check their result for NaN / Inf instead of "
        "every input (the floors check nothing). "
        "mergekit reads through its own lazy safetensors loader (mmap). Inputs are in the page cache (warm); "
        "vlmerge's writer (floors included) fsyncs the output before returning, so every vlmerge row "
        "includes putting the output on the (virtual) disk.",
        "",
        "| group | run | time (s) | process (s) | × floor | median (s) | median × floor median | peak RSS (MB) "
        "| RSS − floor RSS (MB) | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['group']} | {r['label']} | – | {r['wall']:.1f} | – | – | – | – | – | failed: {r['error']} |"
            )
            continue
        ratio = (
            f"{r['seconds'] / r['floor']:.2f}" if r.get("floor") else "1.00" if "floor" in r["label"] else "–"
        )
        drss = f"{r['rss_mb'] - r['floor_rss']:+.0f}" if r.get("floor_rss") else "–"
        mratio = (
            f"{r['median'] / r['floor_median']:.2f}" if r.get("floor_median")
            else "1.00" if "floor" in r["label"] else "–"
        )
        note = ""
        if "max_abs_diff_vs_vlmerge" in r:
            note = f"max abs diff vs vlmerge {r['max_abs_diff_vs_vlmerge']:.2g}"
        lines.append(
            f"| {r['group']} | {r['label']} | {r['seconds']:.2f} | {r['wall']:.1f} | {ratio} | "
            f"{r['median']:.2f} | {mratio} | "
            f"{r['rss_mb']:.0f} | {drss} | {note} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
