"""`ift serve` as a user runs it: a process on a Ray cluster that drains on SIGTERM.

A streamed request that is in flight when the signal arrives finishes whole; then the
process removes its app, stops Serve and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import yaml

pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_lets_an_in_flight_stream_finish_then_exits(ray_cluster, tiny_model, tmp_path):
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"serve": {
        "base_model": tiny_model, "port": port, "max_tokens_limit": 512,
        "cpus_per_replica": 0.5}}))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "ift", "serve", "-c", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or no replica yet
                pass
            assert time.monotonic() < deadline, "ift serve did not come up"
            time.sleep(0.5)

        started = threading.Event()
        lines: list[str] = []

        def stream():
            # The tiny model never says eos on this prompt: 400 tokens take a while.
            body = {"model": "base", "stream": True, "temperature": 0, "max_tokens": 400,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "What is the capital of France?"}]}
            with requests.post(url + "/v1/chat/completions", json=body, stream=True,
                               timeout=300) as r:
                assert r.status_code == 200
                for ln in r.iter_lines(decode_unicode=True):
                    if ln:
                        lines.append(ln)
                        if '"content"' in ln and len(lines) > 2:
                            started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(120), lines
        proc.send_signal(signal.SIGTERM)
        t.join(300)
        assert not t.is_alive()
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = open(tmp_path / "serve.log").read()
    assert "shutting down" in out, out[-3000:]
    # The stream that was running finished whole: a finish reason, usage, [DONE].
    assert lines[-1] == "data: [DONE]", lines[-3:]
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert not any("error" in c for c in chunks), chunks[-2:]
    usage = chunks[-1]["usage"]
    finish = chunks[-2]["choices"][0]["finish_reason"]
    assert finish == "length" and usage["completion_tokens"] == 400 or finish == "stop", chunks[-2:]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text.strip()
    # And the server is gone (the proxy actor may take a moment to stop).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(url + "/health", timeout=5)
        except requests.ConnectionError:
            break
        except requests.Timeout:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("the HTTP port still answers after ift serve exited")
