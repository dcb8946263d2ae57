"""Preference objectives with train.strategy=fsdp on CPU: 2 Ray Train workers joined by
gloo, the FSDP wrap the GPU path uses.

DPO (reference: the same FSDP-wrapped model with the adapter disabled) and SimPO
(reference-free, length-normalised: no second pass) on 2 FSDP workers each equal 1 DDP
worker × accumulation 2 (the same 8 pairs per step, losses as means over pairs):
losses, rewards and eval loss per step within 2e-4, the final adapters within 1e-4 (float
summation order: reduce-scatter against local accumulation); the FSDP run's adapter
is non-empty, has no FSDP names and loads with plain peft.
"""

from __future__ import annotations

import os

import pytest
import torch

from ift.config import load_config
from ift.data.pipeline import prepare
from ift.train import driver
from ift.train.loop import read_metrics

STEPS = 4
LOSS_TOL = 2e-4
WEIGHT_TOL = 1e-4


@pytest.fixture(scope="module")
def prepared(ray_cluster, tiny_model, sample_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pref-fsdp")
    prepare(load_config(None, [
        f"model.name_or_path={tiny_model}", f"data.output={root}/prepared",
        "data.kind=preference", "data.max_seq_len=96", "data.val_ratio=0.15",
        "tracking.enabled=false",
        f"data.sources.0.path={sample_data_dir / 'pref_concise_train.jsonl'}"]))
    return f"{root}/prepared"


def _run(tiny_model, prepared, root, name, objective, *extra):
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model}", f"train.data={prepared}",
        f"train.output={root}/runs", f"train.run_name={name}", f"storage.root={root}/work",
        "tracking.enabled=false", "peft.dropout=0.0", "peft.r=8",
        f"train.objective={objective}", "train.beta=0.1", "train.micro_batch_size=4",
        "train.lr=1e-2", "train.warmup_ratio=0", "train.scheduler=constant",
        f"train.max_steps={STEPS}", "train.eval_every=2", "train.eval_max_batches=2",
        "train.checkpoint_every=0", "train.cpus_per_worker=1", *extra])
    return driver.train(cfg)["run_dir"]


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "final", "adapter_model.safetensors"))


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_fsdp_preference_run_equals_ddp_and_its_adapter_loads(objective, tiny_model, prepared,
                                                              tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fsdp = _run(tiny_model, prepared, tmp_path, f"fsdp-{objective}", objective,
                "train.strategy=fsdp", "train.num_workers=2")
    ddp = _run(tiny_model, prepared, tmp_path, f"ddp-{objective}", objective,
               "train.num_workers=1", "train.grad_accum=2")
    a, b = read_metrics(fsdp), read_metrics(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for k in ("loss", "rewards/chosen", "rewards/margin", "rewards/accuracy"):
            assert ra[k] == pytest.approx(rb[k], abs=LOSS_TOL), (k, ra, rb)
    assert a[-1]["eval_loss"] == pytest.approx(b[-1]["eval_loss"], abs=LOSS_TOL)
    if objective == "dpo":
        assert a[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # policy = reference at step 1
    assert a[-1]["loss"] < a[0]["loss"]
    wa, wb = _adapter(fsdp), _adapter(ddp)
    assert set(wa) == set(wb) and len(wa) > 0 and not any("_fsdp" in k for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=WEIGHT_TOL, msg=k)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                              os.path.join(fsdp, "final"))
