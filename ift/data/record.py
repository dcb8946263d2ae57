"""The unified conversation record every source format becomes.

    {id, source, lang, task, system, messages: [{role, content}], meta}

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
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "meta": meta or {},
    }


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
    return h.hexdigest()


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
