"""A real `mlflow server` on loopback: sqlite backend, artifacts proxied over HTTP.

`start_mlflow_server(tmp_path)` starts one and returns (url, proc); `mlflow_server` is the
fixture around it (yields the URL, stops the server afterwards). The server runs in its own
process group so that stopping it also stops the web workers it spawns.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


def start_mlflow_server(tmp_path: Path, timeout: float = 180.0) -> tuple[str, subprocess.Popen]:
    """Start `mlflow server` on a free loopback port; wait until /health answers."""
    tmp_path = Path(tmp_path)
    port = _free_port()
    art = tmp_path / "mlflow-artifacts"
    art.mkdir(parents=True, exist_ok=True)
    log_path = tmp_path / "mlflow-server.log"
    cmd = [
        *_mlflow_cmd(), "server",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow-server.db'}",
        # Artifacts go through the server (mlflow-artifacts:/ URIs), as with a remote server.
        "--serve-artifacts", "--artifacts-destination", str(art),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n"
                               f"{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return url, proc
        except (urllib.error.URLError, OSError):
            pass
        if time.time() > deadline:
            stop_mlflow_server(proc)
            raise TimeoutError(f"mlflow server at {url} not healthy after {timeout}s:\n"
                               f"{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    """Stop the server and the workers in its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:  # workers left behind after the leader exited
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """URL of an `mlflow server` on loopback, shared by a module's tests (each test should
    use its own experiment name); stopped after the module, so its job consumers do not
    hold CPU for the rest of the session."""
    url, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield url
    stop_mlflow_server(proc)
