"""`ift quickstart --tiny` as a user runs it, in its own process on a Ray cluster: it
writes summary.json, keeps serving until SIGTERM, then drains and exits 0 without Ray's
stack dump or Ray Train's state-API warnings; run again, it recognises every finished
stage (no training workers start)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

pytestmark = pytest.mark.timeout(900)

FAST = ["train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2",
        "eval.max_samples=4", "eval.max_new_tokens=8"]


def _quickstart(ray_cluster, workdir, log_path, *extra):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log = open(log_path, "w+")
    return subprocess.Popen([sys.executable, "-m", "ift", "quickstart", "--tiny",
                             "--workdir", str(workdir), *extra, *FAST],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def test_quickstart_serves_until_sigterm_and_reuses_finished_stages(ray_cluster, tmp_path):
    workdir = tmp_path / "qs"
    log_path = tmp_path / "first.log"
    proc = _quickstart(ray_cluster, workdir, log_path, "--keep-serving")
    deadline = time.monotonic() + 700
    try:
        while "until Ctrl-C or SIGTERM" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(1)
        summary = json.loads((workdir / "summary.json").read_text())
        assert summary["tiny"] is True and summary["total_s"] > 0
        assert os.path.isdir(summary["adapter"]) and os.path.isdir(summary["merged"])
        assert requests.get(summary["endpoint"].removesuffix("/v1") + "/health",
                            timeout=30).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    first = log_path.read_text()
    assert "shutting down" in first
    assert "SIGTERM received" not in first
    assert "Failed to query Ray Train Controller" not in first

    again_log = tmp_path / "again.log"
    t0 = time.monotonic()
    again = _quickstart(ray_cluster, workdir, again_log)
    assert again.wait(timeout=600) == 0, again_log.read_text()[-4000:]
    text = again_log.read_text()
    assert "already finished" in text and "is complete and up to date" in text
    assert "RayTrainWorker" not in text
    # Training, evaluation and merging take no time the second time round.
    assert "reusing" in text and time.monotonic() - t0 < 300
