"""The OpenAI HTTP protocol, with no Ray and no model in it: request validation, error
bodies, the response and stream-chunk shapes.

Everything a request can get wrong is caught here and raised as `RequestError` with the
HTTP status and the name of the offending parameter, so the server answers 4xx with a
message and never 500 for a bad request. How the validated parameters decode is
sampling.py's.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ift.serve.sampling import SamplingParams

ROLES = ("system", "user", "assistant", "tool")
MAX_STOP = 4
MAX_STOP_LEN = 256


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP code, `param` the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape, which the official client turns into its exceptions."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def internal_error(what: str) -> str:
    """The client's message for an unexpected failure (call it in an `except` block): a new
    request id, under which the failure and its traceback are logged on the server. It
    never names the exception, so no 5xx body carries internals."""
    rid = new_id("req")
    logging.getLogger("ift.serve").exception("%s (request id %s)", what, rid)
    return f"internal server error (request id {rid}); the server log has the details"


def _number(body: dict, key: str, default: float, lo: float, hi: float, *,
            lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(f"{key} must be a number, got {v!r}", key)
    if (v <= lo if lo_open else v < lo) or v > hi:
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        raise RequestError(f"{key}={v} is out of range {lo_s}, {hi}]", key)
    return float(v)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise RequestError(f"{key} must be an integer, got {v!r}", key)
    if not lo <= v <= hi:
        raise RequestError(f"{key}={v} is out of range [{lo}, {hi}]", key)
    return v


def parse_sampling(body: dict[str, Any], max_tokens_limit: int) -> SamplingParams:
    """Sampling parameters from an OpenAI request body, range-checked.

    max_tokens (or max_completion_tokens) defaults to the server cap and may not exceed
    it. top_k, repetition_penalty and no_repeat_ngram_size are accepted as extensions.
    """
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, max_tokens_limit, 1, 2**31)
    assert max_tokens is not None
    if max_tokens > max_tokens_limit:
        raise RequestError(
            f"{key}={max_tokens} exceeds this server's limit of {max_tokens_limit}", key)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k", 0, -1, 1_000_000) or 0
    if top_k < 0:  # -1 means "off" in vLLM's API
        top_k = 0
    rep = _number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)
    ngram = _integer(body, "no_repeat_ngram_size", 0, 0, 64) or 0
    seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise RequestError(f"stop must be a string or a list of strings, got {stop!r}", "stop")
    if len(stops) > MAX_STOP:
        raise RequestError(f"stop has {len(stops)} strings; at most {MAX_STOP} allowed", "stop")
    for s in stops:
        if not s or len(s) > MAX_STOP_LEN:
            raise RequestError(
                f"stop strings must be 1 to {MAX_STOP_LEN} characters, got {s!r}", "stop")
        _unicode_text(s, "stop")
    for k in ("presence_penalty", "frequency_penalty"):
        v = _number(body, k, 0.0, -2.0, 2.0)
        if v != 0.0:
            raise RequestError(f"{k} is not supported (use repetition_penalty)", k)
    n = _integer(body, "n", 1, 1, 1_000_000)
    if n != 1:
        raise RequestError(f"n={n}: only n=1 is supported", "n")
    for k in ("logprobs", "echo"):
        v = body.get(k)
        if v not in (None, False, 0):
            raise RequestError(f"{k} is not supported", k)
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        stop=stops, repetition_penalty=rep, no_repeat_ngram_size=ngram,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    """A validated chat or completion request."""

    kind: str
    """chat or completion."""
    model: str
    """The model id asked for (base, adapter or merged model)."""
    params: SamplingParams
    """Decoding parameters."""
    messages: list[dict[str, str]] = field(default_factory=list)
    """chat: the conversation so far."""
    prompt: str = ""
    """completion: the raw prompt text."""
    stream: bool = False
    """Send server-sent events."""
    include_usage: bool = False
    """stream: send a last chunk with token counts."""

    def for_model(self, adapter: str | None = None, adapter_path: str | None = None
                  ) -> ModelRequest:
        """What a model replica runs for this request, once its model id is resolved."""
        return ModelRequest(self.kind, self.model, self.params, self.messages, self.prompt,
                            adapter, adapter_path)


@dataclass(frozen=True)
class ModelRequest:
    """A request resolved once against the server's models: the ingress builds it from the
    HTTP body and the catalog, and the replica that answers (reached directly or through a
    handle) runs it as it is, with no second look-up of the model id."""

    kind: str
    """chat or completion."""
    model: str
    """The model id as asked (base, adapter or merged model)."""
    params: SamplingParams
    """Decoding parameters."""
    messages: list[dict[str, str]]
    """chat: the conversation so far."""
    prompt: str
    """completion: the raw prompt text."""
    adapter: str | None = None
    """The adapter to apply (its canonical id), or None for a model as it is."""
    adapter_path: str | None = None
    """Where the adapter lives (local or s3://)."""


def _require_dict(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _model(body: dict) -> str:
    if "model" not in body:
        raise RequestError("missing required field 'model'", "model")
    m = body["model"]
    if not isinstance(m, str) or not m.strip():
        raise RequestError(f"model must be a non-empty string, got {m!r}", "model")
    return _unicode_text(m, "model")


def _stream(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise RequestError("stream_options must be an object", "stream_options")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise RequestError("stream_options.include_usage must be true or false",
                               "stream_options.include_usage")
    return stream, include_usage


def _unicode_text(text: str, param: str) -> str:
    """`text` when it is valid Unicode; a lone surrogate ("\\ud800" in the JSON) cannot be
    encoded, tokenized or logged, so it is a 400 naming where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{param} holds a lone surrogate (U+{ord(text[e.start]):04X}) at "
                           f"character {e.start}; send valid Unicode text", param) from None
    return text


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return _unicode_text(content, f"{where}.content")
    if isinstance(content, list):  # [{type: text, text: ...}] parts
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise RequestError(
                    f"{where}.content[{j}]: only text parts ({{type: text, text: ...}}) "
                    "are supported", f"{where}.content")
            out.append(_unicode_text(part["text"], f"{where}.content[{j}].text"))
        return "".join(out)
    raise RequestError(f"{where}.content must be a string or a list of text parts",
                       f"{where}.content")


def parse_chat_request(body: Any, max_tokens_limit: int) -> GenerationRequest:
    """A /v1/chat/completions body, validated."""
    body = _require_dict(body)
    model = _model(body)
    if "messages" not in body:
        raise RequestError("missing required field 'messages'", "messages")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages must be a non-empty list", "messages")
    messages = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with role and content", "messages")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise RequestError(
                f"{where}.role={role!r} is not allowed (allowed: {', '.join(ROLES)})",
                f"{where}.role")
        if "content" not in m or m["content"] is None:
            raise RequestError(f"{where} has no content", f"{where}.content")
        messages.append({"role": role, "content": _content(m["content"], where)})
    if messages[-1]["role"] == "assistant":
        raise RequestError("messages: the last message must be from the user, system or tool, not the assistant", "messages")
    if all(m["role"] == "system" for m in messages):
        raise RequestError("messages need at least one user turn", "messages")
    params = parse_sampling(body, max_tokens_limit)
    stream, include_usage = _stream(body)
    return GenerationRequest(kind="chat", model=model, params=params, messages=messages,
                             stream=stream, include_usage=include_usage)


def parse_completion_request(body: Any, max_tokens_limit: int) -> GenerationRequest:
    """A /v1/completions body, validated (one text prompt)."""
    body = _require_dict(body)
    model = _model(body)
    if "prompt" not in body:
        raise RequestError("missing required field 'prompt'", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string (or a list of one string)", "prompt")
    if not prompt:
        raise RequestError("prompt must not be empty", "prompt")
    _unicode_text(prompt, "prompt")
    if body.get("suffix"):
        raise RequestError("suffix is not supported", "suffix")
    params = parse_sampling(body, max_tokens_limit)
    stream, include_usage = _stream(body)
    return GenerationRequest(kind="completion", model=model, params=params, prompt=prompt,
                             stream=stream, include_usage=include_usage)


# ---------------------------------------------------------------------------------------
# Response shapes
# ---------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": None}]}


def completion_response(rid: str, model: str, text: str, finish_reason: str,
                        prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, created: int, text: str,
                     finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason,
                         "logprobs": None}]}


def usage_chunk(rid: str, model: str, created: int, kind: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"
