"""Stacked LoRA weights: which adapters qualify, how ranks and untouched layers are laid
out in the stacks, and that the patched layers are PEFT's own outside a stacked forward.
(Stacked = PEFT mixed batches for two adapters on every layer: test_engine.py.)"""

from __future__ import annotations

import pytest
import torch

from ift.models import tiny_config
from ift.serve.multilora import StackedLoRA, supported


def _base():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", 64, hidden_size=16, layers=1,
                                                        heads=2, max_positions=32)).eval()


def _randomize_b(peft, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # the base has no bias
@pytest.mark.parametrize("extra,ok", [({}, True), ({"use_dora": True}, False),
                                      ({"lora_bias": True}, False)])
def test_only_plain_linear_lora_qualifies(extra, ok):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(_base(), LoraConfig(r=2, target_modules=["q_proj"], **extra))
    assert supported(peft) is ok


@pytest.fixture
def two_adapters():
    """x: rank 2 on q_proj only; y: rank 4 on q_proj and v_proj (alpha differs too)."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(_base(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]),
                          adapter_name="x")
    peft.add_adapter("y", LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    _randomize_b(peft, 1)
    return peft.eval()


def test_stacks_pad_ranks_and_leave_zeros_where_an_adapter_does_not_reach(two_adapters):
    peft = two_adapters
    stacked = StackedLoRA(peft)
    assert stacked.rebuild(["x", "y"]) == {"x": 1, "y": 2}
    attn = peft.base_model.model.model.layers[0].self_attn
    q, v = attn.q_proj, attn.v_proj
    assert q._ift_A.shape == (3, 16, 4) and q._ift_B.shape == (3, 4, 16)  # r_max = 4
    assert torch.count_nonzero(q._ift_A[0]) == 0 and torch.count_nonzero(q._ift_B[0]) == 0
    # x: rank 2 in the first two columns, zeros after; B carries alpha / r = 2.
    torch.testing.assert_close(q._ift_A[1, :, :2], q.lora_A["x"].weight.t())
    assert torch.count_nonzero(q._ift_A[1, :, 2:]) == 0
    torch.testing.assert_close(q._ift_B[1, :2], (q.lora_B["x"].weight * 2.0).t())
    torch.testing.assert_close(q._ift_B[2], (q.lora_B["y"].weight * 0.5).t())
    # v_proj has only y: x's slot is all zeros there.
    assert v._ift_A.shape == (3, 16, 4)
    assert torch.count_nonzero(v._ift_A[1]) == 0 and torch.count_nonzero(v._ift_B[1]) == 0
    assert torch.count_nonzero(v._ift_B[2]) > 0


def test_rows_match_peft_per_row_and_reset_after_errors(two_adapters):
    peft = two_adapters
    stacked = StackedLoRA(peft)
    slots = stacked.rebuild(["x", "y"])
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft(input_ids=ids, adapter_names=["y", "__base__", "x"]).logits
        with stacked.rows(torch.tensor([slots["y"], 0, slots["x"]])):
            got = peft(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError), stacked.rows(torch.tensor([1, 2, 0])):
            raise RuntimeError("the forward failed")
        assert stacked.state.idx is None
        # A batch whose size differs from the slots' runs PEFT's own layer (no gather).
        with stacked.rows(torch.tensor([slots["x"]])):
            other = peft(input_ids=ids, adapter_names=["x", "x", "x"]).logits
        torch.testing.assert_close(other, peft(input_ids=ids, adapter_names=["x"] * 3).logits)
        # Restacking for one adapter renumbers the slots.
        assert stacked.rebuild(["y"]) == {"y": 1}
        with stacked.rows(torch.tensor([1, 1, 1])):
            only_y = peft(input_ids=ids).logits
        torch.testing.assert_close(only_y, peft(input_ids=ids, adapter_names=["y"] * 3).logits,
                                   rtol=1e-5, atol=1e-5)
