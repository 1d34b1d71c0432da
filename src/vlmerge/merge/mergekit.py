"""mergekit-style YAML configs: ``vlmerge merge CONFIG.yaml OUT_DIR`` on Hugging-Face-style checkpoints.

A first slice of mergekit compatibility (our own code, written from mergekit's documented semantics)::

    merge_method: ties                 # linear | task_arithmetic | ties | slerp
    base_model: ./bert-base
    models:
      - model: ./bert-squad
        parameters: {weight: 1.0, density: 0.5}
      - model: ./bert-mnli
        parameters: {weight: [0.2, 0.8], density: 0.5}    # a gradient over the layers
    parameters: {normalize: true, lambda: 1.0}            # global defaults (per-model ones override)
    dtype: bfloat16                                       # output dtype (compute is always float32)
    tokenizer_source: base                                # or a model path

Inputs are folders with ``config.json`` + ``model.safetensors`` (or a sharded ``model.safetensors.index.json``).
The output folder gets ``model.safetensors``, ``config.json`` (copied from the base model, else the first
model), ``mergekit_config.yml`` (the resolved config: absolute paths, output dtype) and the tokenizer files
(:data:`TOKENIZER_FILES`, whichever exist) of ``tokenizer_source`` (default: the base model, else the first
model). It is built in a temp folder beside ``OUT_DIR`` and renamed into place.

``slices`` is accepted only as one slice of whole models (every ``layer_range`` is ``[0, L]``), which is the
same as ``models``; anything else is refused as not supported yet.

Parameter values (per tensor named ``name`` of layer ``i`` of ``L`` layers, :func:`resolve_param`):

* a number;
* a gradient ``[v0, ..., vk]``: ``np.interp(i / (L - 1), linspace(0, 1, k + 1), [v0, ..., vk])`` (``x = 0``
  when ``L == 1``); a tensor without a layer index (embeddings, pooler, heads) takes the first value ``v0``;
* a filter list ``[{filter: SUBSTRING, value: V}, ..., {value: DEFAULT}]``: entries are tried in order, as
  mergekit does; the first whose filter is a substring of ``name`` (or matches it as an ``fnmatch`` glob), or
  that has no ``filter`` (it matches every tensor: the default, written last), gives ``V`` (a number or
  gradient).

The layer index of a tensor comes from :data:`LAYER_PATTERN` (``layers.N.``, ``layer.N.``, ``h.N.``,
``blocks.N.``); ``L`` is the largest index found in the base (else first) model's names, plus one.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import read_yaml, validate
from ..files import guard_output_dir, make_temp_dir
from ..models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, SafetensorsStreamWriter
from .base import is_finite
from .io import StreamingReader
from .streaming import _listing, _publish  # the same listing and rename-into-place as vlmerge's merges

PathLike = str | os.PathLike[str]

MERGE_METHODS = ("linear", "task_arithmetic", "ties", "slerp")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.json", "chat_template.jinja",
)
CONFIG_OUT = "mergekit_config.yml"
#: One table of Hugging-Face-style layer names: ``model.layers.3.``, ``encoder.layer.3.``, ``h.3.``, ``blocks.3.``.
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8

# method -> (per-model parameters, global-only parameters); a per-model parameter may also be given globally
# as the default for every model.
_PARAMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("weight",), ("normalize",)),
    "task_arithmetic": (("weight",), ("normalize", "lambda")),
    "ties": (("weight", "density"), ("normalize", "lambda", "int8_mask")),
    "slerp": ((), ("t",)),
}
_BOOL_PARAMS = ("normalize", "int8_mask")  # int8_mask: mergekit's memory saving; accepted, no effect here
_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0},
    "ties": {"normalize": True, "lambda": 1.0, "density": 1.0, "int8_mask": False},
    "slerp": {},
}


def is_mergekit_config(data: Mapping[str, Any]) -> bool:
    """Whether a YAML mapping is a mergekit config (``merge_method`` / ``models`` / ``slices``), not vlmerge's
    own schema (``method``)."""
    return "method" not in data and any(k in data for k in ("merge_method", "models", "slices"))


# ------------------------------------------------------------------------------------------------- schema
def _check_value(v: Any, where: str, nested: bool = False) -> None:
    """A parameter value: a finite number, a gradient (non-empty list of numbers) or, at the top, a filter
    list (``{filter, value}`` entries, at most one without ``filter``); ``ValueError`` naming ``where``."""
    if isinstance(v, bool):
        raise ValueError(f"{where}: expected a number, a gradient [v0, v1, ...] or a filter list, got {v!r}")
    if isinstance(v, (int, float)):
        if not math.isfinite(v):
            raise ValueError(f"{where}: expected a finite number, got {v!r}")
        return
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        for i, x in enumerate(v):
            _check_value(x, f"{where}[{i}]", nested=True)
        return
    if not nested and isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
        defaults = 0
        for i, e in enumerate(v):
            extra = sorted(set(e) - {"filter", "value"})
            if extra:
                raise ValueError(f"{where}[{i}]: unknown key {extra[0]!r}; allowed keys: filter, value")
            if "value" not in e:
                raise ValueError(f"{where}[{i}]: 'value' is required")
            if "filter" in e and (not isinstance(e["filter"], str) or not e["filter"]):
                raise ValueError(f"{where}[{i}].filter: expected a non-empty string, got {e['filter']!r}")
            defaults += "filter" not in e
            _check_value(e["value"], f"{where}[{i}].value", nested=True)
        if defaults > 1:
            raise ValueError(f"{where}: {defaults} entries without 'filter'; give at most one default")
        return
    allowed = "a number or a gradient [v0, v1, ...]" if nested else \
        "a number, a gradient [v0, v1, ...] or a list of {filter: NAME, value: V}"
    raise ValueError(f"{where}: expected {allowed}, got {v!r}")


def _check_params(params: Mapping[str, Any], method: str, where: str, per_model: bool) -> None:
    model_names, global_names = _PARAMS[method]
    allowed = model_names if per_model else model_names + global_names
    for k, v in params.items():
        if k not in allowed:
            what = f"allowed for {method}: {', '.join(allowed) or 'none'}"
            if per_model and k in global_names:
                what += f" ({k!r} is a global parameter: put it under the top-level 'parameters')"
            raise ValueError(f"{where}.{k}: unknown parameter; {what}")
        if k in _BOOL_PARAMS:
            if not isinstance(v, bool):
                raise ValueError(f"{where}.{k}: expected true or false, got {v!r}")
        else:
            _check_value(v, f"{where}.{k}")


class ModelEntry(BaseModel):
    """One input model: ``{model: PATH, parameters: {...}}``."""

    model_config = ConfigDict(extra="forbid")

    model: Path
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One source of a slice: ``{model: PATH, layer_range: [0, N], parameters: {...}}``."""

    model_config = ConfigDict(extra="forbid")

    model: Path
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)


class Slice(BaseModel):
    """``{sources: [...]}``: only one slice of whole models is supported yet."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource]


class MergekitConfig(BaseModel):
    """A mergekit merge config (the subset vlmerge runs; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    base_model: Path | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer_source: str | None = None

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in MERGE_METHODS:
            raise ValueError(f"unknown merge_method {v!r}; allowed: {', '.join(MERGE_METHODS)} (others are not "
                             "supported yet)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MergekitConfig:
        m = self.merge_method
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.slices is not None:
            if len(self.slices) != 1:
                raise ValueError(f"slices: {len(self.slices)} slices; several slices are not supported yet, only "
                                 "one slice of whole models (every layer_range [0, L])")
            if not self.slices[0].sources:
                raise ValueError("slices[0].sources: empty; list the models")
            for i, s in enumerate(self.slices[0].sources):
                if s.layer_range[0] != 0 or s.layer_range[1] <= 0:
                    raise ValueError(f"slices[0].sources[{i}].layer_range: {list(s.layer_range)} is not a whole "
                                     "model; partial slices are not supported yet, only [0, L] (all L layers)")
        _check_params(self.parameters, m, "parameters", per_model=False)
        for i, e in enumerate(self.entries()):
            where = f"{'models' if self.models is not None else 'slices[0].sources'}[{i}].parameters"
            _check_params(e.parameters, m, where, per_model=True)
        if m in ("task_arithmetic", "ties") and self.base_model is None:
            raise ValueError(f"base_model: required for merge_method {m} (the task vectors are x_i - base)")
        if m == "slerp":
            paths = {_key(e.model) for e in self.entries()} | ({_key(self.base_model)} if self.base_model else set())
            if len(paths) != 2 or self.base_model is None:
                raise ValueError("slerp: merges exactly two models, and base_model must be one of them (t=0 gives "
                                 f"the base); got {len(paths)} distinct models"
                                 f"{'' if self.base_model else ' and no base_model'}")
        elif len(self.model_paths()) < (1 if m in ("task_arithmetic", "ties") else 2):
            raise ValueError(f"models: {m} needs at least {1 if m != 'linear' else 2} models besides the base")
        if self.tokenizer_source == "union":
            raise ValueError("tokenizer_source: 'union' is not supported yet; give 'base' or a model path")
        if self.tokenizer_source == "base" and self.base_model is None:
            raise ValueError("tokenizer_source: 'base' needs a base_model")
        return self

    def entries(self) -> list[ModelEntry | SliceSource]:
        """The models as listed (``models`` or the one slice's sources)."""
        if self.models is not None:
            return list(self.models)
        assert self.slices is not None
        return list(self.slices[0].sources)

    def model_paths(self) -> list[Path]:
        """The merged models: the listed ones, less the base model for task_arithmetic / ties (its task
        vector is zero; mergekit leaves it out too) and for slerp (the base is the t=0 end)."""
        base = _key(self.base_model) if self.base_model is not None else None
        if self.merge_method == "linear":
            return [e.model for e in self.entries()]
        return [e.model for e in self.entries() if _key(e.model) != base]

    def output_dtype(self) -> torch.dtype | None:
        """``out_dtype``, else ``dtype``, else None (each tensor keeps its input dtype)."""
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else None


def _key(p: Path | None) -> Path | None:
    return None if p is None else Path(p).expanduser().absolute().resolve()


def load_mergekit_config(path: PathLike) -> MergekitConfig:
    """Read and validate a mergekit YAML; ``ValueError`` naming the file, the key and what is allowed."""
    return validate(MergekitConfig, read_yaml(path), source=path)


# -------------------------------------------------------------------------------------- parameter values
def layer_index(name: str) -> int | None:
    """The layer index in a tensor name (:data:`LAYER_PATTERN`), or None (embeddings, pooler, heads)."""
    m = LAYER_PATTERN.search(name)
    return int(m.group(1)) if m else None


def _filter_matches(pattern: str, name: str) -> bool:
    return pattern in name or fnmatch.fnmatchcase(name, pattern)


def resolve_param(value: Any, name: str, layer: int | None, n_layers: int) -> Any:
    """A parameter's value for tensor ``name`` (layer ``layer`` of ``n_layers``); None when a filter list has
    no match and no default. Gradient ``[v0..vk]``: ``interp(layer / (n_layers - 1), linspace(0, 1, k+1), v)``;
    ``v0`` for a tensor without a layer (or when ``n_layers <= 1``)."""
    if isinstance(value, (bool, int, float)):
        return value
    if value and isinstance(value[0], Mapping):
        for e in value:  # in order: an entry without a filter matches every tensor
            if "filter" not in e or _filter_matches(e["filter"], name):
                return resolve_param(e["value"], name, layer, n_layers)
        return None
    values = [float(v) for v in value]
    if layer is None or n_layers <= 1 or len(values) == 1:
        return values[0]
    x = min(max(layer / (n_layers - 1), 0.0), 1.0)
    return float(np.interp(x, np.linspace(0.0, 1.0, len(values)), values))


# ----------------------------------------------------------------------------------------------- methods
def merge_linear(xs: Sequence[torch.Tensor], w: Sequence[float], normalize: bool) -> torch.Tensor:
    """``out = Σ_i w_i x_i / Σ_i w_i`` (``normalize``) or ``Σ_i w_i x_i``; every ``x_i`` float32 of one shape."""
    out = sum((wi * x for wi, x in zip(w, xs, strict=True)), torch.zeros_like(xs[0]))
    if normalize:
        total = sum(w)
        if total == 0:
            raise ValueError("linear: the weights sum to 0; with normalize: true they must not")
        out = out / total
    return out


def merge_task_arithmetic(
    base: torch.Tensor, xs: Sequence[torch.Tensor], w: Sequence[float], lam: float, normalize: bool
) -> torch.Tensor:
    """``τ_i = x_i − b``; ``out = b + λ Σ_i w_i τ_i`` (divided by ``Σ_i w_i`` when ``normalize``)."""
    s = sum((wi * (x - base) for wi, x in zip(w, xs, strict=True)), torch.zeros_like(base))
    if normalize:
        total = sum(w)
        if total == 0:
            raise ValueError("task_arithmetic: the weights sum to 0; with normalize: true they must not")
        s = s / total
    return base + lam * s


def trim_top_k(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``τ`` with all but its ``k = int(density · numel)`` largest-|τ| entries zeroed: exactly ``k`` kept, equal
    magnitudes taken in flat-index order (a stable descending sort of ``|τ|``)."""
    flat = tau.reshape(-1)
    k = int(density * flat.numel())
    if k >= flat.numel():
        return tau
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        order = torch.sort(flat.abs(), descending=True, stable=True).indices
        keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def merge_ties(
    base: torch.Tensor, xs: Sequence[torch.Tensor], w: Sequence[float], density: Sequence[float], lam: float,
    normalize: bool,
) -> torch.Tensor:
    """TIES: ``τ̂_i = trim_top_k(x_i − b, density_i)``; ``d_i = w_i τ̂_i``; elected sign ``s = sign(Σ_i d_i)`` (+1
    where the sum is exactly 0); ``mask_i = sign(d_i) == s`` (a trimmed entry, d_i = 0, never agrees);
    ``merged = Σ_i d_i mask_i / Σ_i w_i mask_i`` (``normalize``; 0 where the divisor is 0) or ``Σ_i d_i mask_i``;
    ``out = b + λ · merged``. Tensors ``[...]`` float32, all of one shape."""
    d = torch.stack([wi * trim_top_k(x - base, di) for wi, x, di in zip(w, xs, density, strict=True)])  # [N, ...]
    elected = torch.where(d.sum(0) >= 0, 1.0, -1.0)
    mask = torch.sign(d) == elected
    merged = (d * mask).sum(0)
    if normalize:
        wt = torch.tensor(list(w), dtype=d.dtype).reshape(-1, *([1] * base.dim()))
        div = (wt * mask).sum(0)
        merged = torch.where(div != 0, merged / torch.where(div != 0, div, torch.ones_like(div)),
                             torch.zeros_like(merged))
    return base + lam * merged


def merge_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0, the base) to ``b`` (t = 1), on the flattened tensors.

    ``â = a / ‖a‖``, ``b̂ = b / ‖b‖`` (a norm ≤ 1e-8 leaves the tensor as is); ``dot = Σ â b̂``. When
    ``|dot| > 0.9995`` (nearly colinear): ``out = (1 − t) a + t b``. Otherwise ``Ω = arccos(clamp(dot, −1, 1))``,
    ``out = sin((1 − t) Ω) / sin Ω · a + sin(t Ω) / sin Ω · b`` (on the unnormalised tensors, as mergekit does).
    """
    fa, fb = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = fa.norm(), fb.norm()
    ua = fa / na if na > SLERP_EPS else fa
    ub = fb / nb if nb > SLERP_EPS else fb
    dot = float((ua * ub).sum())
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return ((1 - t) * a + t * b).to(a.dtype)
    omega = math.acos(min(max(dot, -1.0), 1.0))
    so = math.sin(omega)
    return (math.sin((1 - t) * omega) / so * fa + math.sin(t * omega) / so * fb).reshape(a.shape).to(a.dtype)


# ------------------------------------------------------------------------------------------------ runner
@dataclass
class _Input:
    where: str  # the config key that names it, for errors
    path: Path
    reader: StreamingReader
    params: dict[str, Any]


def _n_layers(names: Sequence[str]) -> int:
    idx = [i for i in (layer_index(k) for k in names) if i is not None]
    return max(idx) + 1 if idx else 0


def _check_keys(inputs: Sequence[_Input]) -> list[str]:
    """Keys of the first input; ``ValueError`` listing every key, shape or dtype that differs."""
    ref = inputs[0]
    keys = ref.reader.keys()
    diffs: list[str] = []
    for inp in inputs[1:]:
        rk = set(inp.reader.keys())
        diffs += [f"{k} (missing in {inp.path})" for k in keys if k not in rk]
        diffs += [f"{k} (only in {inp.path})" for k in sorted(rk - set(keys))]
        for k in (k for k in keys if k in rk):
            a, b = inp.reader.dtype(k), ref.reader.dtype(k)
            if inp.reader.shape(k) != ref.reader.shape(k) or a.is_floating_point != b.is_floating_point or (
                    not a.is_floating_point and a != b):
                diffs.append(f"{k} ({inp.path}: {inp.reader.dtype(k)} {list(inp.reader.shape(k))} vs "
                             f"{ref.path}: {ref.reader.dtype(k)} {list(ref.reader.shape(k))})")
    if diffs:
        raise ValueError(f"the models differ in {len(diffs)} keys: {_listing(diffs)}")
    return keys


def _param(cfg: MergekitConfig, inp: _Input | None, name: str, key: str, layer: int | None, n: int) -> Any:
    """Per-model value (overrides the global one), else global, else the method default; ``ValueError`` when a
    required parameter (``weight``, slerp's ``t``) has no value for ``key``."""
    value = None
    if inp is not None and name in inp.params:
        value = resolve_param(inp.params[name], key, layer, n)
    if value is None and name in cfg.parameters:
        value = resolve_param(cfg.parameters[name], key, layer, n)
    if value is None:
        value = _DEFAULTS[cfg.merge_method].get(name)
    if value is None:
        owner = f"{inp.where}.parameters" if inp is not None else "parameters"
        raise ValueError(f"{owner}: {cfg.merge_method} needs {name!r} (no value for tensor {key!r}); give it per "
                         "model or under the top-level 'parameters'")
    if name == "density" and not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{inp.where if inp else 'parameters'}: density={value} for tensor {key!r}; expected a "
                         "value in [0, 1]")
    return value


def _merge_tensor(cfg: MergekitConfig, key: str, layer: int | None, n: int, base: torch.Tensor | None,
                  inputs: Sequence[_Input], xs: Sequence[torch.Tensor]) -> torch.Tensor:
    m = cfg.merge_method
    if m == "slerp":
        assert base is not None
        return merge_slerp(base, xs[0], float(_param(cfg, None, "t", key, layer, n)))
    w = [float(_param(cfg, inp, "weight", key, layer, n)) for inp in inputs]
    normalize = bool(_param(cfg, None, "normalize", key, layer, n))
    if m == "linear":
        return merge_linear(xs, w, normalize)
    assert base is not None
    lam = float(_param(cfg, None, "lambda", key, layer, n))
    if m == "task_arithmetic":
        return merge_task_arithmetic(base, xs, w, lam, normalize)
    dens = [float(_param(cfg, inp, "density", key, layer, n)) for inp in inputs]
    return merge_ties(base, xs, w, dens, lam, normalize)


def _resolved_config(cfg: MergekitConfig) -> dict[str, Any]:
    """The config as run: absolute paths, the output dtype spelled out, slices written as models."""
    out: dict[str, Any] = {"merge_method": cfg.merge_method}
    if cfg.base_model is not None:
        out["base_model"] = str(_key(cfg.base_model))
    out["models"] = [{"model": str(_key(e.model)), **({"parameters": e.parameters} if e.parameters else {})}
                     for e in cfg.entries()]
    if cfg.parameters:
        out["parameters"] = dict(cfg.parameters)
    for k in ("dtype", "out_dtype"):
        if getattr(cfg, k) is not None:
            out[k] = getattr(cfg, k)
    if cfg.tokenizer_source is not None:
        out["tokenizer_source"] = cfg.tokenizer_source
    return out


def run_mergekit(cfg: MergekitConfig, out_dir: PathLike, overwrite: bool = False, source: Any = "config") -> Path:
    """Run a mergekit config into ``out_dir`` (see the module docstring); returns the output folder.

    Everything that can be checked from the headers (paths, keys, shapes, slices, parameters' structure) is
    checked before the output is opened; NaN / Inf inputs are refused naming the file and key, and a
    non-finite result (overflow, also in the cast to the output dtype) naming the tensor.
    """
    entries = cfg.entries()
    list_key = "models" if cfg.models is not None else "slices[0].sources"
    named = [(f"{list_key}[{i}]", e.model) for i, e in enumerate(entries)]
    if cfg.base_model is not None:
        named.append(("base_model", cfg.base_model))
    tok = cfg.tokenizer_source
    tok_dir = (cfg.base_model if tok == "base" else Path(tok)) if tok is not None else \
        (cfg.base_model if cfg.base_model is not None else entries[0].model)
    if tok is not None and tok != "base":
        named.append(("tokenizer_source", Path(tok)))
    for where, p in named:
        if not Path(p).is_dir():
            raise ValueError(f"{source}: {where}: {p}: no such model directory")
    out = guard_output_dir(out_dir, [p for _, p in named], overwrite, flag="output", clean_stale=True)
    base_key = _key(cfg.base_model)
    with ExitStack() as stack:
        readers: dict[Path, StreamingReader] = {}

        def reader(p: Path) -> StreamingReader:
            k = _key(p)
            assert k is not None
            if k not in readers:
                readers[k] = stack.enter_context(StreamingReader(p))
            return readers[k]

        all_inputs = [_Input(w, Path(p), reader(p), dict(getattr(e, "parameters", {}) or {}))
                      for (w, p), e in zip(named, [*entries, None], strict=False) if w != "tokenizer_source"]
        base = next((i for i in all_inputs if i.where == "base_model"), None)
        merged = [i for i in all_inputs if i.where != "base_model"
                  and (cfg.merge_method == "linear" or _key(i.path) != base_key)]
        if base is not None:
            base.params = next((i.params for i in all_inputs if i.where != "base_model"
                                and _key(i.path) == base_key), {})
        ref = base or merged[0]
        checked = [ref, *[i for i in merged if i is not ref]]
        keys = _check_keys(checked)
        n = _n_layers(keys)
        if cfg.slices is not None:
            for i, s in enumerate(cfg.slices[0].sources):
                if s.layer_range[1] != n:
                    raise ValueError(f"{source}: slices[0].sources[{i}].layer_range: {list(s.layer_range)} covers "
                                     f"part of the {n} layers of {s.model}; partial slices are not supported "
                                     f"yet, only whole models (layer_range [0, {n}])")
        out_dt = cfg.output_dtype()
        specs = {k: ((out_dt or ref.reader.dtype(k)) if ref.reader.dtype(k).is_floating_point
                     else ref.reader.dtype(k), ref.reader.shape(k)) for k in keys}
        tmp = make_temp_dir(out)
        try:
            with SafetensorsStreamWriter(tmp / WEIGHTS_NAME, specs, metadata={"format": "pt"}) as writer:
                for k in keys:
                    writer.write(k, _one_tensor(cfg, k, n, base, merged, checked, specs[k][0]))
            cfg_src = (base or merged[0]).path / CONFIG_NAME
            if cfg_src.is_file():
                shutil.copyfile(cfg_src, tmp / CONFIG_NAME)
            assert tok_dir is not None
            for name in TOKENIZER_FILES:
                if (Path(tok_dir) / name).is_file():
                    shutil.copyfile(Path(tok_dir) / name, tmp / name)
            (tmp / CONFIG_OUT).write_text(yaml.safe_dump(_resolved_config(cfg), sort_keys=False), encoding="utf-8")
            _publish(tmp, out, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _one_tensor(cfg: MergekitConfig, k: str, n: int, base: _Input | None, merged: Sequence[_Input],
                checked: Sequence[_Input], out_dtype: torch.dtype) -> torch.Tensor:
    """Read tensor ``k`` of every input, refuse NaN / Inf, merge in float32 (or check integer tensors equal and
    copy), cast to ``out_dtype`` and refuse a non-finite result."""
    tensors: dict[int, torch.Tensor] = {}
    for inp in checked:
        t = inp.reader.get(k)
        if t.is_floating_point() and not is_finite(t):
            raise ValueError(f"{inp.path}: tensor {k!r} contains NaN or Inf")
        tensors[id(inp)] = t
    ref = tensors[id(checked[0])]
    if not ref.is_floating_point():
        for inp in checked[1:]:
            if not torch.equal(tensors[id(inp)], ref):
                raise ValueError(f"{inp.path}: integer tensor {k!r} differs from {checked[0].path}'s; non-float "
                                 "tensors are copied and must be equal in every model")
        return ref
    b = tensors[id(base)].float() if base is not None else None
    xs = [tensors[id(i)].float() for i in merged]
    res = _merge_tensor(cfg, k, layer_index(k), n, b, merged, xs).to(out_dtype)
    if not is_finite(res):
        raise ValueError(f"merged tensor {k!r} is not finite (overflow{' in the cast to ' + str(out_dtype)}?); "
                         "check the weights / lambda")
    return res.contiguous()


# Flags of ``vlmerge merge`` that belong to vlmerge's own merges, not to a mergekit config.
_OTHER_FLAGS = ("base", "alpha", "alpha_schedule", "vl_ratio", "lam", "gamma", "density", "drop", "seed",
                "normalize", "weights", "param", "grams", "data", "batches", "save_grams")


def run_mergekit_cli(args: Any) -> int:
    """``vlmerge merge CONFIG.yaml OUT_DIR`` (or ``-o OUT_DIR``) for a mergekit config."""
    given = [f"--{f.replace('_', '-')}" for f in _OTHER_FLAGS if getattr(args, f, None) is not None]
    if given:
        raise ValueError(f"{args.paths[0]} is a mergekit config; {', '.join(given)} do not apply (put parameters "
                         "in the YAML)")
    outs = list(args.paths[1:]) + ([args.output] if args.output else [])
    if len(outs) != 1:
        raise ValueError(f"{args.paths[0]} is a mergekit config: give one output, vlmerge merge CONFIG.yaml "
                         "OUT_DIR (or -o OUT_DIR)")
    cfg = load_mergekit_config(args.paths[0])
    out = run_mergekit(cfg, outs[0], overwrite=args.overwrite, source=args.paths[0])
    print(f"merged ({cfg.merge_method}, mergekit config) -> {out}")
    return 0
