"""Merging task-fine-tuned models, UnIVAL §5: interpolation, uniform soups, Fusing, Ratatouille, λ search,
greedy soups; task arithmetic / TIES / DARE on task vectors. The arithmetic is :mod:`vlmerge.merge`'s.

* **vanilla**: each task fine-tuned from the pre-trained model (:func:`vlmerge.finetune.finetune`).
* **Fusing** (Choshen et al. 2022): the target task is fine-tuned from the uniform average of the auxiliary
  tasks' fine-tuned weights (:func:`fusing_init`, :func:`fusing`).
* **Ratatouille** (Ramé et al. 2023): each auxiliary model is fine-tuned again on the target task, and those
  weights are averaged with λ = 1/N (:func:`ratatouille`).
* **interpolation** W = λ·W₁ + (1 − λ)·W₂ (:func:`interpolate`), **uniform soup** Σ W_m / N (:func:`soup`),
  **task-vector merges** W₀ + f(W_m − W₀) (:func:`task_vector_merge`: ``task_arithmetic``, ``ties``, ``dare``).
* **coefficient search**: :func:`grid_search` (λ on a validation score) and :func:`greedy_soup` (Wortsman
  et al. 2022: add a model only if the validation score improves).

States are ``{name: tensor}`` dicts (a model's ``state_dict()``). Two head modes: **unified** models
(``head: unified``) have identical parameter sets and merge whole; **task-head** models merge their backbone
(every key outside ``heads.``) and each task keeps its own head (:func:`merge_task_head_models`; Fusing and
Ratatouille average the keys the models share, :func:`average_checkpoints`).
Incompatible inputs (keys, shapes, answer vocabularies, head modes) raise ``ValueError`` naming the keys
before anything is computed or written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..merge import merge_tensors
from ..models import load_model, save_model
from ..models.roles import parse_param_name
from .model import checkpoint_extras

State = Mapping[str, torch.Tensor]
TASK_VECTOR_METHODS: dict[str, str] = {"task_arithmetic": "modality_arithmetic", "ties": "ties", "dare": "dare"}
"""Task-vector merge -> the :mod:`vlmerge.merge` method computing it (task arithmetic is modality arithmetic
on whole models: W₀ + λ Σ_m (W_m − W₀))."""


# ------------------------------------------------------------------------------------------------- checks
def check_lambda(lam: float, name: str = "lambda") -> float:
    """λ must be a finite number in [0, 1]."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or not 0 <= lam <= 1:
        raise ValueError(f"{name}={lam!r} is invalid; allowed range: [0, 1]")
    return float(lam)


def check_soup_weights(weights: Sequence[float], n: int) -> tuple[float, ...]:
    """One weight per model, each in [0, 1], summing to 1 (± 1e-6)."""
    w = tuple(float(x) for x in weights)
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} values for {n} models; give one per model")
    for i, x in enumerate(w):
        check_lambda(x, f"weights[{i}]")
    if abs(sum(w) - 1.0) > 1e-6:
        raise ValueError(f"weights {list(w)} sum to {sum(w):.6g}; allowed: weights in [0, 1] summing to 1")
    return w


def _listing(items: Sequence[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" … (+{len(items) - n} more)" if len(items) > n else "")


def check_states(states: Sequence[State], names: Sequence[str] | None = None, keys: Sequence[str] | None = None
                 ) -> list[str]:
    """The common key list of ``states`` (restricted to ``keys`` when given); ``ValueError`` naming every key
    missing from a model or shaped differently."""
    if len(states) < 1:
        raise ValueError("no models to merge")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(states))]
    ref = states[0]
    want = list(keys) if keys is not None else list(ref)
    diffs: list[str] = []
    for name, st in zip(names, states, strict=True):
        if keys is None:
            diffs += [f"{k} (only in {name})" for k in st if k not in ref]
        for k in want:
            if k not in st:
                diffs.append(f"{k} (missing in {name})")
            elif tuple(st[k].shape) != tuple(ref[k].shape):
                diffs.append(f"{k} ({name}: {list(st[k].shape)} vs {names[0]}: {list(ref[k].shape)})")
    if diffs:
        raise ValueError(f"the models differ in {len(diffs)} keys: {_listing(diffs)}")
    return want


def check_records(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    """The models' common head mode (``unified`` / ``task``) from their ``config.json`` extras; ``ValueError``
    when modes, tokenizers or answer vocabularies differ, naming the tasks whose answers differ."""
    modes = ["unified" if "unified" in r else "task" for r in records]
    if len(set(modes)) > 1:
        raise ValueError("cannot merge unified and task-head models: " +
                         ", ".join(f"{n}: {m}" for n, m in zip(names, modes, strict=True)))
    if modes[0] == "task":
        return "task"
    ref = records[0]["unified"]
    for name, r in zip(names[1:], records[1:], strict=True):
        u = r["unified"]
        if u.get("tokenizer") != ref.get("tokenizer") or u.get("answer_tokens") != ref.get("answer_tokens"):
            raise ValueError(f"answer vocabularies differ: {name} has tokenizer {u.get('tokenizer')!r} "
                             f"({u.get('answer_tokens')}), {names[0]} {ref.get('tokenizer')!r} "
                             f"({ref.get('answer_tokens')})")
        a, b = u.get("answers", {}), ref.get("answers", {})
        bad = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if bad:
            raise ValueError(f"answer vocabularies differ between {names[0]} and {name} for tasks {bad}")
    return "unified"


# -------------------------------------------------------------------------------------------------- merges
def merge_states(method: str, states: Sequence[State], *, base: State | None = None,
                 weights: Sequence[float] | None = None, keys: Sequence[str] | None = None,
                 names: Sequence[str] | None = None, **params: Any) -> dict[str, torch.Tensor]:
    """Merge ``states`` key by key with the :mod:`vlmerge.merge` method ``method`` (on ``keys``, default every
    key); float tensors are merged, integer buffers must be equal and are copied. Checked first."""
    ks = check_states(list(states) + ([base] if base is not None else []),
                      (list(names) if names else [f"model {i}" for i in range(len(states))]) +
                      (["base"] if base is not None else []), keys)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        ts = [s[k] for s in states]
        if not ts[0].is_floating_point():
            if any(not torch.equal(t, ts[0]) for t in ts[1:]):
                raise ValueError(f"{k}: integer tensors differ between the models; cannot merge")
            out[k] = ts[0].clone()
            continue
        role = parse_param_name(k)
        out[k] = merge_tensors(method, ts, base=None if base is None else base[k], weights=weights, name=k,
                               layer=role.layer, module=role.module, **params)
    return out


def interpolate(w1: State, w2: State, lam: float, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """W = λ·W₁ + (1 − λ)·W₂, λ ∈ [0, 1] (UnIVAL Fig. 2); λ = 1 / 0 return W₁ / W₂ exactly."""
    lam = check_lambda(lam, "lambda")
    ks = check_states([w1, w2], ["W1", "W2"], keys)
    if lam in (0.0, 1.0):
        src = w1 if lam == 1.0 else w2
        return {k: src[k].clone() for k in ks}
    return merge_states("average", [w1, w2], weights=[lam, 1.0 - lam], keys=ks, names=["W1", "W2"])


def soup(states: Sequence[State], weights: Sequence[float] | None = None, keys: Sequence[str] | None = None
         ) -> dict[str, torch.Tensor]:
    """Σ_m w_m W_m with w in [0, 1] summing to 1 (default the uniform soup, λ = 1/N); one model -> a copy."""
    n = len(states)
    w = check_soup_weights(weights, n) if weights is not None else None
    if n == 1:
        ks = check_states(states, None, keys)
        return {k: states[0][k].clone() for k in ks}
    return merge_states("average", states, weights=w, keys=keys)


def task_vector_merge(method: str, states: Sequence[State], base: State, keys: Sequence[str] | None = None,
                      **params: Any) -> dict[str, torch.Tensor]:
    """W₀ + merged task vectors τ_m = W_m − W₀: ``task_arithmetic`` (W₀ + λ Σ τ_m, param ``lam``), ``ties``
    (``density``, ``lam``), ``dare`` (``drop``, ``lam``, ``normalize``, ``seed``)."""
    if method not in TASK_VECTOR_METHODS:
        raise ValueError(f"unknown task-vector merge {method!r}; allowed values: {sorted(TASK_VECTOR_METHODS)}")
    return merge_states(TASK_VECTOR_METHODS[method], states, base=base, keys=keys, **params)


def is_head_key(key: str) -> bool:
    return parse_param_name(key).kind == "head"


def merge_task_head_models(merge: Callable[[list[State], list[str]], dict[str, torch.Tensor]],
                           models: Mapping[str, State]) -> dict[str, dict[str, torch.Tensor]]:
    """Task-head mode: ``merge(states, backbone_keys)`` merges the backbone (every key outside ``heads.``,
    which must match across models); each task's model then gets that backbone plus its own heads.
    Returns ``{task: state}``."""
    names, states = list(models), list(models.values())
    backbone = [k for k in states[0] if not is_head_key(k)]
    check_states(states, names, backbone)
    merged = merge(states, backbone)
    return {n: {**merged, **{k: v.clone() for k, v in s.items() if is_head_key(k)}} for n, s in models.items()}


# ------------------------------------------------------------------------------------------- checkpoints
def load_state(ckpt: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_model(ckpt).state_dict().items()}


def save_state(state: State, like: str | os.PathLike[str], out: str | os.PathLike[str],
               heads: Sequence[str] | None = None, **record: Any) -> Path:
    """Save ``state`` as a checkpoint with ``like``'s model config (its heads replaced by ``heads`` when given)
    and extras (tokenizer, unified record …)."""
    from ..models import VLMo, load_model_config

    config = load_model_config(like)
    model = VLMo(config.replace(heads=tuple(heads)) if heads is not None else config)
    model.load_state_dict(dict(state), strict=True)
    extras = {k: v for k, v in checkpoint_extras(like).items() if k not in ("finetune", "soup")}
    return save_model(model, out, **extras, **({"soup": record} if record else {})) or Path(out)


def check_checkpoints(dirs: Sequence[str | os.PathLike[str]]) -> str:
    """Head mode shared by checkpoint ``dirs`` (``ValueError`` on a mode / answer-vocabulary mismatch)."""
    return check_records([checkpoint_extras(d) for d in dirs], [str(d) for d in dirs])


def merge_task_models(method: str, dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                      base_dir: str | os.PathLike[str] | None = None, weights: Sequence[float] | None = None,
                      **params: Any) -> Path:
    """Merge fine-tuned checkpoints on disk with :func:`vlmerge.merge.merge_models` after checking their head
    modes and answer vocabularies (it checks keys / shapes before writing). Unified models only: task-head
    models differ in their heads; merge those in memory with :func:`merge_task_head_models`."""
    from ..merge import merge_models

    mode = check_checkpoints(list(dirs) + ([base_dir] if base_dir is not None and "unified" in
                                            checkpoint_extras(base_dir) else []))
    if mode != "unified":
        raise ValueError("task-head models keep their own heads: merge their backbones with "
                         "merge_task_head_models; merge_task_models takes unified (head=unified) models")
    if weights is not None and method in ("average", "interpolation"):
        check_soup_weights(weights, len(dirs))
    return merge_models(method, dirs, out, base_dir=base_dir, weights=weights, **params)


# ---------------------------------------------------------------------------------------------- recipes
FinetuneFn = Callable[[str, Path, Path], Path]
"""``(task, init_dir, out_dir) -> checkpoint dir``: one fine-tune (e.g. :func:`vlmerge.finetune.finetune`
with the study's settings)."""


def fusing_init(aux_states: Sequence[State]) -> dict[str, torch.Tensor]:
    """Fusing's initialisation: the uniform average of the auxiliary tasks' fine-tuned weights."""
    return soup(list(aux_states))


def average_checkpoints(dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], **record: Any) -> Path:
    """The uniform average of checkpoints ``dirs`` saved to ``out``. Unified models: every key (they must
    match). Task-head models: the keys all of them share (backbone and common heads); a head only some
    of them have is dropped."""
    from ..models import load_model_config

    mode = check_checkpoints(dirs)
    states = [load_state(d) for d in dirs]
    if mode == "unified":
        return save_state(soup(states), dirs[0], out, **record)
    configs = [load_model_config(d) for d in dirs]
    heads = [h for h in configs[0].heads if all(h in c.heads for c in configs[1:])]
    keys = [k for k in states[0] if not is_head_key(k) or k.split(".")[1] in heads]
    return save_state(soup(states, keys=keys), dirs[0], out, heads=heads, **record)


def fusing(target: str, aux_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
           finetune_fn: FinetuneFn) -> Path:
    """Fine-tune ``target`` from the average of ``aux_dirs`` (saved to ``out/init``); returns ``out/model``."""
    out = Path(out)
    init = average_checkpoints(aux_dirs, out / "init", recipe="fusing-init", members=[str(d) for d in aux_dirs])
    return finetune_fn(target, init, out / "model")


def ratatouille(target: str, aux_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                finetune_fn: FinetuneFn) -> tuple[Path, list[Path]]:
    """Fine-tune each auxiliary model again on ``target`` (``out/aux<i>``), then average those re-fine-tuned
    weights with λ = 1/N into ``out/model``. Returns (the averaged model, the re-fine-tuned models)."""
    out = Path(out)
    tuned = [finetune_fn(target, Path(d), out / f"aux{i}") for i, d in enumerate(aux_dirs)]
    return average_checkpoints(tuned, out / "model", recipe="ratatouille", target=target,
                               members=[str(t) for t in tuned]), tuned


# --------------------------------------------------------------------------------------- coefficient search
def grid_search(score: Callable[[float], float], lambdas: Sequence[float]) -> dict[str, Any]:
    """Evaluate ``score(λ)`` (a validation score) at every λ; the best λ (the smallest on ties)."""
    lams = [check_lambda(x) for x in lambdas]
    if not lams:
        raise ValueError("lambdas is empty; allowed: one or more values in [0, 1]")
    scores = {lam: float(score(lam)) for lam in lams}
    best = max(lams, key=lambda x: (scores[x], -x))
    return {"best": best, "score": scores[best], "scores": {str(k): v for k, v in scores.items()}}


def greedy_soup(candidates: Sequence[str], score: Callable[[Sequence[str]], float]) -> dict[str, Any]:
    """Greedy soup (Wortsman et al. 2022): candidates sorted by their own validation score, best first; each
    next one joins the soup only if ``score(soup + [it])`` is strictly higher. ``collapsed`` is True when
    the soup ends as one model (no addition helped)."""
    if not candidates:
        raise ValueError("greedy_soup needs at least one candidate")
    alone = {c: float(score([c])) for c in candidates}
    order = sorted(candidates, key=lambda c: -alone[c])  # stable: ties keep the given order
    members, best = [order[0]], alone[order[0]]
    history = [{"tried": order[0], "score": best, "added": True}]
    for c in order[1:]:
        s = float(score([*members, c]))
        added = s > best
        history.append({"tried": c, "score": s, "added": added})
        if added:
            members, best = [*members, c], s
    return {"members": members, "score": best, "individual": alone, "history": history,
            "collapsed": len(members) == 1}
