"""Quality checks: validation reasons, script-based language, {{placeholder}} substitution."""

from __future__ import annotations

import pytest

from ift.data.quality import detect_lang, substitute_placeholders, validate
from ift.data.record import make_record


def rec(*turns, system=""):
    return make_record(id="r", source="s", system=system,
                       messages=[{"role": r, "content": c} for r, c in turns])


def test_good_conversations_pass():
    assert validate(rec(("user", "hi"), ("assistant", "hello"))) is None
    assert validate(rec(("system", "be kind"), ("user", "hi"), ("assistant", "hello"))) is None
    assert validate(rec(("user", "weather?"), ("assistant", '{"name": "w"}'), ("tool", "sunny"),
                        ("assistant", "It is sunny."), ("user", "thanks"),
                        ("assistant", "You're welcome."))) is None
    # Parallel tool calls: several results in a row.
    assert validate(rec(("user", "a and b"), ("assistant", "[calls]"), ("tool", "A"),
                        ("tool", "B"), ("assistant", "A and B"))) is None


@pytest.mark.parametrize(
    "turns, reason",
    [
        ((), "no messages"),
        ((("user", "hi"), ("bot", "x")),
         "turn 2: unknown role 'bot' (expected one of system, user, assistant, tool)"),
        ((("user", "hi"), ("assistant", "")), "turn 2 (assistant): empty content"),
        ((("user", " \n\t"), ("assistant", "x")), "turn 1 (user): empty content"),
        ((("assistant", "I start"), ("user", "hm")),
         "turn 1: assistant turn at the start (expected user)"),
        ((("system", "s"), ("assistant", "I start")),
         "turn 2: assistant turn at the start (expected user)"),
        ((("user", "a"), ("user", "b"), ("assistant", "c")),
         "turn 2: user turn after user (expected assistant)"),
        ((("user", "a"), ("assistant", "b"), ("assistant", "c")),
         "turn 3: assistant turn after assistant (expected user or tool)"),
        ((("user", "a"), ("tool", "b"), ("assistant", "c")),
         "turn 2: tool turn after user (expected assistant)"),
        ((("user", "a"), ("assistant", "b"), ("tool", "c"), ("user", "d")),
         "turn 4: user turn after tool (expected assistant or tool)"),
        ((("user", "a"), ("assistant", "b"), ("system", "c"), ("user", "d"), ("assistant", "e")),
         "turn 3: system turn inside the conversation (only the first may be system)"),
        ((("user", "a"),), "conversation ends with a user turn (expected assistant)"),
        ((("user", "a"), ("assistant", "b"), ("tool", "c")),
         "conversation ends with a tool turn (expected assistant)"),
        ((("system", "only a system prompt"),), "no user or assistant turns"),
        ((("user", "ok"), ("assistant", "caf\udce9")), "non-UTF-8 bytes in turn 2"),
        ((("user", "bad \ufffd byte"), ("assistant", "x")), "non-UTF-8 bytes in turn 1"),
    ],
)
def test_validation_reasons(turns, reason):
    assert validate(rec(*turns)) == reason


def test_validation_of_types_and_system():
    r = rec(("user", "a"), ("assistant", "b"))
    r["messages"][1]["content"] = 5
    assert validate(r) == "turn 2 (assistant): content is int, not text"
    r = rec(("user", "a"), ("assistant", "b"))
    r["messages"] = "a, b"
    assert validate(r) == "no messages"
    r = rec(("user", "a"), ("assistant", "b"), system="x\udcff")
    assert validate(r) == "non-UTF-8 bytes in system prompt"
    r = rec(("user", "a"), ("assistant", "b"))
    r["messages"][0] = ["user", "a"]
    assert validate(r) == "turn 1 is list, not a message"


@pytest.mark.parametrize(
    "text, lang",
    [
        ("The quick brown fox jumps over the lazy dog.", "en"),
        ("长城是中国古代修建的军事防御工程。", "zh"),
        ("用Python写一个计算斐波那契数列的函数", "zh"),
        ("The word 你好 means hello in Chinese.", "en"),
        ("これは日本語の文章です。", "other"),
        ("안녕하세요, 만나서 반갑습니다.", "other"),
        ("Привет, как дела?", "other"),
        ("12345 + 678 = ?!", "other"),
        ("", "other"),
    ],
)
def test_detect_lang(text, lang):
    assert detect_lang(text) == lang


def test_substitute_placeholders():
    r = rec(("user", "Who made you, {{ name }}?"),
            ("assistant", "I am {{name}}, built by {{author}}; {{unknown}} stays."),
            system="You are {{name}}.")
    out = substitute_placeholders(r, {"name": "ift", "author": "the ift team"})
    assert out["system"] == "You are ift."
    assert out["messages"][0]["content"] == "Who made you, ift?"
    assert out["messages"][1]["content"] == "I am ift, built by the ift team; {{unknown}} stays."
    # The input record is left as it was.
    assert r["messages"][1]["content"].startswith("I am {{name}}")
    assert substitute_placeholders(r, {}) == r


def test_a_record_language_is_that_of_its_turns_not_its_system_prompt():
    from ift.data.quality import record_lang

    turns = [{"role": "user", "content": "写一首关于秋天的诗"},
             {"role": "assistant", "content": "秋风起，落叶飞。"}]
    assert record_lang("You are a helpful assistant who answers in any language.", turns) == "zh"
    assert record_lang("你是一个乐于助人的助手。", [{"role": "user", "content": "Hi there"},
                                          {"role": "assistant", "content": "Hello!"}]) == "en"
    assert record_lang("你是一个助手", [{"role": "user", "content": ""}]) == "zh"
