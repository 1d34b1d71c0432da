"""The one retrieval evaluator: a hand-computed case with ties and duplicate captions, chance levels, the
world's truthful relevance, and the same numbers from pre-training, ``vlmerge eval`` and fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmerge.data import ImageTextDataset, World, WorldConfig
from vlmerge.data.world import Meaning, Obj, caption_relevance
from vlmerge.pretrain.evaluate import (
    evaluate_retrieval,
    owner_relevance,
    retrieval_chance,
    retrieval_metrics,
    retrieval_ranks,
)

# 3 images, 4 texts: t0 "a red circle" (image 0), t1 "two shapes" (image 0), t2 "two shapes" (image 1: the
# same string as t1), t3 "a blue star" (image 2).
TEXTS = ["a red circle", "two shapes", "two shapes", "a blue star"]
OWNER = [0, 0, 1, 2]
SIM = torch.tensor([[0.9, 0.5, 0.5, 0.9],   # image 0: its best text t0 ties with t3 (not its own) -> rank 2
                    [0.2, 0.6, 0.6, 0.1],   # image 1: t1 and t2 (both its string) top -> rank 1
                    [0.3, 0.3, 0.3, 0.3]])  # image 2: a constant scorer -> rank 4 (ties count against it)


def test_hand_computed_ranks_with_ties_and_duplicate_captions() -> None:
    rel = owner_relevance(OWNER, texts=TEXTS)
    assert rel.tolist() == [[True, True, True, False], [False, True, True, False], [False, False, False, True]]
    r = retrieval_ranks(SIM, rel)
    assert r["tr"].tolist() == [2, 1, 4]
    # IR: t0 -> image 0 first (1); t1, t2 -> image 1 (0.6) first, a match (1); t3 -> image 0 (0.9) above 2 (2).
    assert r["ir"].tolist() == [1, 1, 1, 2]
    m = retrieval_metrics(SIM, rel, ks=(1, 2))
    assert m["tr_r1"] == pytest.approx(100 / 3) and m["tr_r2"] == pytest.approx(200 / 3)
    assert m["ir_r1"] == pytest.approx(75.0) and m["ir_r2"] == pytest.approx(100.0)
    assert m["avg_tr"] == pytest.approx(50.0) and m["avg_ir"] == pytest.approx(87.5)
    assert m["r_mean"] == pytest.approx(68.75)
    # Owner relevance alone (t1 is not image 1's): image 1 now ties its own t2 with t1 -> rank 2.
    assert retrieval_ranks(SIM, torch.tensor(OWNER))["tr"].tolist() == [2, 2, 4]


def test_chance_is_hypergeometric_on_the_same_relevance() -> None:
    rel = owner_relevance(OWNER, texts=TEXTS)
    c = retrieval_chance(rel, ks=(1, 2))
    # TR: image 0 has 3 of 4 texts relevant, image 1 2 of 4, image 2 1 of 4.
    assert c["tr_r1"] == pytest.approx(100 * (3 / 4 + 2 / 4 + 1 / 4) / 3)
    assert c["tr_r2"] == pytest.approx(100 * (1 + (1 - 1 / 6) + (1 - 3 / 6)) / 3)
    # IR: t0 1 of 3 images, t1 and t2 2 of 3, t3 1 of 3.
    assert c["ir_r1"] == pytest.approx(50.0)
    g = torch.Generator().manual_seed(0)
    runs = [retrieval_metrics(torch.rand(3, 4, generator=g), rel, ks=(1, 2)) for _ in range(2000)]
    for key in ("tr_r1", "tr_r2", "ir_r1", "avg_ir"):
        assert np.mean([x[key] for x in runs]) == pytest.approx(c[key], abs=2.0)


def test_meanings_on_hand_made_scenes() -> None:
    red_circle = Obj("circle", "red", "large", 0.2, 0.5, 0.0)
    blue_star = Obj("star", "blue", "small", 0.8, 0.5, 0.0)
    scene = [red_circle, blue_star]
    assert Meaning("count", (2,)).holds(scene) and not Meaning("count", (1,)).holds(scene)
    assert Meaning("objects", (("", "blue", "star"), ("", "red", "circle"))).holds(scene)
    assert not Meaning("objects", (("", "red", "circle"),)).holds(scene)  # a listing is complete
    assert Meaning("objects", (("large", "red", "circle"), ("small", "blue", "star"))).holds(scene)
    assert not Meaning("objects", (("small", "blue", "star"), ("small", "red", "circle"))).holds(scene)
    assert Meaning("relation", (("", "red", "circle"), "left", ("", "blue", "star"))).holds(scene)
    assert not Meaning("relation", (("", "red", "circle"), "right", ("", "blue", "star"))).holds(scene)
    assert Meaning("colors", ("red", "blue")).holds(scene) and not Meaning("colors", ("red",)).holds(scene)
    assert Meaning("has", (("small", "blue", "star"),)).holds(scene)
    assert not Meaning("has", (("large", "blue", "star"),)).holds(scene)
    assert Meaning("position", (("", "blue", "star"), "right")).holds(scene)


@pytest.mark.parametrize("world", [WorldConfig(), WorldConfig(max_objects=2, shapes=("circle", "square"),
                                                               colors=("red", "blue", "white"), size_scale=2.0)])
def test_truthful_relevance_equals_testing_every_pair(world: WorldConfig) -> None:
    w = World(world, "test", seed=1)
    scenes = [w.content(i) for i in range(120)]
    assert all(m.holds(s.objects) for s in scenes for m in s.meanings)  # every caption is true of its scene
    meanings = [m for s in scenes for m in s.meanings]
    fast = caption_relevance(meanings, [s.objects for s in scenes])
    brute = np.array([[m.holds(s.objects) for s in scenes] for m in meanings])
    assert (fast == brute).all()
    assert fast.sum() > len(meanings) * 1.5  # generic captions describe many scenes


def test_world_relevance_reaches_the_evaluator_and_its_ceiling(tmp_path) -> None:
    ds = ImageTextDataset(World(split="test"), 40, cache_dir=tmp_path / "c")
    rel = torch.as_tensor(ds.relevance())
    assert rel.shape == (40, 200) and bool(rel[torch.arange(200) // 5, torch.arange(200)].all())
    # An oracle that scores a pair by its truth reaches 100 on every key.
    m = retrieval_metrics(rel.double(), rel)
    assert all(m[k] == 100.0 for k in ("tr_r1", "ir_r1", "avg_tr", "avg_ir", "r_mean"))


def test_pretrain_eval_and_finetune_report_the_same_retrieval(tmp_path) -> None:
    """``evaluate_retrieval`` (pre-training, the study) and the retrieval task (``vlmerge eval``, fine-tuning)
    give the same numbers on the same embeddings."""
    from vlmerge.data import default_tokenizer
    from vlmerge.finetune import evaluate
    from vlmerge.models import VLMo, preset_config, save_model

    tok = default_tokenizer()
    torch.manual_seed(0)
    model = VLMo(preset_config("micro", "msa", vocab_size=tok.vocab_size, heads=("itc",)))
    ckpt = tmp_path / "m"
    save_model(model, ckpt, tokenizer=tok.to_config())
    from vlmerge.finetune.data import embedded_dataset

    ds = embedded_dataset("retrieval", "test", 30, 0, model.config.image_size)
    ours = evaluate_retrieval(model, ds, tok)
    theirs = evaluate("retrieval", ckpt, "test", sets=["data.eval_size=30"])
    assert ours["relevance"] == theirs["relevance"] == "truthful"
    for key in ("tr_r1", "tr_r5", "ir_r10", "avg_tr", "avg_ir", "r_mean"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-9), key
