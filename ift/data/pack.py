"""Sequence packing: several tokenized samples per max_seq_len sequence.

Padding every sample to max_seq_len wastes most of a batch on short instruction data.
Packing concatenates samples into bins of at most max_seq_len tokens (first-fit
decreasing). Each bin carries position ids that restart at 0 for every sample and
sequence ids (0, 1, 2, ... per sample) so that attention can be kept inside a sample;
ift.train.collate turns them into what each attention kernel needs (a block mask, or one
flattened row whose position ids restart, for flash attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ift.artifacts import IGNORE_INDEX


def pack(rows: list[dict], max_seq_len: int) -> list[dict]:
    """Pack tokenized rows (`input_ids`, `labels`) into bins of <= max_seq_len tokens.

    First-fit decreasing: rows in order of decreasing length (ties by input order) go to
    the first bin with room. Deterministic for a given input. Within a bin, samples keep
    the order they were placed in. Each bin is `{input_ids, labels, position_ids, seq_ids,
    num_tokens, num_trainable, num_samples, members}`; `members` lists the indices in
    `rows` of the bin's samples, in seq_id order.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len}: must be >= 1")
    lengths = []
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        rid = row.get("id", i)
        if len(row["labels"]) != n:
            raise ValueError(
                f"row {rid}: {n} input_ids but {len(row['labels'])} labels"
            )
        if n == 0:
            raise ValueError(f"row {rid}: no tokens")
        if n > max_seq_len:
            raise ValueError(
                f"row {rid}: {n} tokens > max_seq_len={max_seq_len} (truncate before packing)"
            )
        lengths.append(n)

    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))
    tree = _FirstFit(len(rows), max_seq_len)
    members: list[list[int]] = []
    for i in order:
        b = tree.place(lengths[i])
        if b == len(members):
            members.append([])
        members[b].append(i)

    bins = []
    for idxs in members:
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        seq_ids: list[int] = []
        for s, i in enumerate(idxs):
            row = rows[i]
            input_ids.extend(row["input_ids"])
            labels.extend(row["labels"])
            position_ids.extend(range(lengths[i]))
            seq_ids.extend([s] * lengths[i])
        bins.append({
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "seq_ids": seq_ids,
            "num_tokens": len(input_ids),
            "num_trainable": sum(1 for lab in labels if lab != IGNORE_INDEX),
            "num_samples": len(idxs),
            "members": list(idxs),
        })
    return bins


class _FirstFit:
    """Leftmost bin with enough room in O(log n): a max segment tree over free space.

    Unopened bins have full capacity, so the leftmost fitting bin is an open one or the
    next new one.
    """

    def __init__(self, n: int, capacity: int) -> None:
        size = 1
        while size < max(n, 1):
            size *= 2
        self.size = size
        self.free = [capacity] * (2 * size)

    def place(self, length: int) -> int:
        node = 1
        while node < self.size:
            node = 2 * node if self.free[2 * node] >= length else 2 * node + 1
        b = node - self.size
        self.free[node] -= length
        node //= 2
        while node:
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
            node //= 2
        return b


def unpack(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The samples of a packed bin, split by seq_ids: `[{input_ids, labels}, ...]`, in
    order. A row with an `id` gives it to its first sample and `id#k` to the k-th; a row
    without `seq_ids` (unpacked) is its one sample."""
    if row.get("seq_ids") is None:
        runs = [{"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}]
    else:
        runs, current = [], None
        for tok, lab, sid in zip(row["input_ids"], row["labels"], row["seq_ids"]):
            if sid < 0:
                continue
            if sid != current:
                runs.append({"input_ids": [], "labels": []})
                current = sid
            runs[-1]["input_ids"].append(tok)
            runs[-1]["labels"].append(lab)
    if "id" not in row:
        return runs
    return [{"id": str(row["id"]) if k == 0 else f"{row['id']}#{k}", **r}
            for k, r in enumerate(runs)]


def padding_waste(lengths: Sequence[int], max_seq_len: int,
                  micro_batch_size: int | None = None) -> float:
    """Share of pad tokens when each sequence is padded.

    Without `micro_batch_size`, every sequence is padded to max_seq_len. With it, the
    sequences are taken in consecutive micro-batches of that size, each padded to its
    longest sequence (dynamic padding).
    """
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size}: must be >= 1")
    lengths = list(lengths)
    for i, n in enumerate(lengths):
        if n < 0 or n > max_seq_len:
            raise ValueError(f"lengths[{i}]={n}: must be in [0, max_seq_len={max_seq_len}]")
    if not lengths:
        return 0.0
    if micro_batch_size is None:
        total = max_seq_len * len(lengths)
    else:
        total = 0
        for start in range(0, len(lengths), micro_batch_size):
            chunk = lengths[start:start + micro_batch_size]
            total += max(chunk) * len(chunk)
    if total == 0:
        return 0.0
    return (total - sum(lengths)) / total
