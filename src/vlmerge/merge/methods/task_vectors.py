"""mergekit's task-vector merges in vlmerge's own schema: ``task_arithmetic``, ``dare_linear``, ``dare_ties``,
``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear`` (``vlmerge merge --method NAME --base W0 IN
OUT``, or ``--inputs A B ... --base W0 -o OUT``).

One generalized implementation, :func:`~vlmerge.merge.taskvector.merge_task_vectors` (its module has the
equations), run with each name's settings from mergekit's table
(:data:`~vlmerge.merge.mergekit.TASK_VECTOR_METHODS`: sparsification, consensus, default ``normalize`` /
``rescale``), exactly as a mergekit config with ``merge_method: NAME`` runs it::

    τ_i = W_i − W0,   τ̂_i = S(τ_i; density, gamma, epsilon),   W = W0 + λ · C(w_1 τ̂_1, ..., w_N τ̂_N)

In a modality merge the inputs are a slot's ``v`` / ``l`` (/ ``vl``) copies and W0 the seed checkpoint; in a
soup, whole models. Parameters (mergekit's names and defaults; one value for every input): ``lam`` (mergekit's
``lambda``: either name; ``--lam``; 1.0), ``normalize`` (``--normalize``), for the sparsifying methods
``density`` (``--density``; 1.0, ≥ 0; ``≥ 1`` keeps every entry) and ``rescale``, ``gamma`` (breadcrumbs*: 0.01,
in [0, 1]), ``epsilon`` (della*: 0.15, ≥ 0, with ``0 < density ± epsilon < 1`` when ``0 < density < 1``) and
``seed`` (dare_* / della*: ``--seed``; 0). Weights: ``--weights`` (one per input, or ``v=..,l=..``; default 1
each, where mergekit requires one per model). mergekit's ``int8_mask`` (a memory option) is not a parameter
here.

Random methods: input ``i`` (0-based: ``v``, ``l``, ``vl`` in a modality merge) of the output tensor ``NAME``
draws from :func:`~vlmerge.merge.taskvector.input_generator` ``(seed, NAME, i)``: the bits a mergekit config
with ``random_seed: seed`` draws for a tensor of that name, whatever the order tensors are visited.

vlmerge's own ``ties`` and ``dare`` keep their meaning (:mod:`.ties`, :mod:`.dare`); mergekit's ``ties`` runs
from a mergekit config. ``task_arithmetic`` with unit weights and ``normalize: false`` is
``modality_arithmetic`` with the same λ (whose default is 0.5, not 1).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import AliasChoices, Field, create_model, model_validator

from ..base import MergeContext, MergeMethod, MergeParams, register_method
from ..mergekit import TASK_VECTOR_METHODS
from ..taskvector import Consensus, Sparsification, TaskVectorSettings, input_generator, merge_task_vectors

_RANDOM = ("random", "della")
_SUMMARIES = {
    "task_arithmetic": "W0 + λ·Σ w_m (W_m − W0), / Σ w_m with normalize (mergekit's task_arithmetic)",
    "dare_linear": "keep each task-vector entry with probability density, L1 rescale, weighted sum "
                   "(mergekit's dare_linear)",
    "dare_ties": "keep each task-vector entry with probability density, L1 rescale, TIES sign consensus "
                 "(mergekit's dare_ties)",
    "breadcrumbs": "drop the smallest and the gamma largest |τ| (density kept), weighted sum (mergekit's "
                   "breadcrumbs)",
    "breadcrumbs_ties": "drop the smallest and the gamma largest |τ| (density kept), TIES sign consensus "
                        "(mergekit's breadcrumbs_ties)",
    "della": "keep entries with rank-based probabilities density ± epsilon per row, L1 rescale, sign consensus "
             "(mergekit's della)",
    "della_linear": "keep entries with rank-based probabilities density ± epsilon per row, L1 rescale, "
                    "weighted sum (mergekit's della_linear)",
}


class TaskVectorParams(MergeParams):
    """Base of the generated parameter models: checks DELLA's ``density ± epsilon`` range."""

    @model_validator(mode="after")
    def _della_range(self) -> TaskVectorParams:
        eps: float | None = getattr(self, "epsilon", None)
        d: float = getattr(self, "density", 1.0)
        if eps is not None and 0 < d < 1 and not (d - eps > 0 and d + eps < 1):
            raise ValueError(f"density ± epsilon must lie in (0, 1); got density={d:g}, epsilon={eps:g}")
        return self


def _params_model(name: str, kind: Sparsification, normalize: bool, rescale: bool) -> type[MergeParams]:
    fields: dict[str, Any] = {
        "lam": (float, Field(1.0, validation_alias=AliasChoices("lam", "lambda"),
                             description="scaling λ of the merged task vector (mergekit's lambda)")),
        "normalize": (bool, Field(normalize, description="divide by the (agreeing) weights' sum")),
    }
    if kind != "none":
        fields["density"] = (float, Field(1.0, ge=0.0, description="kept fraction; ≥ 1 keeps every entry"))
        fields["rescale"] = (bool, Field(rescale, description="keep each sparsified task vector's L1 norm"))
    if kind == "magnitude_outliers":
        fields["gamma"] = (float, Field(0.01, ge=0.0, le=1.0, description="fraction of largest |τ| dropped"))
    if kind == "della":
        fields["epsilon"] = (float, Field(0.15, ge=0.0, description="half-width of the keep probabilities"))
    if kind in _RANDOM:
        fields["seed"] = (int, Field(0, ge=0, le=2**63 - 1, description="seed of the random masks"))
    camel = "".join(part.title() for part in name.split("_"))
    return create_model(f"{camel}Params", __base__=TaskVectorParams, **fields)


class TaskVectorMethod(MergeMethod):
    """One name of the family; subclasses (generated below) set the settings."""

    kind: ClassVar[Sparsification] = "none"
    consensus: ClassVar[Consensus] = "none"
    base = "required"
    uses_weights = True
    min_inputs = 1

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        p: Any = params
        assert ctx.base is not None
        n = len(tensors)
        w = ctx.weights or (1.0,) * n
        settings = TaskVectorSettings(sparsify=self.kind, consensus=self.consensus, normalize=p.normalize,
                                      rescale=getattr(p, "rescale", False), lam=p.lam)
        gens = [input_generator(p.seed, ctx.name, i) for i in range(n)] if self.kind in _RANDOM else None
        try:
            return merge_task_vectors(
                ctx.base, tensors, w, settings, density=[getattr(p, "density", 1.0)] * n,
                gamma=[p.gamma] * n if self.kind == "magnitude_outliers" else None,
                epsilon=[p.epsilon] * n if self.kind == "della" else None, generators=gens)
        except ValueError as e:
            raise ValueError(f"{self.name}: {ctx.name}: {e}") from None


def _register(name: str) -> type[MergeMethod]:
    kind, consensus, normalize, rescale = TASK_VECTOR_METHODS[name]
    attrs = {
        "name": name, "kind": kind, "consensus": consensus, "summary": _SUMMARIES[name],
        "Params": _params_model(name, kind, normalize, rescale),
        # a sum of every input entry and the base (coefficient 0 included): a NaN / Inf always reaches it
        "propagates_nonfinite": kind == "none" and consensus == "none",
        "__doc__": f"mergekit's ``{name}`` (sparsification {kind!r}, consensus {consensus!r}).",
        "__module__": __name__,
    }
    camel = "".join(part.title() for part in name.split("_"))
    return register_method(type(camel, (TaskVectorMethod,), attrs))


#: The names this module registers: mergekit's task-vector methods but ``ties`` (vlmerge's own ``ties``).
NAMES = tuple(m for m in TASK_VECTOR_METHODS if m != "ties")
CLASSES = {name: _register(name) for name in NAMES}
