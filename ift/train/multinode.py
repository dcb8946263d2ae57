"""Where a run's files must live when its workers span several nodes.

On one node every process shares a disk. On several, rank 0 (on any node) writes the
checkpoints, final/ and metrics.jsonl, every worker reads the prepared data and the base
model, and the driver reads the results back: a local path names a different folder on
each node, and a run would end with "final/ missing" or train on nothing. So before any
worker starts, a run on a cluster of more than one node needs each of those paths on
s3:// or under a prefix the user declares mounted on every node
(`storage.shared_paths`), and an MLflow store every node can reach (a server URI, not
the default sqlite file).
"""

from __future__ import annotations

import os

import ray

from ift import storage
from ift.config import ConfigError, StorageConfig


def _shared(path: str, shared_prefixes: list[str]) -> bool:
    if storage.is_remote(path):
        return True
    full = os.path.abspath(path)
    for prefix in shared_prefixes:
        p = os.path.abspath(prefix)
        if full == p or full.startswith(p.rstrip(os.sep) + os.sep):
            return True
    return False


def unshared_paths(storage_cfg: StorageConfig, model: str, *, prepared: str, output: str,
                   tracking_uri: str = "") -> list[str]:
    """'key=value (why)' for every path a multi-node run could not share; `model` is
    model.name_or_path."""
    shared = list(storage_cfg.shared_paths)
    problems = []
    for key, path in (("train.data", prepared), ("train.output", output)):
        if not _shared(path, shared):
            problems.append(f"{key}={path} (a local path)")
    if model and not storage.is_remote(model) and os.path.exists(model) \
            and not _shared(model, shared):
        problems.append(f"model.name_or_path={model} (a local directory)")
    if tracking_uri.startswith(("sqlite:", "file:")) or (tracking_uri and "://" not in
                                                          tracking_uri):
        store = tracking_uri.split(":///", 1)[-1]
        if not _shared(store, shared):
            problems.append(f"tracking.uri={tracking_uri} (a local MLflow store)")
    return problems


def check_shared_storage(storage_cfg: StorageConfig, model: str, num_nodes: int, *,
                         prepared: str, output: str,
                         tracking_uri: str = "") -> None:
    """A ConfigError naming every local path, when the cluster has more than one node."""
    if num_nodes <= 1:
        return
    problems = unshared_paths(storage_cfg, model, prepared=prepared, output=output,
                              tracking_uri=tracking_uri)
    if problems:
        raise ConfigError(
            f"the Ray cluster has {num_nodes} nodes, and workers on other nodes cannot "
            f"see: {'; '.join(problems)}. Put them on s3:// (AWS_ENDPOINT_URL for "
            "S3-compatible stores), use an MLflow server (tracking.uri=http://...), or list "
            "a prefix mounted on every node in storage.shared_paths"
        )


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive and offer CPUs."""
    return sum(1 for n in ray.nodes()
               if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
