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
import dataclasses
import itertools
from typing import Any

import numpy as np

from ift.artifacts import IGNORE_INDEX
from ift.data.templates import (
    Segment,
    TemplateError,
    resolve_template,
    segments,
    tokenizer_traits,
)

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
    rows, dropped = _tokenize(records, tokenizer, template=template, max_seq_len=max_seq_len,
                              train_on_prompt=train_on_prompt, truncation=truncation)
    return [r for _, r in rows], [d for _, d in dropped]


def _tokenize(records: list[dict], tokenizer, *, template: str, max_seq_len: int,
              train_on_prompt: bool, truncation: str
              ) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    """`tokenize_records` with each row and dropped record paired with its position."""
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

    dropped: list[tuple[int, dict]] = []
    rendered, texts = _render(records, name, tokenizer, traits, merge_exchanges, dropped)
    encoded, spans = _encode(texts, tokenizer, offsets)

    rows: list[tuple[int, dict]] = []
    for pos, rec, runs in rendered:
        ids: list[int] = []
        labels: list[int] = []
        for run in runs:
            piece = encoded[run.key]
            ids.extend(piece)
            labels.extend(piece if run.trainable or train_on_prompt
                          else [IGNORE_INDEX] * len(piece))
        if not ids or not (train_on_prompt or any(run.trainable and encoded[run.key]
                                                  for run in runs)):
            dropped.append((pos, _drop(rec, "no assistant turn to train on")))
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
            dropped.append((pos, _drop(
                rec,
                f"no trainable token left after {truncation} truncation of {n} tokens "
                f"to max_seq_len={max_seq_len}",
            )))
            continue
        rows.append((pos, {
            "id": rec.get("id", ""),
            "source": rec.get("source", ""),
            "input_ids": ids,
            "labels": labels,
            "num_tokens": len(ids),
            "num_trainable": num_trainable,
        }))
    return rows, dropped


@dataclasses.dataclass
class TokenArrays:
    """Tokenized rows as flat arrays: row i is `input_ids[offsets[i]:offsets[i + 1]]`.

    The form Arrow list columns are built from without a Python object per token.
    """

    index: np.ndarray
    """Position in the input records of each row (records that were dropped are absent)."""
    offsets: np.ndarray
    """int64, one more than the rows."""
    input_ids: np.ndarray
    """int32, every row's ids end to end."""
    labels: np.ndarray
    """int32, like input_ids with IGNORE_INDEX where no loss is taken."""
    num_tokens: np.ndarray
    num_trainable: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


def tokenize_arrays(
    records: list[dict],
    tokenizer,
    *,
    template: str,
    max_seq_len: int,
    train_on_prompt: bool = False,
    truncation: str = "right",
) -> tuple[TokenArrays, list[tuple[int, str]]]:
    """`tokenize_records` with flat-array output; dropped records as (position, reason).

    Same tokens, labels and drop decisions as `tokenize_records`. Right truncation is
    computed with array operations; left truncation goes through `tokenize_records`.
    """
    if truncation != "right" or max_seq_len < 1:
        return _arrays_from_rows(*_tokenize(
            records, tokenizer, template=template, max_seq_len=max_seq_len,
            train_on_prompt=train_on_prompt, truncation=truncation))
    name = resolve_template(template, tokenizer)
    traits = tokenizer_traits(tokenizer)
    failed: list[tuple[int, dict]] = []
    rendered, texts = _render(records, name, tokenizer, traits, True, failed)
    encoded, _ = _encode(texts, tokenizer, False)
    dropped = [(i, d["reason"]) for i, d in failed]

    text_len = np.fromiter((len(e) for e in encoded), np.int64, count=len(encoded))
    text_flat = np.fromiter(itertools.chain.from_iterable(encoded), np.int32,
                            count=int(text_len.sum()))
    text_start = np.cumsum(text_len) - text_len
    run_key = np.fromiter((run.key for _, _, runs in rendered for run in runs), np.int64)
    run_train = np.fromiter((run.trainable for _, _, runs in rendered for run in runs), bool,
                            count=len(run_key))
    runs_per_row = np.fromiter((len(runs) for _, _, runs in rendered), np.int64, count=len(rendered))
    run_len = text_len[run_key]
    # Gather every run's tokens into one array, rows end to end.
    run_start = np.cumsum(run_len) - run_len
    ids = text_flat[np.arange(int(run_len.sum())) - np.repeat(run_start - text_start[run_key],
                                                              run_len)]
    trainable = np.repeat(run_train, run_len)
    run_row = np.repeat(np.arange(len(rendered)), runs_per_row)
    row_len = np.bincount(run_row, weights=run_len, minlength=len(rendered)).astype(np.int64)
    row_train = np.bincount(run_row, weights=run_len * run_train,
                            minlength=len(rendered)).astype(np.int64)
    row_start = np.cumsum(row_len) - row_len
    tok_row = np.repeat(np.arange(len(rendered)), row_len)
    in_len = (np.arange(len(ids)) - row_start[tok_row]) < max_seq_len
    labels = ids if train_on_prompt else np.where(trainable, ids, IGNORE_INDEX).astype(np.int32)
    kept_train = np.bincount(tok_row, weights=(labels != IGNORE_INDEX) & in_len,
                             minlength=len(rendered)).astype(np.int64)

    ok = (row_len > 0) & ((row_train > 0) | train_on_prompt) & (kept_train > 0)
    for r in np.nonzero(~ok)[0]:
        if row_len[r] == 0 or not (train_on_prompt or row_train[r] > 0):
            reason = "no assistant turn to train on"
        else:
            reason = (f"no trainable token left after right truncation of {row_len[r]} tokens "
                      f"to max_seq_len={max_seq_len}")
        dropped.append((rendered[r][0], reason))
    keep_tok = in_len & ok[tok_row]
    n_tok = np.minimum(row_len, max_seq_len)[ok]
    return TokenArrays(
        index=np.array([rendered[r][0] for r in np.nonzero(ok)[0]], np.int64),
        offsets=np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int64),
        input_ids=ids[keep_tok],
        labels=labels[keep_tok],
        num_tokens=n_tok.astype(np.int32),
        num_trainable=kept_train[ok].astype(np.int32),
    ), sorted(dropped)


def _arrays_from_rows(rows: list[tuple[int, dict]], dropped: list[tuple[int, dict]]
                      ) -> tuple[TokenArrays, list[tuple[int, str]]]:
    lens = np.array([r["num_tokens"] for _, r in rows], np.int64)
    return TokenArrays(
        index=np.array([i for i, _ in rows], np.int64),
        offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        input_ids=np.fromiter(itertools.chain.from_iterable(r["input_ids"] for _, r in rows),
                              np.int32, count=int(lens.sum())),
        labels=np.fromiter(itertools.chain.from_iterable(r["labels"] for _, r in rows),
                           np.int32, count=int(lens.sum())),
        num_tokens=lens.astype(np.int32),
        num_trainable=np.array([r["num_trainable"] for _, r in rows], np.int32),
    ), sorted((i, d["reason"]) for i, d in dropped)


def _render(records: list[dict], name: str, tokenizer, traits, merge_exchanges: bool,
            failed: list[tuple[int, dict]]) -> tuple[list[tuple[int, dict, list[_Run]]], list[str]]:
    """(position, record, runs) of each renderable record (run.key indexes the unique
    texts), and the texts. Records that cannot be rendered go to `failed` with their position."""
    rendered: list[tuple[int, dict, list[_Run]]] = []
    text_ids: dict[str, int] = {}  # repeated texts (system prompts, headers) tokenize once
    for i, rec in enumerate(records):
        try:
            segs = segments(rec, name, tokenizer, traits)
        except TemplateError:
            raise
        except ValueError as e:
            failed.append((i, _drop(rec, f"cannot render with template {name!r}: {e}")))
            continue
        runs = _runs(segs, merge_exchanges=merge_exchanges)
        for run in runs:
            run.key = text_ids.setdefault(run.text, len(text_ids))
        rendered.append((i, rec, runs))
    return rendered, list(text_ids)


def _encode(texts: list[str], tokenizer, offsets: bool
            ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids (and character offsets when asked) of each text, no special tokens added."""
    if not texts:
        return [], []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(
        tokenizer, "is_fast", False) else None
    if backend is not None:
        # The Rust tokenizer directly: the same ids without transformers' per-row wrapping.
        # Without offsets, encode_batch_fast: it skips computing them (the same ids, and
        # 1.3-1.45x faster on bench/data_prepare.py's rows).
        if offsets:
            encs = backend.encode_batch(texts, add_special_tokens=False)
            return [e.ids for e in encs], [e.offsets for e in encs]
        fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in fast(texts, add_special_tokens=False)], [[] for _ in texts]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    return enc["input_ids"], (enc["offset_mapping"] if offsets else [[] for _ in texts])


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
