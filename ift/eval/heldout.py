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
  gold answer is `meta["answer"]` (FLAN CoT rows) or the one the reference states. A
  conversation that ends in a user turn is scored on its last answered turn: that question
  has no reference, so it is left out of the prompt (`ift predict` answers it).

Loss rows (input_ids + labels) come from the same items, so loss, perplexity and the
generation metrics describe one held-out set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ift.config import ConfigError
from ift.data.cot_templates import parse_final_answer
from ift.data.ingest import iter_raw_records
from ift.data.templates import render_prompt
from ift.data.tokenize import split_last_turn, tokenize_records
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


def items_from_rows(rows: list[dict[str, Any]], tokenizer) -> list[Item]:
    """Held-out items from tokenized rows (see the module docstring)."""
    items = []
    for row in rows:
        prompt, ref = split_last_turn(row["input_ids"], row["labels"])
        reference = tokenizer.decode(ref, skip_special_tokens=True) if ref else None
        prompt_text = tokenizer.decode(prompt, skip_special_tokens=False)
        # Options from the text without special tokens: the last option of a ChatML turn
        # would otherwise end in <|im_end|> and match no answer.
        options = extract_options(tokenizer.decode(prompt, skip_special_tokens=True))
        items.append(Item(
            id=str(row["id"]), prompt_ids=prompt, reference=reference,
            gold=parse_final_answer(reference) if reference else None,
            options=options, prompt=prompt_text,
        ))
    return items


def raw_records(data: str, *, seed: int, sources: list | None = None,
                placeholders: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Unified records of raw held-out files, in file order, {{name}} placeholders filled.
    A row that cannot be read or converted is an error naming its file and line (a
    held-out set must be whole)."""
    records = [rec for _where, rec in iter_raw_records(data, seed=seed, sources=sources,
                                                       placeholders=placeholders)]
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
