"""RegMean from data: Grams collected on the embedded world through the CLI equal the library's."""

from __future__ import annotations

import torch

from vlmerge.cli import main
from vlmerge.data import default_tokenizer
from vlmerge.merge import collect_grams, merge_checkpoint
from vlmerge.merge.gram_data import world_batches
from vlmerge.models import VLMo, load_model, preset_config, save_model


def test_regmean_with_world_data_from_the_cli(tmp_path) -> None:
    torch.manual_seed(0)
    model = VLMo(preset_config("micro", "msa", vocab_size=default_tokenizer().vocab_size)).eval()
    for p in model.parameters():  # make the modality copies differ, as after VL pre-training
        p.data.add_(0.05 * torch.randn_like(p))
    save_model(model, tmp_path / "msa")
    assert main(["merge", "--method", "regmean", "--gamma", "0.5", "--data", "world", "--batches", "2",
                 str(tmp_path / "msa"), str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    assert merged.config.arch == "maa"
    grams = collect_grams(model, world_batches(model, 2, 0))
    merge_checkpoint("regmean", tmp_path / "msa", tmp_path / "ref", grams=grams, gamma=0.5)
    ref = load_model(tmp_path / "ref")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, atol=1e-6, rtol=1e-6)
    small = VLMo(preset_config("micro", "msa", vocab_size=50))
    save_model(small, tmp_path / "small")
    assert main(["merge", "--method", "regmean", "--data", "world", "--batches", "1", str(tmp_path / "small"),
                 str(tmp_path / "x")]) == 2
