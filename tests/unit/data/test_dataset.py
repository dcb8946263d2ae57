"""The prepared-dataset contract read without Ray: the manifest checks, the split shards
and their rows and samples, and the kept-row index (its file, or the per-source folders
of older datasets).

The directories are written here by hand with pyarrow, as `ift data prepare` lays them out.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prepared_support import write_prepared

from ift import storage
from ift.config import ConfigError, InputError
from ift.data.dataset import (
    INDEX_FILE,
    SOURCES_DIR,
    PrepareError,
    is_prepared,
    iter_samples,
    iter_split_rows,
    load_index,
    read_manifest,
    side_entry,
    side_manifest,
    source_names,
    split_files,
    write_side_file,
)

MANIFEST = {"version": 2, "hash": "abc123", "tokenizer": {"name_or_path": "tok"},
            "splits": {"train": {"rows": 2}}, "sources": {"a": {}}}


def _prepared(tmp_path, manifest_text: str | None, complete: bool = True) -> str:
    d = tmp_path / "prepared"
    d.mkdir()
    if manifest_text is not None:
        (d / "manifest.json").write_text(manifest_text, encoding="utf-8")
    if complete:
        storage.mark_complete(str(d), "abc123")
    return str(d)


def test_read_manifest_returns_a_complete_datasets_manifest(tmp_path):
    d = _prepared(tmp_path, json.dumps({**MANIFEST, "kind": "preference"}))
    assert read_manifest(d) == {**MANIFEST, "kind": "preference"}


def test_read_manifest_says_what_is_wrong_and_where(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(PrepareError) as e:
        read_manifest(missing)
    assert str(e.value) == f"prepared dataset {missing} does not exist; run `ift data prepare`"
    assert isinstance(e.value, InputError)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PrepareError, match=r"has no manifest\.json: not a prepared dataset"):
        read_manifest(str(empty))

    partial = _prepared(tmp_path, json.dumps(MANIFEST), complete=False)
    with pytest.raises(PrepareError) as e:
        read_manifest(partial)
    assert str(e.value).startswith(f"{partial} is partial (no _COMPLETE marker)")


@pytest.mark.parametrize("text,message", [
    ("{\"version\": 2,", "not valid JSON"),
    (json.dumps({k: v for k, v in MANIFEST.items() if k != "tokenizer"}),
     "missing key 'tokenizer'"),
    (json.dumps({k: v for k, v in MANIFEST.items() if k != "sources"}),
     "missing key 'sources'"),
    # JSON that is not an object: a number, and a list that holds every key's name.
    ("3", "expected a JSON object, found a number"),
    (json.dumps(["version", "hash", "tokenizer", "splits", "sources"]),
     "expected a JSON object, found a list"),
])
def test_a_broken_manifest_is_an_error_naming_the_file(tmp_path, text, message):
    d = _prepared(tmp_path, text)
    with pytest.raises(PrepareError) as e:
        read_manifest(d)
    assert str(e.value).startswith(os.path.join(d, "manifest.json") + ": ")
    assert message in str(e.value)


def _write(path, table: pa.Table) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


def test_split_files_lists_the_parquet_shards_of_a_split_in_order(tmp_path):
    d = tmp_path / "p"
    t = pa.table({"key": pa.array([1], pa.int64())})
    for rel in ("train/part-00001.parquet", "train/part-00000.parquet",
                "train/more/part-00000.parquet", "val/part-00000.parquet"):
        _write(str(d / rel), t)
    (d / "train" / "notes.txt").write_text("not a shard")
    assert split_files(str(d), "train") == [
        str(d / "train" / "part-00000.parquet"), str(d / "train" / "part-00001.parquet"),
        str(d / "train" / "more" / "part-00000.parquet")]
    assert split_files(str(d), "val") == [str(d / "val" / "part-00000.parquet")]
    assert split_files(str(d), "test") == []


def _index(keys, sources, splits, tokens) -> pa.Table:
    return pa.table({"key": pa.array(keys, pa.int64()), "source": sources, "split": splits,
                     "shard": splits, "num_tokens": pa.array(tokens, pa.int32())})


def test_load_index_reads_the_index_file(tmp_path):
    d = tmp_path / "p"
    want = _index([3, 7, 9], ["b", "a", "b"], ["train", "val", "dropped"], [10, 20, 30])
    _write(str(d / SOURCES_DIR / INDEX_FILE), want)
    assert load_index(str(d)).equals(want)
    assert source_names(str(d)) == ["a", "b"]


def _shard(keys, tokens) -> pa.Table:
    return pa.table({"key": pa.array(keys, pa.int64()), "id": [f"r{k}" for k in keys],
                     "num_tokens": pa.array(tokens, pa.int32())})


def test_load_index_of_an_older_dataset_comes_from_its_source_folders_sorted_by_key(tmp_path):
    d = tmp_path / "p"
    src = d / SOURCES_DIR
    _write(str(src / "source=beta" / "split=train" / "part-0.parquet"), _shard([40, 5], [4, 5]))
    _write(str(src / "source=alpha" / "split=val" / "part-0.parquet"), _shard([12], [12]))
    _write(str(src / "source=alpha" / "split=train" / "part-0.parquet"), _shard([1], [1]))
    t = load_index(str(d))
    assert t.column_names == ["key", "source", "split", "num_tokens", "shard"]
    assert t.to_pylist() == [
        {"key": 1, "source": "alpha", "split": "train", "num_tokens": 1, "shard": "train"},
        {"key": 5, "source": "beta", "split": "train", "num_tokens": 5, "shard": "train"},
        {"key": 12, "source": "alpha", "split": "val", "num_tokens": 12, "shard": "val"},
        {"key": 40, "source": "beta", "split": "train", "num_tokens": 4, "shard": "train"},
    ]
    assert source_names(str(d)) == ["alpha", "beta"]


def test_load_index_of_a_dataset_that_kept_nothing_is_empty(tmp_path):
    t = load_index(str(tmp_path / "p"))
    assert t.num_rows == 0
    assert t.schema.field("key").type == pa.int64()
    assert t.column_names == ["key", "source", "split", "num_tokens", "shard"]
    assert source_names(str(tmp_path / "p")) == []


def test_load_index_of_an_older_dataset_with_an_empty_sources_folder_is_empty(tmp_path):
    (tmp_path / "p" / SOURCES_DIR).mkdir(parents=True)
    t = load_index(str(tmp_path / "p"))
    assert t.num_rows == 0
    assert t.column_names == ["key", "source", "split", "num_tokens", "shard"]


PACKED = {"id": "bin0", "input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4],
          "seq_ids": [0, 0, 1, 1], "num_tokens": 4}
PLAIN = {"id": "r9", "input_ids": [5, 6], "labels": [-100, 6], "seq_ids": None,
         "num_tokens": 2}


def _with_val(tmp_path, name: str, val_rows: list[dict] | None) -> str:
    return write_prepared(tmp_path / name, None if val_rows is None else {"val": val_rows},
                          **MANIFEST)


def test_iter_split_rows_keeps_bins_whole_and_the_columns_asked_for(tmp_path):
    d = _with_val(tmp_path, "p", [PACKED, PLAIN])
    assert list(iter_split_rows(d, "val")) == [PACKED, PLAIN]
    assert list(iter_split_rows(d, "val", ["seq_ids", "id", "not_a_column"])) == [
        {"id": "bin0", "seq_ids": [0, 0, 1, 1]}, {"id": "r9", "seq_ids": None}]
    assert list(iter_split_rows(d, "train")) == []
    assert is_prepared(d) and not is_prepared(str(tmp_path))


def test_iter_samples_unpacks_bins_and_names_the_key_on_errors(tmp_path):
    d = _with_val(tmp_path, "p", [PACKED, PLAIN])
    assert list(iter_samples(d)) == [{"id": "bin0", "input_ids": [1, 2], "labels": [-100, 2]},
                                     {"id": "bin0#1", "input_ids": [3, 4], "labels": [-100, 4]},
                                     {"id": "r9", "input_ids": [5, 6], "labels": [-100, 6]}]
    no_val = _with_val(tmp_path, "q", None)
    with pytest.raises(ConfigError) as e:
        list(iter_samples(no_val, key="predict.data"))
    assert str(e.value) == (f"predict.data={no_val}: the val split has no parquet files "
                            "(prepare with data.val_ratio > 0, or point predict.data at raw "
                            "files)")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "manifest.json").write_text("{}")
    assert is_prepared(str(partial))  # a manifest, complete or not
    with pytest.raises(ConfigError, match=rf"^eval\.data={partial}: {partial} is partial"):
        list(iter_samples(str(partial)))


def test_side_files_name_the_file_line_and_reason_of_each_row_not_kept(tmp_path):
    rejected = side_entry("rejected", "a", "/in/a.jsonl", True, 7, "missing 'output'",
                          raw='{"instruction": "x"}', id="ignored")
    dropped = side_entry("dropped", "b", "/in/b.parquet", False, 0, "no trainable token left",
                         raw="ignored", id="b-1-0")
    assert rejected == {"source": "a", "file": "/in/a.jsonl", "line": 7,
                        "reason": "missing 'output'", "raw": '{"instruction": "x"}'}
    assert dropped == {"source": "b", "file": "/in/b.parquet", "index": 0, "id": "b-1-0",
                       "reason": "no trainable token left"}
    write_side_file(str(tmp_path), "rejected", "a", [rejected, rejected])
    write_side_file(str(tmp_path), "dropped", "b", [dropped])
    lines = (tmp_path / "rejects" / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [rejected, rejected]
    assert json.loads((tmp_path / "dropped" / "b.jsonl").read_text()) == dropped
    assert side_manifest({"rejected": 2, "dropped": 1}, {"rejected": ["a"], "dropped": ["b"]}) \
        == {"rejects": {"total": 2, "files": ["rejects/a.jsonl"]},
            "dropped": {"total": 1, "files": ["dropped/b.jsonl"]}}
