"""Ingest: one raw row of a source file -> clean conversation records, or a reject reason.

Pure and deterministic: convert by format (SFT layouts and IE records), drop reasoning on
request, substitute placeholders, validate, detect the language. The Ray Data pipeline
(ift.data.pipeline) calls `clean_rows` once per read task; tests call it directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from ift.data import ie, mix
from ift.data.formats import convert
from ift.data.quality import record_lang, substitute_placeholders, validate
from ift.data.readers import iter_raw
from ift.data.record import ConvertError, drop_reasoning


@dataclasses.dataclass(frozen=True)
class RowOptions:
    """What turns a raw row into a clean record, identical in both passes."""

    seed: int
    placeholders: dict[str, str]
    columns: dict[str, str]
    task: str
    system: str | None
    keep_reasoning: bool = True
    ie_schema: dict | None = None
    """IE sources: the parsed schema (ift.data.ie.parse_schema)."""
    max_labels: int = 0
    schema_split: bool = False


# Records beyond the first that an IE row makes (one per schema chunk) carry their chunk
# number in the key bits above the line.
CHUNK_SHIFT = 28


def _convert_rows(task, raw: dict, line: int, opts: RowOptions) -> list[dict]:
    rid = f"{task.source}-{task.file_index}-{line}"
    if task.format in ie.FORMATS:
        return ie.to_records(task.format, raw, id=rid, source=task.source, seed=opts.seed,
                             schema=opts.ie_schema,
                             labels=ie.LabelOptions(opts.max_labels, opts.schema_split),
                             task=opts.task, system=opts.system)
    return [convert(task.format, raw, id=rid, source=task.source, seed=opts.seed,
                    columns=opts.columns or None, task=opts.task, system=opts.system)]


def clean_rows(task, opts: RowOptions) -> Iterator[tuple[int, int, dict | None, str | None, str]]:
    """(key, line, record or None, reject reason or None, raw text) for every row of a read task."""
    for line, raw, error, raw_text in iter_raw(task):
        key = int(mix.make_key(task.file_index, line))
        if error is not None:
            yield key, line, None, error, raw_text
            continue
        try:
            recs = _convert_rows(task, raw, line, opts)
        except ConvertError as e:
            yield key, line, None, str(e), raw_text
            continue
        for chunk, rec in enumerate(recs):
            if chunk:
                key = int(mix.make_key(task.file_index, line | (chunk << CHUNK_SHIFT)))
            if not opts.keep_reasoning:
                rec = drop_reasoning(rec)
            if opts.placeholders:
                rec = substitute_placeholders(rec, opts.placeholders)
            reason = validate(rec)
            if reason is not None:
                yield key, line, None, reason, raw_text
                continue
            if opts.placeholders or not rec.get("lang"):  # substitution may change the script
                rec["lang"] = record_lang(rec.get("system"), rec["messages"])
            yield key, line, rec, None, raw_text
