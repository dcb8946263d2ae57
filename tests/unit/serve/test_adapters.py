"""What GET /v1/models shows an anonymous caller: ids, method, base, hashes, run ids; no
server paths (ift.serve.adapters.public_entry)."""

from __future__ import annotations

import json
import os

from ift.serve.adapters import Catalog, public_entry


def _adapter(path: str, record: dict) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "base_model_name_or_path": "/srv/models/tiny"}, f)
    with open(os.path.join(path, "ift_lineage.json"), "w") as f:
        json.dump(record, f)
    return path


def test_public_rows_carry_no_server_path(tmp_path):
    root = str(tmp_path)
    record = {"artifact": "adapter", "mlflow_run_id": "r" * 32, "run_name": "sft",
              "run_dir": f"{root}/runs/sft", "config": f"{root}/runs/sft/config.yaml",
              "tracking_uri": f"sqlite:///{root}/mlflow.db", "method": "lora",
              "base_model": f"{root}/model", "data_manifest_hash": "h" * 16,
              "prepared": f"{root}/data", "tokenizer": {"name_or_path": f"{root}/model"},
              "sources": [{"name": "alpaca", "path": f"{root}/a.json", "hash": "s" * 16,
                           "files": [{"path": f"{root}/a.json", "sha256": "0" * 64}]}],
              "created": "2026-01-01T00:00:00Z"}
    a = _adapter(f"{root}/runs/sft/final", record)
    merged = _adapter(f"{root}/merged", {**record, "artifact": "merged"})
    rows = Catalog("base", f"{root}/model", adapters={"sft": a}, merged={"m": merged}
                   ).list_models()
    full = json.dumps(rows)
    assert root in full  # the full rows (authenticated callers, serve.show_model_paths)

    public = [public_entry(r) for r in rows]
    text = json.dumps(public)
    assert root not in text and "/srv/" not in text, text
    by_id = {r["id"]: r for r in public}
    assert set(by_id) == {"base", "sft", "m"}
    assert not any("root" in r for r in public)
    sft = by_id["sft"]
    assert sft["parent"] == "base" and sft["object"] == "model"
    assert sft["metadata"] == {"type": "adapter", "artifact": "adapter", "method": "lora",
                               "mlflow_run_id": "r" * 32, "run_name": "sft",
                               "data_manifest_hash": "h" * 16,
                               "created": "2026-01-01T00:00:00Z", "base": "base",
                               "sources": [{"name": "alpaca", "hash": "s" * 16}]}
    assert by_id["base"]["metadata"] == {"type": "base"}
    assert by_id["m"]["metadata"]["type"] == "merged"


def test_lineage_walks_back_from_a_public_row(tmp_path):
    from ift import lineage

    root = str(tmp_path)
    record = {"artifact": "adapter", "mlflow_run_id": "r" * 32, "run_name": "sft",
              "run_dir": f"{root}/runs/sft", "method": "lora", "data_manifest_hash": "h" * 16,
              "sources": [{"name": "alpaca", "path": f"{root}/a.json", "hash": "s" * 16}]}
    a = _adapter(f"{root}/runs/sft/final", record)
    row = public_entry(Catalog("base", f"{root}/model", adapters={"sft": a}).list_models()[1])
    stages = lineage.record_stages(row["metadata"], None)
    run = next(s for s in stages if s["stage"] == "run")
    assert run["mlflow_run_id"] == "r" * 32
    assert root not in json.dumps(stages, default=str)
