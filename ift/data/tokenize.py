"""Tokenize rendered conversations and mask everything but the assistant turns.

Each record is rendered into `(text, trainable)` segments by its chat template, every
segment text of the batch is tokenized in one batched call (special tokens come from the
text itself, never added by the tokenizer), and the token lists are concatenated per
record. Labels copy the input ids on trainable segments and are -100 elsewhere, so the
loss covers exactly the assistant replies and their end-of-turn markers.

Tokenizing trainable and untrainable text separately (rather than the whole text, then
mapping character offsets to labels) keeps label boundaries exact and matches inference,
where the prompt is tokenized up to the generation prompt and the model produces the
reply tokens after it.
"""

from __future__ import annotations

import bisect
from typing import Any

from ift.data.templates import (
    Segment,
    TemplateError,
    resolve_template,
    segments,
    tokenizer_traits,
)

IGNORE_INDEX = -100
TRUNCATION = ("right", "left")


def tokenize_records(
    records: list[dict],
    tokenizer,
    *,
    template: str,
    max_seq_len: int,
    train_on_prompt: bool = False,
    truncation: str = "right",
) -> tuple[list[dict], list[dict]]:
    """Rows `{id, source, input_ids, labels, num_tokens, num_trainable}` and dropped records.

    Samples longer than `max_seq_len` are truncated: `right` cuts the end; `left` drops
    whole leading exchanges (a user turn and the replies after it), keeping the preamble
    (bos, system prompt), until the sample fits, then cuts from the left. A record that
    cannot be rendered, or keeps no trainable token, is returned in `dropped` as
    `{id, source, reason}`. A template that cannot mask turns at all raises TemplateError.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r} (allowed: {', '.join(TRUNCATION)})")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len}: must be >= 1")
    name = resolve_template(template, tokenizer)
    traits = tokenizer_traits(tokenizer)
    # Left truncation needs each token's exchange. Character offsets find exchange
    # boundaries inside a text run; slow tokenizers have none, so there runs stop at
    # exchange boundaries.
    offsets = truncation == "left" and bool(getattr(tokenizer, "is_fast", False))
    merge_exchanges = truncation == "right" or offsets

    dropped: list[dict] = []
    rendered: list[tuple[dict, list[_Run]]] = []
    text_ids: dict[str, int] = {}  # repeated texts (system prompts, headers) tokenize once
    for rec in records:
        try:
            segs = segments(rec, name, tokenizer, traits)
        except TemplateError:
            raise
        except ValueError as e:
            dropped.append(_drop(rec, f"cannot render with template {name!r}: {e}"))
            continue
        runs = _runs(segs, merge_exchanges=merge_exchanges)
        for run in runs:
            run.key = text_ids.setdefault(run.text, len(text_ids))
        rendered.append((rec, runs))

    texts = list(text_ids)
    encoded: list[list[int]] = []
    spans: list[list[tuple[int, int]]] = []
    if texts:
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(
            tokenizer, "is_fast", False) else None
        if backend is not None:
            # The Rust tokenizer directly: the same ids without transformers' per-row wrapping.
            encs = backend.encode_batch(texts, add_special_tokens=False)
            encoded = [e.ids for e in encs]
            spans = [e.offsets for e in encs] if offsets else [[] for _ in texts]
        else:
            enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
            encoded = enc["input_ids"]
            spans = enc["offset_mapping"] if offsets else [[] for _ in texts]

    rows: list[dict] = []
    for rec, runs in rendered:
        ids: list[int] = []
        labels: list[int] = []
        for run in runs:
            piece = encoded[run.key]
            ids.extend(piece)
            labels.extend(piece if run.trainable or train_on_prompt
                          else [IGNORE_INDEX] * len(piece))
        if not ids or not (train_on_prompt or any(run.trainable and encoded[run.key]
                                                  for run in runs)):
            dropped.append(_drop(rec, "no assistant turn to train on"))
            continue
        n = len(ids)
        if n > max_seq_len:
            if truncation == "right":
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            else:
                exchange = [ex for run in runs
                            for ex in run.token_exchanges(encoded[run.key], spans[run.key])]
                ids, labels = _truncate_left(ids, labels, exchange, max_seq_len)
        num_trainable = sum(1 for lab in labels if lab != IGNORE_INDEX)
        if num_trainable == 0:
            dropped.append(_drop(
                rec,
                f"no trainable token left after {truncation} truncation of {n} tokens "
                f"to max_seq_len={max_seq_len}",
            ))
            continue
        rows.append({
            "id": rec.get("id", ""),
            "source": rec.get("source", ""),
            "input_ids": ids,
            "labels": labels,
            "num_tokens": len(ids),
            "num_trainable": num_trainable,
        })
    return rows, dropped


class _Run:
    """Adjacent segments with the same trainable flag, tokenized as one text.

    Tokenizing the untrainable text between two replies in one piece gives the same
    tokens as tokenizing the rendered prompt at inference (a split inside it, such as
    between a separator and the next header, could change the tokens).
    """

    __slots__ = ("text", "trainable", "starts", "exchanges", "key")

    def __init__(self, trainable: bool) -> None:
        self.text = ""
        self.trainable = trainable
        self.starts: list[int] = []  # character offset of each segment in the run
        self.exchanges: list[int] = []
        self.key = -1

    def add(self, text: str, exchange: int) -> None:
        self.starts.append(len(self.text))
        self.exchanges.append(exchange)
        self.text += text

    def token_exchanges(self, ids: list[int], offsets: list[tuple[int, int]]) -> list[int]:
        """The exchange of each token: that of the segment where the token starts."""
        if len(set(self.exchanges)) == 1 or not offsets:
            return [self.exchanges[0]] * len(ids)
        return [self.exchanges[bisect.bisect_right(self.starts, start) - 1]
                for start, _ in offsets]


def _runs(segs: list[Segment], *, merge_exchanges: bool) -> list[_Run]:
    runs: list[_Run] = []
    for text, trainable, ex in segs:
        last = runs[-1] if runs else None
        if last is None or last.trainable != trainable or (
            not merge_exchanges and last.exchanges[-1] != ex
        ):
            last = _Run(trainable)
            runs.append(last)
        last.add(text, ex)
    return runs


def _truncate_left(ids: list[int], labels: list[int], exchange: list[int],
                   max_seq_len: int) -> tuple[list[int], list[int]]:
    """Drop leading exchanges after the preamble until the sample fits, then cut left."""
    preamble = sum(1 for ex in exchange if ex < 0)  # the preamble always comes first
    starts = [i for i in range(preamble, len(ids))
              if i == preamble or exchange[i] != exchange[i - 1]]
    # Keep the latest exchanges that fit beside the preamble (always the last one).
    keep_from = starts[-1]
    for s in reversed(starts):
        if preamble + len(ids) - s > max_seq_len:
            break
        keep_from = s
    body_ids, body_labels = ids[keep_from:], labels[keep_from:]
    if preamble + len(body_ids) <= max_seq_len:
        return ids[:preamble] + body_ids, labels[:preamble] + body_labels
    # The last exchange alone is too long: cut its start. The system prompt stays if it
    # leaves at least half the budget for the conversation.
    if preamble <= max_seq_len // 2:
        room = max_seq_len - preamble
        return ids[:preamble] + body_ids[-room:], labels[:preamble] + body_labels[-room:]
    return ids[-max_seq_len:], labels[-max_seq_len:]


def _drop(rec: dict[str, Any], reason: str) -> dict[str, Any]:
    return {"id": rec.get("id", ""), "source": rec.get("source", ""), "reason": reason}
