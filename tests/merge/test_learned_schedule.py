"""Learned merge coefficients (``vlmerge merge --alpha-schedule learned`` / ``--lam-schedule learned``).

Oracle: a planted optimum. For interpolation, the vision and language copies of slot (layer i, module j) are built
around a teacher weight T as W^v = T + δ and W^l = T − c·δ, so α W^v + (1 − α) W^l = T exactly at α* = c / (1 + c)
(and the top layer's ⅔(·) + ⅓ W^vl with W^vl = T too). For modality arithmetic, the copies are W^m = W0 + τ_m with
random τ_m and the base W0 = T − λ* Σ_m τ_m, so W0 + λ Σ_m τ_m = T exactly at λ*. A loss that compares the merged
model's hidden states with the teacher's is minimised there and nowhere else nearby, so gradient descent through
the merge must find the planted coefficients, per layer or per layer and module.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlmerge.cli import main
from vlmerge.data import default_tokenizer
from vlmerge.merge.learned import learn_schedule, world_split_batches
from vlmerge.models import VLMo, load_model, preset_config, save_model
from vlmerge.models.roles import merge_groups

PLANTED = (0.25, 0.7)  # α* per layer
PLANTED_BY_MODULE = ({"norm1": 0.5, "attn": 0.3, "norm2": 0.6, "mlp": 0.8},  # λ* or α* per layer and module
                     {"norm1": 0.4, "attn": 0.65, "norm2": 0.5, "mlp": 0.2})


def _planted(seed: int = 0, method: str = "interpolation", planted=PLANTED) -> tuple[VLMo, VLMo, dict | None]:
    """(teacher: an MSA with equal copies, i.e. an MAA; student: an MSA whose merge is the teacher at the planted
    coefficients; the base W0 for modality arithmetic, else None)."""
    torch.manual_seed(seed)
    cfg = preset_config("micro", "msa", vocab_size=default_tokenizer().vocab_size)
    teacher = VLMo(cfg).eval()  # tied init: v = l = vl
    student = VLMo(cfg).eval()
    student.load_state_dict(teacher.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    base = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        params = dict(student.named_parameters())
        for grp in merge_groups(params):
            c = planted[grp.layer]
            c = c[grp.module] if isinstance(c, dict) else c
            t = params[grp.sources["v"]].clone()
            scale = 0.3 * t.abs().mean().clamp_min(0.02)
            if method == "interpolation":
                delta = scale * torch.randn(t.shape, generator=g)
                params[grp.sources["v"]].add_(delta)
                params[grp.sources["l"]].sub_(c / (1 - c) * delta)
            else:
                taus = {m: scale * torch.randn(t.shape, generator=g) for m in grp.sources}
                w0 = t - c * sum(taus.values())
                for m, k in grp.sources.items():
                    params[k].copy_(w0 + taus[m])
                    base[k] = w0
    return teacher, student, (base if method != "interpolation" else None)


def _hidden(model, batch):
    return model.forward_image(batch["image"]), model.forward_text(batch["input_ids"], batch["attention_mask"])


def _teacher_loss(teacher, batches):
    with torch.no_grad():
        want = {id(b): _hidden(teacher, b) for b in batches}

    def loss(out, batch):
        return sum(F.mse_loss(o, t) for o, t in zip(out, want[id(batch)], strict=True))

    return loss


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_through_the_merge_recovers_a_planted_per_layer_alpha(seed: int) -> None:
    teacher, student, _ = _planted(seed)
    batches = world_split_batches(student, 2, seed=seed, batch_size=8)
    res = learn_schedule(student, batches, _teacher_loss(teacher, batches), forward=_hidden, steps=150, lr=0.1)
    assert res["param"] == "alpha" and res["granularity"] == "layer"
    assert res["schedule"] == pytest.approx(list(PLANTED), abs=0.02), res["schedule"]
    assert res["loss_after"] < 1e-3 * res["loss_at_init"]


@pytest.mark.parametrize("method", ["interpolation", "modality_arithmetic"])
def test_gradient_through_the_merge_recovers_a_planted_per_module_coefficient(method: str) -> None:
    teacher, student, base = _planted(2, method, PLANTED_BY_MODULE)
    batches = world_split_batches(student, 2, seed=2, batch_size=8)
    res = learn_schedule(student, batches, _teacher_loss(teacher, batches), method=method, granularity="module",
                         base=base, forward=_hidden, steps=150, lr=0.1)
    assert res["param"] == ("alpha" if method == "interpolation" else "lam")
    got = res["schedule"]
    assert [sorted(c) for c in got] == [sorted(c) for c in PLANTED_BY_MODULE]
    for layer, want in enumerate(PLANTED_BY_MODULE):
        assert got[layer] == pytest.approx(want, abs=0.03), (layer, got[layer])
    assert res["loss_after"] < 1e-3 * res["loss_at_init"]


def test_the_objectives_lower_their_loss_and_are_deterministic(tmp_path) -> None:
    _, student, _ = _planted()
    batches = world_split_batches(student, 2, batch_size=16)
    for objective in ("supervised", "entropy"):
        a = learn_schedule(student, batches, objective, steps=10, lr=0.2)
        b = learn_schedule(student, batches, objective, steps=10, lr=0.2)
        assert a["schedule"] == b["schedule"] and a["loss_after"] < a["loss_at_init"]
        assert all(0 < x < 1 for x in a["schedule"]) and len(a["schedule"]) == student.config.depth


def test_cli_learned_schedule_is_stored_in_the_merge_record_and_merges_with_it(tmp_path, capsys) -> None:
    _, student, _ = _planted()
    src = save_model(student, tmp_path / "msa")
    argv = ["merge", "--method", "interpolation", "--alpha-schedule", "learned", "--learn-steps", "5",
            "--learn-batches", "1"]
    assert main([*argv, str(src), str(tmp_path / "a")]) == 0
    assert main([*argv, str(src), str(tmp_path / "b")]) == 0
    rec = json.loads((tmp_path / "a" / "config.json").read_text())["merge"]
    alpha = rec["params"]["alpha"]
    assert rec["learned"]["schedule"] == alpha and rec["learned"]["objective"] == "supervised"
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
    assert "goes with --alpha-schedule / --lam-schedule learned" in capsys.readouterr().err


def test_cli_learned_lam_per_module_is_stored_and_merged_with(tmp_path, capsys) -> None:
    _, student, base = _planted(3, "modality_arithmetic", PLANTED_BY_MODULE)
    src = save_model(student, tmp_path / "msa")
    teacher = VLMo(student.config)
    teacher.load_state_dict(base)
    w0 = save_model(teacher, tmp_path / "w0")
    argv = ["merge", "--method", "modality_arithmetic", "--base", str(w0), "--lam-schedule", "learned",
            "--learn-granularity", "module", "--learn-steps", "4", "--learn-batches", "1"]
    assert main([*argv, str(src), str(tmp_path / "a")]) == 0
    rec = json.loads((tmp_path / "a" / "config.json").read_text())["merge"]
    lam = rec["params"]["lam"]
    assert rec["learned"]["schedule"] == lam and rec["learned"]["granularity"] == "module"
    assert [sorted(c) for c in lam] == [sorted(c) for c in PLANTED_BY_MODULE]
    assert all(len(set(layer.values())) > 1 for layer in lam)  # the modules of one layer got their own λ
    sd, merged = student.state_dict(), load_model(tmp_path / "a").state_dict()
    for k in ("blocks.0.attn.v.qkv.weight", "blocks.1.mlp.v.fc2.weight"):
        layer, module = int(k.split(".")[1]), k.split(".")[2]
        tau = sd[k] - base[k] + sd[k.replace(".v.", ".l.")] - base[k]
        if layer == 1:
            tau = tau + sd[k.replace(".v.", ".vl.")] - base[k]
        want = base[k] + lam[layer][module] * tau
        torch.testing.assert_close(merged[k.replace(".v.", ".shared.")], want, rtol=0, atol=1e-5)
    capsys.readouterr()
    assert main([*argv[:3], "--lam-schedule", "learned", str(src), str(tmp_path / "b")]) == 2
    assert "needs a base" in capsys.readouterr().err
    assert main([*argv, "--alpha-schedule", "learned", str(src), str(tmp_path / "c")]) == 2
    assert "one method learns one coefficient" in capsys.readouterr().err
    for bad, message in ((["--method", "interpolation", "--lam-schedule", "learned"],
                          "--lam-schedule learned: goes with --method modality_arithmetic, not interpolation"),
                         (["--method", "modality_arithmetic", "--base", str(w0), "--alpha-schedule", "learned"],
                          "--alpha-schedule learned: goes with --method interpolation, not modality_arithmetic"),
                         ([*argv[1:], "--keep-specific", "1"], "learns the coefficients of a full merge")):
        assert main(["merge", *bad, str(src), str(tmp_path / "d")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_the_supervised_loss_leaves_captions_true_of_another_image_out_of_the_negatives() -> None:
    """Oracle: the masked InfoNCE by hand (a known-true pair dropped from both softmaxes), and the world's truth
    mask checked on what it must hold: every caption is true of its own image, and an identical caption text is
    true of both images it was written for."""
    from vlmerge.merge.learned import contrastive_loss

    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(3, 4, generator=g), dim=-1), F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    scale = torch.tensor(1.5)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 1] = True  # caption 1 is true of image 0 too
    logits = scale.exp() * img @ txt.t()
    i2t = [torch.logsumexp(torch.stack([logits[i, j] for j in range(3) if not mask[i, j] or i == j]), 0) - logits[i, i]
           for i in range(3)]
    t2i = [torch.logsumexp(torch.stack([logits[i, j] for i in range(3) if not mask[i, j] or i == j]), 0) - logits[j, j]
           for j in range(3)]
    want = (sum(i2t) / 3 + sum(t2i) / 3) / 2
    got = contrastive_loss((img, txt, scale), {"not_negative": mask})
    torch.testing.assert_close(got, want)
    assert got < contrastive_loss((img, txt, scale), {})  # one term fewer in a log-sum-exp

    _, student, _ = _planted()
    batches = world_split_batches(student, 2, batch_size=32, world={"max_objects": 1, "shapes": ["circle", "square"],
                                                                    "colors": ["red", "blue"]})
    same_text = 0
    for b in batches:
        nn_ = b["not_negative"]
        assert nn_.shape == (32, 32) and nn_.diagonal().all() and not nn_.all()
        ids = b["input_ids"]
        for i in range(32):
            for j in range(32):
                if i != j and torch.equal(ids[i], ids[j]):
                    assert nn_[i, j] and nn_[j, i]
                    same_text += 1
    assert same_text > 0  # a world of 4 scenes repeats captions: the check above ran
