"""The request schemas of /openapi.json agree with the validation the routes run
(protocol.py): what a schema allows at its bounds is accepted, what it refuses just past
them is a 400 naming the field, and the examples it shows parse."""

from __future__ import annotations

import pytest

from ift.serve import openapi
from ift.serve.protocol import (
    MAX_STOP,
    ROLES,
    RequestError,
    parse_chat_request,
    parse_completion_request,
)

jsonschema = pytest.importorskip("jsonschema")

LIMIT = 1000  # the server's max_tokens_limit in these requests
USER = [{"role": "user", "content": "hi"}]
SAMPLING = [k for k in openapi.CHAT_REQUEST["properties"] if k not in ("model", "messages")]


def _chat(**kw) -> dict:
    return {"model": "base", "messages": USER, **kw}


def _valid(schema: dict, body: dict) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(body)


def test_the_schemas_are_valid_json_schema_and_share_the_sampling_fields():
    for schema in (openapi.CHAT_REQUEST, openapi.COMPLETION_REQUEST):
        jsonschema.Draft202012Validator.check_schema(schema)
    chat = openapi.CHAT_REQUEST["properties"]
    completion = openapi.COMPLETION_REQUEST["properties"]
    assert {k: chat[k] for k in SAMPLING} == {k: completion[k] for k in SAMPLING}
    assert set(completion) - set(SAMPLING) == {"model", "prompt"}
    roles = chat["messages"]["items"]["properties"]["role"]["enum"]
    assert set(roles) == set(ROLES) | {"developer"}  # developer is read as system
    assert chat["stop"]["oneOf"][1]["maxItems"] == MAX_STOP


def test_request_body_is_a_required_json_body():
    assert openapi.request_body({"type": "object"}) == {"requestBody": {
        "required": True, "content": {"application/json": {"schema": {"type": "object"}}}}}


def _bound_cases() -> list[tuple[str, object, bool]]:
    """(field, value, schema allows it) at and just past every numeric bound of the schema."""
    cases = []
    for key in SAMPLING:
        spec = openapi.CHAT_REQUEST["properties"][key]
        if spec.get("type") not in ("integer", "number"):
            continue
        step = 1 if spec["type"] == "integer" else 0.25
        if "minimum" in spec:
            cases += [(key, spec["minimum"], True), (key, spec["minimum"] - step, False)]
        if "exclusiveMinimum" in spec:
            cases += [(key, spec["exclusiveMinimum"], False),
                      (key, spec["exclusiveMinimum"] + step, True)]
        if "maximum" in spec:
            cases += [(key, spec["maximum"], True), (key, spec["maximum"] + step, False)]
        if "enum" in spec:
            cases += [(key, spec["enum"][0], True), (key, spec["enum"][-1] + 1, False)]
    return cases


@pytest.mark.parametrize("key,value,allowed", _bound_cases())
def test_numeric_bounds_of_the_schema_are_the_servers(key, value, allowed):
    body = _chat(**{key: value})
    assert _valid(openapi.CHAT_REQUEST, body) is allowed
    if allowed:
        parse_chat_request(body, LIMIT)
        parse_completion_request({"model": "base", "prompt": "x", key: value}, LIMIT)
    else:
        with pytest.raises(RequestError) as e:
            parse_chat_request(body, LIMIT)
        assert (e.value.status, e.value.param) == (400, key)


def test_bounds_cover_every_numeric_field():
    numeric = {k for k in SAMPLING
               if openapi.CHAT_REQUEST["properties"][k].get("type") in ("integer", "number")}
    bounded = {k for k, _v, _a in _bound_cases()}
    assert numeric - bounded == {"seed"}  # any integer (checked against int64 per request)


ACCEPTED = [
    _chat(),
    _chat(messages=[{"role": "developer", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                 {"type": "text", "text": "b"}]}]),
    _chat(stop="x", stream=True, stream_options={"include_usage": True}, seed=-7),
    _chat(stop=["a", "b", "c", "d"], max_completion_tokens=LIMIT),
    _chat(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                    {"role": "tool", "content": "{}"}]),
]


@pytest.mark.parametrize("body", ACCEPTED)
def test_bodies_the_schema_allows_are_accepted(body):
    assert _valid(openapi.CHAT_REQUEST, body)
    assert parse_chat_request(body, LIMIT).model == "base"


REFUSED = [
    ({"messages": USER}, "model"),
    ({"model": "", "messages": USER}, "model"),
    ({"model": "base"}, "messages"),
    (_chat(messages=[]), "messages"),
    (_chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
    (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]),
     "messages[0].content"),
    (_chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (_chat(stop=""), "stop"),
    (_chat(stream="yes"), "stream"),
    (_chat(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (_chat(seed=1.5), "seed"),
]


@pytest.mark.parametrize("body,param", REFUSED)
def test_bodies_the_schema_refuses_are_a_400_naming_the_field(body, param):
    assert not _valid(openapi.CHAT_REQUEST, body)
    with pytest.raises(RequestError) as e:
        parse_chat_request(body, LIMIT)
    assert (e.value.status, e.value.param) == (400, param)


def test_completion_prompt_is_one_non_empty_string():
    schema = openapi.COMPLETION_REQUEST
    for prompt in ("Once", ["Once"]):
        body = {"model": "base", "prompt": prompt}
        assert _valid(schema, body)
        assert parse_completion_request(body, LIMIT).prompt == "Once"
    for prompt in ("", [], ["a", "b"], [""], 5):
        body = {"model": "base", "prompt": prompt}
        assert not _valid(schema, body)
        with pytest.raises(RequestError) as e:
            parse_completion_request(body, LIMIT)
        assert e.value.param == "prompt"


def test_the_schema_examples_parse():
    props = openapi.CHAT_REQUEST["properties"]
    chat = {"model": props["model"]["examples"][0], "messages": props["messages"]["examples"][0]}
    assert _valid(openapi.CHAT_REQUEST, chat)
    assert parse_chat_request(chat, LIMIT).messages == [{"role": "user", "content": "Hello"}]
    prompt = openapi.COMPLETION_REQUEST["properties"]["prompt"]["examples"][0]
    completion = {"model": "base", "prompt": prompt}
    assert _valid(openapi.COMPLETION_REQUEST, completion)
    assert parse_completion_request(completion, LIMIT).prompt == "Once upon a time"
