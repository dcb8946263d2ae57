"""Batching prepared rows: padding, and packed rows whose samples never see each other."""

from __future__ import annotations

import pytest
import torch
from train_support import make_tiny_model

from ift.train.collate import (
    IGNORE_INDEX,
    collate,
    input_tokens,
    model_inputs,
    trainable_tokens,
)


def test_unpacked_rows_pad_to_the_longest():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [8], "labels": [8]}]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in b
    assert input_tokens(b) == 4
    # Shifted: the first label never counts (nothing predicts it).
    assert trainable_tokens(b["labels"]) == 2


def test_pad_to_multiple_of():
    b = collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], pad_id=9, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (1, 8)
    assert b["input_ids"][0, 3:].tolist() == [9] * 5


def test_row_with_mismatched_labels_is_an_error_naming_it():
    with pytest.raises(ValueError, match="row 'r7' has 3 input_ids but 2 labels"):
        collate([{"id": "r7", "input_ids": [1, 2, 3], "labels": [1, 2]}], pad_id=0)


def test_packed_rows_get_positions_and_a_block_causal_mask():
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5],
             "position_ids": [0, 1, 2, 0, 1], "seq_ids": [0, 0, 0, 1, 1]},
            {"input_ids": [6, 7], "labels": [6, 7], "position_ids": [0, 1], "seq_ids": [0, 0]}]
    b = collate(rows, pad_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert b["seq_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, -1, -1, -1]]
    mask = b["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    m = mask[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0],
                 [1, 1, 1, 0, 0],
                 [0, 0, 0, 1, 0],
                 [0, 0, 0, 1, 1]]
    # No sample token attends to padding, and every row has at least one key.
    assert not mask[1, 0, :2, 2:].any()
    assert mask.any(-1).all()
    assert input_tokens(b) == 7


def test_model_inputs_match_the_attention_kernel():
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "position_ids": [0, 0, 1],
             "seq_ids": [0, 1, 1]}]
    b = collate(rows, pad_id=0)
    sdpa = model_inputs(b, attn_implementation="sdpa")
    assert sdpa["attention_mask"].dtype == torch.bool
    eager = model_inputs(b, attn_implementation="eager", dtype=torch.float32)
    assert eager["attention_mask"].dtype == torch.float32
    assert eager["attention_mask"][0, 0, 1, 0] == torch.finfo(torch.float32).min
    assert eager["attention_mask"][0, 0, 2, 1] == 0
    flash = model_inputs(b, attn_implementation="flash_attention_2")
    assert "attention_mask" not in flash and "position_ids" in flash


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flash_attention_2"])
def test_a_batch_without_its_4d_mask_gets_the_same_inputs_built_from_seq_ids(impl):
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5],
             "position_ids": [0, 1, 2, 0, 1], "seq_ids": [0, 0, 0, 1, 1]},
            {"input_ids": [6, 7], "labels": [6, 7], "position_ids": [0, 1], "seq_ids": [0, 0]}]
    lazy = collate(rows, pad_id=0, mask_4d=False)
    assert "attention_mask" not in lazy and lazy["seq_ids"].shape == (2, 5)
    assert input_tokens(lazy) == 7
    want = model_inputs(collate(rows, pad_id=0), attn_implementation=impl,
                        dtype=torch.bfloat16, device="cpu")
    got = model_inputs(lazy, attn_implementation=impl, dtype=torch.bfloat16, device="cpu")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {arch: make_tiny_model(str(root / arch), arch=arch)
            for arch in ("llama", "qwen2", "gpt_neox")}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_pair_gives_the_logits_of_each_sample_alone(models, arch, impl):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models[arch], attn_implementation=impl).eval()
    g = torch.Generator().manual_seed(1)
    a = torch.randint(5, 300, (11,), generator=g).tolist()
    b = torch.randint(5, 300, (7,), generator=g).tolist()
    c = torch.randint(5, 300, (5,), generator=g).tolist()
    packed = {"input_ids": a + b, "labels": a + b,
              "position_ids": list(range(11)) + list(range(7)), "seq_ids": [0] * 11 + [1] * 7}
    short = {"input_ids": c, "labels": c, "position_ids": list(range(5)), "seq_ids": [0] * 5}
    batch = collate([packed, short], pad_id=0)
    inputs = model_inputs(batch, attn_implementation=model.config._attn_implementation)
    inputs.pop("labels")
    with torch.no_grad():
        together = model(**inputs).logits
        alone = [model(input_ids=torch.tensor([x])).logits[0] for x in (a, b, c)]
    tol = 1e-5
    assert torch.allclose(together[0, :11], alone[0], atol=tol)
    assert torch.allclose(together[0, 11:18], alone[1], atol=tol)
    assert torch.allclose(together[1, :5], alone[2], atol=tol)
    # With the same positions but a plain causal mask, the second sample sees the first:
    # the block mask is what keeps them apart.
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([a + b]), attention_mask=torch.ones(1, 18),
                      position_ids=torch.tensor([packed["position_ids"]])).logits[0, 11:18]
    assert not torch.allclose(plain, alone[1], atol=1e-3)


def test_labels_pad_with_ignore_index():
    b = collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2], "labels": [1, 2]}], 0)
    assert b["labels"][0, 1] == IGNORE_INDEX


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_micro_batch_with_flash_attention_stays_inside_samples(models, arch):
    """transformers' real flash path (exact SDPA stand-ins for the kernels): a micro-batch
    of two packed rows gives each sample its own logits, and the same loss as SDPA with
    the block mask. Before flattening, the second sample of row 0 saw the first."""
    from flash_standin import IMPL, sdpa_flash_kernels
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models[arch], attn_implementation="sdpa")
    model.eval()
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(5, 300, (n,), generator=g).tolist() for n in (11, 7, 5))
    packed = {"input_ids": a + b, "labels": [IGNORE_INDEX] + a[1:] + [IGNORE_INDEX] + b[1:],
              "position_ids": list(range(11)) + list(range(7)), "seq_ids": [0] * 11 + [1] * 7}
    short = {"input_ids": c, "labels": [IGNORE_INDEX] + c[1:], "position_ids": list(range(5)),
             "seq_ids": [0] * 5}
    batch = collate([packed, short], pad_id=0)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([x])).logits[0] for x in (a, b, c)]
        sdpa = model(**model_inputs(batch, attn_implementation="sdpa")).loss
    flash_inputs = model_inputs(batch, attn_implementation=IMPL)
    assert flash_inputs["input_ids"].shape == (1, 23)
    model.config._attn_implementation = IMPL
    with sdpa_flash_kernels(), torch.no_grad():
        out = model(**flash_inputs)
    logits = out.logits[0]
    tol = 1e-5
    torch.testing.assert_close(logits[:11], alone[0], atol=tol, rtol=0)
    torch.testing.assert_close(logits[11:18], alone[1], atol=tol, rtol=0)
    torch.testing.assert_close(logits[18:23], alone[2], atol=tol, rtol=0)
    assert float(out.loss) == pytest.approx(float(sdpa), abs=1e-5)
    assert trainable_tokens(flash_inputs["labels"]) == trainable_tokens(batch["labels"])
