"""RegMean's Gram matrices: collected with forward hooks, saved as safetensors, read lazily by a merge.

For every block ``nn.Linear`` (``blocks.{i}.{attn|mlp}.{expert}.{qkv|proj|fc1|fc2}``) the hook accumulates

    G = Σ_tokens x xᵀ = Xᵀ X        float64 [in, in],   X [tokens, in] the layer's inputs,

and the token count. Grams are keyed by the linear's weight name (``blocks.0.attn.v.qkv.weight``), so a
merge finds the Gram of each source copy by that copy's own name. Because every expert linear only sees
its own modality's tokens (the model routes them), the hooks collect per-modality Grams directly.

**Padding.** A hook sees the padded [B, L, in] input. :func:`run_vlmo` tells the collector each route's
token mask ([B, L] bool: the attention mask on the text route, attention mask + image tokens on the fusion
route) and the hooks keep only the real tokens. A custom ``run`` that does not set masks counts padding.

**Routes.** :func:`run_vlmo` runs the vision and text retrieval routes (all N layers, ``v``/``l``/``shared``
experts) and the fusion route recording only its top M layers (``vl`` and top ``shared`` experts), so every
token passes every recorded linear once per route, as in pre-training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.checkpoint import CheckpointError, CheckpointReader, SafetensorsStreamWriter
from ..models.roles import ParamRole, parse_param_name

GRAMS_FORMAT = "vlmerge-grams/1"


@dataclass
class Grams:
    """Gram sums ``grams[name]`` (float64 [in, in]) and token counts ``counts[name]``, by weight name."""

    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return sorted(self.grams)

    def __contains__(self, key: object) -> bool:
        return key in self.grams

    def __len__(self) -> int:
        return len(self.grams)

    def get(self, key: str) -> torch.Tensor:
        return self.grams[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.grams[key].shape)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return save_grams(self, path)


def save_grams(grams: Grams | Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write Grams (float64) and their token counts (in the header metadata) to one safetensors file."""
    g = grams if isinstance(grams, Grams) else Grams(dict(grams), {})
    specs = {k: (torch.float64, tuple(v.shape)) for k, v in g.grams.items()}
    meta = {"format": GRAMS_FORMAT, "counts": json.dumps(g.counts, sort_keys=True)}
    with SafetensorsStreamWriter(path, specs, meta) as w:
        for k, v in g.grams.items():
            w.write(k, v.to(torch.float64))
    return Path(path)


GRAM_FILE_HINT = "a Gram file is a safetensors file written by 'vlmerge merge --save-grams' or Grams.save"

_GRAM_DTYPES = ("F64", "F32", "F16", "BF16")


def check_gram_file(path: str | os.PathLike[str]) -> dict[str, int]:
    """Check that ``path`` is a Gram file written by :func:`save_grams` (headers only; nothing is unpickled)
    and return its token counts by weight name.

    Refused with a one-line :class:`~vlmerge.models.checkpoint.CheckpointError` (a ``ValueError``) naming the
    file: a directory (a checkpoint, say), anything that is not a safetensors file (a pickle, JSON, empty or
    random bytes), a safetensors file without the Gram format tag (model weights), a malformed ``counts``
    record, a tensor that is not a square float matrix. ``FileNotFoundError`` when nothing is there.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory (a checkpoint?), not a Gram file; {GRAM_FILE_HINT}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Gram file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            specs = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a header it cannot parse
        why = " ".join(str(e).split())
        raise CheckpointError(f"{path}: not a Gram file (not a readable safetensors file: {why}); "
                              f"{GRAM_FILE_HINT}") from None
    if meta.get("format") != GRAMS_FORMAT:
        raise CheckpointError(
            f"{path}: not a Gram file (metadata format {meta.get('format')!r}, expected {GRAMS_FORMAT!r}; "
            f"model weights?); {GRAM_FILE_HINT}"
        )
    for k, (dtype, shape) in specs.items():
        if dtype not in _GRAM_DTYPES or len(shape) != 2 or shape[0] != shape[1]:
            raise CheckpointError(f"{path}: tensor {k!r} is {dtype} {list(shape)}; expected a square float "
                                  f"[in, in] Gram matrix ({GRAM_FILE_HINT})")
    try:
        counts = json.loads(meta.get("counts", "{}"))
    except (json.JSONDecodeError, RecursionError):
        counts = None
    if not isinstance(counts, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()
    ):
        raise CheckpointError(f"{path}: the Gram file's 'counts' metadata is invalid; expected a JSON object "
                              f"of non-negative token counts by weight name ({GRAM_FILE_HINT})")
    return dict(counts)


def gram_problem(gram: torch.Tensor) -> str | None:
    """What makes ``gram`` [in, in] no Gram matrix ``XᵀX`` of real activations, or None: NaN / Inf, all zero
    (no token reached the weight: RegMean would solve a singular system for nothing), asymmetric beyond
    rounding (|G − Gᵀ| > 1e-6 · max |G|), or a negative diagonal entry (a sum of squares)."""
    if not bool(torch.isfinite(gram).all()):
        return "contains NaN or Inf"
    scale = float(gram.abs().max()) if gram.numel() else 0.0
    if scale == 0.0:
        return "is all zero (no token reached this weight's input when it was collected)"
    if float((gram - gram.t()).abs().max()) > 1e-6 * scale:
        return "is not symmetric (a Gram matrix XᵀX is)"
    if bool((gram.diagonal() < 0).any()):
        return "has a negative diagonal entry (a Gram matrix XᵀX has none)"
    return None


def load_grams(path: str | os.PathLike[str]) -> Grams:
    """Read a Gram file written by :func:`save_grams` into memory (checked first: :func:`check_gram_file`)."""
    path = Path(path)
    counts = check_gram_file(path)
    with CheckpointReader(path) as r:
        return Grams({k: r.get(k) for k in r}, counts)


def open_grams(source: str | os.PathLike[str] | Grams | Mapping[str, torch.Tensor]) -> Any:
    """A lazy Gram source with ``keys() / shape(k) / get(k)``: a file (checked first: :func:`check_gram_file`)
    is read one Gram at a time."""
    if isinstance(source, Grams):
        return source
    if isinstance(source, Mapping):
        return Grams(dict(source), {})
    from .io import StreamingReader

    path = Path(source)
    check_gram_file(path)
    return StreamingReader(path)


# --------------------------------------------------------------------------------------------- collection
def linear_role(module_name: str) -> ParamRole | None:
    """The role of ``{module_name}.weight`` if it is a transformer-block linear weight, else ``None``."""
    role = parse_param_name(module_name + ".weight")
    if role.kind == "block" and role.module in ("attn", "mlp"):
        return role
    return None


class GramCollector:
    """Forward hooks on a model's block linears accumulating ``XᵀX`` (float64) and token counts.

    Use as a context manager (hooks removed on exit). :meth:`route` limits which experts / layers record
    and gives the [B, L] bool mask of real tokens for the forward pass inside it.
    """

    def __init__(self, model: nn.Module, include: Callable[[ParamRole], bool] | None = None) -> None:
        self.model = model
        self.grams: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._roles: dict[str, ParamRole] = {}
        self._handles: list[Any] = []
        self._experts: set[str] | None = None
        self._min_layer = 0
        self._mask: torch.Tensor | None = None
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            role = linear_role(name)
            if role is None or (include is not None and not include(role)):
                continue
            self._roles[name + ".weight"] = role
            self._handles.append(mod.register_forward_hook(self._hook(name + ".weight")))
        if not self._roles:
            raise ValueError(
                "no block linear layers (blocks.{i}.{attn|mlp}.{expert}.*) found to collect Grams on"
            )

    def _hook(self, key: str) -> Callable[..., None]:
        role = self._roles[key]

        def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            if self._experts is not None and role.expert not in self._experts:
                return
            if (role.layer or 0) < self._min_layer:
                return
            x = inputs[0].detach()
            if self._mask is not None and tuple(x.shape[:-1]) == tuple(self._mask.shape):
                x = x[self._mask]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            g = x.T @ x
            if key in self.grams:
                self.grams[key].add_(g)
                self.counts[key] += x.shape[0]
            else:
                self.grams[key] = g
                self.counts[key] = x.shape[0]

        return hook

    @contextmanager
    def route(
        self, experts: Iterable[str] | None = None, min_layer: int = 0, mask: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Inside the block only ``experts`` in layers ≥ ``min_layer`` record, keeping ``mask``ed tokens."""
        saved = (self._experts, self._min_layer, self._mask)
        self._experts = set(experts) if experts is not None else None
        self._min_layer = min_layer
        self._mask = mask.bool() if mask is not None else None
        try:
            yield
        finally:
            self._experts, self._min_layer, self._mask = saved

    def result(self) -> Grams:
        return Grams(dict(self.grams), dict(self.counts))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> GramCollector:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(image [B, C, S, S], input_ids [B, L], attention_mask [B, L] or None) from a dict or a tuple."""
    if isinstance(batch, Mapping):
        image = batch.get("image", batch.get("images"))
        ids = batch.get("input_ids")
        mask = batch.get("attention_mask")
    elif isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        image, ids, mask = (*batch, None) if len(batch) == 2 else batch
    else:
        raise ValueError(
            "a Gram batch must be a dict with 'image', 'input_ids' (and 'attention_mask') "
            f"or a tuple (image, input_ids[, attention_mask]); got {type(batch).__name__}"
        )
    if image is None or ids is None:
        raise ValueError("a Gram batch needs both 'image' and 'input_ids'")
    return image, ids, mask


def run_vlmo(model: nn.Module, batch: Any, collector: GramCollector) -> None:
    """Run a VLMo model's three routes on ``batch``, telling ``collector`` which experts and tokens count.

    Vision route: ``v`` + ``shared`` experts, all tokens. Text route: ``l`` + ``shared``, real tokens only.
    Fusion route: only the top M layers record (``vl`` + ``shared``), real text tokens + all image tokens.
    """
    image, ids, mask = unpack_batch(batch)
    cfg = model.config  # type: ignore[attr-defined]
    with collector.route(("v", "shared")):
        model.forward_image(image)  # type: ignore[operator]
    with collector.route(("l", "shared"), mask=mask):
        model.forward_text(ids, mask)  # type: ignore[operator]
    if cfg.num_vl_layers > 0:
        fmask = None
        if mask is not None:
            ones = mask.new_ones(mask.shape[0], cfg.num_patches + 1)
            fmask = torch.cat([mask, ones], dim=1)
        with collector.route(("vl", "shared"), min_layer=cfg.depth - cfg.num_vl_layers, mask=fmask):
            model.forward_fusion(image, ids, mask)  # type: ignore[operator]


RunFn = Callable[[nn.Module, Any, GramCollector], Any]


def collect_grams(
    model: nn.Module,
    batches: Iterable[Any],
    run: RunFn = run_vlmo,
    *,
    max_batches: int | None = None,
    include: Callable[[ParamRole], bool] | None = None,
    progress: bool = False,
) -> Grams:
    """Accumulate ``G = XᵀX`` for every block linear over ``batches`` (at most ``max_batches``).

    ``run(model, batch, collector)`` does the forward passes (default :func:`run_vlmo`; any callable that
    calls the model works, optionally using ``collector.route`` to set masks). ``include(role)`` filters
    the linears (default: all block linears, modality-specific and shared). Runs under ``torch.no_grad()``
    in eval mode and restores the model's training flag.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be ≥ 1, got {max_batches}")
    was_training = model.training
    model.eval()
    n = 0
    try:
        with GramCollector(model, include) as col, torch.no_grad():
            for batch in tqdm(batches, total=max_batches, disable=not progress, desc="grams", unit="batch"):
                if max_batches is not None and n >= max_batches:
                    break
                run(model, batch, col)
                n += 1
            if n == 0:
                raise ValueError("collect_grams: no batches")
            return col.result()
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------- data sources for the CLI
GramData = Callable[[nn.Module, int, int], Iterable[Any]]
GRAM_DATA: dict[str, GramData] = {}
"""Batch sources for ``vlmerge merge --data NAME --batches N``: ``fn(model, batches, seed) -> batches``."""


def register_gram_data(name: str) -> Callable[[GramData], GramData]:
    """Decorator registering a batch source for RegMean Gram collection from the command line."""

    def deco(fn: GramData) -> GramData:
        GRAM_DATA[name] = fn
        return fn

    return deco


def check_gram_data(name: str) -> GramData:
    """The registered data source ``name``; ``ValueError`` listing the available sources otherwise."""
    _load_builtin_sources()
    if name not in GRAM_DATA:
        have = ", ".join(sorted(GRAM_DATA)) or "(none available yet)"
        raise ValueError(f"unknown Gram data source {name!r}; available: {have}. Pass --grams FILE instead")
    return GRAM_DATA[name]


def gram_batches(name: str, model: nn.Module, batches: int, seed: int = 0) -> Iterable[Any]:
    """The batches of registered data source ``name`` for ``model``."""
    return check_gram_data(name)(model, batches, seed)


def _load_builtin_sources() -> None:
    """Register the sources that need :mod:`vlmerge.data` (imported lazily; absent pieces are skipped)."""
    from . import gram_data  # noqa: F401
