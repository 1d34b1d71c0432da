"""Two real gloo processes on the CPU: the all-gather, the DDP gradient of ITC, global hard-negative mining, and
the engine under DDP with gradient accumulation."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from pretrain_toy import toy_data
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlmerge.models import load_model
from vlmerge.pretrain import load_config, pretrain
from vlmerge.pretrain.dist import gather_nograd, gather_with_local_grad
from vlmerge.pretrain.losses import itc_loss, same_text, sample_hard_negatives

B, E = 4, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn_name: str, tmp: Path, world: int = 2) -> None:
    """Run ``fn_name(rank, world, tmp)`` of this module in ``world`` gloo processes."""
    mp.spawn(_worker, args=(world, free_port(), str(tmp), fn_name), nprocs=world, join=True)


def _worker(rank: int, world: int, port: int, tmp: str, fn_name: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        globals()[fn_name](rank, world, Path(tmp))
    finally:
        dist.destroy_process_group()


class Towers(nn.Module):
    """Two linear encoders and a temperature: a stand-in for the dual encoder."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img, self.txt = nn.Linear(E, E), nn.Linear(E, E)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, xi: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        return itc_loss(F.normalize(self.img(xi), dim=-1), F.normalize(self.txt(xt), dim=-1), self.logit_scale)[0]


def inputs(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(world * B, E, generator=g), torch.randn(world * B, E, generator=g)


def _ddp_itc(rank: int, world: int, tmp: Path) -> None:
    xi, xt = inputs(world)
    model = DistributedDataParallel(Towers())
    local = slice(rank * B, (rank + 1) * B)
    loss = model(xi[local], xt[local])
    loss.backward()
    grads = {n: p.grad for n, p in model.module.named_parameters()}
    save_file({**grads, "loss": loss.detach()}, str(tmp / f"rank{rank}.safetensors"))


def test_ddp_itc_gradient_equals_single_process_gradient(tmp_path: Path) -> None:
    spawn("_ddp_itc", tmp_path)
    ref = Towers()
    xi, xt = inputs(2)
    loss = ref(xi, xt)  # one process, the whole global batch
    loss.backward()
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        torch.testing.assert_close(got.pop("loss"), loss.detach())  # every rank reports the global loss
        for name, p in ref.named_parameters():
            torch.testing.assert_close(got[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def _gather_and_mine(rank: int, world: int, tmp: Path) -> None:
    # The gather keeps gradients for the local slice only.
    x = torch.full((2, 3), float(rank), requires_grad=True)
    gathered = gather_with_local_grad(x)
    assert gathered[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    (gathered * torch.arange(1.0, 5.0)[:, None]).sum().backward()
    assert x.grad[:, 0].tolist() == ([1.0, 2.0] if rank == 0 else [3.0, 4.0])
    # Global mining: rank 0's images have their hardest negative text on rank 1.
    eye = torch.eye(2 * B)
    img = eye[rank * B:(rank + 1) * B]
    txt = img if rank == 0 else F.normalize(eye[:B] + 0.1 * eye[B:], dim=-1)  # rank 1 texts look like rank 0's
    ids = torch.arange(B)[:, None] + 10 * (rank + 1)  # distinct captions everywhere
    _, logits = itc_loss(img, txt, torch.tensor(4.6))
    all_ids = gather_nograd(ids)
    assert all_ids[:, 0].tolist() == [10, 11, 12, 13, 20, 21, 22, 23]
    rows = slice(rank * B, (rank + 1) * B)
    neg_txt, valid = sample_hard_negatives(logits[rows], same_text(ids, all_ids), torch.Generator().manual_seed(rank))
    assert valid.all()
    if rank == 0:
        assert neg_txt.tolist() == [B, B + 1, B + 2, B + 3], neg_txt  # found on the other rank
    (tmp / f"ok{rank}").touch()


def test_gather_and_global_hard_negative_mining(tmp_path: Path) -> None:
    spawn("_gather_and_mine", tmp_path)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def _engine(rank: int, world: int, tmp: Path) -> None:
    cfg = load_config(None, ["model.preset=micro", "recipe.name=seed", "recipe.seed_steps=2", "train.steps=4",
                             "train.batch_size=16", "train.micro_batch_size=4", "optim.warmup_steps=1",
                             "train.log_every=1"])
    path = pretrain(cfg, tmp / "run", data=toy_data(), progress=False)
    (tmp / f"path{rank}").write_text(str(path))


def test_engine_under_ddp_with_accumulation(tmp_path: Path) -> None:
    spawn("_engine", tmp_path)
    assert (tmp_path / "path0").read_text() == (tmp_path / "path1").read_text() == str(tmp_path / "run" / "final")
    assert load_model(tmp_path / "run" / "final").config.arch == "msa"
    assert (tmp_path / "run" / "w0" / "model.safetensors").is_file()
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["images_per_s"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in steps)
