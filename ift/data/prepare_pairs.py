"""`ift data prepare` with data.kind=preference: pair sources in, tokenized pairs out.

One Ray Data task per read task (a file, or a newline-aligned byte range of one) reads,
converts (ift.data.preference), validates and tokenizes its pairs and streams them to the
driver; the driver drops exact duplicates (the first in config order wins), draws each
source's train pairs by its weight or count, holds out val pairs by a hash of the pair
(data.val_ratio, capped at data.val_max_rows per source), and writes

    train/part-NNNNN.parquet, val/...   id, source, input_ids, labels (the chosen side),
                                        rejected_input_ids, rejected_labels, token counts
    rejects/<source>.jsonl              pairs that could not be used, with file, line, reason
    dropped/<source>.jsonl              pairs whose reply kept no trainable token
    manifest.json                       kind "preference", pair counts, both sides' lengths

Preference sets are small next to SFT collections (tens of thousands of pairs), so
tokenized pairs pass through the driver; the SFT pipeline (ift.data.pipeline) is the one
built for millions of rows.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ift import storage
from ift.artifacts import MANIFEST_FILE
from ift.config import Config
from ift.data import mix
from ift.data.dataset import MANIFEST_VERSION, PrepareError
from ift.data.pipeline import (
    Inputs,
    _configure_data_context,
    _log,
    _task_of,
    _tokenizer,
    plan_inputs,
    reuse_or_clear,
)
from ift.data.preference import convert_pair, length_stats, pair_hash, tokenize_pairs
from ift.data.readers import iter_raw
from ift.data.record import ConvertError
from ift.raycluster import init_ray

KIND = "preference"
_IDS = pa.list_(pa.int32())
PAIR_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()),
    ("input_ids", _IDS), ("labels", _IDS),
    ("rejected_input_ids", _IDS), ("rejected_labels", _IDS),
    ("prompt_tokens", pa.int32()), ("num_tokens", pa.int32()),
    ("rejected_num_tokens", pa.int32()), ("num_trainable", pa.int32()),
    ("rejected_num_trainable", pa.int32()),
])
# What an ingest task sends back per raw row: the pair's tokens when kept.
_ROW_SCHEMA = pa.schema([
    ("key", pa.int64()), ("src", pa.int32()), ("status", pa.string()), ("hash", pa.string()),
    ("lang", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string()),
    *[f for f in PAIR_SCHEMA],
])


def _pairs_udf(batch: dict[str, np.ndarray], tok: dict) -> Iterator[pa.Table]:
    """One read task in; one _ROW_SCHEMA row per raw row out (kept, dropped or rejected)."""
    task = _task_of(batch)
    opts = json.loads(batch["options"][0])
    tokenizer = _tokenizer(tok["name"])
    out: list[dict[str, Any]] = []
    pending: list[tuple[int, int, dict]] = []

    def flush() -> None:
        rows, lost = tokenize_pairs([p for _, _, p in pending], tokenizer,
                                    template=tok["template"], max_seq_len=tok["max_seq_len"])
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
                                    source=task.source, task=opts["task"],
                                    system=opts["system"])
            except ConvertError as e:
                error = str(e)
        if error is not None:
            out.append({"key": key, "src": task.source_index, "status": "rejected",
                        "line": line, "reason": error, "raw": raw_text[:100_000],
                        "source": task.source})
            continue
        pending.append((key, line, pair))
        if len(pending) >= tok["batch_size"]:
            flush()
    if pending:
        flush()
    for i in range(0, len(out), 512):
        yield pa.Table.from_pylist(out[i:i + 512], schema=_ROW_SCHEMA)
    if not out:
        yield _ROW_SCHEMA.empty_table()


def prepare_pairs(cfg: Config, planned: Inputs | None = None, *, fresh: bool = False,
                  address: str | None = None) -> dict:
    """Prepare a preference dataset (planned by `plan_inputs` unless given); returns the
    manifest. Re-running with unchanged inputs and config reuses a complete output;
    `fresh` rebuilds it."""
    planned = planned or plan_inputs(cfg)
    out, tok_name, template, identity, sources, tasks, files, digest, _, _ = planned
    old = reuse_or_clear(out, digest, fresh)
    if old is not None:
        return old
    d = cfg.data

    init_ray(address)
    _configure_data_context()
    items = [{**dataclasses.asdict(t), "task_index": i, "options": json.dumps(
        {"task": sources[t.source_index].task, "system": sources[t.source_index].system})}
        for i, t in enumerate(tasks)]
    tok = {"name": tok_name, "template": template, "max_seq_len": d.max_seq_len,
           "batch_size": d.batch_size}
    _log(f"preference pairs: read, convert, validate, render template {template!r}, "
         f"tokenize both sides (max_seq_len {d.max_seq_len}) in {len(tasks)} tasks")
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _pairs_udf, batch_size=1, batch_format="numpy", num_cpus=d.num_cpus_per_task,
        fn_kwargs={"tok": tok})
    tables = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    rows.sort(key=lambda r: r["key"])
    manifest = _settle(rows, sources, files, cfg, out, digest, identity, template)
    storage.write_text(storage.join(out, MANIFEST_FILE),
                       json.dumps(manifest, indent=2, ensure_ascii=False))
    storage.mark_complete(out, digest)
    return manifest


def _settle(rows: list[dict], sources, files: list[dict], cfg: Config, out: str, digest: str,
            identity: dict, template: str) -> dict:
    """Dedupe, split, draw, write shards and reject files; the manifest."""
    d = cfg.data
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
        _write_shards(out, split, chosen, d.shard_rows)
    reject_files = []
    for (part, name), entries in sorted(notes.items()):
        folder = "rejects" if part == "rejected" else "dropped"
        path = storage.join(out, folder, f"{name}.jsonl")
        lines = []
        for e in entries:
            file = path_of[mix.key_file(e["key"])]
            where = "line" if line_based[file] else "index"
            item = {"source": name, "file": file, where: e["line"], "reason": e["reason"]}
            if part == "rejected":
                item["raw"] = e["raw"]
            else:
                item["id"] = e["id"]
            lines.append(json.dumps(item, ensure_ascii=False) + "\n")
        storage.write_bytes(path, "".join(lines).encode("utf-8"))
        if part == "rejected":
            reject_files.append(path)
    total = sum(s["rows_read"] for s in stats.values())
    _log(f"read {total} pairs: {sum(s['rows_kept'] for s in stats.values())} kept, "
         f"{sum(s['rows_rejected'] for s in stats.values())} rejected, "
         f"{sum(s['rows_duplicate'] for s in stats.values())} duplicates, "
         f"{sum(s['rows_dropped'] for s in stats.values())} dropped by truncation")
    return {
        "version": MANIFEST_VERSION,
        "kind": KIND,
        "hash": digest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": identity,
        "template": template,
        "max_seq_len": d.max_seq_len,
        "packed": d.pack,  # pairs are packed per micro-batch when training
        "train_on_prompt": False,
        "seed": d.seed,
        "splits": {split: split_stats(r, d.max_seq_len) for split, r in splits.items()},
        "padding_waste": {"unpacked": _waste(splits["train"], d.max_seq_len),
                          "packed": 0.0 if d.pack else None},
        "rejects": {"total": sum(s["rows_rejected"] for s in stats.values()),
                    "files": reject_files},
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


def split_stats(rows: list[dict], max_seq_len: int) -> dict[str, Any]:
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
        "length": length_stats([max(c, r) for c, r in zip(chosen, rejected)]),
        "prompt_length": length_stats([r["prompt_tokens"] for r in rows]),
        "chosen_length": length_stats(chosen),
        "rejected_length": length_stats(rejected),
        "chosen_reply_length": length_stats([r["num_trainable"] for r in rows]),
        "rejected_reply_length": length_stats([r["rejected_num_trainable"] for r in rows]),
        "max_seq_len": max_seq_len,
    }


def _waste(rows: list[dict], max_seq_len: int) -> float:
    if not rows:
        return 0.0
    n = sum(r["num_tokens"] + r["rejected_num_tokens"] for r in rows)
    return float(1.0 - n / (2 * len(rows) * max_seq_len))


def _write_shards(out: str, split: str, rows: list[dict], shard_rows: int) -> None:
    folder = storage.join(out, split)
    storage.makedirs(folder)
    fs, root = storage.arrow_fs(folder)
    cap = max(1, shard_rows)
    for n, start in enumerate(range(0, len(rows), cap)):
        chunk = rows[start:start + cap]
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in PAIR_SCHEMA}
                                      for r in chunk], schema=PAIR_SCHEMA)
        pq.write_table(table, f"{root}/part-{n:05d}.parquet", filesystem=fs)
