"""`ift eval`'s held-out loss is the training loop's: the same batches and loss sum, equal
to plain transformers' per-row loss weighted by trained tokens; and what the helpers of
`ift eval` read from the config sections they are given."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from prepared_support import write_prepared
from train_support import make_tiny_model
from transformers import AutoModelForCausalLM

from ift.artifacts import IGNORE_INDEX, write_prompt_format
from ift.config import ConfigError, DataConfig, EvalConfig, ModelConfig, TrainConfig
from ift.data.templates import prompt_format
from ift.eval.run import (
    _prompt_format,
    encode_benchmarks,
    heldout_set,
    load_for_eval,
    score_model,
    token_loss,
    training_prompt_format,
)


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


# ---------------------------------------------------------------------------------------
# The helpers read only their config sections
# ---------------------------------------------------------------------------------------

SAMPLES = Path(__file__).resolve().parents[3] / "ift" / "eval" / "sample_benchmarks"
HELDOUT = ("What is 2 plus 3?\t5\t2 + 3 = 5.\n"
           "What is 10 minus 4?\t6\t10 - 4 = 6.\n"
           "How many legs do 2 cats have?\t8\t2 * 4 = 8.\n")


def _tok(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _prepared_with_template(d: Path, template: str) -> str:
    return write_prepared(d, template=template)


def test_training_prompt_format_is_the_manifests_else_the_data_sections(tiny_model, tmp_path):
    tok = _tok(tiny_model)
    assert training_prompt_format(DataConfig(template="alpaca"), None, tok) == \
        prompt_format("alpaca", tok)
    assert training_prompt_format(DataConfig(), None, tok) == prompt_format("auto", tok)
    prepared = _prepared_with_template(tmp_path / "prepared", "human_assistant")
    assert training_prompt_format(DataConfig(template="alpaca"), prepared, tok) == \
        prompt_format("human_assistant", tok)


def test_prompt_format_is_the_recorded_one_unless_data_template_overrides_it(tiny_model,
                                                                            tmp_path):
    tok = _tok(tiny_model)
    bare = str(tmp_path / "bare")
    os.makedirs(bare)
    assert _prompt_format(DataConfig(template="alpaca"), bare, None, tok) == \
        prompt_format("alpaca", tok)
    recorded = str(tmp_path / "recorded")
    os.makedirs(recorded)
    write_prompt_format(recorded, prompt_format("human_assistant", tok))
    assert _prompt_format(DataConfig(), recorded, None, tok) == \
        prompt_format("human_assistant", tok)
    assert _prompt_format(DataConfig(template="chatml"), recorded, None, tok) == \
        prompt_format("chatml", tok)


def test_encode_benchmarks_picks_from_the_eval_section_and_renders_chat_in_data_template(
        tiny_model):
    tok = _tok(tiny_model)
    benches = EvalConfig(benchmarks={
        "mmlu": {"path": str(SAMPLES / "mmlu"), "k_shot": 0, "chat": True},
        "cmmlu": {"path": str(SAMPLES / "cmmlu"), "k_shot": 0}})
    assert list(encode_benchmarks(DataConfig(), benches, tok)) == ["mmlu", "cmmlu"]
    for template, start in (("chatml", "<|im_start|>user\n"), ("alpaca", "Below is")):
        enc = encode_benchmarks(DataConfig(template=template), benches, tok, ["mmlu"])
        assert list(enc) == ["mmlu"]
        first = next(iter(enc["mmlu"].subjects.values()))[0]
        assert tok.decode(first.prefix_ids + first.question_ids).startswith(start), template


def test_load_for_eval_loads_on_the_model_sections_base(tiny_model, tmp_path):
    from train_support import random_lora_adapter

    adapter = random_lora_adapter(tiny_model, str(tmp_path / "adapter"), seed=3)
    model, tok, desc = load_for_eval(adapter, ModelConfig(name_or_path=tiny_model))
    assert desc == {"adapter": adapter, "base": tiny_model}
    assert hasattr(model, "disable_adapter") and not model.training
    assert tok.vocab_size == _tok(tiny_model).vocab_size
    # a full model needs no base; an adapter whose base is known from neither fails
    model, _tok2, desc = load_for_eval(tiny_model, ModelConfig(dtype="fp32"))
    assert desc == {"model": tiny_model} and next(model.parameters()).dtype == torch.float32
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="model.name_or_path"):
        load_for_eval(str(tmp_path / "orphan"), ModelConfig())
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConfigError, match=r"nothing: holds neither a PEFT adapter"):
        load_for_eval(str(tmp_path / "nothing"), ModelConfig())


def test_score_model_uses_the_eval_sections_sizes_and_the_train_sections_beta(tiny_model,
                                                                              tmp_path):
    from train_support import random_lora_adapter

    data = tmp_path / "heldout.tsv"
    data.write_text(HELDOUT)
    model, tok, _ = load_for_eval(tiny_model, ModelConfig())
    ev = EvalConfig(max_new_tokens=3, batch_size=2, max_samples=2)
    held = heldout_set(DataConfig(), ev, str(data), tok, prepared=None, model_dir=tiny_model,
                       limit=None)
    out = score_model(ev, TrainConfig(), model, tok, held, {})
    assert len(out["samples"]) == 2 and all(s["completion_tokens"] <= 3 for s in out["samples"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    assert (out["metrics"]["loss"], out["metrics"]["loss_tokens"]) == \
        token_loss(model, held.rows, pad, 2)
    assert out["metrics"]["loss_rows"] == 3 and out["benchmarks"] == {}

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"instruction": "Name a color.", "chosen": "Blue.",
                                 "rejected": "Seven."}) + "\n")
    adapter = random_lora_adapter(tiny_model, str(tmp_path / "adapter"), seed=5)
    lora, tok, _ = load_for_eval(adapter, ModelConfig(name_or_path=tiny_model))
    held = heldout_set(DataConfig(), ev, str(pairs), tok, prepared=None, model_dir=adapter,
                       limit=None)
    margins = [score_model(ev, TrainConfig(beta=beta), lora, tok, held, {})["metrics"]
               ["reward_margin"] for beta in (0.1, 0.2)]
    assert margins[0] != 0 and margins[1] == pytest.approx(2 * margins[0])
