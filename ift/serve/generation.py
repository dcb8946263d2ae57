"""Generation helpers with no Ray in them: request validation, sampling, stop strings,
incremental detokenization and the OpenAI response shapes.

Everything a request can get wrong is caught here and raised as `RequestError` with the
HTTP status and the name of the offending parameter, so the server answers 4xx with a
message and never 500 for a bad request.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

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


# ---------------------------------------------------------------------------------------
# Sampling parameters
# ---------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """How one request is decoded. temperature 0 means greedy."""

    max_tokens: int = 16
    """Tokens to generate at most."""
    temperature: float = 1.0
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the text stops before them."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the prompt or output (CTRL-style penalty)."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this size (0: off)."""
    seed: int | None = None
    """Seed for sampling; the same seed and request give the same output."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        return cls(**d)


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d


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
# Decoding one step
# ---------------------------------------------------------------------------------------


class TokenChooser:
    """Picks the next token of one sequence: penalties, then temperature, top-k, top-p.

    The processors are transformers' own, applied in the order `generate` applies them,
    so greedy decoding here equals `model.generate(do_sample=False)` token for token.
    """

    def __init__(self, params: SamplingParams):
        import torch
        from transformers import (
            NoRepeatNGramLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.params = params
        self.processors = []
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.no_repeat_ngram_size > 0:
            self.processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
        self.warpers = []
        if not params.greedy:
            if params.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                self.warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(params.top_p))
        self.plain_greedy = params.greedy and not self.processors
        """Greedy with nothing to apply: the batch-wide argmax is this row's choice."""
        self.needs_history = bool(self.processors)
        """Whether choose() reads the token history (penalties do, warpers do not)."""
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator()
            seed = params.seed if params.seed is not None else int.from_bytes(
                uuid.uuid4().bytes[:8], "little")
            self.generator.manual_seed(seed % (2**63))

    def choose(self, ids, scores) -> int:
        """ids: [1, L] long tensor of prompt + generated tokens; scores: [1, V] logits."""
        import torch

        for p in self.processors:
            scores = p(ids, scores)
        if self.params.greedy:
            return int(torch.argmax(scores, dim=-1)[0])
        processed = scores
        for w in self.warpers:
            scores = w(ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        if not bool(torch.isfinite(probs).all()):
            # A temperature or penalty so extreme that logits overflow: the distribution's
            # limit puts all mass on the highest logit.
            return int(torch.argmax(torch.nan_to_num(processed.float(), nan=float("-inf")),
                                    dim=-1)[0])
        return int(torch.multinomial(probs[0], 1, generator=self.generator)[0])


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's characters for bytes: printable Latin-1 bytes stand for themselves,
    the other bytes, in order, for the characters from U+0100 on."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in keep:
            out[chr(0x100 + extra)] = b
            extra += 1
    return out


_BYTE_ALPHABET = _byte_alphabet()


class TokenBytes:
    """The UTF-8 bytes each token stands for, as far as a character split across tokens
    needs: byte-level BPE tokens map through the byte alphabet, sentencepiece's byte
    fallback tokens (`<0xE4>`) are their byte, special tokens (skipped in decoding) are
    empty, any other token is its text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def __call__(self, ids: list[int]) -> bytes:
        out = bytearray()
        for i, tok in zip(ids, self.tokenizer.convert_ids_to_tokens(ids)):
            if i in self.special or tok is None:
                continue
            if self.byte_level and all(c in _BYTE_ALPHABET for c in tok):
                out.extend(_BYTE_ALPHABET[c] for c in tok)
            elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                out.append(int(tok[3:5], 16))
            else:
                out.extend(tok.replace("\u2581", " ").encode("utf-8"))
        return bytes(out)

    def incomplete_tail(self, ids: list[int]) -> bool:
        """Whether the tokens end inside a UTF-8 character that later bytes may complete
        (a character is at most 4 bytes and a token at least 1, so the last 4 tell)."""
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        dec.decode(self(ids[-4:]), final=False)
        return bool(dec.getstate()[0])


class TextStream:
    """Turns generated token ids into text deltas, holding back what a stop string may begin.

    `push(token)` returns the text that is now final; `stopped` says a stop string was seen
    (the text is cut before it). While the tokens end inside a character (its UTF-8 bytes
    split across tokens, decoded as U+FFFD), nothing is released: the character comes out
    whole once its last byte arrives. Bytes that can never form a character are released
    as U+FFFD.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, *, deltas: bool = True):
        self.tokenizer = tokenizer
        self.bytes = TokenBytes(tokenizer)
        self.stop = [s for s in (stop or []) if s]
        # Nobody reads the deltas and no stop string is watched: decode once, in flush()
        # (decoding the whole text at every token costs about 1 ms per 32 tokens).
        self.lazy = not deltas and not self.stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.stopped = False
        self.text = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        if self.lazy:
            return ""
        text = self._decode()
        if text.endswith("\ufffd") and self.bytes.incomplete_tail(self.ids):
            return ""
        self.text = text
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at != -1:
                self.stopped = True
                self.text = text[:at]
                out = self.text[self.sent:]
                self.sent = len(self.text)
                return out
        # Hold back a tail that is a prefix of some stop string.
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = max(self.sent, len(text) - hold)
        out = text[self.sent:end]
        self.sent = end
        return out

    def _whole_characters(self) -> str:
        """The decoded text without a character cut at the end (the tokens stop inside
        its UTF-8 bytes): the tokens up to the last character boundary, decoded, then the
        whole characters of the tokens after it."""
        text = self._decode()
        if not (text.endswith("\ufffd") and self.bytes.incomplete_tail(self.ids)):
            return text
        k = len(self.ids) - 1
        while k > 0 and self.bytes.incomplete_tail(self.ids[:k]):
            k -= 1
        tail = codecs.getincrementaldecoder("utf-8")("replace")
        return (self.tokenizer.decode(self.ids[:k], skip_special_tokens=True)
                + tail.decode(self.bytes(self.ids[k:]), final=False))

    def flush(self) -> str:
        """The held-back text at the end of generation; a character cut at the end is
        dropped, as push holds it back."""
        if self.stopped:
            return ""
        text = self._whole_characters()
        for s in self.stop:  # a stop string completed by the held-back tail
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at != -1:
                text = text[:at]
                self.stopped = True
        self.text = text
        out = text[self.sent:]
        self.sent = len(text)
        return out


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
