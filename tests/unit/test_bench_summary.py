"""bench/summary.py: each benchmark figure beside its baseline, as a ratio, in markdown."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _summary():
    spec = importlib.util.spec_from_file_location("bench_summary", BENCH / "summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DATA = {
    "time_utc": "2026-01-01T00:00:00+00:00", "env": {"load_avg_1m": 0.5, "code_version": "abc"},
    "settings": {"quick": False},
    "sizes": {"100000": {"ift": {"rows_per_s": 9000.0, "peak_rss_mb": 2000.0},
                         "baseline": {"rows_per_s": 6000.0, "peak_rss_mb": 900.0}},
              "1000000": {"ift": {"rows_per_s": 12000.0, "peak_rss_mb": 2600.0},
                          "baseline": {"rows_per_s": 8000.0, "peak_rss_mb": 1500.0}}},
    "throughput_ratio_ift_over_baseline": {"rows": 1000000, "value": 1.5, "target": ">= 1.0",
                                           "met": True},
    "ift_peak_rss_ratio": {"rows": [1000000, 100000], "value": 1.3, "target": "<= 1.5",
                           "met": True},
}
TRAIN = {
    "env": {"load_avg_1m": 0.3}, "setup": {"quick": True},
    "arms": {"a": {"tokens_per_s": 450.0}, "b": {"tokens_per_s": 500.0},
             "a_packed": {"trainable_tokens_per_s": 600.0}, "c": {"trainable_tokens_per_s": 250.0}},
    "ratios": {"a_over_b": {"value": 0.9, "target": 0.9, "pass": None, "paired_step_median": 0.85,
                            "note": "inconclusive: ..."},
               "a_packed_over_c": {"value": 2.4, "target": 1.5, "pass": True}},
}


def test_rows_pair_each_figure_with_its_baseline():
    s = _summary()
    rows = s.data_prepare_rows(DATA)
    assert rows[0]["ift"] == 12000.0 and rows[0]["baseline"] == 8000.0 and rows[0]["ratio"] == 1.5
    assert rows[1]["ift"] == 2600.0 and rows[1]["baseline"] == 2000.0 and rows[1]["met"] is True
    train = s.train_throughput_rows(TRAIN)
    assert (train[0]["ift"], train[0]["baseline"], train[0]["met"]) == (450.0, 500.0, None)
    assert "paired per-step median 0.85" in train[0]["note"]
    assert (train[1]["ift"], train[1]["baseline"], train[1]["met"]) == (600.0, 250.0, True)


def test_markdown_lists_missing_benchmarks_and_inconclusive_verdicts(tmp_path):
    s = _summary()
    (tmp_path / "data_prepare.json").write_text(json.dumps(DATA))
    (tmp_path / "train_throughput.json").write_text(json.dumps(TRAIN))
    assert s.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| benchmark | figure | ift | baseline | ratio")
    assert "| serve_load | not run |" in text
    row = next(line for line in lines if "(a / b)" in line)
    assert "| 450 | 500 | 0.9 | >= 0.9 | inconclusive | 0.3 |" in row
    assert "| 12000 | 8000 | 1.5 | >= 1.0 | yes | 0.5 |" in text
    assert "(quick smoke run)" in text and "code abc" in text
