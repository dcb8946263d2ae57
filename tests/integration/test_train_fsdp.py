"""`ift train` with train.strategy=fsdp on CPU: 2 Ray Train workers joined by gloo run the
FSDP wrap, optimizer, step, checkpoint and resume code a GPU cluster runs.

- LoRA on 2 FSDP workers × accumulation 2, and on 2 DDP workers × accumulation 2, equals
  1 DDP worker × accumulation 4 (same rows per step, token-weighted loss): losses per
  step, eval loss and the final adapter;
- the final adapter is non-empty and loads with plain peft;
- a run resumed from its step-3 checkpoint on 2 workers, and on 1 worker, reproduces the
  uninterrupted run;
- a full fine-tune on 2 FSDP workers trains and saves an HF model.

Tolerances: 2e-4 on losses, 1e-4 on adapter weights (float summation order: all-reduce
and reduce-scatter against local accumulation).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from train_support import build_prepared, make_tiny_model

from ift.config import load_config
from ift.train import driver
from ift.train.loop import read_metrics

STEPS = 6
LOSS_TOL = 2e-4
WEIGHT_TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("fsdp-llama")))


@pytest.fixture(scope="module")
def prepared(model_dir, tmp_path_factory):
    return build_prepared(str(tmp_path_factory.mktemp("fsdp-data")), model_dir,
                          n_train=48, n_val=8)


def _cfg(model_dir, prepared, root, name, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"train.data={prepared}",
        f"train.output={root}/runs", f"train.run_name={name}", f"storage.root={root}/work",
        "tracking.enabled=false", "peft.dropout=0.0", "train.micro_batch_size=2",
        "train.lr=1e-2", "train.warmup_ratio=0", f"train.max_steps={STEPS}",
        "train.weight_decay=0.1", "train.eval_every=3", "train.eval_max_batches=2",
        "train.checkpoint_every=3", "train.num_to_keep=2", "train.cpus_per_worker=1",
        *extra,
    ])


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "final", "adapter_model.safetensors"))


def _same_adapter(a, b):
    assert set(a) == set(b) and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=WEIGHT_TOL, msg=k)


def _same_losses(a, b, steps):
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(steps)
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=LOSS_TOL), (ra, rb)


@pytest.fixture(scope="module")
def fsdp2(ray_cluster, model_dir, prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    cfg = _cfg(model_dir, prepared, root, "fsdp2", "train.strategy=fsdp",
               "train.num_workers=2", "train.grad_accum=2")
    summary = driver.train(cfg)
    return summary, str(root / "runs" / "fsdp2")


@pytest.fixture(scope="module")
def ddp1(ray_cluster, model_dir, prepared, tmp_path_factory):
    """The reference: 1 DDP worker × accumulation 4 (the same rows per step)."""
    root = tmp_path_factory.mktemp("ddp1")
    driver.train(_cfg(model_dir, prepared, root, "ddp1", "train.num_workers=1",
                      "train.grad_accum=4"))
    return str(root / "runs" / "ddp1")


def _equal_runs(run_dir, ref_dir):
    _same_losses(read_metrics(run_dir), read_metrics(ref_dir), range(1, STEPS + 1))
    assert read_metrics(run_dir)[-1]["eval_loss"] == pytest.approx(
        read_metrics(ref_dir)[-1]["eval_loss"], abs=LOSS_TOL)
    _same_adapter(_adapter(run_dir), _adapter(ref_dir))


def test_fsdp_lora_equals_ddp_on_one_worker(ray_cluster, fsdp2, ddp1, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary, run_dir = fsdp2
    assert summary["steps"] == STEPS and summary["global_batch_size"] == 8
    rows = read_metrics(run_dir)
    assert rows[-1]["loss"] < rows[0]["loss"]
    adapter = _adapter(run_dir)
    assert len(adapter) > 0 and not any("_fsdp" in k for k in adapter)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                              os.path.join(run_dir, "final"))
    _equal_runs(run_dir, ddp1)


def test_ddp_two_workers_accum_2_equals_one_worker_accum_4(ray_cluster, ddp1, model_dir,
                                                           prepared, tmp_path):
    """Token-weighted loss: the step's mean over every trainable token, however the
    tokens are spread over workers and micro-batches."""
    driver.train(_cfg(model_dir, prepared, tmp_path, "ddp2", "train.num_workers=2",
                      "train.grad_accum=2"))
    _equal_runs(str(tmp_path / "runs" / "ddp2"), ddp1)


@pytest.mark.parametrize("workers,accum", [(2, 2), (1, 4)], ids=["2to2", "2to1"])
def test_fsdp_resume_reproduces_the_uninterrupted_run(ray_cluster, fsdp2, model_dir,
                                                      prepared, tmp_path, workers, accum):
    _, full_dir = fsdp2
    name = f"resume{workers}"
    run_dir = tmp_path / "runs" / name
    os.makedirs(run_dir)
    shutil.copytree(os.path.join(full_dir, "checkpoint_0000003"),
                    run_dir / "checkpoint_0000003")
    cfg = _cfg(model_dir, prepared, tmp_path, name, "train.strategy=fsdp",
               f"train.num_workers={workers}", f"train.grad_accum={accum}")
    driver.train(cfg)
    rows = read_metrics(str(run_dir))
    assert all(r["resumed_from"] == 3 for r in rows)
    _same_losses(rows, read_metrics(full_dir)[3:], range(4, STEPS + 1))
    _same_adapter(_adapter(str(run_dir)), _adapter(full_dir))


def test_fsdp_full_fine_tune(ray_cluster, model_dir, prepared, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(model_dir, prepared, tmp_path, "full2", "train.strategy=fsdp",
               "peft.method=full", "train.num_workers=2", "train.grad_accum=2",
               "train.lr=1e-3")
    driver.train(cfg)
    run_dir = str(tmp_path / "runs" / "full2")
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"]
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final"))
    changed = [n for (n, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters())
               if not torch.equal(a, b)]
    assert len(changed) == len(list(base.parameters()))
