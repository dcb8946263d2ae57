"""The whole chain with `storage.root: s3://bucket/prefix` on an S3-compatible server on
loopback: sources and prepared data, checkpoints, the final adapter, eval results, the
merged model and MLflow's artifacts all live in the bucket, and each loads back."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ift import storage
from ift.config import load_config

STEPS = 4
pytestmark = pytest.mark.slow  # prepare, train, eval and merge: a couple of minutes


@pytest.fixture(scope="module")
def chain(ray_cluster, s3_server, tiny_model, sample_data_dir, tmp_path_factory):
    """prepare -> train -> eval -> merge, every path under one s3:// storage root."""
    import uuid

    from ift.data.pipeline import prepare
    from ift.eval.run import evaluate_run
    from ift.merge import log_merge, merge
    from ift.train import driver

    bucket = f"ift-chain-{uuid.uuid4().hex[:8]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/work"
    # The sources are read from the bucket too (the chain-of-thought file is left out: its
    # prompts alone exceed 64 tokens).
    names = sorted(p for p in os.listdir(sample_data_dir)
                   if p.endswith((".json", ".jsonl")) and not p.startswith(("cot_", "pref_")))
    for name in names:
        storage.write_bytes(f"s3://{bucket}/sources/{name}",
                            (sample_data_dir / name).read_bytes())
    local = tmp_path_factory.mktemp("s3-chain")
    overrides = [
        f"storage.root={root}", f"model.name_or_path={tiny_model}",
        "data.output=prepared", "data.max_seq_len=64", "data.val_ratio=0.1",
        "data.placeholders.name=ift", "data.placeholders.author=the ift authors",
        "train.output=runs", "train.run_name=chain", "train.num_workers=1",
        "train.micro_batch_size=4", "train.lr=1e-2", "train.warmup_ratio=0",
        f"train.max_steps={STEPS}", "train.checkpoint_every=2", "train.num_to_keep=2",
        "train.eval_every=2", "train.eval_max_batches=1", "peft.dropout=0.0",
        "eval.max_samples=4", "eval.max_new_tokens=8", "eval.batch_size=4",
        f"tracking.uri=sqlite:///{local}/mlflow.db", "tracking.experiment=s3-chain",
        f"tracking.artifact_location=s3://{bucket}/mlflow",
    ]
    overrides += [f"data.sources.{i}.path=s3://{bucket}/sources/{name}"
                  for i, name in enumerate(names)]
    cfg = load_config(None, overrides)
    manifest = prepare(cfg)
    summary = driver.train(cfg)
    run_dir = driver.run_dir_of(cfg)
    result = evaluate_run(cfg, run_dir)
    merged = f"{root}/merged/chain"
    lineage = merge(tiny_model, summary["final"], merged)
    merge_run = log_merge(cfg.tracking, cfg.storage.root, merged, lineage)
    return {"cfg": cfg, "bucket": bucket, "root": root, "manifest": manifest,
            "summary": summary, "run_dir": run_dir, "eval": result, "merged": merged,
            "merge_run": merge_run, "local": local}


def _keys(prefix: str) -> set[str]:
    return {f[len(prefix) + 1:] for f in storage.walk_files(prefix)}


def test_every_stage_writes_to_the_bucket(chain):
    from ift.data.dataset import read_manifest

    root, run_dir = chain["root"], chain["run_dir"]
    assert run_dir == f"{root}/runs/chain"
    prepared = f"{root}/prepared"
    assert storage.is_complete(prepared)
    manifest = read_manifest(prepared)
    assert manifest["hash"] == chain["manifest"]["hash"]
    assert manifest["splits"]["train"]["rows"] > 0 and manifest["splits"]["val"]["rows"] > 0
    assert any(k.startswith("train/") and k.endswith(".parquet") for k in _keys(prepared))

    names = set(storage.listdir(run_dir))
    assert {"checkpoint_0000002", "checkpoint_0000004", "final", "metrics.jsonl",
            "config.yaml", "run.json", "loss_curve.png", "eval.json",
            "samples.jsonl"} <= names
    from ift.train.checkpoint import find_latest

    assert find_latest(run_dir) == (STEPS, f"{run_dir}/checkpoint_{STEPS:07d}")
    info = json.loads(storage.read_text(f"{run_dir}/run.json"))
    assert info["status"] == "FINISHED" and info["prepared"] == prepared
    assert chain["summary"]["steps"] == STEPS
    ev = json.loads(storage.read_text(f"{run_dir}/eval.json"))
    assert ev["metrics"]["loss"] > 0 and ev["mlflow_run_id"] == info["mlflow_run_id"]

    # The local side holds only the tracking database.
    assert sorted(os.listdir(chain["local"])) == ["mlflow.db"]


def test_final_adapter_and_merged_model_load_from_local_copies(chain, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = chain["summary"]["final"]
    assert storage.is_complete(final)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                        storage.local_copy(final)).eval()
    merged_dir = chain["merged"]
    assert storage.is_complete(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(storage.local_copy(merged_dir)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a, m = adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(a, m, atol=1e-4)
    # The adapter moved away from the base model: the merge carries trained weights.
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(input_ids=ids).logits
    assert not torch.allclose(base, m, atol=1e-4)


def test_mlflow_artifacts_live_in_the_bucket(chain, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, bucket = chain["cfg"], chain["bucket"]
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("s3-chain")
    assert exp.artifact_location == f"s3://{bucket}/mlflow"
    run_id = chain["summary"]["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri == f"s3://{bucket}/mlflow/{run_id}/artifacts"
    # Training logged step metrics and eval logged its own into the same run.
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == \
        list(range(1, STEPS + 1))
    assert run.data.metrics["heldout/loss"] == pytest.approx(chain["eval"]["metrics"]["loss"])

    keys = _keys(f"s3://{bucket}/mlflow/{run_id}/artifacts")
    assert {"final/adapter_model.safetensors", "final/adapter_config.json",
            "final/_COMPLETE", "metrics.jsonl", "config.yaml", "loss_curve.png",
            "eval/eval.json", "eval/samples.jsonl"} <= keys, keys
    merge_run = chain["merge_run"]
    assert client.get_run(merge_run).data.tags["mlflow.parentRunId"] == run_id
    merged_keys = _keys(f"s3://{bucket}/mlflow/{merge_run}/artifacts")
    assert {"merged_model/config.json", "merged_model/model.safetensors",
            "merged_model/tokenizer.json"} <= merged_keys, merged_keys

    # Read back through MLflow itself: the adapter it holds loads with plain peft.
    got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="final",
                                              dst_path=str(tmp_path),
                                              tracking_uri=cfg.tracking.uri)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chain["cfg"].model
                                                                   .name_or_path), got)
    logged = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert logged["peft_type"] == "LORA"
