"""The driver's view of the ingest (no Ray): a few bytes per row read, collected as the
ingest tasks stream them in; then duplicates dropped across sources (the first in config
order wins), val capped per source, and the index of kept rows, `rejects/` and `dropped/`
written.

The ingest tasks (ift.data.pipeline) send one META_SCHEMA row per row read, its `split` one
of the codes below; `IngestLedger` takes them batch by batch and settles them once all are in.

Preference pairs (data.kind=preference) come back whole instead (PAIR_ROW_SCHEMA, from
ingest.pair_rows), and `settle_pairs` writes their shards: pair sets are small.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ift import storage
from ift.config import DataConfig
from ift.data import dataset, mix
from ift.data.dataset import (
    INDEX_FILE,
    MANIFEST_VERSION,
    PAIR_SCHEMA,
    PARTITIONS,
    PREFERENCE,
    SOURCES_DIR,
    PrepareError,
)

TRAIN, VAL, DROPPED, REJECTED = range(4)
"""What the ingest says of a row read (indices into dataset.PARTITIONS)."""
# One row per row read, back to the driver: enough to dedupe, split, count and report.
META_SCHEMA = pa.schema([
    ("key", pa.int64()), ("src", pa.int32()), ("split", pa.int8()), ("hash", pa.string()),
    ("group", pa.string()), ("lang", pa.string()), ("num_tokens", pa.int32()), ("id", pa.string()),
    ("reason", pa.string()), ("raw", pa.string()),
])


class Settled(NamedTuple):
    """What settling the ingest found (`IngestLedger.settle`)."""

    stats: dict[str, dict[str, int]]
    """Per source: rows_read, rows_rejected, rows_duplicate, rows_kept, rows_dropped,
    rows_schema_chunks."""
    langs: dict[str, dict[str, int]]
    """Per source: language code -> rows."""
    written: dict[str, list[str]]
    """"rejected" and "dropped": the sources with a file under rejects/ and dropped/."""


class IngestLedger:
    """A few bytes per row read (key, source, split code, content hash, split group,
    length, language code), and the rejected and dropped rows spooled to local JSONL as
    they stream in. `names` are the sources in config order (META_SCHEMA `src` indexes
    them); `files` the planned files by global file index (path, line_based)."""

    def __init__(self, names: list[str], files: list[dict]) -> None:
        self.names = list(names)
        self.files = files
        self.parts: dict[str, list[np.ndarray]] = defaultdict(list)
        self.langs: list[str] = []  # language code -> name
        self.tmp = tempfile.mkdtemp(prefix="ift-prepare-")
        self.spools: dict[tuple[str, str], Any] = {}

    def __enter__(self) -> IngestLedger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, b: pa.Table) -> None:
        """Take one batch of META_SCHEMA rows."""
        split = b.column("split").to_numpy()
        valid = split != REJECTED
        lang = b.column("lang").filter(pa.array(valid))
        self.langs.extend(x for x in pc.unique(lang).to_pylist() if x not in self.langs)
        codes = pc.index_in(lang, value_set=pa.array(self.langs, pa.string())).to_numpy(
            zero_copy_only=False)
        self.parts["key"].append(b.column("key").to_numpy()[valid])
        self.parts["src"].append(b.column("src").to_numpy()[valid].astype(np.int16))
        self.parts["split"].append(split[valid])
        self.parts["hash"].append(_fixed_bytes(b.column("hash").filter(pa.array(valid)), 32))
        self.parts["group"].append(_fixed_bytes(b.column("group").filter(pa.array(valid)), 32))
        self.parts["num_tokens"].append(b.column("num_tokens").to_numpy()[valid])
        self.parts["lang"].append(np.asarray(codes, dtype=np.int16))
        self.parts["rejected_src"].append(b.column("src").to_numpy()[~valid].astype(np.int16))
        side = b.filter(pa.array(split >= DROPPED))
        for r in side.to_pylist():
            part = "dropped" if r["split"] == DROPPED else "rejected"
            name = self.names[r["src"]]
            fh = self.spools.get((part, name))
            if fh is None:
                fh = self.spools[part, name] = open(
                    os.path.join(self.tmp, f"{part}-{len(self.spools)}.jsonl"), "w+",
                    encoding="utf-8")
            f = self.files[mix.key_file(r["key"])]
            entry = {"key": r["key"], **dataset.side_entry(
                part, name, f["path"], bool(f.get("line_based")), mix.key_line(r["key"]),
                r["reason"], raw=r["raw"], id=r["id"])}
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def _cat(self, name: str, dtype) -> np.ndarray:
        parts = self.parts.get(name) or []
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    def settle(self, out: str, d: DataConfig) -> Settled:
        """Counts and languages per source; duplicates dropped across sources (the first in
        config order wins, when d.dedupe); val capped (d.val_ratio, d.val_max_rows); the
        kept rows' index (`sources/_index.parquet`), rejects/ and dropped/ written under
        `out`."""
        keys, src = self._cat("key", np.int64), self._cat("src", np.int16)
        split, hashes = self._cat("split", np.int8), self._cat("hash", "S32")
        groups = self._cat("group", "S32")
        num_tokens, lang = self._cat("num_tokens", np.int32), self._cat("lang", np.int16)
        rejected_src = self._cat("rejected_src", np.int16)
        self.parts.clear()
        keep = mix.dedupe_first(hashes, keys) if d.dedupe else np.ones(len(keys), dtype=bool)
        dropped = split == DROPPED
        final_val = np.zeros(len(keys), dtype=bool)
        stats: dict[str, dict[str, int]] = {}
        langs: dict[str, dict[str, int]] = {}
        for si, name in enumerate(self.names):
            m = src == si
            n_rej = int((rejected_src == si).sum())
            n_chunks = int((m & (mix.key_chunk(keys) > 0)).sum())
            stats[name] = {
                "rows_read": int(m.sum()) + n_rej - n_chunks,
                "rows_rejected": n_rej,
                "rows_duplicate": int((m & ~keep).sum()),
                "rows_kept": int((m & keep).sum()),
                "rows_dropped": int((m & keep & dropped).sum()),
                "rows_schema_chunks": n_chunks,
            }
            codes, counts = np.unique(lang[m], return_counts=True)
            langs[name] = {self.langs[c]: int(n) for c, n in zip(codes, counts)}
            cand = np.nonzero(m & keep & (split == VAL))[0]
            scores = mix.split_scores([g.decode() for g in groups[cand]], d.seed)
            final_val[cand] = mix.assign_val(scores, d.val_ratio, d.val_max_rows)

        rows = np.nonzero(keep & ~dropped)[0]
        rows = rows[np.argsort(keys[rows], kind="stable")]
        _write_index(out, pa.table({
            "key": pa.array(keys[rows]),
            "source": pc.take(pa.array(self.names, pa.string()), pa.array(src[rows])),
            "split": pa.array(np.where(final_val[rows], "val", "train")),
            "shard": pc.take(pa.array(PARTITIONS, pa.string()), pa.array(split[rows])),
            "num_tokens": pa.array(num_tokens[rows]),
        }))
        kept_dropped = np.sort(keys[keep & dropped])
        written: dict[str, list[str]] = {"rejected": [], "dropped": []}
        for (part, name), fh in sorted(self.spools.items()):
            fh.seek(0)
            entries = sorted((json.loads(line) for line in fh), key=lambda e: e["key"])
            if part == "dropped":  # a dropped duplicate is counted as a duplicate, not here
                entries = [e for e in entries if _contains(kept_dropped, e["key"])]
            for e in entries:
                del e["key"]
            if entries:
                dataset.write_side_file(out, part, name, entries)
                written[part].append(name)
        return Settled(stats, langs, written)

    def close(self) -> None:
        """Close and remove the local spools."""
        for fh in self.spools.values():
            fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _contains(sorted_keys: np.ndarray, key: int) -> bool:
    i = np.searchsorted(sorted_keys, key)
    return bool(i < len(sorted_keys) and sorted_keys[i] == key)


def _fixed_bytes(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """Fixed-width strings as a numpy bytes array, without a Python object per row."""
    if len(column) == 0:
        return np.zeros(0, dtype=f"S{width}")
    a = pc.cast(column, pa.binary(width)).combine_chunks()
    return np.frombuffer(a.buffers()[1], f"S{width}", count=len(a), offset=a.offset * width)


def _write_index(prepared: str, index: pa.Table) -> None:
    fs, root = storage.arrow_fs(storage.join(prepared, SOURCES_DIR, INDEX_FILE))
    pq.write_table(index, root, filesystem=fs)


# ---------------------------------------------------------------------------------------
# Preference pairs (data.kind=preference): small sets, so the pairs' tokens come to the
# driver, which writes the shards itself.
# ---------------------------------------------------------------------------------------

# What a preference read task sends back per raw row (ingest.pair_rows): the pair's
# tokens when kept.
PAIR_ROW_SCHEMA = pa.schema([
    ("key", pa.int64()), ("src", pa.int32()), ("status", pa.string()), ("hash", pa.string()),
    ("lang", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string()),
    *[f for f in PAIR_SCHEMA],
])


def settle_pairs(rows: list[dict], sources, files: list[dict], d: DataConfig, out: str,
                 digest: str, identity: dict, template: str) -> dict:
    """A preference prepare's driver side, once every read task's rows (PAIR_ROW_SCHEMA,
    sorted by key) are in: drop exact duplicates (the first in config order wins), hold
    out val pairs by a hash of the pair (capped per source), draw each source's train pairs
    by its weight or count, write the train/ and val/ shards, rejects/ and dropped/;
    returns the manifest."""
    line_based = {f["path"]: f["line_based"] for f in files}
    path_of = {i: f["path"] for i, f in enumerate(files)}
    candidates = [r for r in rows if r["status"] in ("kept", "dropped")]
    keep = mix.dedupe_first(np.array([r["hash"].encode() for r in candidates], dtype="S32"),
                            np.array([r["key"] for r in candidates], np.int64)) \
        if d.dedupe and candidates else np.ones(len(candidates), bool)
    stats: dict[str, dict[str, Any]] = {s.name: {"rows_read": 0, "rows_rejected": 0,
                                                 "rows_duplicate": 0, "rows_kept": 0,
                                                 "rows_dropped": 0, "rows_sampled": 0,
                                                 "rows_val": 0, "langs": {}}
                                        for s in sources}
    for r in rows:
        stats[sources[r["src"]].name]["rows_read"] += 1
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    notes: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["status"] == "rejected":
            stats[r["source"]]["rows_rejected"] += 1
    for si, src in enumerate(sources):
        mine = [(r, k) for r, k in zip(candidates, keep) if r["src"] == si]
        st = stats[src.name]
        st["rows_duplicate"] = sum(1 for _, k in mine if not k)
        kept = [r for r, k in mine if k]
        st["rows_kept"] = len(kept)
        dropped = [r for r in kept if r["status"] == "dropped"]
        st["rows_dropped"] = len(dropped)
        for r in dropped:
            notes.setdefault(("dropped", src.name), []).append(r)
        good = [r for r in kept if r["status"] == "kept"]
        for r in good:
            st["langs"][r["lang"]] = st["langs"].get(r["lang"], 0) + 1
        is_val = mix.assign_val(mix.split_scores([r["hash"] for r in good], d.seed),
                                d.val_ratio, d.val_max_rows) if good else np.zeros(0, bool)
        train = [r for r, v in zip(good, is_val) if not v]
        val = [r for r, v in zip(good, is_val) if v]
        draws = mix.multiplicities(len(train), weight=src.weight, count=src.count,
                                   seed=d.seed, salt=src.name)
        drawn = [r for r, n in zip(train, draws) for _ in range(int(n))]
        st["rows_sampled"], st["rows_val"] = len(drawn), len(val)
        splits["train"].extend(drawn)
        splits["val"].extend(val)
    for r in rows:
        if r["status"] == "rejected":
            notes.setdefault(("rejected", r["source"]), []).append(r)

    if not splits["train"]:
        raise PrepareError("no preference pair survived conversion, validation and "
                           "truncation for the train split: "
                           + ", ".join(f"{k}: {v['rows_rejected']} rejected, "
                                       f"{v['rows_dropped']} dropped" for k, v in stats.items()))
    for split, chosen in splits.items():
        _write_pair_shards(out, split, chosen, d.shard_rows)
    written: dict[str, list[str]] = {"rejected": [], "dropped": []}
    for (part, name), entries in sorted(notes.items()):
        lines = []
        for e in entries:
            file = path_of[mix.key_file(e["key"])]
            lines.append(dataset.side_entry(part, name, file, line_based[file], e["line"],
                                            e["reason"], raw=e.get("raw") or "",
                                            id=e.get("id") or ""))
        dataset.write_side_file(out, part, name, lines)
        written[part].append(name)
    return {
        "version": MANIFEST_VERSION,
        "kind": PREFERENCE,
        "hash": digest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": identity,
        "template": template,
        "max_seq_len": d.max_seq_len,
        "packed": d.pack,  # pairs are packed per micro-batch when training
        "train_on_prompt": False,
        "seed": d.seed,
        "splits": {split: pair_split_stats(r, d.max_seq_len) for split, r in splits.items()},
        # both sides of every pair, each padded to max_seq_len
        "padding_waste": {"unpacked": mix.waste(np.array(
            [r[k] for r in splits["train"] for k in ("num_tokens", "rejected_num_tokens")],
            dtype=np.int64), d.max_seq_len),
                          "packed": 0.0 if d.pack else None},
        **dataset.side_manifest({"rejected": sum(s["rows_rejected"] for s in stats.values()),
                                 "dropped": sum(s["rows_dropped"] for s in stats.values())},
                                written),
        "sources": {
            s.name: {
                "path": s.path,
                "format": sorted({f["format"] for f in files if f["source"] == s.name}),
                "tags": list(s.tags), "weight": s.weight, "count": s.count,
                "files": [{k: f[k] for k in ("path", "format", "bytes", "sha256")}
                          for f in files if f["source"] == s.name],
                **stats[s.name],
            }
            for s in sources
        },
    }


def pair_split_stats(rows: list[dict], max_seq_len: int) -> dict[str, Any]:
    """Pair counts and the token lengths of the prompt and both sides."""
    chosen = [r["num_tokens"] for r in rows]
    rejected = [r["rejected_num_tokens"] for r in rows]
    return {
        "rows": len(rows),
        "pairs": len(rows),
        "samples": len(rows),
        "tokens": int(sum(chosen) + sum(rejected)),
        "trainable_tokens": int(sum(r["num_trainable"] + r["rejected_num_trainable"]
                                    for r in rows)),
        "length": mix.length_stats([max(c, r) for c, r in zip(chosen, rejected)]),
        "prompt_length": mix.length_stats([r["prompt_tokens"] for r in rows]),
        "chosen_length": mix.length_stats(chosen),
        "rejected_length": mix.length_stats(rejected),
        "chosen_reply_length": mix.length_stats([r["num_trainable"] for r in rows]),
        "rejected_reply_length": mix.length_stats([r["rejected_num_trainable"] for r in rows]),
        "max_seq_len": max_seq_len,
    }


def _write_pair_shards(out: str, split: str, rows: list[dict], shard_rows: int) -> None:
    folder = storage.join(out, split)
    storage.makedirs(folder)
    fs, root = storage.arrow_fs(folder)
    cap = max(1, shard_rows)
    for n, start in enumerate(range(0, len(rows), cap)):
        chunk = rows[start:start + cap]
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in PAIR_SCHEMA}
                                      for r in chunk], schema=PAIR_SCHEMA)
        pq.write_table(table, f"{root}/part-{n:05d}.parquet", filesystem=fs)
