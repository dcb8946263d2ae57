"""The real model through the real chain: `ift data prepare` (Ray Data) on the bundled
identity data, 20 LoRA steps with `ift train` on 2 Ray Train workers, then the held-out
paraphrases' loss goes down, and `ift merge` gives what base + adapter give through peft."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ift.config import load_config
from ift.data.quality import substitute_placeholders
from ift.eval.heldout import loss_rows_from_records, raw_records
from ift.eval.run import token_loss
from ift.train.checkpoint import FINAL_DIR

PLACEHOLDERS = {"name": "Quokka", "author": "the ift authors"}
STEPS = 20


@pytest.fixture(scope="module")
def trained(local_ray, smollm2, tmp_path_factory):
    from ift.data.pipeline import prepare
    from ift.train.driver import train

    root = tmp_path_factory.mktemp("real-train")
    cfg = load_config(None, [
        f"storage.root={root}", f"model.name_or_path={smollm2}", "data.output=data",
        "data.max_seq_len=128", "data.val_ratio=0.05",
        f"data.placeholders.name={PLACEHOLDERS['name']}",
        f"data.placeholders.author={PLACEHOLDERS['author']}",
        "data.sources.0.path=@quickstart/identity.json",
        "data.sources.1.path=@sample/alpaca_en.json", "data.sources.1.count=16",
        "peft.r=16", "peft.alpha=32", "peft.dropout=0.0", "train.lr=1e-3",
        "train.warmup_ratio=0", f"train.max_steps={STEPS}", "train.num_workers=2",
        "train.micro_batch_size=2", "train.eval_every=0", "train.checkpoint_every=0",
        "train.run_name=real", "train.output=runs", "tracking.enabled=false",
    ])
    manifest = prepare(cfg)
    summary = train(cfg)
    return cfg, manifest, summary, os.path.join(str(root), "runs", "real", FINAL_DIR)


def _heldout_rows(tok, template: str):
    from ift.artifacts import bundled_path

    records = [substitute_placeholders(r, PLACEHOLDERS) for r in
               raw_records(bundled_path("@quickstart/identity_heldout.json"), seed=0)]
    return loss_rows_from_records(records, tok, template, 128)


def test_twenty_lora_steps_lower_the_heldout_paraphrase_loss(trained, smollm2):
    cfg, manifest, summary, final = trained
    assert summary["steps"] == STEPS and summary["global_batch_size"] == 4
    assert manifest["template"] == "tokenizer"
    tok = AutoTokenizer.from_pretrained(smollm2)
    rows = _heldout_rows(tok, manifest["template"])
    assert len(rows) == 10
    base = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    before, _ = token_loss(base, rows, tok.pad_token_id, 5, "cpu")
    tuned = PeftModel.from_pretrained(base, final).eval()
    after, _ = token_loss(tuned, rows, tok.pad_token_id, 5, "cpu")
    assert after < before * 0.7, (before, after)


def test_merged_real_weights_equal_base_plus_adapter(trained, smollm2, tmp_path):
    from ift.merge import merge

    *_, final = trained
    out = str(tmp_path / "merged")
    merge(smollm2, final, out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2),
                                    final).eval()
    with torch.no_grad():
        got, want = merged(ids).logits, ref(ids).logits
    # Summation order differs over 30 layers (merged W + BA vs W x + B A x): logits of
    # magnitude ~25 agree to about 1e-4.
    assert torch.allclose(got, want, atol=1e-3, rtol=0), (got - want).abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.equal(merged.generate(ids, max_new_tokens=16, do_sample=False),
                       ref.generate(ids, max_new_tokens=16, do_sample=False))
