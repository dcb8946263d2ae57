"""Chat templates: rendered text, trainable segments and generation prompts."""

from __future__ import annotations

import pytest

from ift.data.templates import (
    ALPACA_PREAMBLE,
    ALPACA_PREAMBLE_WITH_INPUT,
    BUILTIN,
    TemplateError,
    render_prompt,
    render_segments,
    resolve_template,
)
from ift.models import CHATML_TEMPLATE

# Appends the turn count, so every rendering rewrites the end of the previous one.
REWRITING = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ messages | length }}"

MULTI = {
    "id": "multi-1",
    "source": "chat",
    "lang": "en",
    "task": "chat",
    "system": "You are a terse assistant.",
    "messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And the weather there?"},
        {"role": "assistant", "content": "Let me check the forecast."},
        {"role": "tool", "content": '{"paris": "sunny, 24C"}'},
        {"role": "assistant", "content": "It is sunny and 24 degrees in Paris."},
    ],
    "meta": {},
}
ZH = {
    "id": "zh-1",
    "source": "zh",
    "lang": "zh",
    "task": "qa",
    "system": "",
    "messages": [
        {"role": "user", "content": "中国的首都是哪里？"},
        {"role": "assistant", "content": "中国的首都是北京。"},
    ],
    "meta": {},
}
ALPACA = {
    "id": "alpaca-1",
    "source": "alpaca",
    "system": "",
    "messages": [
        {"role": "user", "content": "Translate into French.\nThe weather is nice today."},
        {"role": "assistant", "content": "Il fait beau aujourd'hui."},
    ],
    "meta": {"instruction": "Translate into French.", "input": "The weather is nice today."},
}
RECORDS = [MULTI, ZH, ALPACA]


def text(segs) -> str:
    return "".join(t for t, _ in segs)


def trainable(segs) -> list[str]:
    return [t for t, tr in segs if tr]


def with_messages(rec: dict, messages: list[dict], **kw) -> dict:
    return {**rec, "messages": messages, **kw}


# ---------------------------------------------------------------------------------------
# Choosing a template
# ---------------------------------------------------------------------------------------


def test_resolve_template(chatml_tok, plain_tok, llama_tok):
    assert chatml_tok.chat_template == CHATML_TEMPLATE
    assert resolve_template("auto", chatml_tok) == "chatml"  # same text, no jinja
    assert resolve_template("auto", plain_tok) == "chatml"
    assert resolve_template("auto", llama_tok) == "tokenizer"
    assert resolve_template("tokenizer", chatml_tok) == "tokenizer"
    for name in BUILTIN:
        assert resolve_template(name, llama_tok) == name
    with pytest.raises(ValueError, match="has no chat template"):
        resolve_template("tokenizer", plain_tok)
    with pytest.raises(ValueError, match="did you mean 'chatml'"):
        resolve_template("chatlm", plain_tok)


# ---------------------------------------------------------------------------------------
# Built-in templates: the exact text
# ---------------------------------------------------------------------------------------

SMALL = {
    "id": "small-1",
    "source": "s",
    "system": "Be brief.",
    "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome."},
    ],
    "meta": {},
}

EXPECTED_TEXT = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>tool\nsunny<|im_end|>\n"
        "<|im_start|>assistant\nSunny.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\nWelcome.<|im_end|>\n"
    ),
    "alpaca": (
        "Be brief.\n\n"
        "### Instruction:\nWeather?\n\n"
        "### Tool result:\nsunny\n\n"
        "### Response:\nSunny.<|endoftext|>\n\n"
        "### Instruction:\nThanks\n\n"
        "### Response:\nWelcome.<|endoftext|>"
    ),
    "human_assistant": (
        "Be brief.\n\n"
        "Human: Weather?\n"
        "Tool: sunny\n"
        "Assistant: Sunny.<|endoftext|>\n"
        "Human: Thanks\n"
        "Assistant: Welcome.<|endoftext|>"
    ),
}
EXPECTED_TRAINABLE = {
    "chatml": ["Sunny.<|im_end|>", "Welcome.<|im_end|>"],
    "alpaca": ["Sunny.<|endoftext|>", "Welcome.<|endoftext|>"],
    "human_assistant": [" Sunny.<|endoftext|>", " Welcome.<|endoftext|>"],
}


@pytest.mark.parametrize("template", BUILTIN)
def test_builtin_text_and_trainable_segments(template, chatml_tok):
    segs = render_segments(SMALL, template, chatml_tok)
    assert text(segs) == EXPECTED_TEXT[template]
    assert trainable(segs) == EXPECTED_TRAINABLE[template]


def test_builtin_chatml_is_the_jinja_chatml(chatml_tok):
    for rec in RECORDS + [SMALL]:
        fast = render_segments(rec, "chatml", chatml_tok)
        jinja = render_segments(rec, "tokenizer", chatml_tok)
        assert fast == jinja
        full = ([{"role": "system", "content": rec["system"]}] if rec["system"] else [])
        full += rec["messages"]
        assert text(fast) == chatml_tok.apply_chat_template(full, tokenize=False)


def test_leading_system_message_is_the_system_prompt(chatml_tok, llama_tok):
    moved = with_messages(MULTI, [{"role": "system", "content": MULTI["system"]}]
                          + MULTI["messages"], system="")
    for tok in (chatml_tok, llama_tok):
        for template in (*BUILTIN, "tokenizer"):
            assert render_segments(moved, template, tok) == render_segments(MULTI, template, tok)
    # record["system"] wins over a leading system message
    both = with_messages(MULTI, [{"role": "system", "content": "ignored"}] + MULTI["messages"])
    assert "ignored" not in text(render_segments(both, "chatml", chatml_tok))


def test_alpaca_with_and_without_input(chatml_tok):
    rec = ALPACA
    with_input = text(render_segments(rec, "alpaca", chatml_tok))
    assert with_input == (
        ALPACA_PREAMBLE_WITH_INPUT + "\n\n"
        "### Instruction:\nTranslate into French.\n\n"
        "### Input:\nThe weather is nice today.\n\n"
        "### Response:\nIl fait beau aujourd'hui.<|endoftext|>"
    )
    no_input = {**rec, "meta": {"instruction": "Translate into French.", "input": ""}}
    assert text(render_segments(no_input, "alpaca", chatml_tok)) == (
        ALPACA_PREAMBLE + "\n\n"
        "### Instruction:\nTranslate into French.\nThe weather is nice today.\n\n"
        "### Response:\nIl fait beau aujourd'hui.<|endoftext|>"
    )
    # meta that no longer describes the message is not trusted
    stale = {**rec, "meta": {"instruction": "Something else.", "input": "The weather is nice today."}}
    assert "### Input:" not in text(render_segments(stale, "alpaca", chatml_tok))
    # a system prompt replaces the preamble
    sys_rec = {**rec, "system": "Translate well."}
    assert text(render_segments(sys_rec, "alpaca", chatml_tok)).startswith(
        "Translate well.\n\n### Instruction:"
    )


def test_builtins_write_bos_for_tokenizers_that_add_it(chatml_tok, llama_tok):
    for template in BUILTIN:
        assert text(render_segments(ZH, template, llama_tok)).startswith("<s>")
        assert not text(render_segments(ZH, template, chatml_tok)).startswith("<|endoftext|>")


def test_chatml_appends_eos_when_im_end_is_not_a_token(llama_tok):
    segs = render_segments(ZH, "chatml", llama_tok)
    assert trainable(segs) == ["中国的首都是北京。<|im_end|></s>"]


# ---------------------------------------------------------------------------------------
# The tokenizer's own template
# ---------------------------------------------------------------------------------------


def test_tokenizer_template_segments(llama_tok):
    segs = render_segments(MULTI, "tokenizer", llama_tok)
    full = [{"role": "system", "content": MULTI["system"]}] + MULTI["messages"]
    assert text(segs) == llama_tok.apply_chat_template(full, tokenize=False)
    assert text(segs).startswith("<s><<SYS>>\n")
    replies = [m["content"] for m in MULTI["messages"] if m["role"] == "assistant"]
    assert trainable(segs) == [f" {r} </s>" for r in replies]


def test_template_without_end_marker_gets_eos(no_marker_tok):
    segs = render_segments(MULTI, "tokenizer", no_marker_tok)
    replies = [m["content"] for m in MULTI["messages"] if m["role"] == "assistant"]
    assert trainable(segs) == [r + "<|endoftext|>" for r in replies]
    # the newline after each reply is kept, untrainable, after the inserted eos
    assert "assistant: Paris.<|endoftext|>\nuser: And the weather there?\n" in text(segs)


def test_template_that_rewrites_earlier_text_is_rejected(make_llama_tokenizer):
    tok = make_llama_tokenizer(REWRITING)
    with pytest.raises(TemplateError, match="llama-style.*rewrites earlier text"):
        render_segments(MULTI, "tokenizer", tok)


def test_template_errors_on_a_record_name_the_tokenizer(make_llama_tokenizer):
    tok = make_llama_tokenizer(
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools here') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="llama-style.*no tools here") as e:
        render_segments(MULTI, "tokenizer", tok)
    assert not isinstance(e.value, TemplateError)  # a bad record, not a bad template


def test_bad_records_are_named(chatml_tok):
    bad = with_messages(MULTI, [{"role": "bot", "content": "hi"}])
    with pytest.raises(ValueError, match=r"multi-1: messages\[0\].role='bot'"):
        render_segments(bad, "chatml", chatml_tok)
    with pytest.raises(ValueError, match="non-empty"):
        render_segments(with_messages(MULTI, []), "chatml", chatml_tok)
    with pytest.raises(ValueError, match=r"messages\[1\].content must be a string"):
        render_segments(with_messages(MULTI, [MULTI["messages"][0],
                                              {"role": "assistant", "content": None}]),
                        "alpaca", chatml_tok)


def test_messages_from_columnar_readers(chatml_tok):
    import numpy as np

    arr = with_messages(MULTI, np.array(MULTI["messages"], dtype=object))
    assert render_segments(arr, "chatml", chatml_tok) == render_segments(MULTI, "chatml", chatml_tok)
    with pytest.raises(ValueError, match="messages must be a list, got str"):
        render_segments(with_messages(MULTI, "hello"), "chatml", chatml_tok)


def test_missing_eos_is_a_template_error(plain_tok, make_llama_tokenizer):
    tok = make_llama_tokenizer(None)
    tok.eos_token = None
    for template in ("alpaca", "human_assistant", "chatml"):  # chatml: <|im_end|> is no token
        with pytest.raises(TemplateError, match="eos"):
            render_segments(ZH, template, tok)
    # with <|im_end|> as a token, chatml needs no eos
    assert render_segments(ZH, "chatml", plain_tok)


# ---------------------------------------------------------------------------------------
# Generation prompts agree with training text
# ---------------------------------------------------------------------------------------

COMBOS = [
    ("chatml", "chatml_tok"), ("alpaca", "chatml_tok"), ("human_assistant", "chatml_tok"),
    ("tokenizer", "chatml_tok"), ("auto", "plain_tok"),
    ("chatml", "llama_tok"), ("alpaca", "llama_tok"), ("human_assistant", "llama_tok"),
    ("tokenizer", "llama_tok"), ("auto", "llama_tok"),
]


@pytest.mark.parametrize("template,tok_name", COMBOS)
def test_render_prompt_matches_training_prefix(template, tok_name, request):
    tok = request.getfixturevalue(tok_name)
    for rec in RECORDS + [SMALL]:
        msgs = rec["messages"]
        for j, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            segs = render_segments(with_messages(rec, msgs[: j + 1]), template, tok)
            last = max(i for i, (_, tr) in enumerate(segs) if tr)
            prefix = "".join(t for t, _ in segs[:last])
            prompt = render_prompt(msgs[:j], tok, template, system=rec["system"],
                                   meta=rec["meta"])
            assert prompt == prefix
            # and the same prefix inside the whole conversation
            full = text(render_segments(rec, template, tok))
            assert full.startswith(prefix + segs[last][0])


def test_render_prompt_ends_with_generation_prompt(chatml_tok, llama_tok):
    msgs = [{"role": "user", "content": "Hi"}]
    assert render_prompt(msgs, chatml_tok).endswith("<|im_start|>assistant\n")
    assert render_prompt(msgs, chatml_tok, "alpaca").endswith("### Response:\n")
    assert render_prompt(msgs, chatml_tok, "human_assistant").endswith("Human: Hi\nAssistant:")
    assert render_prompt(msgs, llama_tok) == "<s>[INST] Hi [/INST]"
    # a leading system message in the history works as the system argument does
    sys_msgs = [{"role": "system", "content": "Be kind."}] + msgs
    assert render_prompt(sys_msgs, chatml_tok) == render_prompt(msgs, chatml_tok, system="Be kind.")


# ---------------------------------------------------------------------------------------
# Reasoning: a think block before the reply
# ---------------------------------------------------------------------------------------

THINKING = with_messages(SMALL, [
    {"role": "user", "content": "Weather?"},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "Sunny.", "reasoning": "The tool said sunny."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "Welcome."},
])


@pytest.mark.parametrize("template", BUILTIN)
def test_reasoning_is_a_trained_think_block_before_the_reply(template, chatml_tok):
    segs = render_segments(THINKING, template, chatml_tok)
    block = "<think>\nThe tool said sunny.\n</think>\n\n"
    lead = " " if template == "human_assistant" else ""
    first = EXPECTED_TRAINABLE[template][0]
    assert trainable(segs) == [lead + block + first[len(lead):],
                               EXPECTED_TRAINABLE[template][1]]
    assert text(segs) == EXPECTED_TEXT[template].replace(first, lead + block + first[len(lead):])
    # Without reasoning the text is byte for byte what it was.
    assert text(render_segments(SMALL, template, chatml_tok)) == EXPECTED_TEXT[template]


def test_reasoning_through_the_tokenizer_template_matches_chatml(chatml_tok):
    assert render_segments(THINKING, "tokenizer", chatml_tok) == render_segments(
        THINKING, "chatml", chatml_tok)
