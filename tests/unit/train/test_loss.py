"""The one next-token loss (ift.train.loss) against transformers' and peft's own losses."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PromptTuningConfig, get_peft_model
from train_support import make_tiny_model
from transformers import AutoModelForCausalLM

from ift.train.loss import next_token_loss, token_loss_sum


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("llama")))


@pytest.fixture
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :4] = -100  # prompts
    labels[mask == 0] = -100
    return ids, mask, labels


def test_sum_over_count_is_transformers_mean_loss(model):
    ids, mask, labels = _batch()
    with torch.no_grad():
        reference = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        total, count = token_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
    # 3 rows of 12: 8 trainable next tokens each, minus the 3 padded ones of row 1.
    assert count == 3 * 8 - 3
    assert total / count == pytest.approx(reference, rel=1e-6)


def test_loss_keeps_its_graph_and_matches_transformers_gradients(model):
    ids, mask, labels = _batch()
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total, count = next_token_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    assert total.requires_grad and count.dtype == torch.int64
    (total / count).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, reference[n], rtol=1e-4, atol=1e-7), n


def test_only_the_last_positions_are_scored_behind_virtual_tokens(model):
    """Prompt tuning puts virtual tokens before the input: peft's own loss (labels padded
    with -100 over them) equals ours on the last T positions."""
    ids, mask, labels = _batch()
    torch.manual_seed(2)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM",
                                                          num_virtual_tokens=5))
    with torch.no_grad():
        reference = float(peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        logits = peft_model(input_ids=ids, attention_mask=mask).logits
        total, count = token_loss_sum(logits, labels)
    assert logits.shape[1] == 12 + 5
    assert total / count == pytest.approx(reference, rel=1e-6)


def test_ignored_labels_add_nothing_and_low_precision_logits_are_upcast():
    logits = torch.zeros(1, 4, 8)
    logits[0, 0, 3] = 3.0  # position 0 favours token 3 over the 7 others
    labels = torch.tensor([[0, 3, -100, -100]])
    total, count = token_loss_sum(logits, labels)
    assert count == 1
    assert total == pytest.approx(-math.log(math.exp(3) / (math.exp(3) + 7)), rel=1e-5)
    total16, _ = next_token_loss(logits.bfloat16(), labels)
    assert total16.dtype == torch.float32
    assert float(total16) == pytest.approx(total, rel=1e-3)
    none, n = token_loss_sum(logits, torch.full((1, 4), -100))
    assert n == 0 and none == 0.0
