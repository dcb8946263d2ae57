"""Paths a sweep hands to its trials are absolute (trials run in other working directories),
and held-out paths resolve like sources (as given) or like prepared dirs (under the root)."""

from __future__ import annotations

import os

from ift.config import load_config
from ift.eval.run import data_path
from ift.tune.driver import absolute_config, sweep_dir_of


def test_absolute_config_and_sweep_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "heldout.tsv").write_text("q\t1\tr\n")
    cfg = load_config(None, [
        "storage.root=work", "model.name_or_path=model", "data.sources.0.path=src/a.json",
        "eval.data=heldout.tsv,prepared", "tune.name=s", "tune.output=sweeps",
    ])
    raw = absolute_config(cfg, "sqlite:////abs/mlflow.db")
    assert raw["storage"]["root"] == str(tmp_path / "work")
    assert raw["model"]["name_or_path"] == str(tmp_path / "model")
    assert raw["data"]["sources"][0]["path"] == str(tmp_path / "src" / "a.json")
    # an existing file as given; anything else under storage.root
    assert raw["eval"]["data"] == f"{tmp_path / 'heldout.tsv'},{tmp_path / 'work' / 'prepared'}"
    assert raw["tracking"]["uri"] == "sqlite:////abs/mlflow.db"
    assert sweep_dir_of(cfg) == str(tmp_path / "work" / "sweeps" / "s")
    # a hub id that is not a local path stays as it is
    cfg2 = load_config(None, ["model.name_or_path=Qwen/Qwen2.5-0.5B"])
    assert absolute_config(cfg2, "")["model"]["name_or_path"] == "Qwen/Qwen2.5-0.5B"


def test_data_path_keeps_remote_and_absolute(tmp_path):
    cfg = load_config(None, [f"storage.root={tmp_path}"])
    assert data_path(cfg, "s3://b/heldout/") == "s3://b/heldout/"
    assert data_path(cfg, "/abs/x.tsv") == "/abs/x.tsv"
    assert data_path(cfg, "prepared") == os.path.join(str(tmp_path), "prepared")
