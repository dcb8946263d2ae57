"""The unified conversation record every source format becomes.

    {id, source, lang, task, system, messages: [{role, content, reasoning?}], meta}

An assistant message may carry `reasoning` (its thinking before the reply, e.g.
LLaMA-Factory's `reasoning` parts); templates render it as a think block (THINK_START ...
THINK_END) in front of the reply, trained with it.

`meta` holds format-specific extras (tools, original keys) as a JSON-serialisable dict.
Records are plain dicts so that Ray Data and pyarrow carry them without conversion.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class ConvertError(ValueError):
    """A raw row cannot become a record; the message is the reason stored with the reject."""


def make_record(
    *,
    id: str,
    source: str,
    messages: list[dict[str, str]],
    system: str = "",
    task: str = "",
    lang: str = "",
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": id,
        "source": source,
        "lang": lang,
        "task": task,
        "system": system or "",
        "messages": [_message(m) for m in messages],
        "meta": meta or {},
    }


def _message(m: dict[str, Any]) -> dict[str, str]:
    out = {"role": m["role"], "content": m["content"]}
    if m.get("reasoning"):
        out["reasoning"] = m["reasoning"]  # an assistant's reasoning before its reply
    return out


def drop_reasoning(record: dict[str, Any]) -> dict[str, Any]:
    """The record without its assistant turns' reasoning (data.keep_reasoning: false)."""
    if not any("reasoning" in m for m in record["messages"]):
        return record
    return {**record, "messages": [{"role": m["role"], "content": m["content"]}
                                   for m in record["messages"]]}


def normalize_text(text: str) -> str:
    """NFKC, collapsed whitespace: two rows that differ only in spacing are duplicates."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def conversation_hash(record: dict[str, Any]) -> str:
    """A hex digest of the normalized system prompt and turns (roles included)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(normalize_text(record.get("system") or "").encode("utf-8"))
    for m in record["messages"]:
        h.update(b"\x1e" + m["role"].encode() + b"\x1f")
        h.update(normalize_text(m["content"]).encode("utf-8"))
        if m.get("reasoning"):
            h.update(b"\x1d" + normalize_text(m["reasoning"]).encode("utf-8"))
    return h.hexdigest()


def split_hash(record: dict[str, Any]) -> str:
    """The hex digest that places a record in train or val.

    Records made from one IE text (its schema chunks, and the same text under another IE
    task) share it, so a text never sits on both sides of the split; any other record's is
    its conversation hash.
    """
    text = ((record.get("meta") or {}).get("ie") or {}).get("text")
    if text is None:
        return conversation_hash(record)
    return hashlib.blake2b(b"ie\x1f" + normalize_text(text).encode("utf-8"),
                           digest_size=16).hexdigest()


def record_to_row(record: dict[str, Any]) -> dict[str, Any]:
    """A record as a flat row for parquet: meta serialised to JSON text."""
    row = dict(record)
    row["meta"] = json.dumps(record.get("meta") or {}, ensure_ascii=False, sort_keys=True)
    return row


def row_to_record(row: dict[str, Any]) -> dict[str, Any]:
    rec = dict(row)
    meta = rec.get("meta")
    rec["meta"] = json.loads(meta) if isinstance(meta, str) and meta else (meta or {})
    rec["messages"] = [dict(m) for m in rec["messages"]]
    return rec
