"""Held-out items for `ift eval`: prompts, references and gold answers.

Two kinds of held-out data:

* A prepared dataset directory (its val split). Rows carry only `input_ids` and `labels`:
  the prompt is every token before the first trained token of the LAST assistant turn,
  the reference is that turn decoded, and the gold answer is the one the reference states
  (`parse_final_answer`), when it states one.
* Raw source files (a file, glob, folder or comma-separated list, in any format `ift data
  prepare` reads). Each row is converted to the unified record with the data seed, so a
  CoT question gets the same prompt template it got in training; the prompt is rendered
  with `render_prompt(messages[:-1])`, the reference is the last assistant turn and the
  gold answer is `meta["answer"]` (FLAN CoT rows) or the one the reference states.

Loss rows (input_ids + labels) come from the same items, so loss, perplexity and the
generation metrics describe one held-out set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from ift import storage
from ift.artifacts import IGNORE_INDEX
from ift.config import ConfigError
from ift.data import ie
from ift.data.cot_templates import parse_final_answer
from ift.data.dataset import PrepareError, read_manifest, split_files
from ift.data.formats import convert
from ift.data.readers import detect_format, iter_raw, plan_reads
from ift.data.record import ConvertError
from ift.data.templates import render_prompt
from ift.data.tokenize import tokenize_records
from ift.eval.metrics import extract_options


@dataclass
class Item:
    """One held-out sample."""

    id: str
    prompt_ids: list[int]
    """Prompt tokens (the text ends with the start of an assistant turn)."""
    reference: str | None
    """The reference reply (None when the row has no assistant turn)."""
    gold: str | None
    """The gold final answer, when known."""
    options: dict[str, str] = field(default_factory=dict)
    """Multiple-choice options found in the last user turn or prompt."""
    prompt: str = ""
    """Prompt text as the model reads it."""
    ie: dict[str, Any] | None = None
    """IE rows: {task, gold, labels, ...} from the record's meta (ift.data.ie)."""
    task: str = ""
    """The record's task (raw files), which picks extra metrics (metrics.TASK_METRICS)."""


def split_last_turn(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt, reference) ids of a tokenized row: the reference is the last run of trained
    tokens (the last assistant turn with its end marker), the prompt everything before it.
    A row without trained tokens is all prompt."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    if end == 0:
        return list(input_ids), []
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(input_ids[:start]), list(input_ids[start:end])


def unpack(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A packed bin as its samples (by seq_ids); an unpacked row as itself."""
    seq = row.get("seq_ids")
    if seq is None:
        return [{"id": str(row["id"]), "input_ids": list(row["input_ids"]),
                 "labels": list(row["labels"])}]
    out = []
    for k in sorted({s for s in seq if s >= 0}):
        idx = [i for i, s in enumerate(seq) if s == k]
        out.append({"id": str(row["id"]) if k == 0 else f"{row['id']}#{k}",
                    "input_ids": [row["input_ids"][i] for i in idx],
                    "labels": [row["labels"][i] for i in idx]})
    return out


def is_prepared(path: str) -> bool:
    return storage.exists(storage.join(path, "manifest.json"))


def iter_prepared_rows(prepared: str, split: str = "val", *,
                       key: str = "eval.data") -> Iterator[dict[str, Any]]:
    """Every (unpacked) tokenized row of a prepared split, in file order. Errors name the
    config key that gave the directory."""
    try:
        read_manifest(prepared)
    except PrepareError as e:
        raise ConfigError(f"{key}={prepared}: {e}") from e
    files = split_files(prepared, split)
    if not files:
        raise ConfigError(f"{key}={prepared}: the {split} split has no parquet files "
                          f"(prepare with data.val_ratio > 0, or point {key} at raw files)")
    for f in files:
        fs, inner = storage.arrow_fs(f)
        table = pq.read_table(inner, filesystem=fs)
        cols = [c for c in ("id", "input_ids", "labels", "seq_ids") if c in table.column_names]
        for row in table.select(cols).to_pylist():
            yield from unpack(row)


def prepared_rows(prepared: str, split: str = "val") -> list[dict[str, Any]]:
    """Every (unpacked) tokenized row of a prepared split, in file order."""
    return list(iter_prepared_rows(prepared, split))


def items_from_rows(rows: list[dict[str, Any]], tokenizer) -> list[Item]:
    """Held-out items from tokenized rows (see the module docstring)."""
    items = []
    for row in rows:
        prompt, ref = split_last_turn(row["input_ids"], row["labels"])
        reference = tokenizer.decode(ref, skip_special_tokens=True) if ref else None
        prompt_text = tokenizer.decode(prompt, skip_special_tokens=False)
        items.append(Item(
            id=str(row["id"]), prompt_ids=prompt, reference=reference,
            gold=parse_final_answer(reference) if reference else None,
            options=extract_options(prompt_text), prompt=prompt_text,
        ))
    return items


def iter_raw_records(data: str, *, seed: int = 42, key: str = "eval.data",
                     sources: list | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", unified record) for each row of raw files (a file, glob, folder or
    comma-separated list, in any format `ift data prepare` reads), in file order. A missing
    file, or a row that cannot be read or converted, is an error naming the config key that
    gave `data` and the file and line.

    IE rows (ift.data.ie) are read with the schema and label options of the first of
    `sources` (data.sources) in the same format, as training read them."""
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
        tasks, _ = plan_reads("heldout", 0, files, "auto", 0, 0)
    except ValueError as e:
        raise ConfigError(f"{key}={data!r}: {e}") from e
    for task in tasks:
        stem = os.path.splitext(os.path.basename(task.file))[0]
        for line, raw, err, _text in iter_raw(task):
            where = f"{task.file}:{line}"
            if raw is None:
                raise ConfigError(f"{key}: {where}: cannot read row: {err}")
            try:
                if task.format in ie.FORMATS:
                    recs = ie.to_records(task.format, raw, id=f"{stem}:{line}", source=stem,
                                         seed=seed, **_ie_options(task.format, sources or []))
                else:
                    recs = [convert(task.format, raw, id=f"{stem}:{line}", source=stem,
                                    seed=seed)]
            except ConvertError as e:
                raise ConfigError(f"{key}: {where}: cannot convert row: {e}") from e
            for rec in recs:
                yield where, rec


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


def raw_records(data: str, *, seed: int, sources: list | None = None) -> list[dict[str, Any]]:
    """Unified records of raw held-out files, in file order. A row that cannot be read or
    converted is an error naming its file and line (a held-out set must be whole)."""
    records = [rec for _where, rec in iter_raw_records(data, seed=seed, sources=sources)]
    if not records:
        raise ConfigError(f"eval.data={data!r}: no rows")
    return records


def items_from_records(records: list[dict[str, Any]], tokenizer, template: str) -> list[Item]:
    """Held-out items from unified records: the prompt is everything before the last
    assistant turn, rendered for generation (see the module docstring)."""
    items = []
    for rec in records:
        msgs = [dict(m) for m in rec["messages"]]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        history = msgs if last is None else msgs[:last]
        reference = None if last is None else msgs[last]["content"]
        meta = rec.get("meta") or {}
        try:
            text = render_prompt(history, tokenizer, template, rec.get("system") or "",
                                 meta=meta)
        except ValueError as e:
            raise ConfigError(f"eval.data: record {rec['id']}: cannot render the prompt: {e}") \
                from e
        gold = meta.get("answer")
        if not isinstance(gold, str) or not gold.strip():
            gold = parse_final_answer(reference) if reference else None
        user = next((m["content"] for m in reversed(history) if m["role"] == "user"), "")
        items.append(Item(
            id=str(rec["id"]),
            prompt_ids=tokenizer(text, add_special_tokens=False)["input_ids"],
            reference=reference, gold=gold, options=extract_options(user), prompt=text,
            ie=meta.get("ie") if isinstance(meta.get("ie"), dict) else None,
            task=str(rec.get("task") or ""),
        ))
    return items


def loss_rows_from_records(records: list[dict[str, Any]], tokenizer, template: str,
                           max_seq_len: int) -> list[dict[str, Any]]:
    """Tokenized, masked rows of the records that have an assistant turn (for the loss)."""
    rows, _dropped = tokenize_records(
        [r for r in records if any(m["role"] == "assistant" for m in r["messages"])],
        tokenizer, template=template, max_seq_len=max_seq_len)
    return rows
