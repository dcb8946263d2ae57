"""`ift tune` end to end: each sweep runs as `python -m ift tune` in a fresh process (its own
local Ray), on a tiny llama and the bundled sample data.

* A sweep of two trials over the mixture axis, killed mid-run (SIGKILL to its process
  group) and resumed with --resume: the finished trial is not run again, the interrupted
  one resumes from its checkpoint, and MLflow holds one parent and one child per trial.
  Each trial's held-out evaluation ran as a Ray task holding one training worker's CPUs.
  The finished sweep then has each trial's re-mixed data, parent and child MLflow runs,
  per-trial eval files and the report (one row per trial, plots).
* ASHA on a metric computed by generation during training (heldout/rouge_l): the trial with
  a near-zero learning rate is stopped early, and its MLflow child run is KILLED.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tune_support import REPO, ift_env, mlflow_runs, run_ift, sweep_lr_under_asha, write_config  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model) -> Path:
    """The sample sources prepared once for this module's sweeps."""
    tmp = tmp_path_factory.mktemp("tune-data")
    out = tmp / "prepared"
    cfg = write_config(tmp / "prepare.yaml", tmp, tiny_model, out, {})
    run_ift(["data", "prepare", "-c", str(cfg)], tmp / "prepare.log")
    return out


def _check_mixture_sweep(sweep_dir: Path, prepared: Path, tmp_path: Path) -> None:
    """A finished sweep of two trials over exclude_tags [[], [zh]]: each trial's re-mixed
    data, eval files, parent and child MLflow runs, and the report (rows, plots, rewrite)."""
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["name"] for p in sweep["points"]] == ["t000", "t001"]
    trials = {t["name"]: t for t in json.loads((sweep_dir / "trials.json").read_text())}
    assert {n: t["status"] for n, t in trials.items()} == {"t000": "finished",
                                                          "t001": "finished"}, trials

    for name in trials:
        run_dir = sweep_dir / "runs" / name
        ev = json.loads((run_dir / "eval.json").read_text())
        assert ev["metrics"]["exact_match_n"] == 4 and ev["metrics"]["loss"] > 0
        samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 4
        assert {"prompt", "reference", "output", "correct"} <= set(samples[0])
        trial = json.loads((run_dir / "trial.json").read_text())
        assert trial["point"]["name"] == name and trial["eval"]["samples"] == 4
        # each trial trained on its own re-mixed data: [zh] excluded where asked
        manifest = json.loads((sweep_dir / "data" / name / "manifest.json").read_text())
        excluded = trial["point"]["params"]["exclude_tags"]
        assert ("alpaca_zh" in manifest["sources"]) == (excluded == [])
        assert manifest["parent"]["path"] == str(prepared)

    # MLflow: one parent, one child per trial carrying the parent's id.
    client, runs = mlflow_runs(tmp_path / "work")
    parent_id = sweep["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.tags.get("ift.command") == "tune"
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    by_trial = {r.data.tags.get("ift.tune.trial"): r for r in children}
    assert sorted(by_trial) == ["t000", "t001"], [r.data.tags for r in children]
    for name, child in by_trial.items():
        assert child.info.status == "FINISHED"
        assert "heldout/exact_match" in child.data.metrics
        assert "eval_loss" in child.data.metrics
        point = next(p for p in sweep["points"] if p["name"] == name)
        assert json.loads(child.data.params["tune.point.exclude_tags"]) == \
            point["params"]["exclude_tags"], child.data.params
        arts = {a.path for a in client.list_artifacts(child.info.run_id, "final")}
        assert "final/adapter_config.json" in arts, arts
    # the report is logged to the parent run
    report_arts = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert "report/report.md" in report_arts and "report/trials.csv" in report_arts

    # Report files: one CSV row per trial, best marked, plots written.
    report = sweep_dir / "report"
    rows = list(csv.DictReader((report / "trials.csv").open()))
    assert [r["trial"] for r in rows] == ["t000", "t001"]
    assert sum(r["best"] == "best" for r in rows) == 1
    best = next(r for r in rows if r["best"] == "best")
    assert float(best["eval_loss"]) == min(float(r["eval_loss"]) for r in rows)
    assert {r["exclude_tags"] for r in rows} == {"[]", "[zh]"}
    md = (report / "report.md").read_text()
    assert len(re.findall(r"^\| (?:\*\*)?t00\d", md, re.M)) == 2 and "By configuration" in md
    for png in ("loss_curves.png", "eval_loss_by_exclude_tags.png",
                "exact_match_by_exclude_tags.png"):
        data = (report / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png

    # `ift tune report DIR` rewrites the report from the directory alone.
    (report / "trials.csv").unlink()
    run_ift(["tune", "report", str(sweep_dir), "--metric", "exact_match", "--mode", "max",
             "--no-mlflow"], tmp_path / "report.log")
    rows2 = list(csv.DictReader((report / "trials.csv").open()))
    assert len(rows2) == 2 and sum(r["best"] == "best" for r in rows2) == 1


def _wait_for(pred, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before the interruption "
                                 f"point:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(1.0)
    raise AssertionError(f"interruption point not reached in {timeout}s:\n"
                         f"{log.read_text(errors='replace')[-4000:]}")


def _has_checkpoint(run_dir: Path) -> bool:
    """Ray Train has registered a checkpoint of the run (not one still being written)."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(snap.get("latest_checkpoint_result"))


def test_interrupted_mixture_sweep_resumes(tmp_path, tiny_model, prepared):
    """Two trials over the mixture axis, killed once the first is done and the second has a
    checkpoint, then resumed; the finished sweep is checked whole (_check_mixture_sweep)."""
    # the sweep prepares nothing itself: train.data points at the module's prepared dir
    cfg = write_config(tmp_path / "sweep.yaml", tmp_path / "work", tiny_model, prepared, {
        "name": "resumable", "space": {"exclude_tags": [[], ["zh"]]}, "seeds": [1],
        "scheduler": "none", "metric": "eval_loss", "mode": "min",
    }, train={"max_steps": 8, "checkpoint_every": 2, "eval_every": 4, "cpus_per_worker": 2})
    raw = yaml.safe_load(cfg.read_text())
    raw["data"].pop("sources")
    cfg.write_text(yaml.safe_dump(raw))
    sweep_dir = tmp_path / "work" / "sweeps" / "resumable"
    runs = sweep_dir / "runs"
    log = tmp_path / "tune.log"

    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "ift", "tune", "-c", str(cfg)], cwd=REPO,
                                env=ift_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        # Kill once the first trial is done and the second has saved a checkpoint.
        _wait_for(lambda: (runs / "t000" / "trial.json").exists()
                  and _has_checkpoint(runs / "t001"), proc, log, timeout=900)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (runs / "t001" / "trial.json").exists(), "t001 finished before the kill"
    first = (runs / "t000" / "trial.json").read_text()
    first_mtime = (runs / "t000" / "trial.json").stat().st_mtime_ns
    sweep = json.loads((sweep_dir / "sweep.json").read_text())

    # Without --resume the existing sweep is refused, naming the flag.
    refused = subprocess.run([sys.executable, "-m", "ift", "tune", "-c", str(cfg)], cwd=REPO,
                             env=ift_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    run_ift(["tune", "-c", str(cfg), "--resume"], tmp_path / "resume.log")
    trials = {t["name"]: t for t in json.loads((sweep_dir / "trials.json").read_text())}
    assert {n: t["status"] for n, t in trials.items()} == {"t000": "finished",
                                                          "t001": "finished"}
    # t000 was not run again; t001 resumed from its checkpoint rather than starting over.
    assert (runs / "t000" / "trial.json").read_text() == first
    assert (runs / "t000" / "trial.json").stat().st_mtime_ns == first_mtime
    # The kill may land after t001's last training step (during its evaluation); either way
    # the resumed run starts from a registered checkpoint and trains only the steps after it.
    resumed = re.findall(r"resuming t001 from step (\d+)", (tmp_path / "resume.log").read_text())
    assert resumed and int(resumed[0]) >= 2, resumed
    start = int(resumed[0])
    rows = [json.loads(x) for x in (runs / "t001" / "metrics.jsonl").read_text().splitlines()]
    after = [r["step"] for r in rows if r["resumed_from"] == start]
    assert after == list(range(start + 1, 9)), rows
    assert rows[-1]["step"] == 8
    assert json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"] == \
        sweep["parent_run_id"]

    client, all_runs = mlflow_runs(tmp_path / "work")
    parents = [r for r in all_runs if r.data.tags.get("ift.command") == "tune"]
    assert [r.info.run_id for r in parents] == [sweep["parent_run_id"]]
    children = [r for r in all_runs
                if r.data.tags.get("mlflow.parentRunId") == sweep["parent_run_id"]]
    assert sorted(r.data.tags["ift.tune.trial"] for r in children) == ["t000", "t001"]
    assert all(r.info.status == "FINISHED" for r in children)
    rows = list(csv.DictReader((sweep_dir / "report" / "trials.csv").open()))
    assert [r["trial"] for r in rows] == ["t000", "t001"]
    assert all(r["status"] == "finished" and r["exact_match"] != "" for r in rows)

    # A trial reserves no CPU; its held-out evaluation runs as a Ray task of its own, in
    # another process, holding one training worker's CPUs (train.cpus_per_worker=2 here),
    # and its metrics reach trial.json and the report.
    for row in rows:
        trial = json.loads((runs / row["trial"] / "trial.json").read_text())
        task = trial["eval_task"]
        assert task["resources"] == {"CPU": 2.0}, task
        assert task["task_id"] and task["pid"] != trial["trial_pid"]
        ev = json.loads((runs / row["trial"] / "eval.json").read_text())["metrics"]
        assert trial["eval"]["exact_match_n"] == ev["exact_match_n"] == 4
        assert float(row["heldout_loss"]) == pytest.approx(ev["loss"], rel=1e-4)
        assert float(row["exact_match"]) == pytest.approx(ev["exact_match"], abs=1e-6)

    _check_mixture_sweep(sweep_dir, prepared, tmp_path)


def test_asha_stops_a_trial_on_a_generation_metric(tmp_path, tiny_model):
    """tune.metric heldout/rouge_l (mode max), computed during training by
    eval.during_training on a task a LoRA learns in a few steps (every reply is "yes, it
    is."): the trial with a near-zero learning rate lags at a rung and is stopped."""
    words = ["red", "blue", "green", "cat", "dog", "tree", "river", "stone"]

    def rows(lo: int, hi: int) -> list[dict]:
        return [{"instruction": f"Is {words[i % 8]} {i} a thing?", "output": "yes, it is."}
                for i in range(lo, hi)]

    (tmp_path / "train.json").write_text(json.dumps(rows(0, 64)))
    (tmp_path / "heldout.json").write_text(json.dumps(rows(100, 104)))
    _, got = sweep_lr_under_asha(
        tmp_path, tiny_model, "asha-gen", "heldout/rouge_l",
        {"path": str(tmp_path / "train.json"), "name": "yes"}, tmp_path / "heldout.json",
        {"max_steps": 12, "eval_every": 2}, max_new_tokens=8)
    learned = {s: r["heldout/rouge_l"] for s, r in got["t000"].items()}
    lagging = {s: r["heldout/rouge_l"] for s, r in got["t001"].items()}
    assert sorted(learned) == [2, 4, 6, 8, 10, 12]
    last = max(lagging)
    assert last < 12 and lagging[last] < learned[last], (learned, lagging)
