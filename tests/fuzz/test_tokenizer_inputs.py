"""A checkpoint's tokenizer record is self-contained: rebuilt from the record alone, never from a path in it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzz_helpers import snapshot

from vlmerge.cli import main
from vlmerge.data import Tokenizer
from vlmerge.finetune.data import tokenizer_from_config
from vlmerge.models import VLMo, preset_config, save_model

TEXTS = ["a red circle left of a blue box", "two green squares"]


@pytest.fixture()
def trained() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=60)


@pytest.fixture()
def vocab_tok(trained: Tokenizer, tmp_path: Path) -> Tokenizer:
    (tmp_path / "vocab.txt").write_text("\n".join(trained.tokens) + "\n", encoding="utf-8")
    return Tokenizer.from_vocab(tmp_path / "vocab.txt")


@pytest.fixture()
def file_tok(trained: Tokenizer, tmp_path: Path) -> Tokenizer:
    trained.save(tmp_path / "tokenizer.json")
    return Tokenizer.from_file(tmp_path / "tokenizer.json")


def no_file_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on the tokenizer file readers fail the test if called (from_config may not read a file)."""
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("from_config opened a file")

    monkeypatch.setattr(Tokenizer, "from_vocab", classmethod(refuse))
    monkeypatch.setattr(Tokenizer, "from_file", classmethod(refuse))


def test_to_config_embeds_the_vocabulary(vocab_tok: Tokenizer, file_tok: Tokenizer, tmp_path: Path) -> None:
    v = vocab_tok.to_config()
    assert v["kind"] == "vocab" and v["vocab"] == vocab_tok.tokens and v["source"] == str(tmp_path / "vocab.txt")
    f = file_tok.to_config()
    assert f["kind"] == "file" and isinstance(f["json"], str) and f["source"] == str(tmp_path / "tokenizer.json")
    assert json.loads(json.dumps(f)) == f  # it fits in config.json


@pytest.mark.parametrize("which", ["vocab_tok", "file_tok"])
def test_from_config_rebuilds_without_the_source_file(which: str, request: pytest.FixtureRequest,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    no_file_reads(monkeypatch)
    cfg = json.loads(json.dumps(tok.to_config()))
    Path(cfg["source"]).unlink()  # the file it came from is gone: the checkpoint alone suffices
    back = Tokenizer.from_config(cfg)
    assert back.kind == tok.kind and back.tokens == tok.tokens and back.fingerprint == tok.fingerprint
    assert back.source == cfg["source"]  # kept as information only
    ids = tok.encode(TEXTS, 12)["input_ids"]
    assert torch.equal(back.encode(TEXTS, 12)["input_ids"], ids)


def test_source_pointing_elsewhere_is_never_opened(vocab_tok: Tokenizer, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    no_file_reads(monkeypatch)
    other = tmp_path / "other.txt"
    other.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nzzz\n")
    cfg = {**vocab_tok.to_config(), "source": str(other)}
    assert Tokenizer.from_config(cfg).tokens == vocab_tok.tokens


@pytest.mark.parametrize("kind", ["vocab", "file"])
@pytest.mark.parametrize("source", ["/etc/passwd", "vocab.txt", "../vocab.txt"])
def test_source_only_config_is_refused_without_root(kind: str, source: str) -> None:
    with pytest.raises(ValueError, match=rf"^where: the '{kind}' tokenizer is not embedded in the checkpoint"):
        Tokenizer.from_config({"kind": kind, "source": source, "vocab_size": 60}, where="where")


def test_source_only_config_inside_root_is_read(vocab_tok: Tokenizer, trained: Tokenizer, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "vocab.txt").write_text("\n".join(trained.tokens) + "\n", encoding="utf-8")
    trained.save(ck / "tok.json")
    legacy = {"kind": "vocab", "source": "vocab.txt", "vocab_size": vocab_tok.vocab_size,
              "fingerprint": vocab_tok.fingerprint}
    assert Tokenizer.from_config(legacy, root=ck).tokens == vocab_tok.tokens
    assert tokenizer_from_config(legacy, root=ck).tokens == vocab_tok.tokens
    legacy_file = {"kind": "file", "source": "tok.json", "fingerprint": trained.fingerprint}
    assert Tokenizer.from_config(legacy_file, root=str(ck)).fingerprint == trained.fingerprint
    with pytest.raises(ValueError, match="fingerprint="):  # the verification stays
        Tokenizer.from_config({**legacy, "fingerprint": "0" * 16}, root=ck)


@pytest.mark.parametrize(("source", "why"), [
    ("/etc/passwd", "is an absolute path"),
    ("../vocab.txt", "points outside"),
    ("sub/../../vocab.txt", "points outside"),
    ("~/vocab.txt", "is an absolute path"),
    ("", "expected a relative file name"),
    (7, "expected a relative file name"),
])
def test_source_only_config_outside_root_is_refused(vocab_tok: Tokenizer, tmp_path: Path, source: Any,
                                                    why: str) -> None:
    (tmp_path / "ck").mkdir()
    cfg = {"kind": "vocab", "source": source}
    with pytest.raises(ValueError, match="is not embedded in the checkpoint") as e:
        Tokenizer.from_config(cfg, root=tmp_path / "ck")
    assert why in str(e.value)


@pytest.mark.parametrize(("cfg", "match"), [
    ("world", "expected an object with a 'kind' entry, got str"),
    (["vocab"], "expected an object with a 'kind' entry, got list"),
    (None, "expected an object with a 'kind' entry, got NoneType"),
    ({"kind": ["world"]}, "cannot rebuild kind=\\['world'\\]"),
    ({"kind": "bpe"}, "cannot rebuild kind='bpe'"),
    ({"kind": "trained"}, "kind 'trained' needs its 'vocab' list"),
    ({"kind": "trained", "vocab": "abc"}, "'vocab' is invalid; expected a non-empty list of token strings"),
    ({"kind": "vocab", "vocab": [1, 2, 3]}, "'vocab' is invalid"),
    ({"kind": "vocab", "vocab": []}, "'vocab' is invalid"),
    ({"kind": "vocab", "vocab": ["[PAD]", "a"]}, "lacks the special tokens"),
    ({"kind": "vocab", "vocab": ["[PAD]", "[PAD]"]}, "duplicate tokens"),
    ({"kind": "file", "json": 3}, "'json' is invalid; expected the tokenizer.json text"),
    ({"kind": "file", "json": "{"}, "'json' is not a valid tokenizer.json"),
])
def test_malformed_records_are_one_line_value_errors(cfg: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        Tokenizer.from_config(cfg, where="ck/config.json 'tokenizer'")
    assert str(e.value).startswith("ck/config.json 'tokenizer': ") and "\n" not in str(e.value)


def test_embedded_vocab_is_still_verified(vocab_tok: Tokenizer) -> None:
    cfg = vocab_tok.to_config()
    with pytest.raises(ValueError, match="has fingerprint=.* but the checkpoint recorded"):
        Tokenizer.from_config({**cfg, "vocab": [*cfg["vocab"][:-1], "zzz"]})
    with pytest.raises(ValueError, match="has vocab_size="):
        Tokenizer.from_config({**cfg, "vocab": cfg["vocab"][:-1]})


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.fixture()
def ckpt(vocab_tok: Tokenizer, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = VLMo(preset_config("micro", "msa", vocab_size=vocab_tok.vocab_size))
    return save_model(model, tmp_path / "ck", tokenizer=vocab_tok.to_config())


@pytest.mark.parametrize(("record", "expected"), [
    ({"kind": "vocab", "source": "/etc/passwd", "vocab_size": 60}, "is not embedded in the checkpoint"),
    ({"kind": "vocab", "source": "../vocab.txt"}, "points outside"),
    ({"kind": "file", "source": "/etc/hostname"}, "is an absolute path"),
    ("world", "expected an object with a 'kind' entry"),
    ({"kind": "vocab", "vocab": [1, 2]}, "'vocab' is invalid"),
])
def test_eval_refuses_a_tokenizer_record_in_one_line(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     record: Any, expected: str) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "tokenizer": record}))
    before = snapshot(tmp_path)
    assert main(["eval", "retrieval", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{ckpt / 'config.json'} 'tokenizer'" in err and expected in err, err
    assert snapshot(tmp_path) == before
