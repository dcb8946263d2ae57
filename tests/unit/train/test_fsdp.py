"""FSDP helpers that need no process group: the refusals, wrapper-free names, the wrap
policy's units, meta-device materialization with tied weights, and the one-worker path.
(Sharded training, gathering and loading run under gloo in integration/test_fsdp.py.)"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ift.config import ConfigError, load_config
from ift.models import tiny_config
from ift.train import fsdp


def _model(arch: str = "llama", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(tiny_config(arch, 64, hidden_size=16, layers=2,
                                                            heads=2, max_positions=32))


@pytest.mark.parametrize("method,message", [
    ("prompt_tuning", "peft.method=prompt_tuning with train.strategy=fsdp: PEFT saves a "
                      "prompt table"),
    ("prefix", "peft.method=prefix with train.strategy=fsdp"),
    ("adalora", "peft.method=adalora with train.strategy=fsdp: AdaLoRA's rank allocator"),
])
def test_check_refuses_methods_fsdp_cannot_shard(method, message):
    cfg = load_config(None, ["train.strategy=fsdp", f"peft.method={method}"])
    with pytest.raises(ConfigError) as e:
        fsdp.check(cfg.peft, cfg.train)
    assert str(e.value).startswith(message)
    for ok in (["train.strategy=ddp", f"peft.method={method}"],
               ["train.strategy=fsdp", "peft.method=lora"]):
        fine = load_config(None, ok)
        fsdp.check(fine.peft, fine.train)


def test_load_device_reads_a_starting_adapter_on_every_rank(tmp_path):
    train = load_config(None, ["train.strategy=fsdp"]).train
    assert fsdp.load_device(train, torch.device("cpu"), rank=1, world=2,
                            adapter=str(tmp_path)) == "cpu"
    assert fsdp.load_device(train, torch.device("cpu"), rank=1, world=2) == "meta"


def test_grad_scaler_only_for_fp16():
    with warnings.catch_warnings():  # without CUDA the scaler warns that it is disabled
        warnings.simplefilter("ignore", UserWarning)
        assert isinstance(fsdp.grad_scaler("ddp", torch.float16), torch.amp.GradScaler)
    assert fsdp.grad_scaler("ddp", None) is None
    assert fsdp.grad_scaler("ddp", torch.bfloat16) is None


def test_clean_name_drops_every_wrapper_segment():
    name = ("_fsdp_wrapped_module.model.layers.0._checkpoint_wrapped_module."
            "_fsdp_wrapped_module.self_attn.q_proj._orig_mod.weight")
    assert fsdp.clean_name(name) == "model.layers.0.self_attn.q_proj.weight"
    assert fsdp.clean_name("lm_head.weight") == "lm_head.weight"
    # Only whole segments go: a name that merely contains the words stays.
    assert fsdp.clean_name("my_fsdp_wrapped_module_count") == "my_fsdp_wrapped_module_count"


def test_clean_module_names_reports_unwrapped_names_inside_the_block_only():
    root = nn.Module()
    root._fsdp_wrapped_module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    raw = [n for n, _ in root.named_modules()]
    assert raw == ["", "_fsdp_wrapped_module", "_fsdp_wrapped_module.0", "_fsdp_wrapped_module.1"]
    with fsdp.clean_module_names(root) as m:
        assert m is root
        assert [n for n, _ in root.named_modules()] == ["", "", "0", "1"]
        assert [n for n, _ in root.named_modules(prefix="x")] == ["x", "x", "x.0", "x.1"]
    assert [n for n, _ in root.named_modules()] == raw
    assert "named_modules" not in root.__dict__
    with pytest.raises(RuntimeError), fsdp.clean_module_names(root):
        raise RuntimeError("restored on errors too")
    assert "named_modules" not in root.__dict__


def test_decoder_layers_are_the_units_and_adapter_leaves_their_own():
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = _model()
    assert fsdp.decoder_layer_classes(model) == {LlamaDecoderLayer}
    assert fsdp.decoder_layer_classes(nn.Linear(2, 2)) == set()
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert fsdp.decoder_layer_classes(peft) == {LlamaDecoderLayer}
    layer = peft.base_model.model.model.layers[0]
    q = layer.self_attn.q_proj
    lora_a, base_q = q.lora_A["default"], q.base_layer
    for adapter in (True, False):
        policy = fsdp.wrap_policy(peft, adapter=adapter)

        def unit(m, policy=policy):
            return policy(module=m, recurse=False, nonwrapped_numel=0)

        assert unit(layer)
        assert unit(lora_a) is adapter  # trainable leaf: its own unit for adapters only
        assert not unit(base_q)  # frozen leaf
        assert not unit(q)  # the LoRA wrapper has children: not a leaf
        assert policy(module=peft, recurse=True, nonwrapped_numel=0)  # always descend


def test_materializer_gives_meta_tensors_storage_and_keeps_tied_weights_one_tensor():
    model = _model("qwen2", device="meta")
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb  # tied
    assert fsdp.on_meta(model)
    model.lm_head.weight.requires_grad_(False)
    materialize = fsdp.materializer(model, torch.device("cpu"))
    for module in model.modules():
        materialize(module)
    assert not fsdp.on_meta(model)
    new = model.get_input_embeddings().weight
    assert new.device.type == "cpu" and new.shape == emb.shape
    assert model.get_output_embeddings().weight is new  # still one tensor
    assert new.requires_grad is False  # as the meta parameter was
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))
    # Materializing again leaves real tensors alone.
    before = {n: p for n, p in model.named_parameters()}
    for module in model.modules():
        materialize(module)
    assert all(p is before[n] for n, p in model.named_parameters())


def test_wrap_without_a_process_group_is_the_plain_model():
    model = _model()
    assert not torch.distributed.is_initialized()
    out = fsdp.wrap(model, load_config(None, ["train.strategy=fsdp"]).train,
                    torch.device("cpu"), adapter=False, amp=None)
    assert out is model
