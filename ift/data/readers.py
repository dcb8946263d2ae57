"""Reading source files into raw rows: format detection, read planning, row iteration.

Line-based files (JSONL, TSV) are split into byte ranges that end on newline boundaries so
Ray Data can read them in parallel; each range knows the absolute line number of its first
line, so rejects name the real line of the file. JSON lists, CSV (fields may hold quoted
newlines), parquet and character-per-line NER files (one row per sentence) are read whole. Files are local paths or s3:// keys (ift.storage).

Rows come out raw (dicts as found); `ift.data.formats` turns them into records.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from ift import storage
from ift.config import InputError
from ift.data.formats import split_human_assistant
from ift.data.preference import pair_format_of

_BOM = b"\xef\xbb\xbf"
_HEAD_BYTES = 64 * 1024
_BLOCK_BYTES = 8 * 1024 * 1024
TSV_FIELDS = ("question", "answer", "rationale")


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading: a whole file or a newline-aligned byte range of one."""

    source: str
    """Source name."""
    source_index: int
    """Position of the source in the config."""
    file: str
    """Local path or s3://bucket/key."""
    file_index: int
    """Global index of the file in the plan (stable row keys)."""
    format: str
    """Resolved record format, never "auto"."""
    start: int
    """Byte offset of the chunk (0 for whole-file tasks)."""
    end: int
    """Byte end, exclusive (file size for whole-file tasks)."""
    first_line: int
    """1-based line number of the chunk's first line (1 for whole-file tasks)."""


def _ext(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    _, ext = os.path.splitext(name)
    return ext


def _container(path: str, fmt: str, head: bytes) -> str:
    """How a file is laid out: parquet, csv, tsv, json_list or jsonl."""
    ext = _ext(path)
    if ext == ".parquet":
        return "parquet"
    if ext == ".csv":
        return "csv"
    if ext == ".tsv" or fmt == "flan_cot_tsv":
        return "tsv"
    if fmt == "ner_bio":
        return "bio"
    # JSON: a list when the first non-blank character opens one, else one object per line.
    return "json_list" if head.lstrip(_BOM + b" \t\r\n")[:1] == b"[" else "jsonl"


class _NeedMoreHead(InputError):
    """The head ends before its first record does; read more of the file."""


def _first_records(path: str, head: bytes, limit: int = 5) -> list[Any]:
    text = head.lstrip(_BOM).decode("utf-8", errors="replace")
    stripped = text.lstrip()
    dec = json.JSONDecoder()
    records: list[Any] = []
    if stripped.startswith("["):
        pos = 1
        while len(records) < limit:
            while pos < len(stripped) and stripped[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(stripped) or stripped[pos] == "]":
                break
            try:
                obj, pos = dec.raw_decode(stripped, pos)
            except json.JSONDecodeError:
                break  # truncated head or a malformed record: judge by what parsed
            records.append(obj)
    else:
        lines = text.split("\n")
        complete = lines if len(lines) == 1 else lines[:-1]  # the last piece may be cut
        for line in complete:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
            if len(records) >= limit:
                break
    return records


def _looks_multiturn(text: Any) -> bool:
    if not isinstance(text, str) or "Human" not in text or "Assistant" not in text:
        return False
    try:
        turns = split_human_assistant(text)[1]
    except ValueError:
        return False
    roles = {r for r, _ in turns}
    return roles == {"user", "assistant"}


def _format_of(rec: dict[str, Any]) -> str | None:
    pair = pair_format_of(rec)  # chosen/rejected keys make any layout a preference pair
    if pair:
        return pair
    if "conversations" in rec:
        return "sharegpt"
    if "messages" in rec:
        return "openai"
    chat = rec.get("chat")
    if isinstance(chat, dict) and chat and all(str(k).startswith("turn_") for k in chat):
        return "moss"
    if "instruction" in rec and _looks_multiturn(rec.get("instruction")):
        return "alpaca_cot_multiturn"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    return _ie_format_of(rec)


def _ie_format_of(rec: dict[str, Any]) -> str | None:
    if "text" not in rec:
        return None
    if "spo_list" in rec:
        return "duie"
    if "event_list" in rec:
        return "duee"
    if "entity_list" in rec:
        return "ner_spans"
    if isinstance(rec.get("label"), dict):
        return "cluener"
    return None


BIO_EXTS = (".bio", ".bioes", ".bmes")
_BIO_LINE = re.compile(r"^\S+[ \t]+(O|[BIMES][-_]\S+)$")


def _looks_bio(head: bytes) -> bool:
    """Character-per-line tagged text: the first non-blank lines are `char tag`."""
    lines = head.lstrip(_BOM).decode("utf-8", errors="replace").splitlines()
    if len(lines) > 1:
        lines = lines[:-1]  # the head may cut the last line
    lines = [ln.strip() for ln in lines if ln.strip()][:20]
    return bool(lines) and all(_BIO_LINE.match(ln) for ln in lines)


def detect_format(path: str, head: bytes) -> str:
    """The record format of a file from its extension and first records (`head` = its first bytes).

    Raises ValueError naming the file and the keys seen when nothing fits.
    """
    ext = _ext(path)
    if ext == ".tsv":
        return "flan_cot_tsv"
    if ext in (".parquet", ".csv"):
        return "table"
    if ext in BIO_EXTS or (not head.lstrip(_BOM + b" \t\r\n").startswith((b"{", b"["))
                           and _looks_bio(head)):
        return "ner_bio"
    records = _first_records(path, head)
    if not records:
        if len(head.strip()) == 0:
            raise InputError(f"{path}: empty file, cannot detect its format")
        raise _NeedMoreHead(f"{path}: no complete JSON record in the first {len(head)} bytes")
    seen: list[str] = []
    for rec in records:
        if not isinstance(rec, dict):
            raise InputError(
                f"{path}: first records are {type(rec).__name__}, not JSON objects; "
                "set the source's format explicitly"
            )
        fmt = _format_of(rec)
        if fmt:
            return fmt
        seen.extend(k for k in rec if k not in seen)
    raise InputError(
        f"{path}: cannot detect the format from keys {seen}; expected conversations (sharegpt), "
        "messages (openai), chat with turn_N (moss), instruction/output (alpaca), "
        "text with spo_list (duie), event_list (duee), label (cluener) or entity_list "
        "(ner_spans); "
        "chosen/rejected or preferred_output/non_preferred_output (preference pairs); "
        "set format and columns on the source"
    )


def _detect_with_growing_head(path: str, size: int) -> str:
    n = min(size, _HEAD_BYTES)
    while True:
        head = storage.read_range(path, 0, n)
        try:
            return detect_format(path, head)
        except _NeedMoreHead:
            if n >= size:
                raise InputError(
                    f"{path}: no JSON record parses at the start of the file (is it valid JSON "
                    "or JSONL?); cannot detect its format") from None
            n = min(size, n * 4)


def _scan_line_file(path: str, size: int, chunk_bytes: int) -> tuple[list[tuple[int, int]], str]:
    """One sequential pass: sha256 and newline-aligned (start, first_line) chunk starts."""
    h = hashlib.sha256()
    starts = [(0, 1)]
    newlines = 0  # newlines in the file before byte `off + counted`
    next_min_end = chunk_bytes  # the current chunk ends at the first newline at or past this
    off = 0
    while off < size:
        block = storage.read_range(path, off, min(size, off + _BLOCK_BYTES))
        if not block:
            raise InputError(f"{path}: file shrank while reading (at byte {off} of {size})")
        h.update(block)
        counted = 0
        search_from = max(0, next_min_end - 1 - off)
        while search_from < len(block):
            nl = block.find(b"\n", search_from)
            if nl < 0 or off + nl + 1 >= size:
                break
            newlines += block.count(b"\n", counted, nl + 1)
            counted = nl + 1
            starts.append((off + nl + 1, newlines + 1))
            next_min_end = off + nl + 1 + chunk_bytes
            search_from = max(nl + 1, next_min_end - 1 - off)
        newlines += block.count(b"\n", counted)
        off += len(block)
    return starts, h.hexdigest()


def _sha256(path: str, size: int) -> str:
    h = hashlib.sha256()
    off = 0
    while off < size:
        block = storage.read_range(path, off, min(size, off + _BLOCK_BYTES))
        if not block:
            raise InputError(f"{path}: file shrank while reading (at byte {off} of {size})")
        h.update(block)
        off += len(block)
    return h.hexdigest()


def plan_reads(
    source: str,
    source_index: int,
    files: list[str],
    fmt: str,
    chunk_bytes: int,
    file_index_start: int,
    *,
    hash_files: bool = True,
) -> tuple[list[ReadTask], list[dict[str, Any]]]:
    """Read tasks for a source's files plus per-file info {path, format, bytes, sha256,
    line_based} (line_based: rows are addressed by 1-based line, else by 0-based index).
    `hash_files` False leaves sha256 None and reads no file whole (held-out reads, which
    record no hash).

    `fmt` "auto" is resolved per file. JSONL and TSV files are split into ranges of at least
    `chunk_bytes` (0 or less: whole files) ending on newlines; other layouts are whole-file tasks.
    """
    tasks: list[ReadTask] = []
    infos: list[dict[str, Any]] = []
    for i, path in enumerate(files):
        file_index = file_index_start + i
        size = storage.size(path)
        file_fmt = _detect_with_growing_head(path, size) if fmt == "auto" else fmt
        head = storage.read_range(path, 0, min(size, 4096))
        layout = _container(path, file_fmt, head)
        if layout in ("jsonl", "tsv") and chunk_bytes > 0 and size > 0:
            starts, digest = _scan_line_file(path, size, chunk_bytes)
            bounds = [s for s, _ in starts[1:]] + [size]
            for (start, first_line), end in zip(starts, bounds):
                tasks.append(ReadTask(source, source_index, path, file_index, file_fmt,
                                      start, end, first_line))
        else:
            digest = _sha256(path, size) if hash_files else None
            tasks.append(ReadTask(source, source_index, path, file_index, file_fmt, 0, size, 1))
        infos.append({"path": path, "format": file_fmt, "bytes": size, "sha256": digest,
                      "line_based": layout in ("jsonl", "tsv", "bio")})
    return tasks, infos


# ---------------------------------------------------------------------------------------
# Iterating rows
# ---------------------------------------------------------------------------------------

Row = tuple[int, "dict[str, Any] | None", "str | None", str]


def iter_raw(task: ReadTask) -> Iterator[Row]:
    """(line_or_index, raw dict or None, error reason or None, raw text) for each row of a task.

    JSONL/TSV rows carry 1-based line numbers; JSON list, parquet and CSV rows 0-based
    indices. Blank lines are not rows. A row that cannot be read has raw None and a reason.
    """
    if _ext(task.file) == ".parquet":
        yield from _iter_parquet(task)
        return
    data = storage.read_range(task.file, task.start, task.end)
    if task.start == 0 and data.startswith(_BOM):
        data = data[len(_BOM):]
        base = len(_BOM)
    else:
        base = task.start
    layout = _container(task.file, task.format, data if task.start == 0 else b"{")
    if layout == "csv":
        yield from _iter_csv(task, data)
    elif layout == "bio":
        yield from _iter_bio(data)
    elif layout == "json_list":
        yield from _iter_json_list(task, data)
    else:
        yield from _iter_lines(task, data, base, tsv=layout == "tsv")


def _iter_lines(task: ReadTask, data: bytes, base: int, *, tsv: bool) -> Iterator[Row]:
    pos = 0
    line_no = task.first_line
    n = len(data)
    while pos < n:
        nl = data.find(b"\n", pos)
        end = n if nl < 0 else nl
        line = data[pos:end]
        line_start = base + pos
        pos = end + 1
        this_line = line_no
        line_no += 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield (this_line, None, f"non-UTF-8 bytes at byte offset {line_start + e.start}",
                   line.decode("utf-8", errors="replace"))
            continue
        if tsv:
            yield _tsv_row(this_line, text)
        else:
            yield _jsonl_row(this_line, text)


def _tsv_row(line_no: int, text: str) -> Row:
    fields = text.split("\t")
    if len(fields) != len(TSV_FIELDS):
        return (line_no, None,
                f"TSV line has {len(fields)} tab-separated fields, expected 3 "
                "(question, answer, rationale)", text)
    return (line_no, dict(zip(TSV_FIELDS, fields)), None, text)


def _jsonl_row(line_no: int, text: str) -> Row:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return (line_no, None, f"malformed JSON: {e.msg} at column {e.colno}", text)
    if not isinstance(obj, dict):
        return (line_no, None, f"JSONL line is a {_json_type(obj)}, not an object", text)
    return (line_no, obj, None, text)


def _json_type(obj: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(obj), type(obj).__name__)


def _iter_json_list(task: ReadTask, data: bytes) -> Iterator[Row]:
    # surrogateescape keeps undecodable bytes as lone surrogates: the file still parses and
    # validation rejects just the rows that hold them ("non-UTF-8 bytes in turn N").
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"{task.file}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    if not isinstance(items, list):
        raise InputError(f"{task.file}: expected a JSON list of objects, found a {_json_type(items)}")
    for idx, item in enumerate(items):
        raw_text = json.dumps(item, ensure_ascii=False)
        if isinstance(item, dict):
            yield (idx, item, None, raw_text)
        else:
            yield (idx, None, f"list item is a {_json_type(item)}, not an object", raw_text)


def _iter_csv(task: ReadTask, data: bytes) -> Iterator[Row]:
    text = data.decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise InputError(f"{task.file}: unreadable CSV header: {e}") from None
    idx = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            # The reader cannot resynchronise after a broken quote; report and stop.
            raise InputError(f"{task.file}: CSV error at line {reader.line_num}: {e}") from None
        if not fields or all(not f.strip() for f in fields):
            continue
        raw_text = ",".join(fields)
        if len(fields) != len(header):
            yield (idx, None, f"CSV row has {len(fields)} fields, the header has {len(header)}",
                   raw_text)
        else:
            yield (idx, dict(zip(header, fields)), None, raw_text)
        idx += 1


def _iter_bio(data: bytes) -> Iterator[Row]:
    """One row {chars, tags} per sentence of a character-per-line file (`char tag` lines, a
    blank line between sentences), numbered by the sentence's first line. A line that is not
    `char tag` makes its sentence unreadable, naming the line."""
    text = data.decode("utf-8", errors="replace")
    chars: list[str] = []
    tags: list[str] = []
    first, error = 0, None
    raw_lines: list[str] = []

    def row() -> Row:
        raw_text = "\n".join(raw_lines)
        if error:
            return (first, None, error, raw_text)
        return (first, {"chars": chars, "tags": tags}, None, raw_text)

    for n, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            if raw_lines:
                yield row()
            chars, tags, raw_lines, error = [], [], [], None
            continue
        if not raw_lines:
            first = n
        raw_lines.append(line)
        parts = line.split()
        if len(parts) != 2 and error is None:
            error = f"line {n}: expected `char tag`, found {len(parts)} fields"
        elif len(parts) == 2:
            chars.append(parts[0])
            tags.append(parts[1])
    if raw_lines:
        yield row()


def _iter_parquet(task: ReadTask) -> Iterator[Row]:
    fs, inner = storage.arrow_fs(task.file)
    pf = pq.ParquetFile(inner, filesystem=fs)
    idx = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield (idx, row, None, json.dumps(row, ensure_ascii=False, default=str))
            idx += 1
