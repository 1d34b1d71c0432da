"""UnIVAL §5 on the embedded world: merging models fine-tuned on *different multimodal tasks*.

    vlmerge study unival --preset tiny --out docs/results/unival-tiny

One pre-trained VLMo (MSA, ITC + ITM + MLM) is fine-tuned on each task of ``tasks`` (default VQA, NLVR2,
classification, ITM) three ways (:mod:`vlmerge.finetune.soups`): **vanilla** (from the pre-trained model),
**Fusing** (from the average of the other tasks' vanilla models) and **Ratatouille** (each other task's vanilla
model fine-tuned again on the task, then averaged). Then:

* **Scenario 1 (Fig. 2)**: for each pair (A, B) of ``pairs``, W = λ·W_A + (1 − λ)·W_B over ``lambdas``, both
  tasks scored at each λ (test split; the validation split picks the best λ), vanilla and Ratatouille;
* **Scenario 2 (Fig. 3, ID)**: uniform soups (λ = 1/N) of the N vanilla / Fusing / Ratatouille models, task
  arithmetic, TIES and DARE on the vanilla task vectors, a greedy soup, scored on every seen task beside
  the specialists;
* **Scenario 3 (Table 20, OOD)**: the same merged models on unseen splits / question families (``ood``:
  ``vqa@ood`` = VQA on the held-out colour-shape compositions with shifted rendering; ``size`` and
  ``largest-color``: question families never trained on), without further training.

``head: unified`` (the default) uses UnIVAL's unified answer head (:mod:`vlmerge.finetune.unified`): every
model has the same parameters and merges whole. ``head: task`` fine-tunes task-specific heads (ITM becomes
retrieval); merges then combine the backbones and each task keeps its own head; the OOD question families
need the unified head and are skipped.

**Statistics** (:mod:`vlmerge.study.stats`). Every score is a mean over test examples and carries its
bootstrap replicates (:class:`~vlmerge.study.stats.Scores`): B resamples of the test set's examples, the same
resamples for every model scored on that set (split name ``unival/<task>/<split>``), so differences between
models are paired. With several ``--seeds`` the scores are seed means with ``<key>_std`` beside them and the
replicates averaged over seeds. Each finding is a :class:`~vlmerge.study.findings.Claim` with a margin (positive:
the paper's direction) evaluated on the point values and on every replicate: reproduced / contradicted /
inconclusive as its 95 % interval lies above 0 / below 0 / contains 0 (:func:`~vlmerge.study.findings.decide`).

Writes ``report.md`` (tables with intervals, PNG plots, the computed findings beside the paper's numbers),
``results.json`` (every score with ``ci`` {task: [lo, hi]}) and ``findings.json``. Pre-training and fine-tunes
are cells (:mod:`vlmerge.study.cells`): a re-run resumes. Their results are model directories only; the
evaluations (and so the per-example outcomes behind the intervals) are recomputed on every run, never cached.

The study's modules: :mod:`.config` (the preset schema and the task / recipe lists), :mod:`.heads` (the two head
modes: how each trains, merges and scores the task models), :mod:`.runner` (the cells and scenarios of one seed,
the seed aggregation, :func:`run_unival`), :mod:`.findings` (UnIVAL's claims and their margins) and
:mod:`.report` (plots and ``report.md``). This package re-exports their public names.
"""

from __future__ import annotations

from .config import ID_TASKS, OOD_TASKS, RECIPES, UnivalConfig, load_unival_config
from .findings import FINDING_PARTS, PAPER, check_unival_findings, front_gain, unival_claims
from .heads import TASK_HEAD_NAMES, HeadMode, TaskHeads, UnifiedHeads, head_mode
from .report import LABELS, plot_all, render_report, write_report
from .runner import Unival, run_unival, unival_command

__all__ = [
    "FINDING_PARTS", "ID_TASKS", "LABELS", "OOD_TASKS", "PAPER", "RECIPES", "TASK_HEAD_NAMES", "HeadMode", "TaskHeads",
    "UnifiedHeads", "Unival", "UnivalConfig", "check_unival_findings", "front_gain", "head_mode",
    "load_unival_config", "plot_all", "render_report", "run_unival", "unival_claims", "unival_command",
    "write_report",
]
