"""Shared fixtures: a real local Ray, a real S3-compatible server on loopback, tiny models.

Nothing here stands in for the thing under test: Ray is a real local cluster, S3 is moto's
HTTP server (a separate process speaking the S3 protocol), models are real HF
architectures with random weights and a tokenizer trained on the bundled sample data.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Keep Ray quiet and small on a 2-CPU machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except Exception as e:  # noqa: BLE001
            last = e
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout}s: {last}")


def start_s3_server(port: int | None = None) -> tuple[str, subprocess.Popen]:
    """moto's S3 server as a separate process on loopback."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url, proc=proc)
    return url, proc


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible HTTP server on loopback; AWS_* variables point boto3 and pyarrow at it."""
    url, proc = start_s3_server()
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from ift import storage

    storage._s3_client.cache_clear()
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._s3_client.cache_clear()


@pytest.fixture
def s3_bucket(s3_server):
    import uuid

    from ift import storage

    name = f"ift-test-{uuid.uuid4().hex[:10]}"
    storage.s3_client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the session, sized like the CI machine.

    It starts after the S3 server so that its worker processes inherit AWS_ENDPOINT_URL.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=True,
        runtime_env={"env_vars": {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_data_dir() -> Path:
    d = REPO / "ift" / "sample_data"
    if not any(d.glob("*.json*")):
        pytest.fail("bundled sample data is missing from ift/sample_data")
    return d


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sample_data_dir) -> str:
    """A tiny llama with a tokenizer trained on the bundled sample data (the folder's own
    files; ie/ holds the IE samples)."""
    from ift.models import init_tiny

    out = tmp_path_factory.mktemp("tiny-llama")
    return init_tiny(str(out), arch="llama", data=[str(sample_data_dir / "*")], seed=0)
