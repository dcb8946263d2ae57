"""FSDP on CPU with gloo: two processes run ift's own FSDP wrap, state-dict and optimizer
code (ift.train.fsdp, ift.train.loop, ift.train.checkpoint), the code a GPU worker runs.

- a LoRA model whose base is bf16 and whose adapters are fp32 wraps, trains and saves;
- the gathered adapter has the unwrapped model's names and values, holds no frozen base
  weight, and PEFT writes it as a non-empty file;
- weight decay reaches the LoRA matrices (parameter groups chosen by name before wrap);
- rank 1 builds the model on the meta device (no weight memory) and after wrapping holds
  what a normal load holds: the base weights, rank 0's adapter init, tied embeddings.
"""

from __future__ import annotations

import os

import pytest
import torch
from fsdp_support import run_ranks
from train_support import make_tiny_model

from ift.config import load_config
from ift.models import load_model
from ift.train import checkpoint, fsdp, methods
from ift.train.loop import decay_names, make_optimizer
from ift.train.worker import wrap


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("llama")))


def _cfg(model_dir, *extra):
    return load_config(None, [f"model.name_or_path={model_dir}", "peft.method=lora",
                              "peft.dropout=0.0", "train.strategy=fsdp", "train.max_steps=4",
                              *extra])


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    model = load_model(cfg.model, device="cpu")
    return methods.build(model, cfg.peft, 4)


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 500, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _lora_bf16_rank(rank, world, model_dir, out_dir):
    cfg = _cfg(model_dir, "model.dtype=bf16")
    model = _build(cfg)
    dtypes = {p.dtype for p in model.parameters()}
    decay = decay_names(model)
    wrapped = wrap(model, cfg.train, torch.device("cpu"), adapter=True)
    optimizer = make_optimizer(wrapped, cfg.train, decay)
    loss = wrapped(**_batch()).loss
    loss.backward()
    optimizer.step()
    sd = checkpoint.full_state_dict(wrapped, "fsdp", "lora")
    if rank == 0:
        checkpoint.save_model(wrapped, out_dir, "lora", sd)
    return {"dtypes": sorted(str(d) for d in dtypes), "loss": float(loss),
            "keys": sorted(sd), "state": {k: v.float() for k, v in sd.items()}}


def test_lora_on_a_bf16_base_wraps_trains_and_saves(model_dir, tmp_path):
    """Finding 1 and 2: mixed dtypes in one model, adapters saved non-empty."""
    from safetensors.torch import load_file

    results = run_ranks(_lora_bf16_rank, model_dir, str(tmp_path), out_dir=str(tmp_path))
    r0 = results[0]
    assert r0["dtypes"] == ["torch.bfloat16", "torch.float32"]
    assert r0["loss"] > 0 and r0["loss"] == pytest.approx(results[1]["loss"])
    # Only the adapter (trainable) tensors were gathered, under the unwrapped names.
    reference = _build(_cfg(model_dir, "model.dtype=bf16"))
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert set(r0["keys"]) == trainable
    assert not any("_fsdp_wrapped_module" in k for k in r0["keys"])
    saved = load_file(os.path.join(tmp_path, checkpoint.ADAPTER_WEIGHTS))
    assert len(saved) == len(trainable) > 0


def _state_rank(rank, world, model_dir, weight_decay):
    cfg = _cfg(model_dir, f"train.weight_decay={weight_decay}", "train.lr=0.1")
    model = _build(cfg)
    with torch.no_grad():  # non-zero B matrices, so decay shows on every tensor
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    decay = decay_names(model)
    wrapped = wrap(model, cfg.train, torch.device("cpu"), adapter=True)
    optimizer = make_optimizer(wrapped, cfg.train, decay)
    before = checkpoint.full_state_dict(wrapped, "fsdp", "lora")
    # A zero gradient: AdamW's update is 0, only decay moves the weights.
    (wrapped(**_batch()).loss * 0).backward()
    optimizer.step()
    after = checkpoint.full_state_dict(wrapped, "fsdp", "lora")
    groups = [len(g["params"]) for g in optimizer.param_groups]
    return {"before": before, "after": after, "groups": groups,
            "decays": [g["weight_decay"] for g in optimizer.param_groups]}


def test_gathered_adapter_equals_the_unsharded_weights(model_dir, tmp_path):
    """Finding 2: the gathered state is the unwrapped model's adapter, value for value."""
    results = run_ranks(_state_rank, model_dir, 0.0, out_dir=str(tmp_path))
    reference = _build(_cfg(model_dir))
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    expected = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    got = results[0]["before"]
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value.detach(), rtol=0, atol=0, msg=name)


def test_weight_decay_is_applied_under_fsdp(model_dir, tmp_path):
    """Finding 3: groups by name before wrapping; every LoRA matrix decays by lr × wd."""
    results = run_ranks(_state_rank, model_dir, 0.5, out_dir=str(tmp_path))
    r0 = results[0]
    assert r0["decays"][0] == 0.5 and r0["groups"][0] > 0
    for name, before in r0["before"].items():
        torch.testing.assert_close(r0["after"][name], before * (1 - 0.1 * 0.5),
                                   rtol=1e-6, atol=1e-7, msg=name)


def test_fsdp_loads_on_cpu_and_refuses_what_it_cannot_shard(model_dir):
    """Finding 5 (rank 0 loads on CPU, the other ranks on meta; FSDP moves shards to the
    GPU) and the preflight refusals of finding 4."""
    cfg = _cfg(model_dir)
    gpu = torch.device("cuda", 0)
    assert fsdp.load_device(cfg.train, gpu, rank=0, world=2) == "cpu"
    assert fsdp.load_device(cfg.train, gpu, rank=1, world=2) == "meta"
    assert fsdp.load_device(cfg.train, gpu, rank=0, world=1) == "cpu"
    ddp = load_config(None, [f"model.name_or_path={model_dir}"])
    assert fsdp.load_device(ddp.train, gpu, rank=1, world=2) == "cuda:0"
    from ift.config import ConfigError

    with pytest.raises(ConfigError, match="peft.method=qlora with train.strategy=fsdp"):
        qlora = _cfg(model_dir, "peft.method=qlora")
        fsdp.check(qlora.peft, qlora.train)
    with pytest.raises(ConfigError, match="adamw_8bit with train.strategy=fsdp"):
        eight_bit = _cfg(model_dir, "train.optimizer=adamw_8bit", "train.use_gpu=true")
        fsdp.check(eight_bit.peft, eight_bit.train)
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    assert isinstance(fsdp.grad_scaler("fsdp", torch.float16), ShardedGradScaler)
    assert fsdp.grad_scaler("fsdp", torch.bfloat16) is None


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("qwen2")), arch="qwen2")


def _full_params(wrapped) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        return {fsdp.clean_name(n): p.detach().clone()
                for n, p in wrapped.named_parameters()}


def _meta_load_rank(rank, world, model_dir):
    out = {}
    for method in METHODS_ON_META:
        cfg = _cfg(model_dir, f"peft.method={method}")
        torch.manual_seed(rank)  # differing seeds: equal adapters must come from rank 0
        model = load_model(cfg.model, device=fsdp.load_device(cfg.train, torch.device("cpu"),
                                                              rank, world))
        model = methods.build(model, cfg.peft, 4)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                           if not p.is_meta)
        base = methods.unwrap(model)
        tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
        wrapped = fsdp.wrap(model, cfg.train, torch.device("cpu"), adapter=method != "full",
                            amp=None)
        tied_after = (base.get_output_embeddings().weight is
                      base.get_input_embeddings().weight)
        with torch.no_grad():
            loss = float(wrapped(**_batch()).loss)
        out[method] = {"meta": fsdp.on_meta(model), "weight_bytes": weight_bytes,
                       "tied": tied, "tied_after": tied_after,
                       "params": _full_params(wrapped), "loss": loss,
                       "buffers": {n: b.clone() for n, b in wrapped.named_buffers()}}
    return out


METHODS_ON_META = ("lora", "full")


def test_meta_ranks_receive_rank0_weights(tied_model_dir, tmp_path):
    """Finding 5: rank 1 holds no weight memory before wrapping (LoRA: at most its
    adapter matrices); after wrapping both ranks hold a normal load of the base with rank
    0's adapter init (seed 0), embeddings still tied, and compute the same loss. LoRA and
    full fine-tuning."""
    by_rank = run_ranks(_meta_load_rank, tied_model_dir, out_dir=str(tmp_path))
    for method in METHODS_ON_META:
        results = [r[method] for r in by_rank]
        cfg = _cfg(tied_model_dir, f"peft.method={method}")
        torch.manual_seed(0)
        reference = methods.build(load_model(cfg.model, device="cpu"), cfg.peft, 4)
        expected = {n: p.detach() for n, p in reference.named_parameters()}
        adapter_bytes = sum(p.numel() * p.element_size() for p in reference.parameters()
                            if p.requires_grad)
        base_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
        assert results[1]["weight_bytes"] <= (adapter_bytes if method == "lora" else 0)
        assert results[1]["weight_bytes"] < base_bytes / 4
        assert results[0]["tied"] and results[1]["tied"] and results[1]["tied_after"]
        for r in results:
            assert not r["meta"]
            assert set(r["params"]) == set(expected)
            for name, value in expected.items():
                torch.testing.assert_close(r["params"][name], value, rtol=0, atol=0,
                                           msg=f"{method} {name}")
        torch.testing.assert_close(results[1]["buffers"], results[0]["buffers"], rtol=0,
                                   atol=0)
        with torch.no_grad():
            ref_loss = float(reference(**_batch()).loss)
        assert results[0]["loss"] == pytest.approx(ref_loss, abs=1e-5), method
        assert results[1]["loss"] == pytest.approx(ref_loss, abs=1e-5), method
