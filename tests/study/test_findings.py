"""The findings checker on hand-made results: both outcomes of every finding are exercised."""

from __future__ import annotations

import copy

from vlmerge.study.findings import CHECKERS, check_findings


def s(tr: float, ir: float | None = None, vqa: float | None = None) -> dict:
    out = {"tr": tr, "ir": tr if ir is None else ir}
    if vqa is not None:
        out["vqa"] = vqa
    return out


PAPER_LIKE = {
    "table1": {"maa": s(80, 70, vqa=70), "msa": s(85, 75, vqa=72), "merging_baseline": s(70, 60, vqa=65)},
    "figure3": {"k_seed": [0, 25, 50, 75], "before": [s(80), s(79), s(78), s(77)],
                "after": [s(70), s(74), s(76), s(76)]},
    "table2": {
        "interpolation": {"0.0": s(60), "0.25": s(70), "0.5": s(74), "0.75": s(75), "1.0": s(72)},
        "modality_arithmetic": {"0.0": s(73), "0.25": s(74), "0.5": s(74), "0.75": s(71), "1.0": s(65)},
        "regmean": {"0.0": s(75), "0.25": s(75.2), "0.5": s(75.1), "0.75": s(75), "1.0": s(75.1)},
    },
    "figure4": {"msa": {"before": s(80), "after": s(75)}, "custom-attn": {"before": s(78), "after": s(74)},
                "custom-ffn": {"before": s(79), "after": s(74)}, "custom-ln": {"before": s(76), "after": s(75.5)},
                "maa": {"before": s(76), "after": s(76)}},
    "table3": {"ours": {"nlvr2": 70, "cls": 80}, "merging_baseline": {"nlvr2": 52, "cls": 79}},
    "table5": {"pearson": {"l2": 0.8, "cosine": 0.9, "ssd": 0.92, "tssd": 0.97}},
}


def test_every_finding_reproduces_on_paper_like_numbers() -> None:
    found = check_findings(PAPER_LIKE)
    assert len(found) == len(CHECKERS)
    assert all(f.reproduced for f in found), [f.id for f in found if not f.reproduced]
    by_id = {f.id: f for f in found}
    assert "from 10.00 (K_seed=0) to 1.00 (K_seed=75)" in by_id["seed_reduces_drop"].ours
    assert "9.16" in by_id["seed_reduces_drop"].paper


def test_every_finding_can_fail() -> None:
    r = copy.deepcopy(PAPER_LIKE)
    r["table1"]["merging_baseline"] = s(90, 80, vqa=75)  # merging improves: no drop
    r["table1"]["maa"] = s(95, 90, vqa=80)
    r["figure3"]["after"] = [s(75), s(70), s(74), s(76)]  # drops 5, 9, 4, 1: not monotone; best still < first
    r["table2"]["interpolation"] = {"0.0": s(75), "0.25": s(76), "0.5": s(70), "0.75": s(70), "1.0": s(71)}
    r["table2"]["modality_arithmetic"]["1.0"] = s(80)
    r["table2"]["regmean"] = {"0.0": s(78), "1.0": s(60)}
    r["figure4"]["custom-attn"]["before"] = s(90)
    r["figure4"]["custom-ln"]["after"] = s(60)
    r["figure4"]["msa"]["after"] = s(60)
    r["table3"]["ours"]["cls"] = 70
    r["table5"]["pearson"]["l2"] = 0.99
    found = {f.id: f.reproduced for f in check_findings(r)}
    assert found.pop("seed_reduces_drop") is True
    assert not any(found.values()), found
    r["figure3"]["after"] = [s(75), s(70), s(70), s(70)]
    assert not {f.id: f.reproduced for f in check_findings(r)}["seed_reduces_drop"]


def test_missing_parts_are_skipped() -> None:
    assert check_findings({}) == []
    only = check_findings({"table2": PAPER_LIKE["table2"]})
    assert {f.source.split()[0] for f in only} == {"Table"} and len(only) == 5


def test_report_renders_tables_plots_and_findings(tmp_path) -> None:
    from vlmerge.study.report import write_report

    results = copy.deepcopy(PAPER_LIKE)
    results["table5"].update({"k_seed": [0, 25, 50, 75], "drop": [10, 5, 2, 1],
                              "metrics": {"l2": [4, 3, 2, 1], "tssd": [0.4, 0.2, 0.1, 0.05]},
                              "spearman": {"l2": 1.0, "tssd": 1.0}})
    results["meta"] = {"preset": "hand", "seeds": [0], "wall_time_s": 1.0}
    report = write_report(tmp_path, results)
    text = report.read_text()
    for png in ("figure3.png", "table2.png", "figure4.png", "table5.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{png}]({png})" in text
    assert "✅ reproduced" in text and "## Table 5" in text and "| 75.00 |" in text
    assert (tmp_path / "results.json").exists() and (tmp_path / "findings.json").exists()


def test_tssd_finding_needs_tssd_best_and_l2_worst_and_a_defined_correlation() -> None:
    def tssd(pearson: dict) -> tuple[bool, str]:
        f = {f.id: f for f in check_findings({"table5": {"pearson": pearson}})}["tssd_predicts_best"]
        return f.reproduced, f.ours

    assert tssd({"l2": 0.8, "cosine": 0.9, "ssd": 0.92, "tssd": 0.97})[0]
    assert not tssd({"l2": 0.91, "cosine": 0.9, "ssd": 0.92, "tssd": 0.97})[0]  # best, but L2 is not worst
    ok, text = tssd({"l2": 0.8, "cosine": 0.9, "ssd": 0.92, "tssd": None})  # TSSD constant over K_seed
    assert not ok and "undefined" in text
