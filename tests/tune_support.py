"""Helpers of the `ift tune` tests (tests/integration/test_tune.py and the real-model
tier): sweep configs, `python -m ift` in a fresh process, MLflow runs of a sweep, and a
two-trial learning-rate sweep under ASHA on a held-out metric."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "ift" / "sample_data"
SOURCES = [
    {"path": str(SAMPLE / "cot_arith.tsv"), "tags": ["cot"]},
    {"path": str(SAMPLE / "alpaca_en.json"), "tags": ["en"]},
    {"path": str(SAMPLE / "alpaca_zh.jsonl"), "tags": ["zh"]},
]


def ift_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)
    return env


def run_ift(args: list[str], log: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    with open(log, "ab") as f:
        proc = subprocess.run([sys.executable, "-m", "ift", *args], cwd=REPO, env=ift_env(),
                              stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise AssertionError(f"ift {' '.join(args)} exited {proc.returncode}:\n{tail}")
    return proc


def heldout_file(tmp: Path) -> Path:
    """Six CoT problems of the sample file as the sweeps' held-out set."""
    path = tmp / "heldout.tsv"
    lines = (SAMPLE / "cot_arith.tsv").read_text().splitlines(keepends=True)[-6:]
    path.write_text("".join(lines))
    return path


def write_config(path: Path, root: Path, model: str, prepared: Path, tune: dict,
                 train: dict | None = None) -> Path:
    cfg = {
        "storage": {"root": str(root)},
        "model": {"name_or_path": model},
        "data": {"output": str(prepared), "max_seq_len": 256, "val_ratio": 0.1,
                 "val_max_rows": 16, "sources": SOURCES},
        "peft": {"r": 4, "alpha": 8},
        "train": {"data": str(prepared), "micro_batch_size": 4, "max_steps": 3,
                  "eval_every": 1, "eval_max_batches": 2, "checkpoint_every": 0,
                  "warmup_ratio": 0.0, "lr": 0.02, "log_every": 1, **(train or {})},
        "eval": {"data": str(heldout_file(path.parent)), "max_samples": 4,
                 "max_new_tokens": 8, "batch_size": 4},
        "tune": {"output": "sweeps", **tune},
        "tracking": {"experiment": "tune-test"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mlflow_runs(root: Path, experiment: str = "tune-test"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, "no MLflow experiment was created"
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def sweep_lr_under_asha(tmp_path: Path, model: str, name: str, metric: str, source: dict,
                        heldout: Path, train: dict, max_new_tokens: int,
                        lrs: tuple[float, float] = (0.02, 1.0e-7)) -> tuple[Path, dict]:
    """Two trials (by default lr 0.02 and 1e-7) on one source under ASHA on `metric`, computed during
    training on `heldout`; the learning trial finishes and the lagging one is stopped.
    Returns the sweep folder and trial -> {step: metrics.jsonl row} at the evaluations."""
    cfg = write_config(tmp_path / "sweep.yaml", tmp_path / "work", model,
                       tmp_path / "work" / "prepared", {
                           "name": name,
                           "space": {"train.lr": list(lrs)},
                           "seeds": [1],
                           "scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
                           "metric": metric, "mode": "max", "eval_after": False,
                       }, train=train)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["sources"] = [source]
    raw["eval"]["during_training"] = {"max_samples": 4, "max_new_tokens": max_new_tokens,
                                      "data": str(heldout)}
    cfg.write_text(yaml.safe_dump(raw, allow_unicode=True))
    run_ift(["tune", "-c", str(cfg)], tmp_path / "tune.log")

    sweep_dir = tmp_path / "work" / "sweeps" / name
    trials = {t["name"]: t for t in json.loads((sweep_dir / "trials.json").read_text())}
    assert trials["t000"]["status"] == "finished", trials
    assert trials["t001"]["status"] == "stopped", trials
    evaluated = {}
    for trial in trials:
        rows = [json.loads(x) for x in (sweep_dir / "runs" / trial / "metrics.jsonl")
                .read_text().splitlines()]
        evaluated[trial] = {r["step"]: r for r in rows if metric in r}
    # the report picks the best trial by the same metric
    rows = list(csv.DictReader((sweep_dir / "report" / "trials.csv").open()))
    assert next(r for r in rows if r["best"] == "best")["trial"] == "t000"
    # MLflow: the stopped trial's child run is KILLED, the finished one FINISHED.
    _, runs = mlflow_runs(tmp_path / "work")
    status = {r.data.tags.get("ift.tune.trial"): r.info.status for r in runs
              if r.data.tags.get("mlflow.parentRunId")}
    assert status == {"t000": "FINISHED", "t001": "KILLED"}, status
    stopped = [json.loads(x)["step"] for x in (sweep_dir / "runs" / "t001" / "metrics.jsonl")
               .read_text().splitlines()]
    assert max(stopped) < train["max_steps"], stopped
    return sweep_dir, evaluated
