"""Mixture rules and arithmetic: which sources a mixture keeps, how many times each kept row
of a source is drawn, and the split.

Pure functions over counts and hashes; the pipeline and the sweep's re-mix call them with
the same seed, so a mixture is a deterministic function of (rows, weight or count, seed).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


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
"""A row key's low bits: the line (or index) within its file."""
LINE_MASK = (1 << LINE_BITS) - 1


def make_key(file_index: int | np.ndarray, line: int | np.ndarray):
    """A stable int64 row key: (global file index, line or index within the file)."""
    return (np.int64(file_index) << np.int64(LINE_BITS)) | np.int64(line)


def key_file(key: int) -> int:
    """The global file index of a row key."""
    return int(key) >> LINE_BITS
