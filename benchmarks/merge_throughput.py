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
reading every input tensor once through ``StreamingReader`` (the merges' reader, which maps each tensor's
pages; the floor then reads every byte of it, a sum) and writing the output once through
``SafetensorsStreamWriter`` (same shapes, same names). The files sit in the page cache (just written, and
24 GiB RAM), so these are warm-cache numbers: the floor is memory-bandwidth bound, not disk bound.

Suites (``--suite``, default ``all``):

* ``native``: vlmerge's own merges (``--methods``) on the pair and on the MSA checkpoint, with mergekit's
  nearest method beside them; writes the whole ``--out`` file (the table; notes are added by hand).
* ``yaml``: the mergekit-YAML methods of ``vlmerge merge CONFIG.yaml OUT_DIR`` (``--yaml-methods``, default
  every one of :data:`vlmerge.merge.mergekit.MERGE_METHODS`), each config (:func:`yaml_configs`: A, B, base
  C; written to ``WORK/yaml/METHOD.yml``) run through :func:`vlmerge.merge.mergekit.load_mergekit_config` +
  :func:`~vlmerge.merge.mergekit.run_mergekit` (in-process time, config loading included) against the IO floor
  of the same inputs (1, 2 or 3 models), and the very same YAML file through mergekit when
  ``--mergekit-python`` exists (``mergekit.merge.run_merge`` in-process, CPU, ``lazy_unpickle``, random seed 0,
  no tokenizer copy / model card: what ``mergekit-yaml CFG OUT --lazy-unpickle --random-seed 0`` runs; the
  inputs are safetensors, so the unpickler is unused). mergekit runs ``--mergekit-repeat`` rounds (default 1:
  it is the slow side; vlmerge and the floors run ``--repeat``). Agreement, from the first round's outputs:
  for deterministic methods the largest ``|vlmerge − mergekit|`` over every entry of every tensor, that
  relative to the tensor's largest ``|mergekit|``, and the count of entries off by more than 1e-5 of it
  (tie-order picks); for the random ones (``dare_*``, ``della*``: the generators differ, bits cannot match)
  statistics of ``Δ = out − base`` per tensor: the kept fraction (``Δ ≠ 0``) of both tools and the largest
  per-tensor difference of it, and the largest ``|‖Δ_vl‖₁ / ‖Δ_mk‖₁ − 1|``. The section is spliced into
  ``--out`` between ``<!-- yaml suite -->`` markers (inserted before ``## Design measurements`` the first
  time), keeping the rest of the file.

Children run a copy of this script made at the start (``WORK/merge_throughput_child.py``), so a checkout or
stash of the working tree mid-run cannot change the rows; vlmerge itself is imported from ``src/`` by every
child, so a change there during the run (HEAD plus a hash of ``git diff HEAD -- src`` and untracked files,
before vs after) is printed and flagged in the yaml section.

The mergekit venv (``--mergekit-python``; torch first, so pip does not pull a CUDA build)::

    python3 -m venv V && V/bin/pip install torch==2.13.0 && V/bin/pip install mergekit==0.1.5

The run behind the committed yaml section (2-core VM; see the section for the machine)::

    .venv/bin/python benchmarks/merge_throughput.py --suite yaml --layers 4 --mergekit-python /tmp/mkvenv/bin/python \
        --workdir /tmp/mtwork --keep
"""

from __future__ import annotations

import argparse
import json
import math
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
#: The script the children run: main() copies this file into the work dir, so edits of the working tree
#: during a run (a checkout, a stash) cannot change what later rows run.
CHILD_SCRIPT = HERE


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

    from vlmerge.models.checkpoint import SafetensorsStreamWriter, atomic_write_json

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
    # the MSA checkpoint: a real VLMo MSA of the same width, depth and vocabulary (a modality merge validates
    # its input's config, keys and shapes), random weights; the seed: the modality-agnostic model (MAA) of the
    # same size, random, whose shared block weights the merges start from
    from vlmerge.models.checkpoint import FORMAT
    from vlmerge.models.vlmo import ModelConfig, param_shapes

    for name, arch, seed in (("msa", "msa", 7), ("seed", "maa", 8)):
        mcfg = ModelConfig(arch=arch, embed_dim=dim, mlp_ratio=ffn / dim, depth=layers, num_heads=max(1, dim // 64),
                           num_vl_layers=vl_layers, vocab_size=vocab)
        shapes = param_shapes(mcfg)
        g = torch.Generator().manual_seed(seed)
        with SafetensorsStreamWriter(work / name / "model.safetensors",
                                     {k: (torch.float32, tuple(s)) for k, s in shapes.items()},
                                     {"format": "pt"}) as w:
            for k, s in shapes.items():
                w.write(k, torch.randn(tuple(s), generator=g) * 0.02)
        atomic_write_json(work / name / "config.json", {"format": FORMAT, "model": mcfg.to_dict()})
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

        text = Path(task["yaml_path"]).read_text() if "yaml_path" in task else task["yaml"]
        cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
        opts = MergeOptions(
            copy_tokenizer=False, lazy_unpickle=True, write_model_card=False, quiet=True, random_seed=0
        )
        t0 = time.perf_counter()
        run_merge(cfg, task["out"], options=opts)
        return {"seconds": time.perf_counter() - t0}
    if kind == "ours_yaml":  # vlmerge merge CONFIG.yaml OUT_DIR, minus the CLI's argument parsing
        from vlmerge.merge.mergekit import load_mergekit_config, run_mergekit

        t0 = time.perf_counter()
        run_mergekit(load_mergekit_config(task["yaml_path"]), task["out"])
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
                for t in ts:
                    read_every_byte(t)
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
                for t in ts:
                    read_every_byte(t)
                w.write(k, ts[0])
    else:
        raise ValueError(kind)
    return {"seconds": time.perf_counter() - t0}


def read_every_byte(t: Any) -> float:
    """Read all of tensor ``t``'s bytes once (a sum; memory-bound for float32): ``StreamingReader.get`` only
    maps a tensor's pages, so a floor that did not touch them would read nothing."""
    import torch

    return float(t.sum() if t.is_floating_point() else t.reshape(-1).view(torch.uint8).sum())


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
        os.execve(python, [python, str(CHILD_SCRIPT), "--child", json.dumps(task)], env)
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


def agreement(ours: Path, theirs: Path) -> dict[str, Any]:
    """Deterministic methods: the largest ``|ours − theirs|`` over every entry, that relative to the tensor's
    largest ``|theirs|``, and the entries off by more than 1e-5 of it (float64 differences)."""
    from vlmerge.models.checkpoint import CheckpointReader

    worst = worst_rel = 0.0
    off = total = 0
    with CheckpointReader(ours) as ra, CheckpointReader(theirs) as rb:
        if set(ra.keys()) != set(rb.keys()):
            return {"keys": sorted(set(ra.keys()) ^ set(rb.keys()))[:4]}
        for k in ra:
            a, b = ra.get(k).double(), rb.get(k).double()
            d = (a - b).abs()
            scale = max(float(b.abs().max()), 1e-30)
            dmax = float(d.max())
            worst, worst_rel = max(worst, dmax), max(worst_rel, dmax / scale)
            off += int((d > 1e-5 * scale).sum())
            total += d.numel()
    return {"max_abs": worst, "max_rel": worst_rel, "off": off, "entries": total}


def random_stats(ours: Path, theirs: Path, base: Path) -> dict[str, Any]:
    """Random methods: per tensor ``Δ = out − base``; the kept fraction ``mean(Δ ≠ 0)`` over all entries for
    both, the largest per-tensor difference of it, and the largest per-tensor ``|‖Δ_ours‖₁ / ‖Δ_theirs‖₁ − 1|``."""
    from vlmerge.models.checkpoint import CheckpointReader

    kept_a = kept_b = total = 0
    dkept = dl1 = 0.0
    with CheckpointReader(ours) as ra, CheckpointReader(theirs) as rb, CheckpointReader(base) as rc:
        if set(ra.keys()) != set(rb.keys()):
            return {"keys": sorted(set(ra.keys()) ^ set(rb.keys()))[:4]}
        for k in ra:
            c = rc.get(k).double()
            da, db = ra.get(k).double() - c, rb.get(k).double() - c
            ka, kb = int((da != 0).sum()), int((db != 0).sum())
            kept_a, kept_b, total = kept_a + ka, kept_b + kb, total + da.numel()
            dkept = max(dkept, abs(ka - kb) / da.numel())
            la, lb = float(da.abs().sum()), float(db.abs().sum())
            if lb > 0:
                dl1 = max(dl1, abs(la / lb - 1))
    return {"kept_ours": kept_a / total, "kept_theirs": kept_b / total, "max_dkept": dkept, "max_dl1": dl1}


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


#: Method classes of the issue's targets: elementwise ≤ 1.2× the IO floor; selection-based ≤ 2× the floor and
#: ≤ 0.2× mergekit's time. karcher (an iterated spherical mean) is counted with the SLERP family.
ELEMENTWISE = ("linear", "task_arithmetic", "slerp", "nuslerp", "multislerp", "karcher", "dare_linear",
               "dare_ties", "passthrough")
SELECTION = ("ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock")
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")
YAML_FLOORS = {1: "floor: read A + write", 2: "floor: read A,B + write", 3: "floor: read A,B,C + write"}
YAML_BEGIN, YAML_END = "<!-- yaml suite: begin (benchmarks/merge_throughput.py --suite yaml) -->", \
    "<!-- yaml suite: end -->"


def yaml_configs(a: Path, b: Path, c: Path) -> dict[str, tuple[dict[str, Any], list[Path]]]:
    """method -> (mergekit config, the inputs it reads: its floor). Task-vector methods, model_stock and sce
    merge A and B onto the base C; the interpolations (linear, the SLERP family, karcher) take A and B alone
    (slerp: base A); passthrough copies A."""

    def models(*ps: tuple[Path, dict[str, Any] | None]) -> list[dict[str, Any]]:
        return [{"model": str(p), **({"parameters": q} if q else {})} for p, q in ps]

    tv = {"weight": 1.0, "density": 0.5}
    cfgs: dict[str, tuple[dict[str, Any], list[Path]]] = {
        "linear": ({"models": models((a, {"weight": 0.75}), (b, {"weight": 0.25}))}, [a, b]),
        "task_arithmetic": ({"base_model": str(c), "models": models((a, {"weight": 0.5}), (b, {"weight": 0.5}))},
                            [a, b, c]),
        **{m: ({"base_model": str(c), "models": models((a, tv), (b, tv))}, [a, b, c])
           for m in ("ties", "dare_linear", "dare_ties", "della", "della_linear")},
        **{m: ({"base_model": str(c), "models": models((a, {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
                                                         (b, {"weight": 1.0, "density": 0.9, "gamma": 0.01}))},
               [a, b, c]) for m in ("breadcrumbs", "breadcrumbs_ties")},
        "model_stock": ({"base_model": str(c), "models": models((a, None), (b, None))}, [a, b, c]),
        "sce": ({"base_model": str(c), "parameters": {"select_topk": 0.5}, "models": models((a, None), (b, None))},
                [a, b, c]),
        "slerp": ({"base_model": str(a), "parameters": {"t": 0.5}, "models": models((a, None), (b, None))}, [a, b]),
        "nuslerp": ({"models": models((a, {"weight": 0.5}), (b, {"weight": 0.5}))}, [a, b]),
        "multislerp": ({"models": models((a, {"weight": 1.0}), (b, {"weight": 1.0}))}, [a, b]),
        "karcher": ({"models": models((a, None), (b, None))}, [a, b]),
        "passthrough": ({"models": models((a, None))}, [a]),
    }
    return {m: ({"merge_method": m, **cfg, "dtype": "float32"}, ins) for m, (cfg, ins) in cfgs.items()}


def splice(text: str, block: str) -> str:
    """``text`` with its yaml-suite block (between :data:`YAML_BEGIN` / :data:`YAML_END`) replaced by ``block``;
    without one, ``block`` goes before ``## Design measurements`` (else at the end)."""
    if YAML_BEGIN in text and YAML_END in text:
        head, rest = text.split(YAML_BEGIN, 1)
        tail = rest.split(YAML_END, 1)[1].lstrip("\n")
        return head + block + ("\n" + tail if tail else "")
    if "\n## Design measurements" in text:
        head, tail = text.split("\n## Design measurements", 1)
        return head.rstrip("\n") + "\n\n" + block + "\n## Design measurements" + tail
    return text.rstrip("\n") + "\n\n" + block


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--vl-layers", type=int, default=2)
    ap.add_argument("--suite", choices=("all", "native", "yaml"), default="all")
    ap.add_argument("--methods", default="interpolation,modality_arithmetic,ties,dare")
    ap.add_argument("--yaml-methods", default="all", help="mergekit-YAML methods (comma-separated, or all)")
    ap.add_argument("--mergekit-python", default=str(HERE.parents[1] / ".venv-bench" / "bin" / "python"))
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest is reported")
    ap.add_argument("--mergekit-repeat", type=int, default=1, help="runs per mergekit row of the yaml suite")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="the date the yaml section names")
    ap.add_argument("--workdir", help="where to generate the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--out", default=str(HERE.parent / "results" / "merge_throughput.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from vlmerge.merge.mergekit import MERGE_METHODS

    yaml_methods = list(MERGE_METHODS) if args.yaml_methods == "all" else [
        m for m in args.yaml_methods.split(",") if m]
    unknown = [m for m in yaml_methods if m not in MERGE_METHODS]
    if unknown:
        ap.error(f"--yaml-methods: unknown {', '.join(unknown)} (expected {', '.join(MERGE_METHODS)})")
    native, with_yaml = args.suite in ("all", "native"), args.suite in ("all", "yaml")
    have_mk = Path(args.mergekit_python).exists()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vlmerge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    global CHILD_SCRIPT
    CHILD_SCRIPT = work / "merge_throughput_child.py"
    shutil.copyfile(HERE, CHILD_SCRIPT)
    src_before = src_state()
    py = sys.executable
    methods = [m for m in args.methods.split(",") if m] if native else []
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

        if native:
            spec("floor: read A,B + write", "models", {"kind": "floor_models", "inputs": [str(a), str(b)]})
            spec("floor: read A,B,C + write", "models",
                 {"kind": "floor_models", "inputs": [str(a), str(b), str(c)]})
        for m in methods:
            base = None if m == "interpolation" else str(c)
            floor = "floor: read A,B + write" if base is None else "floor: read A,B,C + write"
            task = {"kind": "ours_models", "method": m, "inputs": [str(a), str(b)], "base": base,
                    "params": OURS_PARAMS[m]}
            spec(f"vlmerge {m}", "models", task, floor, keep_output=True)
            if have_mk:
                yaml_text = mergekit_yaml(m, a, b, c)
                spec(f"mergekit {yaml_text.split()[1]}", "models", {"kind": "mergekit", "yaml": yaml_text}, floor,
                     python=args.mergekit_python, compare="max" if m != "dare" else None)
        if native:
            msa, seed = dirs["msa"], dirs["seed"]
            spec("floor: read MSA + write", "modality", {"kind": "floor_modality", "input": str(msa)})
            spec("floor: read MSA,seed + write", "modality",
                 {"kind": "floor_modality", "input": str(msa), "base": str(seed)})
        for m in methods:
            base = None if m == "interpolation" else str(seed)
            floor = "floor: read MSA + write" if base is None else "floor: read MSA,seed + write"
            task = {"kind": "ours_modality", "method": m, "input": str(msa), "base": base, "params": OURS_PARAMS[m]}
            spec(f"vlmerge {m}", "modality", task, floor)
        if with_yaml:
            import yaml

            cfgs = {m: cfg for m, cfg in yaml_configs(a, b, c).items() if m in yaml_methods}
            counts = sorted({len(ins) for _, ins in cfgs.values()})
            for n_in in counts:
                ins = [a, b, c][:n_in]
                spec(YAML_FLOORS[n_in], "yaml", {"kind": "floor_models", "inputs": [str(p) for p in ins]})
            (work / "yaml").mkdir(exist_ok=True)
            for m in yaml_methods:
                cfg, ins = cfgs[m]
                path = work / "yaml" / f"{m}.yml"
                path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                floor = YAML_FLOORS[len(ins)]
                spec(f"vlmerge {m}", "yaml", {"kind": "ours_yaml", "yaml_path": str(path)}, floor,
                     keep_output=have_mk, method=m, cfg=cfg)
                if have_mk:
                    spec(f"mergekit {m}", "yaml", {"kind": "mergekit", "yaml_path": str(path)}, floor,
                         python=args.mergekit_python, method=m, rounds=args.mergekit_repeat,
                         compare="stats" if m in RANDOM_METHODS else "agreement",
                         base=cfg.get("base_model"))

        out, keep_ours = work / "out", work / "ours_out"
        best: dict[tuple[str, str], dict[str, Any]] = {}
        times: dict[tuple[str, str], list[float]] = {}  # every round's time, for the medians
        diffs: dict[tuple[str, str], Any] = {}
        for rnd in range(args.repeat):
            for sp in specs:
                key = (sp["group"], sp["label"])
                if "error" in best.get(key, {}) or rnd >= sp.get("rounds", args.repeat):
                    continue
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # no writeback of the previous output during this run
                task = {**sp["task"], "out": str(out), "err": str(work / "child.err")}
                res = run_child_measured(sp.get("python", py), task)
                if "error" not in res:
                    times.setdefault(key, []).append(res["seconds"])
                if "error" in res or key not in best or res["seconds"] < best[key]["seconds"]:
                    best[key] = {**res, "label": sp["label"], "group": sp["group"], "method": sp.get("method")}
                print(
                    f"round {rnd + 1}/{args.repeat}  {sp['group']:<9} {sp['label']:<32} "
                    + (f"ERROR {res['error']}" if "error" in res else
                       f"{res['seconds']:7.2f}s  rss {res['rss_mb']:7.0f} MB"),
                    flush=True,
                )
                if rnd == 0 and sp.get("keep_output"):  # compared with mergekit's output, next row
                    shutil.rmtree(keep_ours, ignore_errors=True)
                    if out.exists() and "error" not in res:
                        os.rename(out, keep_ours)
                if rnd == 0 and sp.get("compare") and "error" not in res and keep_ours.exists():
                    if sp["compare"] == "max":
                        diffs[key] = max_abs_diff(keep_ours, out)
                        print(f"          max |vlmerge − mergekit| = {diffs[key]:.3g}", flush=True)
                    elif sp["compare"] == "agreement":
                        diffs[key] = agreement(keep_ours, out)
                        print(f"          agreement {diffs[key]}", flush=True)
                    else:
                        diffs[key] = random_stats(keep_ours, out, Path(sp["base"]))
                        print(f"          statistics {diffs[key]}", flush=True)
                if rnd == 0 and sp.get("compare"):
                    shutil.rmtree(keep_ours, ignore_errors=True)
        shutil.rmtree(keep_ours, ignore_errors=True)
        largest = max(math.prod(s) for s in llama_specs(args.layers, args.dim, args.ffn, args.vocab).values()) * 4
        for sp in specs:
            key = (sp["group"], sp["label"])
            row = best[key]
            if key in times:
                row["median"] = statistics.median(times[key])
            if key in diffs:
                row["max_abs_diff_vs_vlmerge" if sp["compare"] == "max" else "check"] = diffs[key]
            if sp["floor"] is not None:
                ref = best[(sp["group"], sp["floor"])]
                row["floor"], row["floor_rss"] = ref.get("seconds"), ref.get("rss_mb")
                row["floor_median"] = ref.get("median")
                row["floor_label"] = sp["floor"]
            rows.append(row)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    args.src_changed = src_state() != src_before
    if args.src_changed:
        print("WARNING: src/ changed during the run (its rows may mix code versions)", flush=True)
    outp = Path(args.out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    old = outp.read_text() if outp.exists() else ""
    if native:
        report = render([r for r in rows if r["group"] != "yaml"], sizes, args, gen_s)
        print("\n" + report)
        if YAML_BEGIN in old and YAML_END in old and not with_yaml:  # keep the yaml section of an earlier run
            report = splice(report, YAML_BEGIN + old.split(YAML_BEGIN, 1)[1].split(YAML_END, 1)[0] + YAML_END + "\n")
        old = report
    if with_yaml:
        block = render_yaml([r for r in rows if r["group"] == "yaml"], sizes, args, gen_s, largest,
                            argv if argv is not None else sys.argv[1:])
        print("\n" + block)
        old = splice(old, YAML_BEGIN + "\n" + block + YAML_END + "\n")
    outp.write_text(old)
    print(f"\nwritten to {args.out}")
    return 0


def src_state() -> str:
    """HEAD and a hash of the working tree's changes under src/ (``git diff HEAD`` and untracked files)."""
    git = ["git", "-C", str(HERE.parents[1])]
    out = [subprocess.run([*git, *a], capture_output=True, text=True).stdout for a in (
        ["rev-parse", "HEAD"], ["diff", "HEAD", "--", "src"], ["ls-files", "--others", "--exclude-standard", "src"])]
    untracked = [HERE.parents[1] / f for f in out[2].split()]
    blob = "".join(out[:2]) + "".join(f.read_text(errors="replace") for f in untracked if f.is_file())
    import hashlib

    return hashlib.sha256(blob.encode()).hexdigest()


def machine(args: argparse.Namespace) -> tuple[str, float, str]:
    """(CPU model name, RAM GiB, mergekit version or 'not installed')."""
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
    return cpu, mem, mk_ver


def _target(method: str, r: dict[str, Any], mk: dict[str, Any] | None) -> str:
    """The issue's target for ``method``'s row ``r`` (mergekit's row ``mk``): met on the fastest and the median
    round, met on the fastest only, or missed (naming what)."""
    if method in ELEMENTWISE:
        lim, vs_mk = 1.2, False
    elif method in SELECTION:
        lim, vs_mk = 2.0, True
    else:
        return "–"
    fast, med = r["seconds"] / r["floor"], r["median"] / r["floor_median"]
    missed = []
    if fast > lim:
        missed.append(f"{fast:.2f}× floor > {lim:g}×")
    if vs_mk and mk is not None and "seconds" in mk and r["seconds"] > 0.2 * mk["seconds"]:
        missed.append(f"{r['seconds'] / mk['seconds']:.2f}× mergekit > 0.2×")
    if missed:
        return "**missed**: " + "; ".join(missed)
    what = f"≤ {lim:g}× floor" + (", ≤ 0.2× mergekit" if vs_mk and mk is not None else "")
    return f"met ({what})" if med <= lim else f"met on the fastest round ({what}); median {med:.2f}×"


def _check_cell(method: str, chk: dict[str, Any] | None) -> str:
    if chk is None:
        return "–"
    if "keys" in chk:
        return f"different keys: {chk['keys']}"
    if method in RANDOM_METHODS:
        return (f"kept {chk['kept_ours']:.4f} vs {chk['kept_theirs']:.4f} (max per-tensor diff "
                f"{chk['max_dkept']:.1e}); L1 of Δ max per-tensor rel. diff {chk['max_dl1']:.1e}")
    off = f", {chk['off']} of {chk['entries']:.3g} entries > 1e-5 rel." if chk["off"] else ""
    return f"max abs {chk['max_abs']:.2g}, rel. {chk['max_rel']:.1g}{off}"


def render_yaml(rows: list[dict[str, Any]], sizes: dict[str, float], args: argparse.Namespace, gen_s: float,
                largest: int, argv: list[str]) -> str:
    import shlex

    import torch

    cpu, mem, mk_ver = machine(args)
    cmd = ".venv/bin/python benchmarks/merge_throughput.py " + " ".join(shlex.quote(x) for x in argv)
    git = ["git", "-C", str(HERE.parents[1])]
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout
    code = f"vlmerge at commit {rev or 'unknown'}" + (
        f" with uncommitted changes in {', '.join(sorted(line[3:] for line in dirty.splitlines()))}" if dirty else ""
    )
    by = {r["label"]: r for r in rows}
    reps = args.mergekit_repeat
    lines = [
        f"## mergekit-YAML methods: `vlmerge merge CONFIG.yaml OUT_DIR` vs mergekit ({args.date})",
        "",
        f"Command: `{cmd.strip()}`; {code}"
        + (" (**src/ changed during the run**: rows may mix code versions)." if args.src_changed else "."),
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU; "
        f"Python {platform.python_version()}, torch {torch.__version__}; mergekit {mk_ver} "
        f"(`{args.mergekit_python}`, built by `python3 -m venv V && V/bin/pip install torch==2.13.0 && "
        "V/bin/pip install mergekit==0.1.5`).",
        "",
        f"Inputs: the same generated Llama-named float32 models ({args.layers} layers, dim {args.dim}, ffn "
        f"{args.ffn}, vocab {args.vocab}; generated in {gen_s:.0f} s): A {sizes['A']:.2f} GB, B "
        f"{sizes['B']:.2f} GB, C {sizes['C']:.2f} GB; largest tensor {largest / 1e6:.0f} MB. Configs "
        "(`yaml_configs` in the script): task-vector methods, model_stock and sce merge A and B onto base C "
        "(weight 1, density 0.5; breadcrumbs* density 0.9, gamma 0.01; sce select_topk 0.5; task_arithmetic "
        "weight 0.5), linear A 0.75 + B 0.25, slerp t 0.5 (base A), nuslerp / multislerp A and B with equal "
        "weights, karcher A and B (defaults), passthrough A; each against the floor of the models it reads.",
        "",
        f"vlmerge and the floors: fastest of {args.repeat} fresh processes, run in rounds as above; mergekit: "
        f"{'the one run' if reps == 1 else f'fastest of {reps}'} (`run_merge` in-process, CPU, lazy unpickle, "
        "seed 0). Floors: read every input tensor once through `StreamingReader` (it maps the tensor's pages; "
        "a sum reads every byte) and write the output once, single-threaded, fsync included. "
        "*× floor*: fastest vlmerge round over the fastest floor round; *median ×*: median over "
        "median. *RSS − floor*: peak RSS above the floor's, also in largest tensors. vlmerge's mergekit runner "
        "reads and merges the next tensors in two worker threads while the main thread writes the current one "
        "(read the inputs, check them finite or, for linear / task arithmetic / passthrough, only the result, "
        "merge, cast, write; fsync at the end). *agreement*: deterministic methods, max |vlmerge − mergekit| "
        "over every entry and that "
        "relative to the tensor's max |mergekit|, with the count of entries off by > 1e-5 of it; random "
        "methods (generators differ): of Δ = out − C per tensor, the kept fraction (Δ ≠ 0) of vlmerge vs "
        "mergekit and the largest per-tensor |‖Δ_vl‖₁ / ‖Δ_mk‖₁ − 1|. *target* (the issue's): elementwise "
        "(linear, task arithmetic, SLERP family with karcher, DARE, passthrough) ≤ 1.2× floor; "
        "selection-based (TIES, breadcrumbs, DELLA, SCE, model stock) ≤ 2× floor and ≤ 0.2× mergekit, judged "
        "on the fastest rounds.",
        "",
        "| method | vlmerge (s) | × floor | median × | peak RSS (MB) | RSS − floor (MB / tensors) | mergekit (s) "
        "| mergekit RSS (MB) | vlmerge / mergekit | agreement | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for label in YAML_FLOORS.values():
        if label in by:
            r = by[label]
            lines.append(f"| {label} | {r['seconds']:.2f} | 1.00 | 1.00 | {r['rss_mb']:.0f} | – | – | – | – | – | – |")
    methods = [r["method"] for r in rows if r["label"].startswith("vlmerge ")]
    for m in methods:
        r, mk = by[f"vlmerge {m}"], by.get(f"mergekit {m}")
        if "error" in r:
            lines.append(f"| {m} | failed: {r['error']} | | | | | | | | | |")
            continue
        drss = r["rss_mb"] - r["floor_rss"]
        mk_s = mk_rss = ratio = "–"
        if mk is not None and "error" in mk:
            mk_s = f"failed: {mk['error']}"
        elif mk is not None:
            mk_s, mk_rss = f"{mk['seconds']:.2f}", f"{mk['rss_mb']:.0f}"
            ratio = f"{r['seconds'] / mk['seconds']:.2f}"
        lines.append(
            f"| {m} | {r['seconds']:.2f} | {r['seconds'] / r['floor']:.2f} | "
            f"{r['median'] / r['floor_median']:.2f} | {r['rss_mb']:.0f} | "
            f"{drss:+.0f} / {drss * 2**20 / largest:+.1f} | "
            f"{mk_s} | {mk_rss} | {ratio} | {_check_cell(m, (mk or {}).get('check'))} | "
            f"{_target(m, r, mk if mk is not None and 'error' not in mk else None)} |"
        )
    return "\n".join(lines) + "\n\n"


def render(
    rows: list[dict[str, Any]], sizes: dict[str, float], args: argparse.Namespace, gen_s: float
) -> str:
    import torch

    cpu, mem, mk_ver = machine(args)
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
        f"torch {torch.__version__}; mergekit {mk_ver} (separate venv: `{args.mergekit_python}`).",
        "",
        "Inputs (random float32, Llama-shaped tensors: "
        f"{args.layers} layers, dim {args.dim}, ffn {args.ffn}, vocab {args.vocab}; "
        f"generated in {gen_s:.0f} s): " + ", ".join(f"{k} {v:.2f} GB" for k, v in sizes.items()) + ". "
        f"Pair A+B = {sizes['A'] + sizes['B']:.2f} GB; "
        f"MSA = a VLMo MSA checkpoint of the same width, depth and vocabulary ({args.vl_layers} VL layers), "
        "random weights; seed = the modality-agnostic (MAA) checkpoint of that size, random.",
        "",
        f"Each row is the fastest of {args.repeat} fresh processes (`os.sync()` before each), run in "
        f"{args.repeat} rounds that each run every row once, so slow spells of the VM spread over all rows. "
        "*time*: in-process wall time of the merge call (imports excluded), the fastest round, and "
        "*× floor* its ratio to the fastest floor; *median*: the median round, and its ratio to the floor's "
        "median (the VM's disk makes single rounds vary by up to ~50 %); "
        "*process*: the whole child process; *RSS*: the child's peak resident set (`ru_maxrss`). "
        "Floors, measured "
        "in the same run: read every input tensor once (`vlmerge.merge.io.StreamingReader`, which maps the "
        "tensor's pages, and a sum that reads every byte) and write the output once "
        "(`SafetensorsStreamWriter`), single-threaded. vlmerge's merges "
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
