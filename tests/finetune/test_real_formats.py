"""Every task fine-tunes and evaluates on real-format data read from tiny files written here (Karpathy JSON,
VQA v2, NLVR2 JSONL, an ImageNet-style folder, an ADE20k-style folder) through ``data.format`` / ``data.root``.

Only the plumbing is checked (the loaders' own parsing is tested with :mod:`vlmerge.data`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vlmerge.finetune import evaluate, finetune
from vlmerge.finetune.tasks import nlvr2 as nlvr2_task
from vlmerge.finetune.tasks import retrieval as retrieval_task
from vlmerge.finetune.tasks import vision as vision_task
from vlmerge.finetune.tasks import vqa as vqa_task

COLORS = [(220, 40, 40), (40, 80, 230), (40, 170, 60), (240, 215, 40)]


def image(path: Path, k: int, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((size, size, 3), dtype=np.uint8) + 90
    a[4:16, 4 + k % 3:14 + k % 3] = COLORS[k % 4]
    Image.fromarray(a).save(path)


def karpathy(root: Path) -> Path:
    entries = []
    for i in range(8):
        split = "train" if i < 5 else "test"
        image(root / "val2014" / f"im{i}.jpg", i)
        entries.append({"split": split, "filepath": "val2014", "filename": f"im{i}.jpg", "cocoid": 100 + i,
                        "sentences": [{"raw": f"a {c} square"} for c in (f"colour {i}", f"thing {i}")]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    return root


def vqa2(root: Path) -> Path:
    for split, n in (("train", 6), ("val", 4)):
        qs, anns = [], []
        for i in range(n):
            image(root / f"{split}2014" / f"COCO_{split}2014_{i:012d}.jpg", i)
            answer = ["red", "blue", "green", "yellow"][i % 4]
            qs.append({"question_id": 10 * i + 1, "image_id": i, "question": "what color is the square?"})
            anns.append({"question_id": 10 * i + 1, "image_id": i, "multiple_choice_answer": answer,
                         "answers": [{"answer": answer}] * 8 + [{"answer": "red"}] * 2})
        (root / f"v2_OpenEnded_mscoco_{split}2014_questions.json").write_text(json.dumps({"questions": qs}))
        (root / f"v2_mscoco_{split}2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    return root


def nlvr2(root: Path) -> Path:
    for split, file, n in (("train", "train.json", 6), ("dev", "dev.json", 4)):
        lines = []
        for i in range(n):
            for k in (0, 1):
                image(root / "images" / split / f"{split}-{i}-0-img{k}.png", i + k)
            lines.append(json.dumps({"identifier": f"{split}-{i}-0-0", "sentence": "both squares are red",
                                     "label": "True" if i % 2 else "False"}))
        (root / file).write_text("\n".join(lines) + "\n")
    return root


def imagefolder(root: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(n):
                image(root / split / name / f"{i}.png", 2 * c + i)
    return root


def segfolder(root: Path) -> Path:
    for split, n in (("training", 4), ("validation", 3)):
        for i in range(n):
            image(root / "images" / split / f"ADE_{i}.jpg", i)
            mask = np.zeros((20, 20), dtype=np.uint8)  # 0 = "other": ignored after reduce_zero_label
            mask[2:18, 2:18] = 1
            mask[4:16, 4:14] = 2 + i % 2
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "annotations" / split / f"ADE_{i}.png")
    return root


CASES = {  # task: (format, writer, eval split, headline key)
    "retrieval": ("karpathy", karpathy, "test", "r_mean"),
    "vqa": ("vqa2", vqa2, "val", "vqa_score"),
    "nlvr2": ("nlvr2", nlvr2, "val", "accuracy"),
    "cls": ("imagefolder", imagefolder, "val", "top1"),
    "seg": ("segfolder", segfolder, "val", "miou"),
}


# --------------------------------------------------------------------------- oracles of the headline metrics
# Each evaluation is recorded (the head's logits and the batch it scored, or the retrieval embeddings) and its
# headline recomputed here by hand from those predictions and the labels the files above define.
HEAD_TASKS = {"vqa": vqa_task.VQA, "nlvr2": nlvr2_task.NLVR2, "cls": vision_task.Classification,
              "seg": vision_task.Segmentation}


def record_evaluation(task: str, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Per batch (logits, batch) for the head tasks; the split's encoding for retrieval."""
    seen: list[Any] = []
    if task == "retrieval":
        encode = retrieval_task.encode_split

        def encoding(*args: Any, **kwargs: Any) -> dict[str, Any]:
            seen.append(encode(*args, **kwargs))
            return seen[-1]

        monkeypatch.setattr(retrieval_task, "encode_split", encoding)
        return seen
    cls = HEAD_TASKS[task]
    logits = cls.logits

    def recording(model: Any, batch: Any) -> torch.Tensor:
        out = logits(model, batch)
        seen.append((out.detach(), batch))
        return out

    monkeypatch.setattr(cls, "logits", staticmethod(recording))
    return seen


def preds_and(seen: list[Any], label: str) -> tuple[list[int], list[Any]]:
    return ([int(a) for lg, _ in seen for a in lg.argmax(1)],
            [x.tolist() for _, b in seen for x in b[label]])


def vqa_oracle(seen: list[Any], res: dict[str, Any]) -> float:
    answers, soft = preds_and(seen, "target")
    # the val questions: 8 annotators gave the square's colour and 2 "red" -> soft scores 1 and min(1, 2/3)
    assert sorted(sorted((round(v, 4) for v in row), reverse=True) for row in soft) == \
        [[1.0, 0.0, 0.0, 0.0]] + [[1.0, 0.6667, 0.0, 0.0]] * 3
    return 100 * sum(row[a] for a, row in zip(answers, soft, strict=True)) / len(answers)


def accuracy_oracle(seen: list[Any], res: dict[str, Any]) -> float:
    pred, label = preds_and(seen, "label")
    assert sorted(label) == [0, 0, 1, 1]  # NLVR2 dev: False, True, False, True; val: 2 cats (0), 2 dogs (1)
    return 100 * sum(p == t for p, t in zip(pred, label, strict=True)) / len(label)


def miou_oracle(seen: list[Any], res: dict[str, Any]) -> float:
    pred = torch.cat([lg.argmax(1) for lg, _ in seen])
    mask = torch.cat([b["mask"] for _, b in seen])
    valid = mask != 255
    assert set(mask[valid].unique().tolist()) == {0, 1, 2}  # labels 1..3 of the files, reduced by one
    ious: list[float | None] = []
    for c in range(seen[0][0].shape[1]):
        tp = int(((pred == c) & (mask == c) & valid).sum())
        fp = int(((pred == c) & (mask != c) & valid).sum())
        fn = int(((pred != c) & (mask == c) & valid).sum())
        ious.append(100 * tp / (tp + fp + fn) if tp + fp + fn else None)
    assert res["iou"] == pytest.approx(ious)
    present = [v for v in ious if v is not None]
    return sum(present) / len(present)


def recall_oracle(seen: list[Any], res: dict[str, Any]) -> float:
    enc = seen[-1]
    owner, texts = enc["txt2img"].tolist(), enc["texts"]
    # captions "a colour {i} square" / "a thing {i} square" of test image i: its two texts share an owner
    assert len({(o, t.split()[2]) for o, t in zip(owner, texts, strict=True)}) == len(set(owner)) == 3
    assert res["relevance"] == "owner"
    sim = (enc["img"] @ enc["txt"].t()).tolist()
    n_img, n_txt = len(sim), len(texts)
    rec: dict[str, float] = {}
    for k in (1, 5, 10):
        tr = [any(owner[t] == i for t in sorted(range(n_txt), key=lambda t: -sim[i][t])[:k]) for i in range(n_img)]
        ir = [owner[t] in sorted(range(n_img), key=lambda i: -sim[i][t])[:k] for t in range(n_txt)]
        rec[f"tr_r{k}"], rec[f"ir_r{k}"] = 100 * sum(tr) / n_img, 100 * sum(ir) / n_txt
    assert res["tr_r1"] == pytest.approx(rec["tr_r1"]) and res["ir_r1"] == pytest.approx(rec["ir_r1"])
    return sum(rec.values()) / len(rec)  # = (Avg TR + Avg IR) / 2


ORACLES: dict[str, Callable[[list[Any], dict[str, Any]], float]] = {
    "retrieval": recall_oracle, "vqa": vqa_oracle, "nlvr2": accuracy_oracle, "cls": accuracy_oracle,
    "seg": miou_oracle,
}


@pytest.mark.parametrize("task", list(CASES))
def test_finetune_and_evaluate_on_real_format_files(task: str, pretrained: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fmt, write, split, key = CASES[task]
    root = write(tmp_path / fmt)
    sets = [f"data.format={fmt}", f"data.root={root}", f"data.eval_split={split}", "max_steps=2", "batch_size=4",
            "eval_batch_size=3"]
    out = finetune(task, pretrained, tmp_path / "out", sets=sets)
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == split and m["score"] == m[key] and key in m["baseline"]
    seen = record_evaluation(task, monkeypatch)
    again = evaluate(task, out, split)  # the saved config remembers the data source
    assert again["score"] == pytest.approx(m["score"])
    assert again[key] == pytest.approx(ORACLES[task](seen, again), abs=1e-9)
    if task == "vqa":
        assert m["n"] == 4 and json.loads((out / "config.json").read_text())["model"]["num_answers"] == 4
    if task == "cls":
        assert m["n"] == 4 and m["baseline"]["top1"] == 50.0
    if task == "seg":
        assert len(m["iou"]) == 3  # labels 1..3 reduced to 0..2; 0 ignored
    if task == "retrieval":
        assert (m["n_images"], m["n_texts"]) == (3, 6)


def test_zero_shot_on_karpathy_files(pretrained: Path, tmp_path: Path) -> None:
    root = karpathy(tmp_path / "coco")
    sets = ["data.format=karpathy", f"data.root={root}"]
    r = evaluate("retrieval", pretrained, "test", sets=[*sets, "rerank_k=2"])
    assert (r["n_images"], r["n_texts"]) == (3, 6) and "rerank" in r
    assert r["baseline"]["ir_r1"] == pytest.approx(100 / 3)
    itm = evaluate("itm", pretrained, "test", sets=sets)
    assert itm["n_pairs"] == 12


def test_format_must_fit_the_task(pretrained: Path, tmp_path: Path) -> None:
    root = imagefolder(tmp_path / "inet")
    with pytest.raises(ValueError, match=r"data.format='imagefolder' does not fit task 'vqa'"):
        finetune("vqa", pretrained, tmp_path / "o", sets=["data.format=imagefolder", f"data.root={root}"])
    with pytest.raises(FileNotFoundError):
        evaluate("cls", pretrained, "val", sets=["data.format=imagefolder", f"data.root={tmp_path / 'nope'}"])
