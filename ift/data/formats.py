"""Source formats -> the unified record.

    {id, source, lang, task, system, messages: [{role, content}], meta}

One pure function per format, looked up by name in CONVERTERS. A row that cannot become a
record raises ConvertError with a reason naming the field or turn; content problems that
every format shares (empty turns, role order, bad bytes) are left to ift.data.quality.validate.

`columns` maps record fields to the row's keys ({instruction: question, output: answer}); it
is how table rows (parquet/csv) name their columns and how JSON sources with unusual key
names are read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from ift.data import cot_templates
from ift.data.quality import record_lang
from ift.data.record import ConvertError, make_record

# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------


def _renamed(raw: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    if not columns:
        return raw
    out = dict(raw)
    for fld, col in columns.items():
        if col in raw:
            out[fld] = raw[col]
        else:
            out.pop(fld, None)  # a mapped field comes from its column or nowhere
    return out


def _name(fld: str, columns: dict[str, str]) -> str:
    col = columns.get(fld)
    return f"{fld!r} (column {col!r})" if col and col != fld else repr(fld)


def _text(r: dict[str, Any], fld: str, columns: dict[str, str], *, required: bool = False) -> str:
    if fld not in r:
        if required:
            raise ConvertError(f"missing field {_name(fld, columns)}")
        return ""
    v = r[fld]
    if v is None:
        if required:
            raise ConvertError(f"field {_name(fld, columns)} is null")
        return ""
    if isinstance(v, str):
        return v
    # Numbers are rejected like every other non-text value: 42 and 42.0 and 1e3 would each
    # become some text, and which one the file meant is not known.
    raise ConvertError(f"field {_name(fld, columns)} is a {_type(v)}, expected text")


def _type(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _json_value(v: Any, fld: str, columns: dict[str, str]) -> Any:
    """Table cells (csv especially) may hold JSON text where a list is expected."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise ConvertError(
                f"field {_name(fld, columns)} is text but not valid JSON: {e.msg} at column {e.colno}"
            ) from None
    return v


def _finish(
    messages: list[dict[str, str]],
    *,
    id: str,
    source: str,
    row_system: str,
    system: str | None,
    task: str,
    default_task: str,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    sys_prompt = row_system if row_system.strip() else (system or "")
    return make_record(
        id=id,
        source=source,
        messages=messages,
        system=sys_prompt,
        task=task or default_task,
        lang=record_lang(sys_prompt, messages),
        meta=meta,
    )


def _tools_json(v: Any, fld: str, columns: dict[str, str]) -> str | None:
    if v is None or v == "" or v == [] or v == {}:
        return None
    if isinstance(v, str):
        try:
            json.loads(v)
        except json.JSONDecodeError as e:
            raise ConvertError(
                f"field {_name(fld, columns)} is not valid JSON: {e.msg} at column {e.colno}"
            ) from None
        return v
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    raise ConvertError(f"field {_name(fld, columns)} is a {_type(v)}, expected a JSON list")


# ---------------------------------------------------------------------------------------
# alpaca: {instruction, input, output, system?, history?}
# ---------------------------------------------------------------------------------------


def _history_turns(
    r: dict[str, Any], columns: dict[str, str], json_text: bool
) -> list[dict[str, str]]:
    hist = r.get("history")
    if hist is None or hist == "" or hist == []:
        return []
    if json_text:
        hist = _json_value(hist, "history", columns)
    if not isinstance(hist, list):
        raise ConvertError(f"field {_name('history', columns)} is a {_type(hist)}, "
                           "expected a list of [query, response] pairs")
    turns: list[dict[str, str]] = []
    for i, pair in enumerate(hist, start=1):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(
            isinstance(x, str) for x in pair
        ):
            raise ConvertError(f"history item {i} is not a [query, response] pair of texts")
        turns.append({"role": "user", "content": pair[0]})
        turns.append({"role": "assistant", "content": pair[1]})
    return turns


def _alpaca_messages(
    r: dict[str, Any], columns: dict[str, str], json_text: bool = False
) -> list[dict[str, str]]:
    instruction = _text(r, "instruction", columns, required=True)
    inp = _text(r, "input", columns)
    if isinstance(r.get("output"), list):
        raise ConvertError(f"field {_name('output', columns)} is a list (preference data?), "
                           "expected text")
    output = _text(r, "output", columns, required=True)
    parts = [x for x in (instruction, inp) if x.strip()]
    user = "\n".join(parts)  # both empty: validation rejects the empty user turn
    return [
        *_history_turns(r, columns, json_text),
        {"role": "user", "content": user},
        {"role": "assistant", "content": output},
    ]


def convert_alpaca(raw, *, id, source, seed=42, columns=None, task="", system=None):
    columns = columns or {}
    r = _renamed(raw, columns)
    messages = _alpaca_messages(r, columns)
    return _finish(messages, id=id, source=source, row_system=_text(r, "system", columns),
                   system=system, task=task, default_task="instruction")


# ---------------------------------------------------------------------------------------
# alpaca_cot_multiturn: instruction = "Human: ...\nAssistant: ...\nHuman: ...\nAssistant:"
# ---------------------------------------------------------------------------------------

# A speaker marker not glued to a preceding word ("Human:" / "Assistant:", full-width colon too).
_SPEAKER = re.compile(r"(?<![A-Za-z0-9_])(Human|Assistant)\s*[:：]")


def split_human_assistant(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first marker, [(role, content), ...]) of a Human:/Assistant: dialogue.

    Raises ValueError when the text holds no marker.
    """
    marks = list(_SPEAKER.finditer(text))
    if not marks:
        raise ValueError("no Human:/Assistant: markers")
    preamble = text[: marks[0].start()].strip()
    turns = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        end = nxt.start() if nxt else len(text)
        role = "user" if m.group(1) == "Human" else "assistant"
        turns.append((role, text[m.end():end].strip()))
    return preamble, turns


def convert_alpaca_cot_multiturn(raw, *, id, source, seed=42, columns=None, task="", system=None):
    columns = columns or {}
    r = _renamed(raw, columns)
    instruction = _text(r, "instruction", columns, required=True)
    inp = _text(r, "input", columns).strip()
    output = _text(r, "output", columns).strip()
    try:
        preamble, turns = split_human_assistant(instruction)
    except ValueError:
        raise ConvertError(f"field {_name('instruction', columns)} holds no Human:/Assistant: "
                           "turns") from None
    messages = [{"role": role, "content": content} for role, content in turns]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if inp and users:
        turn = messages[users[-1]]
        turn["content"] = f"{turn['content']}\n{inp}" if turn["content"] else inp
    last = messages[-1]
    if output:
        if last["role"] == "user":
            messages.append({"role": "assistant", "content": output})
        elif not last["content"]:
            last["content"] = output
        else:
            raise ConvertError("instruction ends with a complete Assistant: turn and output "
                               "holds another answer")
    elif last["role"] != "assistant" or not last["content"]:
        raise ConvertError("no final answer: output is empty and the instruction does not end "
                           "with an Assistant: turn")
    row_system = _text(r, "system", columns) or preamble
    return _finish(messages, id=id, source=source, row_system=row_system, system=system,
                   task=task, default_task="chat")


# ---------------------------------------------------------------------------------------
# sharegpt / openai: lists of turns
# ---------------------------------------------------------------------------------------

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "system": "system",
    "developer": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
_TOOL_CALL_SPEAKERS = ("function_call",)


_TEXT_PARTS = ("text", "input_text", "output_text")
# LLaMA-Factory's v1 messages add these part types (their text under "value").
_V1_PARTS = ("reasoning", "tool_call")


def _part_value(part: Any, turn: int, j: int) -> tuple[str, Any]:
    """(type, payload) of one content part: OpenAI's {type: text, text} or LLaMA-Factory
    v1's {type: text|reasoning|tool_call, value}."""
    if isinstance(part, str):
        return "text", part
    if not isinstance(part, dict):
        raise ConvertError(f"turn {turn}: content part {j} is a {_type(part)}, expected an "
                           "object")
    kind = part.get("type", "text")
    if kind not in _TEXT_PARTS + _V1_PARTS:
        raise ConvertError(f"turn {turn}: content part of type {kind!r} is not supported "
                           "(text only)")
    key = "text" if "text" in part else "value"
    if key not in part:
        raise ConvertError(f"turn {turn}: content part {j} ({kind}) has neither 'text' nor "
                           f"'value' (keys: {', '.join(map(str, part)) or 'none'})")
    value = part[key]
    if kind == "tool_call":
        return kind, value  # an object, or JSON text; checked by _tool_calls_text
    if not isinstance(value, str):
        raise ConvertError(f"turn {turn}: content part {j} ({kind}) {key!r} is a "
                           f"{_type(value)}, expected text")
    return kind, value


def _parts(parts: list, turn: int, role: str) -> tuple[str, str, list]:
    """(text, reasoning, tool calls) of a list of content parts."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list = []
    for j, part in enumerate(parts):
        kind, value = _part_value(part, turn, j)
        if kind in _TEXT_PARTS:
            texts.append(value)
            continue
        if role != "assistant":
            raise ConvertError(f"turn {turn}: a {role} turn holds a {kind} part (only "
                               "assistant turns may)")
        if kind == "reasoning":
            thoughts.append(value)
        else:
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ConvertError(f"turn {turn}: tool_call part {j} is not valid JSON: "
                                       f"{e.msg} at column {e.colno}") from None
            calls.extend(value if isinstance(value, list) else [value])
    return "\n".join(texts), "\n".join(thoughts), calls


def _tool_calls_text(calls: Any, turn: int) -> str:
    if not isinstance(calls, list):
        raise ConvertError(f"turn {turn}: tool_calls is a {_type(calls)}, expected a list")
    out = []
    for c in calls:
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or "name" not in fn:
            raise ConvertError(f"turn {turn}: a tool call has no function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass  # keep the text as given
        out.append({"name": fn["name"], "arguments": args})
    return json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False)


def _turn_list(
    items: Any, fld: str, columns: dict[str, str]
) -> tuple[list[dict[str, str]], list[int]]:
    """Turns of {from, value} or {role, content} dicts -> (messages, indices of tool calls)."""
    if not isinstance(items, list):
        raise ConvertError(f"field {_name(fld, columns)} is a {_type(items)}, expected a list "
                           "of turns")
    messages: list[dict[str, str]] = []
    calls: list[int] = []
    for i, t in enumerate(items, start=1):
        if not isinstance(t, dict):
            raise ConvertError(f"turn {i} is a {_type(t)}, expected an object")
        speaker = t.get("from", t.get("role"))
        if not isinstance(speaker, str):
            raise ConvertError(f"turn {i}: no 'from' or 'role'")
        role = _ROLES.get(speaker.strip().lower())
        if role is None:
            raise ConvertError(f"turn {i}: unknown speaker {speaker!r} "
                               f"(expected one of {', '.join(_ROLES)})")
        content = t["value"] if "value" in t else t.get("content")
        reasoning, part_calls = "", []
        if isinstance(content, list):
            content, reasoning, part_calls = _parts(content, i, role)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ConvertError(f"turn {i}: content is a {_type(content)}, expected text")
        is_call = speaker.strip().lower() in _TOOL_CALL_SPEAKERS
        if role == "assistant" and (t.get("tool_calls") or part_calls):
            call_text = _tool_calls_text(t.get("tool_calls") or part_calls, i)
            content = f"{content}\n{call_text}" if content.strip() else call_text
            is_call = True
        if is_call:
            calls.append(len(messages))
        message = {"role": role, "content": content}
        if reasoning.strip():
            message["reasoning"] = reasoning
        messages.append(message)
    return messages, calls


def _dialogue(
    r: dict[str, Any], fld: str, columns: dict[str, str], *, id, source, task, system,
    json_text: bool = False,
) -> dict[str, Any]:
    if fld not in r or r[fld] is None:
        raise ConvertError(f"missing field {_name(fld, columns)}")
    items = _json_value(r[fld], fld, columns) if json_text else r[fld]
    messages, calls = _turn_list(items, fld, columns)
    row_system = _text(r, "system", columns)
    if messages and messages[0]["role"] == "system":
        first = messages.pop(0)["content"]
        calls = [c - 1 for c in calls]
        row_system = f"{row_system}\n\n{first}" if row_system.strip() else first
    meta: dict[str, Any] = {}
    tools = _tools_json(r.get("tools"), "tools", columns)
    if tools is not None:
        meta["tools"] = tools
    if calls:
        meta["tool_calls"] = calls
    return _finish(messages, id=id, source=source, row_system=row_system, system=system,
                   task=task, default_task="chat", meta=meta)


def convert_sharegpt(raw, *, id, source, seed=42, columns=None, task="", system=None):
    columns = columns or {}
    return _dialogue(_renamed(raw, columns), "conversations", columns, id=id, source=source,
                     task=task, system=system)


def convert_openai(raw, *, id, source, seed=42, columns=None, task="", system=None):
    columns = columns or {}
    return _dialogue(_renamed(raw, columns), "messages", columns, id=id, source=source,
                     task=task, system=system)


# ---------------------------------------------------------------------------------------
# moss: {meta_instruction, chat: {turn_1: {Human, Inner Thoughts, Commands, Tool Responses, MOSS}}}
# ---------------------------------------------------------------------------------------

_MOSS_ROLE_MARK = re.compile(r"^\s*<\|[A-Za-z ]{1,30}\|>\s*[:：]?\s*")
_MOSS_END_MARK = re.compile(r"<eo[hmtcr]>")
_TURN_KEY = re.compile(r"^turn_(\d+)$")


def _moss_text(turn: dict[str, Any], key: str, n: int) -> str:
    v = turn.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ConvertError(f"chat.turn_{n}.{key} is a {_type(v)}, expected text")
    text = _MOSS_END_MARK.sub("", _MOSS_ROLE_MARK.sub("", v, count=1)).strip()
    return "" if text == "None" else text


def convert_moss(raw, *, id, source, seed=42, columns=None, task="", system=None):
    columns = columns or {}
    r = _renamed(raw, columns)
    chat = r.get("chat")
    if not isinstance(chat, dict):
        what = "missing" if chat is None else f"a {_type(chat)}"
        raise ConvertError(f"field {_name('chat', columns)} is {what}, expected an object of "
                           "turn_N")
    numbered = []
    for k, turn in chat.items():
        m = _TURN_KEY.match(str(k))
        if not m:
            raise ConvertError(f"chat key {k!r} is not turn_N")
        if not isinstance(turn, dict):
            raise ConvertError(f"chat.{k} is a {_type(turn)}, expected an object")
        numbered.append((int(m.group(1)), turn))
    numbered.sort(key=lambda x: x[0])
    messages: list[dict[str, str]] = []
    calls: list[int] = []
    thoughts: dict[str, str] = {}
    for n, turn in numbered:
        if "Human" not in turn or "MOSS" not in turn:
            raise ConvertError(f"chat.turn_{n} lacks {'Human' if 'Human' not in turn else 'MOSS'}")
        messages.append({"role": "user", "content": _moss_text(turn, "Human", n)})
        inner = _moss_text(turn, "Inner Thoughts", n)
        if inner:
            thoughts[str(n)] = inner  # kept aside: the reply itself is the training target
        command = _moss_text(turn, "Commands", n)
        results = _moss_text(turn, "Tool Responses", n)
        if command and results:
            calls.append(len(messages))
            messages.append({"role": "assistant", "content": command})
            messages.append({"role": "tool", "content": results})
        messages.append({"role": "assistant", "content": _moss_text(turn, "MOSS", n)})
    meta: dict[str, Any] = {}
    for k in ("conversation_id", "category"):
        if r.get(k) is not None:
            meta[k] = r[k]
    if calls:
        meta["tool_calls"] = calls
    if thoughts:
        meta["inner_thoughts"] = thoughts
    row_system = _text(r, "meta_instruction", columns) or _text(r, "system", columns)
    return _finish(messages, id=id, source=source, row_system=row_system.strip(), system=system,
                   task=task, default_task="chat", meta=meta)


# ---------------------------------------------------------------------------------------
# flan_cot_tsv: {question, answer, rationale}
# ---------------------------------------------------------------------------------------


def _unescape_newlines(text: str) -> str:
    # FLAN CoT TSVs store line breaks as the two characters backslash and n.
    return text.replace("\\n", "\n").strip()


def convert_flan_cot_tsv(raw, *, id, source, seed=42, columns=None, task="", system=None):
    columns = columns or {}
    r = _renamed(raw, columns)
    question = _unescape_newlines(_text(r, "question", columns, required=True))
    answer = _unescape_newlines(_text(r, "answer", columns, required=True))
    # An empty rationale column is an answers-only row: the same prompt, the answer phrase
    # alone as the reply (the "without CoT" arm of an ablation changes targets, not prompts).
    rationale = _unescape_newlines(_text(r, "rationale", columns)).strip()
    for fld, val in (("question", question), ("answer", answer)):
        if not val:
            raise ConvertError(f"empty {fld}")
    t_idx = cot_templates.template_index(question, seed)
    prompt = cot_templates.TEMPLATES[t_idx].format(question=question)
    phrase = cot_templates.answer_phrase(answer, question, seed)
    reply = f"{rationale}\n{phrase}" if rationale else phrase
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    meta = {"answer": answer, "cot_template": t_idx, "rationale": bool(rationale)}
    return _finish(messages, id=id, source=source, row_system=_text(r, "system", columns),
                   system=system, task=task, default_task="cot", meta=meta)


# ---------------------------------------------------------------------------------------
# table: parquet/csv rows, fields named through `columns`
# ---------------------------------------------------------------------------------------


def convert_table(raw, *, id, source, seed=42, columns=None, task="", system=None):
    columns = columns or {}
    r = _renamed(raw, columns)
    for fld in ("messages", "conversations"):
        if r.get(fld) is not None:
            return _dialogue(r, fld, columns, id=id, source=source, task=task, system=system,
                             json_text=True)
    if "instruction" in r or "output" in r:
        return _finish(_alpaca_messages(r, columns, json_text=True), id=id, source=source,
                       row_system=_text(r, "system", columns), system=system, task=task,
                       default_task="instruction")
    raise ConvertError(
        f"row has no messages or instruction/output fields (columns: {sorted(map(str, raw))}); "
        "map them with the source's columns, e.g. {instruction: question, output: answer}"
    )


CONVERTERS: dict[str, Callable[..., dict]] = {
    "alpaca": convert_alpaca,
    "alpaca_cot_multiturn": convert_alpaca_cot_multiturn,
    "sharegpt": convert_sharegpt,
    "openai": convert_openai,
    "moss": convert_moss,
    "flan_cot_tsv": convert_flan_cot_tsv,
    "table": convert_table,
}


def convert(
    fmt: str,
    raw: dict,
    *,
    id: str,
    source: str,
    seed: int = 42,
    columns: dict | None = None,
    task: str = "",
    system: str | None = None,
) -> dict:
    """One raw row of format `fmt` -> a unified record; ConvertError(reason) when it cannot be."""
    fn = CONVERTERS.get(fmt)
    if fn is None:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(CONVERTERS)}")
    if not isinstance(raw, dict):
        raise ConvertError(f"row is a {_type(raw)}, expected an object")
    return fn(raw, id=id, source=source, seed=seed, columns=columns or {}, task=task,
              system=system)
