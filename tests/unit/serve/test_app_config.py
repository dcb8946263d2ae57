"""How a config becomes deployments: paths, engine arguments, auth digest, scaling, the vLLM
switch."""

from __future__ import annotations

import hashlib
import os

import pytest

from ift.config import ConfigError, build_config


def test_vllm_switch_maps_the_serve_section_to_llm_configs():
    from ift.serve.app import vllm_llm_configs

    cfg = build_config({"serve": {
        "backend": "vllm", "base_model": "org/model", "base_model_id": "base",
        "adapter_root": "s3://bucket/adapters", "merged_models": {"m1": "s3://bucket/m1"},
        "autoscaling": {"min_replicas": 1, "max_replicas": 3}, "accelerator_type": "L4",
        "engine_kwargs": {"max_model_len": 2048}, "max_adapters_per_replica": 6}})
    base, merged = vllm_llm_configs(cfg)
    assert base["model_loading_config"] == {"model_id": "base", "model_source": "org/model"}
    assert base["lora_config"] == {"dynamic_lora_loading_path": "s3://bucket/adapters",
                                   "max_num_adapters_per_replica": 6}
    assert base["engine_kwargs"]["enable_lora"] and base["engine_kwargs"]["max_model_len"] == 2048
    assert base["deployment_config"]["autoscaling_config"]["max_replicas"] == 3
    assert base["accelerator_type"] == "L4"
    assert merged["model_loading_config"]["model_id"] == "m1" and "lora_config" not in merged


def test_scaling_and_resources_come_from_the_config():
    from ift.serve.app import LIGHT_REQUESTS, UNBOUNDED_ONGOING, _scaling

    cfg = build_config({"serve": {"num_replicas": 3, "cpus_per_replica": 2, "gpus_per_replica": 1,
                                  "max_ongoing_requests": 7, "max_queued_requests": 9}})
    opts = _scaling(cfg.serve)
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1.0}
    # The replica admits 7 + 9 generation requests itself (a JSON 503 past that); Serve's
    # cap leaves room for those and the light routes, and never queues at the proxy.
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"]) == (
        7 + 9 + LIGHT_REQUESTS, -1)
    unbounded = _scaling(build_config({"serve": {"max_queued_requests": -1}}).serve)
    assert unbounded["max_ongoing_requests"] == UNBOUNDED_ONGOING
    auto = _scaling(build_config({"serve": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}}}).serve)
    assert auto["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in auto


def test_api_key_digest_reads_the_named_variable(monkeypatch):
    from ift.serve.app import api_key_digest

    assert api_key_digest(build_config({}).serve) == ""
    cfg = build_config({"serve": {"api_key_env": "IFT_UNIT_KEY"}})
    monkeypatch.delenv("IFT_UNIT_KEY", raising=False)
    with pytest.raises(ConfigError, match="IFT_UNIT_KEY"):
        api_key_digest(cfg.serve)
    monkeypatch.setenv("IFT_UNIT_KEY", "k1")
    assert api_key_digest(cfg.serve) == hashlib.sha256(b"k1").hexdigest()


def test_relative_paths_resolve_under_the_storage_root_only_when_they_exist_there(
        tmp_path, monkeypatch):
    from ift.serve.app import _path

    root = tmp_path / "root"
    (root / "runs" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert _path(str(root), "runs/a") == os.path.join(str(root), "runs/a")
    assert _path(str(root), "runs/missing") == "runs/missing"  # a hub id, say
    (tmp_path / "here").mkdir()
    assert _path(str(root), "here") == "here"  # exists as given: not moved under the root
    for given in ("", "/abs/model", "s3://bucket/model", "org/model"):
        assert _path(str(root), given) == given


def test_base_model_and_catalog_paths_come_from_the_serve_section(tmp_path):
    from ift.serve.app import base_model_path, catalog_kwargs

    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "a1").mkdir()
    cfg = build_config({"model": {"name_or_path": "runs/tiny"}, "serve": {
        "base_model_id": "b", "adapters": {"a1": "runs/a1", "hub": "org/adapter"},
        "adapter_root": "s3://bucket/runs", "merged_models": {"m": "/abs/merged"}}})
    root = str(tmp_path)
    assert catalog_kwargs(cfg.serve, cfg.model, root) == {
        "base_id": "b", "base_path": os.path.join(root, "runs/tiny"),
        "adapters": {"a1": os.path.join(root, "runs/a1"), "hub": "org/adapter"},
        "adapter_root": "s3://bucket/runs", "merged": {"m": "/abs/merged"}}
    cfg.serve.base_model = "org/other"  # serve.base_model wins over model.name_or_path
    assert base_model_path(cfg.serve, cfg.model, root) == "org/other"
    empty = build_config({})
    with pytest.raises(ConfigError, match=r"serve\.base_model \(or model\.name_or_path\)"):
        base_model_path(empty.serve, empty.model, root)


@pytest.mark.parametrize("gpus,cpus,device,threads", [(0, 2.5, "cpu", 2), (1, 0.5, "cuda", 1)])
def test_engine_kwargs_follow_the_replica_resources(gpus, cpus, device, threads):
    from ift.serve.app import engine_kwargs

    cfg = build_config({"model": {"dtype": "bf16", "trust_remote_code": True},
                        "serve": {"gpus_per_replica": gpus, "cpus_per_replica": cpus,
                                  "max_batch_size": 5, "batch_wait_timeout_s": 0.02}})
    assert engine_kwargs(cfg.serve, cfg.model, "chatml") == {
        "dtype": "bf16", "device": device, "template": "chatml", "max_batch_size": 5,
        "batch_wait_timeout_s": 0.02, "trust_remote_code": True, "num_threads": threads}


@pytest.mark.parametrize("override,key", [
    ({"max_ongoing_requests": 0}, "serve.max_ongoing_requests"),
    ({"max_tokens_limit": 0}, "serve.max_tokens_limit"),
    ({"max_queued_requests": -2}, "serve.max_queued_requests"),
    ({"request_timeout_s": 0}, "serve.request_timeout_s"),
    ({"backend": "tgi"}, "serve.backend"),
    ({"port": 70000}, "serve.port"),
])
def test_bad_serve_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config({"serve": override})
