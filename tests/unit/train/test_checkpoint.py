"""Checkpoints: PEFT-format adapters and HF models, full training state, incompleteness
detected, and a final directory that plain peft/transformers load."""

from __future__ import annotations

import os

import pytest
import torch
from train_support import make_tiny_model

from ift.config import load_config
from ift.models import load_model, load_tokenizer
from ift.train import checkpoint, methods
from ift.train.loop import make_optimizer, make_plan, make_scheduler


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("llama")))


def _build(model_dir, method, *extra, seed=0):
    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"peft.method={method}",
                             "peft.dropout=0.0", "train.max_steps=8", *extra])
    torch.manual_seed(seed)
    model = methods.build(load_model(cfg.model, device="cpu"), cfg.peft, 8)
    return cfg, model


def _perturb(model):
    """Change every trainable tensor, as training would."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _save(tmp, cfg, model, step=4):
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train, make_plan(64, 0, cfg.train))
    state = {"step": step, "method": cfg.peft.method, "rng": [checkpoint.rng_state()]}
    if cfg.peft.method == "adalora":
        state["adalora"] = checkpoint.adalora_state(model)
    checkpoint.save(tmp, model=model, method=cfg.peft.method, state=state,
                    optimizer_state=opt.state_dict(), scheduler_state=sched.state_dict())
    return opt


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "dora", "prompt_tuning", "adalora"])
def test_adapter_checkpoint_round_trip(tmp_path, model_dir, method):
    cfg, model = _build(model_dir, method)
    _perturb(model)
    _save(str(tmp_path), cfg, model)
    names = set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
            "scheduler.pt", "training_state.pt", "checkpoint.json"} <= names
    assert "model.safetensors" not in names  # adapter only
    state = checkpoint.load_state(str(tmp_path))
    assert state["step"] == 4

    _, fresh = _build(model_dir, method, seed=1)
    checkpoint.load_model_weights(str(tmp_path), fresh, method, state)
    want = _trainable(model)
    got = _trainable(fresh)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_save_hf_safetensors(tmp_path, model_dir, method):
    from transformers import AutoModelForCausalLM

    cfg, model = _build(model_dir, method, "peft.freeze_trainable_layers=1")
    _perturb(model)
    _save(str(tmp_path), cfg, model)
    assert os.path.exists(tmp_path / "model.safetensors")
    assert os.path.exists(tmp_path / "config.json")
    # Plain transformers loads it, and so does the resume path.
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    _, fresh = _build(model_dir, method, "peft.freeze_trainable_layers=1")
    checkpoint.load_model_weights(str(tmp_path), fresh, method, None)
    sd = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
        assert torch.equal(fresh.state_dict()[k], sd[k]), k


def test_optimizer_and_rng_state_round_trip(tmp_path, model_dir):
    cfg, model = _build(model_dir, "lora")
    opt = make_optimizer(model, cfg.train)
    loss = model(input_ids=torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss
    loss.backward()
    opt.step()
    sched = make_scheduler(opt, cfg.train, make_plan(64, 0, cfg.train))
    sched.step()
    torch.manual_seed(99)
    state = {"step": 1, "method": "lora", "rng": [checkpoint.rng_state()]}
    expected_draw = torch.rand(3)
    checkpoint.save(str(tmp_path), model=model, method="lora", state=state,
                    optimizer_state=opt.state_dict(), scheduler_state=sched.state_dict())
    opt_state, sched_state = checkpoint.load_optimizer_states(str(tmp_path))
    _, fresh = _build(model_dir, "lora")
    opt2 = make_optimizer(fresh, cfg.train)
    checkpoint.restore_optimizer(fresh, opt2, opt_state, "ddp")
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"])
    sched2 = make_scheduler(opt2, cfg.train, make_plan(64, 0, cfg.train))
    sched2.load_state_dict(sched_state)
    assert sched2.last_epoch == 1
    checkpoint.set_rng_state(checkpoint.load_state(str(tmp_path))["rng"][0])
    assert torch.equal(torch.rand(3), expected_draw)


def test_half_written_checkpoints_are_refused(tmp_path, model_dir):
    cfg, model = _build(model_dir, "lora")
    _save(str(tmp_path), cfg, model)
    checkpoint.verify(str(tmp_path))
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="adapter_model.safetensors has 100 "
                                                         "bytes.*incomplete"):
        checkpoint.load_state(str(tmp_path))
    os.unlink(tmp_path / "checkpoint.json")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint.json"):
        checkpoint.load_state(str(tmp_path))


def test_final_adapter_loads_with_plain_peft(tmp_path, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, model = _build(model_dir, "lora")
    _perturb(model)
    run_dir = str(tmp_path / "run")
    final = checkpoint.save_final(run_dir, model=model, method="lora",
                                  tokenizer=load_tokenizer(model_dir))
    assert os.path.exists(os.path.join(final, "_COMPLETE"))
    assert os.path.exists(os.path.join(final, "tokenizer.json"))
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = PeftModel.from_pretrained(base, final).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                              atol=1e-6)
    # Publishing again replaces the directory whole.
    (tmp_path / "run" / "final" / "stale.txt").write_text("old")
    checkpoint.save_final(run_dir, model=model, method="lora")
    assert not os.path.exists(os.path.join(final, "stale.txt"))
    assert not os.path.exists(os.path.join(final, "tokenizer.json"))
    assert [n for n in os.listdir(tmp_path / "run") if n.startswith(".")] == []


def test_find_latest_skips_incomplete_checkpoints(tmp_path, model_dir):
    cfg, model = _build(model_dir, "lora")
    run = tmp_path / "run"
    for step in (3, 6, 9):
        _save(str(run / f"checkpoint_{step:07d}"), cfg, model, step=step)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert checkpoint.find_latest(str(run)) == (9, str(run / "checkpoint_0000009"))
    # An upload cut short: a file shorter than listed, or missing.
    w = run / "checkpoint_0000009" / "optimizer.pt"
    w.write_bytes(w.read_bytes()[:-1])
    assert checkpoint.find_latest(str(run)) == (6, str(run / "checkpoint_0000006"))
    os.unlink(run / "checkpoint_0000006" / "training_state.pt")
    assert checkpoint.find_latest(str(run)) == (3, str(run / "checkpoint_0000003"))
    os.unlink(run / "checkpoint_0000003" / "checkpoint.json")
    assert checkpoint.find_latest(str(run)) is None
    assert checkpoint.find_latest(str(tmp_path / "nothing-here")) is None


def test_find_latest_and_load_from_s3(tmp_path, model_dir, s3_bucket):
    from ift import storage

    cfg, model = _build(model_dir, "lora")
    _perturb(model)
    for step in (3, 6):
        _save(str(tmp_path / f"checkpoint_{step:07d}"), cfg, model, step=step)
        storage.upload_dir(str(tmp_path / f"checkpoint_{step:07d}"),
                           f"{s3_bucket}/run/checkpoint_{step:07d}")
    # An upload that stopped half way: its optimizer state is missing.
    storage.upload_dir(str(tmp_path / "checkpoint_0000006"), f"{s3_bucket}/run/checkpoint_0000009")
    bucket, key = storage.split_s3(f"{s3_bucket}/run/checkpoint_0000009/optimizer.pt")
    storage.s3_client().delete_object(Bucket=bucket, Key=key)
    step, path = checkpoint.find_latest(f"{s3_bucket}/run")
    assert (step, path) == (6, f"{s3_bucket}/run/checkpoint_0000006")
    _, fresh = _build(model_dir, "lora", seed=1)
    with checkpoint.local_dir(path) as d:
        assert os.path.isdir(d)
        state = checkpoint.load_state(d)
        checkpoint.load_model_weights(d, fresh, "lora", state)
    assert state["step"] == 6
    for k, v in _trainable(model).items():
        assert torch.equal(v, _trainable(fresh)[k])


def test_half_written_checkpoints_on_s3_are_never_taken(tmp_path, model_dir, s3_bucket,
                                                       monkeypatch):
    """Uploads cut short on s3: files without checkpoint.json, a file shorter than its
    index says, an index cut short. Each is skipped; a store that stops answering is an
    error, not "no checkpoint" (which would start the run over)."""
    import botocore.exceptions

    from ift import storage

    cfg, model = _build(model_dir, "lora")
    run = f"{s3_bucket}/run"
    for step in (3, 6, 9, 12):
        local = str(tmp_path / f"checkpoint_{step:07d}")
        _save(local, cfg, model, step=step)
        storage.upload_dir(local, f"{run}/checkpoint_{step:07d}")
    bucket, prefix = storage.split_s3(run)
    client = storage.s3_client()
    assert checkpoint.find_latest(run) == (12, f"{run}/checkpoint_0000012")

    # 12: every file but the index (the index goes last; the upload stopped before it).
    client.delete_object(Bucket=bucket, Key=f"{prefix}/checkpoint_0000012/checkpoint.json")
    # 9: the weights shorter than the index lists.
    key = f"{prefix}/checkpoint_0000009/adapter_model.safetensors"
    whole = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=whole[: len(whole) // 2])
    # 6: the index itself cut short.
    key = f"{prefix}/checkpoint_0000006/checkpoint.json"
    index = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=index[: len(index) // 2])
    assert checkpoint.find_latest(run) == (3, f"{run}/checkpoint_0000003")
    with checkpoint.local_dir(f"{run}/checkpoint_0000009") as d, \
            pytest.raises(checkpoint.CheckpointError, match="adapter_model.safetensors has"):
        checkpoint.load_state(d)

    def unreachable(path):
        raise botocore.exceptions.EndpointConnectionError(endpoint_url=storage.endpoint_url())

    monkeypatch.setattr(storage, "read_text", unreachable)
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        checkpoint.find_latest(run)


def test_adapter_checkpoint_missing_a_tensor_fails_at_load(tmp_path, model_dir):
    """A resume that silently left some adapter tensors at init (while restoring their
    Adam state) is refused, naming the file and the tensor."""
    from safetensors.torch import load_file, save_file

    cfg, model = _build(model_dir, "lora")
    _perturb(model)
    _save(str(tmp_path), cfg, model)
    path = os.path.join(tmp_path, checkpoint.ADAPTER_WEIGHTS)
    tensors = load_file(path)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, path)
    _, fresh = _build(model_dir, "lora", seed=1)
    with pytest.raises(checkpoint.CheckpointError, match="lacks adapter tensors") as e:
        checkpoint.load_model_weights(str(tmp_path), fresh, "lora")
    assert checkpoint.ADAPTER_WEIGHTS in str(e.value)


def test_adapter_saved_without_tensors_is_an_error(tmp_path, model_dir):
    """A state dict whose keys PEFT does not recognise (e.g. still carrying a wrapper's
    prefixes) would write an adapter file with 0 tensors: saving refuses."""
    cfg, model = _build(model_dir, "lora")
    prefixed = {f"_fsdp_wrapped_module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match="0 tensors"):
        checkpoint.save_model(model, str(tmp_path), "lora", prefixed)
