"""`ift merge`: merged logits equal base+adapter logits; lineage and MLflow linkage."""

from __future__ import annotations

import json
import os

import pytest
from train_support import random_lora_adapter

# fp32 on CPU: merging W + BA reorders a few float additions, nothing more.
LOGITS_ATOL = 1e-4


def make_adapter(base: str, out: str, seed: int, r: int = 4) -> str:
    return random_lora_adapter(base, out, seed, r, target_modules="all-linear")


def test_merge_matches_adapter_logits_and_links_the_training_run(tiny_model, tmp_path):
    import mlflow
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ift import tracking
    from ift.cli import main
    from ift.config import build_config

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = build_config({"tracking": {"uri": uri}, "storage": {"root": str(tmp_path)}})
    train_run = tracking.start_run(cfg.tracking, cfg.storage.root, "train-1")
    tracking.end_run(train_run)

    adapter = make_adapter(tiny_model, str(tmp_path / "adapter"), seed=4)
    with open(os.path.join(adapter, "ift_lineage.json"), "w") as f:
        json.dump({"mlflow_run_id": train_run, "data_manifest_hash": "h1", "method": "lora",
                   "base_model": tiny_model}, f)
    out = str(tmp_path / "merged")
    rc = main(["merge", "--base", tiny_model, "--adapter", adapter, "--out", out,
               f"tracking.uri={uri}", f"storage.root={tmp_path}"])
    assert rc == 0

    # A plain HF model dir: safetensors weights, config, tokenizer; no adapter files.
    files = set(os.listdir(out))
    assert "model.safetensors" in files and "config.json" in files
    assert "tokenizer.json" in files and "adapter_config.json" not in files
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                    adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(["The quick brown fox jumps over the lazy dog", "一二三 hello"],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        got = merged(**ids).logits
        want = ref(**ids).logits
        plain = base(**ids).logits
    mask = ids["attention_mask"].bool()
    diff = (got - want)[mask].abs().max().item()
    assert diff < LOGITS_ATOL, diff
    assert (plain - want)[mask].abs().max().item() > 100 * LOGITS_ATOL  # the adapter matters

    lineage = json.load(open(os.path.join(out, "ift_lineage.json")))
    assert lineage["training_run_id"] == train_run
    assert lineage["data_manifest_hash"] == "h1"
    assert lineage["merged_from"] == {"base": tiny_model, "adapter": adapter}

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(lineage["merge_run_id"])
    assert run.data.tags["ift.training_run_id"] == train_run
    assert run.data.tags["mlflow.parentRunId"] == train_run
    assert run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "merged_model")}
    assert "merged_model/model.safetensors" in logged


def test_merge_refuses_a_dir_without_an_adapter(tiny_model, tmp_path):
    from ift.merge import merge

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge(tiny_model, str(tmp_path), str(tmp_path / "out"))
