"""Every task fine-tunes from the short-pretrained micro MSA and beats its baseline on the embedded test split;
zero-shot evaluation; rerank; vision-only fine-tuning leaves language and VL weights bit-identical.

Classification trains on the world's single-object, untextured setting with objects at twice their size
(``data.world``, ``size_scale: 2``): at 32 px a small object is ~8 px across, one 8-px patch, and a 2-layer
width-32 ViT sits at chance (train loss ln 8) for 1000+ steps before it starts telling such shapes apart,
whatever the lr, head multiplier or scope; twice the size it learns them in a few hundred steps.
Segmentation uses the same scale on the full world (twice the margin at half the steps). The full-size
world's classification is left to the study's runs.

Every task reads its scenes from a shard cache shared by the module (``data.cache_dir``): they cycle their
training split for many epochs, and rendering, not the model, dominated their cost.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from vlmerge.finetune import evaluate, finetune, zero_shot
from vlmerge.finetune.api import _prep, checkpoint_extras, make_config
from vlmerge.finetune.config import DataConfig
from vlmerge.finetune.data import embedded_dataset, load_split, tokenizer_from_config
from vlmerge.finetune.tasks import retrieval as retrieval_task
from vlmerge.finetune.tasks import vqa as vqa_task
from vlmerge.models import load_model, parse_param_name

SIMPLE_WORLD = "data.world={max_objects: 1, rotation: false, texture: false, noise: 0, size_scale: 2}"
# Per task: settings (over the micro preset) and the margin over the baseline the test split must show.
SETTINGS: dict[str, tuple[list[str], float]] = {
    "retrieval": (["data.train_size=300", "data.eval_size=100", "max_steps=60", "itm_weight=1"], 5.0),
    "vqa": (["data.train_size=400", "data.eval_size=100", "max_steps=200", "lr=1e-3", "batch_size=64"], 8.0),
    "nlvr2": (["data.train_size=1000", "data.eval_size=300", "max_steps=200", "lr=1e-3", "batch_size=32"], 8.0),
    "cls": (["data.train_size=2000", "data.eval_size=400", "max_steps=600", "lr=2e-3", "batch_size=32",
             SIMPLE_WORLD], 6.0),
    "seg": (["data.train_size=1500", "data.eval_size=300", "max_steps=300", "lr=2e-3", "batch_size=32",
             "data.world={size_scale: 2}"], 3.0),
}


@pytest.fixture(scope="module")
def finetuned(pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """task -> its fine-tuned checkpoint (each task fine-tuned once per module)."""
    done: dict[str, Path] = {}
    cache = tmp_path_factory.mktemp("scenes")

    def get(task: str) -> Path:
        if task not in done:
            done[task] = finetune(task, pretrained, tmp_path_factory.mktemp(f"ft-{task}") / "out",
                                  sets=[*SETTINGS[task][0], f"data.cache_dir={cache}"])
        return done[task]

    return get


def test_cached_datasets_match_rendering_on_the_fly(tmp_path: Path) -> None:
    """``cache_dir`` changes where items come from, never what they are; NLVR2 examples and overridden
    worlds get caches of their own, so one folder serves every task."""
    for task, world in (("vqa", None), ("nlvr2", None), ("seg", {"size_scale": 2}), ("cls", None)):
        fresh = embedded_dataset(task, "val", 6, seed=3, image_size=16, world=world)
        cached = embedded_dataset(task, "val", 6, seed=3, image_size=16, world=world, cache_dir=tmp_path)
        assert len(cached) == len(fresh)
        for i in (0, len(fresh) - 1):
            a, b = fresh[i], cached[i]
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], (task, k)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and "val-16px-seed3" in names and "val-16px-seed3-nlvr2" in names, names
    split = load_split("vqa", "val", DataConfig(eval_size=6, world_seed=3, cache_dir=str(tmp_path)), 16)
    assert split.base.source.dir == tmp_path / "val-16px-seed3"  # the config's cache_dir reaches the dataset


def metrics(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("task", list(SETTINGS))
def test_task_beats_its_baseline_on_the_test_split(task: str, finetuned: Callable[[str], Path]) -> None:
    out = finetuned(task)
    m = metrics(out)
    key = {"retrieval": "r_mean", "vqa": "vqa_score", "nlvr2": "accuracy", "cls": "top1", "seg": "miou"}[task]
    assert m["task"] == task and m["split"] == "test" and m["score"] == m[key]
    assert m[key] >= m["baseline"][key] + SETTINGS[task][1], (task, m[key], m["baseline"])
    model = load_model(out)  # a normal checkpoint, with the task's head and the record of the run
    assert task in model.config.heads or task == "retrieval"
    record = json.loads((out / "config.json").read_text())["finetune"]
    assert record["task"] == task and record["metrics"]["score"] == m["score"] and record["train"]["steps"] > 0
    assert "tokenizer" in json.loads((out / "config.json").read_text())


def test_evaluate_reloads_a_checkpoint_and_scores_the_ood_split(finetuned: Callable[[str], Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = finetuned("vqa")
    again = evaluate("vqa", out, "test")  # the data settings it was fine-tuned with
    assert again["score"] == pytest.approx(metrics(out)["score"], abs=1e-6)
    # record the answers the model gives and the questions' soft scores, to recompute the score by hand
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    logits = vqa_task.VQA.logits

    def recording(model: Any, batch: Any) -> torch.Tensor:
        lg = logits(model, batch)
        seen.append((lg.argmax(1), batch["target"]))
        return lg

    monkeypatch.setattr(vqa_task.VQA, "logits", staticmethod(recording))
    ood = evaluate("vqa", out, "ood")
    assert ood["split"] == "ood" and ood["n"] == 500
    answers = [int(a) for pred, _ in seen for a in pred]
    soft = [row.tolist() for _, target in seen for row in target]
    assert len(answers) == len(soft) == 500
    assert {round(3 * v, 6) for row in soft for v in row} <= {0, 1, 2, 3}  # VQA v2 soft scores: min(1, k / 3)
    oracle = 100 * sum(row[a] for a, row in zip(answers, soft, strict=True)) / len(answers)
    assert ood["score"] == pytest.approx(oracle, abs=1e-9)


def test_vision_only_finetune_leaves_language_and_vl_weights_bit_identical(
        pretrained: Path, finetuned: Callable[[str], Path]) -> None:
    before = load_file(str(pretrained / "model.safetensors"))
    for task in ("cls", "seg"):
        after = load_file(str(finetuned(task) / "model.safetensors"))
        assert json.loads((finetuned(task) / "config.json").read_text())["finetune"]["scope"] == "vision"
        frozen = [k for k in before if parse_param_name(k).expert in ("l", "vl")
                  or k.startswith(("word_embed", "text_pos_embed", "type_embed", "norm.", "heads."))]
        assert any(parse_param_name(k).expert == "vl" for k in frozen)
        assert any(k.startswith("heads.itm") for k in frozen)
        for k in frozen:
            assert torch.equal(before[k], after[k]), f"{task}: {k} changed"
        changed = [k for k in before if parse_param_name(k).expert == "v" and not torch.equal(before[k], after[k])]
        assert changed and not torch.equal(before["patch_embed.proj.weight"], after["patch_embed.proj.weight"])


def test_itc_only_retrieval_never_touches_weights_it_does_not_use(pretrained: Path, tmp_path: Path) -> None:
    out = finetune("retrieval", pretrained, tmp_path / "r", sets=["max_steps=3", "data.train_size=40",
                                                                  "data.eval_size=20"])
    before, after = load_file(str(pretrained / "model.safetensors")), load_file(str(out / "model.safetensors"))
    untouched = [k for k in before if parse_param_name(k).expert == "vl" or k.startswith(("heads.itm", "heads.mlm"))]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)
    assert not torch.equal(before["heads.itc.text_proj.weight"], after["heads.itc.text_proj.weight"])
    assert json.loads((out / "config.json").read_text())["finetune"]["train"]["frozen_unreached"] > 0


def test_zero_shot_retrieval_and_itm(pretrained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    margins: list[torch.Tensor] = []  # the ITM head's log-odds of "matched", call by call
    itm_margin = retrieval_task.itm_margin

    def recording(m: Any, image: torch.Tensor, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        out = itm_margin(m, image, ids, att)
        margins.append(out)
        return out

    monkeypatch.setattr(retrieval_task, "itm_margin", recording)
    res = zero_shot(pretrained, "test", sets=["data.eval_size=50"])
    r, itm = res["retrieval"], res["itm"]
    assert r["n_images"] == 50 and r["n_texts"] == 250
    # chance of a random ranking for the world's truthful relevance: a caption is relevant to every scene it is
    # true of, so IR R@1 chance is the mean share of the 50 scenes each caption describes (2.0 for one each)
    from vlmerge.finetune.data import embedded_dataset

    rel = embedded_dataset("retrieval", "test", 50).relevance()
    assert r["relevance"] == "truthful" and r["baseline"]["kind"] == "chance"
    assert r["baseline"]["ir_r1"] == pytest.approx(100 * rel.sum(axis=0).mean() / 50) and rel.sum() > 250
    assert r["r_mean"] > r["baseline"]["r_mean"]  # pre-training alone already beats chance
    assert itm["n_pairs"] == 500 and itm["baseline"]["accuracy"] == 50.0
    # oracle from the recorded margins: each batch scores its items' positive pairs, then their negatives; a
    # positive is right when the margin is > 0, a negative when it is <= 0
    pos, neg = torch.cat(margins[0::2]).tolist(), torch.cat(margins[1::2]).tolist()
    assert len(pos) == len(neg) == 250
    pos_acc, neg_acc = 100 * sum(x > 0 for x in pos) / 250, 100 * sum(x <= 0 for x in neg) / 250
    assert itm["pos_acc"] == pytest.approx(pos_acc) and itm["neg_acc"] == pytest.approx(neg_acc)
    assert itm["accuracy"] == pytest.approx((pos_acc + neg_acc) / 2)
    # a head that calls every pair "matched" is right on all positives and no negative: exactly 50 %
    monkeypatch.setattr(retrieval_task, "itm_margin", lambda m, image, ids, att: torch.ones(len(ids)))
    always = evaluate("itm", pretrained, "test", sets=["data.eval_size=50"])
    assert (always["pos_acc"], always["neg_acc"], always["accuracy"]) == (100.0, 0.0, 50.0)
    with pytest.raises(ValueError, match="no 'vqa' head"):
        evaluate("vqa", pretrained, "test", sets=["data.eval_size=5"])


def test_rerank_with_an_oracle_itm_turns_recall_at_k_into_recall_at_1(
        finetuned: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A case built to need the rerank: the dual encoder's R@1 is low, a perfect ITM (an oracle that knows
    which image each candidate pixel tensor and text is) must lift R@1 to exactly the dual encoder's R@k,
    which also checks that the rerank fetches the right pixels and texts for each candidate."""
    out = finetuned("retrieval")
    model = load_model(out)

    world = embedded_dataset("retrieval", "test", 40, image_size=model.config.image_size)
    items = [world[i] for i in range(len(world))]
    counts = Counter(it["text"] for it in items)
    ds = [it for it in items if counts[it["text"]] == 1]  # identical captions are beyond any ITM
    owner_of_pixels: dict[bytes, int] = {}
    owner_of_text: dict[bytes, int] = {}
    extras = checkpoint_extras(out)
    prep = _prep(make_config("retrieval", out), model, extras, tokenizer_from_config(extras["tokenizer"]))
    for item in ds:
        owner_of_pixels[prep.images([item["image"]])[0].numpy().tobytes()] = item["image_id"]
        owner_of_text[prep.texts([item["text"]])[0][0].numpy().tobytes()] = item["image_id"]

    def oracle(m: Any, image: torch.Tensor, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        def owner(x: torch.Tensor, table: dict[bytes, int]) -> int:
            return table[x.cpu().numpy().tobytes()]

        return torch.tensor([float(owner(x, owner_of_pixels) == owner(t, owner_of_text))
                             for x, t in zip(image, ids, strict=True)])

    monkeypatch.setattr(retrieval_task, "itm_margin", oracle)
    for k in (1, 5):
        res = evaluate("retrieval", out, "test", sets=[f"rerank_k={k}"], dataset=ds)
        rr = res["rerank"]
        assert rr["tr_r1"] == pytest.approx(res[f"tr_r{k}"]) and rr["ir_r1"] == pytest.approx(res[f"ir_r{k}"])
        assert rr["tr_r1"] >= res["tr_r1"] and rr["ir_r1"] >= res["ir_r1"]  # never lowers R@1
        assert rr["tr_r10"] >= res["tr_r10"] - 1e-9  # candidates beyond k keep their order
    assert res["rerank"]["tr_r1"] > res["tr_r1"]  # the case needs it: the oracle fixes some misses


def test_rerank_needs_an_itm_head(pretrained: Path, tmp_path: Path) -> None:
    out = finetune("retrieval", pretrained, tmp_path / "r", sets=["max_steps=1", "data.train_size=20",
                                                                  "data.eval_size=10"])
    model = load_model(out)
    del model.heads["itm"]
    with pytest.raises(ValueError, match="needs the model's 'itm' head"):
        evaluate("retrieval", model, "test", sets=["rerank_k=3", "data.eval_size=10"])


def test_finetune_at_another_resolution_with_randaugment(pretrained: Path, tmp_path: Path) -> None:
    out = finetune("cls", pretrained, tmp_path / "c48", sets=["image_size=48", "augment_ops=2", "max_steps=2",
                                                              "data.train_size=16", "data.eval_size=8"])
    model = load_model(out)
    assert model.config.image_size == 48 and model.image_pos_embed.shape[1] == 1 + 36
    assert metrics(out)["n"] == 8
