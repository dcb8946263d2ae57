"""Request validation and the OpenAI error shapes (ift.serve.protocol)."""

from __future__ import annotations

import json

import pytest

from ift.serve.protocol import (
    RequestError,
    parse_chat_request,
    parse_completion_request,
    parse_sampling,
)

USER = [{"role": "user", "content": "hi"}]

# (body, the parameter the 400 must name)
BAD_CHAT = [
    ([1, 2], None),
    ("text", None),
    ({"messages": USER}, "model"),
    ({"model": "", "messages": USER}, "model"),
    ({"model": 3, "messages": USER}, "model"),
    ({"model": "base"}, "messages"),
    ({"model": "base", "messages": []}, "messages"),
    ({"model": "base", "messages": "hi"}, "messages"),
    ({"model": "base", "messages": ["hi"]}, "messages"),
    ({"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "base", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": "base", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({"model": "base", "messages": USER, "temperature": -0.1}, "temperature"),
    ({"model": "base", "messages": USER, "temperature": 2.5}, "temperature"),
    ({"model": "base", "messages": USER, "temperature": "hot"}, "temperature"),
    ({"model": "base", "messages": USER, "top_p": 0}, "top_p"),
    ({"model": "base", "messages": USER, "top_p": 1.5}, "top_p"),
    ({"model": "base", "messages": USER, "top_k": -5}, "top_k"),
    ({"model": "base", "messages": USER, "top_k": 1.5}, "top_k"),
    ({"model": "base", "messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"model": "base", "messages": USER, "max_tokens": 10_000}, "max_tokens"),
    ({"model": "base", "messages": USER, "max_tokens": True}, "max_tokens"),
    ({"model": "base", "messages": USER, "stop": 5}, "stop"),
    ({"model": "base", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "base", "messages": USER, "stop": [""]}, "stop"),
    ({"model": "base", "messages": USER, "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": "base", "messages": USER, "no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ({"model": "base", "messages": USER, "seed": "x"}, "seed"),
    ({"model": "base", "messages": USER, "stream": "yes"}, "stream"),
    ({"model": "base", "messages": USER, "n": 2}, "n"),
    ({"model": "base", "messages": USER, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    ({"model": "base", "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT)
def test_bad_chat_requests_are_400_naming_the_parameter(body, param):
    with pytest.raises(RequestError) as e:
        parse_chat_request(body, max_tokens_limit=64)
    assert e.value.status == 400
    assert e.value.param == param
    assert e.value.message
    if param:
        assert param.split("[")[0].split(".")[0] in e.value.message or param in e.value.message


def test_good_chat_request_parses_every_parameter():
    req = parse_chat_request({
        "model": "base", "messages": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "temperature": 0, "top_p": 0.9, "top_k": 5, "max_tokens": 7, "stop": "\n",
        "repetition_penalty": 1.2, "no_repeat_ngram_size": 3, "seed": 11, "stream": True,
        "stream_options": {"include_usage": True}, "user": "someone"}, max_tokens_limit=64)
    p = req.params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop) == (0.0, 0.9, 5, 7, ["\n"])
    assert (p.repetition_penalty, p.no_repeat_ngram_size, p.seed) == (1.2, 3, 11)
    assert p.greedy and req.stream and req.include_usage
    assert req.messages[1] == {"role": "user", "content": "hi"}


def test_max_tokens_defaults_to_the_server_cap():
    assert parse_sampling({}, 33).max_tokens == 33
    assert parse_sampling({"max_completion_tokens": 5}, 33).max_tokens == 5


@pytest.mark.parametrize("body,param", [
    ({"model": "base"}, "prompt"),
    ({"model": "base", "prompt": ""}, "prompt"),
    ({"model": "base", "prompt": [1, 2, 3]}, "prompt"),
    ({"model": "base", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "base", "prompt": "x", "suffix": "y"}, "suffix"),
])
def test_bad_completion_requests(body, param):
    with pytest.raises(RequestError) as e:
        parse_completion_request(body, max_tokens_limit=64)
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "messages": [{"role": "user", "content": "\ud800 hi"}]},
     "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "ok"},
                                 {"role": "assistant", "content": "fine"},
                                 {"role": "user", "content": [{"type": "text",
                                                               "text": "a\udfffb"}]}]},
     "messages[2].content[0].text"),
    ({"model": "b\udc80ase", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["\ud83d"]},
     "stop"),
])
def test_lone_surrogates_are_a_400_naming_the_field(body, param):
    with pytest.raises(RequestError) as e:
        parse_chat_request(body, 64)
    assert e.value.status == 400 and e.value.param == param
    assert "lone surrogate" in e.value.message
    json.dumps(e.value.body(), ensure_ascii=False).encode("utf-8")  # the answer is sendable
    with pytest.raises(RequestError) as e:
        parse_completion_request({"model": "m", "prompt": "x\ud800"}, 64)
    assert e.value.param == "prompt"
    # A surrogate pair written as two escapes is one valid character.
    ok = parse_chat_request({"model": "m", "messages": [
        {"role": "user", "content": json.loads('"\\ud83d\\ude00"')}]}, 64)
    assert ok.messages[0]["content"] == "\U0001F600"
