"""The merge-method interface, the registry, and the tensor-level entry point :func:`merge_tensors`.

A method is a small class registered by name (mergekit's ``merge_methods/`` pattern):

* ``Params`` -- a pydantic model of its declared parameters (``extra="forbid"``: unknown names raise);
* ``base``   -- whether a base weight W0 is ``"required"``, ``"optional"`` or ``"unused"``;
* ``uses_weights`` -- whether per-input weights are accepted;
* :meth:`MergeMethod.merge` -- merges one slot: a list of float32 tensors of one shape -> one tensor.

Everything around the arithmetic (dtype handling, shape / finiteness checks, parameter parsing) lives here,
so a method module holds only its equation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from ..config import FLOAT32_MAX, validate
from .grams import gram_problem

BaseUse = Literal["required", "optional", "unused"]


def check_numbers(data: Any, where: str, bool_ok: Sequence[str] = ()) -> None:
    """``ValueError`` when a (nested) value of ``data`` is a bool where a number is expected (YAML's ``true``
    is not 1.0), or a number that is not finite or lies outside float32's range (merges compute in float32).
    ``bool_ok``: top-level keys whose values are meant to be booleans."""

    def walk(v: Any, key: str) -> None:
        if isinstance(v, bool):
            raise ValueError(f"{where} {key}={v!r}: expected a number, not true/false")
        if isinstance(v, (int, float)) and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX):
            raise ValueError(f"{where} {key}={v!r}: expected a finite number within float32's range")
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(x, f"{key}.{k}")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{key}[{i}]")

    if isinstance(data, Mapping):
        for k, v in data.items():
            if k not in bool_ok:
                walk(v, str(k))


class MergeParams(BaseModel):
    """Base class of every method's parameter model: frozen, unknown keys forbidden, numbers finite and
    not booleans (:func:`check_numbers`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers(cls, data: Any) -> Any:
        flags = [k for k, f in cls.model_fields.items() if f.annotation is bool]
        check_numbers(data, "param", bool_ok=flags)
        return data


@dataclass(frozen=True)
class MergeContext:
    """What a method may know about the slot it merges, besides the tensors themselves.

    ``name``        the output tensor's name (error messages; random methods seed each tensor with
                    ``tensor_seed(seed, name)``, in a checkpoint merge and in :func:`merge_tensors` alike).
    ``layer``       0-based block index, for per-layer schedules (``None`` outside transformer blocks).
    ``module``      the block module (``norm1`` / ``attn`` / ``norm2`` / ``mlp``), for per-module schedules.
    ``modalities``  the modality of each input (``("v", "l")`` or ``("v", "l", "vl")``) in a modality merge;
                    ``None`` when the inputs are whole models (a soup).
    ``base``        W0 as float32, same shape as the inputs, or ``None``.
    ``weights``     one weight per input, or ``None``.
    ``grams``       RegMean: one float64 Gram matrix [in, in] per input when the slot is a linear weight.
    ``linear``      True when the slot is a linear layer's ``weight`` [out, in] (RegMean solves those).
    ``out``         a contiguous float32 buffer of the output's shape that aliases no input, which the method
                    may write its result into (take it with :meth:`output`). Streaming merges recycle the
                    buffers of slots already written: first-touching fresh memory costs as much as DARE's
                    arithmetic (benchmarks/results/merge_throughput.md).
    """

    name: str = "tensor"
    layer: int | None = None
    module: str | None = None
    modalities: tuple[str, ...] | None = None
    base: torch.Tensor | None = None
    weights: tuple[float, ...] | None = None
    grams: tuple[torch.Tensor, ...] | None = None
    linear: bool = False
    out: torch.Tensor | None = None

    def output(self, like: torch.Tensor) -> torch.Tensor:
        """A float32 tensor shaped like ``like``, on its device, to write the result into: :attr:`out` when
        it fits, else fresh (uninitialized) memory."""
        o = self.out
        if (
            o is not None
            and o.shape == like.shape
            and o.dtype == torch.float32
            and o.device == like.device
            and o.is_contiguous()
        ):
            return o
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)


class MergeMethod:
    """One merge method. Subclasses set the class attributes and implement :meth:`merge`."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[MergeParams]] = MergeParams
    base: ClassVar[BaseUse] = "unused"
    uses_weights: ClassVar[bool] = False
    uses_grams: ClassVar[bool] = False
    min_inputs: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None  # most whole models :func:`merge_models` may combine
    summary: ClassVar[str] = ""
    schedules: ClassVar[tuple[str, ...]] = ()
    """Parameters that may be a per-layer / per-module schedule (:mod:`vlmerge.merge.schedule`)."""
    propagates_nonfinite: ClassVar[bool] = False
    """True when a NaN or Inf anywhere in an input or the base always leaves a NaN or Inf in the result: the
    result is a sum in which every input entry appears with some coefficient, even 0 (0·NaN and 0·Inf are
    NaN). Streaming merges then check the result instead of every input (one pass instead of one per
    input) and look for the input to blame only when the result is not finite. Tested for every method
    that sets it (``tests/merge/test_methods.py``)."""

    def parse_params(self, params: Mapping[str, Any] | MergeParams | None = None) -> MergeParams:
        """Validate ``params`` against :attr:`Params`; ``ValueError`` naming the key and allowed values."""
        if isinstance(params, self.Params):
            return params
        if isinstance(params, MergeParams):
            params = params.model_dump()
        return validate(self.Params, dict(params or {}), f"{self.name} params")

    def check_inputs(self, *, base: bool, weights: bool, grams: bool, what: str = "checkpoint") -> None:
        """The one check of what a merge call gives against what the method uses (every entry point runs
        it before reading anything): a base it requires or does not use, weights or Grams it does not take.
        ``what`` names the base in the message (``checkpoint`` or ``tensor``)."""
        if not base and self.base == "required":
            raise ValueError(f"{self.name}: needs a base {what} (W0, the weights the inputs started from): "
                             "pass --base / base=")
        if base and self.base == "unused":
            using = ", ".join(k for k, v in sorted(METHODS.items()) if v.base != "unused")
            raise ValueError(f"{self.name}: does not use a base {what}; drop --base / base= (methods with a "
                             f"base: {using})")
        if weights and not self.uses_weights:
            using = ", ".join(k for k, v in sorted(METHODS.items()) if v.uses_weights)
            raise ValueError(f"{self.name}: does not take weights (methods with weights: {using})")
        if grams and not self.uses_grams:
            users = ", ".join(k for k, v in sorted(METHODS.items()) if v.uses_grams)
            raise ValueError(f"{self.name}: does not use Gram matrices; drop --grams / --data / --save-grams "
                             f"(methods with Grams: {users})")

    def allowed_params(self) -> list[str]:
        return sorted(self.Params.model_fields)

    def check_layers(self, params: MergeParams, slots: Sequence[tuple[int | None, str | None]]) -> None:
        """Check that the schedules among :attr:`schedules` cover every merged slot ``(layer, module)`` (``None``:
        a tensor outside the blocks) before a checkpoint merge writes anything."""
        from .schedule import check_schedule

        for param in self.schedules:
            check_schedule(getattr(params, param), slots, f"{self.name}: {param}")

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        """Merge float32 ``tensors`` (all one shape) into one float32 tensor of that shape."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for ``--help``: name, summary, parameters with defaults."""
        fields = ", ".join(
            f"{k}={f.default!r}" if not f.is_required() else k
            for k, f in sorted(self.Params.model_fields.items())
        )
        base = {"required": "; base required", "optional": "; base optional", "unused": ""}[self.base]
        weights = "; --weights" if self.uses_weights else ""
        return f"{self.name}: {self.summary} [{fields}{base}{weights}]"


METHODS: dict[str, MergeMethod] = {}
"""Registered merge methods by name (filled by ``@register_method`` when :mod:`vlmerge.merge` is imported)."""


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: add an instance of ``cls`` to :data:`METHODS` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS:
        raise ValueError(f"merge method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str | MergeMethod) -> MergeMethod:
    """The registered method ``name``; ``ValueError`` listing the allowed names otherwise."""
    if isinstance(name, MergeMethod):
        return name
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; allowed methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from a run seed and the tensor's name: order-independent, so a streaming merge
    draws the same random masks as an in-memory one."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_weights(weights: Sequence[float] | None, n: int, method: str) -> tuple[float, ...] | None:
    """Validate per-input weights: one finite number per input."""
    if weights is None:
        return None
    check_numbers({"weights": list(weights)}, f"{method}:")
    w = tuple(float(x) for x in weights)
    if len(w) != n:
        raise ValueError(
            f"{method}: weights has {len(w)} values but there are {n} inputs; give one per input"
        )
    if not all(torch.isfinite(torch.tensor(w))):
        raise ValueError(f"{method}: weights must be finite numbers, got {list(w)}")
    return w


def is_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN / Inf. Fast path: any NaN / Inf makes the sum non-finite, and one sum is
    several times cheaper than ``isfinite(t).all()``; an overflowing sum falls back to the exact check."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]
"""(label for messages, dtype, shape) of one tensor a merge reads: what a safetensors header tells."""


def slot_problem(method: MergeMethod, inputs: Sequence[TensorSpec], base: Sequence[TensorSpec] = ()) -> str | None:
    """The one check of the inputs of one output tensor, from dtypes and shapes alone, shared by
    :func:`merge_tensors` and both streaming planners (:mod:`.streaming`): enough inputs for the method, one
    shape and dtype for all, a floating-point dtype, and every base copy of that shape and dtype. Returns the
    first problem as text naming the offending inputs, or None."""
    if len(inputs) < method.min_inputs:
        return f"{len(inputs)} inputs, {method.name} needs at least {method.min_inputs}"
    _, dtype, shape = inputs[0]
    if any(d != dtype or tuple(s) != tuple(shape) for _, d, s in inputs[1:]):
        listed = ", ".join(f"{label} {d} {list(s)}" for label, d, s in inputs)
        return f"{listed}: all inputs need one shape and dtype"
    if not dtype.is_floating_point:
        return f"dtype {dtype} is not floating point"
    for label, d, s in base:
        if d != dtype or tuple(s) != tuple(shape):
            return f"{f'base {label}' if label else 'base'} is {d} {list(s)} but the inputs are {dtype} {list(shape)}"
    return None


def merge_tensors(
    method: str | MergeMethod,
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    layer: int | None = None,
    module: str | None = None,
    modalities: Sequence[str] | None = None,
    name: str = "tensor",
    **params: Any,
) -> torch.Tensor:
    """Merge ``tensors`` (same shape and dtype) with method ``method``; returns the inputs' dtype.

    >>> merge_tensors("interpolation", [w_v, w_l], alpha=0.75)        # 0.75 W_v + 0.25 W_l
    >>> merge_tensors("ties", [a, b], base=w0, density=0.5)

    Arithmetic runs in float32 (RegMean solves in float64). ``name`` is the tensor's name: random methods
    draw from it (DARE from ``tensor_seed(seed, name)``, mergekit's dare_* / della* from
    ``tensor_seed(seed, f"{name}#{i}")`` for input ``i``), as a checkpoint merge does, so merging a state dict
    tensor by tensor with ``name=key`` writes what ``vlmerge merge`` writes for the same seed (and same-shaped tensors
    of different names get different masks). For ``interpolation`` the inputs are read as
    ``(W_v, W_l)`` or ``(W_v, W_l, W_vl)``; ``modalities`` says so explicitly. ``layer`` picks the value of a
    per-layer schedule, ``module`` that of a per-module one. RegMean takes ``grams=[G_1, ...]`` (one [in, in]
    Gram per input) for a 2-D weight.
    Raises ``ValueError`` on a shape / dtype mismatch, NaN / Inf, an unknown or out-of-range parameter,
    a missing or superfluous base, or weights of the wrong count.
    """
    m = get_method(method)
    grams = params.pop("grams", None) if m.uses_grams else None
    p = m.parse_params(params)
    ts = list(tensors)
    for i, t in enumerate([*ts, base]):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{m.name}: {'base' if i == len(ts) else f'tensors[{i}]'} is a {type(t).__name__}, "
                             "not a tensor")
    problem = slot_problem(m, [(f"tensors[{i}]", t.dtype, tuple(t.shape)) for i, t in enumerate(ts)],
                           [] if base is None else [("", base.dtype, tuple(base.shape))])
    if problem:
        raise ValueError(f"{m.name}: {name}: {problem}")
    ref = ts[0]
    for i, t in enumerate(ts):
        if not is_finite(t):
            raise ValueError(f"{m.name}: tensors[{i}] ({name}) contains NaN or Inf")
    m.check_inputs(base=base is not None, weights=weights is not None, grams=False, what="tensor")
    base32 = None
    if base is not None:
        if not is_finite(base):
            raise ValueError(f"{m.name}: base ({name}) contains NaN or Inf")
        base32 = base.to(torch.float32)
    w = check_weights(weights, len(ts), m.name)
    if modalities is not None and len(tuple(modalities)) != len(ts):
        raise ValueError(f"{m.name}: modalities has {len(tuple(modalities))} names for {len(ts)} tensors")
    g = None
    if m.uses_grams and grams is None and ref.dim() == 2 and len(ts) > 1:
        raise ValueError(
            f"{m.name}: a 2-D weight [out, in] needs grams=[G_1, ...] (one [in, in] Gram per tensor)"
        )
    if grams is not None:
        g = tuple(grams)
        if len(g) != len(ts):
            raise ValueError(
                f"{m.name}: grams has {len(g)} matrices for {len(ts)} tensors; give one per tensor"
            )
        if ref.dim() != 2:
            raise ValueError(
                f"{m.name}: grams apply to 2-D linear weights [out, in]; tensor is {list(ref.shape)}"
            )
        for i, gi in enumerate(g):
            if tuple(gi.shape) != (ref.shape[1], ref.shape[1]):
                raise ValueError(
                    f"{m.name}: grams[{i}] is {list(gi.shape)}; expected [{ref.shape[1]}, "
                    f"{ref.shape[1]}] (the weight's input width)"
                )
            problem = gram_problem(gi)
            if problem:
                raise ValueError(f"{m.name}: grams[{i}] {problem}")
    ctx = MergeContext(
        name=name,
        layer=layer,
        module=module,
        modalities=tuple(modalities) if modalities else None,
        base=base32,
        weights=w,
        grams=g,
        linear=g is not None,
    )
    out = m.merge([t.to(torch.float32) for t in ts], p, ctx)
    return out.to(ref.dtype)
