"""DARE (Yu et al. 2023, "Language Models are Super Mario"): drop-and-rescale task vectors, then combine
linearly (mergekit's ``dare_linear``).

For inputs W_m, base W0, τ_m = W_m − W0 and weights w_m (default 1):

    τ̃_m = (M_m ⊙ τ_m) / (1 − p),    M_m ~ Bernoulli(1 − p) entrywise (seeded)
    W   = W0 + λ Σ_m w_m τ̃_m / Σ_m w_m      (``normalize=True``, the default: an average of task vectors)
    W   = W0 + λ Σ_m w_m τ̃_m                 (``normalize=False``: a sum, task arithmetic)

Masks: input m's mask comes from its own numpy SFC64 stream, seeded with ``SeedSequence([s, m])``; its raw
64-bit outputs, read as little-endian uint16 draws ``u`` in the tensor's flat (row-major) order, give
``M_m = u ≥ round(p · 2¹⁶)``. The drop rate is thus quantized to 2⁻¹⁶ (p = 0.9 drops with probability
0.899994); the rescale divides by that exact keep probability, so every τ̃_m is still unbiased.
``s = tensor_seed(seed, name)`` per tensor, in a checkpoint merge and in :func:`~vlmerge.merge.merge_tensors`
alike (so the result does not depend on the order tensors are visited, and same-shaped tensors of different
names get different masks).
:func:`dare_keep_masks` returns the masks a merge draws.

Speed: the random draw bounds DARE, so masks come from raw SFC64 words split four ways into uint16 draws
(the cheapest generator measured). The merge runs in chunks of ``_CHUNK`` entries: each input's float32 0/1
mask chunk is drawn into one small cache-resident buffer and applied with fused ``addcmul`` (bool operands
are slower), and the output chunk stays in cache across inputs. No buffer of the slot's size is allocated
besides the output, and streaming merges hand in a recycled one (``MergeContext.out``). The measurements
behind these choices: ``benchmarks/results/merge_throughput.md``.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from ..base import MergeContext, MergeMethod, MergeParams, register_method, tensor_seed


class DareParams(MergeParams):
    drop: float = Field(0.5, ge=0.0, lt=1.0, description="drop rate p of each task vector's entries")
    seed: int = Field(0, ge=0, description="seed of the drop masks")
    lam: float = Field(1.0, ge=0.0, description="scaling λ of the combined task vectors")
    normalize: bool = Field(True, description="divide by Σ w_m (average) instead of summing")


_LEVELS = 2**16  # resolution of the drop rate: masks compare uint16 draws with a threshold
_CHUNK = 2**18  # entries per step (1 MB mask chunk, cache-sized); a multiple of 4: one raw word = 4 draws


def _threshold(drop: float) -> tuple[int, float]:
    """(uint16 threshold, exact keep probability) for drop rate ``drop``."""
    t = min(round(drop * _LEVELS), _LEVELS - 1)
    return t, (_LEVELS - t) / _LEVELS


def _streams(seed: int, n: int) -> list[np.random.SFC64]:
    """One independent bit stream per input (a chunked merge interleaves the inputs' draws)."""
    return [np.random.SFC64(np.random.SeedSequence([seed, m])) for m in range(n)]


def _draw_mask(bits: np.random.SFC64, threshold: int, out: torch.Tensor) -> torch.Tensor:
    """Fill 1-D float32 CPU ``out`` with the stream's next ``len(out)`` keep-mask entries: 1 kept, 0 dropped."""
    n = out.numel()
    u = bits.random_raw(-(-n // 4)).astype("<u8", copy=False).view("<u2")[:n]
    np.greater_equal(u, threshold, out=out.numpy(), casting="unsafe")
    return out


def dare_keep_masks(
    shape: torch.Size | tuple[int, ...], n: int, drop: float, seed: int, name: str = "tensor"
) -> list[torch.Tensor]:
    """The ``n`` boolean keep-masks DARE draws for the slot ``name`` (True = kept), from ``tensor_seed(seed,
    name)``: the masks of a merge with ``seed`` that names the tensor ``name`` (``merge_tensors``' default)."""
    size = int(np.prod(shape, dtype=np.int64))
    t = _threshold(drop)[0]
    return [_draw_mask(b, t, torch.empty(size)).bool().view(tuple(shape))
            for b in _streams(tensor_seed(seed, name), n)]


@register_method
class Dare(MergeMethod):
    name = "dare"
    Params = DareParams
    base = "required"
    uses_weights = True
    min_inputs = 2
    propagates_nonfinite = True
    summary = "drop task-vector entries with rate p, rescale by 1/(1−p), then combine linearly (Yu et al.)"

    def merge(self, tensors: list[torch.Tensor], params: MergeParams, ctx: MergeContext) -> torch.Tensor:
        p: DareParams = params  # type: ignore[assignment]
        assert ctx.base is not None
        w = ctx.weights or (1.0,) * len(tensors)
        scale = 1.0 / sum(w) if p.normalize else 1.0
        if p.normalize and sum(w) == 0:
            raise ValueError(f"dare: weights sum to 0 for {ctx.name!r}; cannot normalize")
        seed = tensor_seed(p.seed, ctx.name)
        t, keep_prob = _threshold(p.drop)
        coef = p.lam * scale / keep_prob
        base = ctx.base.reshape(-1)
        flat = [x.reshape(-1) for x in tensors]
        coefs = [coef * wi for wi in w]
        streams = _streams(seed, len(tensors))
        out = ctx.output(ctx.base)  # contiguous
        o = out.view(-1)
        n = o.numel()
        cpu = base.device.type == "cpu"
        chunk = _CHUNK if cpu else max(n, 1)  # accelerators: one host-to-device copy per mask
        keep = torch.empty(min(chunk, n))
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            b, oc = base[i:j], o[i:j]
            for m, (x, c, bits) in enumerate(zip(flat, coefs, streams, strict=True)):
                k = _draw_mask(bits, t, keep[: j - i])
                k = k if cpu else k.to(base.device)
                if m == 0:  # W0 + c·M ⊙ W − c·M ⊙ W0, written straight into the output chunk
                    torch.addcmul(b, x[i:j], k, value=c, out=oc)
                else:
                    oc.addcmul_(x[i:j], k, value=c)
                oc.addcmul_(b, k, value=-c)
        return out
