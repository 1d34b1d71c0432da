"""Distributed plumbing: one code path for 1 CPU process, N gloo processes and N GPUs under ``torchrun``.

``torchrun`` sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; without them the run is a single process and
no process group is created. Collectives below are no-ops (identity) in a single process.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world`` processes, computing on ``device``."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the ``torchrun`` process group when there is one (NCCL on CUDA, gloo on CPU).

    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. Idempotent: a second call returns the
    same info without re-initialising.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but CUDA is not available")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world=world, device=dev)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` [B, ...] from every rank into [W·B, ...], rank order; gradients flow to the local slice.

    As open_clip's ``gather_features(gather_with_grad=False)``: the gathered copies are constants and this
    rank's own slice is re-inserted so autograd sees it. A loss computed on the full gathered batch then
    has the correct gradient w.r.t. the local features; multiplying that loss by W before backward makes
    DDP's gradient average equal the gradient of the single-process loss on the global batch.
    Every rank must pass the same shape.
    """
    w = world_size()
    if w == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(w)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts, dim=0)


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """All-gather a tensor without gradients (inputs: pixels, token ids): [B, ...] -> [W·B, ...]."""
    w = world_size()
    if w == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(w)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a (detached) tensor; identity in a single process."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts (seed, purpose, step, micro-step, rank): counter-based RNG.

    Every random draw of training (masks, negatives, augmentation, data order) comes from a generator
    seeded this way, so a resumed run redraws exactly what an uninterrupted run draws.
    """
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(device: torch.device, *parts: object) -> torch.Generator:
    """A fresh generator on ``device`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


class StreamSampler:
    """Deterministic, per-rank sharded batches over an endless stream of epoch permutations.

    The stream visits ``range(n)`` in ``randperm(n)`` order, a fresh permutation per epoch seeded by
    ``(seed, epoch)``. Optimizer step ``s`` consumes stream positions ``[s·G·A, (s+1)·G·A)`` (G = micro batch ×
    world, A = accumulation steps); within them micro-step ``a`` of rank ``r`` takes the ``r``-th slice of the
    ``a``-th chunk. Resuming at step ``s`` therefore yields exactly the batches an uninterrupted run sees.
    """

    def __init__(self, n: int, seed: int, micro_batch: int, world: int, rank: int, accum: int, start_step: int):
        if n < 1:
            raise ValueError("the training split is empty")
        self.n, self.seed, self.micro, self.world, self.rank, self.accum = n, seed, micro_batch, world, rank, accum
        self.start_step = start_step
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=generator(torch.device("cpu"), self.seed,
                                                                               "data-order", epoch))}
        return self._perms[epoch]

    def indices(self, position: int, count: int) -> list[int]:
        """Dataset indices at stream positions ``[position, position + count)``."""
        out = []
        for p in range(position, position + count):
            out.append(int(self._perm(p // self.n)[p % self.n]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        per_step = self.micro * self.world * self.accum
        while True:
            for a in range(self.accum):
                start = step * per_step + (a * self.world + self.rank) * self.micro
                yield self.indices(start, self.micro)
            step += 1
