"""eval.during_training without Ray: when the probe runs, what it reports, the progress
line, and the configurations it refuses (each error names the key)."""

from __future__ import annotations

import pytest

from ift.config import (
    ConfigError,
    DataConfig,
    DuringTrainingConfig,
    PeftConfig,
    TrainConfig,
    load_config,
)
from ift.eval import during
from ift.train.loop import progress_line

HELDOUT = ("What is 2 plus 3?\t5\t2 + 3 = 5.\n"
           "Pick the prime:\\nOptions:\\n(A) 4\\n(B) 7\\n(C) 9\t(B)\t7 has no divisors.\n"
           "What is 10 minus 4?\t6\t10 - 4 = 6.\n")


def _cfg(tmp_path, *extra):
    data = tmp_path / "heldout.tsv"
    data.write_text(HELDOUT)
    return load_config(None, [f"storage.root={tmp_path}", "train.eval_every=3",
                              f"eval.during_training.data={data}", *extra])


def test_off_by_default_and_due_at_eval_steps_and_the_last(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert during.Probe.create(_cfg(tmp_path), tok, 0) is None
    probe = during.Probe.create(_cfg(tmp_path, "eval.during_training.max_samples=2"), tok, 0)
    assert [s for s in range(1, 11) if probe.due(s, 10)] == [3, 6, 9, 10]
    assert len(probe.items) == 2 and probe.items[0].gold == "5"
    # other ranks read nothing and report nothing
    other = during.Probe.create(_cfg(tmp_path, "eval.during_training.max_samples=2"), tok, 1)
    assert other.items == [] and other.run(object()) == {}


def test_run_reports_heldout_metrics_and_restores_train_mode(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ift.eval import metrics
    from ift.eval.run import generate_samples

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.train()
    cfg = _cfg(tmp_path, "eval.during_training.max_samples=3",
               "eval.during_training.max_new_tokens=5")
    probe = during.Probe.create(cfg, tok, 0)
    got = probe.run(model)
    assert model.training
    expected = metrics.aggregate(generate_samples(model, tok, probe.items, max_new_tokens=5,
                                                  batch_size=8))
    for k in ("exact_match", "mc_accuracy", "rouge_l", "answered"):
        assert got[f"heldout/{k}"] == pytest.approx(expected[k]), k
    assert "heldout/exact_match_n" not in got and got["heldout/seconds"] >= 0
    line = progress_line(3, 10, {"loss": 1.0, "lr": 1e-3, **got}, 1.0, 3)
    assert f"heldout exact_match {got['heldout/exact_match']:.3f}" in line
    assert "rouge_l" in line


def test_refused_configurations_name_the_key(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(ConfigError, match="train.strategy=ddp"):
        during.Probe.create(_cfg(tmp_path, "eval.during_training.max_samples=2",
                                 "train.strategy=fsdp", "train.use_gpu=true"), tok, 0)
    with pytest.raises(ConfigError, match="peft.method=prefix"):
        during.Probe.create(_cfg(tmp_path, "eval.during_training.max_samples=2",
                                 "peft.method=prefix"), tok, 0)
    with pytest.raises(ConfigError, match="eval.during_training: max_samples=-1"):
        _cfg(tmp_path, "eval.during_training.max_samples=-1")
    from ift.tune.driver import _scheduler

    with pytest.raises(ConfigError, match="eval.during_training.max_samples"):
        cfg = _cfg(tmp_path, "tune.metric=heldout/exact_match", "tune.mode=max")
        _scheduler(cfg.tune, cfg.train, cfg.eval.during_training)
    cfg = _cfg(tmp_path, "tune.metric=heldout/exact_match", "tune.mode=max",
               "eval.during_training.max_samples=2")
    asha = _scheduler(cfg.tune, cfg.train, cfg.eval.during_training)
    assert (asha._metric, asha._mode) == ("heldout/exact_match", "max")


def test_check_config_reads_the_peft_and_train_sections():
    during.check_config(PeftConfig(), TrainConfig())  # lora on ddp
    with pytest.raises(ConfigError, match="train.strategy=ddp"):
        during.check_config(PeftConfig(), TrainConfig(strategy="fsdp", use_gpu=True))
    with pytest.raises(ConfigError, match="peft.method=p_tuning"):
        during.check_config(PeftConfig(method="p_tuning"), TrainConfig())


def test_load_items_reads_the_first_max_samples_rows_in_the_format(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from ift.data.templates import prompt_format

    tok = AutoTokenizer.from_pretrained(tiny_model)
    data = tmp_path / "heldout.tsv"
    data.write_text(HELDOUT)
    fmt = prompt_format("chatml", tok)
    items = during.load_items(DataConfig(), DuringTrainingConfig(max_samples=2), str(data),
                              tok, fmt)
    assert len(items) == 2 and items[0].gold == "5"
    assert items[0].prompt.startswith("<|im_start|>user\n")
    assert items[0].prompt.endswith("What is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n")
    assert len(during.load_items(DataConfig(), DuringTrainingConfig(max_samples=9), str(data),
                                 tok, fmt)) == 3
    # data.placeholders are filled, as in `ift eval` and in the training rows
    named = tmp_path / "named.tsv"
    named.write_text("Who made {{name}}?\t{{name}} team\tThe {{name}} team.\n")
    (item,) = during.load_items(DataConfig(placeholders={"name": "ift"}),
                                DuringTrainingConfig(max_samples=2), str(named), tok, fmt)
    assert "Who made ift?" in item.prompt and "{{name}}" not in item.prompt


def test_probe_renders_in_the_runs_format_and_stops_at_its_end_of_turn(tmp_path, tiny_model):
    """With the tokenizer's own (non-ChatML) chat template, the probe renders prompts in it
    and a reply ends at that template's end-of-turn token, which is neither eos nor
    <|im_end|>. The model is rigged to say that token at every step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ift.eval.run import generate_samples

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                         "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
                         "{% endif %}")
    end = tok.convert_tokens_to_ids("<|end|>")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():  # every position's last hidden state is the same vector ...
        emb = model.get_input_embeddings().weight
        emb.copy_(emb[:1].expand_as(emb))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        h = model.model.norm(emb[:1])[0]
        head = torch.zeros_like(emb)  # ... and only <|end|> scores it
        head[end] = h
    model.lm_head.weight = torch.nn.Parameter(head)
    model.config.tie_word_embeddings = False

    cfg = _cfg(tmp_path, "eval.during_training.max_samples=2",
               "eval.during_training.max_new_tokens=6", "data.template=tokenizer")
    probe = during.Probe.create(cfg, tok, 0)
    assert probe.prompt_format.template == "tokenizer"
    assert probe.prompt_format.stop_tokens[0] == "<|end|>"
    assert "<|im_end|>" not in probe.prompt_format.stop_tokens
    assert probe.items[0].prompt.startswith("<|user|>\n")
    assert probe.items[0].prompt.endswith("What is 2 plus 3?<|end|>\n<|assistant|>\n")
    got = probe.samples(model)
    assert [(s["finish_reason"], s["completion_tokens"], s["output"]) for s in got] == \
        [("stop", 1, "")] * 2
    # without the format, nothing stops the reply before max_new_tokens
    free = generate_samples(model, tok, probe.items, max_new_tokens=6, batch_size=2)
    assert [(s["finish_reason"], s["completion_tokens"]) for s in free] == [("length", 6)] * 2


def test_eval_max_loss_rows_limits_the_loss_not_the_generation(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from ift.eval.run import heldout_set

    tok = AutoTokenizer.from_pretrained(tiny_model)
    data = str(tmp_path / "heldout.tsv")
    for limit, n in ((0, 3), (2, 2)):
        cfg = _cfg(tmp_path, f"eval.max_loss_rows={limit}", "eval.max_samples=3")
        held = heldout_set(cfg.data, cfg.eval, data, tok, prepared=None, model_dir=tiny_model,
                           limit=None)
        assert (len(held.rows), len(held.items)) == (n, 3)
        assert held.prompt_format.template == "chatml"
    with pytest.raises(ConfigError, match="eval.max_loss_rows=-1"):
        _cfg(tmp_path, "eval.max_loss_rows=-1")


def test_ie_heldout_reports_ie_scores_read_with_the_source_schema(tmp_path, tiny_model):
    """Raw CLUENER rows as the held-out sample: the instruction lists the schema of the
    matching data.sources entry (not just the row's gold types), and the probe reports the
    IE scores of `ift eval` (an output that is no JSON counts as unparseable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held = tmp_path / "ner.jsonl"
    held.write_text('{"text": "小明住在北京。", "label": {"地点": {"北京": [[4, 5]]}}}\n',
                    encoding="utf-8")
    types = tmp_path / "types.json"
    types.write_text('["地点", "人物", "机构"]', encoding="utf-8")
    cfg = load_config(None, [
        f"storage.root={tmp_path}", "train.eval_every=3", f"eval.during_training.data={held}",
        "eval.during_training.max_samples=1", "eval.during_training.max_new_tokens=4",
        f"data.sources.0.path={held}", f"data.sources.0.schema={types}"])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    probe = during.Probe.create(cfg, tok, 0)
    assert probe.items[0].ie["labels"] == ["地点", "人物", "机构"]
    got = probe.run(AutoModelForCausalLM.from_pretrained(tiny_model))
    assert got["heldout/ie_ner_f1"] == 0.0 and got["heldout/ie_ner_recall"] == 0.0
    assert got["heldout/ie_unparseable"] == got["heldout/ie_ner_unparseable"] == 1.0
    assert got["heldout/ie_ner_sentences"] == 1.0
