"""One prompt format from training to serving: the record, its jinja, serve's prompt ids
against the training tokenization, the merged model's tokenizer, the stop tokens.

Runs on the tiny model's tokenizer (ChatML) and on a llama-style tokenizer, with the
chatml, alpaca and human_assistant templates and the tokenizer's own; and additionally
on the model dir IFT_REAL_MODEL_DIR names, when set.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
from train_support import random_lora_adapter

from ift.artifacts import (
    IGNORE_INDEX,
    PROMPT_FORMAT_FILE,
    PromptFormat,
    read_prompt_format,
    write_prompt_format,
)
from ift.data.templates import (
    ALPACA_PREAMBLE,
    TokenizerTraits,
    builtin_jinja,
    choose_prompt_format,
    prompt_format,
    render_prompt,
    segments,
)
from ift.data.tokenize import tokenize_records

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "中国的首都是哪里？"},
     {"role": "assistant", "content": "北京。"}],
    [{"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "And another? 🙂"},
     {"role": "assistant", "content": "Green."}],
    [{"role": "user", "content": "Look it up."},
     {"role": "assistant", "content": "Checking."},
     {"role": "tool", "content": '{"answer": 42}'},
     {"role": "assistant", "content": "It is 42."}],
]
RECORDS = [{"system": "", "messages": c} for c in CONVERSATIONS]  # the tokenizer corpus


def record(messages: list[dict]) -> dict:
    return {"id": "r", "source": "s", "system": "", "messages": messages, "meta": {}}


def training_prompt_ids(messages: list[dict], tokenizer, template: str) -> list[int]:
    """The training tokenization's ids before the last reply's first trained token."""
    rows, dropped = tokenize_records([record(messages)], tokenizer, template=template,
                                     max_seq_len=4096)
    assert not dropped
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    last = max(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    start = last
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[:start]


# ChatML with a default system prompt when none is given (as instruct models ship it):
# not ift's own jinja, so "auto" resolves to the tokenizer's template.
CHATML_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizers(tiny_tok, llama_tok):
    import copy

    default_system = copy.deepcopy(tiny_tok)
    default_system.chat_template = CHATML_DEFAULT_SYSTEM
    out = {"tiny": tiny_tok, "llama": llama_tok, "default-system": default_system}
    real = os.environ.get("IFT_REAL_MODEL_DIR")
    if real:
        from transformers import AutoTokenizer

        out["real"] = AutoTokenizer.from_pretrained(real)
    return out


@pytest.fixture(scope="module")
def tiny_tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


TEMPLATES = ("chatml", "alpaca", "human_assistant", "tokenizer")


@pytest.mark.parametrize("template", TEMPLATES)
def test_serve_prompt_ids_equal_the_training_prompt_and_the_recorded_jinja(
        template, tiny_tok, llama_tok):
    from ift.data.templates import format_prompt

    for name, tok in tokenizers(tiny_tok, llama_tok).items():
        fmt = prompt_format(template, tok)
        for conv in CONVERSATIONS:
            history = conv[:-1]
            # What serve sends to the model (Engine.chat_prompt_ids).
            served = tok(format_prompt(history, tok, fmt), add_special_tokens=False)["input_ids"]
            assert served == training_prompt_ids(conv, tok, fmt.template), (name, conv)
            # What plain transformers (or any server) builds from the recorded jinja.
            other = tok.apply_chat_template(history, chat_template=fmt.chat_template,
                                            add_generation_prompt=True, tokenize=False)
            assert tok(other, add_special_tokens=False)["input_ids"] == served, (name, conv)


@pytest.mark.parametrize("name", ["chatml", "alpaca", "human_assistant"])
@pytest.mark.parametrize("traits", [
    TokenizerTraits(bos="", eos="<|endoftext|>", im_end_is_token=True),
    TokenizerTraits(bos="<s>", eos="</s>", im_end_is_token=False),
])
def test_builtin_jinja_renders_the_builtin_text(name, traits, tiny_tok):
    for conv in CONVERSATIONS:
        for gen, msgs in ((True, conv[:-1]), (False, conv)):
            want = "".join(t for t, _, _ in segments(record(msgs), name, tiny_tok, traits,
                                                     generation_prompt=gen))
            got = tiny_tok.apply_chat_template(msgs, chat_template=builtin_jinja(name, traits),
                                               add_generation_prompt=gen, tokenize=False)
            assert got == want, (name, traits, msgs)


def test_prompt_format_names_stop_tokens_and_system_policy(tiny_tok, llama_tok):
    chatml = prompt_format("chatml", tiny_tok)
    assert chatml.stop_tokens == ["<|im_end|>", "<|endoftext|>"]
    assert chatml.stop_token_ids == [tiny_tok.convert_tokens_to_ids(t) for t in chatml.stop_tokens]
    assert chatml.system_policy == "optional"
    assert prompt_format("auto", tiny_tok) == chatml  # ift's ChatML jinja is chatml
    alpaca = prompt_format("alpaca", tiny_tok)
    assert (alpaca.stop_tokens, alpaca.system_policy, alpaca.default_system) == (
        ["<|endoftext|>"], "replaces_preamble", ALPACA_PREAMBLE)
    marked = prompt_format("auto", tokenizers(tiny_tok, llama_tok)["default-system"])
    assert (marked.template, marked.chat_template, marked.stop_tokens) == (
        "tokenizer", CHATML_DEFAULT_SYSTEM, ["<|im_end|>", "<|endoftext|>"])
    own = prompt_format("tokenizer", llama_tok)  # replies end with eos in its template
    assert (own.template, own.chat_template, own.stop_tokens, own.system_policy) == (
        "tokenizer", llama_tok.chat_template, ["</s>"], "template")


def test_record_round_trip_and_errors_name_the_file_and_key(tiny_tok, tmp_path):
    fmt = prompt_format("alpaca", tiny_tok)
    path = write_prompt_format(str(tmp_path), fmt)
    assert os.path.basename(path) == PROMPT_FORMAT_FILE
    assert read_prompt_format(str(tmp_path)) == fmt
    assert read_prompt_format(str(tmp_path / "nothing-here")) is None
    bad = {**fmt.to_dict(), "stop_token_ids": ["x"]}
    (tmp_path / PROMPT_FORMAT_FILE).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"{PROMPT_FORMAT_FILE}.*stop_token_ids"):
        read_prompt_format(str(tmp_path))
    (tmp_path / PROMPT_FORMAT_FILE).write_text(json.dumps({**fmt.to_dict(), "templat": "x"}))
    with pytest.raises(ValueError, match="unknown key 'templat'"):
        read_prompt_format(str(tmp_path))
    with pytest.raises(ValueError, match="system_policy"):
        PromptFormat(template="chatml", chat_template="x", system_policy="sometimes")


def test_the_record_wins_over_auto_and_an_explicit_override_warns(tiny_tok, caplog):
    recorded = prompt_format("alpaca", tiny_tok)
    assert choose_prompt_format(recorded, "auto", tiny_tok, "A") == recorded
    assert choose_prompt_format(recorded, "alpaca", tiny_tok, "A") == recorded
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        got = choose_prompt_format(recorded, "chatml", tiny_tok, "runs/x/final")
    assert got.template == "chatml"
    assert "runs/x/final" in caplog.text and "'alpaca'" in caplog.text
    assert choose_prompt_format(None, "auto", tiny_tok, "B") == prompt_format("chatml", tiny_tok)


def test_engine_uses_each_adapters_format_and_stops_at_its_end_of_turn(tiny_model, tmp_path):
    """An adapter trained on alpaca gets alpaca prompts on a ChatML base, and its reply
    ends at its format's stop token, as PeftModel.generate with those stop ids does. The
    stop token is one the adapter does produce (a random model never says <|im_end|>)."""
    import dataclasses

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ift.serve.engine import Engine
    from ift.serve.sampling import SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [{"role": "user", "content": "Name three colors."}]
    ids = tok(render_prompt(msgs, tok, "alpaca"), add_special_tokens=False)["input_ids"]

    def reference(model, stops: list[int]) -> list[int]:
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), max_new_tokens=24, do_sample=False,
                             eos_token_id=stops, pad_token_id=model.config.pad_token_id)
        return out[0, len(ids):].tolist()

    # A random adapter may repeat one token; take the first seed whose greedy reply has a
    # token, not at its start or end, that it had not said before: that token ends the turn.
    for seed in range(1, 9):
        adapter = random_lora_adapter(tiny_model, str(tmp_path / f"alpaca{seed}"), seed=seed)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                          adapter).eval()
        free = reference(model, [tok.eos_token_id])
        end = next((t for k, t in enumerate(free[:-1]) if k >= 1 and t not in free[:k]), None)
        if end is not None:
            break
    assert end is not None, "no seed gave a reply with a token to stop at"
    fmt = prompt_format("alpaca", tok)
    fmt = dataclasses.replace(fmt, stop_tokens=[*fmt.stop_tokens, tok.convert_ids_to_tokens(end)],
                              stop_token_ids=[*fmt.stop_token_ids, end])
    write_prompt_format(adapter, fmt)
    eng = Engine(tiny_model, batch_wait_timeout_s=0.0)
    try:
        eng.load_adapter("alp", adapter).result()
        assert eng.format_of("alp") == fmt
        assert eng.chat_prompt_ids(msgs, "alp") == ids
        assert eng.format_of().template == "chatml"  # the base keeps its own
        assert tok.convert_tokens_to_ids("<|im_end|>") in eng.eos_ids
        ref = reference(model, fmt.stop_token_ids)
        assert ref[-1] == end and len(ref) < len(free)
        got = eng.generate(ids, SamplingParams(max_tokens=24, temperature=0.0), "alp")
        assert got["finish_reason"] == "stop"
        assert got["completion_tokens"] == len(ref)
        assert got["text"] == tok.decode(ref[:-1], skip_special_tokens=True)
    finally:
        eng.shutdown()


def test_merge_carries_the_format_into_the_tokenizer(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from ift.merge import merge

    tok = AutoTokenizer.from_pretrained(tiny_model)
    adapter = random_lora_adapter(tiny_model, str(tmp_path / "adapter"), seed=4)
    fmt = prompt_format("alpaca", tok)
    write_prompt_format(adapter, fmt)
    out = str(tmp_path / "merged")
    merge(tiny_model, adapter, out)
    assert read_prompt_format(out) == fmt
    merged_tok = AutoTokenizer.from_pretrained(out)
    assert merged_tok.chat_template == fmt.chat_template
    for conv in CONVERSATIONS:
        ids = merged_tok.apply_chat_template(conv[:-1], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
        assert list(ids) == training_prompt_ids(conv, tok, "alpaca")
