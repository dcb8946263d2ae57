"""The stages as Ray jobs: `ray job submit` to a real head started with `ray start`.

A head node runs on loopback with its own ports and temp dir (so it neither joins nor
disturbs any other Ray on the machine, including the session's `ray_cluster`). prepare,
train and eval are submitted one after another, as the README shows them: the repository
as working dir, jobs/runtime_env.yaml as runtime env, `python -m ift ...` or the thin
`python jobs/<stage>.py ...` scripts as entrypoints. Each must end SUCCEEDED and leave the
prepared dataset, the trained adapter, eval.json and the MLflow runs behind.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
RUNTIME_ENV = REPO / "jobs" / "runtime_env.yaml"
JOB_TIMEOUT_S = 600
RUN_NAME = "jobs-lora"
MAX_STEPS = 4
EVAL_SAMPLES = 4

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="finds the head's processes through /proc")


@dataclass
class Head:
    temp_dir: str
    gcs_address: str
    dashboard_url: str
    proc: subprocess.Popen
    log: Path


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:  # held open together, so all distinct
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _worker_port_range(size: int = 200) -> tuple[int, int]:
    """A range outside Ray's default (10002-19999) and the kernel's ephemeral ports, so that
    other local clusters and `_free_ports` do not hand out the same ports."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(50):
        lo = rng.randrange(20000, 32000 - size)
        if all(_port_free(p) for p in range(lo, lo + size, 10)):
            return lo, lo + size - 1
    raise RuntimeError("no free worker port range in 20000-32000")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _head_env() -> dict[str, str]:
    """The environment the head (and so every job driver and worker) inherits: the venv's
    `python` first on PATH, and nothing that would point the jobs at another cluster, MLflow
    store or S3 endpoint than the ones their config names."""
    env = {k: v for k, v in os.environ.items()
           if k != "RAY_ADDRESS" and not k.startswith(("MLFLOW_", "AWS_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray maps --node-ip-address=127.0.0.1 to the machine's address unless told that this
    # is a single-node cluster; this keeps every address of the node on loopback.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # A token in ~/.ray would switch a new head to token authentication, and a session's
    # ray.init() sets RAY_AUTH_MODE=token for this process. The head listens on loopback
    # only, so it runs without tokens, whatever the machine's state.
    env["RAY_AUTH_MODE"] = "disabled"
    # SIGTERM to `ray start --block` drains the node for 30 s by default before stopping it.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    return env


def _head_pids(head: Head) -> list[int]:
    """Processes of this head only: those naming its temp dir (GCS, raylet, dashboard,
    workers) and job drivers, which carry its GCS address (a port only it holds) in
    RAY_ADDRESS."""
    port = f":{head.gcs_address.rsplit(':', 1)[1]}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if head.temp_dir in cmd or any(e.startswith(b"RAY_ADDRESS=") and e.endswith(port)
                                        for e in env):
            out.append(int(d))
    return out


def _stop_head(head: Head) -> None:
    """`ray stop` would stop every Ray on the machine; stop only this head: SIGTERM to
    `ray start --block` (which shuts its node down), then kill what is left of it."""
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
        try:
            head.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.proc.kill()
            head.proc.wait(timeout=10)
    deadline = time.time() + 20
    while _head_pids(head) and time.time() < deadline:
        time.sleep(1)
    for pid in _head_pids(head):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def ray_head():
    yield from start_head(_head_env())


def start_head(env: dict[str, str]):
    """A `ray start --head --block` on loopback with its own ports and temp dir, run with
    `env`; yields the Head once its jobs API answers, then stops just that head."""
    # Short: Ray's Unix sockets live under it, and socket paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="iftj-", dir="/tmp")
    (gcs, dashboard, client, node_manager, object_manager, env_agent, agent_http, agent_grpc,
     metrics) = _free_ports(9)
    lo, hi = _worker_port_range()
    log = Path(temp_dir) / "ray-start.log"
    cmd = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}", f"--runtime-env-agent-port={env_agent}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--min-worker-port={lo}", f"--max-worker-port={hi}",
        "--num-cpus=2", "--num-gpus=0", "--object-store-memory=400000000",
    ]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=temp_dir, start_new_session=True)
    head = Head(temp_dir, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", proc, log)
    try:
        _wait_for_jobs_api(head, timeout=180, env=env)
        yield head
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(head: Head, timeout: float, env: dict[str, str]) -> None:
    import urllib.request

    token_file = Path(env.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if head.proc.poll() is not None:
            pytest.fail(f"ray start exited with {head.proc.returncode}:\n{_tail(head.log)}")
        try:
            # The jobs module's own route; a head with token authentication wants the token.
            req = urllib.request.Request(f"{head.dashboard_url}/api/version")
            if env.get("RAY_AUTH_MODE") == "token" and token_file.is_file():
                req.add_header("Authorization", f"Bearer {token_file.read_text().strip()}")
            with urllib.request.urlopen(req, timeout=5):
                pass
            return
        except Exception as e:  # noqa: BLE001 (not up yet)
            last = e
            time.sleep(1)
    pytest.fail(f"the jobs API at {head.dashboard_url} did not answer in {timeout}s: {last}\n"
                f"{_tail(head.log)}")


def _submit_cli(head: Head, entrypoint: list[str], *, runtime_env: Path,
                num_cpus: float) -> str:
    """`ray job submit` exactly as the README shows it, run from the repository root."""
    sid = f"ift-{uuid.uuid4().hex[:8]}"
    cmd = [RAY, "job", "submit", "--address", head.dashboard_url, "--submission-id", sid,
           "--no-wait", "--working-dir", ".", "--runtime-env", str(runtime_env),
           f"--entrypoint-num-cpus={num_cpus}", "--", *entrypoint]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}"
    return sid


def _wait_job(head: Head, sid: str, timeout: float = JOB_TIMEOUT_S) -> str:
    """Wait for SUCCEEDED; on anything else fail with the job's logs. Returns the logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url)
    deadline = time.time() + timeout
    while True:
        status = client.get_job_status(sid)
        if status.is_terminal():
            break
        if time.time() > deadline:
            client.stop_job(sid)
            pytest.fail(f"job {sid} still {status} after {timeout}s; logs:\n"
                        f"{client.get_job_logs(sid)[-6000:]}")
        time.sleep(2)
    logs = client.get_job_logs(sid)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(sid)
        pytest.fail(f"job {sid} ended {status}: {info.message}\nlogs:\n{logs[-6000:]}\n"
                    f"head log:\n{_tail(head.log, 2000)}")
    return logs


def _job_config(tmp: Path, tiny_model: str) -> Path:
    cfg = {
        "storage": {"root": str(tmp / "work")},
        "model": {"name_or_path": tiny_model},
        "data": {
            "output": "data",
            "max_seq_len": 128,
            "val_ratio": 0.1,
            "placeholders": {"name": "ift", "author": "the ift authors"},
            # Bundled data, found in the job's copy of the working dir.
            "sources": [
                {"path": "@sample/alpaca_en.json", "tags": ["en"]},
                {"path": "@sample/cot_arith.tsv", "tags": ["cot"]},
                {"path": "@sample/identity_en.json", "tags": ["identity"]},
            ],
        },
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "train": {"run_name": RUN_NAME, "output": "runs", "num_workers": 1,
                  "micro_batch_size": 4, "max_steps": MAX_STEPS, "lr": 0.01,
                  "warmup_ratio": 0.0, "eval_every": 0, "checkpoint_every": 0,
                  "eval_max_batches": 2},
        "eval": {"max_samples": EVAL_SAMPLES, "max_new_tokens": 8, "batch_size": 4},
        "tracking": {"experiment": "ift-jobs"},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_prepare_train_eval_as_ray_jobs(ray_head, tiny_model, tmp_path):
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors
    from transformers import AutoModelForCausalLM

    from ift.data.dataset import read_manifest

    config = _job_config(tmp_path, tiny_model)
    # The runtime env as it ships, pip pins included: Ray clones this virtualenv once per
    # node and pip finds every pin satisfied, so nothing is downloaded.
    runtime_env = RUNTIME_ENV
    work = tmp_path / "work"
    timings = {}

    # 1. prepare: the CLI module as entrypoint, submitted with the `ray job submit` CLI.
    t0 = time.time()
    sid = _submit_cli(ray_head, ["python", "-m", "ift", "data", "prepare", "-c", str(config)],
                      runtime_env=runtime_env, num_cpus=0.5)
    logs = _wait_job(ray_head, sid)
    timings["prepare"] = time.time() - t0
    prepared = work / "data"
    manifest = read_manifest(str(prepared))
    assert set(manifest["sources"]) == {"alpaca_en", "cot_arith", "identity_en"}
    assert manifest["splits"]["train"]["rows"] > 0 and manifest["splits"]["val"]["rows"] > 0
    # The bundled data came from the job's copy of the working dir, under this head's
    # temp dir, not from this checkout.
    src = manifest["sources"]["alpaca_en"]["files"][0]["path"]
    assert src.startswith(ray_head.temp_dir) and src.endswith("ift/sample_data/alpaca_en.json")
    assert "alpaca_en" in logs  # the summary the command prints

    # 2. train: the thin jobs/train.py script, submitted with JobSubmissionClient.
    t0 = time.time()
    client = JobSubmissionClient(ray_head.dashboard_url)
    sid = client.submit_job(
        entrypoint=f"python jobs/train.py -c {config}",
        runtime_env={**yaml.safe_load(runtime_env.read_text()), "working_dir": str(REPO)},
        entrypoint_num_cpus=0.5,
    )
    logs = _wait_job(ray_head, sid)
    timings["train"] = time.time() - t0
    run_dir = work / "runs" / RUN_NAME
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "FINISHED" and info["steps"] == MAX_STEPS
    assert f"{MAX_STEPS} steps" in logs
    # The workers ran on this head, not on a cluster the driver started for itself.
    workers = list_actors(address=ray_head.dashboard_url, limit=1000)
    assert any("TrainWorker" in a.class_name for a in workers), [a.class_name for a in workers]

    final = run_dir / "final"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                      str(final))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero

    # 3. eval: the CLI module again; it finds the run from the config.
    t0 = time.time()
    sid = _submit_cli(ray_head, ["python", "-m", "ift", "eval", "-c", str(config)],
                      runtime_env=runtime_env, num_cpus=0.5)
    _wait_job(ray_head, sid)
    timings["eval"] = time.time() - t0
    ev = json.loads((run_dir / "eval.json").read_text())
    m = ev["metrics"]
    assert math.isfinite(m["loss"]) and m["loss"] > 0 and m["samples"] == EVAL_SAMPLES
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-6)

    # MLflow: the training run finished, with its steps and the held-out metrics of eval.
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    run = mlflow.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ift.command"] == "train"
    assert run.info.experiment_id == mlflow.get_experiment_by_name("ift-jobs").experiment_id
    history = mlflow.get_metric_history(run.info.run_id, "loss")
    assert sorted(h.step for h in history) == list(range(1, MAX_STEPS + 1))
    assert run.data.metrics["heldout/loss"] == pytest.approx(m["loss"])
    assert ev["mlflow_run_id"] == run.info.run_id
    print("job wall times (s):", {k: round(v, 1) for k, v in timings.items()})


def _readme_ray_jobs_block() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Ray jobs", 1)[1].split("\n## ", 1)[0]
    return section.split("```bash", 1)[1].split("```", 1)[0].splitlines()


def test_readme_job_submit_works_on_a_machine_that_holds_a_ray_token(tmp_path):
    # Any `ift` command that started a local cluster leaves ~/.ray/auth_token behind. On such
    # a machine the README's commands, run as written, must submit a job.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)
    block = _readme_ray_jobs_block()
    start = next(i for i, line in enumerate(block) if line.startswith("ray start --head"))
    exports = dict(line.split("#")[0].strip()[len("export "):].split("=", 1)
                   for line in block[:start] if line.startswith("export "))
    assert exports.get("RAY_AUTH_MODE") == "token", block[:start]
    assert not any("only if" in line for line in block if "RAY_AUTH_MODE" in line)

    base = {k: v for k, v in _head_env().items() if k != "RAY_AUTH_MODE"}
    base["HOME"] = str(home)
    env = {**base, **exports}
    for head in start_head(env):
        submit = [RAY, "job", "submit", "--address", head.dashboard_url, "--",
                  "python", "-c", "print('ift-job-ran')"]
        # Without the variable the head still wants the token and the CLI sends none.
        p = subprocess.run(submit, env=base, capture_output=True, text=True, timeout=300)
        assert p.returncode != 0 and "Authentication" in p.stdout + p.stderr, p.stdout + p.stderr
        # As the README says: it runs.
        p = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "ift-job-ran" in p.stdout and "succeeded" in p.stdout, p.stdout
