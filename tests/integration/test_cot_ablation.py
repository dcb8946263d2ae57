"""The toy CoT ablation is a positive control: `python jobs/cot_ablation.py` (corpus, tiny
model, then the ordinary `ift tune` with its two arms) must show the known effect of
step-by-step targets on held-out parity, one seed per arm."""

from __future__ import annotations

import json
import subprocess
import sys

from tune_support import REPO, ift_env


def test_the_toy_ablation_separates_rationale_and_answers_only_arms(tmp_path):
    log = tmp_path / "job.log"
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, str(REPO / "jobs" / "cot_ablation.py"),
                               "tune.seeds=[1]"], cwd=tmp_path, env=ift_env(), stdout=f,
                              stderr=subprocess.STDOUT, timeout=1500)
    assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]
    sweep = tmp_path / "ift-work" / "cot-ablation" / "sweeps" / "cot-ablation"
    points = {p["name"]: p for p in json.loads((sweep / "sweep.json").read_text())["points"]}
    score = {}
    for name, p in points.items():
        arm = "cot" if p["params"]["exclude_tags"] == ["answers"] else "answers"
        ev = json.loads((sweep / "runs" / name / "eval.json").read_text())["metrics"]
        assert ev["exact_match_n"] == 100
        score[arm] = ev["exact_match"]
    assert set(score) == {"cot", "answers"}
    # the rationale arm computes the parity of unseen strings; answers only cannot
    assert score["cot"] >= 0.9, score
    assert score["answers"] <= 0.65, score
    report = (sweep / "report" / "report.md").read_text()
    assert "exclude_tags=[answers]" in report and "exclude_tags=[cot]" in report
