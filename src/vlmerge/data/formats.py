"""Loaders for the real datasets of the paper, read from local files (nothing is downloaded).

Each loader parses one on-disk format into a list of small record dataclasses and checks it as it goes:
malformed input raises ``ValueError`` (a missing file or folder ``FileNotFoundError``) naming the file,
the entry / line and what was expected. :class:`FileImageDataset` turns any such list into a torch
dataset whose items use the same keys as the embedded world's datasets (:mod:`vlmerge.data.datasets`).

=============================== ================================================= ========================
loader                          format                                            record
=============================== ================================================= ========================
:func:`load_karpathy`           COCO / Flickr30k Karpathy-split JSON              :class:`CaptionRecord`
:func:`load_vqa_v2`             VQA v2 questions (+ annotations) JSON             :class:`VQARecord`
:func:`load_nlvr2`              NLVR2 JSONL (``dev.json``, ``train.json``, ...)   :class:`NLVR2Record`
:func:`load_image_folder`       ImageNet-style ``root/{class}/*.jpg``             :class:`ClassRecord`
:func:`load_segmentation_folder` ADE20k-style ``images/`` + ``annotations/``       :class:`SegRecord`
=============================== ================================================= ========================

Dataset items (:class:`FileImageDataset`; ``image`` is [3, H, W] float, ``(x / 255 - mean) / std``):

* captions — ``image``, ``text`` (one caption), ``image_id`` (int, shared by an image's captions)
* VQA — ``image``, ``text`` (question), ``answer_scores`` [A] float, ``question_id``
* NLVR2 — ``image`` (left), ``image_b`` (right), ``text`` (statement), ``label`` (1 = true, 0 = false)
* classification — ``image``, ``label`` (class index)
* segmentation — ``image``, ``mask`` [H, W] long

:func:`load_task_dataset` is the fine-tuning entry point (``data.format`` / ``data.root`` of
:mod:`vlmerge.finetune.config`): it finds a task's files under one dataset folder (layouts in its
docstring) and returns images in [0, 1] (mean 0, std 1), because the fine-tuning code normalises itself.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..files import relative_name
from ..models.checkpoint import parse_json
from .datasets import MEAN, STD

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")  # matched case-insensitively (.JPEG too)
KARPATHY_SPLITS: tuple[str, ...] = ("train", "val", "test", "restval")
VQA_NUM_ANSWERS = 3129  # the VQA v2 answer vocabulary of VLMo / ViLT / the merging paper
IGNORE_INDEX = 255  # segmentation: pixels excluded from the loss (``reduce_zero_label`` maps 0 here)
_EXPECTED_IMAGES = "*" + "|*".join(IMAGE_EXTENSIONS) + ", any case"
ScoringRule = Literal["min3", "official"]


# ------------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class CaptionRecord:
    """One image of a captioning dataset with all its captions."""

    image_path: Path
    captions: list[str]
    image_id: int  # COCO: ``cocoid``; Flickr30k: ``imgid``


@dataclass(frozen=True)
class VQARecord:
    """One VQA v2 question. ``answers`` maps each normalised answer to its soft score (empty when the split
    has no annotations, e.g. test-dev); ``multiple_choice_answer`` is normalised too."""

    question_id: int
    image_id: int
    image_path: Path
    question: str
    answers: dict[str, float] = field(default_factory=dict)
    multiple_choice_answer: str | None = None
    answer_type: str | None = None
    question_type: str | None = None


@dataclass(frozen=True)
class NLVR2Record:
    """One NLVR2 example: a statement about a (left, right) pair of images."""

    left: Path
    right: Path
    sentence: str
    label: bool
    identifier: str


class ClassRecord(NamedTuple):
    """An image of a class folder; a named tuple so it unpacks as ``(path, class_idx)``."""

    path: Path
    label: int


@dataclass(frozen=True)
class SegRecord:
    """An image and its class-id mask (same file stem)."""

    image_path: Path
    mask_path: Path


Record = CaptionRecord | VQARecord | NLVR2Record | ClassRecord | SegRecord


# ------------------------------------------------------------------------------------------------ helpers
_KINDS: dict[type, str] = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _get(obj: Mapping[str, Any], key: str, kind: type, where: str, optional: bool = False) -> Any:
    """``obj[key]`` checked to be of ``kind`` (bool is not an int); ``None`` if absent and ``optional``."""
    if key not in obj:
        if optional:
            return None
        raise ValueError(f"{where} lacks {key!r}")
    v = obj[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ValueError(f"{where}: {key!r} must be {_KINDS[kind]}, got {_short(v)}")
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON "\ud800": a lone surrogate, which no tokenizer or path takes
            raise ValueError(f"{where}: {key!r} holds an invalid character (a lone surrogate, \\u{ord(v[e.start]):04x} "
                             f"at {e.start}); expected text") from None
    return v


_BOM = b"\xef\xbb\xbf"


def _read_json(path: Path) -> Any:
    """The one JSON reader (:func:`vlmerge.models.checkpoint.parse_json`): errors name the file (bad UTF-8,
    bad JSON, nesting too deep, numbers too long). A leading UTF-8 BOM is dropped, as the YAML configs allow."""
    _require_file(path)
    return parse_json(path.read_bytes().removeprefix(_BOM), str(path))


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
    """``obj[key]``, a string that is not blank, stripped."""
    v = _get(obj, key, str, where).strip()
    if not v:
        raise ValueError(f"{where}: {key!r} is blank; expected non-empty text")
    return v


def _json_list(data: Any, key: str, path: Path) -> list[Any]:
    """``data[key]`` of a top-level JSON object, which must be a list."""
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected a JSON object with a {key!r} list")
    return data[key]


def _entry(x: Any, where: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise ValueError(f"{where}: expected an object, got {_short(x)}")
    return x


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory ({what})")
    return path


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


def _read_text(path: Path) -> str:
    """A UTF-8 text file; ``ValueError`` naming it when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")  # a leading BOM dropped
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


# ----------------------------------------------------------------------------------- COCO / Flickr30k
def load_karpathy(json_path: str | Path, image_root: str | Path, split: str, *,
                  check_files: bool = False) -> list[CaptionRecord]:
    """``split`` images of a Karpathy-split caption JSON (``dataset_coco.json``, ``dataset_flickr30k.json``).

    ``split`` is ``train``, ``val``, ``test`` or ``restval``; **``train`` includes ``restval``** (the
    5k COCO val2014 images outside Karpathy's val / test, used for training by VLMo and everyone since);
    ask for ``restval`` to get those alone. The image path is ``image_root / filepath / filename``
    (``filepath``, e.g. ``val2014``, exists in the COCO file only). Captions are the sentences' ``raw``
    text, stripped; ``image_id`` is ``cocoid`` when present, else ``imgid``. Every entry of the file is
    validated, not only the requested split; ``check_files`` also requires each image file to exist.
    """
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"unknown Karpathy split {split!r}; allowed values: {list(KARPATHY_SPLITS)}")
    path, root = Path(json_path), Path(image_root)
    wanted = {"train", "restval"} if split == "train" else {split}
    records: list[CaptionRecord] = []
    seen: dict[int, int] = {}
    for i, raw in enumerate(_json_list(_read_json(path), "images", path)):
        where = f"{path}: images[{i}]"
        im = _entry(raw, where)
        s = _get(im, "split", str, where)
        if s not in KARPATHY_SPLITS:
            raise ValueError(f"{where}: 'split' must be one of {list(KARPATHY_SPLITS)}, got {s!r}")
        filename = _get(im, "filename", str, where)
        filepath = _get(im, "filepath", str, where, optional=True) or ""
        sentences = _get(im, "sentences", list, where)
        if not sentences:
            raise ValueError(f"{where}: 'sentences' is empty (expected at least one caption)")
        captions = []
        for j, sent in enumerate(sentences):
            at = f"{where}.sentences[{j}]"
            captions.append(_text(_entry(sent, at), "raw", at))
        image_id = _get(im, "cocoid", int, where, optional=True)
        if image_id is None:
            image_id = _get(im, "imgid", int, where)
        image_path = relative_name(root, os.path.join(filepath, filename), f"{where}: filepath/filename")
        if s not in wanted:
            continue
        if image_id in seen:
            raise ValueError(f"{where}: image id {image_id} repeats images[{seen[image_id]}]")
        seen[image_id] = i
        if check_files:
            _require_file(image_path)
        records.append(CaptionRecord(image_path, captions, image_id))
    return records


# ------------------------------------------------------------------------------------------------- VQA v2
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "didnt": "didn't", "isnt": "isn't", "arent": "aren't",
                 "wasnt": "wasn't", "werent": "weren't", "cant": "can't", "couldnt": "couldn't",
                 "wont": "won't", "wouldnt": "wouldn't", "shouldnt": "shouldn't", "hasnt": "hasn't",
                 "havent": "haven't", "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're",
                 "thats": "that's", "whats": "what's", "hes": "he's", "shes": "she's"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!]")  # the official evaluation's list
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"\.(?!\d)")
_COCO_IMAGE_SPLITS = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test2015",
                      "testdev": "test2015"}


def normalize_answer(answer: str) -> str:
    """A VQA answer in canonical form — a subset of the official evaluation's normalisation.

    Lowercase; newlines / tabs to spaces; thousands separators dropped (``1,000`` → ``1000``); periods
    dropped unless a digit follows (``3.5`` stays, ``yes.`` → ``yes``); the official punctuation set
    ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` replaced by spaces (the official script instead
    *deletes* a mark that touches a space, which only differs on odd strings like ``"black- white"``);
    number words ``zero``…``ten`` (and ``none``) to digits; articles ``a an the`` removed; common
    apostrophe-less contractions restored (``dont`` → ``don't``); whitespace collapsed. May return ``""``.
    """
    s = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    s = _THOUSANDS_COMMA.sub("", s)
    s = _NON_DECIMAL_PERIOD.sub("", s)
    s = _PUNCTUATION.sub(" ", s)
    words = (_NUMBER_WORDS.get(w, w) for w in s.split())
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_scores(answers: Sequence[str], scoring: ScoringRule = "min3") -> dict[str, float]:
    """Soft score of each distinct (normalised) answer among the annotators' ``answers`` (10 in VQA v2).

    ``min3``: ``min(1, n / 3)`` for an answer given by ``n`` annotators — the usual training target
    (1 → 1/3, 2 → 2/3, ≥ 3 → 1). ``official``: the evaluation's accuracy averaged over the 10 leave-one-
    annotator-out subsets, ``(n · min(1, (n-1)/3) + (N-n) · min(1, n/3)) / N`` (1 → 0.3, 2 → 0.6,
    3 → 0.9, ≥ 4 → 1; VLMo / ViLT's targets). Answers normalising to ``""`` are dropped.
    """
    if scoring not in ("min3", "official"):
        raise ValueError(f"unknown VQA scoring {scoring!r}; allowed values: ['min3', 'official']")
    total = len(answers)
    counts = Counter(a for a in map(normalize_answer, answers) if a)
    if scoring == "min3":
        return {a: min(1.0, n / 3) for a, n in counts.items()}
    return {a: (n * min(1.0, (n - 1) / 3) + (total - n) * min(1.0, n / 3)) / total for a, n in counts.items()}


def coco_image_split(name: str) -> str:
    """``train`` / ``val`` → ``train2014`` / ``val2014``; ``test`` / ``test-dev`` → ``test2015``; names that
    already carry a year (``val2014``) are returned unchanged."""
    if name in _COCO_IMAGE_SPLITS:
        return _COCO_IMAGE_SPLITS[name]
    if re.fullmatch(r"[a-z-]+\d{4}", name):
        return name
    raise ValueError(f"unknown COCO image split {name!r}; expected e.g. 'train2014', 'val2014', 'test2015' "
                     f"or one of {list(_COCO_IMAGE_SPLITS)}")


def _vqa_annotations(path: Path, scoring: ScoringRule) -> dict[int, tuple[int, dict[str, Any]]]:
    """question_id -> (image_id, VQARecord fields) from an annotations file."""
    out: dict[int, tuple[int, dict[str, Any]]] = {}
    for i, raw in enumerate(_json_list(_read_json(path), "annotations", path)):
        where = f"{path}: annotations[{i}]"
        ann = _entry(raw, where)
        qid = _get(ann, "question_id", int, where)
        if qid in out:
            raise ValueError(f"{where}: question_id {qid} is annotated twice")
        answers = _get(ann, "answers", list, where)
        if not answers:
            raise ValueError(f"{where}: 'answers' is empty (expected the annotators' answers, 10 in VQA v2)")
        texts = [_get(_entry(a, f"{where}.answers[{j}]"), "answer", str, f"{where}.answers[{j}]")
                 for j, a in enumerate(answers)]
        mca = _get(ann, "multiple_choice_answer", str, where, optional=True)
        out[qid] = (_get(ann, "image_id", int, where), {
            "answers": vqa_soft_scores(texts, scoring),
            "multiple_choice_answer": None if mca is None else normalize_answer(mca),
            "answer_type": _get(ann, "answer_type", str, where, optional=True),
            "question_type": _get(ann, "question_type", str, where, optional=True),
        })
    return out


def load_vqa_v2(questions_path: str | Path, annotations_path: str | Path | None, image_root: str | Path,
                image_split_name: str, *, scoring: ScoringRule = "min3", check_files: bool = False
                ) -> list[VQARecord]:
    """VQA v2 questions joined with their annotations (``annotations_path=None`` for unannotated splits).

    Images are ``COCO_{split}_{image_id:012d}.jpg`` with ``split = coco_image_split(image_split_name)``
    (e.g. ``val2014``), looked up in ``image_root / split`` when that folder exists, else in
    ``image_root``. Each record's ``answers`` are soft scores per :func:`vqa_soft_scores` (``scoring``)
    over :func:`normalize_answer`-ed answers. Every question must have an annotation with the same
    ``image_id``; annotations of questions not in the questions file are ignored.
    """
    qpath, root = Path(questions_path), Path(image_root)
    split = coco_image_split(image_split_name)
    image_dir = root / split if (root / split).is_dir() else root
    anns = None if annotations_path is None else _vqa_annotations(Path(annotations_path), scoring)
    records: list[VQARecord] = []
    seen: set[int] = set()
    for i, raw in enumerate(_json_list(_read_json(qpath), "questions", qpath)):
        where = f"{qpath}: questions[{i}]"
        q = _entry(raw, where)
        qid, image_id = _get(q, "question_id", int, where), _get(q, "image_id", int, where)
        question = _text(q, "question", where)
        if qid in seen:
            raise ValueError(f"{where}: question_id {qid} appears twice")
        seen.add(qid)
        extra: dict[str, Any] = {}
        if anns is not None:
            if qid not in anns:
                raise ValueError(f"{annotations_path}: question_id {qid} has no annotation")
            ann_image, extra = anns[qid]
            if ann_image != image_id:
                raise ValueError(f"{annotations_path}: question_id {qid} is annotated with image_id "
                                 f"{ann_image} but {qpath} gives image_id {image_id}")
        image_path = image_dir / f"COCO_{split}_{image_id:012d}.jpg"
        if check_files:
            _require_file(image_path)
        records.append(VQARecord(qid, image_id, image_path, question.strip(), **extra))
    return records


def build_answer_vocab(records: Sequence[VQARecord], top_k: int = VQA_NUM_ANSWERS, min_count: int = 1
                       ) -> list[str]:
    """The ``top_k`` most frequent answers, most frequent first (ties alphabetical).

    An answer's frequency is the number of questions whose (normalised) ``multiple_choice_answer`` it is
    — the highest-scored answer for records without one. This is how the standard 3,129-answer vocabulary
    was made (answers that are the majority answer of ≥ 9 train + val questions; pass ``min_count=9``).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be ≥ 1, got {top_k}")
    counts: Counter[str] = Counter()
    for r in records:
        answer = r.multiple_choice_answer
        if not answer and r.answers:
            answer = min(r.answers, key=lambda a, sc=r.answers: (-sc[a], a))
        if answer:
            counts[answer] += 1
    if not counts:
        raise ValueError("no annotated answers in the records: build the vocabulary from an annotated split")
    ranked = sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))
    return ranked[:top_k]


def answer_index(vocab: Sequence[str] | Mapping[str, int]) -> dict[str, int]:
    """answer -> position for a vocabulary list (duplicates are an error); a mapping must already number its
    entries 0 … n-1."""
    if isinstance(vocab, Mapping):
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("an answer -> index mapping must use each index 0 … n-1 exactly once")
        return dict(vocab)
    index = {a: i for i, a in enumerate(vocab)}
    if len(index) != len(vocab):
        dup = next(a for a, n in Counter(vocab).items() if n > 1)
        raise ValueError(f"{dup!r} is listed more than once in the vocabulary")
    return index


def soft_target(answers: VQARecord | Mapping[str, float], vocab: Sequence[str] | Mapping[str, int]
                ) -> torch.Tensor:
    """[A] float soft-target vector of a record's (or an answer → score mapping's) answers over ``vocab``
    (a list, or answer → index); answers outside the vocabulary are dropped."""
    scores = answers.answers if isinstance(answers, VQARecord) else answers
    return _scores_vector(scores, answer_index(vocab))


def _scores_vector(scores: Mapping[str, float], index: Mapping[str, int]) -> torch.Tensor:
    out = torch.zeros(len(index))
    for a, s in scores.items():
        if a in index:
            out[index[a]] = float(s)
    return out


# -------------------------------------------------------------------------------------------------- NLVR2
# Letters, digits and _ only (no "/", "." or ".."): the identifier names files inside the image root.
_NLVR2_ID = re.compile(r"(?P<stem>(?P<split>\w+)-[\w-]+)-\d+", re.ASCII)


def _nlvr2_label(v: Any, where: str) -> bool:
    if v in ("True", "False"):
        return v == "True"
    if isinstance(v, bool):  # tolerated: JSON true / false
        return v
    raise ValueError(f"{where}: label must be 'True' or 'False', got {_short(v)}")


def load_nlvr2(jsonl_path: str | Path, image_root: str | Path, *, check_files: bool = False
               ) -> list[NLVR2Record]:
    """NLVR2 examples of one JSONL file (``train.json``, ``dev.json``, ``test1.json`` — one object a line).

    The identifier ``{split}-{set}-{pair}-{sentence}`` (e.g. ``dev-850-0-0``) gives the images
    ``{split}-{set}-{pair}-img0.png`` / ``-img1.png`` in ``image_root / split``; with a ``directory`` field
    (train: 0…99) they are looked up in ``image_root / split / directory`` first and in the flat folder if
    not there. ``label`` is the string ``"True"`` / ``"False"`` (JSON booleans are accepted). Blank lines
    are skipped. ``check_files`` also requires both image files to exist.
    """
    path, root = Path(jsonl_path), Path(image_root)
    _require_file(path)
    records: list[NLVR2Record] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path} line {lineno}"
            if not raw.strip():
                continue
            obj = _entry(parse_json(raw.removeprefix(_BOM) if lineno == 1 else raw, where), where)
            identifier = _get(obj, "identifier", str, where)
            m = _NLVR2_ID.fullmatch(identifier)
            if m is None:
                raise ValueError(f"{where}: identifier must look like 'dev-850-0-0' "
                                 f"(split-set-pair-sentence), got {identifier!r}")
            sentence = _text(obj, "sentence", where)
            if "label" not in obj:
                raise ValueError(f"{where} lacks 'label' (expected 'True' or 'False')")
            label = _nlvr2_label(obj["label"], where)
            directory = obj.get("directory")
            if isinstance(directory, bool) or not isinstance(directory, (int, str, type(None))):
                raise ValueError(f"{where}: 'directory' must be an integer or a string, "
                                 f"got {_short(directory)}")
            flat = root / m["split"]
            folder = relative_name(flat, str(directory), f"{where}: 'directory'") if directory is not None else flat
            pair = []
            for k in (0, 1):
                name = f"{m['stem']}-img{k}.png"
                p = folder / name
                if folder is not flat and not p.is_file() and (flat / name).is_file():
                    p = flat / name
                if check_files:
                    _require_file(p)
                pair.append(p)
            records.append(NLVR2Record(pair[0], pair[1], sentence.strip(), label, identifier))
    return records


# ----------------------------------------------------------------------------------- ImageNet class folders
def load_image_folder(root: str | Path, classes: Sequence[str] | None = None
                      ) -> tuple[list[ClassRecord], list[str]]:
    """``root/{class_name}/*.{jpg,jpeg,png}`` (any case) → (records sorted by class then file, class names).

    Class indices follow the sorted folder names, or ``classes`` when given (e.g. the train split's, so
    that an evaluation split shares its indices: its folders must then all be listed, though some classes
    may have none). Hidden files and non-image files are skipped; a class folder without images is an error.
    """
    base = _require_dir(Path(root), "image-folder root")
    folders = _class_folders(base)
    if not folders:
        raise ValueError(f"{base}: no class folders (expected {base}/{{class_name}}/*.jpg)")
    names = sorted(p.name for p in folders) if classes is None else list(classes)
    index = answer_index(names)
    records: list[ClassRecord] = []
    for folder in folders:
        if folder.name not in index:
            raise ValueError(f"{folder}: class {folder.name!r} is not among the {len(index)} given classes")
        images = sorted(p for p in folder.iterdir() if _is_image(p))
        if not images:
            raise ValueError(f"{folder}: class folder has no images (expected {_EXPECTED_IMAGES})")
        records.extend(ClassRecord(p, index[folder.name]) for p in images)
    return records, names


# ------------------------------------------------------------------------------------- ADE20k segmentation
def load_segmentation_folder(root: str | Path, split: str) -> list[SegRecord]:
    """``root/images/{split}/*.jpg`` paired by file stem with ``root/annotations/{split}/*.png`` (ADE20k:
    split ``training`` / ``validation``; masks hold class ids, 0 = other / ignore). Sorted by stem; an image
    without a mask, a mask without an image, or two images with one stem is an error."""
    base = Path(root)
    image_dir = _require_dir(base / "images" / split, "segmentation images")
    mask_dir = _require_dir(base / "annotations" / split, "segmentation masks")
    images: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if _is_image(p):
            if p.stem in images:
                raise ValueError(f"{image_dir}: two images share the stem {p.stem!r}: "
                                 f"{images[p.stem].name}, {p.name}")
            images[p.stem] = p
    masks = {p.stem: p for p in mask_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    if not images:
        raise ValueError(f"{image_dir}: no images (expected {_EXPECTED_IMAGES})")
    for missing, have, other in ((images.keys() - masks.keys(), image_dir, f"a .png mask in {mask_dir}"),
                                 (masks.keys() - images.keys(), mask_dir, f"an image in {image_dir}")):
        if missing:
            shown = ", ".join(repr(s) for s in sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(f"{have}: {len(missing)} file(s) without {other}: stems {shown}")
    return [SegRecord(images[s], masks[s]) for s in sorted(images)]


# ----------------------------------------------------------------------------------------------- decoding
def _size_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return h, w


def _open(path: Path) -> Image.Image:
    if path.exists() and not path.is_file():  # a FIFO or device would block the read (or never end)
        raise ValueError(f"{path}: not a regular file; expected an image file")
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no such file") from e
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot decode the image ({e})") from e
    return img


def load_image(path: str | Path, image_size: int | tuple[int, int], mean: Sequence[float] = MEAN,
               std: Sequence[float] = STD) -> torch.Tensor:
    """An image file → [3, H, W] float, RGB, resized bicubically to ``image_size`` (int or (H, W)) and
    normalised per channel as ``(x / 255 - mean) / std``."""
    h, w = _size_hw(image_size)
    img = _open(Path(path)).convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor([float(v) for v in mean]).view(3, 1, 1)
    s = torch.tensor([float(v) for v in std]).view(3, 1, 1)
    return (x - m) / s


def first_bad_class_id(mask: torch.Tensor, num_classes: int) -> int | None:
    """The first id of ``mask`` outside ``[0, num_classes)`` that is not :data:`IGNORE_INDEX`, or None."""
    bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= num_classes))
    return int(mask[bad][0]) if bool(bad.any()) else None


def load_mask(path: str | Path, image_size: int | tuple[int, int], reduce_zero_label: bool = False
              ) -> torch.Tensor:
    """A class-id mask PNG (mode ``L``, ``P`` or ``I``/``I;16``: the pixel values / palette indices are the
    ids) → [H, W] long, resized with nearest neighbour. ``reduce_zero_label`` (ADE20k's 150 classes): 0 →
    :data:`IGNORE_INDEX`, k → k - 1."""
    h, w = _size_hw(image_size)
    p = Path(path)
    img = _open(p)
    if img.mode not in ("L", "P", "I", "I;16"):
        raise ValueError(f"{p}: a mask must be a single-channel PNG of class ids (mode L, P or I), "
                         f"got mode {img.mode}")
    if img.mode == "I;16":
        img = img.convert("I")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.NEAREST)
    m = torch.from_numpy(np.asarray(img).astype(np.int64))
    if reduce_zero_label:
        m = torch.where(m == 0, torch.full_like(m, IGNORE_INDEX), m - 1)
    return m


# -------------------------------------------------------------------------------------------------- dataset
class FileImageDataset(Dataset):
    """A torch dataset over one kind of record, decoding images with PIL (keys in the module docstring).

    ``image_size``: int or (H, W); ``mean`` / ``std``: per-channel normalisation (0.5 / 0.5 as BEiT / VLMo;
    pass 0 / 1 for images in [0, 1]). Captions: ``caption_pairs`` gives one item per (image, caption) — all
    captions, COCO-style, ``image_id`` telling them apart — else one item per image with its first
    caption. VQA needs ``answer_vocab`` (list, or answer → index), exposed as ``answers`` /
    ``num_answers``. ``classes`` (classification) and ``num_classes`` are attached as attributes when given;
    ``reduce_zero_label`` applies to masks (:func:`load_mask`).
    """

    def __init__(self, records: Sequence[Record], image_size: int | tuple[int, int] = 224,
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD, *,
                 answer_vocab: Sequence[str] | Mapping[str, int] | None = None, caption_pairs: bool = True,
                 classes: Sequence[str] | None = None, num_classes: int | None = None,
                 reduce_zero_label: bool = False) -> None:
        if not records:
            raise ValueError("no records: the dataset would be empty")
        kinds = {type(r) for r in records}
        if len(kinds) > 1:
            raise ValueError(f"records of one kind expected, got {sorted(k.__name__ for k in kinds)}")
        self.kind: type = kinds.pop()
        if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
            raise ValueError(f"mean and std need 3 values each and std no zero, got {mean}, {std}")
        self.records, self.image_size = list(records), _size_hw(image_size)
        self.mean, self.std, self.reduce_zero_label = tuple(mean), tuple(std), reduce_zero_label
        self.index: list[tuple[int, int]] = [
            (i, j) for i, r in enumerate(self.records)
            for j in (range(len(r.captions)) if self.kind is CaptionRecord and caption_pairs else [0])]
        if self.kind is VQARecord:
            if answer_vocab is None:
                raise ValueError("VQA records need an answer_vocab (build_answer_vocab of the train split)")
            self._answer_index = answer_index(answer_vocab)
            self.answers = sorted(self._answer_index, key=self._answer_index.__getitem__)
            self.num_answers = len(self.answers)
        if classes is not None:
            self.classes = list(classes)
        if num_classes is not None or classes is not None:
            self.num_classes = num_classes if num_classes is not None else len(self.classes)

    def __len__(self) -> int:
        return len(self.index)

    def _image(self, path: Path) -> torch.Tensor:
        return load_image(path, self.image_size, self.mean, self.std)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)}")
        k, j = self.index[i]
        r = self.records[k]
        if isinstance(r, CaptionRecord):
            return {"image": self._image(r.image_path), "text": r.captions[j], "image_id": r.image_id}
        if isinstance(r, VQARecord):
            return {"image": self._image(r.image_path), "text": r.question, "question_id": r.question_id,
                    "answer_scores": _scores_vector(r.answers, self._answer_index)}
        if isinstance(r, NLVR2Record):
            return {"image": self._image(r.left), "image_b": self._image(r.right), "text": r.sentence,
                    "label": int(r.label)}
        if isinstance(r, ClassRecord):
            return {"image": self._image(r.path), "label": r.label}
        mask = load_mask(r.mask_path, self.image_size, self.reduce_zero_label)
        n = getattr(self, "num_classes", None)
        if n is not None and (bad := first_bad_class_id(mask, n)) is not None:
            raise ValueError(f"{r.mask_path}: class id {bad} (after reducing 0 to ignore) but the dataset has {n} "
                             f"classes (ids 0..{n - 1}, {IGNORE_INDEX} = ignore)")
        return {"image": self._image(r.image_path), "mask": mask}


# ---------------------------------------------------------------------------------------- task entry point
def _first_existing(candidates: Sequence[Path], what: str) -> Path:
    for p in candidates:
        if p.exists():
            return p
    raise FileNotFoundError(f"no {what}: looked for " + ", ".join(str(p) for p in candidates))


def _split_names(split: str, aliases: Mapping[str, Sequence[str]]) -> list[str]:
    return [split, *aliases.get(split, ())]


def _vqa_files(root: Path, split: str) -> tuple[Path, Path | None, str]:
    year = coco_image_split(split)[-4:]
    name = {"test-dev": "test-dev", "testdev": "test-dev"}.get(split, re.sub(r"\d{4}$", "", split))
    q = _first_existing([root / f"v2_OpenEnded_mscoco_{name}{year}_questions.json"],
                        f"VQA v2 {split} questions")
    a = root / f"v2_mscoco_{name}{year}_annotations.json"
    return q, (a if a.is_file() else None), coco_image_split(split)


FormatReader = Callable[[Path, str, dict[str, Any]], FileImageDataset]
"""``reader(root, split, image_kw)``: one split of a dataset folder (``image_kw``: ``image_size``, ``mean``,
``std`` for :class:`FileImageDataset`)."""
FORMATS: dict[str, FormatReader] = {}
"""Data format name (``data.format``) -> its reader; a new format is one function decorated with
:func:`register_format` (the config's ``data.format`` values and ``--data-format`` choices come from here)."""


def register_format(name: str) -> Callable[[FormatReader], FormatReader]:
    def add(reader: FormatReader) -> FormatReader:
        FORMATS[name] = reader
        return reader

    return add


@register_format("karpathy")
def _read_karpathy(base: Path, split: str, kw: dict[str, Any]) -> FileImageDataset:
    found = sorted(base.glob("dataset_*.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"{base}: expected exactly one dataset_*.json (Karpathy split), found "
                                f"{[p.name for p in found]}")
    flickr = base / "flickr30k-images"
    return FileImageDataset(load_karpathy(found[0], flickr if flickr.is_dir() else base, split), **kw)


@register_format("vqa2")
def _read_vqa2(base: Path, split: str, kw: dict[str, Any]) -> FileImageDataset:
    q, a, image_split = _vqa_files(base, split)
    records = load_vqa_v2(q, a, base, image_split)
    vocab_file = base / "answer_vocab.json"
    if vocab_file.is_file():
        vocab = _read_json(vocab_file)
        if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab):
            raise ValueError(f"{vocab_file}: expected a JSON list of answer strings")
    else:
        tq, ta, t_split = _vqa_files(base, "train")
        if ta is None:
            raise FileNotFoundError(f"{base}: no answer_vocab.json and no train annotations to build one")
        vocab = build_answer_vocab(records if split == "train" else load_vqa_v2(tq, ta, base, t_split))
    return FileImageDataset(records, answer_vocab=vocab, **kw)


@register_format("nlvr2")
def _read_nlvr2(base: Path, split: str, kw: dict[str, Any]) -> FileImageDataset:
    names = _split_names(split, {"val": ["dev"], "test": ["test1"]})
    path = _first_existing([d / f"{n}{ext}" for d in (base, base / "data") for n in names
                            for ext in (".json", ".jsonl")], f"NLVR2 {split} file")
    images = base / "images"
    return FileImageDataset(load_nlvr2(path, images if images.is_dir() else base), **kw)


@register_format("imagefolder")
def _read_imagefolder(base: Path, split: str, kw: dict[str, Any]) -> FileImageDataset:
    folder = _first_existing([base / n for n in _split_names(split, {"test": ["val"]})], f"{split} class folder")
    classes = None
    if (base / "train").is_dir() and folder != base / "train":
        classes = [p.name for p in _class_folders(base / "train")]
    records, names = load_image_folder(folder, classes)
    return FileImageDataset(records, classes=names, **kw)


@register_format("segfolder")
def _read_segfolder(base: Path, split: str, kw: dict[str, Any]) -> FileImageDataset:
    names = _split_names(split, {"train": ["training"], "val": ["validation"], "test": ["validation"]})
    name = _first_existing([base / "images" / n for n in names], f"segmentation {split} images").name
    info = [p for p in (base / "objectInfo150.txt", base / "objectInfo150.csv") if p.is_file()]
    n_cls = None
    if info:
        n_cls = sum(1 for line in _read_text(info[0]).splitlines() if line.strip()) - 1
        if n_cls < 1:
            raise ValueError(f"{info[0]}: lists no classes (expected a header line and one line per class)")
    records = load_segmentation_folder(base, name)
    return FileImageDataset(records, num_classes=n_cls, reduce_zero_label=True, **kw)


def load_task_dataset(task: str, fmt: str, root: str | Path, split: str, image_size: int = 224,
                      mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)
                      ) -> FileImageDataset:
    """``task``'s ``split`` read from the dataset folder ``root`` in format ``fmt`` (a name in
    :data:`FORMATS`; images in [0, 1] by default: the fine-tuning code normalises them itself). Layouts:

    * ``karpathy`` (retrieval, itm): ``root/dataset_*.json`` (one file); COCO images at
      ``root/{filepath}/{filename}``, Flickr30k ones in ``root/flickr30k-images/`` (or ``root/``).
    * ``vqa2``: ``root/v2_OpenEnded_mscoco_{train,val}2014_questions.json`` (``test`` / ``test-dev``:
      ``..._test2015_`` / ``..._test-dev2015_``), ``root/v2_mscoco_{split}2014_annotations.json`` when
      annotated, images in ``root/{train2014,val2014,test2015}/``. The answer vocabulary is
      ``root/answer_vocab.json`` (a JSON list) if present, else the 3,129 most frequent answers of the
      train annotations — the same for every split, so heads and targets line up.
    * ``nlvr2``: ``root/{split}.json`` or ``.jsonl`` (also under ``root/data/``; ``val`` → ``dev``,
      ``test`` → ``test1``), images under ``root/images/`` if it exists, else ``root/``.
    * ``imagefolder`` (cls): ``root/{split}/{class}/*.jpg`` (``test`` falls back to ``val``); class indices
      from ``root/train/`` when it exists.
    * ``segfolder`` (seg): ``root/images/{split}/`` + ``root/annotations/{split}/`` (``train`` →
      ``training``, ``val`` / ``test`` → ``validation`` as in ADEChallengeData2016); ADE20k labels are
      reduced (0 → ignore 255, k → k - 1); ``num_classes`` is 150 when ``root/objectInfo150.txt`` /
      ``.csv`` exists (its lines minus the header), else left for the caller to infer.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} for task {task!r}; allowed values: {list(FORMATS)}")
    base = _require_dir(Path(root), f"{fmt} dataset root")
    return FORMATS[fmt](base, split, {"image_size": image_size, "mean": mean, "std": std})
