"""UnIVAL's unified input/output for the fine-tuning tasks: every task answers in a word of the shared vocabulary.

With ``head: unified`` in the fine-tuning config (``vlmerge finetune vqa CKPT --set head=unified``) a task
needs no task-specific head: its text becomes ``[MASK] <prompt / question / statement / caption>``, the
image(s) and text go through the fusion route, and the pre-trained **MLM head** scores the vocabulary at the
``[MASK]`` position; the logits are restricted to the task's candidate answers (:data:`ANSWER_SPACE`) and
trained with cross-entropy. Models fine-tuned this way on different tasks have identical parameter sets
(backbone + the pre-training heads), so a merge of them is a complete model with no head left over.

=========  ==============================================  ==========================================
task       input text (after ``[MASK]``)                    candidate answers
=========  ==============================================  ==========================================
vqa        the question                                    the world's VQA answers (:data:`ANSWERS`)
nlvr2      the statement (both images, see below)          ``true`` / ``false``
cls        ``what shape is the largest object?``           the class names (:data:`SHAPES`)
itm        a caption (half replaced by another image's)    ``yes`` / ``no``
size       ``what size is the <shape>?``  (OOD family)     ``small`` / ``large``
largest-   ``what color is the largest object?`` (OOD      the colour names
color      family: scenes with exactly one large object)
=========  ==============================================  ==========================================

``size`` and ``largest-color`` are question families no fine-tuning task contains (evaluation only); the
VQA questions of the world's ``ood`` split (held-out colour-shape compositions, shifted rendering) are the
third unseen split.

**Answer tokens.** The world tokenizer is closed over the scene grammar, so ``yes``, ``no``, ``true`` and
``false`` are not single tokens (they are spelled ``y ##e ##s`` …). A candidate answer is represented by its
**first word piece** (``y``, ``n``, ``t``, ``f``; every other answer is one token); :func:`answer_token_ids`
refuses a task whose answers share a first piece or map to ``[UNK]``. The vocabulary is not extended: that
would change the pre-trained checkpoint's embedding and MLM-decoder shapes.

**NLVR2.** Each (image, statement) pair goes through the fusion route; the two ``[MASK]`` hidden states are
averaged before the MLM head (the images are not fused with each other, unlike the task head's concatenated
[T_CLS] pair).

**ITM.** Items are image-caption pairs (the retrieval data); in every batch the items at odd positions get
the caption of the next item with another image (answer ``no``), the rest keep theirs (``yes``): half of
the examples are negatives, deterministically for a given batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.datasets import MEAN, STD
from ..data.world import COLOR_NAMES, World
from ..models import VLMo
from .config import FinetuneConfig
from .tasks import TASKS, task_names
from .tasks.base import Prep, Task, get_task, predict_all

OOD_FAMILIES: dict[str, tuple[str, ...]] = {"size": ("small", "large"), "largest-color": COLOR_NAMES}
"""Evaluation-only question families of the embedded world (OOD for a model fine-tuned on the tasks), with
their candidate answers."""
UNIFIED_FINETUNE_TASKS: tuple[str, ...] = tuple(n for n in task_names() if TASKS[n].unified_answers is not None)
"""Tasks a unified model is fine-tuned on: every registered task with ``unified_answers``."""
ANSWER_SPACE: dict[str, tuple[str, ...]] = {
    **{n: TASKS[n].unified_answers for n in UNIFIED_FINETUNE_TASKS}, **OOD_FAMILIES}  # type: ignore[dict-item]
"""Task -> its candidate answers, in target-index order (cls: class index k is ``SHAPES[k]``)."""
CLS_PROMPT = "what shape is the largest object?"
ANSWER_TOKENS = "first word piece"


# ------------------------------------------------------------------------------------------------ answers
def answer_token_ids(tokenizer: Any, answers: Sequence[str], task: str = "task") -> list[int]:
    """The vocabulary id standing for each answer: its first word piece. ``ValueError`` when an answer is
    empty / ``[UNK]`` or two answers share a first piece (they could not be told apart)."""
    ids: list[int] = []
    for a in answers:
        row = tokenizer.encode([a], 8)["input_ids"][0].tolist()  # [CLS] pieces… [SEP] [PAD]…
        first = row[1]
        if first in (tokenizer.sep_id, tokenizer.pad_id, tokenizer.unk_id):
            raise ValueError(f"{task}: answer {a!r} has no word piece in the tokenizer's vocabulary")
        ids.append(int(first))
    seen: dict[int, str] = {}
    clashes = []
    for a, i in zip(answers, ids, strict=True):
        if i in seen:
            clashes.append(f"{seen[i]!r} / {a!r}")
        seen.setdefault(i, a)
    if clashes:
        raise ValueError(f"{task}: answers share their first word piece: {', '.join(clashes)}; "
                         "allowed: answers whose first word pieces differ")
    return ids


def unified_record(tokenizer: Any) -> dict[str, Any]:
    """What a unified checkpoint records under ``config.json`` ``"unified"``: the answer space (every task's
    answers), how answers map to tokens, and the tokenizer's fingerprint. Merges compare these."""
    return {"answers": {k: list(v) for k, v in ANSWER_SPACE.items()}, "answer_tokens": ANSWER_TOKENS,
            "tokenizer": getattr(tokenizer, "fingerprint", None)}


def unified_text(task: str, text: str | None) -> str:
    """The unified input text: ``[MASK]`` first (never truncated away), then the prompt / question."""
    if task == "cls":
        return f"[MASK] {CLS_PROMPT}"
    return f"[MASK] {text}"


# ------------------------------------------------------------------------------------------------ OOD data
class QuestionFamilyDataset(Dataset):
    """A question family the fine-tuning tasks never ask, over the first scenes of ``world`` that support it.

    ``size``: ``what size is the <shape>?`` about a shape occurring once (the first such object);
    ``largest-color``: ``what color is the largest object?`` on scenes with exactly one large object.
    Items: ``image`` [3, S, S] in [0, 1], ``text``, ``answer`` (str). ``n`` = scenes scanned.
    """

    def __init__(self, world: World, n: int, family: str) -> None:
        if family not in OOD_FAMILIES:
            raise ValueError(f"unknown question family {family!r}; allowed values: {list(OOD_FAMILIES)}")
        if n < 1:
            raise ValueError(f"n={n} is invalid; allowed values: an integer ≥ 1")
        self.world, self.family = world, family
        self.rows: list[tuple[int, str, str]] = []
        for i in range(n):
            objs = world._content(0, i, 0)[0]
            shapes = [o.shape for o in objs]
            if family == "size":
                unique = [o for o in objs if shapes.count(o.shape) == 1]
                if unique:
                    self.rows.append((i, f"what size is the {unique[0].shape}?", unique[0].size))
            else:
                large = [o for o in objs if o.size == "large"]
                if len(large) == 1:
                    self.rows.append((i, "what color is the largest object?", large[0].color))
        if not self.rows:
            raise ValueError(f"{family}: none of the first {n} scenes supports the question; use more scenes")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from ..data.datasets import to_tensor

        idx, text, answer = self.rows[i]
        return {"image": to_tensor(self.world[idx].image), "text": text, "answer": answer}


def unified_dataset(task: str, split: str, n: int, *, image_size: int = 32, seed: int = 0,
                    world: Mapping[str, Any] | None = None) -> Dataset:
    """The embedded world's data for a unified task: the fine-tuning tasks' datasets (``vqa``, ``nlvr2``,
    ``cls``, ``itm``), or an OOD question family, over the first ``n`` scenes (NLVR2: examples)."""
    from ..data import WorldConfig
    from .data import embedded_dataset

    if task in OOD_FAMILIES:
        wc = WorldConfig.from_dict({"image_size": max(16, min(512, image_size)), **(world or {})})
        return QuestionFamilyDataset(World(wc, split=split, seed=seed), n, task)
    if task not in ANSWER_SPACE:
        raise ValueError(f"unknown unified task {task!r}; allowed values: {list(ANSWER_SPACE)}")
    return embedded_dataset(task, split, n, seed, image_size, dict(world or {}))


# ---------------------------------------------------------------------------------------------------- task
class UnifiedTask(Task):
    """One task in the unified answer mode (registered as ``u-<task>``; chosen by ``head: unified``).

    Metric: ``accuracy`` (= ``score``, percent; for VQA the VQA score of the arg-max answer, equal to the
    accuracy on the world's one-answer questions); baseline: the best constant answer on the same items.
    ``per_example`` [n]: each item's outcome in percent (its target's score of the arg-max answer × 100: 100 / 0,
    a soft VQA score in between), in dataset order; ``accuracy`` is their mean (ITM: an item is the pair its
    batch position makes, positive or negative, see the module docstring).
    """

    heads: ClassVar[tuple[str, ...]] = ("mlm",)
    vision: ClassVar[bool] = False
    unified_mode: ClassVar[bool] = True
    headline: ClassVar[str] = "accuracy"

    def __init__(self, key: str) -> None:
        self.key = key
        self.name = f"u-{key}"  # type: ignore[misc]
        self.answers = ANSWER_SPACE[key]
        self.data_format = "embedded"  # type: ignore[misc]
        self.trainable = key in UNIFIED_FINETUNE_TASKS  # type: ignore[misc]
        self._ids: dict[str, list[int]] = {}

    def candidate_ids(self, tokenizer: Any) -> list[int]:
        key = getattr(tokenizer, "fingerprint", id(tokenizer))
        if key not in self._ids:
            self._ids[key] = answer_token_ids(tokenizer, self.answers, self.name)
        return self._ids[key]

    def _target(self, item: Mapping[str, Any]) -> torch.Tensor:
        """[C] soft target over the candidates."""
        c = len(self.answers)
        if self.key == "vqa":
            scores = torch.as_tensor(item["answer_scores"] if "answer_scores" in item else item["target"]).float()
            if scores.numel() != c:
                raise ValueError(f"{self.name}: items score {scores.numel()} answers; the unified VQA answer "
                                 f"space has {c} (the embedded world's)")
            return scores
        if self.key == "nlvr2":
            k = 0 if int(item["label"]) else 1
        elif self.key == "cls":
            k = int(item["label"])
        elif isinstance(item.get("answer"), str):
            if item["answer"] not in self.answers:
                raise ValueError(f"{self.name}: answer {item['answer']!r} is not a candidate; allowed: "
                                 f"{list(self.answers)}")
            k = self.answers.index(item["answer"])
        else:
            raise ValueError(f"{self.name}: an item needs a string 'answer'")
        if not 0 <= k < c:
            raise ValueError(f"{self.name}: label {k} is outside the {c} candidate answers")
        return F.one_hot(torch.tensor(k), c).float()

    def collate(self, items: list[Mapping[str, Any]], prep: Prep, train: bool) -> dict[str, Any]:
        texts = [it.get("text") for it in items]
        if self.key == "itm":
            targets, ids_ = [], [it.get("image_id", i) for i, it in enumerate(items)]
            texts = list(texts)
            for j in range(len(items)):
                neg = None
                if j % 2 == 1:
                    for step in range(1, len(items)):
                        k = (j + step) % len(items)
                        if ids_[k] != ids_[j]:
                            neg = k
                            break
                if neg is not None:
                    texts[j] = items[neg]["text"]
                targets.append(F.one_hot(torch.tensor(1 if neg is not None else 0), 2).float())
            target = torch.stack(targets)
        else:
            target = torch.stack([self._target(it) for it in items])
        ids, att = prep.texts([unified_text(self.key, t) for t in texts])
        mask = ids == prep.tokenizer.mask_id
        if not bool(mask.any(1).all()):
            raise ValueError(f"{self.name}: the [MASK] token was lost (max_len={prep.max_len} too short?)")
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": att, "mask_pos": mask.float().argmax(1),
                                 "target": target, "candidates": torch.tensor(self.candidate_ids(prep.tokenizer))}
        if self.key == "nlvr2":
            batch["image0"] = prep.images([it["image"] for it in items], train)
            batch["image1"] = prep.images([it["image_b"] for it in items], train)
        else:
            batch["image"] = prep.images([it["image"] for it in items], train)
        return batch

    @staticmethod
    def logits(model: VLMo, batch: Mapping[str, Any]) -> torch.Tensor:
        """[B, C] candidate logits of the MLM head at the [MASK] position (NLVR2: the two pairs' mask states
        averaged)."""
        ids, att, pos = batch["input_ids"], batch["attention_mask"], batch["mask_pos"]
        b = ids.shape[0]
        rows = torch.arange(b, device=ids.device)
        if "image0" in batch:
            fused = model.forward_fusion(torch.cat([batch["image0"], batch["image1"]]), ids.repeat(2, 1),
                                         att.repeat(2, 1))
            h = (fused[rows, pos] + fused[rows + b, pos]) / 2
        else:
            h = model.forward_fusion(batch["image"], ids, att)[rows, pos]
        return model.heads["mlm"](h)[:, batch["candidates"]]

    def loss(self, model: VLMo, batch: Mapping[str, Any], config: FinetuneConfig) -> dict[str, torch.Tensor]:
        logits = self.logits(model, batch).float()
        target = batch["target"]
        loss = -(target / target.sum(1, keepdim=True).clamp_min(1e-8) * logits.log_softmax(1)).sum(1).mean()
        with torch.no_grad():
            acc = target.gather(1, logits.argmax(1, keepdim=True)).mean() * 100
        return {"loss": loss, "accuracy": acc}

    def evaluate(self, model: VLMo, dataset: Any, prep: Prep, config: FinetuneConfig) -> dict[str, Any]:
        if "mlm" not in model.heads:
            raise ValueError(f"{self.name}: the unified answer mode needs the model's 'mlm' head (pre-train with MLM)")
        loader = self.loader(dataset, prep, config.eval_batch_size, train=False)
        res = predict_all(model, loader, lambda m, b: {"pred": self.logits(m, b).argmax(1), "target": b["target"]})
        hit = res["target"].gather(1, res["pred"][:, None]).squeeze(1)
        acc = float(hit.mean() * 100)
        return {"accuracy": acc, "score": acc, "n": len(hit), "head": "unified",
                "per_example": (100.0 * hit.double()).tolist(),
                "baseline": {"kind": "best constant answer", "accuracy": float(res["target"].mean(0).max() * 100)}}


UNIFIED_TASKS: dict[str, UnifiedTask] = {k: UnifiedTask(k) for k in ANSWER_SPACE}
for _k, _t in UNIFIED_TASKS.items():
    TASKS[_t.name] = _t


def task_for(task: str, head: str = "task") -> Task:
    """The implementation of ``task`` under ``head`` (``task``: the registered task; ``unified``: ``u-<task>``)."""
    if head == "task":
        return get_task(task)
    if head != "unified":
        raise ValueError(f"head={head!r} is invalid; allowed values: ['task', 'unified']")
    if task not in UNIFIED_TASKS:
        raise ValueError(f"task {task!r} has no unified answer mode; allowed values: {list(UNIFIED_TASKS)}")
    return UNIFIED_TASKS[task]


def evaluate_unified(model: VLMo, task: str, dataset: Any, tokenizer: Any = None, *, batch_size: int = 256,
                     mean: Sequence[float] = MEAN, std: Sequence[float] = STD
                     ) -> dict[str, Any]:
    """Score a model in memory on a unified task's ``dataset`` (any items the task reads); see
    :meth:`UnifiedTask.evaluate` (``score`` = the mean of ``per_example``, each item's outcome in percent, what a
    bootstrap over test items resamples). ``tokenizer`` defaults to the world's."""
    from ..data import default_tokenizer

    t = task_for(task, "unified")
    tok = tokenizer if tokenizer is not None else default_tokenizer()
    prep = Prep(tokenizer=tok, max_len=model.config.max_text_len, image_size=model.config.image_size,
                mean=tuple(mean), std=tuple(std))
    cfg = FinetuneConfig(task="vqa", eval_batch_size=batch_size)
    training = model.training
    try:
        return t.evaluate(model, dataset, prep, cfg)
    finally:
        model.train(training)


def materialize(dataset: Any) -> list[dict[str, Any]]:
    """Every item of ``dataset`` rendered once into a list (evaluated many times by a study)."""
    return [dataset[i] for i in range(len(dataset))]


__all__ = ["ANSWER_SPACE", "OOD_FAMILIES", "UNIFIED_FINETUNE_TASKS", "UNIFIED_TASKS", "QuestionFamilyDataset",
           "UnifiedTask", "answer_token_ids", "evaluate_unified", "materialize", "task_for", "unified_dataset",
           "unified_record", "unified_text"]
