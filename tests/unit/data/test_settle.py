"""The driver's view of the ingest: dedupe across sources, the val cap, the index of kept
rows, rejects/ and dropped/ (ift.data.settle), on hand-made META_SCHEMA batches; and the
settling of preference pairs (settle_pairs) on hand-made pair rows."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ift.config import DataConfig, SourceConfig
from ift.data import mix
from ift.data.dataset import PAIR_SCHEMA, PREFERENCE, PrepareError, iter_split_rows
from ift.data.settle import (
    DROPPED,
    META_SCHEMA,
    REJECTED,
    TRAIN,
    VAL,
    IngestLedger,
    settle_pairs,
)

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
    {"key": (0, 2 | (1 << mix.CHUNK_SHIFT)), "src": 0, "split": TRAIN, "hash": _h("5"),
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
        {"key": int(mix.make_key(0, 2 | (1 << mix.CHUNK_SHIFT))), "source": "a", "split": "train",
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


# ---------------------------------------------------------------------------------------
# Preference pairs: settle_pairs on hand-made rows of two sources
# ---------------------------------------------------------------------------------------

PAIR_FILES = [
    {"path": "/in/p.jsonl", "line_based": True, "source": "p", "format": "alpaca_pairs",
     "bytes": 10, "sha256": "aa"},
    {"path": "/in/q.json", "line_based": False, "source": "q", "format": "hh_rlhf",
     "bytes": 20, "sha256": "bb"},
]


def _pair(file: int, line: int, src: int, tag: str, *, n: int = 6) -> dict:
    ids = list(range(1, n + 1))
    return {"key": int(mix.make_key(file, line)), "src": src, "status": "kept", "hash": _h(tag),
            "lang": "en", "line": line, "id": f"{'pq'[src]}-{file}-{line}", "source": "pq"[src],
            "input_ids": ids, "labels": [-100] * 3 + ids[3:],
            "rejected_input_ids": ids[:3] + [9], "rejected_labels": [-100] * 3 + [9],
            "prompt_tokens": 3, "num_tokens": n, "rejected_num_tokens": 4,
            "num_trainable": n - 3, "rejected_num_trainable": 1}


def _pair_rows() -> list[dict]:
    rows = [_pair(0, i, 0, str(i)) for i in range(1, 9)]  # p: 8 distinct pairs
    rows += [
        {**_pair(1, 0, 1, "1")},  # q: a duplicate of p's line 1
        _pair(1, 1, 1, "x", n=8),
        {"key": int(mix.make_key(1, 2)), "src": 1, "status": "rejected", "line": 2,
         "reason": "missing 'chosen'", "raw": '{"rejected": "b"}', "source": "q"},
        {"key": int(mix.make_key(1, 3)), "src": 1, "status": "dropped", "hash": _h("y"),
         "lang": "en", "line": 3, "reason": "no trainable token left", "id": "q-1-3",
         "source": "q"},
    ]
    return sorted(rows, key=lambda r: r["key"])


def test_settle_pairs_dedupes_splits_draws_and_writes_the_dataset(tmp_path):
    sources = [SourceConfig(path="/in/p.jsonl", name="p", weight=2.0),
               SourceConfig(path="/in/q.json", name="q", tags=["hh"])]
    d = DataConfig(val_ratio=0.25, seed=0, shard_rows=3, max_seq_len=16)
    out = tmp_path / "pairs"
    m = settle_pairs(_pair_rows(), sources, PAIR_FILES, d, str(out), "digest", {"name": "t"},
                     "chatml")

    p, q = m["sources"]["p"], m["sources"]["q"]
    assert m["kind"] == PREFERENCE and m["hash"] == "digest" and m["template"] == "chatml"
    assert (p["rows_read"], p["rows_kept"], p["rows_duplicate"]) == (8, 8, 0)
    assert (q["rows_read"], q["rows_rejected"], q["rows_duplicate"], q["rows_dropped"],
            q["rows_kept"]) == (4, 1, 1, 1, 2)  # kept counts the dropped pair too
    assert p["rows_sampled"] == 2 * (8 - p["rows_val"])  # weight 2: every train pair twice
    assert q["rows_sampled"] + q["rows_val"] == 1 and q["tags"] == ["hh"]
    assert q["files"] == [{"path": "/in/q.json", "format": "hh_rlhf", "bytes": 20,
                           "sha256": "bb"}]
    train = list(iter_split_rows(str(out), "train"))
    val = list(iter_split_rows(str(out), "val"))
    assert len(train) == m["splits"]["train"]["pairs"] == p["rows_sampled"] + q["rows_sampled"]
    assert len(val) == m["splits"]["val"]["pairs"] == p["rows_val"] + q["rows_val"]
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    assert "q-1-0" not in {r["id"] for r in train + val}  # the duplicate lost to p's line 1
    shards = sorted(os.listdir(out / "train"))
    assert len(shards) == -(-len(train) // 3)  # shard_rows=3
    assert pq.read_schema(out / "train" / shards[0]) == PAIR_SCHEMA
    assert m["splits"]["train"]["chosen_length"]["max"] <= 8
    # the same manifest sections as a conversation dataset: totals and relative files
    assert m["rejects"] == {"total": 1, "files": ["rejects/q.jsonl"]}
    assert m["dropped"] == {"total": 1, "files": ["dropped/q.jsonl"]}
    assert _jsonl(out / "rejects" / "q.jsonl") == [
        {"source": "q", "file": "/in/q.json", "index": 2, "reason": "missing 'chosen'",
         "raw": '{"rejected": "b"}'}]
    assert _jsonl(out / "dropped" / "q.jsonl") == [
        {"source": "q", "file": "/in/q.json", "index": 3, "reason": "no trainable token left",
         "id": "q-1-3"}]


def test_settle_pairs_without_a_train_pair_names_each_source(tmp_path):
    rows = [r for r in _pair_rows() if r["status"] != "kept"]
    with pytest.raises(PrepareError, match=r"no preference pair survived.*q: 1 rejected, "
                                           r"1 dropped"):
        settle_pairs(rows, [SourceConfig(path="/in/p.jsonl", name="p"),
                            SourceConfig(path="/in/q.json", name="q")], PAIR_FILES,
                     DataConfig(), str(tmp_path / "o"), "d", {}, "chatml")
