"""Every fine-tuning method trains a tiny model on CPU through the loop's step function,
with the loss on the training batches going down; each trains what it should and nothing
else."""

from __future__ import annotations

import pytest
import torch
from train_support import make_tiny_model, toy_records

from ift.config import ConfigError, load_config
from ift.data.tokenize import tokenize_records
from ift.models import load_model, load_tokenizer
from ift.train import methods
from ift.train.collate import collate
from ift.train.loop import StepEnv, evaluate, make_optimizer, make_plan, make_scheduler, train_step
from ift.train.worker import load_dtype

STEPS = 10


@pytest.fixture(scope="module")
def model32(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("llama32")), hidden_size=32)


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    # bitsandbytes' CPU 4-bit kernels need input sizes that are multiples of 64.
    return make_tiny_model(str(tmp_path_factory.mktemp("llama64")), hidden_size=64)


def _cfg(model_dir, method, lr, *extra):
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"peft.method={method}", "peft.dropout=0.0",
        f"train.lr={lr}", "train.scheduler=constant", "train.warmup_ratio=0",
        f"train.max_steps={STEPS}", "train.micro_batch_size=4", *extra,
    ])


def _batches(model_dir):
    tok = load_tokenizer(model_dir)
    rows, dropped = tokenize_records(toy_records(8), tok, template="chatml", max_seq_len=64)
    assert not dropped
    return [collate(rows[:4], tok.pad_token_id), collate(rows[4:], tok.pad_token_id)]


def _train(cfg, model_dir):
    """(model, eval loss before, eval loss after, per-step losses)."""
    batches = _batches(model_dir)
    plan = make_plan(8, 0, cfg.train)
    model = load_model(cfg.model, device="cpu", quantization=methods.quantization(cfg.peft),
                       dtype=load_dtype(cfg.model, cfg.peft))
    torch.manual_seed(0)
    model = methods.build(model, cfg.peft, plan.total_steps, tokenizer=cfg.model.name_or_path)
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train, plan)
    env = StepEnv(method=cfg.peft.method, attn_implementation=model.config._attn_implementation)
    before = evaluate(model, batches, env)["eval_loss"]
    losses = [train_step(model, opt, sched, [batches[i % 2]], env, i + 1)["loss"]
              for i in range(STEPS)]
    after = evaluate(model, batches, env)["eval_loss"]
    return model, before, after, losses


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# Prompt methods steer a frozen random model only through a few virtual tokens, so their
# loss falls less than methods that change weights; evaluation is deterministic, so any
# fall beyond float noise is real.
@pytest.mark.parametrize("method,lr,margin,extra", [
    ("lora", 1e-2, 0.2, []),
    ("dora", 1e-2, 0.2, []),
    ("adalora", 3e-2, 0.05, ["peft.adalora_tinit=2", "peft.adalora_tfinal=2"]),
    ("prefix", 5e-2, 0.02, []),
    ("p_tuning", 1e-2, 0.02, []),
    ("prompt_tuning", 0.3, 0.02, []),
    ("full", 1e-3, 0.3, []),
    ("freeze", 1e-3, 0.1, ["peft.freeze_trainable_layers=1"]),
])
def test_method_trains_and_loss_goes_down(model32, method, lr, margin, extra):
    cfg = _cfg(model32, method, lr, *extra)
    model, before, after, losses = _train(cfg, model32)
    assert after < before - margin, (before, after, losses)
    assert min(losses[-2:]) < losses[0]
    names = _trainable(model)
    if method in ("lora", "adalora"):
        assert names and all("lora_" in n for n in names)
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in names)
    if method == "adalora":
        assert any("lora_E" in n for n in names)
        # The budget was allocated: the rank pattern was recorded by update_and_allocate.
        assert model.peft_config["default"].rank_pattern
    if method in ("prefix", "p_tuning", "prompt_tuning"):
        assert names and all("prompt_encoder" in n for n in names)
    if method == "full":
        assert names == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_quantizes_and_trains_on_cpu(model64, bits):
    cfg = _cfg(model64, "qlora", 1e-2, f"peft.bits={bits}")
    model, before, after, losses = _train(cfg, model64)
    base = model.base_model.model
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    if bits == 4:
        assert q_proj.weight.quant_state.quant_type == "nf4"
        # Double quantization was asked for (the CPU kernels unpack the nested absmax
        # statistics at the first forward, so the quant state itself no longer shows it).
        assert q_proj.weight.compress_statistics
        assert base.config.quantization_config.bnb_4bit_use_double_quant
    assert all("lora_" in n for n in _trainable(model))
    assert after < before - 0.2, (before, after, losses)


def test_qlora_4bit_on_cpu_needs_block_multiple_sizes(model32):
    from transformers import AutoConfig

    cfg = _cfg(model32, "qlora", 1e-2)
    with pytest.raises(ConfigError, match="multiple of 64"):
        methods.check_quantizable(AutoConfig.from_pretrained(model32), cfg.peft, use_gpu=False)
    methods.check_quantizable(AutoConfig.from_pretrained(model32), cfg.peft, use_gpu=True)


def test_freeze_trains_only_the_last_layers_and_final_norm(model32):
    cfg = _cfg(model32, "freeze", 1e-3, "peft.freeze_trainable_layers=1")
    model = load_model(cfg.model, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, *_ = _train(cfg, model32)
    names = _trainable(model)
    assert names == {n for n in before if n.startswith(("model.layers.1.", "model.norm."))}
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in names), n


def test_freeze_with_embeddings_trains_embeddings_and_head(model32):
    cfg = _cfg(model32, "freeze", 1e-3, "peft.freeze_trainable_layers=1",
               "peft.freeze_train_embeddings=true")
    model = methods.build(load_model(cfg.model, device="cpu"), cfg.peft, STEPS)
    names = _trainable(model)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert not any(n.startswith("model.layers.0.") for n in names)


def test_freeze_rejects_more_layers_than_the_model_has(model32):
    cfg = _cfg(model32, "freeze", 1e-3, "peft.freeze_trainable_layers=3")
    with pytest.raises(ConfigError, match="freeze_trainable_layers=3.*2 layers"):
        methods.build(load_model(cfg.model, device="cpu"), cfg.peft, STEPS)


def test_prompt_tuning_starts_from_the_init_text(model32):
    text = "Repeat the words"
    cfg = _cfg(model32, "prompt_tuning", 0.3, f"peft.prompt_init_text={text}",
               "peft.num_virtual_tokens=4")
    base = load_model(cfg.model, device="cpu")
    table = base.get_input_embeddings().weight.detach().clone()
    model = methods.build(base, cfg.peft, STEPS, tokenizer=model32)
    ids = load_tokenizer(model32)(text, add_special_tokens=False)["input_ids"]
    ids = (ids * 4)[:4]
    prompt = model.prompt_encoder["default"].embedding.weight.detach()
    assert torch.allclose(prompt, table[ids])


def test_adalora_schedule_without_budget_phase_is_rejected(model32):
    cfg = _cfg(model32, "adalora", 1e-2, "peft.adalora_tinit=6", "peft.adalora_tfinal=4")
    with pytest.raises(ConfigError, match="adalora_tinit=6.*no budgeting phase"):
        methods.check_adalora_schedule(methods.AdaLoraOptions.of(cfg.peft), STEPS)


def test_gradient_checkpointing_gives_the_same_step(model32):
    batches = _batches(model32)
    results = []
    for gc in (False, True):
        cfg = _cfg(model32, "lora", 1e-2, f"train.gradient_checkpointing={str(gc).lower()}")
        plan = make_plan(8, 0, cfg.train)
        torch.manual_seed(0)
        model = methods.build(load_model(cfg.model, device="cpu"), cfg.peft, plan.total_steps,
                              gradient_checkpointing=cfg.train.gradient_checkpointing)
        assert methods.unwrap(model).is_activation_checkpointing == gc
        opt = make_optimizer(model, cfg.train)
        env = StepEnv(method="lora", attn_implementation=model.config._attn_implementation)
        results.append(train_step(model, opt, make_scheduler(opt, cfg.train, plan),
                                  batches, env, 1))
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-6)
    assert results[0]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-4)


def test_methods_dict_covers_every_configurable_method():
    from ift.config import PEFT_METHODS

    assert set(methods.METHODS) == set(PEFT_METHODS)


def test_each_builder_gets_its_own_knobs_from_the_peft_section():
    """The flat `peft` section is cut into one options object per method; every knob lands
    in the right field of the methods that read it (qlora's `bits` is the loader's)."""
    from ift.config import PeftConfig

    p = PeftConfig(method="adalora", r=12, alpha=24, dropout=0.1, target_modules=["q_proj"],
                   adalora_target_r=3, adalora_tinit=5, adalora_tfinal=6, adalora_delta_t=7,
                   num_virtual_tokens=9, encoder_hidden_size=33, prompt_init_text="hi",
                   freeze_trainable_layers=1, freeze_train_embeddings=True)
    lora = methods.LoraOptions(r=12, alpha=24, dropout=0.1, target_modules=["q_proj"])
    virtual = methods.VirtualTokenOptions(num_virtual_tokens=9, encoder_hidden_size=33,
                                          init_text="hi")
    expected = {
        "lora": lora, "qlora": lora, "dora": lora,
        "adalora": methods.AdaLoraOptions(r=12, target_r=3, tinit=5, tfinal=6, delta_t=7,
                                          alpha=24, dropout=0.1, target_modules=["q_proj"]),
        "prefix": virtual, "p_tuning": virtual, "prompt_tuning": virtual,
        "full": methods.NoOptions(),
        "freeze": methods.FreezeOptions(trainable_layers=1, train_embeddings=True),
    }
    assert {name: options(p) for name, (options, _) in methods.METHODS.items()} == expected


@pytest.mark.parametrize("method,dtype,expected", [
    ("full", "auto", "fp32"), ("freeze", "auto", "fp32"), ("full", "bf16", "bf16"),
    ("lora", "auto", "auto"), ("lora", "bf16", "bf16"),
])
def test_load_dtype_keeps_fp32_master_weights_for_full_and_freeze(method, dtype, expected):
    cfg = load_config(None, [f"peft.method={method}", f"model.dtype={dtype}"])
    assert load_dtype(cfg.model, cfg.peft) == expected


@pytest.mark.parametrize("reference", [False, True])
def test_from_adapter_continues_the_saved_adapter(model32, tmp_path, reference):
    from ift.train.preference import REFERENCE_ADAPTER

    cfg = _cfg(model32, "lora", 1e-2)
    torch.manual_seed(3)
    saved = methods.build(load_model(cfg.model, device="cpu"), cfg.peft, STEPS)
    with torch.no_grad():  # LoRA's B starts at zero: give the saved adapter a value
        for n, p in saved.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    saved.save_pretrained(str(tmp_path / "adapter"))
    want = {n: p.detach().clone() for n, p in saved.named_parameters() if "lora_" in n}

    model = methods.from_adapter(load_model(cfg.model, device="cpu"), str(tmp_path / "adapter"),
                                 reference=reference)
    got = dict(model.named_parameters())
    for n, value in want.items():
        assert torch.equal(got[n], value) and got[n].requires_grad, n
    assert (REFERENCE_ADAPTER in model.peft_config) == reference
    frozen = [p for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n]
    assert len(frozen) == (len(want) if reference else 0)
    assert not any(p.requires_grad for p in frozen)
