"""Runs that stop and go on: a worker killed mid-run (Ray restarts the worker group), a run
that failed and is started again, and a driver killed and re-run from the command line.
Each goes on from its last checkpoint at the same data position: steps continue, and a
step taken again gives the same loss as the first time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from train_support import prepare_sample

from ift.config import load_config
from ift.train import driver
from ift.train.loop import read_metrics

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
EVERY = 3


@pytest.fixture(scope="module")
def prepared(ray_cluster, tiny_model, sample_data_dir, tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "train-prepared"
    return prepare_sample(sample_data_dir, tiny_model, str(out))


def _overrides(tiny_model, prepared, root, name, *extra, steps=STEPS):
    return [
        f"model.name_or_path={tiny_model}", f"train.data={prepared}",
        f"train.output={root}/runs", f"train.run_name={name}", f"storage.root={root}/work",
        "tracking.enabled=false", "peft.dropout=0.0", "train.micro_batch_size=4",
        "train.lr=1e-2", "train.warmup_ratio=0", f"train.max_steps={steps}",
        "train.eval_every=0", "train.eval_max_batches=1", f"train.checkpoint_every={EVERY}",
        "train.num_to_keep=2", *extra,
    ]


def _lines(run_dir):
    return read_metrics(run_dir, latest_per_step=False)


def _wait_for_step(run_dir, step, timeout=600.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited with {proc.returncode} before step {step}")
        try:
            if any(r["step"] >= step for r in _lines(run_dir)):
                return
        except (json.JSONDecodeError, OSError):
            pass  # a line being written
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached in {timeout}s")


class WorkerKiller(threading.Thread):
    """Kills the rank-0 training worker (SIGKILL) once the run has logged `after_step`."""

    def __init__(self, run_dir: str, after_step: int) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.after_step = run_dir, after_step
        self.pid: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            _wait_for_step(self.run_dir, self.after_step)
            self.pid = int(Path(self.run_dir, "worker_pids", "rank0.pid").read_text())
            os.kill(self.pid, signal.SIGKILL)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def _segments(rows):
    """The metrics lines cut where a run (or a restarted worker group) began again: the
    resume point changes, or the step does not follow the line before."""
    segments: list[list[dict]] = []
    for row in rows:
        last = segments[-1][-1] if segments else None
        if (last is None or row["resumed_from"] != last["resumed_from"]
                or row["step"] != last["step"] + 1):
            segments.append([])
        segments[-1].append(row)
    return segments


def check_continuation(run_dir, *, min_killed_after=4, steps=STEPS):
    """The first segment ran 1..k; each later one resumed at a checkpoint c <= the step
    the one before reached and ran on from c+1, and the last reached `steps`. Nothing is
    lost; a restart repeats at most a checkpoint interval, with the same losses as the
    first time. Returns (c, k) of the first resume.

    The tests stop a run once; a restart Ray makes on its own (a worker group that fails
    for a reason of Ray's, which train.max_failures absorbs) adds a segment that must
    obey the same rules."""
    segments = _segments(_lines(run_dir))
    assert len(segments) >= 2, "the run never resumed"
    first = segments[0]
    k = first[-1]["step"]
    assert [r["step"] for r in first] == list(range(1, k + 1)) and k >= min_killed_after
    assert all(r["resumed_from"] == 0 for r in first)
    resumes = [seg[0]["resumed_from"] for seg in segments[1:]]
    assert resumes[0] > 0, f"the first stop did not resume from a checkpoint: {resumes}"
    losses = {r["step"]: r["loss"] for r in first}
    reached = k
    for seg in segments[1:]:
        c = seg[0]["resumed_from"]
        assert c % EVERY == 0 and 0 <= c <= reached, (c, reached)
        assert reached - c <= EVERY, f"resumed at {c} after reaching {reached}"
        assert [r["step"] for r in seg] == list(range(c + 1, seg[-1]["step"] + 1))
        for r in seg:
            if r["step"] in losses:
                assert r["loss"] == pytest.approx(losses[r["step"]], abs=1e-5), r
            losses[r["step"]] = r["loss"]
        reached = seg[-1]["step"]
    assert reached == steps
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, steps + 1))
    assert os.path.exists(os.path.join(run_dir, "final", "adapter_model.safetensors"))
    return resumes[0], k


def test_killed_worker_restarts_from_the_last_checkpoint(ray_cluster, tiny_model, prepared,
                                                         tmp_path):
    cfg = load_config(None, _overrides(tiny_model, prepared, tmp_path, "fault",
                                       "train.num_workers=2", "train.max_failures=2"))
    run_dir = str(tmp_path / "runs" / "fault")
    killer = WorkerKiller(run_dir, after_step=4)
    killer.start()
    summary = driver.train(cfg)
    killer.join(timeout=5)
    assert killer.error is None and killer.pid is not None
    assert summary["steps"] == STEPS
    check_continuation(run_dir)
    new_pid = int(Path(run_dir, "worker_pids", "rank0.pid").read_text())
    assert new_pid != killer.pid


def test_failed_run_resumes_when_run_again(ray_cluster, tiny_model, prepared, tmp_path):
    overrides = _overrides(tiny_model, prepared, tmp_path, "again", "train.num_workers=1",
                           "train.max_failures=0", "tracking.enabled=true",
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    run_dir = str(tmp_path / "runs" / "again")
    killer = WorkerKiller(run_dir, after_step=4)
    killer.start()
    with pytest.raises(driver.TrainError, match="training run again failed"):
        driver.train(load_config(None, overrides))
    killer.join(timeout=5)
    assert killer.pid is not None
    first = json.loads(Path(run_dir, "run.json").read_text())
    assert first["status"] == "FAILED"

    # Run again; train.max_failures=1 lets Ray restart a worker group it loses on its own.
    summary = driver.train(load_config(None, [*overrides, "train.max_failures=1"]))
    assert summary["steps"] == STEPS
    check_continuation(run_dir)
    info = json.loads(Path(run_dir, "run.json").read_text())
    assert info["status"] == "FINISHED"
    assert info["mlflow_run_id"] == first["mlflow_run_id"]  # the MLflow run continued

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    steps = {m.step for m in client.get_metric_history(info["mlflow_run_id"], "loss")}
    assert steps == set(range(1, STEPS + 1))


def test_interrupted_driver_resumes_when_run_again(ray_cluster, tiny_model, prepared,
                                                   tmp_path):
    config = tmp_path / "train.yaml"
    # More steps than the other runs: a step takes a few hundredths of a second, and the
    # run must still be going when the interrupt lands.
    steps = 40
    overrides = _overrides(tiny_model, prepared, tmp_path, "cli", "train.num_workers=1",
                           steps=steps)
    raw: dict = {}
    from ift.config import apply_override

    for item in overrides:
        apply_override(raw, item)
    config.write_text(yaml.safe_dump(raw))
    run_dir = str(tmp_path / "runs" / "cli")
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "ift", "train", "-c", str(config), "--address", address]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(run_dir, 4, proc=first)
        first.send_signal(signal.SIGINT)
        try:
            out, _ = first.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            out, _ = first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0, out[-3000:]
    stopped_at = max(r["step"] for r in _lines(run_dir))
    assert stopped_at < steps, "the driver finished before it was interrupted"
    # Ray Train aborts the run on SIGINT; the run records that it was stopped.
    assert json.loads(Path(run_dir, "run.json").read_text())["status"] == "KILLED"

    raw["train"]["max_failures"] = 1  # as above: room for a restart of Ray's own
    config.write_text(yaml.safe_dump(raw))
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"{steps}/{steps} steps" in second.stdout
    assert "resuming cli from step" in second.stdout
    check_continuation(run_dir, steps=steps)
