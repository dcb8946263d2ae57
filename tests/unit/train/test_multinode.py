"""Multi-node preflight: every path workers on other nodes read or write must be on
s3:// or under a prefix declared shared; one node accepts anything."""

from __future__ import annotations

import pytest

from ift.config import ConfigError, load_config
from ift.train.multinode import check_shared_storage, unshared_paths


def _sections(tmp_path, *extra):
    """(storage section, model.name_or_path) of a config on a local model directory."""
    model = tmp_path / "model"
    model.mkdir()
    cfg = load_config(None, [f"model.name_or_path={model}", *extra])
    return cfg.storage, cfg.model.name_or_path


def test_local_paths_are_refused_on_two_nodes_with_every_key_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        check_shared_storage(*_sections(tmp_path), 2, prepared=str(tmp_path / "data"),
                             output=str(tmp_path / "runs"),
                             tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    msg = str(e.value)
    assert "2 nodes" in msg
    for key in ("train.data=", "train.output=", "model.name_or_path=", "tracking.uri="):
        assert key in msg, key
    assert "storage.shared_paths" in msg and "s3://" in msg


def test_one_node_accepts_local_paths(tmp_path):
    check_shared_storage(*_sections(tmp_path), 1, prepared=str(tmp_path / "d"),
                         output=str(tmp_path / "r"))


def test_s3_and_declared_shared_prefixes_pass(tmp_path):
    sections = _sections(tmp_path, f"storage.shared_paths={tmp_path}/model,/mnt/nfs")
    assert unshared_paths(*sections, prepared="s3://b/prepared", output="/mnt/nfs/runs",
                          tracking_uri="http://mlflow:5000") == []
    # A prefix matches whole path segments only.
    assert unshared_paths(*sections, prepared="s3://b/p", output="/mnt/nfs2/runs") == [
        "train.output=/mnt/nfs2/runs (a local path)"]
    # A hub id is not a local directory.
    hub = load_config(None, ["model.name_or_path=Qwen/Qwen2.5-0.5B"])
    assert unshared_paths(hub.storage, hub.model.name_or_path, prepared="s3://b/p",
                          output="s3://b/r") == []
