"""Chat templates: a conversation record as text segments, each trainable or not.

A template turns the unified record (system prompt + messages) into the exact text the
model reads. Training needs more than the text: it needs to know which characters the
model should learn to produce. So every template renders a list of `(text, trainable)`
segments whose concatenation is the full text; trainable segments are the assistant
replies with their end-of-turn marker (and the tokenizer's eos where the template has no
marker of its own), so the model learns both what to answer and when to stop.

Templates:

- `chatml`: `<|im_start|>role\\n...<|im_end|>\\n` turns (the same text as the ChatML jinja
  template of tokenizers built by `ift.models`).
- `alpaca`: the Alpaca instruction / input / response layout, with and without input.
- `human_assistant`: multi-turn `Human: ...` / `Assistant: ...` text.
- `tokenizer`: the tokenizer's own jinja chat template, rendered over growing prefixes of
  the conversation; the differences between consecutive renderings are the segments.
- `auto`: `tokenizer` when the tokenizer has a chat template, else `chatml`.

An assistant message's `reasoning` becomes a `<think>...</think>` block in front of its
reply, in every template, trainable with the reply (`with_reasoning`).

Built-ins are plain string formatting (fast). All rendered text may contain special
tokens (bos, eos, markers): tokenize it with `add_special_tokens=False`.
"""

from __future__ import annotations

import copy
import difflib
import logging
from dataclasses import dataclass
from typing import Any

from ift.artifacts import IM_END, IM_START, PromptFormat
from ift.data.record import ROLES

BUILTIN = ("chatml", "alpaca", "human_assistant")
TEMPLATES = ("auto", "tokenizer", *BUILTIN)


ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)

# An assistant message's `reasoning` is written before its reply as a think block, the
# way reasoning models (Qwen3, DeepSeek-R1) write it; it is trained with the reply.
THINK_START = "<think>"
THINK_END = "</think>"


def with_reasoning(content: str, reasoning: str | None) -> str:
    """The assistant text the model learns: the think block, then the reply."""
    if not reasoning:
        return content
    return f"{THINK_START}\n{reasoning.strip()}\n{THINK_END}\n\n{content}"

# A segment inside this package also carries its exchange number: an exchange starts at a
# user message and holds the replies and tool turns after it; -1 is the preamble (bos,
# system prompt). Left truncation drops whole leading exchanges.
Segment = tuple[str, bool, int]


class TemplateError(ValueError):
    """The template itself cannot be used for training (not one bad record)."""


@dataclass(frozen=True)
class TokenizerTraits:
    """What the built-in templates need to know about a tokenizer, computed once."""

    bos: str
    """Text of the bos token when the tokenizer would add one by itself, else ''."""
    eos: str | None
    """Text of the eos token (None when the tokenizer has none)."""
    im_end_is_token: bool
    """Whether `<|im_end|>` is a single token (else chatml also appends eos)."""


def tokenizer_traits(tokenizer) -> TokenizerTraits:
    bos = ""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is not None and tokenizer.bos_token:
        # Rendered text is tokenized without special tokens, so a bos the tokenizer would
        # add on its own (llama-style) has to be written into the text.
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        if with_special[:1] == [bos_id] and plain[:1] != [bos_id]:
            bos = str(tokenizer.bos_token)
    eos = str(tokenizer.eos_token) if getattr(tokenizer, "eos_token", None) else None
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    im_end_is_token = im_end_id is not None and im_end_id != unk_id and len(
        tokenizer(IM_END, add_special_tokens=False)["input_ids"]
    ) == 1
    return TokenizerTraits(bos=bos, eos=eos, im_end_is_token=im_end_is_token)


# ---------------------------------------------------------------------------------------
# Choosing a template
# ---------------------------------------------------------------------------------------


def resolve_template(name: str, tokenizer) -> str:
    """The concrete template for `name`: one of BUILTIN or "tokenizer".

    "auto" picks the tokenizer's own chat template when it has one, else chatml. A
    tokenizer whose template is exactly ift's ChatML template gets the built-in chatml
    (the same text, rendered without jinja).
    """
    if name not in TEMPLATES:
        close = difflib.get_close_matches(str(name), TEMPLATES, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"template {name!r} is not known{hint} (allowed: {', '.join(TEMPLATES)})")
    own = getattr(tokenizer, "chat_template", None)
    if name == "auto":
        if not own:
            return "chatml"
        from ift.models import CHATML_TEMPLATE  # cycle: ift.models -> ift.config -> this module

        if own == CHATML_TEMPLATE:
            return "chatml"
        name = "tokenizer"
    if name == "tokenizer":
        if not own:
            raise ValueError(
                f"template 'tokenizer': tokenizer {_tok_name(tokenizer)!r} has no chat "
                f"template; use one of {', '.join(BUILTIN)}"
            )
        if isinstance(own, dict) and "default" not in own:
            raise ValueError(
                f"template 'tokenizer': tokenizer {_tok_name(tokenizer)!r} has named chat "
                f"templates ({', '.join(own)}) but none called 'default'"
            )
    return name


# ---------------------------------------------------------------------------------------
# Public rendering
# ---------------------------------------------------------------------------------------


def render_segments(record: dict, template: str, tokenizer) -> list[tuple[str, bool]]:
    """The conversation as `(text, trainable)` segments; their concatenation is the text."""
    name = resolve_template(template, tokenizer)
    segs = segments(record, name, tokenizer, tokenizer_traits(tokenizer))
    return [(text, trainable) for text, trainable, _ in segs]


def render_prompt(messages: list[dict], tokenizer, template: str = "auto",
                  system: str = "", *, meta: dict | None = None) -> str:
    """Prompt text for generation: the history, then the start of an assistant turn.

    The same text as the untrainable prefix `render_segments` gives a conversation whose
    last assistant reply follows this history (pass the record's `meta` to get the
    alpaca with-input layout a record's instruction/input keys select). It may contain
    special tokens (bos, markers): tokenize it with `add_special_tokens=False`.
    """
    name = resolve_template(template, tokenizer)
    record = {"id": "<prompt>", "system": system, "messages": messages, "meta": meta or {}}
    segs = segments(record, name, tokenizer, tokenizer_traits(tokenizer), generation_prompt=True)
    return "".join(text for text, _, _ in segs)


def segments(record: dict, name: str, tokenizer, traits: TokenizerTraits, *,
             generation_prompt: bool = False) -> list[Segment]:
    """Segments with exchange numbers for a resolved template name (see resolve_template).

    Raises ValueError for a record that cannot be rendered (the message says why) and
    TemplateError when the template itself is unusable.
    """
    system, messages = split_system(record, allow_empty=generation_prompt)
    if name == "tokenizer":
        return _tokenizer_segments(system, messages, tokenizer, generation_prompt)
    if name not in BUILTIN:
        raise ValueError(
            f"template {name!r} is not resolved (allowed: tokenizer, {', '.join(BUILTIN)})"
        )
    return _BUILTIN_RENDER[name](system, messages, traits, record.get("meta") or {},
                                 generation_prompt)


def split_system(record: dict, *, allow_empty: bool = False) -> tuple[str, list[dict]]:
    """(system prompt, remaining messages): record["system"], else a leading system message.

    Checks roles and contents; `allow_empty` admits a conversation of no messages (a prompt
    made of the system prompt alone).
    """
    rid = record.get("id", "?")
    messages = record.get("messages")
    # Lists, tuples and the arrays columnar readers produce are all fine.
    if messages is None or isinstance(messages, (str, bytes, dict)) or not hasattr(
        messages, "__len__"
    ):
        raise ValueError(f"record {rid}: messages must be a list, got {type(messages).__name__}")
    if len(messages) == 0 and not allow_empty:
        raise ValueError(f"record {rid}: messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise ValueError(
                f"record {rid}: messages[{i}].role={role!r} (allowed: {', '.join(ROLES)})"
            )
        content = m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"record {rid}: messages[{i}].content must be a string")
        if role == "assistant":
            content = with_reasoning(content, m.get("reasoning"))
        out.append({"role": role, "content": content})
    system = record.get("system") or ""
    if out and out[0]["role"] == "system":
        lead = out.pop(0)
        system = system or lead["content"]
    return system, out


def _exchanges(messages: list[dict]) -> list[int]:
    """Exchange number of each message: a user message starts a new exchange."""
    out, ex = [], -1
    for m in messages:
        if m["role"] == "user" or ex < 0:
            ex += 1
        out.append(ex)
    return out


def _need_eos(traits: TokenizerTraits, template: str) -> str:
    if not traits.eos:
        raise TemplateError(
            f"template {template!r} ends assistant turns with the tokenizer's eos token, "
            "but the tokenizer has none; set tokenizer.eos_token or pick another template"
        )
    return traits.eos


# ---------------------------------------------------------------------------------------
# Built-in templates
# ---------------------------------------------------------------------------------------


def _chatml(system: str, messages: list[dict], traits: TokenizerTraits, meta: dict,
            generation_prompt: bool) -> list[Segment]:
    # Where <|im_end|> is not a token of this tokenizer, eos follows it so that ordinary
    # generation (which stops on eos) still stops.
    end = IM_END if traits.im_end_is_token else IM_END + _need_eos(traits, "chatml")
    segs: list[Segment] = []
    if traits.bos:
        segs.append((traits.bos, False, -1))
    if system:
        segs.append((f"{IM_START}system\n{system}{end}\n", False, -1))
    exchanges = _exchanges(messages)
    for m, ex in zip(messages, exchanges):
        if m["role"] == "assistant":
            segs.append((f"{IM_START}assistant\n", False, ex))
            segs.append((m["content"] + end, True, ex))
            segs.append(("\n", False, ex))
        else:
            segs.append((f"{IM_START}{m['role']}\n{m['content']}{end}\n", False, ex))
    if generation_prompt:
        segs.append((f"{IM_START}assistant\n", False, _next_exchange(exchanges)))
    return segs


def _alpaca_split(messages: list[dict], meta: dict) -> tuple[str, str] | None:
    """(instruction, input) from meta when the single user turn was built from them."""
    users = [m for m in messages if m["role"] == "user"]
    instruction, inp = meta.get("instruction"), meta.get("input")
    if len(users) != 1 or not isinstance(instruction, str) or not isinstance(inp, str):
        return None
    instruction, inp = instruction.strip(), inp.strip()
    content = users[0]["content"].strip()
    # Only trust meta while it still describes the message (placeholders or cleaning may
    # have changed the text since conversion).
    if not instruction or not inp or not content.startswith(instruction) or not content.endswith(inp):
        return None
    if len(content) < len(instruction) + len(inp):
        return None
    return instruction, inp


def _alpaca(system: str, messages: list[dict], traits: TokenizerTraits, meta: dict,
            generation_prompt: bool) -> list[Segment]:
    eos = _need_eos(traits, "alpaca")
    split = _alpaca_split(messages, meta)
    preamble = system or (ALPACA_PREAMBLE_WITH_INPUT if split else ALPACA_PREAMBLE)
    segs: list[Segment] = []
    if traits.bos:
        segs.append((traits.bos, False, -1))
    segs.append((preamble + "\n\n", False, -1))
    exchanges = _exchanges(messages)
    last = len(messages) - 1
    for i, (m, ex) in enumerate(zip(messages, exchanges)):
        role, content = m["role"], m["content"]
        if role == "assistant":
            segs.append(("### Response:\n", False, ex))
            segs.append((content + eos, True, ex))
            if i < last or generation_prompt:
                segs.append(("\n\n", False, ex))
        elif role == "user" and split:
            instruction, inp = split
            segs.append((f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n", False, ex))
        else:
            header = {"user": "Instruction", "tool": "Tool result", "system": "System"}[role]
            segs.append((f"### {header}:\n{content}\n\n", False, ex))
    if generation_prompt:
        segs.append(("### Response:\n", False, _next_exchange(exchanges)))
    return segs


def _human_assistant(system: str, messages: list[dict], traits: TokenizerTraits, meta: dict,
                     generation_prompt: bool) -> list[Segment]:
    eos = _need_eos(traits, "human_assistant")
    segs: list[Segment] = []
    if traits.bos:
        segs.append((traits.bos, False, -1))
    if system:
        segs.append((system + "\n\n", False, -1))
    exchanges = _exchanges(messages)
    last = len(messages) - 1
    for i, (m, ex) in enumerate(zip(messages, exchanges)):
        role, content = m["role"], m["content"]
        if role == "assistant":
            # The space after the colon is the reply's first character, so the model
            # produces " word" tokens as in ordinary text instead of a lone " ".
            segs.append(("Assistant:", False, ex))
            segs.append((" " + content + eos, True, ex))
            if i < last or generation_prompt:
                segs.append(("\n", False, ex))
        else:
            speaker = {"user": "Human", "tool": "Tool", "system": "System"}[role]
            segs.append((f"{speaker}: {content}\n", False, ex))
    if generation_prompt:
        segs.append(("Assistant:", False, _next_exchange(exchanges)))
    return segs


def _next_exchange(exchanges: list[int]) -> int:
    # The generation prompt belongs to the last exchange (the reply to its user turn).
    return exchanges[-1] if exchanges else 0


_BUILTIN_RENDER: dict[str, Any] = {
    "chatml": _chatml,
    "alpaca": _alpaca,
    "human_assistant": _human_assistant,
}


# ---------------------------------------------------------------------------------------
# The tokenizer's own template
# ---------------------------------------------------------------------------------------


def _tok_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _apply(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raises its own exception types (e.g. raise_exception)
        raise ValueError(
            f"chat template of tokenizer {_tok_name(tokenizer)!r} failed: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(text, str):
        raise TemplateError(
            f"chat template of tokenizer {_tok_name(tokenizer)!r} did not return text"
        )
    return text


def _grows(before: str, after: str, tokenizer, what: str) -> None:
    if not after.startswith(before):
        at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b),
                  min(len(before), len(after)))
        raise TemplateError(
            f"chat template of tokenizer {_tok_name(tokenizer)!r} rewrites earlier text when "
            f"{what} (first difference at character {at}: {before[at:at + 40]!r} became "
            f"{after[at:at + 40]!r}), so assistant turns cannot be masked; use one of "
            f"{', '.join(BUILTIN)}"
        )


def _tokenizer_segments(system: str, messages: list[dict], tokenizer,
                        generation_prompt: bool) -> list[Segment]:
    """Differences between renderings of growing prefixes of the conversation.

    For an assistant message, the text between the history rendered with the generation
    prompt and the history plus that message is what the model must produce: it is
    trainable up to its last non-space character (the template's end marker); the
    whitespace after the marker is not. A template without an end marker gets the eos
    token after the reply.
    """
    eos = getattr(tokenizer, "eos_token", None)
    full = ([{"role": "system", "content": system}] if system else []) + messages
    # The system message belongs to the preamble; every other message to its exchange.
    exchanges = ([-1] if system else []) + _exchanges(messages)
    segs: list[Segment] = []
    prev = ""  # the conversation so far, as the template renders it
    for k, m in enumerate(full):
        ex = exchanges[k]
        now = _apply(tokenizer, full[: k + 1], False)
        if m["role"] != "assistant":
            _grows(prev, now, tokenizer, f"message {k} ({m['role']}) is added")
            segs.append((now[len(prev):], False, ex))
            prev = now
            continue
        prompt = _apply(tokenizer, full[:k], True)
        _grows(prev, prompt, tokenizer, f"the generation prompt follows message {k - 1}")
        _grows(prompt, now, tokenizer, f"assistant message {k} is added")
        if len(prompt) > len(prev):
            segs.append((prompt[len(prev):], False, ex))
        reply = now[len(prompt):]
        body = reply.rstrip()
        tail = reply[len(body):]
        content = m["content"].strip()
        has_marker = not body.endswith(content) if content else bool(body.strip())
        if not has_marker:
            if not eos:
                raise TemplateError(
                    f"chat template of tokenizer {_tok_name(tokenizer)!r} has no end-of-turn "
                    "marker after assistant replies and the tokenizer has no eos token, so "
                    "the model could not learn to stop"
                )
            body += str(eos)
        segs.append((body, True, ex))
        if tail:
            segs.append((tail, False, ex))
        prev = now
    if generation_prompt:
        prompt = _apply(tokenizer, full, True)
        _grows(prev, prompt, tokenizer, "the generation prompt is added")
        segs.append((prompt[len(prev):], False, exchanges[-1] if exchanges else 0))
    return [s for s in segs if s[0]]


# ---------------------------------------------------------------------------------------
# The prompt format a model is trained with (recorded beside it, see ift.artifacts)
# ---------------------------------------------------------------------------------------


def _jinja_str(text: str) -> str:
    """A jinja string literal of text."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def builtin_jinja(name: str, traits: TokenizerTraits) -> str:
    """A jinja chat template that renders what the built-in template `name` renders for a
    conversation without meta (the prompt part with add_generation_prompt, and whole
    conversations). ift's own ChatML jinja where that is the same text."""
    from ift.models import CHATML_TEMPLATE  # cycle: ift.models -> ift.config -> this module

    q = _jinja_str
    bos = q(traits.bos)
    # A leading system message is the system prompt; an empty one renders nothing.
    head = ("{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set msgs = messages[1:] -%}"
            "{%- else -%}{%- set system = '' -%}{%- set msgs = messages -%}{%- endif -%}"
            "{{- " + bos + " -}}")
    if name == "chatml":
        if not traits.bos and traits.im_end_is_token:
            return CHATML_TEMPLATE
        end = q(IM_END if traits.im_end_is_token else IM_END + _need_eos(traits, "chatml"))
        return (head
                + "{%- if system -%}{{- '" + IM_START + "system\\n' + system + " + end
                + " + '\\n' -}}{%- endif -%}"
                "{%- for m in msgs -%}{{- '" + IM_START + "' + m['role'] + '\\n' + m['content'] + "
                + end + " + '\\n' -}}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- '" + IM_START + "assistant\\n' -}}{%- endif -%}")
    if name == "alpaca":
        eos = q(_need_eos(traits, "alpaca"))
        return (head
                + "{{- (system if system else " + q(ALPACA_PREAMBLE) + ") + '\\n\\n' -}}"
                "{%- for m in msgs -%}"
                "{%- if m['role'] == 'assistant' -%}"
                "{{- '### Response:\\n' + m['content'] + " + eos + " -}}"
                "{%- if not loop.last or add_generation_prompt -%}{{- '\\n\\n' -}}{%- endif -%}"
                "{%- else -%}"
                "{{- '### ' + {'user': 'Instruction', 'tool': 'Tool result', 'system': 'System'}"
                "[m['role']] + ':\\n' + m['content'] + '\\n\\n' -}}"
                "{%- endif -%}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}")
    if name == "human_assistant":
        eos = q(_need_eos(traits, "human_assistant"))
        return (head
                + "{%- if system -%}{{- system + '\\n\\n' -}}{%- endif -%}"
                "{%- for m in msgs -%}"
                "{%- if m['role'] == 'assistant' -%}"
                "{{- 'Assistant: ' + m['content'] + " + eos + " -}}"
                "{%- if not loop.last or add_generation_prompt -%}{{- '\\n' -}}{%- endif -%}"
                "{%- else -%}"
                "{{- {'user': 'Human', 'tool': 'Tool', 'system': 'System'}[m['role']] + ': ' "
                "+ m['content'] + '\\n' -}}"
                "{%- endif -%}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}")
    raise ValueError(f"template {name!r} is not built in (allowed: {', '.join(BUILTIN)})")


def _single_token_id(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def _tokenizer_end_marker(tokenizer) -> str | None:
    """The end-of-turn marker the tokenizer's own template puts after a reply, when it is
    one token (None: the template has none, or it is several tokens)."""
    content = "Fine."
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]
    prompt = _apply(tokenizer, probe[:1], True)
    reply = _apply(tokenizer, probe, False)[len(prompt):]
    at = reply.find(content)
    marker = reply[at + len(content):].strip() if at >= 0 else ""
    if marker and _single_token_id(tokenizer, marker) is not None:
        return marker
    return None


def prompt_format(template: str, tokenizer):
    """The PromptFormat of data rendered with `template` (any name resolve_template takes)
    and `tokenizer`: the resolved name, its jinja, its end-of-turn token(s), its system
    prompt policy."""
    name = resolve_template(template, tokenizer)
    traits = tokenizer_traits(tokenizer)
    eos = traits.eos
    if name == "tokenizer":
        own = tokenizer.chat_template
        jinja = own["default"] if isinstance(own, dict) else own
        ends = [_tokenizer_end_marker(tokenizer), eos]
        policy, default_system = "template", ""
    else:
        jinja = builtin_jinja(name, traits)
        ends = [IM_END if name == "chatml" and traits.im_end_is_token else None, eos]
        policy = "replaces_preamble" if name == "alpaca" else "optional"
        default_system = ALPACA_PREAMBLE if name == "alpaca" else ""
    tokens, ids = [], []
    for t in ends:
        tid = _single_token_id(tokenizer, t) if t else None
        if t and tid is not None and t not in tokens:
            tokens.append(t)
            ids.append(tid)
    return PromptFormat(template=name, chat_template=jinja, stop_tokens=tokens,
                        stop_token_ids=ids, system_policy=policy, default_system=default_system)


def choose_prompt_format(recorded, override: str, tokenizer, where: str, log=None):
    """The prompt format to generate with: the one recorded at `where` (a model or adapter
    dir), unless `override` (a template name; "auto" or "" is none) names another, which
    then wins with a warning. Without a record, the override (or "auto") for this tokenizer."""
    log = log or logging.getLogger("ift.prompt_format")
    explicit = bool(override) and override != "auto"
    if recorded is None:
        return prompt_format(override or "auto", tokenizer)
    if not explicit:
        return recorded
    chosen = prompt_format(override, tokenizer)
    if (chosen.template, chosen.chat_template) != (recorded.template, recorded.chat_template):
        log.warning("template %r overrides the prompt format %s was trained with (%r); "
                    "its replies may not follow the training format", override, where,
                    recorded.template)
    return chosen


def format_prompt(messages: list[dict], tokenizer, fmt, system: str = "", *,
                  meta: dict | None = None) -> str:
    """render_prompt with a PromptFormat: its template, and for "tokenizer" its own jinja
    (which may differ from the tokenizer's current one)."""
    if fmt.template == "tokenizer" and tokenizer.chat_template != fmt.chat_template:
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = fmt.chat_template
    return render_prompt(messages, tokenizer, fmt.template, system, meta=meta)
