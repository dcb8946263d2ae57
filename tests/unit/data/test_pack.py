"""Sequence packing, padding waste and the packed attention mask."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ift.data.pack import pack, padding_waste, unpack
from ift.data.tokenize import IGNORE_INDEX, tokenize_records
from ift.train.collate import attention_mask_from_seq_ids


def make_rows(n: int, max_len: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(1, max_len)
        ids = [rng.randrange(1000) for _ in range(length)]
        cut = rng.randint(0, length)
        labels = [IGNORE_INDEX] * cut + ids[cut:]
        rows.append({"id": f"r{i}", "source": "s", "input_ids": ids, "labels": labels,
                     "num_tokens": length, "num_trainable": length - cut})
    return rows


def as_key(sample: dict) -> tuple:
    return tuple(sample["input_ids"]), tuple(sample["labels"])


def test_packing_keeps_every_sample_intact():
    rows = make_rows(300, 90, seed=1)
    bins = pack(rows, 128)
    unpacked = [s for b in bins for s in unpack(b)]
    assert sorted(map(as_key, unpacked)) == sorted(map(as_key, rows))
    assert sum(b["num_samples"] for b in bins) == len(rows)
    for b in bins:
        n = b["num_tokens"]
        assert n <= 128
        assert n == len(b["input_ids"]) == len(b["labels"]) == len(b["position_ids"])
        assert n == len(b["seq_ids"])
        assert b["num_trainable"] == sum(lab != IGNORE_INDEX for lab in b["labels"])
        # seq ids count 0, 1, 2, ... and positions restart at 0 for each sample
        assert sorted(set(b["seq_ids"])) == list(range(b["num_samples"]))
        assert b["seq_ids"] == sorted(b["seq_ids"])
        for s in range(b["num_samples"]):
            pos = [p for p, sid in zip(b["position_ids"], b["seq_ids"]) if sid == s]
            assert pos == list(range(len(pos)))
        # members name the rows each sample came from
        assert [as_key(rows[i]) for i in b["members"]] == [as_key(s) for s in unpack(b)]
    assert sorted(i for b in bins for i in b["members"]) == list(range(len(rows)))


def test_first_fit_decreasing_by_hand():
    lengths = [2, 5, 1, 3, 4, 2, 3]
    rows = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate(lengths)]
    bins = pack(rows, 8)
    # decreasing: 5 4 3 3 2 2 1 -> [5, 3] [4, 3, 1] [2, 2] (ties keep input order)
    assert [b["input_ids"] for b in bins] == [
        [1] * 5 + [3] * 3,
        [4] * 4 + [6] * 3 + [2],
        [0] * 2 + [5] * 2,
    ]
    assert [b["position_ids"] for b in bins][1] == [0, 1, 2, 3, 0, 1, 2, 0]
    assert [b["seq_ids"] for b in bins][1] == [0, 0, 0, 0, 1, 1, 1, 2]
    assert [b["num_samples"] for b in bins] == [2, 3, 2]
    assert [b["members"] for b in bins] == [[1, 3], [4, 6, 2], [0, 5]]


def test_packing_is_deterministic_and_tight():
    rows = make_rows(500, 200, seed=7)
    bins = pack(rows, 256)
    assert pack(rows, 256) == bins
    total = sum(len(r["input_ids"]) for r in rows)
    assert len(bins) >= math.ceil(total / 256)
    # first fit never leaves two bins that are both at most half full
    assert sum(1 for b in bins if b["num_tokens"] <= 128) <= 1
    # and does better than one sample per row
    assert len(bins) < len(rows) / 2


def test_pack_rejects_rows_it_cannot_hold():
    with pytest.raises(ValueError, match="row long: 9 tokens > max_seq_len=8"):
        pack([{"id": "long", "input_ids": [1] * 9, "labels": [1] * 9}], 8)
    with pytest.raises(ValueError, match="row bad: 3 input_ids but 2 labels"):
        pack([{"id": "bad", "input_ids": [1, 2, 3], "labels": [1, 2]}], 8)
    with pytest.raises(ValueError, match="no tokens"):
        pack([{"id": "empty", "input_ids": [], "labels": []}], 8)
    assert pack([], 8) == []


def test_pack_tokenized_records_round_trip():
    from ift.models import FALLBACK_TEXTS, train_tokenizer

    tok = train_tokenizer(FALLBACK_TEXTS * 3, vocab_size=600)
    records = [
        {"id": f"r{i}", "source": "s", "system": "",
         "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate(zip(FALLBACK_TEXTS[::2], FALLBACK_TEXTS[1::2]))
    ]
    rows, dropped = tokenize_records(records, tok, template="chatml", max_seq_len=96)
    assert dropped == [] and len(rows) == len(records)
    bins = pack(rows, 96)
    assert len(bins) < len(rows)
    unpacked = [s for b in bins for s in unpack(b)]
    assert sorted(map(as_key, unpacked)) == sorted(map(as_key, rows))
    assert sum(b["num_trainable"] for b in bins) == sum(r["num_trainable"] for r in rows)


# ---------------------------------------------------------------------------------------
# Padding waste
# ---------------------------------------------------------------------------------------


def test_padding_waste_by_hand():
    # padded to 8: pads 6 + 4 + 2 + 0 = 12 of 32
    assert padding_waste([2, 4, 6, 8], 8) == pytest.approx(12 / 32)
    # micro-batches of 2: [2, 4] -> 2 pads of 8, [6, 8] -> 2 pads of 16
    assert padding_waste([2, 4, 6, 8], 8, micro_batch_size=2) == pytest.approx(4 / 24)
    # micro-batches of 3: [2, 4, 6] -> 6 pads of 18, [8] -> 0 of 8
    assert padding_waste([2, 4, 6, 8], 8, micro_batch_size=3) == pytest.approx(6 / 26)
    assert padding_waste([8, 8], 8) == 0.0
    assert padding_waste([], 8) == 0.0


def test_padding_waste_of_packed_bins_is_lower():
    rows = make_rows(400, 60, seed=3)
    lengths = [len(r["input_ids"]) for r in rows]
    packed = [b["num_tokens"] for b in pack(rows, 256)]
    assert padding_waste(packed, 256) < padding_waste(lengths, 256) / 2


def test_padding_waste_rejects_bad_lengths():
    with pytest.raises(ValueError, match=r"lengths\[1\]=9"):
        padding_waste([3, 9], 8)
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        padding_waste([3], 8, micro_batch_size=0)


# ---------------------------------------------------------------------------------------
# The packed attention mask
# ---------------------------------------------------------------------------------------


def test_attention_mask_by_hand():
    mask = attention_mask_from_seq_ids(torch.tensor([[0, 0, 1, 1, 1, -1]]))
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # a pad sees only pads, and no sample sees it
    ], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def test_packed_attention_equals_separate_attention():
    """With the mask, attention over a packed row gives each sample's own result."""
    torch.manual_seed(0)
    lengths = [5, 3, 4]
    heads, dim = 2, 8
    qs = [torch.randn(1, heads, n, dim) for n in lengths]
    ks = [torch.randn(1, heads, n, dim) for n in lengths]
    vs = [torch.randn(1, heads, n, dim) for n in lengths]
    separate = [torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                for q, k, v in zip(qs, ks, vs)]

    pad = 2
    seq_ids = torch.tensor([[s for s, n in enumerate(lengths) for _ in range(n)] + [-1] * pad])
    mask = attention_mask_from_seq_ids(seq_ids)
    noise = [torch.randn(1, heads, pad, dim) for _ in range(3)]
    q, k, v = (torch.cat(parts + [extra], dim=2) for parts, extra in zip((qs, ks, vs), noise))
    packed = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(packed).all()
    out = torch.split(packed[:, :, : sum(lengths)], lengths, dim=2)
    for got, want in zip(out, separate):
        torch.testing.assert_close(got, want)
    # without the mask (plain causal), later samples see earlier ones
    leaky = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(leaky[:, :, 5:8], separate[1])
