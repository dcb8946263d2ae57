"""Quality checks on unified records: structural validation, script-based language, placeholders.

All pure functions over record dicts. `validate` returns the first problem as a short reason
(stored with the reject and counted in the manifest) or None for a good record.
"""

from __future__ import annotations

import re
from typing import Any

from ift.data.record import ROLES

# Lone surrogates come from bytes decoded with surrogateescape; U+FFFD from errors="replace".
_BAD_UNICODE = re.compile("[\ud800-\udfff\ufffd]")

# Which role may follow which (None = start of the conversation, after any system turn).
_MAY_FOLLOW: dict[str | None, tuple[str, ...]] = {
    None: ("user",),
    "user": ("assistant",),
    "assistant": ("user", "tool"),
    # Several tool results in a row answer parallel tool calls of one assistant turn.
    "tool": ("assistant", "tool"),
}


def validate(record: dict[str, Any]) -> str | None:
    """The first reason `record` is unfit for training, or None."""
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        return f"system prompt is {type(system).__name__}, not text"
    if system and _BAD_UNICODE.search(system):
        return "non-UTF-8 bytes in system prompt"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no messages"
    prev: str | None = None
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            return f"turn {i} is {type(m).__name__}, not a message"
        role = m.get("role")
        if role not in ROLES:
            return f"turn {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})"
        content = m.get("content")
        if not isinstance(content, str):
            return f"turn {i} ({role}): content is {type(content).__name__}, not text"
        if not content.strip():
            return f"turn {i} ({role}): empty content"
        if _BAD_UNICODE.search(content):
            return f"non-UTF-8 bytes in turn {i}"
        if role == "system":
            if i != 1:
                return f"turn {i}: system turn inside the conversation (only the first may be system)"
            continue
        if role not in _MAY_FOLLOW[prev]:
            after = f"after {prev}" if prev else "at the start"
            allowed = " or ".join(_MAY_FOLLOW[prev])
            return f"turn {i}: {role} turn {after} (expected {allowed})"
        prev = role
    if prev is None:
        return "no user or assistant turns"
    if prev != "assistant":
        return f"conversation ends with a {prev} turn (expected assistant)"
    return None


# Scripts counted by compiled character classes: a per-character Python loop costs as much
# as tokenizing the row.
_CJK = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0002fa1f]")
_LATIN = re.compile("[a-zA-Z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f]")
_KANA_HANGUL = re.compile("[\u3040-\u30ff\uac00-\ud7af\u1100-\u11ff]")
_LETTER = re.compile(r"[^\W\d_]")
_ASCII_LETTER = re.compile("[a-zA-Z]")


def record_lang(system: str | None, messages: list[dict[str, str]]) -> str:
    """A record's language: that of its user and assistant turns (of its system prompt when
    they hold no text). The one rule, at conversion and again after placeholders."""
    text = "\n".join(m["content"] for m in messages if m["role"] in ("user", "assistant"))
    return detect_lang(text or system or "")


def detect_lang(text: str, max_chars: int = 4000) -> str:
    """"zh", "en" or "other" from the scripts of the letters in `text`.

    One Chinese character carries about a word, so ideographs are weighed against Latin
    letters at 1:4 (the length of a short English word): "用Python写一个函数" is zh,
    "The word 你好 means hello" is en. Japanese (kana) and Korean (hangul) are "other".
    Latin script counts as en; telling English from French needs more than scripts.
    """
    text = text[:max_chars]
    if text.isascii():  # no ideographs or kana possible: Latin letters or nothing
        return "en" if _ASCII_LETTER.search(text) else "other"
    cjk = len(_CJK.findall(text))
    latin = len(_LATIN.findall(text))
    kana = len(_KANA_HANGUL.findall(text))
    other = max(0, len(_LETTER.findall(text)) - cjk - latin - kana)
    total = cjk * 4 + latin + kana * 4 + other
    if total == 0:
        return "other"
    if kana * 4 > 0.1 * total:
        return "other"
    if cjk * 4 >= 0.5 * total:
        return "zh"
    if latin >= 0.5 * total:
        return "en"
    return "other"


_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")


def _fill(text: str, values: dict[str, str]) -> str:
    if "{{" not in text:
        return text
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0),
                            text)


def substitute_placeholders(record: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """A copy of `record` with {{name}} replaced in the system prompt and every turn.

    Names missing from `values` stay as they are (a later stage or the user may fill them).
    """
    if not values:
        return record
    out = dict(record)
    if isinstance(out.get("system"), str):
        out["system"] = _fill(out["system"], values)
    out["messages"] = [
        {**m, "content": _fill(m["content"], values)} if isinstance(m.get("content"), str) else m
        for m in record.get("messages") or []
    ]
    return out
