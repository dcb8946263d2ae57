"""Ingest: one raw row of a source file -> clean conversation records, or a reject reason.

Pure and deterministic: convert by format (SFT layouts and IE records), drop reasoning on
request, substitute placeholders, validate, detect the language. The Ray Data pipeline
(ift.data.pipeline) calls `clean_rows` once per read task; tests call it directly.

Raw files read outside a prepare run (held-out sets of `ift eval` and evaluation during
training, `ift predict` inputs) go through `iter_raw_records`: the same readers and
converters with the data seed, but a bad row is an error, not a reject, since such a set
must be whole.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

from ift import storage
from ift.config import ConfigError
from ift.data import ie, mix
from ift.data.formats import convert
from ift.data.preference import convert_pair, pair_hash, tokenize_pairs
from ift.data.quality import record_lang, substitute_placeholders, validate
from ift.data.readers import detect_format, iter_raw, plan_reads
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
                key = int(mix.make_key(task.file_index, line, chunk))
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


def pair_rows(task, options: dict[str, Any], tokenizer, *, template: str, max_seq_len: int,
              batch_size: int) -> list[dict[str, Any]]:
    """A preference read task's rows, one per raw row: "kept" with the pair's tokens
    (dataset.PAIR_SCHEMA columns), "dropped" with the reason no reply token survived
    truncation, or "rejected" with the conversion error and the raw text. `options` holds
    the source's "task" and "system"."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[int, int, dict]] = []

    def flush() -> None:
        rows, lost = tokenize_pairs([p for _, _, p in pending], tokenizer,
                                    template=template, max_seq_len=max_seq_len)
        reasons = dict(lost)
        it = iter(rows)
        for i, (key, line, pair) in enumerate(pending):
            base = {"key": key, "src": task.source_index, "hash": pair_hash(pair),
                    "lang": pair["lang"], "line": line}
            if i in reasons:
                out.append({**base, "status": "dropped", "reason": reasons[i], "id": pair["id"],
                            "source": task.source})
            else:
                out.append({**base, "status": "kept", **next(it)})
        pending.clear()

    for line, raw, error, raw_text in iter_raw(task):
        key = int(mix.make_key(task.file_index, line))
        if error is None:
            try:
                pair = convert_pair(task.format, raw, id=f"{task.source}-{task.file_index}-{line}",
                                    source=task.source, task=options["task"],
                                    system=options["system"])
            except ConvertError as e:
                error = str(e)
        if error is not None:
            out.append({"key": key, "src": task.source_index, "status": "rejected",
                        "line": line, "reason": error, "raw": raw_text[:100_000],
                        "source": task.source})
            continue
        pending.append((key, line, pair))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return out


def iter_raw_records(data: str, *, seed: int = 42, key: str = "eval.data",
                     sources: list | None = None, placeholders: dict[str, str] | None = None
                     ) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", unified record) for each row of raw files (a file, glob, folder or
    comma-separated list, in any format `ift data prepare` reads), in file order. A missing
    file, or a row that cannot be read or converted, is an error naming the config key that
    gave `data` and the file and line.

    IE rows (ift.data.ie) are read with the schema and label options of the first of
    `sources` (data.sources) in the same format, and {{name}} `placeholders`
    (data.placeholders) are filled, as training read them."""
    files: list[str] = []
    for part in (p.strip() for p in data.split(",")):
        if not part:
            continue
        found = storage.expand(part)
        missing = [f for f in found if not storage.exists(f)]
        if not found or missing:
            raise ConfigError(f"{key}={part!r}: {missing[0] if missing else part} "
                              "does not exist or matches no file")
        files.extend(found)
    try:
        tasks, _ = plan_reads("heldout", 0, files, "auto", 0, 0, hash_files=False)
    except ValueError as e:
        raise ConfigError(f"{key}={data!r}: {e}") from e
    ie_options: dict[str, dict[str, Any]] = {}  # per IE format, read once
    for task in tasks:
        if task.format in ie.FORMATS and task.format not in ie_options:
            ie_options[task.format] = _ie_options(task.format, sources or [])
        stem = os.path.splitext(os.path.basename(task.file))[0]
        for line, raw, err, _text in iter_raw(task):
            where = f"{task.file}:{line}"
            if raw is None:
                raise ConfigError(f"{key}: {where}: cannot read row: {err}")
            try:
                if task.format in ie.FORMATS:
                    recs = ie.to_records(task.format, raw, id=f"{stem}:{line}", source=stem,
                                         seed=seed, **ie_options[task.format])
                else:
                    recs = [convert(task.format, raw, id=f"{stem}:{line}", source=stem,
                                    seed=seed)]
            except ConvertError as e:
                raise ConfigError(f"{key}: {where}: cannot convert row: {e}") from e
            for rec in recs:
                yield where, (substitute_placeholders(rec, placeholders) if placeholders
                              else rec)


def _format_of_source(src) -> str | None:
    """A source's format, detected from its first file when it is "auto"."""
    if src.format != "auto":
        return src.format
    files = storage.expand(src.path)
    if not files or not storage.exists(files[0]):
        return None
    try:
        head = storage.read_range(files[0], 0, min(storage.size(files[0]), 64 * 1024))
        return detect_format(files[0], head)
    except ValueError:
        return None


def _ie_options(fmt: str, sources: list) -> dict[str, Any]:
    """schema and labels for ie.to_records from the first source of format `fmt`."""
    for src in sources:
        if _format_of_source(src) == fmt:
            schema = None
            if src.schema:
                try:
                    schema = ie.parse_schema(fmt, storage.read_text(src.schema), src.schema)
                except (ValueError, OSError) as e:
                    raise ConfigError(f"data.sources ({src.path}).schema: {e}") from e
            return {"schema": schema,
                    "labels": ie.LabelOptions(src.max_labels, src.schema_split)}
    return {}
