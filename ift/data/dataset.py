"""A prepared dataset on disk: its layout, its manifest and its readers (no Ray).

`ift data prepare` (ift.data.pipeline) writes it; evaluation, predict, reference
log-probs and inspection read its rows through this module (`iter_split_rows`,
`iter_samples`), training streams its split files (`split_files`) into Ray Data.

    PREPARED/
      manifest.json              counts, token statistics, rejects, hashes (read_manifest)
      train/ val/                parquet shards the trainer reads (split_files)
      sources/source=S/split=X/  tokenized rows per source, before mixing
      sources/_index.parquet     the kept rows: key, source, split, shard, num_tokens (load_index)
      rejects/ dropped/          JSONL of rows that were rejected or kept no trainable token

A preference dataset (manifest "kind": "preference") has train/ and val/ shards of
PAIR_SCHEMA rows, rejects/ and dropped/, and no sources/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ift import storage
from ift.artifacts import MANIFEST_FILE
from ift.config import ConfigError, InputError
from ift.data.pack import unpack

MANIFEST_VERSION = 2  # 2: sources/_index.parquet; shards may hold duplicates
SOURCES_DIR = "sources"
INDEX_FILE = "_index.parquet"  # the "_" keeps it out of hive-partitioned dataset reads
PARTITIONS = ("train", "val", "dropped", "rejected")  # what the ingest says of each row
_IDS = pa.list_(pa.int32())
SHARD_SCHEMA = pa.schema([
    ("key", pa.int64()), ("id", pa.string()), ("lang", pa.string()), ("task", pa.string()),
    ("input_ids", _IDS), ("labels", _IDS), ("num_tokens", pa.int32()),
    ("num_trainable", pa.int32()),
])
PREFERENCE = "preference"
"""The manifest "kind" of a prepared preference dataset (PAIR_SCHEMA shards)."""
PAIR_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()),
    ("input_ids", _IDS), ("labels", _IDS),
    ("rejected_input_ids", _IDS), ("rejected_labels", _IDS),
    ("prompt_tokens", pa.int32()), ("num_tokens", pa.int32()),
    ("rejected_num_tokens", pa.int32()), ("num_trainable", pa.int32()),
    ("rejected_num_trainable", pa.int32()),
])
"""The train/ and val/ shards of a preference dataset (manifest kind "preference"):
input_ids and labels are the chosen side, rejected_* the rejected one."""


SIDE_DIRS = {"rejected": "rejects", "dropped": "dropped"}
"""Where a prepare writes the rows it did not keep, one JSONL file per source:
rejects/<source>.jsonl (rows that could not be read, converted or validated, with their
raw text) and dropped/<source>.jsonl (records that kept no trainable token, by id)."""


def side_entry(part: str, source: str, file: str, line_based: bool, line: int, reason: str,
               *, raw: str = "", id: str = "") -> dict[str, Any]:
    """One line of rejects/ (`part` "rejected") or dropped/ ("dropped"): the source, the
    file and its line (or 0-based index, for files that are not line based) and why."""
    entry: dict[str, Any] = {"source": source, "file": file,
                             ("line" if line_based else "index"): line}
    if part == "dropped":
        entry["id"] = id
    entry["reason"] = reason
    if part == "rejected":
        entry["raw"] = raw
    return entry


def write_side_file(out: str, part: str, source: str, entries: list[dict[str, Any]]) -> None:
    """rejects/<source>.jsonl or dropped/<source>.jsonl under the prepared dir `out`."""
    storage.write_bytes(storage.join(out, SIDE_DIRS[part], f"{source}.jsonl"), "".join(
        json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8"))


def side_manifest(totals: dict[str, int], written: dict[str, list[str]]) -> dict[str, Any]:
    """The manifest's "rejects" and "dropped" sections: each part's row total and the
    files written (relative to the prepared dir)."""
    return {SIDE_DIRS[part]: {"total": int(totals[part]),
                              "files": [f"{SIDE_DIRS[part]}/{n}.jsonl"
                                        for n in sorted(written[part])]}
            for part in ("rejected", "dropped")}


class PrepareError(InputError):
    """Bad data-preparation input; the message names the file, source or key."""


def read_manifest(prepared: str) -> dict:
    """The manifest of a complete prepared directory, or a PrepareError saying what is wrong."""
    if not storage.exists(prepared):
        raise PrepareError(f"prepared dataset {prepared} does not exist; run `ift data prepare`")
    path = storage.join(prepared, MANIFEST_FILE)
    if not storage.exists(path):
        raise PrepareError(f"{prepared} has no {MANIFEST_FILE}: not a prepared dataset, or "
                           "preparation did not finish; re-run `ift data prepare`")
    if not storage.is_complete(prepared):
        raise PrepareError(f"{prepared} is partial (no {storage.COMPLETE_MARKER} marker): "
                           "preparation did not finish; re-run `ift data prepare`")
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        found = {list: "a list", str: "a string", bool: "a boolean",
                 type(None): "null"}.get(type(manifest), "a number")
        raise PrepareError(f"{path}: expected a JSON object, found {found}")
    for key in ("version", "hash", "tokenizer", "splits", "sources"):
        if key not in manifest:
            raise PrepareError(f"{path}: missing key {key!r}")
    return manifest


def is_prepared(path: str) -> bool:
    """Whether `path` holds a prepared dataset (a manifest), complete or not."""
    return storage.exists(storage.join(path, MANIFEST_FILE))


def split_files(prepared: str, split: str) -> list[str]:
    """The parquet shards of a split, sorted."""
    return [f for f in storage.walk_files(storage.join(prepared, split)) if f.endswith(".parquet")]


def iter_split_rows(prepared: str, split: str, columns: list[str] | None = None
                    ) -> Iterator[dict[str, Any]]:
    """The rows of a split as written (packed bins stay bins), in file order, read batch by
    batch; `columns` keeps those of the listed columns a shard has (all when None), and only
    those are read."""
    for f in split_files(prepared, split):
        fs, inner = storage.arrow_fs(f)
        with fs.open_input_file(inner) as stream:
            shard = pq.ParquetFile(stream)
            names = shard.schema_arrow.names
            keep = None if columns is None else [c for c in columns if c in names]
            for batch in shard.iter_batches(batch_size=1024, columns=keep):
                yield from batch.to_pylist()


def iter_samples(prepared: str, split: str = "val", *,
                 key: str = "eval.data") -> Iterator[dict[str, Any]]:
    """Every tokenized sample of a split (id, input_ids, labels; packed bins unpacked), in
    file order. Errors are ConfigErrors naming the config key that gave the directory."""
    try:
        read_manifest(prepared)
    except PrepareError as e:
        raise ConfigError(f"{key}={prepared}: {e}") from e
    if not split_files(prepared, split):
        raise ConfigError(f"{key}={prepared}: the {split} split has no parquet files "
                          f"(prepare with data.val_ratio > 0, or point {key} at raw files)")
    for row in iter_split_rows(prepared, split, ["id", "input_ids", "labels", "seq_ids"]):
        yield from unpack(row)


def load_index(prepared: str) -> pa.Table:
    """The kept rows of a prepared dataset: key, source, split, shard, num_tokens (by key).

    Datasets prepared before the index existed hold exactly the kept rows in their
    `split=train|val` folders; their index is read off those.
    """
    path = storage.join(prepared, SOURCES_DIR, INDEX_FILE)
    if storage.exists(path):
        fs, root = storage.arrow_fs(path)
        return pq.read_table(root, filesystem=fs)

    fs, root = storage.arrow_fs(storage.join(prepared, SOURCES_DIR))
    part = pads.partitioning(pa.schema([("source", pa.string()), ("split", pa.string())]),
                             flavor="hive")
    try:
        ds = pads.dataset(root, filesystem=fs, format="parquet", partitioning=part)
        # An empty folder has no columns to select: nothing kept, like no folder.
        t = ds.to_table(columns=["key", "source", "split", "num_tokens"]) if ds.files else None
    except (FileNotFoundError, OSError):  # nothing kept
        t = None
    if t is None:
        t = pa.table({"key": pa.array([], pa.int64()), "source": pa.array([], pa.string()),
                      "split": pa.array([], pa.string()), "num_tokens": pa.array([], pa.int32())})
    t = t.append_column("shard", t.column("split"))
    return t.take(pc.sort_indices(t, [("key", "ascending")]))


def source_names(prepared: str) -> list[str]:
    """Sources with at least one kept row, sorted."""
    return sorted(pc.unique(load_index(prepared).column("source")).to_pylist())
