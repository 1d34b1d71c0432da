"""Learned layer-wise interpolation coefficients (``vlmerge merge --alpha-schedule learned``).

Oracle: a planted optimum. The vision and language copies of layer i are built around a teacher weight T_i as
W^v = T + δ and W^l = T − c_i·δ, so α_i W^v + (1 − α_i) W^l = T exactly at α*_i = c_i / (1 + c_i) (and the top
layer's ⅔(·) + ⅓ W^vl with W^vl = T too); a loss that compares the merged model's hidden states with the teacher's
is minimised there and nowhere else nearby, so gradient descent through the merge must find α*.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlmerge.cli import main
from vlmerge.data import default_tokenizer
from vlmerge.merge.learned import learn_alpha_schedule, world_split_batches
from vlmerge.models import VLMo, load_model, preset_config, save_model

PLANTED = (0.25, 0.7)


def _planted(seed: int = 0) -> tuple[VLMo, VLMo]:
    """(teacher MAA-equivalent MSA with equal copies, MSA whose copies interpolate to the teacher at α*)."""
    torch.manual_seed(seed)
    cfg = preset_config("micro", "msa", vocab_size=default_tokenizer().vocab_size)
    teacher = VLMo(cfg).eval()  # tied init: v = l = vl
    student = VLMo(cfg).eval()
    student.load_state_dict(teacher.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        params = dict(student.named_parameters())
        for name, p in params.items():
            for layer, a in enumerate(PLANTED):
                if name.startswith(f"blocks.{layer}.") and ".v." in name:
                    c = a / (1 - a)
                    delta = 0.3 * p.abs().mean().clamp_min(0.02) * torch.randn(p.shape, generator=g)
                    p.add_(delta)
                    params[name.replace(".v.", ".l.")].sub_(c * delta)
    return teacher, student


def _hidden(model, batch):
    return model.forward_image(batch["image"]), model.forward_text(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_through_the_merge_recovers_a_planted_optimum(seed: int) -> None:
    teacher, student = _planted(seed)
    batches = world_split_batches(student, 2, seed=seed, batch_size=8)
    with torch.no_grad():
        want = [_hidden(teacher, b) for b in batches]
    targets = {id(b): w for b, w in zip(batches, want, strict=True)}

    def loss(out, batch):
        return sum(F.mse_loss(o, t) for o, t in zip(out, targets[id(batch)], strict=True))

    res = learn_alpha_schedule(student, batches, loss, forward=_hidden, steps=150, lr=0.1)
    assert res["alpha"] == pytest.approx(list(PLANTED), abs=0.02), res["alpha"]
    assert res["loss_after"] < 1e-3 * res["loss_at_init_alpha"]


def test_the_objectives_lower_their_loss_and_are_deterministic(tmp_path) -> None:
    _, student = _planted()
    batches = world_split_batches(student, 2, batch_size=16)
    for objective in ("supervised", "entropy"):
        a = learn_alpha_schedule(student, batches, objective, steps=10, lr=0.2)
        b = learn_alpha_schedule(student, batches, objective, steps=10, lr=0.2)
        assert a["alpha"] == b["alpha"] and a["loss_after"] < a["loss_at_init_alpha"]
        assert all(0 < x < 1 for x in a["alpha"]) and len(a["alpha"]) == student.config.depth


def test_cli_learned_schedule_is_stored_in_the_merge_record_and_merges_with_it(tmp_path, capsys) -> None:
    _, student = _planted()
    src = save_model(student, tmp_path / "msa")
    argv = ["merge", "--method", "interpolation", "--alpha-schedule", "learned", "--learn-steps", "5",
            "--learn-batches", "1"]
    assert main([*argv, str(src), str(tmp_path / "a")]) == 0
    assert main([*argv, str(src), str(tmp_path / "b")]) == 0
    rec = json.loads((tmp_path / "a" / "config.json").read_text())["merge"]
    alpha = rec["params"]["alpha"]
    assert rec["learned"]["alpha"] == alpha and rec["learned"]["objective"] == "supervised"
    assert rec["learned"]["data"] == "world/val" and rec["learned"]["steps"] == 5
    assert json.loads((tmp_path / "b" / "config.json").read_text())["merge"]["params"]["alpha"] == alpha
    merged = load_model(tmp_path / "a")
    sd = student.state_dict()
    k = "blocks.0.mlp.v.fc1.weight"
    want = alpha[0] * sd[k] + (1 - alpha[0]) * sd[k.replace(".v.", ".l.")]
    torch.testing.assert_close(merged.state_dict()[k.replace(".v.", ".shared.")], want, rtol=0, atol=1e-6)
    capsys.readouterr()
    for bad, message in ((["--alpha", "0.5"], "drop params.alpha"), (["--learn-objective", "x"], "invalid choice")):
        try:
            code = main([*argv, *bad, str(src), str(tmp_path / "c")])
        except SystemExit as e:
            code = e.code
        assert code == 2 and message in capsys.readouterr().err
    assert main(["merge", "--method", "interpolation", "--learn-steps", "3", str(src), str(tmp_path / "d")]) == 2
    assert "goes with --alpha-schedule learned" in capsys.readouterr().err
