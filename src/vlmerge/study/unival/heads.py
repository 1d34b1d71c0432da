"""The two head modes of the UnIVAL study: the one place that knows how they differ.

``head: unified`` (:class:`UnifiedHeads`): UnIVAL's unified answer head (:mod:`vlmerge.finetune.unified`);
every task model has the same parameters, so a merged model is one state that answers every task.
``head: task`` (:class:`TaskHeads`): task-specific heads (ITM becomes retrieval); a merge combines the
backbones and each task keeps its own head, so a merged model is ``{task: state}``; the OOD question families
need the unified head and are skipped, and the pre-trained model (no task heads) is not scored.

:func:`head_mode` gives a preset's mode; :class:`~.runner.Unival` asks it which fine-tuning task trains a task,
which in-memory template evaluates it, and how models are viewed, merged, souped and scored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

State = Mapping[str, torch.Tensor]
Merge = Callable[[list[State], list[str] | None], dict[str, torch.Tensor]]
"""``merge(states, keys)``: ``keys`` of ``states`` merged (None: every key)."""

TASK_HEAD_NAMES = {"vqa": "vqa", "nlvr2": "nlvr2", "cls": "cls", "itm": "retrieval"}
"""Task -> the fine-tuning task in task-head mode (ITM's task-head counterpart is retrieval)."""


def _kind(task: str) -> str:
    """The task behind an evaluation set's name (``vqa@ood`` -> ``vqa``)."""
    return task.split("@")[0]


class HeadMode(ABC):
    """How one head mode trains, holds, merges and scores the task models."""

    name: ClassVar[str]
    scores_pretrained: ClassVar[bool]
    """Whether the pre-trained model is scored on the OOD sets."""

    @abstractmethod
    def finetune_task(self, task: str) -> str:
        """The fine-tuning task that trains ``task``'s model."""

    @abstractmethod
    def templates(self, tasks: Sequence[str]) -> dict[str, str]:
        """Template name -> the task whose vanilla model is loaded as that in-memory template."""

    @abstractmethod
    def template(self, task: str) -> str:
        """The template that evaluates ``task`` (an evaluation set's name)."""

    @abstractmethod
    def state(self, merged: Mapping[str, Any], task: str) -> Mapping[str, Any]:
        """The state of the merged model ``merged`` that evaluates ``task``."""

    @abstractmethod
    def view(self, state: State, task: str) -> Any:
        """``task``'s own model ``state`` as a merged model."""

    @abstractmethod
    def specialist_tasks(self, task: str, tasks: Sequence[str]) -> list[str]:
        """The seen tasks ``task``'s specialist is scored on."""

    @abstractmethod
    def ood(self, names: Sequence[str]) -> list[str]:
        """The OOD sets of ``names`` this mode can score."""

    @abstractmethod
    def merge(self, fn: Merge, models: Mapping[str, State]) -> Any:
        """``models`` (``{task: state}``) merged by ``fn`` into one merged model."""

    @abstractmethod
    def soup(self, members: Sequence[State], vanilla: Mapping[str, State], tasks: Sequence[str]) -> Any:
        """The uniform soup of ``members`` as a merged model for ``tasks`` (``vanilla``: each task's vanilla
        state)."""

    @abstractmethod
    def evaluate(self, model: Any, kind: str, items: Sequence[Mapping[str, Any]], tok: Any, batch_size: int
                 ) -> dict[str, Any]:
        """The evaluation record of ``model`` on task ``kind``'s ``items``: ``score``, ``n``, ``baseline`` and
        ``per_example`` outcomes (or retrieval ``ranks`` with ``n_images``)."""


class UnifiedHeads(HeadMode):
    """``head: unified``: every model one state with the same parameters, merged whole."""

    name = "unified"
    scores_pretrained = True

    def finetune_task(self, task: str) -> str:
        return task

    def templates(self, tasks: Sequence[str]) -> dict[str, str]:
        return {"unified": tasks[0]}

    def template(self, task: str) -> str:
        return "unified"

    def state(self, merged: Mapping[str, Any], task: str) -> Mapping[str, Any]:
        return merged

    def view(self, state: State, task: str) -> Any:
        return state

    def specialist_tasks(self, task: str, tasks: Sequence[str]) -> list[str]:
        return list(tasks)  # every seen task: cross-task transfer too

    def ood(self, names: Sequence[str]) -> list[str]:
        return list(names)

    def merge(self, fn: Merge, models: Mapping[str, State]) -> Any:
        return fn(list(models.values()), None)

    def soup(self, members: Sequence[State], vanilla: Mapping[str, State], tasks: Sequence[str]) -> Any:
        from ...finetune import soups

        return soups.soup(list(members))

    def evaluate(self, model: Any, kind: str, items: Sequence[Mapping[str, Any]], tok: Any, batch_size: int
                 ) -> dict[str, Any]:
        from ...finetune.unified import evaluate_unified

        return evaluate_unified(model, kind, items, tok, batch_size=batch_size)


class TaskHeads(HeadMode):
    """``head: task``: task-specific heads; merges combine the backbones, a merged model is ``{task: state}``."""

    name = "task"
    scores_pretrained = False  # no task heads to answer with

    def finetune_task(self, task: str) -> str:
        return TASK_HEAD_NAMES[task]

    def templates(self, tasks: Sequence[str]) -> dict[str, str]:
        return {t: t for t in tasks}

    def template(self, task: str) -> str:
        return _kind(task)

    def state(self, merged: Mapping[str, Any], task: str) -> Mapping[str, Any]:
        return merged[_kind(task)]

    def view(self, state: State, task: str) -> Any:
        return {task: state}

    def specialist_tasks(self, task: str, tasks: Sequence[str]) -> list[str]:
        return [task]  # its head answers its own task only

    def ood(self, names: Sequence[str]) -> list[str]:
        return [o for o in names if o == "vqa@ood"]  # the new question families need the unified head

    def merge(self, fn: Merge, models: Mapping[str, State]) -> Any:
        from ...finetune import soups

        return soups.merge_task_head_models(lambda s, k: fn(s, k), models)

    def soup(self, members: Sequence[State], vanilla: Mapping[str, State], tasks: Sequence[str]) -> Any:
        """The soup of the members' backbones (the first member's non-head keys); each task's head from its
        vanilla model."""
        from ...finetune import soups

        bb = soups.soup(list(members), keys=[k for k in members[0] if not soups.is_head_key(k)])
        return {t: {**bb, **{k: v for k, v in vanilla[t].items() if soups.is_head_key(k)}} for t in tasks}

    def evaluate(self, model: Any, kind: str, items: Sequence[Mapping[str, Any]], tok: Any, batch_size: int
                 ) -> dict[str, Any]:
        """The fine-tuning task's evaluator; ITM is retrieval (:func:`_retrieval`, with per-query ranks)."""
        from ...finetune.config import FinetuneConfig
        from ...finetune.tasks import Prep, get_task

        prep = Prep(tok, model.config.max_text_len, model.config.image_size)
        if kind == "itm":
            return _retrieval(model, items, prep, batch_size)
        name = TASK_HEAD_NAMES[kind]
        return get_task(name).evaluate(model, items, prep, FinetuneConfig(
            task=name, eval_batch_size=batch_size))  # type: ignore[arg-type]


def _retrieval(model: Any, items: Sequence[Mapping[str, Any]], prep: Any, batch_size: int) -> dict[str, Any]:
    """Task-head ITM = retrieval (the fine-tuning task's metric, ``r_mean``) with its per-query ranks."""
    from ...finetune.tasks.retrieval import encode_split
    from ...pretrain.evaluate import (
        dataset_relevance,
        ranks_record,
        recalls_from_ranks,
        retrieval_chance,
        retrieval_ranks,
    )

    enc = encode_split(model, items, prep, batch_size)
    rel, _ = dataset_relevance(items, enc["txt2img"].tolist(), enc["texts"])
    rk = retrieval_ranks(enc["img"] @ enc["txt"].t(), rel)
    return {"score": recalls_from_ranks(rk["tr"], rk["ir"])["r_mean"], "n": len(items),
            "n_images": int(enc["img"].shape[0]),
            "ranks": ranks_record(rk, enc["txt2img"].tolist()),
            "baseline": {"kind": "chance", "r_mean": retrieval_chance(rel)["r_mean"]}}


HEAD_MODES: dict[str, type[HeadMode]] = {"unified": UnifiedHeads, "task": TaskHeads}


def head_mode(head: str) -> HeadMode:
    """The head mode of a preset's ``head`` (``unified`` / ``task``)."""
    if head not in HEAD_MODES:
        raise ValueError(f"head {head!r} is unknown; allowed values: {sorted(HEAD_MODES)}")
    return HEAD_MODES[head]()
