"""Two real gloo processes on the CPU: the all-gather, the DDP gradient of ITC, global hard-negative mining, and
the engine under DDP with gradient accumulation, against one process on the whole batch."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from unittest.mock import patch

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from pretrain_toy import toy_data
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlmerge.files import atomic_write_bytes, make_temp_file
from vlmerge.models import load_model
from vlmerge.pretrain import engine, load_config, pretrain
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
        # leave together: a rank tearing its group down while the other still talks to rank 0's store
        # aborted a process now and then ("terminate called without an active exception", SIGABRT)
        dist.barrier()
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


# Settings under which the engine's update is compared, to float rounding, with one process that sees the
# whole global batch in one forward: no augmentation; a constant learning rate; AdamW's eps (1) far above √v,
# so that the update is linear in the gradient (Adam's normalisation would otherwise hide a gradient off by a
# constant factor, e.g. a loss not divided by the accumulation steps, or divided twice); no clipping (a
# threshold never reached, which still logs every step's global gradient norm).
EXACT = ["model.preset=micro", "train.batch_size=16", "augment.num_ops=0", "optim.lr=0.1", "optim.eps=1",
         "optim.min_lr_ratio=1", "optim.warmup_steps=0", "optim.grad_clip=1e9", "train.log_every=1"]
# The image stage (MIM) with every patch masked: 0.9 of the micro model's 2×2 patches rounds to all 4, so the
# mask draws nothing random (the runs' per-micro-step generators differ), every image has as many masked
# patches, and a batch's loss is the mean of its equal micro-batches' losses.
MIM = [*EXACT, "recipe.name=stagewise", "recipe.image_steps=3", "recipe.text_steps=1", "train.steps=5",
       "loss.mim_mask_ratio=0.9"]
# ITC alone (ITM draws random negatives, MLM random masks). In-batch negatives make a micro-step's loss depend
# on its micro-batch; the engine gathers them over the ranks, not over the micro-steps.
ITC = [*EXACT, "recipe.name=scratch", "train.steps=4", "loss.itm=0", "loss.mlm=0"]
STOP = 3  # optimizer steps compared: MIM's whole image stage, ITC's first 3 (the 4th would add the final eval)
ACCUM = ["train.micro_batch_size=4"]  # 2 ranks × 4 × 2 accumulation steps (1 rank: × 4 steps) = 16


_real_check_out = engine._check_out


def _late_check(*args: object) -> None:
    time.sleep(0.2)
    _real_check_out(*args)


def _slow_write(path: Path, data: bytes) -> None:
    """``atomic_write_bytes`` whose temp file stays in the folder a while (an fsync on a busy disk)."""
    if path.name == "config.yaml":
        fd, temp = make_temp_file(path)
        time.sleep(0.5)
        os.close(fd)
        temp.unlink()
    atomic_write_bytes(path, data)


def _engine(rank: int, world: int, tmp: Path) -> None:
    cfg = load_config(None, ["model.preset=micro", "recipe.name=seed", "recipe.seed_steps=2", "train.steps=4",
                             "train.batch_size=16", "train.micro_batch_size=4", "optim.warmup_steps=1",
                             "train.log_every=1"])
    # Every rank's checks of the run folder must come before the main process writes there (rank 1 once
    # refused it: "not empty and holds no pre-training run", having seen config.yaml's temp file).
    if rank:  # rank 1 checks late ...
        late = patch.object(engine, "_check_out", _late_check)
    else:  # ... while rank 0 writes config.yaml
        late = patch.object(engine, "atomic_write_bytes", _slow_write)
    with late:
        path = pretrain(cfg, tmp / "run", data=toy_data(), progress=False)
    (tmp / f"path{rank}").write_text(str(path))
    for name, sets in (("mim", MIM), ("itc", ITC)):
        pretrain(load_config(None, [*sets, *ACCUM]), tmp / name, data=toy_data(), stop_after=STOP, progress=False)


def grad_norms(run: Path) -> list[float]:
    return [json.loads(r)["grad_norm"] for r in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(ref: Path, got: Path) -> None:
    """Same global gradient norm at every step and, after them, the same weights (float rounding apart)."""
    torch.testing.assert_close(grad_norms(got), grad_norms(ref), rtol=1e-5, atol=0)
    ckpt = f"checkpoints/step-{STOP:08d}/model.safetensors"
    a, b = load_file(str(ref / ckpt)), load_file(str(got / ckpt))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)


def test_engine_under_ddp_with_accumulation(tmp_path: Path) -> None:
    """The engine under 2 gloo processes × 2 accumulation steps.

    With every loss (seed recipe): it runs, and every rank returns the same final model.

    Against an oracle, for losses where the comparison is exact by design (settings EXACT, MIM, ITC above):
    MIM with every patch masked (nothing random, a mean over images) on 2 ranks × 2 micro-steps × 4 images,
    and on 1 process × 4 micro-steps × 4 images, must train as 1 process on all 16 images in one forward --
    the same global gradient norm at every step and the same weights after 3 steps (atol 1e-5); a loss not
    divided by the accumulation steps, or divided twice, fails both. ITC alone, whose in-batch negatives the
    engine gathers over ranks but not over micro-steps: 2 ranks × 4 pairs per micro-step must train as
    1 process × 8 pairs per micro-step (2 micro-steps each)."""
    spawn("_engine", tmp_path)
    assert (tmp_path / "path0").read_text() == (tmp_path / "path1").read_text() == str(tmp_path / "run" / "final")
    assert load_model(tmp_path / "run" / "final").config.arch == "msa"
    assert (tmp_path / "run" / "w0" / "model.safetensors").is_file()
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["images_per_s"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in steps)

    def one_process(name: str, sets: list[str]) -> Path:
        pretrain(load_config(None, sets), tmp_path / name, data=toy_data(), stop_after=STOP, progress=False)
        return tmp_path / name

    whole = one_process("mim-whole", MIM)  # 16 images per forward, no accumulation
    assert_same_training(whole, tmp_path / "mim")
    assert_same_training(whole, one_process("mim-accum", [*MIM, *ACCUM]))
    assert_same_training(one_process("itc-8", [*ITC, "train.micro_batch_size=8"]), tmp_path / "itc")
