"""A two-node Ray cluster on loopback (Ray's own `ray.cluster_utils.Cluster`): local paths
are refused before any worker starts, and 2 workers placed one per node (STRICT_SPREAD)
train on s3:// storage (moto on loopback) and leave final/ and metrics there.

Run this module on its own: it starts its own cluster, not the session's `ray_cluster`.
"""

from __future__ import annotations

import os
import uuid

import pytest
from train_support import build_prepared, make_tiny_model

from ift import storage
from ift.config import ConfigError, load_config
from ift.train import driver
from ift.train.loop import read_metrics


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": env},
             logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def local_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    model = make_tiny_model(str(root / "model"))
    return model, build_prepared(str(root / "prepared"), model, n_train=16, n_val=4)


def _cfg(model, prepared, output, *extra):
    return load_config(None, [
        f"model.name_or_path={model}", f"train.data={prepared}", f"train.output={output}",
        "train.run_name=spread", "storage.root=/tmp/ift-unused", "tracking.enabled=false",
        "peft.dropout=0.0", "train.micro_batch_size=2", "train.num_workers=2",
        "train.cpus_per_worker=1", "train.placement_strategy=STRICT_SPREAD",
        "train.lr=1e-2", "train.warmup_ratio=0", "train.max_steps=3", "train.eval_every=0",
        "train.checkpoint_every=3", *extra,
    ])


def test_local_paths_are_refused_on_two_nodes(two_nodes, local_inputs, tmp_path):
    model, prepared = local_inputs
    out = tmp_path / "runs"
    with pytest.raises(ConfigError, match="2 nodes") as e:
        driver.train(_cfg(model, prepared, str(out)))
    assert "train.output=" in str(e.value) and "train.data=" in str(e.value)
    assert not out.exists()  # refused before the run directory was made


def test_two_workers_one_per_node_on_s3(two_nodes, local_inputs):
    model, prepared = local_inputs
    bucket = f"s3://ift-spread-{uuid.uuid4().hex[:8]}"
    storage.s3_client().create_bucket(Bucket=bucket[5:])
    storage.upload_dir(model, f"{bucket}/model")
    storage.upload_dir(prepared, f"{bucket}/prepared")
    summary = driver.train(_cfg(f"{bucket}/model", f"{bucket}/prepared", f"{bucket}/runs"))
    run_dir = f"{bucket}/runs/spread"
    assert summary["steps"] == 3
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert storage.is_complete(f"{run_dir}/final")
    assert storage.exists(f"{run_dir}/final/adapter_model.safetensors")
