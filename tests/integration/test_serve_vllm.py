"""serve.backend=vllm: the same OpenAI routes through ray.serve.llm on a GPU.

Needs a CUDA GPU, vLLM (`pip install "ray[llm]"`) and a small model reachable from the
node (IFT_VLLM_TEST_MODEL: a hub id or local path); skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]


def _gpu_ready() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'ray[llm]')"
    if not os.environ.get("IFT_VLLM_TEST_MODEL"):
        return "IFT_VLLM_TEST_MODEL is not set"
    return None


def test_vllm_backend_answers_openai_requests(ray_cluster):
    why = _gpu_ready()
    if why:
        pytest.skip(why)
    from openai import OpenAI
    from ray import serve

    from ift.config import build_config
    from ift.serve.app import build_app

    cfg = build_config({"serve": {"backend": "vllm", "gpus_per_replica": 1,
                                  "base_model": os.environ["IFT_VLLM_TEST_MODEL"],
                                  "engine_kwargs": {"max_model_len": 1024}}})
    serve.run(build_app(cfg), name="ift-vllm", route_prefix="/")
    try:
        c = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
        assert "base" in [m.id for m in c.models.list().data]
        r = c.chat.completions.create(model="base", max_tokens=8, temperature=0,
                                      messages=[{"role": "user", "content": "Say hi"}])
        assert r.usage.completion_tokens >= 1
    finally:
        serve.delete("ift-vllm")
