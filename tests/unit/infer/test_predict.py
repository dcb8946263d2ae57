"""`ift predict` inputs and shards, without Ray: prompts and references from prepared rows
and raw records, and which finished shards are written (and what stays pending)."""

from __future__ import annotations

import json
import os

import pytest
from prepared_support import write_prepared

from ift import storage
from ift.config import ConfigError
from ift.infer.predict import _flush_shards, load_items, record_prompt, shard_name


def test_record_prompt_answers_up_to_the_last_assistant_turn():
    rec = {"system": "Be kind.", "messages": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    msgs, ref = record_prompt(rec)
    assert msgs == [{"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"}]
    assert ref == "a2"
    assert rec["messages"][0] == {"role": "user", "content": "q1"}  # the record is untouched
    assert len(rec["messages"]) == 4
    # A system turn already in the messages is not added twice; no reply: no reference.
    own = {"system": "Be kind.", "messages": [{"role": "system", "content": "S"},
                                              {"role": "user", "content": "q"}]}
    assert record_prompt(own) == (own["messages"], None)
    assert record_prompt({"messages": [{"role": "user", "content": "q"}]}) == (
        [{"role": "user", "content": "q"}], None)
    # A conversation that ends in a user turn asks for that turn's answer: all of it is the
    # prompt, and there is no reference.
    open_turn = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                 {"role": "user", "content": "q2"}]
    assert record_prompt({"messages": open_turn}) == (open_turn, None)


def _jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")
    return str(path)


def _chat(*turns, **extra) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


def test_raw_items_carry_the_conversation_as_json_and_the_reference(tmp_path):
    f = _jsonl(tmp_path / "qa.jsonl", [_chat(("user", "你好"), ("assistant", "您好")),
                                       _chat(("user", "2+2?")),
                                       _chat(("user", "3+3?"), ("assistant", "6"))])
    items = load_items(f, "val")
    assert [i["id"] for i in items] == ["qa:1", "qa:2", "qa:3"]
    assert items[0]["messages"] == '[{"role": "user", "content": "你好"}]'
    assert [i["reference"] for i in items] == ["您好", None, "6"]
    assert all(i["prompt_ids"] == [] and i["reference_ids"] == [] for i in items)
    assert [i["id"] for i in load_items(f, "val", max_rows=2)] == ["qa:1", "qa:2"]


def test_raw_items_need_a_user_turn_and_data_is_required(tmp_path):
    f = _jsonl(tmp_path / "bad.jsonl", [_chat(("user", "q"), ("assistant", "a")),
                                        _chat(("assistant", "an answer to nothing"))])
    with pytest.raises(ConfigError) as e:
        load_items(f, "val")
    assert str(e.value) == f"predict.data: {f}:2: no user turn to answer"
    with pytest.raises(ConfigError, match=r"^predict.data is required"):
        load_items("", "val")
    missing = str(tmp_path / "none.jsonl")
    with pytest.raises(ConfigError, match=rf"^predict\.data='{missing}': "):
        load_items(missing, "val")


def test_prepared_items_split_each_row_at_its_last_reply(tmp_path):
    rows = [{"id": "a", "input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, -100, 4, 5]},
            {"id": "b", "input_ids": [6, 7], "labels": [-100, -100]},
            {"id": "c", "input_ids": [8, 9], "labels": [-100, 9]}]
    d = write_prepared(tmp_path / "prepared", {"val": rows, "train": rows[:1]})
    items = load_items(d, "val", max_rows=2)
    assert items == [
        {"id": "a", "prompt_ids": [1, 2, 3], "reference_ids": [4, 5], "messages": ""},
        {"id": "b", "prompt_ids": [6, 7], "reference_ids": [], "messages": ""}]
    assert [i["id"] for i in load_items(d, "train")] == ["a"]
    with pytest.raises(ConfigError, match=r"the test split has no parquet files"):
        load_items(d, "test")


def test_only_finished_shards_are_written_in_input_order(tmp_path):
    shard_dir = str(tmp_path / "shards")
    assert shard_name(3) == "shard-00003.jsonl"
    lines = {0: "r0", 1: "r1", 3: "r3", 4: "r4"}
    # 5 rows in shards of 2: [0, 1] and the short last one [4] are complete, [2, 3] is not.
    assert _flush_shards(lines, shard_dir, 2, 5) == 2
    assert lines == {3: "r3"}
    assert storage.listdir(shard_dir) == ["shard-00000.jsonl", "shard-00002.jsonl"]
    assert storage.read_text(os.path.join(shard_dir, shard_name(0))) == "r0\nr1\n"
    assert storage.read_text(os.path.join(shard_dir, shard_name(2))) == "r4\n"
    lines[2] = "r2"
    assert _flush_shards(lines, shard_dir, 2, 5) == 1
    assert lines == {}
    assert storage.read_text(os.path.join(shard_dir, shard_name(1))) == "r2\nr3\n"
    assert _flush_shards(lines, shard_dir, 2, 5) == 0
