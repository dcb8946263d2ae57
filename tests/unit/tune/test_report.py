"""The sweep report from a sweep directory written by hand (no Ray): tables, best trial,
per-configuration spread, plots; and the shipped ablation configs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ift.config import load_config
from ift.tune import report, space

REPO = Path(__file__).resolve().parents[3]


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """Two arms × two seeds: three finished trials (exact match 0.2/0.4 for CoT, 0.1 for
    answers) and one stopped early without evaluation."""
    tune = load_config(None, ["tune.name=abl", "tune.space.exclude_tags=[[answers],[cot]]",
                              "tune.seeds=[1,2]", "tune.metric=exact_match",
                              "tune.mode=max"]).tune
    points = space.expand(tune)
    d = tmp_path / "abl"
    _write(d / "sweep.json", {"name": "abl", "points": points, "metric": "exact_match",
                              "mode": "max", "scheduler": "asha", "eval_data": "test.tsv"})
    statuses = ["finished", "finished", "finished", "stopped"]
    _write(d / "trials.json", [{"name": p["name"], "status": s} for p, s in zip(points, statuses)])
    ems = [0.2, 0.4, 0.1, None]
    for p, em, status in zip(points, ems, statuses):
        run = d / "runs" / p["name"]
        steps = 10 if status == "finished" else 4
        lines = [json.dumps({"step": s, "loss": 3.0 - 0.1 * s,
                             **({"eval_loss": 3.1 - 0.1 * s} if s % 2 == 0 else {})})
                 for s in range(1, steps + 1)]
        # a resumed run repeats steps: the later line wins; a cut line is skipped
        lines.append(json.dumps({"step": steps, "loss": 1.5}))
        lines.append('{"step": 9, "lo')
        _write(run / "metrics.jsonl", "\n".join(lines) + "\n")
        _write(run / "run.json", {"mlflow_run_id": f"run-{p['name']}"})
        if status == "finished":
            _write(run / "eval.json", {"metrics": {"exact_match": em, "rouge_l": em / 2,
                                                   "loss": 2.0 + em, "perplexity": 7.0,
                                                   "answered": 1.0, "mc_accuracy": None}})
            _write(run / "trial.json", {"name": p["name"], "train_rows": 100})
    return d


def test_report_tables_best_and_spread(sweep_dir):
    paths = report.write_report(str(sweep_dir))
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["trial"] for r in rows] == ["t000", "t001", "t002", "t003"]
    assert [r["status"] for r in rows] == ["finished", "finished", "finished", "stopped"]
    assert [r["exclude_tags"] for r in rows] == ["[answers]", "[answers]", "[cot]", "[cot]"]
    assert [r["seed"] for r in rows] == ["1", "2", "1", "2"]
    assert [r["best"] for r in rows] == ["", "best", "", ""]  # highest exact match
    assert rows[3]["exact_match"] == "" and rows[3]["steps"] == "4"
    assert float(rows[0]["final_loss"]) == 1.5  # the latest line of a repeated step
    assert rows[0]["mlflow_run_id"] == "run-t000"

    groups = {g["group"]: g for g in paths["summary"]["groups"]}
    cot = groups["exclude_tags=[answers]"]["metrics"]["exact_match"]
    assert cot["n"] == 2 and cot["mean"] == pytest.approx(0.3)
    assert cot["std"] == pytest.approx(0.1414, abs=1e-3)
    assert (cot["min"], cot["max"]) == (0.2, 0.4)
    ans = groups["exclude_tags=[cot]"]["metrics"]["exact_match"]
    assert ans["n"] == 1 and ans["mean"] == pytest.approx(0.1)

    md = Path(paths["markdown"]).read_text()
    assert "**t001**" in md and "Best by `exact_match` (max): **t001**" in md
    assert "0.3 ± 0.14 [0.2, 0.4]" in md
    assert "3 finished" in md and "1 stopped" in md
    for name in ("exact_match_by_exclude_tags.png", "eval_loss_by_exclude_tags.png",
                 "loss_curves.png"):
        assert (sweep_dir / "report" / name).read_bytes()[:4] == b"\x89PNG", name
        assert f"({name})" in md


def test_report_metric_override_and_lower_is_better(sweep_dir):
    paths = report.write_report(str(sweep_dir), metric="eval_loss", mode="min")
    rows = list(csv.DictReader(open(paths["csv"])))
    best = next(r for r in rows if r["best"])
    assert float(best["eval_loss"]) == min(float(r["eval_loss"]) for r in rows)
    assert report.best_trial([{"trial": "a", "x": None}], "x", "max") is None


def test_report_on_a_non_sweep_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a sweep directory"):
        report.write_report(str(tmp_path))


@pytest.mark.parametrize("name", ["cot-ablation.yaml", "cot-ablation-real.yaml"])
def test_shipped_ablation_configs(name, monkeypatch):
    monkeypatch.setenv("IFT_BUCKET", "ift-test")
    cfg = load_config(str(REPO / "configs" / name))
    points = space.expand(cfg.tune)
    assert len(points) == 6
    assert [p["params"]["exclude_tags"] for p in points] == [["answers"]] * 3 + [["cot"]] * 3
    assert sorted({p["seed"] for p in points}) == [1, 2, 3]
    tags = {s.name: s.tags for s in cfg.data.sources}
    assert any("cot" in t for t in tags.values()) and any("answers" in t for t in tags.values())
    # Each arm keeps the other sources and drops only the other arm's.
    manifest_sources = {n: {"tags": t, "weight": None, "count": None} for n, t in tags.items()}
    for p in (points[0], points[3]):
        kept = space.mixture_sources(manifest_sources, space.mixture_request(p))
        dropped = set(tags) - set(kept)
        assert all(set(p["params"]["exclude_tags"]) & set(tags[n]) for n in dropped)
        assert len(dropped) == 1
    assert cfg.tune.scheduler == "none" and cfg.tune.metric == "exact_match"
    assert cfg.eval.data


def test_real_config_answers_arm_has_no_rationale(monkeypatch):
    from ift.data.formats import convert

    monkeypatch.setenv("IFT_BUCKET", "ift-test")
    cfg = load_config(str(REPO / "configs" / "cot-ablation-real.yaml"))
    src = next(s for s in cfg.data.sources if "answers" in s.tags)
    cot = next(s for s in cfg.data.sources if "cot" in s.tags)
    raw = {"question": "Tom has 3 apples and buys 4. How many?", "answer": "7",
           "rationale": "3 + 4 = 7."}
    a = convert(src.format, raw, id="a", source=src.name, columns=src.columns)
    c = convert(cot.format, raw, id="c", source=cot.name, columns=cot.columns)
    assert a["messages"][0] == c["messages"][0]  # the same prompt
    assert "3 + 4 = 7." in c["messages"][1]["content"]
    assert "3 + 4" not in a["messages"][1]["content"] and "7" in a["messages"][1]["content"]
