"""`ift eval`'s held-out loss is the training loop's: the same batches and loss sum, equal
to plain transformers' per-row loss weighted by trained tokens."""

from __future__ import annotations

import pytest
import torch
from train_support import make_tiny_model
from transformers import AutoModelForCausalLM

from ift.artifacts import IGNORE_INDEX
from ift.eval.run import token_loss


def test_held_out_token_loss_equals_plain_transformers(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(str(tmp_path / "m")))
    model.eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, prompt in ((9, 3), (5, 2), (12, 7), (7, 1)):
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    loss, tokens = token_loss(model, rows, pad_id=0, batch_size=3)
    total = 0.0
    with torch.no_grad():
        for r in rows:  # one row at a time, no padding: HF's mean over the row's labels
            n = sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX)
            total += float(model(input_ids=torch.tensor([r["input_ids"]]),
                                 labels=torch.tensor([r["labels"]])).loss) * n
    assert tokens == 6 + 3 + 5 + 6
    assert loss == pytest.approx(total / tokens, rel=1e-5)
