"""Downstream tasks, registered by name: ``retrieval``, ``vqa``, ``nlvr2``, ``cls``, ``seg`` (and the
evaluation-only ``itm``, zero-shot image-text matching)."""

from . import nlvr2, retrieval, vision, vqa  # noqa: F401  (registration)
from .base import TASKS, Prep, Task, get_task
from .retrieval import rerank_scores

__all__ = ["TASKS", "Prep", "Task", "get_task", "rerank_scores"]
