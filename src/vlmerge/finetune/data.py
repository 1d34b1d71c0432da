"""Where a task's examples come from: the embedded procedural world (:mod:`vlmerge.data`) or real-format
files (:mod:`vlmerge.data.formats`), behind one function, :func:`load_split`.

Every dataset returned yields the item dicts the tasks read (:mod:`.tasks`): ``image`` [3, S, S] in
[0, 1], ``text``, and the task's labels: ``image_id`` (retrieval), ``answer_scores`` [A] (VQA),
``image_b`` + ``label`` (NLVR2), ``label`` (classification), ``mask`` (segmentation). Label-set sizes
travel as dataset attributes (``num_answers``, ``num_classes``) so heads are sized without a pass over
the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from .config import DataConfig
from .tasks.base import Labeled

EMBEDDED_SPLITS = ("train", "val", "test", "ood")


def tokenizer_from_config(cfg: Any, root: str | Path | None = None, where: str = "tokenizer config") -> Any:
    """Rebuild the tokenizer a checkpoint recorded (``config.json`` ``"tokenizer"``) from the record alone.

    ``root`` (the checkpoint folder) lets an older record that names only a ``source`` file be read when that
    file lies inside ``root``; ``where`` names the record in errors (see :meth:`Tokenizer.from_config`).
    """
    from ..data import Tokenizer

    return Tokenizer.from_config(cfg, root=None if root is None else Path(root), where=where)


def embedded_dataset(task: str, split: str, size: int, seed: int = 0, image_size: int = 32,
                     world: dict[str, Any] | None = None, cache_dir: str | Path | None = None) -> Dataset:
    """``task``'s dataset over the first ``size`` scenes (NLVR2: examples) of the world's ``split``,
    rendered at ``image_size`` px, ``world`` overriding :class:`~vlmerge.data.WorldConfig` fields.

    Retrieval / ITM: every caption of each scene (5 per image); VQA: every question (5 per scene).
    ``cache_dir``: render once into ``.npz`` shards in :func:`~vlmerge.data.cache_folder` under this folder,
    so runs that share it (and the pre-training engine's ``data.cache_dir``) render each scene once.
    """
    from ..data import World, WorldConfig, cache_folder
    from .tasks import get_task

    if split not in EMBEDDED_SPLITS:
        raise ValueError(f"unknown split {split!r} of the embedded world; allowed values: {list(EMBEDDED_SPLITS)}")
    wc = WorldConfig.from_dict({"image_size": max(16, min(512, image_size)), **(world or {})})
    source = World(wc, split=split, seed=seed)
    handler = get_task(task)
    cache = None if cache_dir is None else cache_folder(cache_dir, source, handler.cache_kind)
    return handler.embedded(source, size, cache)


def file_dataset(task: str, split: str, cfg: DataConfig, image_size: int) -> Dataset:
    """``task``'s dataset read from ``cfg.root`` in ``cfg.format`` (see :mod:`vlmerge.data.formats`)."""
    from ..data import formats
    from .tasks import get_task

    expected = get_task(task).data_format
    if cfg.format != expected:
        raise ValueError(f"data.format={cfg.format!r} does not fit task {task!r}; allowed values: ['embedded', "
                         f"{expected!r}]")
    return formats.load_task_dataset(task, cfg.format, cfg.root, split, image_size=image_size)


def load_split(task: str, split: str, cfg: DataConfig, image_size: int = 32, limit: int | None = None,
               size: int | None = None) -> Dataset:
    """The dataset of ``task``'s ``split`` per ``cfg``; at most ``limit`` items (the first ones).

    Embedded: ``size`` scenes (default ``cfg.train_size`` for the train split, else ``cfg.eval_size``),
    rendered at ``cfg.image_size`` or, unset, ``image_size`` (the model's).
    """
    if cfg.format == "embedded":
        n = size or (cfg.train_size if split == cfg.train_split else cfg.eval_size)
        ds = embedded_dataset(task, split, n, cfg.world_seed, cfg.image_size or image_size, cfg.world, cfg.cache_dir)
    else:
        ds = file_dataset(task, split, cfg, image_size)
    if limit is not None and limit < len(ds):
        sizes = {k: getattr(ds, k) for k in ("num_answers", "num_classes", "answers", "classes") if hasattr(ds, k)}
        ds = Labeled(Subset(ds, range(limit)), **sizes)
    return ds
