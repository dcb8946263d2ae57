"""Bad training input fails before Ray or any worker starts, with a message naming it."""

from __future__ import annotations

import os
import shutil

import pytest
from train_support import build_prepared, make_tiny_model

from ift.config import ConfigError, load_config
from ift.train import driver


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    model = make_tiny_model(str(root / "llama"))
    return {
        "root": root,
        "model": model,
        "prepared": build_prepared(str(root / "prepared"), model, n_train=24, n_val=4),
        "packed": build_prepared(str(root / "packed"), model, n_train=24, n_val=4, packed=True),
    }


def _cfg(tiny, *extra, prepared=None, model=None):
    return load_config(None, [
        f"model.name_or_path={model or tiny['model']}",
        f"train.data={prepared or tiny['prepared']}",
        f"train.output={tiny['root'] / 'runs'}", "tracking.enabled=false",
        "train.micro_batch_size=2", *extra,
    ])


def _fails(cfg, pattern):
    """train() raises a ConfigError matching pattern, and Ray was never started."""
    import ray

    with pytest.raises(ConfigError, match=pattern):
        driver.train(cfg)
    assert not ray.is_initialized()


def test_good_input_passes(tiny):
    cfg = _cfg(tiny)
    prepared = driver.prepared_dir(cfg)
    plan = driver.preflight(cfg, driver.read_prepared(prepared), prepared)
    assert plan.num_rows == 24 and plan.steps_per_epoch == 12 and plan.num_val_rows == 4


def test_missing_prepared_dir(tiny):
    _fails(_cfg(tiny, prepared=str(tiny["root"] / "nowhere")), r"nowhere does not exist")


def test_partial_prepared_dir(tiny, tmp_path):
    partial = shutil.copytree(tiny["prepared"], tmp_path / "partial")
    os.unlink(partial / "_COMPLETE")
    _fails(_cfg(tiny, prepared=str(partial)), r"partial \(no _COMPLETE marker\)")
    os.unlink(partial / "manifest.json")
    _fails(_cfg(tiny, prepared=str(partial)), r"has no manifest.json")


def test_tokenizer_mismatch(tiny):
    other = make_tiny_model(str(tiny["root"] / "other"), vocab_size=400)
    _fails(_cfg(tiny, model=other), r"tokenizer mismatch: .*prepared was tokenized with .* "
                                     r"vocab \d+.*re-run `ift data prepare`")


def test_global_batch_larger_than_the_data(tiny):
    _fails(_cfg(tiny, "train.micro_batch_size=8", "train.num_workers=2", "train.grad_accum=2"),
           r"= 32 rows per optimizer step, but the train split has only 24 rows")


def test_sequence_longer_than_the_model_positions(tiny):
    short = make_tiny_model(str(tiny["root"] / "short"), max_positions=32)
    # Same tokenizer (same training texts and vocab), fewer positions.
    _fails(_cfg(tiny, model=short), r"manifest max_seq_len=64 exceeds the model's 32 positions")


@pytest.mark.parametrize("method", ["prefix", "p_tuning", "prompt_tuning"])
def test_packed_data_with_a_virtual_token_method(tiny, method):
    _fails(_cfg(tiny, f"peft.method={method}", prepared=tiny["packed"]),
           rf"peft.method={method} cannot train on packed data")


def test_packed_data_with_a_model_that_takes_no_4d_mask(tiny):
    bloom = make_tiny_model(str(tiny["root"] / "bloom"), arch="bloom")
    packed = build_prepared(str(tiny["root"] / "packed-bloom"), bloom, n_train=24, n_val=4,
                            packed=True)
    _fails(_cfg(tiny, model=bloom, prepared=packed),
           r"BloomForCausalLM\) cannot train on packed data")


def test_packed_data_passes_for_lora(tiny):
    cfg = _cfg(tiny, prepared=tiny["packed"])
    plan = driver.preflight(cfg, driver.read_prepared(tiny["packed"]), tiny["packed"])
    assert plan.packed


def test_unknown_target_module(tiny):
    _fails(_cfg(tiny, "peft.target_modules=[q_proj,qkv_proj]"),
           r"'qkv_proj' matches no linear module of LlamaForCausalLM")


def test_unknown_method():
    with pytest.raises(ConfigError, match=r"peft.method='lorra' is not allowed; did you mean "
                                          r"'lora'\?"):
        load_config(None, ["peft.method=lorra"])


def test_freeze_layers_beyond_the_model(tiny):
    _fails(_cfg(tiny, "peft.method=freeze", "peft.freeze_trainable_layers=5"),
           r"freeze_trainable_layers=5: the model has 2 layers")


def test_adalora_schedule_longer_than_the_run(tiny):
    _fails(_cfg(tiny, "peft.method=adalora", "train.max_steps=4", "peft.adalora_tinit=3",
                "peft.adalora_tfinal=2"), r"no budgeting phase in 4 training steps")


def test_qlora_4bit_on_cpu_with_small_dims(tiny):
    _fails(_cfg(tiny, "peft.method=qlora"), r"multiple of 64")


def test_cli_reports_config_errors_with_exit_code_2(tiny, capsys):
    from ift.cli import main

    rc = main(["train", f"model.name_or_path={tiny['model']}",
               f"train.data={tiny['root'] / 'nowhere'}", "tracking.enabled=false"])
    assert rc == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_resuming_with_another_global_batch_is_refused(tiny):
    """A run dir holding a checkpoint from a different global batch cannot be resumed:
    the data position would not mean the same rows."""
    import torch

    from ift.models import load_model
    from ift.train import checkpoint, methods

    cfg = _cfg(tiny, "train.run_name=resume-shape")
    run_dir = driver.run_dir_of(cfg)
    model = methods.build(load_model(cfg.model, device="cpu"), cfg.peft, 10)
    state = {"step": 3, "method": "lora", "global_batch_size": 2, "data_hash": "x"}
    checkpoint.save(os.path.join(run_dir, "checkpoint_0000003"), model=model, method="lora",
                    state=state, optimizer_state={}, scheduler_state={})
    with pytest.raises(ConfigError, match="used a global batch of 2 rows, this run has 8"):
        driver.train(_cfg(tiny, "train.run_name=resume-shape", "train.grad_accum=4"))
    with pytest.raises(ConfigError, match="peft.method=lora, this run asks for dora"):
        driver.train(_cfg(tiny, "train.run_name=resume-shape", "peft.method=dora"))
    # Same shape: the resume point is found.
    prepared = driver.prepared_dir(cfg)
    plan = driver.preflight(cfg, driver.read_prepared(prepared), prepared)
    plan.data_hash = "x"
    assert driver.resume_point(cfg, plan, run_dir)[0] == 3
    assert torch.load(os.path.join(run_dir, "checkpoint_0000003", "training_state.pt"))["step"] == 3
