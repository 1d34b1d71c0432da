"""Checkpoint-level merges that stream: one slot's tensors in memory at a time, never a whole model.

* :func:`merge_checkpoint` -- the paper's merge: the modality copies (``v``/``l``/``vl``) of every block slot
  of ONE modality-specific checkpoint become the slot's ``shared`` weight (an MAA-shaped checkpoint).
* :func:`merge_models` -- N whole checkpoints with identical keys (UnIVAL-style soups / task merges).

Both first build a plan from the safetensors headers only (names, shapes, dtypes), check everything that
can be checked without reading a weight (keys, shapes, dtypes, base, Grams, per-layer schedules), and only
then open the output. The output is written into a temporary directory beside ``out_dir`` through
:class:`~vlmerge.models.checkpoint.SafetensorsStreamWriter` and renamed into place at the end, so a failed
or killed merge never leaves a partial checkpoint under ``out_dir``. Peak memory ≈ three of the largest
slot's inputs + output (two slots read and merged ahead while one is written; plus the pages of the
inputs the OS keeps cached). Results are written into recycled output buffers (``MergeContext.out``).
Every input is checked for NaN / Inf -- or, for methods whose result keeps any NaN / Inf of its inputs
(``MergeMethod.propagates_nonfinite``: the linear ones and DARE), the result is checked instead and the
inputs only when it is not finite; either way the error names the file and key. A result that overflows
from finite inputs is an error too, naming the tensor: no merge writes a NaN or Inf weight.

Before anything is read, the inputs are checked as checkpoints (:func:`~vlmerge.models.checkpoint.
check_checkpoint`: config, keys, shapes, dtypes) and the output against everything read
(:func:`~vlmerge.files.guard_output_dir`: never an input, a folder holding one or a folder inside one).

The output ``config.json`` is the input's with a ``"merge"`` record (method, params, weights, sources with
file fingerprints, base, Grams, version). :func:`merge_checkpoint` merges every modality-specific slot, so
the result is modality-agnostic and ``model.arch`` is set to ``"maa"``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import struct
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..files import guard_output_dir, make_temp_dir, publish_dir
from ..models.checkpoint import (
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    CheckpointReader,
    SafetensorsStreamWriter,
    atomic_write_json,
    check_checkpoint,
)
from ..models.roles import merge_groups, parse_param_name
from .base import MergeContext, MergeMethod, MergeParams, check_weights, get_method, is_finite, slot_problem
from .grams import gram_problem, open_grams
from .io import StreamingReader, is_torch_checkpoint, open_weights, torch_files

PathLike = str | os.PathLike[str]
GramsArg = Any  # a path, a Grams, or a {name: Gram} mapping (a sequence of those for merge_models)


@dataclass
class Job:
    """One output tensor: copied from ``sources[0]`` or merged from all ``sources``."""

    target: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    sources: list[tuple[Any, str]]  # (reader, key)
    merge: bool = True
    layer: int | None = None
    module: str | None = None
    modalities: tuple[str, ...] | None = None
    base: list[tuple[Any, str]] = field(default_factory=list)
    grams: list[tuple[Any, str]] | None = None
    weights: tuple[float, ...] | None = None


# ------------------------------------------------------------------------------------------------ helpers
def _listing(items: Sequence[str], n: int = 8) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def fingerprint(path: PathLike, full_hash: bool = False) -> dict[str, Any]:
    """Identify a checkpoint cheaply: per weight file, its size and the SHA-256 of its safetensors header
    (names, dtypes, shapes, offsets) -- for a PyTorch pickle (:func:`~.io.is_torch_checkpoint`), its size
    and modification time; with ``full_hash`` also the SHA-256 of the whole file."""
    p = Path(path)
    safetensors = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    files = torch_files(p) if is_torch_checkpoint(p) else safetensors
    out: dict[str, Any] = {"path": str(p)}
    for f in files:
        with open(f, "rb") as fh:
            entry: dict[str, Any] = {"bytes": f.stat().st_size}
            if f.suffix == ".safetensors":
                raw = fh.read(8)
                n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
                entry["header_sha256"] = hashlib.sha256(fh.read(min(n, 100_000_000))).hexdigest()
            else:
                entry["mtime"] = datetime.fromtimestamp(f.stat().st_mtime, timezone.utc).isoformat()
            if full_hash:
                h = hashlib.sha256()
                fh.seek(0)
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
                entry["sha256"] = h.hexdigest()
        out.setdefault("files", {})[f.name] = entry
    return out


def _prepare_output(out_dir: PathLike, reads: Sequence[Any], overwrite: bool) -> Path:
    """The absolute output folder, after refusing one that is, contains or lies inside anything read
    (inputs, base, Gram files) or that exists, is not empty and may not be replaced."""
    paths = [r for r in reads if isinstance(r, (str, os.PathLike))]
    return guard_output_dir(out_dir, paths, overwrite, clean_stale=True)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temp directory to ``out`` (:func:`~vlmerge.files.publish_dir`: renames only; killed
    between them, the previous output is restored by the next run on ``out``)."""
    publish_dir(tmp, out, overwrite, doing="merging")


def _load(src: tuple[Any, str]) -> torch.Tensor:
    reader, key = src
    return reader.get(key)


_WORKERS = 2
"""Slots read and merged ahead of the one being written. Two beat one on the 2-core benchmark (a slot's read,
its arithmetic and the previous slot's write all overlap; numbers in benchmarks/results/merge_throughput.md)
and cost one more slot of memory; more gained nothing."""


@contextmanager
def merge_workers(name: str) -> Iterator[ThreadPoolExecutor]:
    """The :data:`_WORKERS` threads that read and merge ahead of the writer, each running torch's CPU ops on
    ``max(1, torch.get_num_threads() // _WORKERS)`` intra-op threads, so workers and their OpenMP teams together
    use the cores once: on 2 cores each worker's 2-thread team oversubscribed them and spun at its barriers
    (TIES on the benchmark's Llama inputs: 2.52 s against 1.63 s with one intra-op thread, AMD EPYC). The
    caller's count is set again afterwards (OpenMP keeps the count per thread, but torch also records the last
    one set process-wide)."""
    before = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix=name, initializer=torch.set_num_threads,
                                initargs=(max(1, before // _WORKERS),)) as pool:
            yield pool
    finally:
        torch.set_num_threads(before)


class _OutputBuffers:
    """Flat float32 buffers that merges write their results into (``MergeContext.out``), recycled once a
    slot is written. Fresh memory costs a page fault per 4 KB on first touch (as much as DARE's arithmetic,
    see benchmarks/results/merge_throughput.md); a recycled buffer costs nothing. At most
    ``_WORKERS + 1`` buffers exist: as many as slots in flight. Thread-safe."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat buffer to give back later, a contiguous view of ``shape`` on its first entries)."""
        n = math.prod(shape)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= n]
            if fits:
                flat = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            else:
                if self._free:  # too small for this slot: free one rather than grow the set
                    self._free.pop(max(range(len(self._free)), key=lambda i: self._free[i].numel()))
                flat = torch.empty(n, dtype=torch.float32)
        return flat, flat[:n].view(shape)

    def give(self, flat: torch.Tensor) -> None:
        with self._lock:
            self._free.append(flat)


def read_ahead(pool: ThreadPoolExecutor, fn: Any, items: Sequence[Any], ahead: int = _WORKERS) -> Any:
    """``fn(item)`` for each of ``items``, yielded in order, with up to ``ahead`` later items running on
    ``pool`` meanwhile: the caller writes result i while workers read and merge i + 1 .. i + ``ahead`` (torch
    and numpy ops, which also take the page faults of the mapped inputs, and file writes release the GIL). A
    worker's exception is raised when its item's turn comes, so errors surface in item order."""
    queue = deque(pool.submit(fn, x) for x in items[:ahead])
    for i in range(len(items)):
        result = queue.popleft().result()
        if i + ahead < len(items):
            queue.append(pool.submit(fn, items[i + ahead]))
        yield result


def _execute(
    method: MergeMethod,
    params: MergeParams,
    jobs: list[Job],
    out: Path,
    config: dict[str, Any],
    progress: bool,
    overwrite: bool,
) -> Path:
    """Run ``jobs`` in output order into a temp dir beside ``out``; publish it on success."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        specs = {j.target: (j.dtype, j.shape) for j in jobs}
        order = sorted(jobs, key=lambda j: j.target)
        # Worker threads read and merge slots i + 1 .. i + _WORKERS while the main thread writes slot i, in
        # order (torch and numpy ops and file writes release the GIL): the merge's arithmetic hides
        # behind the output write, the larger half of the IO; memory holds _WORKERS + 1 slots at most.
        buffers = _OutputBuffers()
        deferred = method.propagates_nonfinite  # check merged results, not every input

        def produce(job: Job) -> tuple[torch.Tensor, torch.Tensor | None]:
            if not job.merge:
                return _merge_job(method, params, job, _load_job(job)), None
            flat, out_buf = buffers.take(job.shape)
            loaded = _load_job(job, check=not deferred)
            return _merge_job(method, params, job, loaded, out_buf, deferred), flat

        with (
            SafetensorsStreamWriter(tmp / WEIGHTS_NAME, specs, {"format": "pt"}) as writer,
            merge_workers("vlmerge-merge") as pool,
        ):
            results = read_ahead(pool, produce, order)
            for job, (merged, flat) in zip(
                tqdm(order, disable=not progress, desc=f"merge:{method.name}", unit="tensor"), results,
                strict=True,
            ):
                writer.write(job.target, merged)
                del merged
                if flat is not None:  # written: its buffer may take the next result
                    buffers.give(flat)
        atomic_write_json(tmp / CONFIG_NAME, config)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class Loaded:
    """One job's tensors, read (by a worker thread) and checked."""

    tensors: list[torch.Tensor]
    base: list[torch.Tensor]
    grams: tuple[torch.Tensor, ...] | None


def _load_job(job: Job, check: bool = True) -> Loaded:
    """Read one job's tensors (in a worker thread, overlapping the write of earlier slots); NaN/Inf-check
    them unless ``check`` is False (the caller checks the merged result instead)."""
    tensors = [_load(s) for s in job.sources]
    base = [_load(s) for s in job.base]
    grams = tuple(_load(s) for s in job.grams) if job.grams is not None else None
    loaded = Loaded(tensors, base, grams)
    if check:
        _check_finite(job, loaded)
    for (src, key), g in zip(job.grams or [], grams or (), strict=True):
        problem = gram_problem(g)
        if problem:
            raise ValueError(f"{getattr(src, 'path', 'Grams given in memory')}: the Gram of {key!r} {problem}")
    return loaded


def _check_finite(job: Job, loaded: Loaded) -> None:
    """``ValueError`` naming the file and key of the first input or base tensor holding a NaN or Inf (Grams:
    :func:`~.grams.gram_problem`, in :func:`_load_job`)."""
    for (reader, key), t in zip(job.sources, loaded.tensors, strict=True):
        if not is_finite(t):
            raise ValueError(f"{reader.path}: tensor {key!r} contains NaN or Inf")
    for (reader, key), t in zip(job.base, loaded.base, strict=True):
        if not is_finite(t):
            raise ValueError(f"{reader.path}: base tensor {key!r} contains NaN or Inf")


def _merge_job(
    method: MergeMethod,
    params: MergeParams,
    job: Job,
    loaded: Loaded,
    out: torch.Tensor | None = None,
    check_result: bool = False,
) -> torch.Tensor:
    """Merge one loaded job into ``out`` (a recycled buffer) if the method takes it. ``check_result``: the
    inputs were not NaN/Inf-checked, so when the result is not finite, blame the first bad input. A result
    that overflowed from finite inputs is an error whatever the method."""
    tensors = loaded.tensors
    if not job.merge:
        if not tensors[0].is_floating_point():
            for (reader, key), t in zip(job.sources[1:], tensors[1:], strict=True):
                if not torch.equal(t, tensors[0]):
                    raise ValueError(
                        f"{reader.path}: non-float tensor {key!r} differs between inputs; "
                        "cannot merge integer buffers"
                    )
        return tensors[0]
    base = None
    if job.base:
        copies = loaded.base
        for (reader, key), t in zip(job.base, copies, strict=True):
            if t is not copies[0] and not torch.equal(t, copies[0]):
                if check_result:  # a NaN makes copies differ: name it first, as an up-front check would
                    _check_finite(job, loaded)
                raise ValueError(
                    f"{reader.path}: base copies {job.base[0][1]!r} and {key!r} differ; "
                    "a base needs one W0 per "
                    "slot (paper §3: every modality transformer starts from the same initialization)"
                )
        base = copies[0].to(torch.float32)
    grams = None
    if job.grams is not None:
        grams = loaded.grams
    ctx = MergeContext(
        name=job.target,
        layer=job.layer,
        module=job.module,
        modalities=job.modalities,
        base=base,
        weights=job.weights,
        grams=grams,
        linear=grams is not None,
        out=out,
    )
    merged = method.merge([t.to(torch.float32) for t in tensors], params, ctx)
    result = merged.to(job.dtype)
    if not is_finite(result):  # checked in the output dtype: float16 overflows where float32 does not
        if check_result:  # the inputs were not checked: blame a NaN / Inf input first
            _check_finite(job, loaded)
        raise ValueError(
            f"{job.target}: the {method.name} merge of finite inputs overflowed to NaN / Inf in {job.dtype}; "
            "nothing was written (check lam, weights and normalize)"
        )
    return result


def _merge_record(
    method: MergeMethod,
    params: MergeParams,
    kind: str,
    sources: list[dict[str, Any]],
    base: dict[str, Any] | None,
    grams: Any,
    weights: Any,
) -> dict[str, Any]:
    def gram_name(g: Any) -> Any:
        if g is None:
            return None
        if isinstance(g, (list, tuple)):
            return [gram_name(x) for x in g]
        return str(g) if isinstance(g, (str, os.PathLike)) else "(in memory)"

    return {
        "kind": kind,
        "method": method.name,
        "params": json.loads(params.model_dump_json()),
        "weights": weights,
        "sources": sources,
        "base": base,
        "grams": gram_name(grams),
        "vlmerge_version": __version__,
    }


def _check_gram(gsrc: Any, key: str, shape: tuple[int, ...], missing: list[str], bad: list[str]) -> None:
    if key not in gsrc:
        missing.append(key)
        return
    want = (shape[1], shape[1])
    got = tuple(gsrc.shape(key))
    if got != want:
        bad.append(f"{key}: Gram {list(got)}, expected {list(want)}")


def _gram_errors(missing: list[str], bad: list[str], where: str, sources: Sequence[Any] = (),
                 jobs: Sequence[Job] = ()) -> None:
    """One error for Grams missing or of the wrong shape, or for Grams of weights the merge does not have
    (a Gram file collected on another model)."""
    if missing:
        raise ValueError(
            f"regmean: no Gram for {len(missing)} linear weights in {where}: {_listing(missing)}"
        )
    if bad:
        raise ValueError(f"regmean: Gram shapes do not match the weights in {where}: {_listing(bad, 4)}")
    # Grams of weights the checkpoint has but does not merge (VLMo's shared attention, the layers a partial merge
    # keeps) are the collector's normal output; only Grams of weights it lacks betray another model.
    present = {key for job in jobs for _, key in job.sources}
    for src in sources:
        used = {key for job in jobs for s, key in job.grams or [] if s is src}
        extra = sorted(set(src.keys()) - used - present)
        if extra:
            raise ValueError(f"regmean: {where} holds Grams of {len(extra)} weights this merge has no linear "
                             f"weight for (collected on another model?): {_listing(extra)}")


def _check_distinct(dirs: Sequence[PathLike], base_dir: PathLike | None) -> None:
    """A soup names each model once (a repeat is a hidden weight: say it with ``weights``), and its base is
    none of them (every task vector of that model would be zero)."""
    seen: dict[Path, PathLike] = {}
    for d in dirs:
        key = Path(d).resolve()
        if key in seen:
            raise ValueError(f"--inputs: {d} is given twice (as {seen[key]} before); name each model once and "
                             "weight one more with --weights")
        seen[key] = d
    if base_dir is not None and Path(base_dir).resolve() in seen:
        raise ValueError(f"--base {base_dir} is also one of the inputs; the base is the common start (W0) the "
                         "models were fine-tuned from")


_INIT_ONLY = {"init_std", "tied_init"}  # model-config keys that only shape the initialisation


def _check_model_inputs(
    dirs: Sequence[PathLike], readers: Sequence[CheckpointReader], base_dir: PathLike | None,
    base: CheckpointReader | None,
) -> None:
    """Inputs that are vlmerge checkpoints must each match their architecture and share one model config
    (a soup of models that differ in, say, ``ln_eps`` would load but compute something else). Other
    checkpoints (e.g. Hugging Face folders) are checked by keys, shapes and dtypes only."""
    named = [(d, r) for d, r in zip([*dirs, base_dir], [*readers, base], strict=True) if r is not None]
    models = [(d, r) for d, r in named if isinstance(r.config.get("model"), dict)]
    for _, r in models:
        check_checkpoint(r)
    if models and len(models) != len(named):
        plain = next(d for d, r in named if not isinstance(r.config.get("model"), dict))
        raise ValueError(f"{plain} is not a vlmerge checkpoint (no 'model' in its config.json) but {models[0][0]} "
                         "is; merge models of one kind")
    ref_dir, ref = models[0] if models else (None, None)
    for d, r in models[1:]:
        assert ref is not None
        a, b = ref.config["model"], r.config["model"]
        differ = sorted(k for k in set(a) | set(b) - _INIT_ONLY if a.get(k) != b.get(k))
        if differ:
            k = differ[0]
            raise ValueError(f"{d}: model config differs from {ref_dir}'s in {len(differ)} keys, first "
                             f"{k!r}: {b.get(k)!r} vs {a.get(k)!r}; merge models of one architecture")


# ---------------------------------------------------------------------------------------- modality merge
def merge_checkpoint(
    method: str | MergeMethod,
    in_dir: PathLike,
    out_dir: PathLike,
    *,
    base_dir: PathLike | None = None,
    grams: GramsArg = None,
    weights: Mapping[str, float] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    hash_inputs: bool = False,
    keep_layers: Sequence[int] | None = None,
    budget: float | None = None,
    learned: Mapping[str, Any] | None = None,
    **params: Any,
) -> Path:
    """Merge the modality copies of one modality-specific checkpoint into a modality-agnostic one.

    A partial merge keeps some layers modality-specific: ``keep_layers`` names them (0-based), or ``budget``
    P in [0, 1] keeps the round(P·n) riskiest of the n layers with copies, ranked by
    :func:`~vlmerge.metrics.predict.layer_report` (relative L2 of the copies). The output's config then
    keeps ``arch`` and lists the layers it merged in ``merged_layers``; its merge record says what was kept.
    ``learned``: how a learned α schedule was chosen (:mod:`~vlmerge.merge.learned`), stored in the record.

    Every group ``blocks.{i}.{module}.{v|l|vl}.{suffix}`` (see :func:`~vlmerge.models.roles.merge_groups`)
    becomes ``blocks.{i}.{module}.shared.{suffix}``; embeddings, the final norm, ITC projections, heads and
    already-shared slots pass through. ``base_dir`` holds W0 (the VL-stage start weights) under the same
    MSA names -- or under the ``shared`` names of an MAA seed checkpoint. ``grams`` (RegMean) is a Gram file
    / :class:`~vlmerge.merge.grams.Grams` keyed by the source weights' names. ``weights`` maps modality ->
    weight (the methods with ``uses_weights``). ``params`` are the method's (e.g. ``alpha=0.75``).

    Returns the output directory. Raises ``ValueError`` (before writing) for an unknown method or parameter,
    a missing / superfluous base, missing base keys, shape or dtype mismatches, missing Grams, and
    (during the merge, leaving nothing under ``out_dir``) NaN / Inf weights.
    """
    m = get_method(method)
    p = m.parse_params(params)
    out = _prepare_output(out_dir, [in_dir, base_dir, grams], overwrite)
    m.check_inputs(base=base_dir is not None, weights=weights is not None, grams=grams is not None)
    if m.uses_grams and grams is None:
        raise ValueError(
            f"{m.name}: needs Gram matrices: pass grams= (--grams FILE, or --data NAME --batches N)"
        )
    if weights is not None:
        if not isinstance(weights, Mapping):
            raise ValueError(
                f"{m.name}: a modality merge takes weights per modality, e.g. {{'v': 0.75, 'l': 0.25}}"
            )
        unknown = sorted(set(weights) - {"v", "l", "vl"})
        if unknown:
            raise ValueError(f"{m.name}: weights has unknown modalities {unknown}; allowed: v, l, vl")
    with ExitStack() as stack:
        reader = stack.enter_context(StreamingReader(in_dir))
        check_checkpoint(reader)  # a modality merge reads a vlmerge checkpoint: config, keys, shapes, dtypes
        base = stack.enter_context(StreamingReader(base_dir)) if base_dir is not None else None
        if base is not None and isinstance(base.config.get("model"), dict):
            check_checkpoint(base)
        gsrc = open_grams(grams) if grams is not None else None
        if isinstance(gsrc, CheckpointReader):
            stack.enter_context(gsrc)
        keep, chosen = _kept_layers(reader, in_dir, keep_layers, budget)
        jobs = _plan_modality_merge(m, p, reader, base, gsrc, weights, in_dir, base_dir, grams, keep)
        config = copy.deepcopy(reader.config) or {"format": FORMAT}
        if isinstance(config.get("model"), dict):
            model = config["model"]
            if keep:  # a partial merge: the merged layers become shared, the kept ones keep arch's experts
                merged = {j.layer for j in jobs if j.merge} | set(model.get("merged_layers") or [])
                model["merged_layers"] = sorted(merged)
            else:
                model["arch"] = "maa"  # every modality-specific slot was merged into a shared one
                model.pop("merged_layers", None)
        _record_provenance(config, m, p, "modality", [in_dir], base_dir, grams,
                           dict(weights) if weights is not None else None, hash_inputs)
        if keep_layers is not None or budget is not None:
            config["merge"]["partial"] = {"keep_specific": keep, **chosen}
        if learned is not None:  # how a learned schedule was chosen (merge.learned), to reproduce it
            config["merge"]["learned"] = dict(learned)
        return _execute(m, p, jobs, out, config, progress, overwrite)


def _kept_layers(reader: CheckpointReader, in_dir: PathLike, keep_layers: Sequence[int] | None,
                 budget: float | None) -> tuple[list[int], dict[str, Any]]:
    """The layers a partial merge keeps modality-specific (checked against the layers that have copies), and
    how they were chosen."""
    if keep_layers is None and budget is None:
        return [], {}
    if keep_layers is not None and budget is not None:
        raise ValueError("give --keep-specific or --budget, not both")
    layers = sorted({g.layer for g in merge_groups(reader.keys())})
    if budget is not None:
        if not (isinstance(budget, (int, float)) and not isinstance(budget, bool) and 0 <= budget <= 1):
            raise ValueError(f"--budget {budget!r}: expected a fraction in [0, 1] of the {len(layers)} "
                             "modality-specific layers to keep")
        from ..metrics.predict import layer_report

        ranked = [i for i in layer_report(in_dir)["ranked"] if i in layers]
        keep = sorted(ranked[: round(budget * len(layers))])
        return keep, {"budget": float(budget), "chosen_by": "rel_l2 risk (vlmerge predict)", "ranked": ranked}
    bad = [i for i in keep_layers or [] if isinstance(i, bool) or not isinstance(i, int) or i not in layers]
    if bad:
        raise ValueError(f"--keep-specific {bad[0]!r}: not a layer with modality copies; {in_dir} has layers "
                         f"{layers}")
    keep = sorted(set(keep_layers or []))
    if keep == layers:
        raise ValueError(f"--keep-specific keeps every layer with copies ({layers}): nothing would be merged")
    return keep, {"chosen_by": "given"}


def _plan_modality_merge(
    m: MergeMethod, p: MergeParams, reader: CheckpointReader, base: CheckpointReader | None, gsrc: Any,
    weights: Mapping[str, float] | None, in_dir: PathLike, base_dir: PathLike | None, grams: GramsArg,
    keep: Sequence[int] = (),
) -> list[Job]:
    """The jobs of a modality merge, from the headers alone: one per output tensor, every slot checked by
    :func:`~.base.slot_problem` (all problems listed at once), base keys, Grams, weights and per-layer
    schedules checked. Nothing is read or written."""
    keys = reader.keys()
    groups = merge_groups(keys)
    if not groups:
        raise ValueError(
            f"{in_dir}: no modality-specific block weights (blocks.{{i}}.{{module}}.{{v|l|vl}}.*) to "
            "merge; is it already modality-agnostic?"
        )
    groups = [g for g in groups if g.layer not in set(keep)]  # a partial merge passes the kept layers through
    grouped = {k for g in groups for k in g.sources.values()}
    jobs = [Job(k, reader.dtype(k), reader.shape(k), [(reader, k)], merge=False) for k in keys if k not in grouped]
    problems: list[str] = []
    missing_base: list[str] = []
    missing_g: list[str] = []
    bad_g: list[str] = []
    for g in groups:
        mods = g.modalities
        srcs = [g.sources[mod] for mod in mods]
        bkeys: list[str] = []
        if base is not None:
            bkeys = [g.target] if g.target in base else srcs
            missing_base.extend(b for b in bkeys if b not in base)
            bkeys = [b for b in bkeys if b in base]
        problem = slot_problem(m, [(s, reader.dtype(s), tuple(reader.shape(s))) for s in srcs],
                               [(b, base.dtype(b), tuple(base.shape(b))) for b in bkeys] if base else [])
        if problem:
            problems.append(f"{g.target}: {problem}")
            continue
        shape, dtype = reader.shape(srcs[0]), reader.dtype(srcs[0])
        job = Job(g.target, dtype, shape, [(reader, s) for s in srcs], layer=g.layer, module=g.module, modalities=mods,
                  base=[(base, b) for b in bkeys] if base is not None else [])
        if gsrc is not None and g.module in ("attn", "mlp") and g.suffix.endswith(".weight") and len(shape) == 2:
            for s in srcs:
                _check_gram(gsrc, s, shape, missing_g, bad_g)
            job.grams = [(gsrc, s) for s in srcs]
        if weights is not None:
            absent_w = [mod for mod in mods if mod not in weights]
            if absent_w:
                raise ValueError(f"{m.name}: weights has no entry for modality {absent_w[0]!r} "
                                 f"(slot {g.target} has {list(mods)})")
            job.weights = check_weights([weights[mod] for mod in mods], len(mods), m.name)
        jobs.append(job)
    if problems:
        raise ValueError(f"{in_dir}: cannot merge: {_listing(problems, 4)}")
    if missing_base:
        raise ValueError(
            f"base {base_dir}: missing {len(missing_base)} keys (looked for the shared name, then "
            f"each modality copy): {_listing(missing_base)}"
        )
    _gram_errors(missing_g, bad_g, str(grams) if isinstance(grams, (str, os.PathLike)) else "the Grams given",
                 [gsrc] if gsrc is not None else [], jobs)
    m.check_layers(p, sorted({(g.layer, g.module) for g in groups}))
    return jobs


def _record_provenance(
    config: dict[str, Any], m: MergeMethod, p: MergeParams, kind: str, dirs: Sequence[PathLike],
    base_dir: PathLike | None, grams: Any, weights: Any, hash_inputs: bool,
) -> None:
    """Put the merge record (:func:`_merge_record`: method, params, weights, fingerprinted sources, base,
    Grams, version) into ``config["merge"]``; an input's own record (a merge of merges) is kept as
    ``"previous"`` for a modality merge and dropped for a soup (whose inputs each have their own)."""
    record = _merge_record(m, p, kind, [fingerprint(d, hash_inputs) for d in dirs],
                           fingerprint(base_dir, hash_inputs) if base_dir is not None else None, grams, weights)
    previous = config.pop("merge", None)
    if previous is not None and kind == "modality":
        record["previous"] = previous
    config["merge"] = record


# -------------------------------------------------------------------------------------------- model soups
def merge_models(
    method: str | MergeMethod,
    in_dirs: Sequence[PathLike],
    out_dir: PathLike,
    *,
    base_dir: PathLike | None = None,
    weights: Sequence[float] | None = None,
    grams: Sequence[GramsArg] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    hash_inputs: bool = False,
    **params: Any,
) -> Path:
    """Merge N whole checkpoints with identical keys, tensor by tensor (UnIVAL §5: soups, task merges).

    Every floating-point tensor is merged (embeddings and heads too: the models share one architecture);
    integer buffers must be equal and pass through. ``interpolation`` takes two models
    (α·W_1 + (1 − α)·W_2); ``average`` any N (uniform 1/N by default); ``modality_arithmetic`` with a base is
    task arithmetic W0 + λ Σ (W_m − W0). ``weights`` has one value per model. RegMean needs one Gram source
    per model; block linear weights without a Gram are an error, other tensors are averaged. Inputs and base
    are safetensors or PyTorch pickles (``pytorch_model.bin``, ``.pt``; read by :func:`~.io.open_weights`
    with ``weights_only`` only: a file that needs full unpickling is refused).

    Raises ``ValueError`` before anything is written when the key sets, shapes or dtypes differ (listing
    the differing keys), or for a bad method / parameter / base / weights.
    """
    m = get_method(method)
    p = m.parse_params(params)
    dirs = list(in_dirs)
    if len(dirs) < max(2, m.min_inputs):
        raise ValueError(f"{m.name}: merging whole models needs at least 2 inputs, got {len(dirs)}")
    if m.max_models is not None and len(dirs) > m.max_models:
        raise ValueError(
            f"{m.name}: merges at most {m.max_models} models, got {len(dirs)}; use 'average' for N"
        )
    out = _prepare_output(out_dir, [*dirs, base_dir, *(grams or [])], overwrite)
    m.check_inputs(base=base_dir is not None, weights=weights is not None, grams=grams is not None)
    _check_distinct(dirs, base_dir)
    w = check_weights(weights, len(dirs), m.name)
    if m.uses_grams and (grams is None or len(list(grams)) != len(dirs)):
        raise ValueError(
            f"{m.name}: needs one Gram source per model ({len(dirs)}), got "
            f"{0 if grams is None else len(list(grams))}"
        )
    with ExitStack() as stack:
        readers = [stack.enter_context(open_weights(d)) for d in dirs]  # safetensors or PyTorch pickles
        base = stack.enter_context(open_weights(base_dir)) if base_dir is not None else None
        gsrcs = []
        for g in grams or []:
            src = open_grams(g)
            if isinstance(src, CheckpointReader):
                stack.enter_context(src)
            gsrcs.append(src)
        _check_model_inputs(dirs, readers, base_dir, base)
        jobs = _plan_model_merge(m, p, dirs, readers, base_dir, base, gsrcs, w)
        config = copy.deepcopy(readers[0].config) or {"format": FORMAT}
        _record_provenance(config, m, p, "models", dirs, base_dir, grams, list(w) if w else None, hash_inputs)
        return _execute(m, p, jobs, out, config, progress, overwrite)


def _plan_model_merge(
    m: MergeMethod, p: MergeParams, dirs: Sequence[PathLike], readers: Sequence[CheckpointReader],
    base_dir: PathLike | None, base: CheckpointReader | None, gsrcs: Sequence[Any], w: tuple[float, ...] | None,
) -> list[Job]:
    """The jobs of a soup of whole models, from the headers alone: the key sets must agree (differences
    listed), every float tensor is checked by :func:`~.base.slot_problem` across the models and the base,
    integer buffers pass through (checked equal when read), Grams and per-layer schedules checked."""
    ref = readers[0]
    keys = ref.keys()
    key_set = set(keys)
    diffs: list[str] = []
    for d, r in zip([*dirs[1:], *([base_dir] if base is not None else [])],
                    [*readers[1:], *([base] if base is not None else [])], strict=True):
        rk = set(r.keys())
        diffs.extend(f"{k} (missing in {d})" for k in sorted(key_set - rk))
        diffs.extend(f"{k} (only in {d})" for k in sorted(rk - key_set))
    jobs: list[Job] = []
    missing_g: list[str] = []
    bad_g: list[str] = []
    for k in keys:
        if any(k not in r for r in [*readers, *([base] if base is not None else [])]):
            continue  # listed in diffs
        srcs = [(r, k) for r in readers]
        dtype, shape = ref.dtype(k), ref.shape(k)
        specs = [(str(d), r.dtype(k), tuple(r.shape(k))) for d, r in zip(dirs, readers, strict=True)]
        base_spec = [(str(base_dir), base.dtype(k), tuple(base.shape(k)))] if base is not None else []
        if not dtype.is_floating_point and all(s[1:] == specs[0][1:] for s in [*specs, *base_spec]):
            jobs.append(Job(k, dtype, shape, srcs, merge=False))
            continue
        problem = slot_problem(m, specs, base_spec)
        if problem:
            diffs.append(f"{k} ({problem})")
            continue
        role = parse_param_name(k)
        job = Job(k, dtype, shape, srcs, layer=role.layer, module=role.module, weights=w,
                  base=[(base, k)] if base is not None else [])
        if gsrcs:
            is_block_linear = (role.kind == "block" and role.module in ("attn", "mlp") and len(shape) == 2
                               and (role.suffix or "").endswith("weight"))
            if is_block_linear or all(k in gs for gs in gsrcs):
                for gs in gsrcs:
                    _check_gram(gs, k, shape, missing_g, bad_g)
                job.grams = [(gs, k) for gs in gsrcs]
        jobs.append(job)
    if diffs:
        raise ValueError(f"{m.name}: the models differ in {len(diffs)} keys: {_listing(diffs)}")
    _gram_errors(missing_g, bad_g, "the Gram sources", gsrcs, jobs)
    m.check_layers(p, [(j.layer, j.module) for j in jobs if j.merge])
    return jobs
