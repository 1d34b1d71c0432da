"""Every task fine-tunes and evaluates on real-format data read from tiny files written here (Karpathy JSON,
VQA v2, NLVR2 JSONL, an ImageNet-style folder, an ADE20k-style folder) through ``data.format`` / ``data.root``.

Only the plumbing is checked (the loaders' own parsing is tested with :mod:`vlmerge.data`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmerge.finetune import evaluate, finetune

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


@pytest.mark.parametrize("task", list(CASES))
def test_finetune_and_evaluate_on_real_format_files(task: str, pretrained: Path, tmp_path: Path) -> None:
    fmt, write, split, key = CASES[task]
    root = write(tmp_path / fmt)
    sets = [f"data.format={fmt}", f"data.root={root}", f"data.eval_split={split}", "max_steps=2", "batch_size=4",
            "eval_batch_size=3"]
    out = finetune(task, pretrained, tmp_path / "out", sets=sets)
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == split and 0 <= m[key] <= 100 and key in m["baseline"]
    again = evaluate(task, out, split)  # the saved config remembers the data source
    assert again["score"] == pytest.approx(m["score"])
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
