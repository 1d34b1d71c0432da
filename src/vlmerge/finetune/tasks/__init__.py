"""Downstream tasks, registered by name: ``retrieval``, ``vqa``, ``nlvr2``, ``cls``, ``seg`` (and the
evaluation-only ``itm``, zero-shot image-text matching)."""

from . import vqa, nlvr2, vision, retrieval  # noqa: F401, I001  (registration, in this order)
from .base import TASKS, Labeled, Prep, Task, get_task, task_names
from .retrieval import rerank_scores

__all__ = ["TASKS", "Labeled", "Prep", "Task", "get_task", "rerank_scores", "task_names"]
