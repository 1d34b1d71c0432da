"""Real-format loaders (Karpathy JSON, VQA v2, NLVR2 JSONL, class folders, ADE20k-style folders) on tiny
fixtures written in the exact on-disk formats, their error messages, and the torch dataset wrapper."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlmerge.data.datasets import Collate
from vlmerge.data.formats import (
    IGNORE_INDEX,
    CaptionRecord,
    ClassRecord,
    FileImageDataset,
    NLVR2Record,
    SegRecord,
    VQARecord,
    build_answer_vocab,
    coco_image_split,
    load_image,
    load_image_folder,
    load_karpathy,
    load_mask,
    load_nlvr2,
    load_segmentation_folder,
    load_task_dataset,
    load_vqa_v2,
    normalize_answer,
    soft_target,
    vqa_soft_scores,
)


# ------------------------------------------------------------------------------------------------ fixtures
def _image(path: Path, color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (12, 9)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _mask(path: Path, values: np.ndarray, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(values.astype(np.uint8), mode="L")
    if mode == "P":
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    elif mode == "RGB":
        img = img.convert("RGB")
    img.save(path)
    return path


def _json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _sent(raw: str, sentid: int) -> dict[str, Any]:
    return {"tokens": raw.lower().strip(" .").split(), "raw": raw, "imgid": 0, "sentid": sentid}


def _coco_karpathy(path: Path) -> Path:
    images = [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "imgid": 0, "split": "test",
         "sentids": [0, 1], "cocoid": 42,
         "sentences": [_sent("A cat on a mat. ", 0), _sent("A sleepy cat.", 1)]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000007.jpg", "imgid": 1, "split": "train",
         "sentids": [2], "cocoid": 7, "sentences": [_sent("Two dogs play.", 2)]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000009.jpg", "imgid": 2, "split": "restval",
         "sentids": [3], "cocoid": 9, "sentences": [_sent("A red bus.", 3)]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000011.jpg", "imgid": 3, "split": "val",
         "sentids": [4], "cocoid": 11, "sentences": [_sent("A tree.", 4)]},
    ]
    return _json(path, {"images": images, "dataset": "coco"})


# -------------------------------------------------------------------------------------------------- Karpathy
def test_karpathy_coco_splits_paths_captions_ids(tmp_path: Path) -> None:
    js = _coco_karpathy(tmp_path / "dataset_coco.json")
    test = load_karpathy(js, tmp_path / "coco", "test")
    assert test == [CaptionRecord(tmp_path / "coco/val2014/COCO_val2014_000000000042.jpg",
                                  ["A cat on a mat.", "A sleepy cat."], 42)]
    train = load_karpathy(js, tmp_path / "coco", "train")  # restval counts as train
    assert [r.image_id for r in train] == [7, 9]
    assert [r.image_id for r in load_karpathy(js, tmp_path / "coco", "restval")] == [9]
    assert [r.captions for r in load_karpathy(js, tmp_path, "val")] == [["A tree."]]
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000011.jpg"):
        load_karpathy(js, tmp_path, "val", check_files=True)


def test_karpathy_flickr_has_no_filepath_and_uses_imgid(tmp_path: Path) -> None:
    images = [{"filename": "1000092795.jpg", "imgid": 5, "split": "test", "sentids": [0],
               "sentences": [_sent("Two young guys with shaggy hair .", 0)]}]
    js = _json(tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    (rec,) = load_karpathy(js, tmp_path / "flickr30k-images", "test")
    assert rec == CaptionRecord(tmp_path / "flickr30k-images/1000092795.jpg",
                                ["Two young guys with shaggy hair ."], 5)


def test_karpathy_rejects_malformed_files(tmp_path: Path) -> None:
    data = json.loads(_coco_karpathy(tmp_path / "ok.json").read_text())
    del data["images"][3]["sentences"]
    bad = _json(tmp_path / "dataset_coco.json", data)
    with pytest.raises(ValueError, match=r"dataset_coco\.json: images\[3\] lacks 'sentences'"):
        load_karpathy(bad, tmp_path, "train")  # every entry is validated, not only the requested split
    data["images"][3]["sentences"] = [{"tokens": ["a"]}]
    with pytest.raises(ValueError, match=r"images\[3\]\.sentences\[0\] lacks 'raw'"):
        load_karpathy(_json(bad, data), tmp_path, "val")
    data["images"][3].update(sentences=[_sent("x", 0)], split="dev")
    with pytest.raises(ValueError, match=r"images\[3\]: 'split' must be one of .*got 'dev'"):
        load_karpathy(_json(bad, data), tmp_path, "val")
    with pytest.raises(ValueError, match="expected a JSON object with a 'images' list"):
        load_karpathy(_json(bad, [1, 2]), tmp_path, "val")
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"dataset_coco\.json: not valid JSON"):
        load_karpathy(bad, tmp_path, "val")
    with pytest.raises(ValueError, match="unknown Karpathy split 'dev'"):
        load_karpathy(bad, tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_karpathy(tmp_path / "missing.json", tmp_path, "val")


# ---------------------------------------------------------------------------------------------------- VQA v2
def _answers(*texts: str) -> list[dict[str, Any]]:
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


def _vqa_files(tmp_path: Path, split: str = "val") -> tuple[Path, Path]:
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": f"{split}2014",
                 "license": {}, "questions": [
                     {"image_id": 42, "question": "How many dogs are there?", "question_id": 420},
                     {"image_id": 42, "question": "Is it sunny?", "question_id": 421},
                     {"image_id": 7, "question": "What color is the bus?", "question_id": 70}]}
    annotations = {"info": {}, "license": {}, "data_subtype": f"{split}2014", "annotations": [
        {"question_id": 420, "image_id": 42, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "3",
         "answers": _answers("3", "3", "three", "3", "Two", "2", "4", "3.", "3", "3")},
        {"question_id": 421, "image_id": 42, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "yes", "answers": _answers(*["yes"] * 9, "no")},
        {"question_id": 70, "image_id": 7, "question_type": "what color is the", "answer_type": "other",
         "multiple_choice_answer": "red", "answers": _answers(*["red"] * 4, *["Red!"] * 2, "dark red",
                                                               "the red", "orange", "maroon")}]}
    return (_json(tmp_path / f"v2_OpenEnded_mscoco_{split}2014_questions.json", questions),
            _json(tmp_path / f"v2_mscoco_{split}2014_annotations.json", annotations))


@pytest.mark.parametrize(("raw", "norm"), [
    ("Two", "2"), ("  The Dog. ", "dog"), ("3.5", "3.5"), ("1,000", "1000"), ("t-shirt", "t shirt"),
    ("yes!", "yes"), ("dont know", "don't know"), ("a man's hat", "man's hat"), ("none", "0"), ("the", ""),
])
def test_normalize_answer(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


def test_vqa_soft_scores_min3_and_official() -> None:
    given = ["2", "two", "1", "1", "1", "1", "3", "3", "3", "blue"]
    assert vqa_soft_scores(given) == pytest.approx({"2": 2 / 3, "1": 1.0, "3": 1.0, "blue": 1 / 3})
    assert vqa_soft_scores(given, "official") == pytest.approx({"2": 0.6, "1": 1.0, "3": 0.9, "blue": 0.3})
    with pytest.raises(ValueError, match="unknown VQA scoring 'max'"):
        vqa_soft_scores(given, "max")  # type: ignore[arg-type]


def test_vqa_v2_joins_questions_annotations_and_scores(tmp_path: Path) -> None:
    q, a = _vqa_files(tmp_path)
    _image(tmp_path / "images/val2014/COCO_val2014_000000000042.jpg")
    recs = load_vqa_v2(q, a, tmp_path / "images", "val2014")
    assert [r.question_id for r in recs] == [420, 421, 70]
    r = recs[0]
    assert r.image_path == tmp_path / "images/val2014/COCO_val2014_000000000042.jpg"  # the split sub-folder
    assert (r.question, r.image_id, r.answer_type, r.question_type) == ("How many dogs are there?", 42,
                                                                        "number", "how many")
    # "3" x7 (incl. "three", "3."), "2" x2 ("Two", "2") -> 2/3 under min(1, n/3), "4" x1 -> 1/3
    assert r.answers == pytest.approx({"3": 1.0, "2": 2 / 3, "4": 1 / 3})
    assert recs[2].answers == pytest.approx({"red": 1.0, "dark red": 1 / 3, "orange": 1 / 3, "maroon": 1 / 3})
    official = load_vqa_v2(q, a, tmp_path / "images", "val", scoring="official")
    assert official[0].answers["2"] == pytest.approx(0.6)
    assert load_vqa_v2(q, a, tmp_path / "elsewhere", "val")[0].image_path.parent == tmp_path / "elsewhere"
    unannotated = load_vqa_v2(q, None, tmp_path, "test-dev")
    assert unannotated[1].answers == {} and unannotated[1].multiple_choice_answer is None
    assert unannotated[1].image_path.name == "COCO_test2015_000000000042.jpg"
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000007.jpg"):
        load_vqa_v2(q, a, tmp_path / "images", "val", check_files=True)


def test_answer_vocab_and_soft_targets(tmp_path: Path) -> None:
    recs = load_vqa_v2(*_vqa_files(tmp_path), tmp_path, "val")
    recs.append(VQARecord(1, 1, tmp_path / "x.jpg", "q?", {"yes": 1.0, "no": 1 / 3}))  # no MCA: best answer
    assert build_answer_vocab(recs) == ["yes", "3", "red"]  # by frequency, ties alphabetical
    assert build_answer_vocab(recs, top_k=2) == ["yes", "3"]
    assert build_answer_vocab(recs, min_count=2) == ["yes"]
    vocab = ["3", "2", "red", "yes"]
    assert torch.allclose(soft_target(recs[0], vocab), torch.tensor([1.0, 2 / 3, 0.0, 0.0]))  # "4" dropped
    assert torch.equal(soft_target({"red": 0.5}, {"red": 1, "x": 0}), torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="no annotated answers"):
        build_answer_vocab(load_vqa_v2(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", None,
                                       tmp_path, "val"))
    with pytest.raises(ValueError, match="'yes' is listed more than once"):
        soft_target(recs[0], ["yes", "yes"])
    with pytest.raises(ValueError, match="must use each index 0 … n-1 exactly once"):
        soft_target(recs[0], {"yes": 0, "no": 2})


def test_vqa_v2_rejects_malformed_files(tmp_path: Path) -> None:
    q, a = _vqa_files(tmp_path)
    ann = json.loads(a.read_text())
    questions = json.loads(q.read_text())
    questions["questions"].append({"image_id": 3, "question": "Why?", "question_id": 17})
    _json(q, questions)
    with pytest.raises(ValueError, match=r"annotations\.json: question_id 17 has no annotation"):
        load_vqa_v2(q, a, tmp_path, "val")
    questions["questions"][-1] = {"image_id": 3, "question_id": 17}
    with pytest.raises(ValueError, match=r"questions\.json: questions\[3\] lacks 'question'"):
        load_vqa_v2(_json(q, questions), a, tmp_path, "val")
    questions["questions"][-1] = {"image_id": "3", "question": "Why?", "question_id": 17}
    with pytest.raises(ValueError, match=r"questions\[3\]: 'image_id' must be an integer, got '3'"):
        load_vqa_v2(_json(q, questions), a, tmp_path, "val")
    ann["annotations"][1]["answers"][4] = {"answer_id": 5}
    with pytest.raises(ValueError, match=r"annotations\[1\]\.answers\[4\] lacks 'answer'"):
        load_vqa_v2(q, _json(a, ann), tmp_path, "val")
    ann["annotations"][1] = dict(ann["annotations"][0], image_id=1)
    with pytest.raises(ValueError, match=r"annotations\[1\]: question_id 420 is annotated twice"):
        load_vqa_v2(q, _json(a, ann), tmp_path, "val")
    ann["annotations"][1]["question_id"] = 421
    with pytest.raises(ValueError, match="question_id 421 is annotated with image_id 1 but .* image_id 42"):
        load_vqa_v2(q, _json(a, ann), tmp_path, "val")
    with pytest.raises(ValueError, match="unknown COCO image split 'dev'"):
        coco_image_split("dev")


# ----------------------------------------------------------------------------------------------------- NLVR2
def _nlvr2_line(identifier: str, label: str = "True", **extra: Any) -> str:
    return json.dumps({"validation": {}, "sentence": "There are two dogs. ", "left_url": "http://x/l.jpg",
                       "writer": "103", "label": label, "right_url": "http://x/r.jpg", "synset": "dog",
                       "query": "dogs", "identifier": identifier, "extra_validations": {}, **extra})


def test_nlvr2_flat_and_directory_layouts(tmp_path: Path) -> None:
    root = tmp_path / "images"
    dev = tmp_path / "dev.json"
    dev.write_text(_nlvr2_line("dev-850-0-0") + "\n\n" + _nlvr2_line("dev-850-0-1", "False") + "\n")
    a, b = load_nlvr2(dev, root)
    assert a == NLVR2Record(root / "dev/dev-850-0-img0.png", root / "dev/dev-850-0-img1.png",
                            "There are two dogs.", True, "dev-850-0-0")
    assert (b.label, b.left) == (False, a.left)
    train = tmp_path / "train.json"
    train.write_text(_nlvr2_line("train-10171-0-0", directory=42) + "\n"
                     + _nlvr2_line("train-3-1-2", directory=7))
    _image(root / "train/42/train-10171-0-img0.png")
    _image(root / "train/42/train-10171-0-img1.png")
    _image(root / "train/train-3-1-img0.png")  # flat layout: found although "directory" is given
    _image(root / "train/train-3-1-img1.png")
    c, d = load_nlvr2(train, root, check_files=True)
    assert c.left == root / "train/42/train-10171-0-img0.png" and c.right.name == "train-10171-0-img1.png"
    assert d.left == root / "train/train-3-1-img0.png"
    with pytest.raises(FileNotFoundError, match="dev-850-0-img0.png"):
        load_nlvr2(dev, root, check_files=True)


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_blank_texts_are_refused_naming_the_entry(tmp_path: Path, blank: str) -> None:
    data = json.loads(_coco_karpathy(tmp_path / "ok.json").read_text())
    data["images"][1]["sentences"][0]["raw"] = blank  # a caption the model would learn nothing from
    with pytest.raises(ValueError, match=r"dataset_coco\.json: images\[1\]\.sentences\[0\]: 'raw' is blank"):
        load_karpathy(_json(tmp_path / "dataset_coco.json", data), tmp_path, "test")
    q, a = _vqa_files(tmp_path)
    qs = json.loads(q.read_text())
    qs["questions"][2]["question"] = blank
    with pytest.raises(ValueError, match=r"questions\.json: questions\[2\]: 'question' is blank"):
        load_vqa_v2(_json(q, qs), a, tmp_path, "val")
    dev = tmp_path / "dev.json"
    dev.write_text(_nlvr2_line("dev-850-0-0") + "\n" + _nlvr2_line("dev-850-0-1", sentence=blank) + "\n")
    with pytest.raises(ValueError, match=r"dev\.json line 2: 'sentence' is blank"):
        load_nlvr2(dev, tmp_path)


def test_a_utf8_bom_is_accepted_as_in_yaml_configs(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    js = _coco_karpathy(tmp_path / "dataset_coco.json")
    want = load_karpathy(js, tmp_path, "test")
    js.write_bytes(bom + js.read_bytes())
    assert load_karpathy(js, tmp_path, "test") == want
    q, a = _vqa_files(tmp_path)
    want_vqa = load_vqa_v2(q, a, tmp_path, "val")
    for f in (q, a):
        f.write_bytes(bom + f.read_bytes())
    assert load_vqa_v2(q, a, tmp_path, "val") == want_vqa
    dev = tmp_path / "dev.json"
    dev.write_bytes(bom + (_nlvr2_line("dev-850-0-0") + "\n").encode())
    assert [r.identifier for r in load_nlvr2(dev, tmp_path)] == ["dev-850-0-0"]
    dev.write_bytes((_nlvr2_line("dev-850-0-0") + "\n").encode() + bom + b"{}\n")  # only at the start
    with pytest.raises(ValueError, match="dev.json line 2: not valid JSON"):
        load_nlvr2(dev, tmp_path)


def test_nlvr2_rejects_malformed_lines(tmp_path: Path) -> None:
    dev = tmp_path / "dev.json"
    dev.write_text("\n".join([_nlvr2_line("dev-1-0-0")] * 3 + ["", _nlvr2_line("dev-1-0-1", "maybe")]))
    with pytest.raises(ValueError, match=r"dev\.json line 5: label must be 'True' or 'False', got 'maybe'"):
        load_nlvr2(dev, tmp_path)
    dev.write_text(_nlvr2_line("dev-1-0-0") + "\n" + _nlvr2_line("dev1"))
    with pytest.raises(ValueError, match=r"dev\.json line 2: identifier must look like 'dev-850-0-0'"):
        load_nlvr2(dev, tmp_path)
    dev.write_text('{"identifier": "dev-1-0-0", "label": "True"}')
    with pytest.raises(ValueError, match=r"dev\.json line 1 lacks 'sentence'"):
        load_nlvr2(dev, tmp_path)
    dev.write_text(_nlvr2_line("dev-1-0-0") + "\n{oops")
    with pytest.raises(ValueError, match=r"dev\.json line 2: not valid JSON"):
        load_nlvr2(dev, tmp_path)


# --------------------------------------------------------------------------------------------- class folders
def test_image_folder_classes_sorted_and_extensions(tmp_path: Path) -> None:
    _image(tmp_path / "n02/b.png")
    _image(tmp_path / "n02/a.JPEG")
    _image(tmp_path / "n01/x.jpg")
    (tmp_path / "n01/notes.txt").write_text("not an image")
    (tmp_path / "LOC_synset_mapping.txt").write_text("a file at the root is ignored")
    records, classes = load_image_folder(tmp_path)
    assert classes == ["n01", "n02"]
    assert records == [(tmp_path / "n01/x.jpg", 0), (tmp_path / "n02/a.JPEG", 1), (tmp_path / "n02/b.png", 1)]
    assert isinstance(records[0], ClassRecord) and records[0].label == 0
    recs, names = load_image_folder(tmp_path, classes=["n00", "n01", "n02"])  # e.g. the train split's classes
    assert names == ["n00", "n01", "n02"] and [r.label for r in recs] == [1, 2, 2]


def test_image_folder_rejects_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no class folders"):
        load_image_folder(tmp_path)
    _image(tmp_path / "cat/1.jpg")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog/readme.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'dog'}: class folder has no images")):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="class 'cat' is not among the 1 given classes"):
        load_image_folder(tmp_path, classes=["dog"])
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_image_folder(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------- segmentation
def test_segmentation_folder_pairs_by_stem(tmp_path: Path) -> None:
    for stem in ("ADE_val_00000002", "ADE_val_00000001"):
        _image(tmp_path / f"images/validation/{stem}.jpg")
        _mask(tmp_path / f"annotations/validation/{stem}.png", np.zeros((9, 12)))
    recs = load_segmentation_folder(tmp_path, "validation")
    assert recs == [SegRecord(tmp_path / f"images/validation/ADE_val_0000000{i}.jpg",
                              tmp_path / f"annotations/validation/ADE_val_0000000{i}.png") for i in (1, 2)]
    _image(tmp_path / "images/validation/ADE_val_00000003.jpg")
    with pytest.raises(ValueError, match=r"1 file\(s\) without a \.png mask in .*stems 'ADE_val_00000003'"):
        load_segmentation_folder(tmp_path, "validation")
    (tmp_path / "images/validation/ADE_val_00000003.jpg").unlink()
    _mask(tmp_path / "annotations/validation/ADE_val_00000004.png", np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"without an image in .*stems 'ADE_val_00000004'"):
        load_segmentation_folder(tmp_path, "validation")
    with pytest.raises(FileNotFoundError, match=r"images.training: no such directory"):
        load_segmentation_folder(tmp_path, "training")


# -------------------------------------------------------------------------------------------------- decoding
def test_load_image_and_mask_resize_and_normalise(tmp_path: Path) -> None:
    img = load_image(_image(tmp_path / "w.png", (255, 0, 128)), 8)
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32
    assert torch.allclose(img[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)  # (x-.5)/.5
    unit = load_image(tmp_path / "w.png", (4, 6), mean=(0, 0, 0), std=(1, 1, 1))
    assert unit.shape == (3, 4, 6) and unit.min() >= 0 and unit.max() <= 1
    values = np.array([[0, 0, 3, 3], [0, 0, 3, 3], [7, 7, 150, 150], [7, 7, 150, 150]])
    for mode in ("L", "P"):
        m = load_mask(_mask(tmp_path / f"m{mode}.png", values, mode), 2)
        assert m.dtype == torch.long and m.tolist() == [[0, 3], [7, 150]]  # nearest: ids survive
    assert load_mask(tmp_path / "mL.png", 2, reduce_zero_label=True).tolist() == [[IGNORE_INDEX, 2], [6, 149]]
    with pytest.raises(ValueError, match=r"mRGB\.png: a mask must be a single-channel PNG .*got mode RGB"):
        load_mask(_mask(tmp_path / "mRGB.png", values, "RGB"), 2)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg: cannot decode the image"):
        load_image(tmp_path / "broken.jpg", 4)
    with pytest.raises(FileNotFoundError, match=r"absent\.jpg"):
        load_image(tmp_path / "absent.jpg", 4)


def test_file_image_dataset_items_for_every_record_kind(tmp_path: Path) -> None:
    a, b = _image(tmp_path / "a.jpg", (0, 0, 0)), _image(tmp_path / "b.png", (255, 255, 255), (5, 20))
    m = _mask(tmp_path / "a_mask.png", np.full((9, 12), 4))
    caps = FileImageDataset([CaptionRecord(a, ["one", "two"], 3), CaptionRecord(b, ["three"], 8)], 16)
    assert len(caps) == 3 and [caps[i]["image_id"] for i in range(3)] == [3, 3, 8]
    item = caps[2]
    assert item["text"] == "three" and item["image"].shape == (3, 16, 16)
    assert torch.allclose(item["image"], torch.ones(3, 16, 16)) and caps[0]["image"].min() == -1
    assert len(FileImageDataset(caps.records, 16, caption_pairs=False)) == 2

    vqa = FileImageDataset([VQARecord(1, 2, a, "Is it dark?", {"yes": 1.0, "no": 1 / 3})], (8, 10),
                           answer_vocab=["no", "maybe", "yes"])
    item = vqa[0]
    assert item["image"].shape == (3, 8, 10) and item["text"] == "Is it dark?" and item["question_id"] == 1
    assert torch.allclose(item["answer_scores"], torch.tensor([1 / 3, 0.0, 1.0])) and vqa.num_answers == 3

    nlvr = FileImageDataset([NLVR2Record(a, b, "both dark", False, "dev-1-0-0")], 8)
    item = nlvr[0]
    assert item["image"].shape == item["image_b"].shape == (3, 8, 8) and item["label"] == 0
    assert item["text"] == "both dark"

    cls = FileImageDataset([ClassRecord(a, 0), ClassRecord(b, 1)], 8, classes=["x", "y"])
    assert cls[1]["label"] == 1 and cls.num_classes == 2 and cls[-1]["image"].shape == (3, 8, 8)

    seg = FileImageDataset([SegRecord(a, m)], 6)
    item = seg[0]
    assert item["mask"].shape == (6, 6) and item["mask"].dtype == torch.long
    assert bool((item["mask"] == 4).all())

    batch = next(iter(DataLoader(caps, batch_size=3, collate_fn=Collate())))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["image_id"].tolist() == [3, 3, 8]


def test_file_image_dataset_rejects_bad_setups(tmp_path: Path) -> None:
    a = tmp_path / "a.jpg"
    with pytest.raises(ValueError, match="need an answer_vocab"):
        FileImageDataset([VQARecord(1, 2, a, "q?")], 8)
    with pytest.raises(ValueError, match="records of one kind expected"):
        FileImageDataset([ClassRecord(a, 0), SegRecord(a, a)], 8)
    with pytest.raises(ValueError, match="no records"):
        FileImageDataset([], 8)
    with pytest.raises(IndexError, match="index 1 out of range"):
        FileImageDataset([ClassRecord(a, 0)], 8)[1]
    with pytest.raises(FileNotFoundError, match=r"a\.jpg"):
        FileImageDataset([ClassRecord(a, 0)], 8)[0]


# ------------------------------------------------------------------------------------ fine-tuning entry point
def test_load_task_dataset_layouts(tmp_path: Path) -> None:
    # VQA v2: the vocabulary comes from the train annotations for every split
    vqa_root = tmp_path / "vqa"
    _vqa_files(vqa_root, "train")
    _vqa_files(vqa_root, "val")
    for split in ("train2014", "val2014"):
        for image_id in (7, 42):
            _image(vqa_root / split / f"COCO_{split}_{image_id:012d}.jpg")
    val = load_task_dataset("vqa", "vqa2", vqa_root, "val", image_size=8)
    assert val.answers == ["3", "red", "yes"] and len(val) == 3
    assert val[0]["image"].shape == (3, 8, 8) and val[0]["image"].min() >= 0  # [0, 1]: fine-tuning normalises
    # class folders: the eval split keeps the train split's class indices
    _image(tmp_path / "inet/train/n01/a.jpg")
    _image(tmp_path / "inet/train/n02/b.jpg")
    _image(tmp_path / "inet/val/n02/c.jpg")
    inet = load_task_dataset("cls", "imagefolder", tmp_path / "inet", "test", image_size=8)
    assert inet.num_classes == 2 and inet[0]["label"] == 1
    # ADE20k: train -> training, labels reduced, 150 classes from objectInfo150.txt
    ade = tmp_path / "ADEChallengeData2016"
    _image(ade / "images/training/ADE_train_00000001.jpg")
    _mask(ade / "annotations/training/ADE_train_00000001.png", np.full((9, 12), 1))
    (ade / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + "1\t0.1\t1\t1\twall\n" * 150)
    seg = load_task_dataset("seg", "segfolder", ade, "train", image_size=4)
    assert seg.num_classes == 150 and seg[0]["mask"].unique().tolist() == [0]
    # NLVR2: val -> dev.json, images under images/
    (tmp_path / "nlvr2").mkdir()
    (tmp_path / "nlvr2/dev.json").write_text(_nlvr2_line("dev-1-0-0"))
    _image(tmp_path / "nlvr2/images/dev/dev-1-0-img0.png")
    _image(tmp_path / "nlvr2/images/dev/dev-1-0-img1.png")
    assert load_task_dataset("nlvr2", "nlvr2", tmp_path / "nlvr2", "val", image_size=8)[0]["label"] == 1
    # Karpathy: the one dataset_*.json of the folder
    _coco_karpathy(tmp_path / "coco/dataset_coco.json")
    _image(tmp_path / "coco/val2014/COCO_val2014_000000000042.jpg")
    assert len(load_task_dataset("retrieval", "karpathy", tmp_path / "coco", "test", image_size=8)) == 2
    with pytest.raises(FileNotFoundError, match="no NLVR2 test file"):
        load_task_dataset("nlvr2", "nlvr2", tmp_path / "nlvr2", "test")
    with pytest.raises(ValueError, match="unknown data format 'coco'"):
        load_task_dataset("retrieval", "coco", tmp_path, "test")


@pytest.mark.parametrize("name", ["../../outside.jpg", "/etc/passwd", "val2014/../../x.jpg", "~/x.jpg"])
def test_dataset_indexes_may_only_name_files_under_their_root(tmp_path: Path, name: str) -> None:
    """A Karpathy filename or an NLVR2 directory that leaves the dataset root is refused, naming the entry,
    before anything at that path is opened; a folder under the root that is a symlink elsewhere still works."""
    data = json.loads(_coco_karpathy(tmp_path / "ok.json").read_text())
    data["images"][0].update(filepath="", filename=name)
    js = _json(tmp_path / "dataset_coco.json", data)
    with pytest.raises(ValueError, match=r"images\[0\]: filepath/filename: .* not a file name inside"):
        load_karpathy(js, tmp_path / "coco", "val")  # any split: every entry is checked
    dev = tmp_path / "dev.json"
    dev.write_text(_nlvr2_line("dev-850-0-0", directory=name) + "\n")
    with pytest.raises(ValueError, match=r"dev.json line 1: 'directory': .* not a file name inside"):
        load_nlvr2(dev, tmp_path / "images")
    real = tmp_path / "elsewhere" / "val2014"
    real.mkdir(parents=True)
    (tmp_path / "coco").mkdir(exist_ok=True)
    (tmp_path / "coco" / "val2014").symlink_to(real)
    (real / "COCO_val2014_000000000042.jpg").write_bytes(b"x")
    ok = load_karpathy(_coco_karpathy(tmp_path / "dataset_coco.json"), tmp_path / "coco", "test", check_files=True)
    assert ok[0].image_path == tmp_path / "coco/val2014/COCO_val2014_000000000042.jpg"


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels (no image data): a decompression bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_unreadable_index_files_and_images_are_named(tmp_path: Path) -> None:
    """JSON that is not UTF-8 or holds a number too long to convert, and an image whose header claims 10^10
    pixels, are refused as bad input naming the file (never an internal error)."""
    js = tmp_path / "dataset_coco.json"
    js.write_bytes(b'{"images": [\xff]}')
    with pytest.raises(ValueError, match=r"dataset_coco\.json: not UTF-8"):
        load_karpathy(js, tmp_path, "test")
    js.write_text('{"images": [{"imgid": ' + "9" * 5000 + "}]}")
    with pytest.raises(ValueError, match=r"dataset_coco\.json: not readable JSON"):
        load_karpathy(js, tmp_path, "test")
    nl = tmp_path / "dev.json"
    nl.write_bytes(_nlvr2_line("dev-850-0-0").encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"dev\.json line 2: not UTF-8"):
        load_nlvr2(nl, tmp_path)
    bomb = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ValueError, match=r"bomb\.png: cannot decode the image"):
        load_image(bomb, 8)


# ------------------------------------------------------------------------------------------- hostile inputs
@pytest.mark.parametrize("identifier", ["../../etc-1-0-0", "/abs-1-0-0", "dev-../x-0-0", "dev-1/../2-0-0",
                                        "dev-1-0-0\x00"])
def test_nlvr2_identifiers_cannot_name_paths_outside_the_image_root(tmp_path: Path, identifier: str) -> None:
    dev = tmp_path / "dev.json"
    dev.write_text(_nlvr2_line(identifier))
    with pytest.raises(ValueError, match=r"dev\.json line 1: identifier must look like 'dev-850-0-0'"):
        load_nlvr2(dev, tmp_path / "images")


def test_seg_masks_with_class_ids_beyond_the_class_list_are_refused_naming_the_mask(tmp_path: Path) -> None:
    ade = tmp_path / "ade"
    _image(ade / "images/training/ADE_train_00000001.jpg")
    _mask(ade / "annotations/training/ADE_train_00000001.png", np.full((9, 12), 4))  # id 4 -> class 3 after reduce
    (ade / "objectInfo150.txt").write_text("Idx\tName\n" + "1\tx\n" * 3)  # 3 classes: 0, 1, 2
    seg = load_task_dataset("seg", "segfolder", ade, "train", image_size=4)
    with pytest.raises(ValueError, match=r"ADE_train_00000001\.png: class id 3 .* has 3 classes"):
        seg[0]
    (ade / "objectInfo150.txt").write_text("Idx\tName\n" + "1\tx\n" * 4)
    assert load_task_dataset("seg", "segfolder", ade, "train", image_size=4)[0]["mask"].unique().tolist() == [3]
    for text in ("", "Idx\tName\n", "\n\n"):
        (ade / "objectInfo150.txt").write_text(text)
        with pytest.raises(ValueError, match=r"objectInfo150\.txt: lists no classes"):
            load_task_dataset("seg", "segfolder", ade, "train", image_size=4)
    (ade / "objectInfo150.txt").write_bytes(b"Idx\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"objectInfo150\.txt: not UTF-8"):
        load_task_dataset("seg", "segfolder", ade, "train", image_size=4)


def test_a_lone_surrogate_in_a_caption_is_refused_naming_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "dataset_coco.json"
    _coco_karpathy(path)
    data = json.loads(path.read_text())
    data["images"][0]["sentences"][0]["raw"] = "a red \ud800 dog"
    path.write_text(json.dumps(data))  # json writes the surrogate as the escape \ud800, valid JSON
    with pytest.raises(ValueError, match=r"images\[0\]\.sentences\[0\]: 'raw' holds an invalid character"):
        load_karpathy(path, tmp_path, "test")


def test_an_image_path_that_is_a_fifo_is_refused_not_read(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "img.png")  # opening it for reading would block forever
    with pytest.raises(ValueError, match=r"img\.png: not a regular file"):
        load_image(tmp_path / "img.png", 8)
