"""The driver's view of the ingest: dedupe across sources, the val cap, the index of kept
rows, rejects/ and dropped/ (ift.data.settle), on hand-made META_SCHEMA batches."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from ift.config import DataConfig
from ift.data import mix
from ift.data.ingest import CHUNK_SHIFT
from ift.data.settle import DROPPED, META_SCHEMA, REJECTED, TRAIN, VAL, IngestLedger

NAMES = ["a", "b"]
FILES = [{"path": "/in/a.jsonl", "line_based": True}, {"path": "/in/b.json", "line_based": False}]


def _h(tag: str) -> str:
    return (tag * 32)[:32]


def _batch(rows: list[dict]) -> pa.Table:
    """META_SCHEMA rows; keys are (file, line) pairs."""
    full = [{"hash": None, "group": None, "lang": None, "num_tokens": 0, "id": None,
             "reason": None, "raw": None, **r, "key": int(mix.make_key(*r["key"]))}
            for r in rows]
    return pa.Table.from_pylist(full, schema=META_SCHEMA)


# Source a (file 0, by line): two kept rows, a rejected line, and a second schema chunk
# of line 2. Source b (file 1, by index): a duplicate of a's line 1, a dropped row, a
# kept row, and a dropped row that duplicates a's line 2 (a duplicate, not a dropped row).
A = _batch([
    {"key": (0, 1), "src": 0, "split": TRAIN, "hash": _h("1"), "group": _h("g1"), "lang": "en",
     "num_tokens": 11},
    {"key": (0, 2), "src": 0, "split": VAL, "hash": _h("2"), "group": _h("g2"), "lang": "en",
     "num_tokens": 12},
    {"key": (0, 3), "src": 0, "split": REJECTED, "reason": "not JSON", "raw": "{oops"},
    {"key": (0, 2 | (1 << CHUNK_SHIFT)), "src": 0, "split": TRAIN, "hash": _h("5"),
     "group": _h("g2"), "lang": "en", "num_tokens": 13},
])
B = _batch([
    {"key": (1, 0), "src": 1, "split": TRAIN, "hash": _h("1"), "group": _h("g1"), "lang": "en",
     "num_tokens": 11},
    {"key": (1, 1), "src": 1, "split": DROPPED, "hash": _h("3"), "group": _h("g3"), "lang": "zh",
     "id": "b-1-1", "reason": "no trainable token"},
    {"key": (1, 2), "src": 1, "split": TRAIN, "hash": _h("4"), "group": _h("g4"), "lang": "zh",
     "num_tokens": 14},
    {"key": (1, 3), "src": 1, "split": DROPPED, "hash": _h("2"), "group": _h("g2"), "lang": "en",
     "id": "b-1-3", "reason": "no trainable token"},
])


def _settle(tmp_path, batches, **data):
    out = tmp_path / "out"
    (out / "sources").mkdir(parents=True)  # the ingest's shards are there already
    with IngestLedger(NAMES, FILES) as ledger:
        for b in batches:
            ledger.add(b)
        # every val candidate here scores below 0.999: held out unless capped
        settled = ledger.settle(str(out), DataConfig(**{"val_ratio": 0.999, "seed": 0, **data}))
        spools = ledger.tmp
    assert not os.path.exists(spools)  # closed with the ledger
    return out, settled


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_first_source_in_config_order_keeps_a_duplicate(tmp_path):
    out, (stats, langs, written) = _settle(tmp_path, [B, A])  # b's rows arrive first
    assert stats == {
        "a": {"rows_read": 3, "rows_rejected": 1, "rows_duplicate": 0, "rows_kept": 3,
              "rows_dropped": 0, "rows_schema_chunks": 1},
        "b": {"rows_read": 4, "rows_rejected": 0, "rows_duplicate": 2, "rows_kept": 2,
              "rows_dropped": 1, "rows_schema_chunks": 0},
    }
    assert langs == {"a": {"en": 3}, "b": {"en": 2, "zh": 2}}
    assert written == {"rejected": ["a"], "dropped": ["b"]}
    index = pq.read_table(out / "sources" / "_index.parquet").to_pylist()
    assert index == [
        {"key": int(mix.make_key(0, 1)), "source": "a", "split": "train", "shard": "train",
         "num_tokens": 11},
        {"key": int(mix.make_key(0, 2)), "source": "a", "split": "val", "shard": "val",
         "num_tokens": 12},
        {"key": int(mix.make_key(0, 2 | (1 << CHUNK_SHIFT))), "source": "a", "split": "train",
         "shard": "train", "num_tokens": 13},
        {"key": int(mix.make_key(1, 2)), "source": "b", "split": "train", "shard": "train",
         "num_tokens": 14},
    ]


def test_rejects_and_dropped_rows_name_their_file_and_line_or_index(tmp_path):
    out, _ = _settle(tmp_path, [A, B])
    assert sorted(os.listdir(out / "rejects")) == ["a.jsonl"]
    assert sorted(os.listdir(out / "dropped")) == ["b.jsonl"]
    assert _jsonl(out / "rejects" / "a.jsonl") == [
        {"source": "a", "file": "/in/a.jsonl", "line": 3, "reason": "not JSON", "raw": "{oops"}]
    # b's index 3 is dropped too, but it duplicates a kept row: counted as a duplicate only
    assert _jsonl(out / "dropped" / "b.jsonl") == [
        {"source": "b", "file": "/in/b.json", "index": 1, "id": "b-1-1",
         "reason": "no trainable token"}]


def test_without_dedupe_duplicates_are_kept(tmp_path):
    out, (stats, _, written) = _settle(tmp_path, [A, B], dedupe=False)
    assert stats["b"]["rows_duplicate"] == 0
    assert stats["b"]["rows_kept"] == 4 and stats["b"]["rows_dropped"] == 2
    assert written == {"rejected": ["a"], "dropped": ["b"]}
    assert [e["index"] for e in _jsonl(out / "dropped" / "b.jsonl")] == [1, 3]
    index = pq.read_table(out / "sources" / "_index.parquet")
    assert index.column("source").to_pylist().count("b") == 2


def test_val_is_capped_per_source(tmp_path):
    rows = [{"key": (0, i), "src": 0, "split": VAL, "hash": _h(f"{i:x}"),
             "group": _h(f"{i:x}g"), "lang": "en", "num_tokens": 5} for i in range(1, 9)]
    rows += [{"key": (1, i), "src": 1, "split": VAL, "hash": _h(f"{i:x}b"),
              "group": _h(f"{i:x}h"), "lang": "en", "num_tokens": 5} for i in range(3)]
    out, (stats, _, written) = _settle(tmp_path, [_batch(rows)], val_max_rows=2)
    index = pq.read_table(out / "sources" / "_index.parquet").to_pylist()
    val = [r for r in index if r["split"] == "val"]
    assert [r["source"] for r in val].count("a") == 2 and [r["source"] for r in val].count("b") == 2
    # the candidates past the cap train, and stay in the val shard they were written to
    assert {r["shard"] for r in index} == {"val"} and len(index) == 11
    assert written == {"rejected": [], "dropped": []}
    assert not os.path.exists(out / "rejects") and not os.path.exists(out / "dropped")
