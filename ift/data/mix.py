"""Mixing: which sources a mixture keeps, how many times each kept row of a source is
drawn, the val split, and what drawing makes of a shard of tokenized rows.

Pure functions over counts, hashes and Arrow tables (no Ray, no files): the draw plan of a
source read off the index of kept rows (`draw_source`, `merge_draws`), one shard's rows
drawn, shuffled and packed (`draw_shard`), the split statistics (`mix_stats`) and the
manifest of a re-mixed dataset (`child_manifest`). The Ray Data pipeline
(ift.data.pipeline) runs them over the shards of `prepare` and of a sweep's re-mix with
the same seed, so a mixture is a deterministic function of (rows, weight or count, seed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ift.data import pack


def select(sources: dict[str, dict[str, Any]], *, weights: dict[str, float | None] | None = None,
           counts: dict[str, int | None] | None = None, include_tags: list[str] | None = None,
           exclude_tags: list[str] | None = None) -> dict[str, tuple[float | None, int | None]]:
    """The mixing rules, in one place: which of a prepared dataset's sources (its manifest's
    `sources`: name -> {tags, weight, count, ...}) a mixture keeps, with what (weight, count).

    `include_tags` keeps only sources carrying one of the tags; `exclude_tags` drops sources
    carrying any (the "without cot" arm). A source named in `counts` takes that count, one
    named in `weights` that weight (None in either keeps the prepared value); the others
    keep their prepared weight or count. Names outside `sources` are the caller's to refuse.
    """
    weights, counts = dict(weights or {}), dict(counts or {})
    kept: dict[str, tuple[float | None, int | None]] = {}
    for name, src in sources.items():
        tags = set(src.get("tags") or [])
        if include_tags and not tags & set(include_tags):
            continue
        if exclude_tags and tags & set(exclude_tags):
            continue
        if counts.get(name) is not None:
            kept[name] = (None, int(counts[name]))
        elif weights.get(name) is not None:
            kept[name] = (float(weights[name]), None)
        else:
            kept[name] = (src.get("weight"), src.get("count"))
    return kept


def multiplicities(n: int, *, weight: float | None = None, count: int | None = None,
                   seed: int = 0, salt: str = "") -> np.ndarray:
    """Draws per row for a source of `n` rows (row order = sorted keys).

    weight w: every row floor(w) times, plus round(frac(w) * n) rows drawn once more without
    replacement. count c: floor(c / n) times each, plus c mod n rows drawn once more.
    Neither: every row once.
    """
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if weight is None and count is None:
        return np.ones(n, dtype=np.int64)
    if count is not None:
        whole, extra = divmod(int(count), n)
    else:
        whole = int(np.floor(weight))
        extra = int(round((weight - whole) * n))
        extra = min(extra, n)
    out = np.full(n, whole, dtype=np.int64)
    if extra:
        rng = np.random.default_rng(_seed(seed, salt))
        out[rng.choice(n, size=extra, replace=False)] += 1
    return out


def _seed(seed: int, salt: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def split_scores(hashes: list[str], seed: int) -> np.ndarray:
    """A uniform [0, 1) score per row from its content hash and the seed (for the val split)."""
    out = np.empty(len(hashes), dtype=np.float64)
    s = str(seed).encode()
    for i, h in enumerate(hashes):
        d = hashlib.blake2b(s + h.encode(), digest_size=8).digest()
        out[i] = int.from_bytes(d, "little") / 2**64
    return out


def assign_val(scores: np.ndarray, val_ratio: float, val_max_rows: int) -> np.ndarray:
    """Boolean mask of rows held out: score < val_ratio, capped to the lowest-scored rows.

    Rows of one split group share a score; the cap keeps or drops a group whole (so it may
    hold out fewer than val_max_rows rows when a group straddles the cut).
    """
    is_val = scores < val_ratio
    if is_val.sum() > val_max_rows:
        cut = np.sort(scores, kind="stable")[val_max_rows]
        is_val = scores < cut
    return is_val


def dedupe_first(hashes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Mask of rows kept: for every hash, the row with the smallest key (sources, then files,
    then lines, in config order) wins."""
    if len(keys) == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((keys, hashes))
    sorted_h = hashes[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_h[1:] != sorted_h[:-1]
    keep = np.zeros(len(keys), dtype=bool)
    keep[order[first]] = True
    return keep


LINE_BITS = 36
"""A row key's low bits: the line (or index) within its file, and above it the chunk."""
LINE_MASK = (1 << LINE_BITS) - 1
CHUNK_SHIFT = 28
"""Records beyond the first that one row makes (an IE row's schema chunks) carry their
chunk number in the key bits from here up to LINE_BITS; the line is below."""


def make_key(file_index: int | np.ndarray, line: int | np.ndarray, chunk: int = 0):
    """A stable int64 row key: (global file index, chunk of the row, line or index within
    the file)."""
    return (np.int64(file_index) << np.int64(LINE_BITS)) | np.int64(
        line | (chunk << CHUNK_SHIFT))


def key_line(key: int) -> int:
    """The line (or index) within its file of a row key."""
    return int(key) & ((1 << CHUNK_SHIFT) - 1)


def key_chunk(keys: np.ndarray) -> np.ndarray:
    """The chunk numbers of row keys (0: the first record a row made)."""
    return (keys & LINE_MASK) >> CHUNK_SHIFT


def key_file(key: int) -> int:
    """The global file index of a row key."""
    return int(key) >> LINE_BITS


class SourceDraw(NamedTuple):
    """How one source's kept rows are drawn (`draw_source`), per index row in key order."""

    keys: np.ndarray
    counts: np.ndarray
    """Draws per row: train rows by the source's weight or count, val rows once."""
    is_val: np.ndarray
    rows_sampled: int
    rows_val: int
    train_lengths: np.ndarray
    """num_tokens of every drawn train sample (a row drawn twice counts twice)."""
    val_lengths: np.ndarray
    shards: list[str]
    """The ingest partitions (`split=` folders) that hold a drawn row, sorted."""


def draw_source(index: pa.Table, name: str, *, weight: float | None, count: int | None,
                seed: int) -> SourceDraw:
    """The draw plan of source `name` from a prepared dataset's index of kept rows (key,
    source, split, shard, num_tokens; sorted by key): each train row by `multiplicities`,
    each val row once."""
    t = index.filter(pc.field("source") == name)
    k = t.column("key").to_numpy()  # the index is sorted by key
    n_tok = t.column("num_tokens").to_numpy()
    val = np.asarray(t.column("split").to_numpy(zero_copy_only=False)) == "val"
    c = np.ones(len(k), dtype=np.int64)
    c[~val] = multiplicities(int((~val).sum()), weight=weight, count=count, seed=seed,
                             salt=name)
    # The shards that hold drawn rows (val candidates past the val cap train).
    shards = np.asarray(t.column("shard").to_numpy(zero_copy_only=False), dtype=object)
    return SourceDraw(
        keys=k, counts=c, is_val=val, rows_sampled=int(c[~val].sum()), rows_val=int(val.sum()),
        train_lengths=np.repeat(n_tok[~val], c[~val]), val_lengths=n_tok[val],
        shards=sorted(set(shards[c > 0])))


class Draws(NamedTuple):
    """The draw arrays of a whole mixture, sorted by key: what every shard task looks up."""

    keys: np.ndarray
    counts: np.ndarray
    is_val: np.ndarray


def merge_draws(plans: Iterable[SourceDraw]) -> Draws:
    """The sources' draw plans as one key-sorted lookup."""
    ps = list(plans)
    keys = np.concatenate([p.keys for p in ps]) if ps else np.zeros(0, np.int64)
    order = np.argsort(keys, kind="stable")
    return Draws(keys[order],
                 np.concatenate([p.counts for p in ps] or [np.zeros(0, np.int64)])[order],
                 np.concatenate([p.is_val for p in ps] or [np.zeros(0, bool)])[order])


SHARD_COLUMNS = ["key", "id", "input_ids", "labels", "num_tokens", "num_trainable"]
"""The columns of a per-source shard that drawing reads."""
STATS_SCHEMA = pa.schema([
    ("split", pa.string()), ("rows", pa.int64()), ("tokens", pa.int64()),
    ("trainable", pa.int64()), ("samples", pa.int64())])
"""What drawing one shard reports per split (`DrawnSplit.stats`)."""
PACK_CHUNK = 4096  # rows packed together; bins never span two chunks


class DrawnSplit(NamedTuple):
    """A shard's drawn rows of one split, in the order they are written, and their stats."""

    split: str
    rows: pa.Table
    stats: dict[str, Any]
    """One STATS_SCHEMA row."""


def draw_shard(table: pa.Table, source: str, draws: Draws, *, seed: int, item: int,
               pack_len: int) -> list[DrawnSplit]:
    """One per-source shard (SHARD_COLUMNS) drawn: train rows each by their count, val rows
    once, each split shuffled by a seed derived from (seed, item, split), then packed into
    bins of `pack_len` tokens when `pack_len` is not 0. Splits with no drawn row are left
    out; the rows keep id, source, tokens, labels and counts (packed: the bins' columns)."""
    keys, counts, is_val = draws
    k = table.column("key").to_numpy()
    pos = np.clip(np.searchsorted(keys, k), 0, max(len(keys) - 1, 0))
    found = (keys[pos] == k) if len(keys) else np.zeros(len(k), dtype=bool)
    table = table.append_column("source", pa.array([source] * table.num_rows, pa.string()))
    out = []
    for split, reps in (("train", np.where(found & ~is_val[pos], counts[pos], 0)),
                        ("val", (found & is_val[pos]).astype(np.int64))):
        take = np.repeat(np.arange(len(k)), reps)
        if len(take) == 0:
            continue
        # Shuffled by a seed derived from the shard, so re-runs give the same order.
        rng = np.random.default_rng([seed, item, 0 if split == "train" else 1])
        rows = table.take(pa.array(take[rng.permutation(len(take))], pa.int64())).select(
            ["id", "source", "input_ids", "labels", "num_tokens", "num_trainable"])
        if pack_len:
            rows = pa.concat_tables([pack_table(rows.slice(o, PACK_CHUNK), pack_len)
                                     for o in range(0, rows.num_rows, PACK_CHUNK)])
        out.append(DrawnSplit(split, rows, split_totals(split, rows, packed=bool(pack_len))))
    return out


def split_totals(split: str, rows: pa.Table, *, packed: bool) -> dict[str, Any]:
    """A STATS_SCHEMA row for a table of drawn rows (packed: bins, each of num_samples)."""
    return {
        "split": split, "rows": rows.num_rows,
        "tokens": int(pc.sum(rows.column("num_tokens")).as_py() or 0),
        "trainable": int(pc.sum(rows.column("num_trainable")).as_py() or 0),
        "samples": int(pc.sum(rows.column("num_samples")).as_py() or 0) if packed
        else rows.num_rows,
    }


def pack_table(table: pa.Table, pack_len: int) -> pa.Table:
    """Rows (id, source, input_ids, labels, ...) packed into bins of at most `pack_len`
    tokens (ift.data.pack.pack); a bin takes the id and source of its first sample."""
    rows = table.to_pylist()
    bins = pack.pack(rows, pack_len)
    ids = pa.list_(pa.int32())
    first = [rows[b["members"][0]] for b in bins]
    return pa.table({
        "id": pa.array([r["id"] for r in first], pa.string()),
        "source": pa.array([r["source"] for r in first], pa.string()),
        "input_ids": pa.array([b["input_ids"] for b in bins], ids),
        "labels": pa.array([b["labels"] for b in bins], ids),
        "position_ids": pa.array([b["position_ids"] for b in bins], ids),
        "seq_ids": pa.array([b["seq_ids"] for b in bins], ids),
        "num_tokens": pa.array([b["num_tokens"] for b in bins], pa.int32()),
        "num_trainable": pa.array([b["num_trainable"] for b in bins], pa.int32()),
        "num_samples": pa.array([b["num_samples"] for b in bins], pa.int32()),
    })


def mix_stats(plans: dict[str, SourceDraw], totals: dict[str, dict[str, int]],
              max_seq_len: int, *, packed: bool) -> dict[str, Any]:
    """What a mixture reports: rows drawn and held out per source, per-split statistics
    (`totals`: the summed STATS_SCHEMA rows of every shard, by split) and padding waste."""
    result: dict[str, Any] = {
        "rows_sampled": {n: p.rows_sampled for n, p in plans.items()},
        "rows_val": {n: p.rows_val for n, p in plans.items()},
        "splits": {},
    }
    for split in ("train", "val"):
        parts = [p.train_lengths if split == "train" else p.val_lengths for p in plans.values()]
        lens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        result["splits"][split] = split_stats(totals[split], lens, max_seq_len)
        if split == "train":
            rows, tokens = totals["train"]["rows"], totals["train"]["tokens"]
            result["padding_waste"] = {
                "unpacked": waste(lens, max_seq_len),
                "packed": (1.0 - tokens / max(1, rows * max_seq_len)) if packed else None,
            }
    return result


def waste(lengths: np.ndarray, max_seq_len: int) -> float:
    """The share of a batch of samples padded to max_seq_len that is padding."""
    if len(lengths) == 0:
        return 0.0
    return float(1.0 - lengths.sum() / (len(lengths) * max_seq_len))


def split_stats(totals: dict, sample_lengths: np.ndarray, max_seq_len: int) -> dict:
    """A manifest's statistics of one split: rows (bins when packed), samples, tokens and
    the samples' length distribution."""
    return {
        "rows": int(totals["rows"]),
        "samples": int(len(sample_lengths)),
        "tokens": int(totals["tokens"]),
        "trainable_tokens": int(totals["trainable"]),
        "length": length_stats(sample_lengths),
        "max_seq_len": max_seq_len,
    }


def length_stats(lengths: list[int] | np.ndarray) -> dict[str, float]:
    """mean, p50, p95 and max of token lengths."""
    a = np.asarray(lengths, dtype=np.float64)
    if len(a) == 0:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "max": int(a.max())}


def child_manifest(base: dict, prepared: str, chosen: dict[str, tuple[float | None, int | None]],
                   mixed: dict[str, Any], seed: int, created: str) -> dict:
    """The manifest of a dataset re-mixed from `prepared` (whose manifest is `base`): the
    chosen sources with their (weight, count), the mixture's statistics (`mix_stats`), and
    a hash of (base hash, mixture, seed); `parent` names `prepared`."""
    mix_desc = {n: {"weight": w, "count": c} for n, (w, c) in chosen.items()}
    digest = hashlib.sha256(json.dumps([base["hash"], mix_desc, seed], sort_keys=True)
                            .encode()).hexdigest()
    return {
        **base,
        "hash": digest,
        "parent": {"path": prepared, "hash": base["hash"]},
        "mixture": mix_desc,
        "seed": seed,
        "created": created,
        "splits": mixed["splits"],
        "padding_waste": mixed["padding_waste"],
        "sources": {
            n: {**base["sources"][n], "weight": w, "count": c,
                "rows_sampled": mixed["rows_sampled"].get(n, 0),
                "rows_val": mixed["rows_val"].get(n, 0)}
            for n, (w, c) in chosen.items()
        },
    }
