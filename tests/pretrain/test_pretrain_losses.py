"""Each objective on a tiny hand-computed case; masking, hard negatives, augmentation, optimizer groups."""

from __future__ import annotations

import math

import pytest
import torch

from vlmerge.models import VLMo, preset_config
from vlmerge.pretrain.augment import OPS, rand_augment
from vlmerge.pretrain.losses import (
    IGNORE,
    SpecialTokens,
    itc_loss,
    itm_loss,
    mask_patches,
    mask_tokens,
    mim_loss,
    mlm_loss,
    patchify,
    same_text,
    sample_hard_negatives,
)
from vlmerge.pretrain.optim import build_optimizer, decays, lr_at


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_itc_hand_computed() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss, logits = itc_loss(img, txt, torch.tensor(math.log(2.0)))
    torch.testing.assert_close(logits, torch.tensor([[2.0, 1.2], [0.0, 1.6]]))

    def ce(row: list[float], target: int) -> float:
        return -row[target] + math.log(sum(math.exp(v) for v in row))

    i2t = (ce([2.0, 1.2], 0) + ce([0.0, 1.6], 1)) / 2
    t2i = (ce([2.0, 0.0], 0) + ce([1.2, 1.6], 1)) / 2
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_itc_temperature_clamped_at_100() -> None:
    img = txt = torch.eye(2)
    scale = torch.tensor(math.log(1000.0), requires_grad=True)
    _, logits = itc_loss(img, txt, scale)
    assert logits.max().item() == pytest.approx(100.0)


def test_itm_and_mlm_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    labels = torch.tensor([1, 0])
    both = (math.log(2.0) - math.log(3 / 4)) / 2
    assert itm_loss(logits, labels, torch.ones(2)).item() == pytest.approx(both)
    assert itm_loss(logits, labels, torch.tensor([1.0, 0.0])).item() == pytest.approx(math.log(2.0))
    assert mlm_loss(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1])).item() == pytest.approx(-math.log(0.75))
    empty = torch.zeros(0, 5, requires_grad=True)
    assert mlm_loss(empty, torch.zeros(0, dtype=torch.long)).item() == 0.0  # no masked token: no NaN


def test_hard_negatives_never_pick_the_positive_or_a_duplicate() -> None:
    g = gen()
    logits = torch.randn(8, 8, generator=g) + 50 * torch.eye(8)  # the positive dominates the similarity
    excluded = torch.eye(8, dtype=torch.bool)
    excluded[2, 5] = True  # text 5 duplicates caption 2
    for _ in range(200):
        idx, valid = sample_hard_negatives(logits, excluded, g)
        assert valid.all()
        assert not excluded[torch.arange(8), idx].any()


def test_hard_negatives_follow_softmax_weights_and_flag_empty_rows() -> None:
    logits = torch.tensor([[9.0, 0.0, math.log(3.0)], [0.0, 0.0, 0.0]])
    excluded = torch.tensor([[True, False, False], [True, True, True]])
    g = gen(1)
    draws = torch.stack([sample_hard_negatives(logits, excluded, g)[0] for _ in range(4000)])
    assert (draws[:, 0] == 2).float().mean().item() == pytest.approx(0.75, abs=0.03)
    _, valid = sample_hard_negatives(logits, excluded, g)
    assert valid.tolist() == [True, False]


def test_same_text_marks_duplicate_captions() -> None:
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 5, 6, 2]])
    assert same_text(ids, ids).tolist() == [[True, False, True], [False, True, False], [True, False, True]]


SPECIAL = SpecialTokens(pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=50)


def test_mask_tokens_rates_and_specials() -> None:
    ids = torch.randint(5, 50, (400, 30), generator=gen())
    ids[:, 0], ids[:, 20], ids[:, 21:] = 1, 2, 0
    att = (ids != 0).long()
    masked, labels = mask_tokens(ids, att, SPECIAL, 0.15, gen(2))
    picked = labels != IGNORE
    assert not picked[:, 0].any() and not picked[:, 20:].any()  # never [CLS], [SEP], [PAD]
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])
    assert picked.sum().item() / (400 * 19) == pytest.approx(0.15, abs=0.01)
    to_mask = (masked[picked] == 3).float().mean().item()
    unchanged = (masked[picked] == ids[picked]).float().mean().item()
    assert to_mask == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1 + 0.1 / 45, abs=0.02)  # the 10 % kept, plus random hits of itself
    assert not torch.isin(masked[picked & (masked != 3)], torch.tensor([0, 1, 2])).any()


def test_patchify_matches_the_patch_embedding_order() -> None:
    torch.manual_seed(0)
    image = torch.randn(2, 3, 16, 16)
    pe = VLMo(preset_config("micro", "maa", vocab_size=10)).patch_embed  # 8-px patches, 4 of them
    patches = patchify(image, 8)
    assert patches.shape == (2, 4, 192)
    # The conv is a linear map of each patch's pixels: reproduce it from patchify's (y, x, c) layout.
    w = pe.proj.weight.permute(0, 2, 3, 1).reshape(pe.proj.weight.shape[0], -1)
    torch.testing.assert_close(patches @ w.t() + pe.proj.bias, pe(image), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patches[1, 2], image[1, :, 8:16, 0:8].permute(1, 2, 0).reshape(-1))


def test_mim_masking_and_loss_hand_computed() -> None:
    image = torch.rand(2, 3, 16, 16, generator=gen())
    masked, mask = mask_patches(image, 8, 0.5, gen(3))
    assert mask.sum(dim=1).tolist() == [2, 2]
    pm, po = patchify(masked, 8), patchify(image, 8)
    assert (pm[mask] == 0).all() and torch.equal(pm[~mask], po[~mask])
    target = (po - po.mean(-1, keepdim=True)) / (po.var(-1, keepdim=True) + 1e-6).sqrt()
    assert mim_loss(target, image, mask, 8).item() == pytest.approx(0.0, abs=1e-6)
    pred = target.clone()
    pred[mask] += 0.5  # every masked pixel off by 0.5; unmasked errors are ignored
    pred[~mask] += 7.0
    assert mim_loss(pred, image, mask, 8).item() == pytest.approx(0.25, abs=1e-5)


def test_rand_augment_is_seeded_and_bounded() -> None:
    image = torch.rand(16, 3, 16, 16, generator=gen())
    a = rand_augment(image, 2, 9.0, gen(5))
    assert torch.equal(a, rand_augment(image, 2, 9.0, gen(5)))
    assert not torch.equal(a, rand_augment(image, 2, 9.0, gen(6)))
    assert a.shape == image.shape and a.min() >= 0 and a.max() <= 1
    for name, op in OPS.items():  # magnitude 0 leaves the image (nearly) as it is, except autocontrast
        if name != "autocontrast":
            torch.testing.assert_close(op(image, torch.zeros(16)).clamp(0, 1), image, atol=2e-3, rtol=0,
                                       msg=name)
    with pytest.raises(ValueError, match="magnitude"):
        rand_augment(image, 1, 11.0, gen())


def test_weight_decay_groups() -> None:
    model = VLMo(preset_config("micro", "msa", vocab_size=10, heads=("itc", "itm", "mlm")))
    params = dict(model.named_parameters())
    no_decay = [n for n, p in params.items() if not decays(n, p)]
    for name in ("word_embed.weight", "text_pos_embed.weight", "type_embed.weight", "image_pos_embed", "cls_token",
                 "heads.itc.logit_scale", "norm.weight", "blocks.0.norm1.v.weight", "blocks.0.attn.l.qkv.bias"):
        assert name in no_decay
    assert decays("blocks.0.attn.l.qkv.weight", params["blocks.0.attn.l.qkv.weight"])
    opt = build_optimizer(model, 1e-3, 0.01, (0.9, 0.98), 1e-8)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.98)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)


def test_lr_schedule() -> None:
    assert lr_at(0, 100, 1.0, 10, "linear") == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, "linear") == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 10, "linear") == pytest.approx(0.0)
    assert lr_at(99, 100, 1.0, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    mid = lr_at(54, 100, 1.0, 10, "cosine")
    assert 0.45 < mid < 0.55


def test_wsd_schedule_warms_up_holds_and_decays_each_stage() -> None:
    """Warm-up, the peak until the stage's last decay_frac, then linear decay to min_ratio at its last step: a
    shorter stage is a longer one's prefix up to its own decay."""
    run = [lr_at(s, 100, 1.0, 10, "wsd", decay_frac=0.2) for s in range(100)]
    assert run[0] == pytest.approx(0.1) and run[9] == pytest.approx(1.0) and run[79] == pytest.approx(1.0)
    assert run[80] == pytest.approx(1 - 1 / 20) and run[99] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(run[9:], run[10:], strict=False))
    seed_stage = [lr_at(s, 40, 1.0, 10, "wsd", decay_frac=0.2) for s in range(40)]
    assert seed_stage[:32] == run[:32] and seed_stage[32] < 1.0 and seed_stage[39] == pytest.approx(0.0)
    assert lr_at(99, 100, 2.0, 10, "wsd", 0.1) == pytest.approx(0.2)


def test_padding_to_the_longest_text_changes_no_loss() -> None:
    """Padding is masked out of attention: a batch trimmed to its longest text gives the ITC and ITM losses of
    the same batch padded to max_len (the draws that pick hard negatives do not depend on the text length)."""
    from vlmerge.pretrain.losses import ObjectiveSettings, PretrainObjective

    torch.manual_seed(0)
    model = VLMo(preset_config("micro", "msa", vocab_size=40, num_vl_layers=2, heads=("itc", "itm", "mlm")))
    obj = PretrainObjective(model, "vl", ObjectiveSettings(itm_fraction=0.5), SpecialTokens(0, 1, 2, 3, 40),
                            (0.5,) * 3, (0.5,) * 3).eval()
    ids = torch.zeros(8, 24, dtype=torch.long)
    for i in range(8):
        n = 3 + i % 5
        ids[i, :n] = torch.randint(4, 40, (n,), generator=gen(i))
        ids[i, 0], ids[i, n - 1] = 1, 2
    batch = {"image": torch.rand(8, 3, 16, 16, generator=gen(9)), "input_ids": ids,
             "attention_mask": (ids != 0).long(), "image_id": torch.arange(8)}
    longest = int(batch["attention_mask"].sum(1).max())
    trimmed = {**batch, "input_ids": ids[:, :longest], "attention_mask": batch["attention_mask"][:, :longest]}
    a, b = obj(batch, gen(5)), obj(trimmed, gen(5))
    for key in ("itc", "itm", "itm_acc"):
        assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-5), key


def test_take_rows_is_indexing_with_a_deterministic_backward() -> None:
    from vlmerge.pretrain.losses import take_rows

    x = torch.randn(6, 3, 4, generator=gen(0), requires_grad=True)
    idx = torch.tensor([2, 2, 5, 0, 2])
    y = take_rows(x, idx)
    assert torch.equal(y, x[idx])  # exact: 1·x + 0·rest
    w = torch.randn(5, 3, 4, generator=gen(1))
    (g1,) = torch.autograd.grad((y * w).sum(), x)
    (g2,) = torch.autograd.grad((x[idx] * w).sum(), x)
    assert torch.allclose(g1, g2, atol=1e-6)
    assert torch.allclose(g1[2], w[0] + w[1] + w[4], atol=1e-6) and torch.all(g1[[1, 3, 4]] == 0)


def test_itc_leaves_known_false_negatives_out_of_both_softmaxes() -> None:
    """``not_negative[i, j]``: caption j is also true of image i, so it is no negative of image i (row i) and
    image i is no negative of caption j (column j); the positives on the diagonal always stay."""
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 1] = mask[2, 2] = True  # caption 1 is true of image 0; a diagonal entry is ignored
    loss, logits = itc_loss(img, txt, torch.tensor(0.0), mask)  # scale 1: logits = cosine similarities
    s = img @ txt.t()
    torch.testing.assert_close(logits, s)  # returned unmasked (hard-negative mining masks on its own)

    def ce(row: list[float], target: int) -> float:
        return -row[target] + math.log(sum(math.exp(v) for v in row))

    r = s.tolist()
    i2t = (ce([r[0][0], r[0][2]], 0) + ce(r[1], 1) + ce(r[2], 2)) / 3  # image 0 without caption 1
    col = s.t().tolist()
    t2i = (ce(col[0], 0) + ce([col[1][1], col[1][2]], 0) + ce(col[2], 2)) / 3  # caption 1 without image 0
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    plain, _ = itc_loss(img, txt, torch.tensor(0.0))
    assert plain.item() != pytest.approx(loss.item(), abs=1e-4)


def test_hard_negatives_skip_captions_the_corpus_knows_are_true(monkeypatch: pytest.MonkeyPatch) -> None:
    """With loss.false_negatives=exclude, the candidates an ITM negative is drawn from leave out every caption
    true of the image (negative texts) and every image the caption is true of (negative images), besides the
    positive and identical captions; without it, only the latter."""
    from vlmerge.pretrain import losses
    from vlmerge.pretrain.losses import ObjectiveSettings, PretrainObjective

    seen: list[torch.Tensor] = []
    real = losses.sample_hard_negatives

    def spy(logits: torch.Tensor, excluded: torch.Tensor, generator: torch.Generator):  # type: ignore[no-untyped-def]
        seen.append(excluded.clone())
        return real(logits, excluded, generator)

    monkeypatch.setattr(losses, "sample_hard_negatives", spy)
    torch.manual_seed(0)
    model = VLMo(preset_config("micro", "msa", vocab_size=40, num_vl_layers=2, heads=("itc", "itm", "mlm")))
    b = 6
    rel = torch.zeros(10, 20, dtype=torch.bool)  # 10 images x 20 pairs of a made-up corpus
    image_id, pair_id = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 3, 6, 9, 12, 15])
    rel[image_id, pair_id] = True  # each caption is true of its own image
    rel[0, 9] = rel[4, 0] = rel[2, 3] = True  # ... and a few of other images (asymmetric on purpose)
    ids = torch.full((b, 5), 0, dtype=torch.long)
    ids[:, 0], ids[:, 1], ids[:, 2] = 1, torch.arange(4, 4 + b), 2
    ids[5, 1] = ids[4, 1]  # pairs 4 and 5 have identical captions
    batch = {"image": torch.rand(b, 3, 16, 16, generator=gen(1)), "input_ids": ids,
             "attention_mask": (ids != 0).long(), "image_id": image_id, "pair_id": pair_id}
    same = torch.eye(b, dtype=torch.bool)
    same[4, 5] = same[5, 4] = True
    for mode in ("keep", "exclude"):
        seen.clear()
        settings = ObjectiveSettings(exclude_false_negatives=mode == "exclude")
        obj = PretrainObjective(model, "vl", settings, SpecialTokens(0, 1, 2, 3, 40), (0.5,) * 3, (0.5,) * 3, rel)
        obj(batch, gen(2))
        txt_excluded, img_excluded = seen
        want_txt, want_img = same.clone(), same.clone()
        if mode == "exclude":
            want_txt[0, 3] = want_txt[4, 0] = want_txt[2, 1] = True  # image i: caption j true of it
            want_img[3, 0] = want_img[0, 4] = want_img[1, 2] = True  # caption i: image j it is true of
        assert torch.equal(txt_excluded, want_txt), mode
        assert torch.equal(img_excluded, want_img), mode
    with pytest.raises(ValueError, match="false_negatives=exclude needs a corpus"):
        PretrainObjective(model, "vl", ObjectiveSettings(exclude_false_negatives=True), SpecialTokens(0, 1, 2, 3, 40),
                          (0.5,) * 3, (0.5,) * 3)


def test_the_engine_excludes_false_negatives_on_the_world_and_refuses_a_corpus_without_truth(tmp_path) -> None:
    """loss.false_negatives=exclude trains on the embedded world (its train split knows every caption's meaning)
    and changes the weights; a corpus without ``relevance()`` is refused before the run folder exists."""
    from pretrain_toy import toy_data

    from vlmerge.models import load_model
    from vlmerge.pretrain import load_config, pretrain

    sets = ["train.steps=3", "data.train_images=24", "data.eval_images=4", "train.batch_size=8",
            "train.log_every=1", "optim.warmup_steps=1", "train.device=cpu", "recipe={name: scratch}"]
    keep = pretrain(load_config("micro", sets), tmp_path / "keep", progress=False)
    excl = pretrain(load_config("micro", [*sets, "loss.false_negatives=exclude"]), tmp_path / "excl", progress=False)
    a, b = load_model(keep).state_dict(), load_model(excl).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same init, data and draws: only the negatives differ
    with pytest.raises(ValueError, match="false_negatives=exclude needs a train set that knows"):
        pretrain(load_config("micro", [*sets, "loss.false_negatives=exclude"]), tmp_path / "toy", data=toy_data(),
                 progress=False)
    assert not (tmp_path / "toy").exists()
