"""The paper's checkpoint distances (§7, Table 5): W^v vs W^l of one modality-specific checkpoint.

All mergeable block weights of the vision and of the language experts (every ``blocks.{i}.{module}.v.*``
with its ``.l.*`` twin; embeddings, heads and ``vl`` copies excluded) are flattened and concatenated into
w^v and w^l, in the order of :func:`~vlmerge.models.roles.merge_groups` (layer, module, suffix).
LayerNorm weights and biases are included by default (the paper says "weight matrices" and excludes only
non-mergeable weights; they are < 0.5% of the entries); ``matrices_only=True`` keeps only 2-D weights.

L2, cosine and SSD stream pair by pair (float64 sums). TSSD's truncation needs the k-th smallest magnitude
of the whole vector, so w^v and w^l are gathered into two float32 buffers (2 × 4 bytes per entry) and
``numpy.partition`` (introselect) finds each threshold. Per-layer / per-module TSSD truncates within
that layer's / module's own
entries (each is then the metric of that sub-vector).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..models.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointReader,
    check_checkpoint,
    check_float_dtypes,
    load_model_config,
)
from ..models.roles import merge_groups
from .distances import DistanceAccumulator, ssd, truncate_smallest

METRICS: tuple[str, ...] = ("l2", "cosine", "ssd", "tssd")


def _row(
    acc: DistanceAccumulator, x: torch.Tensor, y: torch.Tensor, k: float, ignore_zeros: bool
) -> dict[str, Any]:
    out: dict[str, Any] = acc.result(ignore_zeros)
    tx, ty = truncate_smallest(x, k), truncate_smallest(y, k)
    out["tssd"] = ssd(tx, ty, ignore_zeros=ignore_zeros)
    # what TSSD can see: entries kept in both whose signs disagree (0 when the copies have barely moved apart)
    out["sign_flips"] = int(((tx * ty) < 0).sum())
    out["numel"] = acc.numel
    return out


_EXPECTED = f"expected a checkpoint directory ({CONFIG_NAME} beside {WEIGHTS_NAME})"
_SIZE_KEYS = ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "vocab_size",
              "max_text_len", "type_vocab_size")


def _gram_tag(file: Path) -> bool:
    """Whether ``file`` is a safetensors file tagged as a Gram file (False when it cannot be read)."""
    from safetensors import safe_open

    from ..merge.grams import GRAMS_FORMAT

    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get("format") == GRAMS_FORMAT
    except Exception:  # not a safetensors file: the reader says so
        return False


def check_distance_source(path: str | os.PathLike[str]) -> None:
    """Refuse what is not a checkpoint directory before a ``CheckpointReader`` opens it: a file (a bare weights
    file or a Gram file, whose keys are the weight names but whose tensors are [in, in] Grams)."""
    p = Path(path)
    if p.is_file():
        what = "a Gram file (written by --save-grams)" if _gram_tag(p) else "a file"
        raise CheckpointError(f"{p}: is {what}, not a checkpoint; {_EXPECTED}")
    if p.is_dir() and (p / WEIGHTS_NAME).is_file() and _gram_tag(p / WEIGHTS_NAME):
        raise CheckpointError(f"{p / WEIGHTS_NAME}: is a Gram file (written by --save-grams), not model weights; "
                              f"{_EXPECTED}")


def check_distance_reader(reader: CheckpointReader) -> None:
    """Validate an opened checkpoint before distances are computed from it.

    With a ``config.json`` whose ``"model"`` entry gives the model's sizes: :func:`check_checkpoint` (typed
    config, exactly the architecture's keys and shapes, float dtypes). A ``"model"`` entry that only names the
    architecture is type-checked; then, as for a checkpoint without a vlmerge config, every tensor must be
    floating point (an integer or float8 weight would be cast silently).
    """
    if not isinstance(reader.config, dict):
        load_model_config(reader.path)  # config.json is not an object: refused, naming it
    model = reader.config.get("model")
    if isinstance(model, dict) and any(k in model for k in _SIZE_KEYS):
        check_checkpoint(reader)
        return
    if "model" in reader.config:
        load_model_config(reader.path)  # typed errors naming config.json and the key
    check_float_dtypes(reader)


def checkpoint_distances(
    ckpt_dir: str | os.PathLike[str],
    per_layer: bool = False,
    per_module: bool = False,
    *,
    k: float = 0.5,
    ignore_zeros: bool = True,
    matrices_only: bool = False,
) -> dict[str, Any]:
    """L2, cosine, SSD and TSSD between the vision and language weights of a modality-specific checkpoint.

    Returns ``{"global": {l2, cosine, ssd, tssd, numel}, "k": k, "tensors": n}`` plus ``"per_layer"``
    (a list of rows with ``layer``) when ``per_layer``, and ``"per_module"`` (rows with ``module``, and
    ``layer`` when ``per_layer`` too) when ``per_module``.

    ``ckpt_dir`` is validated first (``CheckpointError`` naming the file): a file (bare weights, a Gram file)
    is refused, and so are Gram matrices stored as ``model.safetensors``; see :func:`check_distance_reader`
    for what is checked of the directory's weights.
    """
    if not 0.0 <= k < 1.0:
        raise ValueError(f"--k {k}: k must be in [0, 1) (TSSD's fraction of smallest entries zeroed)")
    check_distance_source(ckpt_dir)
    with CheckpointReader(ckpt_dir) as reader:
        check_distance_reader(reader)
        pairs = []
        for g in merge_groups(reader.keys()):
            if "v" not in g.sources or "l" not in g.sources:
                continue
            kv, kl = g.sources["v"], g.sources["l"]
            if reader.shape(kv) != reader.shape(kl):
                raise ValueError(
                    f"{ckpt_dir}: {kv} {list(reader.shape(kv))} and {kl} {list(reader.shape(kl))} differ"
                )
            if matrices_only and len(reader.shape(kv)) != 2:
                continue
            pairs.append((g.layer, g.module, kv, kl, reader.shape(kv)))
        if not pairs:
            raise ValueError(
                f"{ckpt_dir}: no vision/language weight pairs (blocks.{{i}}.{{module}}.v.* and .l.*); "
                "distances need a modality-specific checkpoint"
            )
        total = sum(int(torch.Size(s).numel()) for *_, s in pairs)
        xbuf = torch.empty(total, dtype=torch.float32)
        ybuf = torch.empty(total, dtype=torch.float32)
        spans: list[tuple[int, str, int, int]] = []
        accs: dict[tuple[int | None, str | None], DistanceAccumulator] = {}
        off = 0
        for layer, module, kv, kl, _shape in pairs:
            x = reader.get(kv).reshape(-1).to(torch.float32)
            y = reader.get(kl).reshape(-1).to(torch.float32)
            for name, t in ((kv, x), (kl, y)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{ckpt_dir}: tensor {name!r} contains NaN or Inf")
            n = x.numel()
            xbuf[off : off + n] = x
            ybuf[off : off + n] = y
            spans.append((layer, module, off, off + n))
            part = DistanceAccumulator()
            part.add(x, y)
            keys: list[tuple[int | None, str | None]] = [
                (None, None),
                (layer, None),
                (None, module),
                (layer, module),
            ]
            for key in keys:
                accs.setdefault(key, DistanceAccumulator()).merge(part)
            off += n

    def gather(sel: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(sel) == 1 or all(sel[i][1] == sel[i + 1][0] for i in range(len(sel) - 1)):
            return xbuf[sel[0][0] : sel[-1][1]], ybuf[sel[0][0] : sel[-1][1]]
        return torch.cat([xbuf[a:b] for a, b in sel]), torch.cat([ybuf[a:b] for a, b in sel])

    result: dict[str, Any] = {
        "checkpoint": str(ckpt_dir),
        "k": k,
        "tensors": len(pairs),
        "global": _row(accs[(None, None)], xbuf, ybuf, k, ignore_zeros),
    }
    layers = sorted({s[0] for s in spans})
    modules = [m for m in ("norm1", "attn", "norm2", "mlp") if any(s[1] == m for s in spans)]
    if per_layer:
        result["per_layer"] = [
            {
                "layer": i,
                **_row(accs[(i, None)], *gather([(a, b) for L, _, a, b in spans if i == L]), k, ignore_zeros),
            }
            for i in layers
        ]
    if per_module:
        rows = []
        for i in layers if per_layer else [None]:
            for mod in modules:
                sel = [(a, b) for L, m, a, b in spans if m == mod and (i is None or i == L)]
                if not sel:
                    continue
                row = _row(accs[(i, mod)], *gather(sel), k, ignore_zeros)
                rows.append({**({"layer": i} if i is not None else {}), "module": mod, **row})
        result["per_module"] = rows
    return result
