"""Downstream fine-tuning and evaluation (merging paper §5, §6.5, Table 6; VLMo §3.5, §4.3-4.5, supp. A.2).

>>> from vlmerge.finetune import finetune, evaluate
>>> out = finetune("vqa", "runs/pt/final", "runs/ft/vqa")            # -> checkpoint dir + metrics.json
>>> evaluate("retrieval", "runs/pt/final", "ood")["avg_tr"]          # zero-shot retrieval, OOD split

Tasks: ``retrieval`` (dual encoder, ITC; optional ITM rerank), ``vqa``, ``nlvr2``, ``cls``, ``seg``; and
``itm`` (zero-shot image-text matching, evaluation only).

``head: unified`` (``--set head=unified``) fine-tunes ``vqa``, ``nlvr2``, ``cls`` or ``itm`` in UnIVAL's unified
answer mode (:mod:`.unified`: the MLM head answers in vocabulary words, so task models share one parameter set);
:mod:`.soups` merges task models (interpolation, soups, Fusing, Ratatouille, greedy soup, TIES / DARE).
"""

from .api import evaluate, finetune, infer_preset, make_config, zero_shot
from .config import DataConfig, FinetuneConfig, resolve_config
from .metrics import (
    accuracy,
    confusion_matrix,
    miou,
    miou_from_confusion,
    recall_at_k,
    retrieval_chance,
    retrieval_metrics,
    vqa_score,
    vqa_soft_score,
)
from .tasks import get_task, rerank_scores, task_names

__all__ = [
    "task_names", "DataConfig", "FinetuneConfig", "accuracy", "confusion_matrix", "evaluate",
    "finetune", "get_task", "infer_preset", "make_config", "miou", "miou_from_confusion", "recall_at_k",
    "rerank_scores", "resolve_config", "retrieval_chance", "retrieval_metrics", "vqa_score", "vqa_soft_score",
    "zero_shot",
]
