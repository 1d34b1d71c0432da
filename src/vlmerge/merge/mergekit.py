"""mergekit-style YAML configs: ``vlmerge merge CONFIG.yaml OUT_DIR`` on Hugging-Face-style checkpoints.

A first slice of mergekit compatibility (our own code, written from mergekit's documented semantics)::

    merge_method: ties                 # any of the methods below (MERGE_METHODS)
    base_model: ./bert-base
    models:
      - model: ./bert-squad
        parameters: {weight: 1.0, density: 0.5}
      - model: ./bert-mnli
        parameters: {weight: [0.2, 0.8], density: 0.5}    # a gradient over the layers
    parameters: {normalize: true, lambda: 1.0}            # global defaults (per-model ones override)
    dtype: bfloat16                                       # output dtype (compute is always float32)
    tokenizer_source: base                                # or a model path

Inputs are folders with ``config.json`` + ``model.safetensors`` (or a sharded ``model.safetensors.index.json``)
or PyTorch pickles (``pytorch_model.bin``, a sharded ``pytorch_model.bin.index.json``, or one ``.bin`` / ``.pt``
/ ``.pth`` file; safetensors win when a folder has both), or one ``.bin`` / ``.pt`` / ``.pth`` file given as
``model`` / ``base_model`` itself (it has no ``config.json`` or tokenizer to copy; ``tokenizer_source`` is a
folder). Pickles are read only through
``torch.load(weights_only=True, map_location="cpu")`` (memory-mapped when in torch's zip format) by
:class:`~.io.TorchReader`: a file that needs full unpickling (any object but tensors and plain containers) is
refused naming it, and none of it runs; a top-level ``state_dict`` / ``model`` / ``module`` entry is unwrapped
(repeatedly, while a dict holds exactly one of them); a value that is not a dense tensor is refused naming its
key. Floating-point inputs of different dtypes are cast to float32 for the arithmetic; the output dtype is
``out_dtype``, else ``dtype``, else the base (else first) model's. A key some models lack is an error listing
every difference, unless ``--missing-keys base`` (then it is the base model's tensor, cast; a key the base lacks
is still an error).

The output folder gets the weights -- one ``model.safetensors``, or with ``--out-shard-size SIZE`` (bytes:
``5GB``, ``500MB``, ``2GiB``, ``1000000``, mergekit's ``5B``) shards ``model-00001-of-0000N.safetensors`` filled
in key order (a tensor that would take a shard past SIZE starts the next; one larger than SIZE is alone) with an
HF ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``); when everything fits in one shard,
one ``model.safetensors`` -- plus ``config.json`` and ``generation_config.json`` (:data:`MODEL_FILES`, copied
from the base model, else the first model), the tokenizer, chat-template and processor files
(:data:`TOKENIZER_FILES`, :data:`PROCESSOR_FILES`, whichever exist) of ``tokenizer_source`` (default: the base
model, else the first model; an explicit ``tokenizer_source`` must hold at least one tokenizer file;
symlinks are followed and their content copied, as a Hugging Face cache needs; a copied name that is a FIFO,
device, socket, folder or dangling symlink is refused, never skipped), ``mergekit_config.yml`` (the resolved
config: absolute paths, output dtype),
``vlmerge_merge.json`` (provenance: method, parameters, every input fingerprinted as vlmerge's own merges do --
per file its size and safetensors-header SHA-256, or size and mtime for a pickle, the full SHA-256 with
``--hash-inputs`` -- the options, the vlmerge version and the time) and a ``README.md`` model card (merged with
vlmerge; method, parameters, inputs, the config). It is built in a temp folder beside ``OUT_DIR`` and renamed
into place: an error leaves neither ``OUT_DIR`` nor a temp folder.

``--device cpu|cuda|auto`` (default cpu; auto: cuda when available) is where each tensor's arithmetic runs:
tensors are read on the CPU, moved there, merged and moved back before writing, one at a time as on the CPU;
``cuda`` without a GPU is an error. On a GPU, sums may round differently from the CPU's in the last bit.

``slices`` is accepted only as one slice of whole models (every ``layer_range`` is ``[0, L]``), which is the
same as ``models``; anything else is refused as not supported yet.

Parameter values (per tensor named ``name`` of layer ``i`` of ``L`` layers, :func:`resolve_param`):

* a number;
* a gradient ``[v0, ..., vk]``: ``np.interp(i / (L - 1), linspace(0, 1, k + 1), [v0, ..., vk])``; with one
  layer (``L == 1``) its tensors take the last value ``vk`` (mergekit's planner evaluates a one-layer slice at
  ``t = 1``: ``plan.py``, ``MergePlanner.plan_slice``); a tensor without a layer index (embeddings, pooler,
  heads) takes the first value ``v0`` (mergekit: ``t = 0`` for the pre / post weights);
* a filter list ``[{filter: SUBSTRING, value: V}, ..., {value: DEFAULT}]``: entries are tried in order, as
  mergekit does; the first whose filter is a substring of ``name`` (mergekit's rule, ``config.py``,
  ``evaluate_setting``; ``*`` matches every tensor there too), or that has no ``filter`` (it matches every
  tensor: the default, written last), gives ``V`` (a number or gradient). A vlmerge addition: a filter also
  matches when it matches ``name`` as an ``fnmatch`` glob (``*.attention.*``). That is a superset of mergekit's
  rule, so a filter with glob characters (``*``, ``?``, ``[``) that is not a substring may match a tensor here
  that it never matches in mergekit; filters without them behave the same in both.

The layer index of a tensor comes from :data:`LAYER_PATTERN` (``layers.N.``, ``layer.N.``, ``h.N.``,
``blocks.N.``); ``L`` is the largest index found in the base (else first) model's names, plus one.

Methods (mergekit 0.1.5's names, parameters, defaults and semantics; "per model" parameters may also be given
globally as every model's default, "global" ones only under the top-level ``parameters``: a global parameter
given per model is ignored with one warning line naming it, as mergekit ignores it (its
``resolve_parameters`` reads shared parameters from the top-level / slice settings only); other unknown names
are errors (mergekit ignores those too); numbers must be finite, ranges are checked naming the key;
``int8_mask`` is accepted and changes nothing):

* ``linear``: per model ``weight`` (required); global ``normalize`` (true). ``Σ w_i x_i`` (``/ Σ w_i``) over
  the models, a ``base_model`` included (as mergekit does, also when it is not listed: then its ``weight`` is
  the global one); one model is enough (mergekit's default input contract, ``min_inputs=1``): that model
  (times its weight with ``normalize: false``).
* Task vectors (:mod:`vlmerge.merge.taskvector` has the equations): ``task_arithmetic``, ``ties``,
  ``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``; base
  required; no model besides the base gives the base (mergekit's ``GeneralizedTaskArithmeticMerge.merge_group``
  returns it). Per model ``weight`` (required), ``density`` (1.0, ≥ 0; ``≥ 1`` keeps every entry, as in
  mergekit's ``sparsify.py``), ``gamma`` (breadcrumbs*: 0.01, in [0, 1]), ``epsilon`` (della*: 0.15, ≥ 0,
  with ``0 < density ± epsilon < 1`` where ``0 < density < 1``); global ``lambda`` (1.0),
  ``normalize`` / ``rescale`` (per method, :data:`TASK_VECTOR_METHODS`: ties true / false, dare_* false / true,
  breadcrumbs* false / false, della true / true, della_linear false / true, task_arithmetic false / false),
  ``int8_mask``. Sparsification: none (task_arithmetic), exact-k magnitude (ties), random keep with
  probability ``density`` (dare_*), magnitude with outliers dropped (breadcrumbs*), rank-based keep
  probabilities per row (della*); sign consensus (+ on a zero sum) for ties / dare_ties / breadcrumbs_ties /
  della; ``rescale`` keeps each sparsified task vector's L1 norm.
  Random methods: mergekit draws from torch's global RNG (``--random-seed``), whose bits cannot be matched;
  here input ``i`` (0-based among the merged models) of tensor ``NAME`` takes its keep decisions
  (:class:`~.taskvector.KeepDraws`) from ``numpy.random.Generator(SFC64(tensor_seed(random_seed, "NAME#i")))``
  (:func:`~.taskvector.input_generator`), with the global ``random_seed`` (a vlmerge addition, an integer ≥ 0,
  default 0; mergekit ignores it): the same config gives the same bits, whatever the order tensors are visited.
* ``slerp``: global ``t`` (required); two models, the base one of them (:func:`merge_slerp`).
* ``nuslerp``: per model ``weight`` (required); global ``nuslerp_flatten`` (true), ``nuslerp_row_wise``
  (false); exactly two models besides an optional base (:func:`merge_nuslerp`).
* ``multislerp``: per model ``weight`` (required); global ``normalize_weights`` (true), ``eps`` (1e-8, ≥ 0);
  one or more models, optional base (:func:`merge_multislerp`).
* ``karcher``: global ``max_iter`` (10, an integer ≥ 0), ``tol`` (1e-5, ≥ 0); every model with equal weights,
  the base model included as one more input (:func:`merge_karcher`).
* ``model_stock``: global ``filter_wise`` (false); base and at least two models (:func:`merge_model_stock`).
* ``sce``: global ``select_topk`` (1.0, ≥ 0; ``≥ 1`` selects every entry), ``int8_mask``; base and any number
  of models (none: the base, as mergekit's ``sce_merge``) (:func:`merge_sce`).
* ``passthrough``: per model ``scale`` (none: no scaling); exactly one model, the base model counting as one:
  its tensors, times ``scale``.

Inputs are cast to float32 for every method (mergekit computes in the inputs' promoted dtype), so results
agree with mergekit's to float32 rounding. Equal magnitudes (ties' and breadcrumbs' cuts, DELLA's ranks) and
equal variances (sce's top-k) are ordered by flat index; mergekit leaves that order to torch's unstable sort.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
import stat
import sys
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import __version__
from ..config import read_yaml, validate
from ..files import guard_output_dir, make_temp_dir
from ..models.checkpoint import CONFIG_NAME, atomic_write_json
from .base import is_finite
from .io import TORCH_SUFFIXES, ShardedWeightsWriter, StreamingReader, TorchReader, open_weights, parse_size
from .streaming import (  # as vlmerge's own merges do
    _listing,
    _OutputBuffers,
    _publish,
    fingerprint,
    merge_workers,
    read_ahead,
)
from .taskvector import (
    Consensus,
    RankBound,
    Sparsification,
    TaskVectorSettings,
    chunk_size,
    elected_sign,
    float_mask,
    input_generator,
    merge_task_vectors,
    rank_bound,
)

PathLike = str | os.PathLike[str]

#: Task-vector methods (:mod:`vlmerge.merge.taskvector`): name -> (sparsification, consensus, default
#: ``normalize``, default ``rescale``), mergekit's table.
TASK_VECTOR_METHODS: dict[str, tuple[Sparsification, Consensus, bool, bool]] = {
    "task_arithmetic": ("none", "none", False, False),
    "ties": ("magnitude", "sign", True, False),
    "dare_linear": ("random", "none", False, True),
    "dare_ties": ("random", "sign", False, True),
    "breadcrumbs": ("magnitude_outliers", "none", False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sign", False, False),
    "della": ("della", "sign", True, True),
    "della_linear": ("della", "none", False, True),
}
MERGE_METHODS = ("linear", "task_arithmetic", "ties", "slerp", "dare_linear", "dare_ties", "breadcrumbs",
                 "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp", "multislerp", "karcher",
                 "sce", "passthrough")
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
_TV_MODEL = ("weight", "density")
_TV_GLOBAL = ("normalize", "lambda", "rescale", "int8_mask")
_PARAMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("weight",), ("normalize",)),
    **{m: (_TV_MODEL + {"magnitude_outliers": ("gamma",), "della": ("epsilon",)}.get(sp, ()),
           _TV_GLOBAL + (("random_seed",) if sp in ("random", "della") else ()))
       for m, (sp, _, _, _) in TASK_VECTOR_METHODS.items()},
    "slerp": ((), ("t",)),
    "model_stock": ((), ("filter_wise",)),
    "nuslerp": (("weight",), ("nuslerp_row_wise", "nuslerp_flatten")),
    "multislerp": (("weight",), ("normalize_weights", "eps")),
    "karcher": ((), ("max_iter", "tol")),
    "sce": ((), ("int8_mask", "select_topk")),
    "passthrough": (("scale",), ()),
}
# int8_mask: mergekit's memory saving; accepted, no effect here (the masks are exact either way)
_BOOL_PARAMS = ("normalize", "int8_mask", "rescale", "filter_wise", "nuslerp_row_wise", "nuslerp_flatten",
                "normalize_weights")
_INT_PARAMS = ("max_iter", "random_seed")
_PLAIN_PARAMS = ("random_seed",)  # a plain number: no gradient or filter list
#: Allowed ranges (inclusive; None: unbounded), checked on every number a config gives.
_RANGES: dict[str, tuple[float, float | None]] = {
    "density": (0.0, None), "gamma": (0.0, 1.0), "select_topk": (0.0, None), "epsilon": (0.0, None),
    "eps": (0.0, None), "tol": (0.0, None), "max_iter": (0, None), "random_seed": (0, 2**63 - 1),
}
_OPTIONAL_PARAMS = ("scale",)  # no value: not applied
#: (min, max) merged inputs (:meth:`MergekitConfig.model_paths`); None: no maximum. mergekit's input contracts
#: (``merge_methods/*.py``, ``InputContract``; its planner counts an unlisted base model as one more input):
#: linear / karcher ``min_inputs=1``; task vectors / sce ``base=REQUIRED`` with ``min_inputs=1`` (the base alone:
#: 0 besides it); model_stock ``min_inputs=3`` (base + 2); nuslerp 2 besides the base; multislerp 1 besides it;
#: passthrough ``max_inputs=1``.
_COUNTS: dict[str, tuple[int, int | None]] = {
    "linear": (1, None), **{m: (0, None) for m in TASK_VECTOR_METHODS}, "model_stock": (2, None),
    "nuslerp": (2, 2), "multislerp": (1, None), "karcher": (1, None), "sce": (0, None), "passthrough": (1, 1),
}
#: The base model is one more input (appended when it is not listed), as in mergekit's planner.
_BASE_AS_INPUT = ("linear", "karcher", "passthrough")
_BASE_REQUIRED = (*TASK_VECTOR_METHODS, "slerp", "model_stock", "sce")
_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    **{m: {"normalize": norm, "rescale": resc, "lambda": 1.0, "density": 1.0, "int8_mask": False, "gamma": 0.01,
           "epsilon": 0.15, "random_seed": 0} for m, (_, _, norm, resc) in TASK_VECTOR_METHODS.items()},
    "slerp": {},
    "model_stock": {"filter_wise": False},
    "nuslerp": {"nuslerp_row_wise": False, "nuslerp_flatten": True},
    "multislerp": {"normalize_weights": True, "eps": 1e-8},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "sce": {"int8_mask": False, "select_topk": 1.0},
    "passthrough": {},
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
        if per_model and k in global_names:
            continue  # ignored, as mergekit ignores it (MergekitConfig.ignored_params: one warning line)
        if k not in allowed:
            what = f"allowed for {method}: {', '.join(allowed) or 'none'}"
            raise ValueError(f"{where}.{k}: unknown parameter; {what}")
        if k in _BOOL_PARAMS:
            if not isinstance(v, bool):
                raise ValueError(f"{where}.{k}: expected true or false, got {v!r}")
        elif k in _PLAIN_PARAMS and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{where}.{k}: expected a number (not a gradient or filter list), got {v!r}")
        else:
            _check_value(v, f"{where}.{k}")
            for at, x in _leaves(v, f"{where}.{k}"):
                _check_range(k, x, at)


def _leaves(v: Any, where: str) -> list[tuple[str, float]]:
    """Every number of a checked parameter value, with its key (``parameters.density[1]``, ``...[0].value``)."""
    if isinstance(v, (int, float)):
        return [(where, v)]
    if v and isinstance(v[0], Mapping):
        return [leaf for i, e in enumerate(v) for leaf in _leaves(e["value"], f"{where}[{i}].value")]
    return [(f"{where}[{i}]", x) for i, x in enumerate(v)]


def _check_range(name: str, x: float, where: str) -> None:
    """``ValueError`` naming ``where`` when ``x`` lies outside :data:`_RANGES` or an integer parameter's ``x`` is
    not a whole number."""
    if name in _INT_PARAMS and x != int(x):
        raise ValueError(f"{where}: {name}={x!r} is not a whole number; expected an integer")
    if name in _RANGES:
        lo, hi = _RANGES[name]
        if x < lo or (hi is not None and x > hi):
            want = f"a value in [{lo:g}, {hi:g}]" if hi is not None else f"a value ≥ {lo:g}"
            raise ValueError(f"{where}: {name}={x!r} is out of range; expected {want}")


def _not_empty(v: Any, what: str = "a model folder (or one .bin / .pt / .pth file)") -> Any:
    """A path field's raw value: an empty (or blank) string is refused (pydantic reads it as ``.``)."""
    if isinstance(v, str) and not v.strip():
        raise ValueError(f"empty path; expected {what}")
    return v


class ModelEntry(BaseModel):
    """One input model: ``{model: PATH, parameters: {...}}``."""

    model_config = ConfigDict(extra="forbid")

    model: Path
    parameters: dict[str, Any] = Field(default_factory=dict)

    _model_not_empty = field_validator("model", mode="before")(_not_empty)


class SliceSource(BaseModel):
    """One source of a slice: ``{model: PATH, layer_range: [0, N], parameters: {...}}``."""

    model_config = ConfigDict(extra="forbid")

    model: Path
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)

    _model_not_empty = field_validator("model", mode="before")(_not_empty)

    @field_validator("layer_range", mode="before")
    @classmethod
    def _layer_range(cls, v: Any) -> Any:
        """Two integers (not booleans, not floats such as ``1.5`` or ``3.0``), ``0 ≤ start < end``."""
        if not (isinstance(v, (list, tuple)) and len(v) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v) and 0 <= v[0] < v[1]):
            raise ValueError("expected [start, end], two integers with 0 ≤ start < end")
        return v


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

    _base_not_empty = field_validator("base_model", mode="before")(_not_empty)
    _tokenizer_not_empty = field_validator("tokenizer_source", mode="before")(
        lambda v: _not_empty(v, "'base' or a model folder"))

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
        if self.models is not None and not self.models:
            raise ValueError("models: empty; list the models (mergekit refuses an empty list too)")
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
        if m in _BASE_REQUIRED and m != "slerp" and self.base_model is None:
            why = "the task vectors are x_i - base" if m != "model_stock" else "the offsets are x_i - base"
            raise ValueError(f"base_model: required for merge_method {m} ({why})")
        if m == "slerp":
            paths = {_key(e.model) for e in self.entries()} | ({_key(self.base_model)} if self.base_model else set())
            if len(paths) != 2 or self.base_model is None:
                raise ValueError("slerp: merges exactly two models, and base_model must be one of them (t=0 gives "
                                 f"the base); got {len(paths)} distinct models"
                                 f"{'' if self.base_model else ' and no base_model'}")
        else:
            lo, hi = _COUNTS[m]
            got = len(self.model_paths())
            if got < lo or (hi is not None and got > hi):
                want = f"exactly {lo}" if lo == hi else f"at least {lo}"
                noun = "model" if hi == 1 else "models"
                what = (f"{noun} (the base_model counts as one)" if m in _BASE_AS_INPUT else
                        noun if self.base_model is None else f"{noun} besides the base")
                raise ValueError(f"models: {m} needs {want} {what}; got {got}")
        if self.tokenizer_source == "union":
            raise ValueError("tokenizer_source: 'union' is not supported yet; give 'base' or a model path")
        if self.tokenizer_source == "base" and self.base_model is None:
            raise ValueError("tokenizer_source: 'base' needs a base_model")
        return self

    def ignored_params(self) -> list[str]:
        """One line per global parameter given per model (ignored, as mergekit does), naming the key and
        where it was given."""
        _, global_names = _PARAMS[self.merge_method]
        list_key = "models" if self.models is not None else "slices[0].sources"
        where: dict[str, list[str]] = {}
        for i, e in enumerate(self.entries()):
            for k in e.parameters:
                if k in global_names:
                    where.setdefault(k, []).append(f"{list_key}[{i}].parameters.{k}")
        return [f"{', '.join(ws)}: {k!r} is a global parameter of {self.merge_method}, ignored per model (as "
                f"mergekit ignores it); put it under the top-level 'parameters'" for k, ws in where.items()]

    def entries(self) -> list[ModelEntry | SliceSource]:
        """The models as listed (``models`` or the one slice's sources)."""
        if self.models is not None:
            return list(self.models)
        assert self.slices is not None
        return list(self.slices[0].sources)

    def model_paths(self) -> list[Path]:
        """The merged models: for linear / karcher / passthrough the listed ones and the base model, appended
        when it is not listed (mergekit's planner adds it as one more input); else the listed ones less the
        base model (task vectors: its task vector is zero, mergekit leaves it out too; slerp: the base is the
        t=0 end; nuslerp / multislerp: the origin)."""
        base = _key(self.base_model) if self.base_model is not None else None
        if self.merge_method in _BASE_AS_INPUT:
            listed = [e.model for e in self.entries()]
            return listed + ([self.base_model] if self.base_model is not None and
                             base not in {_key(p) for p in listed} else [])
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
    ``v0`` for a tensor without a layer, ``vk`` for the layer of a one-layer model (mergekit: ``t = 1``)."""
    if isinstance(value, (bool, int, float)):
        return value
    if value and isinstance(value[0], Mapping):
        for e in value:  # in order: an entry without a filter matches every tensor
            if "filter" not in e or _filter_matches(e["filter"], name):
                return resolve_param(e["value"], name, layer, n_layers)
        return None
    values = [float(v) for v in value]
    if layer is None or len(values) == 1:
        return values[0]
    if n_layers <= 1:  # mergekit's plan_slice: t = 1 when a slice has one layer
        return values[-1]
    x = min(max(layer / (n_layers - 1), 0.0), 1.0)
    return float(np.interp(x, np.linspace(0.0, 1.0, len(values)), values))


# ----------------------------------------------------------------------------------------------- methods
#: Entries per float64 chunk of a dot product: the chunk's float64 copies (1 MB per input) stay in cache and
#: their memory is reused; a 4096 × 1024 pair's Gram took 6.4 ms in 2^17-entry chunks against 72 ms in 2^22-entry
#: ones, which fault in fresh pages for every copy (one core, AMD EPYC).
_DOT_CHUNK = 1 << 17


def _gram(xs: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """The [N, N] float64 matrix of dot products v_i·v_j of the flattened ``v_i = x_i`` (or ``x_i − base``,
    subtracted in float64), accumulated over :data:`_DOT_CHUNK`-entry chunks (each chunk of every input converted
    to float64 once, then one small matrix product), so the float64 temporaries stay bounded."""
    flat = [x.reshape(-1) for x in xs]
    dots = torch.zeros(len(xs), len(xs), dtype=torch.float64, device=flat[0].device)
    b = base.reshape(-1).split(_DOT_CHUNK) if base is not None else None
    for i, parts in enumerate(zip(*(f.split(_DOT_CHUNK) for f in flat), strict=True)):
        chunk = torch.stack(parts).double()  # [N, chunk]
        if b is not None:
            chunk -= b[i].double()
        dots += chunk @ chunk.T
    return dots.cpu()  # the N × N arithmetic that follows runs on the CPU whatever the tensors' device


def _combine(xs: Sequence[torch.Tensor], coefs: Sequence[float], base: torch.Tensor | None = None) -> torch.Tensor:
    """``b + Σ_j k_j (x_j − b)`` (or ``Σ_j k_j x_j`` without a base) in float32, one cache-sized chunk at a
    time: the result of a merge whose every step is a small computation on a Gram matrix."""
    flat = [x.reshape(-1) for x in xs]
    b = base.reshape(-1) if base is not None else None
    out = torch.empty_like(flat[0])
    step = chunk_size(out)
    for s in range(0, out.numel(), step):
        part = slice(s, s + step)
        acc: torch.Tensor | None = None
        for k, x in zip(coefs, flat, strict=True):
            d = x[part] - b[part] if b is not None else x[part].clone()
            acc = d.mul_(k) if acc is None else acc.add_(d, alpha=k)
        assert acc is not None
        if b is not None:
            torch.add(b[part], acc, out=out[part])
        else:
            out[part] = acc
    return out.reshape(xs[0].shape)


def merge_linear(xs: Sequence[torch.Tensor], w: Sequence[float], normalize: bool,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``out = Σ_i w_i x_i / Σ_i w_i`` (``normalize``) or ``Σ_i w_i x_i``; every ``x_i`` float32 of one shape;
    written into ``out`` (a contiguous float32 tensor of that shape) when given.

    With ``normalize``, weights far outside float32's range (``1e-320``, ``1e300``) are first scaled by one
    power of two (exact, and it cancels in the ratio), so they do not underflow to 0 (0 / 0) or overflow."""
    if normalize and sum(w) != 0:
        top = max(abs(x) for x in w)
        if not 2.0**-60 <= top <= 2.0**60:
            e = math.frexp(top)[1]
            w = [math.ldexp(x, -e) for x in w]
    # w_0 x_0, then + w_i x_i through one reused product buffer: the same roundings as the plain sum, 2
    # allocations instead of 2N + 1
    total = sum(w)
    if normalize and total == 0:
        raise ValueError("linear: the weights sum to 0; with normalize: true they must not")
    out = torch.mul(xs[0], w[0], out=out) if out is not None else xs[0] * w[0]
    tmp = torch.empty_like(out) if len(xs) > 1 else out
    for wi, x in zip(w[1:], xs[1:], strict=True):
        out += torch.mul(x, wi, out=tmp)
    return out.div_(total) if normalize else out


def merge_model_stock(base: torch.Tensor, xs: Sequence[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """Model Stock (Jang et al. 2024), mergekit's ``model_stock``; ``base`` and ``k ≥ 2`` inputs of one shape.

    Vectors ``v``: the whole flattened tensor, or with ``filter_wise`` each row along the last axis (a 1-D
    tensor is one row). Per vector: offsets ``δ_i = x_i − b``; ``c`` = the mean over pairs ``i < j`` of
    ``clamp(δ_i·δ_j / max(‖δ_i‖ ‖δ_j‖, 1e-6), −1, 1)``; ``t = k c / (1 + (k − 1) c)`` (``t = 0``, the base,
    where ``|1 + (k − 1) c| < 1e-6``); ``out = t · mean_i x_i + (1 − t) · b``. One vector (the default): ``t``
    from the ``k × k`` Gram matrix of the ``δ_i`` (float64) and ``out = b + (t / k) Σ_i δ_i`` in one pass
    (mergekit's float32 tensor arithmetic agrees to its rounding).
    """
    k = len(xs)
    if not (filter_wise and base.dim() > 1):  # one vector: its k × k Gram matrix (float64) gives t
        dots = _gram(xs, base)
        norms = dots.diagonal().clamp(min=0).sqrt().tolist()
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        c = sum(min(max(float(dots[i, j]) / max(norms[i] * norms[j], 1e-6), -1.0), 1.0) for i, j in pairs)
        c /= len(pairs)
        den = 1 + (k - 1) * c
        t = 0.0 if abs(den) < 1e-6 else k * c / den
        return _combine(xs, [t / k] * k, base)  # b + t (mean_i x_i − b)
    rows = base  # vectors along the last axis
    v = torch.stack([x.reshape(rows.shape) for x in xs])  # [k, ..., D]
    off = v - rows
    norms = off.norm(dim=-1)  # [k, ...]
    i, j = torch.triu_indices(k, k, offset=1, device=base.device)
    cos = ((off[i] * off[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
    c = cos.mean(0).unsqueeze(-1)  # [..., 1]
    den = 1 + (k - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, 0.0, k * c / torch.where(singular, 1.0, den))
    return (t * (v.sum(0) / k) + (1 - t) * rows).reshape(base.shape)


def _slerp_vectors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Slerp of each vector along the last axis of ``a`` / ``b`` (``[..., D]``): directions ``a / max(‖a‖,
    1e-7)``; ``cos θ`` clamped to [−1, 1]; ``(1 − t) a + t b`` where ``1 − cos² θ ≤ 1e-16`` (colinear), else
    ``(sin((1 − t) θ) a + sin(t θ) b) / sin θ``."""
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    lin = 1 - cos * cos <= 1e-16
    theta = torch.acos(torch.where(lin, 0.0, cos))
    sph = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return torch.where(lin, (1 - t) * a + t * b, sph)


def merge_nuslerp(base: torch.Tensor | None, xs: Sequence[torch.Tensor], w: Sequence[float], row_wise: bool,
                  flatten: bool) -> torch.Tensor:
    """mergekit's ``nuslerp``: two inputs ``x_0``, ``x_1`` (and an optional base ``b``) of one shape.

    ``t = w_1 / (w_0 + w_1)`` (``0.5`` when ``|w_0 + w_1| < 1e-6``); ``v_i = x_i − b`` with a base, else ``x_i``;
    :func:`_slerp_vectors` of ``t`` over vectors: the whole flattened tensor (``nuslerp_flatten``, the
    default), else the slices along the first axis (``nuslerp_row_wise``: ``x[:, j, ...]``) or, by default,
    along the last axis (the rows ``x[i, :]`` of a matrix); ``out = b + slerp`` (or the slerp). Flattened: the
    norms and ``cos θ`` from the 2 × 2 Gram matrix (float64), then one combination pass.
    """
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    if flatten:  # one pair of vectors: its 2 × 2 Gram matrix gives both coefficients (float64)
        dots = _gram(xs[:2], base)
        na, nb = (max(math.sqrt(max(float(dots[i, i]), 0.0)), 1e-7) for i in (0, 1))
        cos = min(max(float(dots[0, 1]) / (na * nb), -1.0), 1.0)
        if 1 - cos * cos <= 1e-16:
            return _combine(xs[:2], [1 - t, t], base)
        theta = math.acos(cos)
        return _combine(xs[:2], [math.sin((1 - t) * theta) / math.sin(theta),
                                 math.sin(t * theta) / math.sin(theta)], base)
    v0, v1 = (xs[0] - base, xs[1] - base) if base is not None else (xs[0], xs[1])
    if row_wise and v0.dim() > 1:
        out = _slerp_vectors(t, v0.movedim(0, -1), v1.movedim(0, -1)).movedim(-1, 0)
    else:
        out = _slerp_vectors(t, v0, v1)
    return out if base is None else base + out


def merge_multislerp(base: torch.Tensor | None, xs: Sequence[torch.Tensor], w: Sequence[float],
                     normalize_weights: bool, eps: float) -> torch.Tensor:
    """mergekit's ``multislerp`` (barycentric interpolation on the hypersphere), ``N ≥ 1`` inputs.

    One input: itself. Else, on the flattened ``v_i = x_i − b`` (or ``x_i`` without a base): weights ``ŵ =
    w / Σ w`` (``normalize_weights``) or ``w``; ``u_i = v_i / (‖v_i‖ + eps)``; ``μ = Σ ŵ_i u_i``; when ``‖μ‖
    < eps``: inputs that all equal the base give the base, two inputs fall back to ``ŵ_0 v_0 + ŵ_1 v_1``, more
    are an error. Else ``μ ← μ / ‖μ‖``, tangents
    ``g_i = u_i − (u_i·μ) μ``, ``g = Σ ŵ_i g_i``, ``θ = ‖g‖ + eps``, ``r = cos θ · μ + sin θ / θ · g``;
    ``out = b + (Σ ŵ_i ‖v_i‖) r``. Computed on the coefficients of the ``v_i`` with their Gram matrix (float64),
    then one combination pass (mergekit's float32 tensor arithmetic agrees to its rounding).
    """
    if len(xs) == 1:
        return xs[0]
    # μ, g and the result are combinations Σ_i c_i v_i: the N coefficients are computed with the Gram matrix of
    # the v_i in float64, and only the Gram pass and the final combination touch the tensors
    ww = [float(x) for x in w]
    if normalize_weights:
        if sum(ww) == 0:
            raise ValueError("multislerp: the weights sum to 0; with normalize_weights: true they must not")
        total = sum(ww)
        ww = [x / total for x in ww]
    gram = _gram(xs, base)  # v_i·v_j
    weights = torch.tensor(ww, dtype=torch.float64)
    norms = gram.diagonal().clamp(min=0).sqrt()
    c_mu = weights / (norms + eps)  # μ = Σ ŵ_i u_i, u_i = v_i / (‖v_i‖ + eps)

    def norm_of(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ gram @ c), 0.0))

    mu_norm = norm_of(c_mu)
    if mu_norm < eps:
        if float(norms.max()) == 0:  # every input equals the base: the mean is the base (mergekit raises here)
            return xs[0].clone()
        if len(xs) != 2:
            raise ValueError("multislerp: the weighted mean of the directions is zero (antipodal inputs whose "
                             "weights balance out); change the weights")
        return _combine(xs, ww, base)
    c_mu = c_mu / mu_norm
    dots = (gram @ c_mu) / (norms + eps)  # u_i·μ
    c_g = weights / (norms + eps) - float((weights * dots).sum()) * c_mu  # g = Σ ŵ_i (u_i − (u_i·μ) μ)
    theta = norm_of(c_g) + eps
    coefs = (math.cos(theta) * c_mu + math.sin(theta) / theta * c_g) * float((weights * norms).sum())
    return _combine(xs, coefs.tolist(), base)


def merge_karcher(xs: Sequence[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's ``karcher``: the Karcher (Riemannian) mean of the directions, scaled by the mean norm.

    ``N`` inputs, weights ``α = 1/N``; ``n_i = ‖x_i‖``, ``u_i = x_i / n_i`` (flattened). The inputs with
    ``n_i > tol`` are used, their weights renormalised (``α'``); none: 0. Start: ``μ = Σ α'_i u_i / ‖·‖``
    (``u`` of the first used input when that norm is below ``tol``). Up to ``max_iter`` times: ``θ_i =
    arccos(clamp(μ·u_i, −1, 1))``; ``g = Σ_{θ_i ≥ tol} α'_i θ_i / sin θ_i (u_i − (μ·u_i) μ)``; stop when ``‖g‖ <
    tol``, else ``μ ← cos‖g‖ μ + sin‖g‖ g / ‖g‖``, renormalised when its norm exceeds ``tol``.
    ``out = (Σ_i α_i n_i) μ``. One input: itself.

    Every iterate ``μ`` and ``g`` is a linear combination ``Σ_i c_i u_i`` of the used unit vectors, so the
    iteration runs on the ``N`` coefficients with the Gram matrix ``G_ij = u_i·u_j`` (``μ·u = G c``, ``‖μ‖² =
    cᵀ G c``), in float64; only the Gram matrix and the final combination touch the tensors (mergekit runs
    every step on them: the same result up to rounding, ~10× the work).
    """
    if len(xs) == 1:
        return xs[0]
    n = len(xs)
    flat = [x.reshape(-1) for x in xs]
    dots = _gram(flat)
    norms = dots.diagonal().sqrt().tolist()
    used = [i for i, nrm in enumerate(norms) if nrm > tol]
    if not used:
        return torch.zeros_like(xs[0])
    m = len(used)
    unit_norms = torch.tensor([norms[i] for i in used], dtype=torch.float64)
    gram = dots[used][:, used] / torch.outer(unit_norms, unit_norms)  # u_i·u_j
    alphas = torch.full((m,), 1.0 / m, dtype=torch.float64)  # 1/n each, renormalised over the used inputs

    def norm_of(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ gram @ c), 0.0))

    c = alphas.clone()
    mu_norm = norm_of(c)
    if mu_norm < tol:
        c = torch.zeros(m, dtype=torch.float64)
        c[0] = 1.0
    else:
        c = c / mu_norm
    for _ in range(max_iter):
        dots = (gram @ c).clamp(-1.0, 1.0)  # μ·u_i
        theta = torch.acos(dots)
        w = torch.where(theta >= tol, alphas * theta / torch.sin(theta).clamp(min=1e-300), 0.0)
        g = w - float((w * dots).sum()) * c  # Σ w_i (u_i − (μ·u_i) μ)
        g_norm = norm_of(g)
        if g_norm < tol:
            break
        c = math.cos(g_norm) * c + math.sin(g_norm) / g_norm * g
        m_norm = norm_of(c)
        if m_norm > tol:
            c = c / m_norm
    scale = sum(norms) / n
    out = torch.zeros_like(flat[0])
    for coef, i in zip(c.tolist(), used, strict=True):
        out.add_(flat[i], alpha=scale * coef / norms[i])
    return out.reshape(xs[0].shape)


def _population_variance(stacked: torch.Tensor) -> torch.Tensor:
    """``Σ_i (x_i − m)² / N`` with ``m = Σ_i x_i / N`` over the leading axis of ``stacked`` (``[N, ...]`` →
    ``[...]``), one input at a time: the same float32 operations in the same order as ``numpy.var(axis=0)`` (bit
    for bit), and ~9× faster than ``torch.var(dim=0)``, whose CPU reduction over a short leading axis is slow
    (0.9 s against 0.1 s for a 2 × 4 M-entry stack, AMD EPYC, 2 cores)."""
    n = stacked.shape[0]
    mean = stacked[0].clone()
    for x in stacked[1:]:
        mean.add_(x)
    mean.div_(n)
    var = torch.zeros_like(mean)
    dev = torch.empty_like(mean)
    for x in stacked:
        var.add_(torch.sub(x, mean, out=dev).square_())
    return var.div_(n)


def merge_sce(base: torch.Tensor, xs: Sequence[torch.Tensor], select_topk: float,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """SCE (Select, Calculate, Erase; FuseChat 2), mergekit's ``sce``: ``base`` and ``N ≥ 0`` inputs (none: the
    base).

    ``τ_i = x_i − b``. **Select** (``select_topk = s < 1``): ``σ²`` = the population variance of the ``τ_i``
    over the inputs, entrywise; ``k = ⌊nnz(σ²) · s⌋`` (computed in float32); only the ``k`` entries of largest
    ``σ²`` (equal variances in flat index order) are kept in every ``τ_i`` (``s ≤ 0`` or ``k = 0``: none).
    **Calculate**: ``ω_i = mean(τ_i²) / Σ_j mean(τ_j²)`` (``1/N`` when that sum is below 1e-6). **Erase**: ``m_i
    = [sign(τ_i) = s]`` with ``s = +1`` where ``Σ_i τ_i ≥ 0`` else ``−1``. ``out = b + Σ_i ω_i m_i τ_i /
    max(Σ_i ω_i m_i, 1e-6)``.
    """
    if not xs:  # only the base (mergekit's sce_merge returns it)
        return base
    b = base.reshape(-1)
    flat = [x.reshape(-1) for x in xs]
    n, step = b.numel(), chunk_size(b)
    chunks = [slice(s, s + step) for s in range(0, n, step)]

    def taus_of(part: slice) -> list[torch.Tensor]:
        return [x[part] - b[part] for x in flat]

    keep: RankBound | None = None  # None: every entry selected
    var = b
    if select_topk < 1:
        keep = RankBound(math.inf, 0, True)  # none selected
        if select_topk > 0:
            var = torch.empty_like(b)
            for part in chunks:
                var[part] = _population_variance(torch.stack(taus_of(part)))
            k = int(torch.count_nonzero(var) * select_topk)  # as mergekit: an int64 tensor times a float
            if k > 0:
                keep = rank_bound(var, k, largest=True)  # sort(descending, stable)[:k], by selection

    def selected(part: slice) -> list[torch.Tensor]:
        taus = taus_of(part)
        if keep is not None:
            mask = float_mask(keep.mask(var[part], part.start)).to(b.dtype)
            taus = [t.mul_(mask) for t in taus]
        return taus

    squares = [0.0] * len(xs)  # Σ τ_i² over the selected entries: float32 chunk dot products added in float64
    for part in chunks:
        for i, t in enumerate(selected(part)):
            squares[i] += float(torch.dot(t, t))
    total = sum(q / n for q in squares) if n else 0.0
    omega = [1.0 / len(xs)] * len(xs) if abs(total) < 1e-6 else [q / n / total for q in squares]
    out = torch.empty_like(b) if out is None else out.reshape(-1)
    for part in chunks:
        taus = selected(part)
        elected = elected_sign(sum(taus[1:], taus[0].clone()))  # +1 where Σ τ ≥ 0, else −1
        num, den = torch.zeros_like(elected), torch.zeros_like(elected)
        for t, w in zip(taus, omega, strict=True):  # sign(τ_i) = s exactly where s·τ_i > 0
            agreeing = t.mul_(elected).clamp_min_(0.0)
            num.add_(agreeing, alpha=w)
            den.add_(agreeing.sign_(), alpha=w)
        torch.add(b[part], num.mul_(elected).div_(den.clamp_(min=1e-6)), out=out[part])
    return out.reshape(base.shape)


def merge_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0, the base) to ``b`` (t = 1), on the flattened tensors.

    ``â = a / ‖a‖``, ``b̂ = b / ‖b‖`` (a norm ≤ 1e-8 leaves the tensor as is); ``dot = Σ â b̂``. When
    ``|dot| > 0.9995`` (nearly colinear): ``out = (1 − t) a + t b``. Otherwise ``Ω = arccos(clamp(dot, −1, 1))``,
    ``out = sin((1 − t) Ω) / sin Ω · a + sin(t Ω) / sin Ω · b`` (on the unnormalised tensors, as mergekit does).
    """
    # the norms and the dot in float64 from one Gram pass; the tensors are touched again only for the result
    dots = _gram([a, b])
    na, nb = math.sqrt(float(dots[0, 0])), math.sqrt(float(dots[1, 1]))
    dot = float(dots[0, 1]) / ((na if na > SLERP_EPS else 1.0) * (nb if nb > SLERP_EPS else 1.0))
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return ((1 - t) * a + t * b).to(a.dtype)
    omega = math.acos(min(max(dot, -1.0), 1.0))
    so = math.sin(omega)
    out = a * (math.sin((1 - t) * omega) / so)
    return out.add_(b, alpha=math.sin(t * omega) / so).to(a.dtype)


# ------------------------------------------------------------------------------------------------ runner
@dataclass
class _Input:
    where: str  # the config key that names it, for errors
    path: Path
    reader: StreamingReader | TorchReader
    params: dict[str, Any]


def _n_layers(names: Sequence[str]) -> int:
    idx = [i for i in (layer_index(k) for k in names) if i is not None]
    return max(idx) + 1 if idx else 0


def _check_keys(inputs: Sequence[_Input], missing_keys: str = "error") -> tuple[list[str], set[str]]:
    """(keys of the first input, keys to take from it alone); ``ValueError`` listing every key, shape or
    dtype that differs. With ``missing_keys="base"`` (the first input is the base model) a base key that some
    other model lacks is taken from the base rather than an error; a key the base lacks is still one."""
    ref = inputs[0]
    keys = ref.reader.keys()
    diffs: list[str] = []
    from_base: set[str] = set()
    for inp in inputs[1:]:
        rk = set(inp.reader.keys())
        absent = [k for k in keys if k not in rk]
        if missing_keys == "base":
            from_base.update(absent)
        else:
            diffs += [f"{k} (missing in {inp.path})" for k in absent]
        diffs += [f"{k} (only in {inp.path})" for k in sorted(rk - set(keys))]
        for k in (k for k in keys if k in rk):
            a, b = inp.reader.dtype(k), ref.reader.dtype(k)
            if inp.reader.shape(k) != ref.reader.shape(k) or a.is_floating_point != b.is_floating_point or (
                    not a.is_floating_point and a != b):
                diffs.append(f"{k} ({inp.path}: {inp.reader.dtype(k)} {list(inp.reader.shape(k))} vs "
                             f"{ref.path}: {ref.reader.dtype(k)} {list(ref.reader.shape(k))})")
    if diffs:
        hint = " (--missing-keys base takes the keys a model lacks from the base model)" if any(
            "(missing in " in d for d in diffs) else ""
        raise ValueError(f"the models differ in {len(diffs)} keys: {_listing(diffs)}{hint}")
    return keys, from_base


def _param(cfg: MergekitConfig, inp: _Input | None, name: str, key: str, layer: int | None, n: int) -> Any:
    """Per-model value (overrides the global one), else global, else the method default; ``ValueError`` when a
    required parameter (``weight``, slerp's ``t``) has no value for ``key``, or a value resolved for ``key``
    (a gradient's interpolation) is out of range or not a whole number. None for an optional parameter
    (passthrough's ``scale``) without a value."""
    value = None
    if inp is not None and name in inp.params:
        value = resolve_param(inp.params[name], key, layer, n)
    if value is None and name in cfg.parameters:
        value = resolve_param(cfg.parameters[name], key, layer, n)
    if value is None:
        value = _DEFAULTS[cfg.merge_method].get(name)
    owner = f"{inp.where}.parameters" if inp is not None else "parameters"
    if value is None:
        if name in _OPTIONAL_PARAMS:
            return None
        raise ValueError(f"{owner}: {cfg.merge_method} needs {name!r} (no value for tensor {key!r}); give it per "
                         "model or under the top-level 'parameters'")
    if name not in _BOOL_PARAMS:
        _check_range(name, value, f"{owner}.{name} (tensor {key!r})")
        if name in _INT_PARAMS:
            value = int(value)
    return value


def _merge_tensor(cfg: MergekitConfig, key: str, layer: int | None, n: int, base: torch.Tensor | None,
                  inputs: Sequence[_Input], xs: Sequence[torch.Tensor],
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Merge tensor ``key`` (layer ``layer`` of ``n``): ``xs`` are the merged inputs' tensors (float32, in the
    order of ``inputs``: :meth:`MergekitConfig.model_paths`), ``base`` the base model's (None without one).
    ``out``: a float32 buffer of the tensor's shape that the linear, task-vector and SCE merges write into
    (recycled memory costs no page faults); the others allocate their result."""
    m = cfg.merge_method

    def par(name: str, inp: _Input | None = None) -> Any:
        return _param(cfg, inp, name, key, layer, n)

    if m == "slerp":
        assert base is not None
        return merge_slerp(base, xs[0], float(par("t")))
    if m == "passthrough":
        scale = par("scale", inputs[0])
        return xs[0] if scale is None else xs[0] * float(scale)
    if m == "karcher":
        return merge_karcher(xs, par("max_iter"), float(par("tol")))
    if m == "model_stock":
        assert base is not None
        return merge_model_stock(base, xs, bool(par("filter_wise")))
    if m == "sce":
        assert base is not None
        return merge_sce(base, xs, float(par("select_topk")), out=out)
    w = [float(par("weight", inp)) for inp in inputs]
    if m == "linear":
        return merge_linear(xs, w, bool(par("normalize")), out=out)
    if m == "nuslerp":
        return merge_nuslerp(base, xs, w, bool(par("nuslerp_row_wise")), bool(par("nuslerp_flatten")))
    if m == "multislerp":
        try:
            return merge_multislerp(base, xs, w, bool(par("normalize_weights")), float(par("eps")))
        except ValueError as e:
            raise ValueError(f"tensor {key!r}: {e}") from None
    assert base is not None
    kind, consensus, _, _ = TASK_VECTOR_METHODS[m]
    settings = TaskVectorSettings(sparsify=kind, consensus=consensus, normalize=bool(par("normalize")),
                                  rescale=bool(par("rescale")), lam=float(par("lambda")))
    dens = [float(par("density", inp)) for inp in inputs]
    gamma = [float(par("gamma", inp)) for inp in inputs] if kind == "magnitude_outliers" else None
    eps = [float(par("epsilon", inp)) for inp in inputs] if kind == "della" else None
    gens = [input_generator(par("random_seed"), key, i) for i in range(len(inputs))] \
        if kind in ("random", "della") else None
    if kind == "della":
        for inp, d, e in zip(inputs, dens, eps or [], strict=True):
            if 0 < d < 1 and not (d - e > 0 and d + e < 1):
                raise ValueError(f"{inp.where}.parameters: {m} needs 0 < density - epsilon and density + epsilon "
                                 f"< 1; got density={d:g}, epsilon={e:g} for tensor {key!r}")
        row = base.shape[1] if base.dim() >= 2 else base.numel()
        if row < 2 and any(0 < d < 1 for d in dens):
            raise ValueError(f"{m}: tensor {key!r} of shape {list(base.shape)} has rows of {row} entry along dim "
                             "1; DELLA's rank normalisation needs at least 2 (mergekit fails there too); give it "
                             "density 1 with a filter")
    return merge_task_vectors(base, xs, w, settings, density=dens, gamma=gamma, epsilon=eps, generators=gens,
                              out=out)


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


MISSING_KEYS = ("error", "base")
DEVICES = ("cpu", "cuda", "auto")
#: Copied, when they exist, from the model the output's ``config.json`` comes from (the base, else the first).
MODEL_FILES = (CONFIG_NAME, "generation_config.json")
#: Copied, when they exist, from ``tokenizer_source`` with :data:`TOKENIZER_FILES` (a VLM's image processor).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
RECORD_OUT = "vlmerge_merge.json"
CARD_OUT = "README.md"


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (``ValueError`` naming ``--device`` when no GPU is usable) or ``auto`` (cuda if
    available, else cpu)."""
    if device not in DEVICES:
        raise ValueError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available to this process (torch.cuda.is_available() is "
                         "False); use --device cpu or --device auto")
    return torch.device(device)


def _side_files(folder: Path, names: Sequence[str], where: str, source: Any) -> list[tuple[Path, str]]:
    """The files of ``names`` that ``folder`` holds, as (path, name), to copy into the output; checked before
    the output is opened. A symlink is followed wherever it points (a Hugging Face cache links every file into
    ``blobs/``) and its content copied; a name that is a FIFO, socket, device or folder (itself or through a
    symlink), a dangling symlink or an unreadable file is refused naming it, never skipped. A ``folder`` that
    is one weights file (no side files) gives none."""
    if not folder.is_dir():
        return []
    found = []
    for name in names:
        p = folder / name
        if not os.path.lexists(p):
            continue
        try:
            st = p.stat()
        except OSError as e:
            why = "a dangling symlink" if p.is_symlink() else f"not readable ({e.strerror})"
            raise ValueError(f"{source}: {where}: {p} is {why}; expected a regular file or no file "
                             "of that name") from None
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{source}: {where}: {p} is not a regular file (a FIFO, socket, device or folder); "
                             "expected a regular file or no file of that name")
        if not os.access(p, os.R_OK):
            raise ValueError(f"{source}: {where}: {p} is not readable (permission denied)")
        found.append((p, name))
    return found


def run_mergekit(cfg: MergekitConfig, out_dir: PathLike, overwrite: bool = False, source: Any = "config", *,
                 missing_keys: str = "error", out_shard_size: int | None = None, device: str = "cpu",
                 hash_inputs: bool = False) -> Path:
    """Run a mergekit config into ``out_dir`` (see the module docstring); returns the output folder.

    ``missing_keys``: ``"error"``, or ``"base"`` (a tensor some model lacks is the base model's);
    ``out_shard_size``: bytes per output shard (None: one ``model.safetensors``); ``device``: where each
    tensor's arithmetic runs (``cpu``, ``cuda``, ``auto``); ``hash_inputs``: SHA-256 of every input file in
    the provenance record.

    Everything that can be checked from the headers (paths, keys, shapes, slices, parameters' structure,
    the options) is checked before the output is opened; NaN / Inf inputs are refused naming the file and key,
    and a non-finite result (overflow, also in the cast to the output dtype) naming the tensor.
    """
    if missing_keys not in MISSING_KEYS:
        raise ValueError(f"--missing-keys {missing_keys!r}: expected one of {', '.join(MISSING_KEYS)}")
    if missing_keys == "base" and cfg.base_model is None:
        raise ValueError(f"--missing-keys base: {source} has no base_model to take the missing tensors from")
    if out_shard_size is not None and out_shard_size < 1:
        raise ValueError(f"--out-shard-size: {out_shard_size} bytes; expected at least 1")
    dev = resolve_device(device)
    for line in cfg.ignored_params():
        warnings.warn(line, UserWarning, stacklevel=2)
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
        if Path(p).is_file() and Path(p).suffix in TORCH_SUFFIXES and where != "tokenizer_source":
            continue  # one PyTorch weights file is a model (no config.json or tokenizer to copy from it)
        if not Path(p).is_dir():
            want = "a tokenizer folder" if where == "tokenizer_source" else \
                f"a model folder or one {' / '.join(TORCH_SUFFIXES)} file"
            what = "not a folder" if Path(p).exists() else "no such model directory"
            raise ValueError(f"{source}: {where}: {p}: {what}; expected {want}")
    cfg_dir = Path(cfg.base_model if cfg.base_model is not None else cfg.model_paths()[0])
    assert tok_dir is not None
    side = _side_files(cfg_dir, MODEL_FILES, "base_model" if cfg.base_model is not None else named[0][0], source)
    tok_files = _side_files(Path(tok_dir), (*TOKENIZER_FILES, *PROCESSOR_FILES),
                            "tokenizer_source" if tok is not None else
                            "base_model" if cfg.base_model is not None else named[0][0], source)
    if tok is not None and not any(name in TOKENIZER_FILES for _, name in tok_files):
        raise ValueError(f"{source}: tokenizer_source: {tok_dir} holds none of the tokenizer files "
                         f"({', '.join(TOKENIZER_FILES)}); expected a folder with a tokenizer")
    config_file = [source] if isinstance(source, (str, os.PathLike)) and Path(source).is_file() else []
    out = guard_output_dir(out_dir, [*(p for _, p in named), *config_file], overwrite, flag="output",
                           clean_stale=True)
    base_key = _key(cfg.base_model)
    with ExitStack() as stack:
        readers: dict[Path, StreamingReader | TorchReader] = {}

        def reader(p: Path) -> StreamingReader | TorchReader:
            k = _key(p)
            assert k is not None
            if k not in readers:
                readers[k] = stack.enter_context(open_weights(p))  # safetensors, or weights_only pickles
            return readers[k]

        all_inputs = [_Input(w, Path(p), reader(p), dict(getattr(e, "parameters", {}) or {}))
                      for (w, p), e in zip(named, [*entries, None], strict=False) if w != "tokenizer_source"]
        base = next((i for i in all_inputs if i.where == "base_model"), None)
        listed = [i for i in all_inputs if i.where != "base_model"]
        merged: list[_Input] = []
        for p in cfg.model_paths():  # the config's merged models, in order; a base not listed is the base input
            match = next((i for i in listed if _key(i.path) == _key(p)), None)
            if match is not None:
                listed.remove(match)
            merged.append(match if match is not None else base)  # type: ignore[arg-type]
        if base is not None:
            base.params = next((i.params for i in all_inputs if i.where != "base_model"
                                and _key(i.path) == base_key), {})
        ref = base or merged[0]
        checked = [ref, *[i for i in merged if i is not ref]]
        keys, from_base = _check_keys(checked, missing_keys)
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
            buffers = _OutputBuffers()  # float32 results go into recycled memory, given back once written
            recycle = dev.type == "cpu" and cfg.merge_method in _WRITES_INTO_OUT

            def produce(k: str) -> tuple[torch.Tensor, torch.Tensor | None]:
                if k in from_base:
                    assert base is not None
                    return _one_tensor(cfg, k, n, base, [], [base], specs[k][0], dev), None
                if not (recycle and specs[k][0] == torch.float32 and ref.reader.dtype(k).is_floating_point):
                    return _one_tensor(cfg, k, n, base, merged, checked, specs[k][0], dev), None
                flat, view = buffers.take(tuple(specs[k][1]))
                try:
                    t = _one_tensor(cfg, k, n, base, merged, checked, specs[k][0], dev, out=view)
                except BaseException:
                    buffers.give(flat)
                    raise
                if t.data_ptr() != view.data_ptr():  # the method made its own result: the buffer is free
                    buffers.give(flat)
                    return t, None
                return t, flat

            # workers read and merge the next tensors while this thread writes the current one, in key order
            with (ShardedWeightsWriter(tmp, specs, out_shard_size, metadata={"format": "pt"}) as writer,
                  merge_workers("vlmerge-mergekit") as pool):
                for k, (t, flat) in zip(keys, read_ahead(pool, produce, keys), strict=True):
                    writer.write(k, t)
                    del t
                    if flat is not None:
                        buffers.give(flat)
            assert _key(cfg_dir) == _key((base or merged[0]).path)
            for src, name in (*side, *tok_files):
                shutil.copyfile(src, tmp / name)  # a symlink's content (a Hugging Face cache links into blobs/)
            resolved = _resolved_config(cfg)
            (tmp / CONFIG_OUT).write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
            options = {"missing_keys": missing_keys, "out_shard_size": out_shard_size, "device": dev.type}
            record = _merge_record(cfg, base, merged, writer, sorted(from_base), options, hash_inputs)
            atomic_write_json(tmp / RECORD_OUT, record)
            (tmp / CARD_OUT).write_text(_model_card(out.name, cfg, base, merged, resolved, record),
                                        encoding="utf-8")
            _publish(tmp, out, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _merge_record(cfg: MergekitConfig, base: _Input | None, merged: Sequence[_Input], writer: ShardedWeightsWriter,
                  from_base: list[str], options: dict[str, Any], hash_inputs: bool) -> dict[str, Any]:
    """The provenance of a mergekit-config merge (``vlmerge_merge.json``), the same kind of record vlmerge's own
    merges keep in ``config.json["merge"]``: method, parameters, the inputs fingerprinted
    (:func:`~.streaming.fingerprint`: sizes and header hashes, or SHA-256 with ``hash_inputs``), options,
    version and time."""
    return {
        "kind": "mergekit",
        "method": cfg.merge_method,
        "parameters": dict(cfg.parameters),
        "models": [{"key": i.where, "parameters": dict(i.params), **fingerprint(_key(i.path), hash_inputs)}
                   for i in merged],
        "base": ({"key": "base_model", **fingerprint(_key(base.path), hash_inputs)} if base is not None else None),
        "dtype": cfg.dtype,
        "out_dtype": cfg.out_dtype,
        "tokenizer_source": cfg.tokenizer_source,
        "options": options,
        "taken_from_base": from_base,
        "weights": writer.names,
        "config": CONFIG_OUT,
        "vlmerge_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _inline(params: Mapping[str, Any]) -> str:
    return ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in params.items()) or "none"


def _model_card(name: str, cfg: MergekitConfig, base: _Input | None, merged: Sequence[_Input],
                resolved: dict[str, Any], record: dict[str, Any]) -> str:
    """A short ``README.md``: merged with vlmerge, the method and its parameters, the inputs, the config."""
    dt = cfg.out_dtype or cfg.dtype
    lines = [
        "---", "tags:", "- merge", "- vlmerge", "---", "", f"# {name}", "",
        f"This model was merged with vlmerge {__version__} from a mergekit-style config "
        f"(`vlmerge merge CONFIG.yaml OUT_DIR`), on {record['created']}.", "",
        "## Merge method", "",
        f"**{cfg.merge_method}**, global parameters: {_inline(cfg.parameters)}.",
        f"Computed in float32; output dtype: {dt or 'as the inputs'}.", "",
        "## Inputs", "",
    ]
    if base is not None:
        lines.append(f"* base model: `{_key(base.path)}`")
    lines += [f"* `{_key(i.path)}` ({i.where}), parameters: {_inline(i.params)}" for i in merged]
    if record["taken_from_base"]:
        lines.append(f"* {len(record['taken_from_base'])} tensors some models lack were taken from the base model "
                     f"(`--missing-keys base`): {_listing(record['taken_from_base'], 4)}")
    lines += ["", "## Configuration", "", f"The resolved config (`{CONFIG_OUT}`):", "", "```yaml",
              yaml.safe_dump(resolved, sort_keys=False).rstrip(), "```", "",
              f"Provenance (input fingerprints, options, version, time): `{RECORD_OUT}`.", ""]
    return "\n".join(lines)


# Methods whose result is NaN / Inf wherever any merged input is (products with every input, no masking or
# selection): their inputs need no check of their own, the result's finds a bad input (0 · Inf = NaN too).
# (DARE's masks multiply, and NaN · 0 is NaN, so a dropped bad entry still reaches the result; the selection-based
# methods may drop it, and DELLA's density 0 keeps nothing at all, so their inputs are checked one by one.)
_PROPAGATES_NONFINITE = ("linear", "task_arithmetic", "passthrough", "dare_linear")
# Methods whose ``_merge_tensor`` writes a float32 result into the ``out`` buffer it is given.
_WRITES_INTO_OUT = ("linear", "sce", *TASK_VECTOR_METHODS)


def _one_tensor(cfg: MergekitConfig, k: str, n: int, base: _Input | None, merged: Sequence[_Input],
                checked: Sequence[_Input], out_dtype: torch.dtype,
                device: torch.device | str = "cpu", out: torch.Tensor | None = None) -> torch.Tensor:
    """Read tensor ``k`` of every input, refuse NaN / Inf, merge in float32 on ``device`` (or check integer
    tensors equal and copy), cast to ``out_dtype``, refuse a non-finite result and return it on the CPU. With
    no ``merged`` inputs (a key taken from the base), the base's tensor, cast. For the methods of
    :data:`_PROPAGATES_NONFINITE` whose every checked input is merged, the inputs are checked only when the
    result is not finite (one pass instead of one per input), with the same errors in the same order."""
    tensors = {id(inp): inp.reader.get(k) for inp in checked}
    used = {id(i) for i in merged} | ({id(base)} if base is not None and cfg.merge_method in TASK_VECTOR_METHODS
                                      else set())
    deferred = bool(merged) and cfg.merge_method in _PROPAGATES_NONFINITE and all(id(i) in used for i in checked)

    def check_inputs() -> None:
        for inp in checked:
            t = tensors[id(inp)]
            if t.is_floating_point() and not is_finite(t):
                raise ValueError(f"{inp.path}: tensor {k!r} contains NaN or Inf")

    ref = tensors[id(checked[0])]
    if not ref.is_floating_point():
        for inp in checked[1:]:
            if not torch.equal(tensors[id(inp)], ref):
                raise ValueError(f"{inp.path}: integer tensor {k!r} differs from {checked[0].path}'s; non-float "
                                 "tensors are copied and must be equal in every model")
        return ref
    if not deferred:
        check_inputs()
    if not merged:
        res32 = res = ref.to(out_dtype)
    else:
        b = tensors[id(base)].to(device).float() if base is not None else None
        xs = [tensors[id(i)].to(device).float() for i in merged]
        res32 = _merge_tensor(cfg, k, layer_index(k), n, b, merged, xs, out=out)
        res = res32.to(out_dtype)
    if not is_finite(res):  # one check of the output; the cause is looked up only on this error path
        if deferred:
            check_inputs()
        if not is_finite(res32):
            raise ValueError(f"merged tensor {k!r} is not finite in float32 (overflow, or 0 / 0 from weights too "
                             "small or large for float32); check the weights / lambda")
        raise ValueError(f"merged tensor {k!r} is not finite after the cast to "
                         f"{str(out_dtype).removeprefix('torch.')} (it overflows that dtype); "
                         "check the weights / lambda, or use a wider dtype")
    return res.to("cpu").contiguous()


# Flags of ``vlmerge merge`` that belong to vlmerge's own merges, not to a mergekit config.
_OTHER_FLAGS = ("base", "alpha", "alpha_schedule", "vl_ratio", "lam", "lam_schedule", "gamma", "density", "drop",
                "seed", "normalize", "weights", "param", "grams", "data", "batches", "save_grams")


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
    shard = getattr(args, "out_shard_size", None)
    shard_bytes = parse_size(shard) if shard is not None else None
    cfg = load_mergekit_config(args.paths[0])
    with warnings.catch_warnings(record=True) as caught:  # each distinct warning once, as one line
        warnings.simplefilter("always")
        out = run_mergekit(cfg, outs[0], overwrite=args.overwrite, source=args.paths[0],
                           missing_keys=getattr(args, "missing_keys", None) or "error", out_shard_size=shard_bytes,
                           device=getattr(args, "device", None) or "cpu",
                           hash_inputs=bool(getattr(args, "hash_inputs", False)))
    for text in dict.fromkeys(str(w.message) for w in caught):
        print(f"warning: {text}", file=sys.stderr)
    print(f"merged ({cfg.merge_method}, mergekit config) -> {out}")
    return 0
