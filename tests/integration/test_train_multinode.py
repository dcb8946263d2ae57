"""A two-node Ray cluster on loopback (Ray's own `ray.cluster_utils.Cluster`): local paths
are refused before any worker starts, and 2 workers placed one per node (STRICT_SPREAD)
train on s3:// storage (moto on loopback) and leave final/ and metrics there.

Then a third node joins, and once a run has a complete checkpoint on s3 the node holding
one of its workers (not the head) is removed. The run restarts its workers on the nodes
left (train.max_failures=1), resumes from the newest complete checkpoint that existed when
the node went away, and finishes: every step once in metrics.jsonl, and steps after the
checkpoint with the losses of an uninterrupted run of the same config.

Run this module on its own: it starts its own cluster, not the session's `ray_cluster`.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
from train_support import build_prepared, make_tiny_model

from ift import storage
from ift.config import ConfigError, load_config
from ift.train import checkpoint, driver
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


def _bucket(model, prepared) -> str:
    bucket = f"s3://ift-spread-{uuid.uuid4().hex[:8]}"
    storage.s3_client().create_bucket(Bucket=bucket[5:])
    storage.upload_dir(model, f"{bucket}/model")
    storage.upload_dir(prepared, f"{bucket}/prepared")
    return bucket


def test_two_workers_one_per_node_on_s3(two_nodes, local_inputs):
    bucket = _bucket(*local_inputs)
    summary = driver.train(_cfg(f"{bucket}/model", f"{bucket}/prepared", f"{bucket}/runs"))
    run_dir = f"{bucket}/runs/spread"
    assert summary["steps"] == 3
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert storage.is_complete(f"{run_dir}/final")
    assert storage.exists(f"{run_dir}/final/adapter_model.safetensors")


def _worker_nodes(head_id: str) -> set[str]:
    """Node ids (not the head's) holding a bundle of a live placement group: Ray Train's
    worker group is the only one in this cluster."""
    from ray.util import placement_group_table

    return {node for pg in placement_group_table().values() if pg.get("state") == "CREATED"
            for node in pg.get("bundles_to_node_id", {}).values() if node != head_id}


def _remove_a_worker_node(cluster, run_dir: str, seen: dict, stop: threading.Event) -> None:
    """Once run_dir has a complete checkpoint, remove a non-head node holding a worker."""
    from ray.util import placement_group_table

    head_id = cluster.head_node.node_id
    while not stop.is_set():
        found = checkpoint.find_latest(run_dir)
        nodes = _worker_nodes(head_id) if found else set()
        seen["polls"] = seen.get("polls", 0) + 1
        seen["last_poll"] = {"checkpoint": found and found[0], "worker_nodes": sorted(nodes),
                             "cluster_nodes": [n.node_id for n in cluster.worker_nodes],
                             "head": head_id,
                             "pgs": [(pg.get("state"), pg.get("bundles_to_node_id"))
                                     for pg in placement_group_table().values()]}
        victims = [n for n in cluster.worker_nodes if n.node_id in nodes]
        if victims:
            # The newest complete checkpoint right before the node goes (one may finish
            # while it is being removed; resuming from that one is as good).
            seen["checkpoint_step"] = checkpoint.find_latest(run_dir)[0]
            cluster.remove_node(victims[0])
            seen["removed_at"] = time.time()
            return
        time.sleep(0.2)


NODE_LOSS_STEPS = 16
NODE_LOSS_EVERY = 2


def test_node_removed_mid_run_resumes_from_s3_checkpoint(two_nodes, local_inputs):
    cluster = two_nodes
    cluster.add_node(num_cpus=1)  # head + 2 nodes: the workers' 2 CPUs survive one loss
    cluster.wait_for_nodes()
    bucket = _bucket(*local_inputs)
    args = (f"{bucket}/model", f"{bucket}/prepared", f"{bucket}/runs")
    common = (f"train.max_steps={NODE_LOSS_STEPS}",
              f"train.checkpoint_every={NODE_LOSS_EVERY}", "train.num_to_keep=0")
    run_dir = f"{bucket}/runs/node-loss"
    seen: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_remove_a_worker_node, args=(cluster, run_dir, seen, stop),
                              daemon=True)
    killer.start()
    try:
        summary = driver.train(_cfg(*args, "train.run_name=node-loss", "train.max_failures=1",
                                    *common))
    finally:
        stop.set()
        killer.join(timeout=30)
    assert "removed_at" in seen, f"the run finished before a worker's node was removed: {seen}"
    assert summary["steps"] == NODE_LOSS_STEPS
    assert storage.is_complete(f"{run_dir}/final")

    rows = read_metrics(run_dir, latest_per_step=False)
    resumed = sorted({r["resumed_from"] for r in rows} - {0})
    assert len(resumed) == 1, resumed  # one restart
    start = resumed[0]
    # Resumed from a checkpoint, no older than the newest one when the node went.
    assert start % NODE_LOSS_EVERY == 0 and seen["checkpoint_step"] <= start < NODE_LOSS_STEPS
    latest = read_metrics(run_dir)
    assert [r["step"] for r in latest] == list(range(1, NODE_LOSS_STEPS + 1))  # none lost
    assert all(r["resumed_from"] == (0 if r["step"] <= start else start) for r in latest)

    reference = driver.train(_cfg(*args, "train.run_name=uninterrupted", *common))
    assert reference["steps"] == NODE_LOSS_STEPS
    ref = read_metrics(f"{bucket}/runs/uninterrupted")
    for got, want in zip(latest, ref, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5), (got, want)
