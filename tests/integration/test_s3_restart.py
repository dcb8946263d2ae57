"""The S3 store dies and comes back while `ift train` writes its run directory to it.

A moto server of this module's own (not the session's) runs behind a journal that keeps
its state across a restart (tests/s3_persist.py). `ift train` runs as a subprocess with
its own local Ray and one worker, prepared data and run directory on s3://. Once a
checkpoint is complete the server is killed (SIGKILL) and started again on the same port.
One of two things must then hold:

  * the run rode out the outage (its S3 clients retry) and completed: every step once, in
    order, and a complete final adapter; or
  * it exited non-zero with an error that names the S3 endpoint, and the same command run
    again resumes from the last complete checkpoint and finishes.

Which one depends on how long the store is away against the clients' retry budget
(storage.S3_ATTEMPTS, or AWS_MAX_ATTEMPTS): a short outage with the default budget is
ridden out; with AWS_MAX_ATTEMPTS=2 and the store away until the run gives up, the run
fails and resumes. Both are run here. Either way no half-written checkpoint is taken: the
checkpoint resumed from, and the newest at the end, pass the size check of every file
their index lists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from s3_persist import PersistentS3Server
from train_support import build_prepared, make_tiny_model

from ift import storage
from ift.config import apply_override
from ift.train import checkpoint
from ift.train.loop import read_metrics

REPO = Path(__file__).resolve().parents[2]
STEPS = 15
EVERY = 3
BUCKET = "ift-restart"


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A journaled moto server on its own port; AWS_* point this process at it."""
    server = PersistentS3Server(str(tmp_path / "s3-journal.jsonl"), str(tmp_path / "s3.log"))
    server.start()
    for k, v in {"AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(k, raising=False)
    yield server
    server.kill()


def test_journaled_server_keeps_objects_and_open_uploads_across_a_kill(s3):
    """The premise of the tests below: what the store acknowledged survives SIGKILL, for
    boto3 and pyarrow writes alike, and a multipart upload begun before the kill goes on."""
    client = storage.s3_client()
    client.create_bucket(Bucket=BUCKET)
    storage.write_bytes(f"s3://{BUCKET}/a/small.txt", b"hello")
    fs, path = storage.arrow_fs(f"s3://{BUCKET}/a/arrow.bin")
    with fs.open_output_stream(path) as f:  # pyarrow sends chunked multipart uploads
        f.write(b"x" * 1_500_000)
    storage.write_bytes(f"s3://{BUCKET}/a/gone.txt", b"bye")
    client.delete_object(Bucket=BUCKET, Key="a/gone.txt")
    upload = client.create_multipart_upload(Bucket=BUCKET, Key="a/multi.bin")["UploadId"]
    part1 = client.upload_part(Bucket=BUCKET, Key="a/multi.bin", UploadId=upload,
                               PartNumber=1, Body=b"1" * 5_300_000)
    before = sorted(storage._s3_objects(BUCKET, ""))
    s3.kill()
    s3.start()
    assert sorted(storage._s3_objects(BUCKET, "")) == before
    assert storage.read_bytes(f"s3://{BUCKET}/a/arrow.bin") == b"x" * 1_500_000
    part2 = client.upload_part(Bucket=BUCKET, Key="a/multi.bin", UploadId=upload,
                               PartNumber=2, Body=b"2")
    client.complete_multipart_upload(
        Bucket=BUCKET, Key="a/multi.bin", UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part1["ETag"]},
                                   {"PartNumber": 2, "ETag": part2["ETag"]}]})
    assert storage.read_bytes(f"s3://{BUCKET}/a/multi.bin") == b"1" * 5_300_000 + b"2"
    assert [k for k, _, _ in storage._s3_objects(BUCKET, "")] == \
        ["a/arrow.bin", "a/multi.bin", "a/small.txt"]


def _setup_run(tmp_path: Path, name: str, env_extra: dict[str, str]
               ) -> tuple[list[str], dict[str, str], str, str]:
    """Prepared data on s3, a config, and the `ift train` command with its environment."""
    storage.s3_client().create_bucket(Bucket=BUCKET)
    model = make_tiny_model(str(tmp_path / "model"))
    prepared = f"s3://{BUCKET}/prepared"
    storage.upload_dir(build_prepared(str(tmp_path / "prepared"), model, n_train=48, n_val=8),
                       prepared)
    raw: dict = {}
    for item in [f"model.name_or_path={model}", f"train.data={prepared}",
                 f"train.output=s3://{BUCKET}/runs", f"train.run_name={name}",
                 f"storage.root=s3://{BUCKET}/work", "tracking.enabled=false",
                 "peft.dropout=0.0", "train.num_workers=1", "train.micro_batch_size=4",
                 "train.lr=1e-2", "train.warmup_ratio=0", f"train.max_steps={STEPS}",
                 "train.eval_every=0", "train.eval_max_batches=1",
                 f"train.checkpoint_every={EVERY}", "train.num_to_keep=2"]:
        apply_override(raw, item)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "ift", "train", "-c", str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    env.pop("RAY_ADDRESS", None)  # its own local Ray
    return cmd, env, f"s3://{BUCKET}/runs/{name}", model


def _wait_for_checkpoint(run_dir: str, proc: subprocess.Popen, log: Path,
                         timeout: float = 600.0) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ift train exited with {proc.returncode} before its first "
                                 f"checkpoint:\n{log.read_text()[-3000:]}")
        found = checkpoint.find_latest(run_dir)
        if found is not None:
            return found[0]
        time.sleep(0.5)
    raise TimeoutError(f"no complete checkpoint in {run_dir} after {timeout}s")


def _verified(path: str) -> dict:
    """Download a checkpoint and check every file its index lists (raises if not whole)."""
    with checkpoint.local_dir(path) as d:
        return checkpoint.verify(d)


def _train_through_outage(s3, tmp_path: Path, name: str, *, down_s: float | None,
                          env_extra: dict[str, str]) -> dict:
    """Start `ift train`, kill the store after its first complete checkpoint, bring it back
    after `down_s` seconds (None: once the run has exited), and check the outcome."""
    cmd, env, run_dir, model = _setup_run(tmp_path, name, env_extra)
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        before_step = _wait_for_checkpoint(run_dir, proc, first_log)
        running_at_kill = proc.poll() is None
        s3.kill()
        if down_s is None:
            rc = proc.wait(timeout=600)
            s3.start()
        else:
            time.sleep(down_s)
            s3.start()
            rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = first_log.read_text()
    assert running_at_kill and before_step < STEPS, "the run ended before the store was killed"
    # The store came back with what it had acknowledged: that checkpoint is still whole.
    assert checkpoint.find_latest(run_dir)[0] >= before_step

    result = {"rc": rc, "before_step": before_step, "out": out}
    if rc == 0:
        result["outcome"] = "retried and completed"
        # One uninterrupted run: every step exactly once, in order, never resumed.
        rows = read_metrics(run_dir, latest_per_step=False)
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), out[-3000:]
        assert all(r["resumed_from"] == 0 for r in rows)
        assert "resuming" not in out
    else:
        result["outcome"] = "failed clearly and resumed"
        assert f"ift train: training run {name} failed" in out, out[-3000:]
        assert s3.url in out, out[-3000:]  # names the endpoint it could not reach
        resume_step, resume_path = checkpoint.find_latest(run_dir)
        assert resume_step >= before_step
        assert _verified(resume_path)["step"] == resume_step
        second_log = tmp_path / "second.log"
        with open(second_log, "w") as log:
            rc2 = subprocess.run(cmd, env=env, cwd=tmp_path, stdout=log,
                                 stderr=subprocess.STDOUT, timeout=600).returncode
        out2 = second_log.read_text()
        assert rc2 == 0, out2[-3000:]
        assert f"resuming {name} from step {resume_step}" in out2, out2[-3000:]
        assert f"{STEPS}/{STEPS} steps" in out2
        rows = read_metrics(run_dir, latest_per_step=False)
        resumed = [r for r in rows if r["resumed_from"] == resume_step]
        assert [r["step"] for r in resumed] == list(range(resume_step + 1, STEPS + 1))
        # Steps taken again after the resume see the same rows and weights: same loss.
        again = {r["step"]: r["loss"] for r in resumed}
        for r in rows:
            if r["resumed_from"] == 0 and r["step"] in again:
                assert r["loss"] == pytest.approx(again[r["step"]], abs=1e-5), r
        result["resume_step"] = resume_step

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    assert json.loads(storage.read_text(f"{run_dir}/run.json"))["status"] == "FINISHED"
    last_step, last = checkpoint.find_latest(run_dir)
    assert last_step == STEPS and _verified(last)["step"] == STEPS
    final = f"{run_dir}/final"
    assert storage.is_complete(final)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model),
                              storage.local_copy(final))
    print(f"\n{name}: store killed after checkpoint {before_step}; {result['outcome']}")
    return result


@pytest.mark.slow
def test_short_outage_during_training(s3, tmp_path):
    """Default retry budget, store away for a few seconds: either outcome is correct. With
    about 25 s of retries against a few seconds away the run normally rides it out; an
    answer lost in the kill (a multipart upload completed but not acknowledged, say) may
    still fail it, and then it must resume."""
    _train_through_outage(s3, tmp_path, "short", down_s=4.0, env_extra={})


@pytest.mark.slow
def test_outage_longer_than_the_retries_fails_clearly_and_resumes(s3, tmp_path):
    """Two attempts per request and the store away until the run gives up: the run must
    fail with an error naming the endpoint, and the same command resumes it."""
    result = _train_through_outage(s3, tmp_path, "long", down_s=None,
                                   env_extra={"AWS_MAX_ATTEMPTS": "2"})
    assert result["rc"] != 0
