"""Know before merging: per-layer risk of a modality merge, and its drop estimated from measured merges.

The merging paper (§7, Table 5) correlates four global distances between W^v and W^l with the retrieval drop
after merging, over 4 checkpoints. This module goes further, before any merge is written:

* **Per layer** (and per module): the four distances and the *relative* L2 distance
  ``rel_l2 = ‖W^v − W^l‖ / sqrt((‖W^v‖² + ‖W^l‖²) / 2)`` (0 for equal copies, √2 for orthogonal ones of equal
  norm); with the seed weights W0 (``base``), the same for the task vectors τ_m = W^m − W0 (``tv_rel_l2``,
  ``tv_cosine``: how far the two modalities moved apart from where they started).
* **With data** (``batches`` of image-caption pairs): the *activation drift* of each layer. Each block is run
  on the hidden states the unmerged model feeds it on each modality's route, once with its own expert and once
  with the merged weights of the same slot (the merge is computed in memory with the chosen method);
  ``drift_m = ‖B_merged(x_m) − B(x_m)‖ / ‖B(x_m) − x_m‖`` over the real tokens (the change relative to what the
  block adds to its residual stream), and ``drift`` is the mean over the two routes. ``out_drift`` is
  1 − cos between the merged and the unmerged model's final [CLS] states, averaged over both routes: the end
  to end effect, which needs no evaluation set.
* **Risk** of a layer: its ``drift`` when data was given, else its ``rel_l2``; the layers are ranked by it
  (a layer whose copies are equal has zero risk in both).
* **Merge features** (:func:`merge_features`): how far one merge moves each modality's weights,
  ``merge_rel_v = ‖W* − W^v‖ / sqrt((‖W*‖² + ‖W^v‖²) / 2)`` over every grouped parameter (W* the merged tensor;
  a layer kept modality-specific counts with distance 0), the same for ``l``, and their maximum. Unlike the
  checkpoint's distances they depend on the method and its coefficient (interpolation at α moves the vision
  copy by (1 − α)·‖W^v − W^l‖), so one predictor can serve every merge.
* **Drop estimate**: a least-squares fit ``drop ≈ a + Σ_j b_j·f_j`` on measured (checkpoint features, merge,
  drop) points (the study writes them: :data:`CALIBRATION_NAME`). Per merge (``method`` and ``params`` given)
  it uses the points of that merge and the single global feature with the smallest leave-one-group-out error
  (a group is a source run: points that share a training run are held out together). *Pooled* (no method) it
  uses every point, of any method and coefficient, and picks among the single features and the pair
  (``merge_rel_v``, ``merge_rel_l``) the same way. The interval is the 95 % prediction interval of the fit,
  ``t_{n−p−1} · s · sqrt(1 + x₀ᵀ(XᵀX)⁻¹x₀)`` with ``s`` the residual standard deviation and ``x₀ = (1, f)``;
  for one feature that is ``t_{n−2} · s · sqrt(1 + 1/n + (f − f̄)² / S_ff)``. The held-out r of the chosen
  fit is slightly optimistic: the choice among the candidates saw the same held-out errors.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.roles import merge_groups
from .checkpoint import checkpoint_distances
from .correlation import pearson

CALIBRATION_NAME = "predict-calibration.json"
CALIBRATION_FORMAT = "vlmerge-predict-calibration"
WEIGHT_FEATURES = ("l2", "cosine", "ssd", "tssd", "rel_l2")
BASE_FEATURES = ("tv_rel_l2", "tv_cosine")
DATA_FEATURES = ("drift", "out_drift")
MERGE_FEATURES = ("merge_rel_v", "merge_rel_l", "merge_rel_max")
FEATURES = (*WEIGHT_FEATURES, *BASE_FEATURES, *DATA_FEATURES, *MERGE_FEATURES)
"""Every global feature a calibration point can carry (the predictor picks among those every point has)."""
MERGE_DEPENDENT = (*DATA_FEATURES, *MERGE_FEATURES)
"""The features that describe one merge rather than the checkpoint (they change with method and coefficient)."""
PAIRED_FEATURES = (("merge_rel_v", "merge_rel_l"),)
"""Feature sets the pooled predictor tries besides every single feature."""


# -------------------------------------------------------------------------------------------- features
def _rel(sq: float, xx: float, yy: float) -> float:
    scale = math.sqrt((xx + yy) / 2)
    return 0.0 if scale == 0 else math.sqrt(sq) / scale


class _Pair:
    """Streaming sums of two vectors: ‖x − y‖², ‖x‖², ‖y‖², x·y (float64)."""

    def __init__(self) -> None:
        self.sq = self.xx = self.yy = self.dot = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        a, b = x.reshape(-1).double(), y.reshape(-1).double()
        self.sq += float(((a - b) ** 2).sum())
        self.xx += float(a @ a)
        self.yy += float(b @ b)
        self.dot += float(a @ b)

    def rel_l2(self) -> float:
        return _rel(self.sq, self.xx, self.yy)

    def cosine(self) -> float:
        if self.xx == 0 or self.yy == 0:
            return 0.0 if self.xx == self.yy else 1.0
        return 1.0 - self.dot / math.sqrt(self.xx * self.yy)


def _weight_features(sd: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None
                     ) -> tuple[dict[str, float], dict[int, dict[str, float]], dict[tuple[int, str], float]]:
    """(global, per layer, per (layer, module) ``rel_l2``) from the v / l copies (and the task vectors)."""
    pairs: dict[Any, _Pair] = {}
    tv: dict[Any, _Pair] = {}
    for g in merge_groups(sd):
        if "v" not in g.sources or "l" not in g.sources:
            continue
        v, lang = sd[g.sources["v"]], sd[g.sources["l"]]
        for key in (None, g.layer, (g.layer, g.module)):
            pairs.setdefault(key, _Pair()).add(v, lang)
        if base is not None:
            w0 = base[g.target] if g.target in base else base[g.sources["v"]]
            for key in (None, g.layer):
                tv.setdefault(key, _Pair()).add(v.double() - w0.double(), lang.double() - w0.double())
    glob = {"rel_l2": pairs[None].rel_l2()}
    layers = {i: {"rel_l2": p.rel_l2()} for i, p in pairs.items() if isinstance(i, int)}
    if base is not None:
        glob |= {"tv_rel_l2": tv[None].rel_l2(), "tv_cosine": tv[None].cosine()}
        for i in layers:
            layers[i] |= {"tv_rel_l2": tv[i].rel_l2(), "tv_cosine": tv[i].cosine()}
    modules = {k: p.rel_l2() for k, p in pairs.items() if isinstance(k, tuple)}
    return glob, layers, modules


def merged_state_dict(sd: Mapping[str, torch.Tensor], method: str, params: Mapping[str, Any],
                      base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The modality merge of ``sd`` in memory (what ``vlmerge merge`` would write, by :func:`merge_tensors`):
    every group's copies merged into its ``shared`` name, everything else unchanged."""
    from ..merge import get_method, merge_tensors

    m = get_method(method)
    m.check_inputs(base=base is not None, weights=False, grams=False)
    out: dict[str, torch.Tensor] = {}
    grouped = set()
    for g in merge_groups(sd):
        srcs = [g.sources[mod] for mod in g.modalities]
        grouped |= set(srcs)
        w0 = None if base is None else (base[g.target] if g.target in base else base[srcs[0]])
        out[g.target] = merge_tensors(m, [sd[s] for s in srcs], base=w0, layer=g.layer, module=g.module,
                                      modalities=g.modalities, name=g.target, **dict(params))
    out |= {k: v for k, v in sd.items() if k not in grouped}
    return out


def merge_features(sd: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``merge_rel_v``, ``merge_rel_l``, ``merge_rel_max`` (module docstring) of the merge ``merged`` of the
    modality-specific state dict ``sd`` (a group whose ``shared`` name ``merged`` lacks was kept specific)."""
    pairs = {"v": _Pair(), "l": _Pair()}
    for g in merge_groups(sd):
        for mod, pair in pairs.items():
            if mod not in g.sources:
                continue
            w = sd[g.sources[mod]]
            pair.add(merged.get(g.target, w), w)
    if pairs["v"].xx == 0 and pairs["l"].xx == 0:
        raise ValueError("merge features: the checkpoint has no modality-specific (v / l) weights")
    out = {f"merge_rel_{mod}": p.rel_l2() for mod, p in pairs.items()}
    return out | {"merge_rel_max": max(out.values())}


def _merge_activation_drift(model: Any, merged_sd: Mapping[str, torch.Tensor], batches: Iterable[Any]
                            ) -> dict[str, Any]:
    """:func:`activation_drift` of the merge ``merged_sd`` (loaded into a modality-agnostic copy of ``model``)."""
    from ..models import VLMo

    merged = VLMo(model.config.replace(arch="maa"))
    merged.load_state_dict(dict(merged_sd))
    return activation_drift(model, merged, batches)


def merge_drift(model: Any, merged_sd: Mapping[str, torch.Tensor], batches: Sequence[Any]) -> dict[str, float]:
    """``drift`` and ``out_drift`` (module docstring) of the merge ``merged_sd`` of ``model`` on ``batches``."""
    drift = _merge_activation_drift(model, merged_sd, batches)
    return {"drift": drift["drift"], "out_drift": drift["out_drift"]}


def state_merge_features(ckpt: str | os.PathLike[str], base: str | os.PathLike[str] | None = None,
                         batches: Sequence[Any] | None = None, measured: Mapping[str, Any] | None = None
                         ) -> Callable[[str, Mapping[str, Any]], dict[str, float]]:
    """A function ``(method, params) -> features of that merge of ckpt``: :func:`merge_features` and, with
    ``batches``, :func:`merge_drift`, computed in memory (with the seed weights ``base`` where the method
    uses them), each merge once; ``ValueError`` for a merge that needs more (Gram matrices, a missing base).
    ``measured``: a :func:`layer_report` of ckpt on the same ``batches``, whose merge's drift is taken from it
    instead of being measured again."""
    from ..models.checkpoint import CheckpointReader, load_model

    state: dict[str, Any] = {}
    cache: dict[str, dict[str, float]] = {}
    known: dict[str, dict[str, float]] = {}  # drift already in ``measured``, by merge
    if measured is not None and "drift" in measured["global"]:
        known[json.dumps([measured["method"], measured["params"]], sort_keys=True)] = {
            k: measured["global"][k] for k in ("drift", "out_drift")}

    def moved(method: str, params: Mapping[str, Any]) -> dict[str, float]:
        key = json.dumps([method, params], sort_keys=True)
        if key not in cache:
            if not state:
                with CheckpointReader(ckpt) as r:
                    state["sd"] = r.state_dict()
                state["base"] = None
                if base is not None:
                    with CheckpointReader(base) as r:
                        state["base"] = r.state_dict()
                state["model"] = load_model(ckpt).eval() if batches is not None else None
            try:
                merged = merged_state_dict(state["sd"], method, params, state["base"])
            except (TypeError, KeyError) as e:
                raise ValueError(f"{method} {dict(params)}: cannot merge in memory ({e})") from None
            cache[key] = merge_features(state["sd"], merged)
            if batches is not None:
                cache[key] |= known.get(key) or merge_drift(state["model"], merged, batches)
        return cache[key]

    return moved


def _block_inputs(model: Any, batch: Any) -> dict[str, tuple[list[torch.Tensor], Any, Any]]:
    """Per route (``v``, ``l``): each block's input states, the route's mask and each block's bias."""
    from ..merge.grams import unpack_batch

    image, ids, mask = unpack_batch(batch)
    seen: dict[str, list[Any]] = {"v": [], "l": []}
    current = {"route": "v"}
    hooks = []

    def pre(module: Any, args: tuple[Any, ...]) -> None:
        seen[current["route"]].append(args)

    for block in model.blocks[: model.config.depth]:
        hooks.append(block.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model.forward_image(image)
            current["route"] = "l"
            model.forward_text(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    return {route: ([a[0] for a in args], mask if route == "l" else None, args) for route, args in seen.items()}


def activation_drift(model: Any, merged: Any, batches: Iterable[Any]) -> dict[str, Any]:
    """Per layer ``drift_v``, ``drift_l``, ``drift`` and the global ``drift`` / ``out_drift`` (module docstring)
    of ``merged`` (a VLMo with the merged weights) against ``model``, over ``batches``."""
    depth = model.config.depth
    num = {r: [0.0] * depth for r in ("v", "l")}
    den = {r: [0.0] * depth for r in ("v", "l")}
    cos_sum, cos_n = 0.0, 0
    model.eval()
    merged.eval()
    n_batches = 0
    with torch.no_grad():
        for batch in batches:
            n_batches += 1
            from ..merge.grams import unpack_batch

            image, ids, mask = unpack_batch(batch)
            for route, (inputs, route_mask, args) in _block_inputs(model, batch).items():
                keep = None if route_mask is None else route_mask.bool()
                for i, x in enumerate(inputs):
                    rest = args[i][1:]
                    ours = model.blocks[i](x, *rest)
                    theirs = merged.blocks[i](x, *rest)
                    delta, update = theirs - ours, ours - x
                    if keep is not None:
                        delta, update = delta[keep], update[keep]
                    num[route][i] += float(delta.double().pow(2).sum())
                    den[route][i] += float(update.double().pow(2).sum())
            for a, b in ((model.forward_image(image)[:, 0], merged.forward_image(image)[:, 0]),
                         (model.forward_text(ids, mask)[:, 0], merged.forward_text(ids, mask)[:, 0])):
                cos_sum += float((1 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)).sum())
                cos_n += a.shape[0]
    if n_batches == 0:
        raise ValueError("activation drift: no batches")
    rows = []
    for i in range(depth):
        d = {r: math.sqrt(num[r][i] / den[r][i]) if den[r][i] > 0 else 0.0 for r in ("v", "l")}
        rows.append({"layer": i, "drift_v": d["v"], "drift_l": d["l"], "drift": (d["v"] + d["l"]) / 2})
    return {"per_layer": rows, "drift": sum(r["drift"] for r in rows) / depth, "out_drift": cos_sum / cos_n}


def layer_report(ckpt: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
                 batches: Iterable[Any] | None = None, method: str = "interpolation",
                 params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything :mod:`predict` measures of one modality-specific checkpoint before a merge.

    Returns ``{"checkpoint", "method", "params", "global": {feature: value}, "per_layer": [{layer, l2, cosine,
    ssd, tssd, rel_l2, (tv_*), (drift_*), risk, numel}], "per_module": [{layer, module, rel_l2, ...}],
    "ranked": [layers by risk, riskiest first], "risk_from": "drift" | "rel_l2"}``. ``base``: W0's checkpoint
    (task-vector features; and the merge's base when the method uses one); ``batches``: image-caption batches
    for the activation features, merged with ``method`` / ``params``.
    """
    from ..models.checkpoint import CheckpointReader, load_model

    if params is None:
        params = {"alpha": 0.5} if method == "interpolation" else {}
    params = dict(params)
    dist = checkpoint_distances(ckpt, per_layer=True, per_module=True)
    with CheckpointReader(ckpt) as r:
        sd = r.state_dict()
    base_sd = None
    if base is not None:
        with CheckpointReader(base) as r:
            base_sd = r.state_dict()
    glob, layers, modules = _weight_features(sd, base_sd)
    out: dict[str, Any] = {"checkpoint": str(ckpt), "method": method, "params": params,
                           "global": {**{m: float(dist["global"][m]) for m in ("l2", "cosine", "ssd", "tssd")},
                                      **glob}}
    rows = []
    for row in dist["per_layer"]:
        i = row["layer"]
        rows.append({"layer": i, **{m: float(row[m]) for m in ("l2", "cosine", "ssd", "tssd")}, **layers[i],
                     "numel": int(row["numel"])})
    out["per_module"] = [{"layer": m["layer"], "module": m["module"], "rel_l2": modules[(m["layer"], m["module"])],
                          **{k: float(m[k]) for k in ("l2", "cosine", "ssd", "tssd")}} for m in dist["per_module"]]
    risk_from = "rel_l2"
    if batches is not None:
        model = load_model(ckpt).eval()
        drift = _merge_activation_drift(model, merged_state_dict(sd, method, params, base_sd), batches)
        by_layer = {r["layer"]: r for r in drift["per_layer"]}
        for row in rows:
            row |= {k: v for k, v in by_layer[row["layer"]].items() if k != "layer"}
        out["global"] |= {"drift": drift["drift"], "out_drift": drift["out_drift"]}
        risk_from = "drift"
    for row in rows:
        row["risk"] = row[risk_from]
    out["per_layer"] = rows
    out["risk_from"] = risk_from
    out["ranked"] = [r["layer"] for r in sorted(rows, key=lambda r: (-r["risk"], r["layer"]))]
    return out


# ----------------------------------------------------------------------------------------- calibration
def calibration_point(features: Mapping[str, float], method: str, params: Mapping[str, Any], drop: float,
                      group: str = "", checkpoint: str = "", drop_ci: Sequence[float] | None = None
                      ) -> dict[str, Any]:
    """One measured merge: the source checkpoint's global features, the merge, the measured drop (points)."""
    for name, v in features.items():
        if name not in FEATURES or not math.isfinite(float(v)):
            raise ValueError(f"calibration point: feature {name}={v!r}; expected finite values of {FEATURES}")
    if not math.isfinite(float(drop)):
        raise ValueError(f"calibration point: drop={drop!r}; expected a finite number")
    return {"checkpoint": checkpoint, "group": group, "method": method, "params": dict(params),
            "features": {k: float(v) for k, v in features.items()}, "drop": float(drop),
            "drop_ci": None if drop_ci is None else [float(x) for x in drop_ci]}


def save_calibration(points: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write ``points`` (:func:`calibration_point`) as a calibration file (atomic)."""
    from ..models.checkpoint import atomic_write_json

    atomic_write_json(Path(path), {"format": CALIBRATION_FORMAT, "version": 1, "points": [dict(p) for p in points]})
    return Path(path)


def load_calibration(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The points of a calibration file; ``ValueError`` naming the file and the first bad entry."""
    from ..models.checkpoint import read_json

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--calibration {p}: no such file (the study writes {CALIBRATION_NAME})")
    data = read_json(p)
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT or not isinstance(
            data.get("points"), list):
        raise ValueError(f"{p}: not a calibration file (expected an object with format {CALIBRATION_FORMAT!r} and "
                         "a list of points)")
    out = []
    for i, pt in enumerate(data["points"]):
        try:
            out.append(calibration_point(pt["features"], str(pt["method"]), pt.get("params") or {},
                                         pt["drop"], str(pt.get("group", "")), str(pt.get("checkpoint", "")),
                                         pt.get("drop_ci")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{p}: points[{i}] is invalid ({e}); expected features, method, params, drop") from None
    return out


# ------------------------------------------------------------------------------------------- predictor
def _same_params(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _design(points: Sequence[Mapping[str, Any]], features: Sequence[str]) -> np.ndarray:
    """The n × (1 + p) design matrix: a column of ones, then each feature (float64)."""
    return np.array([[1.0, *(float(p["features"][f]) for f in features)] for p in points], dtype=np.float64)


def _least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Coefficients (a, b_1..b_p) of ``y ≈ x @ c``; None when a feature is (nearly) constant or collinear."""
    centred = x[:, 1:] - x[:, 1:].mean(axis=0)
    scale = np.maximum(1.0, np.abs(x[:, 1:]).max(axis=0))
    if x.shape[0] <= x.shape[1] - 1 or np.linalg.matrix_rank(centred / scale, tol=1e-10) < x.shape[1] - 1:
        return None
    return np.linalg.lstsq(x, y, rcond=None)[0]


def _groups(points: Sequence[Mapping[str, Any]]) -> list[str]:
    return [p["group"] or f"#{i}" for i, p in enumerate(points)]


def _loo_predictions(points: Sequence[Mapping[str, Any]], features: Sequence[str]) -> list[float] | None:
    """Each point's drop predicted by the fit without its group; None where a fold cannot fit."""
    groups = np.array(_groups(points))
    x, y = _design(points, features), np.array([p["drop"] for p in points], dtype=np.float64)
    preds = []
    for i, g in enumerate(groups):
        train = groups != g
        coef = _least_squares(x[train], y[train])
        if coef is None:
            return None
        preds.append(float(x[i] @ coef))
    return preds


_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _t975(dof: int) -> float:
    """Two-sided 95 % Student-t quantile: the table for dof ≤ 30, beyond it the Cornish-Fisher expansion
    around the normal quantile (error < 1e-4 there)."""
    if dof < 1:
        raise ValueError(f"t quantile: dof={dof}; expected ≥ 1")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3))


def fit_drop_model(points: Sequence[Mapping[str, Any]], method: str | None = None,
                   params: Mapping[str, Any] | None = None, features: Sequence[str] | None = None
                   ) -> dict[str, Any]:
    """The drop predictor (module docstring) for ``method`` / ``params``, or pooled over every point when
    ``method`` is None, from calibration ``points``; ``features`` limits the candidates.

    Returns ``{"method", "params", "features": [chosen], "feature": their names joined by " + ", "coef": [a,
    b_1..], "n", "groups", "s", "xtx_inv", "loo_r", "loo_rmse", "per_feature": {name: {loo_r, loo_rmse(,
    constant)}}}`` (a candidate that cannot be fitted in some fold has NaN scores and ``constant``; for one
    feature ``a`` and ``b`` too); ``ValueError`` when fewer than 3 points (2 groups) match or nothing fits.
    """
    what = "all merges" if method is None else f"{method} {dict(params or {})}"
    pts = list(points) if method is None else [
        p for p in points if p["method"] == method and _same_params(p["params"], params or {})]
    if len(pts) < 3 or len(set(_groups(pts))) < 2:
        raise ValueError(f"calibration has {len(pts)} points for {what} in {len(set(_groups(pts)))} groups; the "
                         "predictor needs ≥ 3 points in ≥ 2 groups")
    names = [f for f in (features or FEATURES) if all(f in p["features"] for p in pts)]
    candidates: list[tuple[str, ...]] = [(f,) for f in names]
    if method is None:
        candidates += [c for c in PAIRED_FEATURES if all(f in names for f in c)]
    ys = np.array([p["drop"] for p in pts], dtype=np.float64)
    scored, unfit = {}, {}
    for cand in candidates:
        name = " + ".join(cand)
        preds = _loo_predictions(pts, cand)
        if preds is None:  # constant over the points (or over a fold's): nothing to fit (e.g. TSSD = 0)
            unfit[name] = {"loo_r": float("nan"), "loo_rmse": float("nan"), "constant": True}
            continue
        rmse = float(np.sqrt(np.mean((np.array(preds) - ys) ** 2)))
        r = pearson(preds, list(ys)) if len(set(ys.tolist())) > 1 and len(set(preds)) > 1 else float("nan")
        scored[name] = {"loo_r": r, "loo_rmse": rmse, "features": cand}
    if not scored:
        raise ValueError(f"calibration for {what}: no feature varies across its points")
    best = min(scored, key=lambda f: (scored[f]["loo_rmse"], len(scored[f]["features"]), f))
    chosen = scored[best]["features"]
    x = _design(pts, chosen)
    coef = _least_squares(x, ys)
    assert coef is not None  # every fold fitted, so the full set does too
    dof = len(pts) - x.shape[1]
    s = float(np.sqrt(np.sum((ys - x @ coef) ** 2) / dof)) if dof > 0 else float("nan")
    out = {"method": method, "params": None if method is None else dict(params or {}), "features": list(chosen),
           "feature": best, "coef": [float(c) for c in coef], "n": len(pts), "groups": len(set(_groups(pts))),
           "s": s, "xtx_inv": np.linalg.pinv(x.T @ x).tolist(), "loo_r": scored[best]["loo_r"],
           "loo_rmse": scored[best]["loo_rmse"],
           "per_feature": {**{k: {"loo_r": v["loo_r"], "loo_rmse": v["loo_rmse"]} for k, v in scored.items()},
                           **unfit}}
    if len(chosen) == 1:
        out |= {"a": out["coef"][0], "b": out["coef"][1]}
    return out


def predict_drop(model: Mapping[str, Any], features: Mapping[str, float]) -> dict[str, Any]:
    """The estimated drop and its 95 % prediction interval for a merge's global ``features``."""
    missing = [f for f in model["features"] if f not in features]
    if missing:
        raise ValueError(f"the predictor uses feature {missing[0]!r}, which this report lacks (pass --base / --data "
                         "as the calibration's points had them)")
    x0 = np.array([1.0, *(float(features[f]) for f in model["features"])])
    est = float(x0 @ np.array(model["coef"]))
    dof = model["n"] - len(x0)
    half = float("nan")
    if dof > 0 and math.isfinite(model["s"]):
        half = _t975(dof) * model["s"] * math.sqrt(1 + float(x0 @ np.array(model["xtx_inv"]) @ x0))
    values = {f: float(features[f]) for f in model["features"]}
    return {"drop": est, "interval": [est - half, est + half], "feature": model["feature"], "values": values}


def recommend(report: Mapping[str, Any], points: Sequence[Mapping[str, Any]],
              merge_feats: Callable[[str, Mapping[str, Any]], Mapping[str, float]] | None = None,
              extra: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> dict[str, Any]:
    """For every (method, params) of the calibration (and ``extra``): the estimated drop; the best first.

    ``merge_feats`` (:func:`state_merge_features` of the report's checkpoint) gives each merge its own
    features on request (``ValueError`` where it cannot be merged in memory). A merge is estimated by the
    predictor pooled over every point when that fits on a feature of the merge itself (a merge or drift
    feature), which also covers merges the calibration never measured; otherwise by the predictor of its own
    points (``"from"``: ``"pooled"`` or ``"own"``). The report's ``drift`` / ``out_drift`` describe the
    report's own merge only and are never used for another.
    """
    own = (report.get("method"), report.get("params") or {})

    def features_for(method: str, params: Mapping[str, Any]) -> dict[str, float]:
        mine = method == own[0] and _same_params(params, own[1])
        feats = {k: v for k, v in report["global"].items() if mine or k not in MERGE_DEPENDENT}
        if merge_feats is not None:
            with contextlib.suppress(ValueError):  # not mergeable in memory: the checkpoint's features only
                feats |= merge_feats(method, params)
        return feats

    combos: list[tuple[str, dict[str, Any]]] = []
    for method, params in [*((p["method"], p["params"]) for p in points), *extra]:
        if not any(m == method and _same_params(q, params) for m, q in combos):
            combos.append((method, dict(params)))
    pooled = None
    if merge_feats is not None:
        usable = features_for(*own) if own[0] is not None else features_for(*combos[0]) if combos else {}
        try:
            pooled = fit_drop_model(points, None, None, [f for f in FEATURES if f in usable])
        except ValueError:
            pooled = None
        if pooled is not None and not set(pooled["features"]) & set(MERGE_DEPENDENT):
            pooled = None  # a fit on the checkpoint alone would give every merge the same estimate
    options = []
    for method, params in combos:
        feats = features_for(method, params)
        est = None
        if pooled is not None and all(f in feats for f in pooled["features"]):
            est = {**predict_drop(pooled, feats), "loo_r": pooled["loo_r"], "n": pooled["n"], "from": "pooled"}
        else:
            try:
                model = fit_drop_model(points, method, params, [f for f in FEATURES if f in feats])
                est = {**predict_drop(model, feats), "loo_r": model["loo_r"], "n": model["n"], "from": "own"}
            except ValueError:
                continue
        options.append({"method": method, "params": params, **est})
    options.sort(key=lambda o: o["drop"])
    return {"options": options, "best": options[0] if options else None, "pooled": pooled}


# ----------------------------------------------------------------------------------------------- output
def format_report(report: Mapping[str, Any], advice: Mapping[str, Any] | None) -> str:
    """The report as text: per-layer table, ranking, estimate and recommendation."""
    cols = [c for c in ("l2", "cosine", "ssd", "tssd", "rel_l2", "tv_rel_l2", "drift_v", "drift_l", "risk")
            if c in report["per_layer"][0]]
    lines = [f"{'layer':>5} " + " ".join(f"{c:>10}" for c in cols)]
    for row in report["per_layer"]:
        lines.append(f"{row['layer']:>5} " + " ".join(f"{row[c]:>10.4g}" for c in cols))
    g = report["global"]
    lines.append("global " + ", ".join(f"{k} {v:.4g}" for k, v in g.items()))
    lines.append(f"riskiest layers (by {report['risk_from']}): " + ", ".join(map(str, report["ranked"])))
    if advice is None:
        lines.append("no drop estimate: pass --calibration FILE (the study writes predict-calibration.json)")
    elif advice["best"] is None:
        lines.append("no drop estimate: the calibration has no method with ≥ 3 points in ≥ 2 groups and a feature "
                     "this report has")
    else:
        for o in advice["options"]:
            lo, hi = o["interval"]
            lines.append(f"estimated drop with {o['method']} {o['params']}: {o['drop']:.2f} points [95 % {lo:.2f}, "
                         f"{hi:.2f}] (from {o['feature']}; {o['n']} calibration merges"
                         f"{', pooled over methods and coefficients' if o['from'] == 'pooled' else ''}, held-out r "
                         f"{o['loo_r']:.2f})")
        b = advice["best"]
        lines.append(f"recommendation: {b['method']} {b['params']}; to trade parameters for accuracy, keep the "
                     f"riskiest layers modality-specific: vlmerge merge --keep-specific "
                     f"{','.join(map(str, report['ranked'][: max(1, len(report['ranked']) // 4)]))} ...")
    return "\n".join(lines)


def plot_risk(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """A bar chart of each layer's risk (PNG), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..study.report import _savefig

    rows = report["per_layer"]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(rows) + 2), 3))
    ax.bar([r["layer"] for r in rows], [r["risk"] for r in rows], color="tab:red")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"risk ({report['risk_from']})")
    ax.set_title(f"merge risk per layer: {Path(report['checkpoint']).name}")
    ax.set_xticks([r["layer"] for r in rows])
    _savefig(fig, Path(path))
    plt.close(fig)
    return Path(path)
