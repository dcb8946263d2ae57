"""Ingest: one read task's raw rows -> (key, line, record or reject reason, raw text).

The IE chunk keys and `keep_reasoning` are tested with the IE and format fixtures
(test_ie.py, test_formats.py); here: row keys, the three kinds of reject (unreadable,
unconvertible, invalid), the row options and placeholders with their language rule; and
raw files read whole, outside a prepare run (iter_raw_records), where a bad row is an error."""

from __future__ import annotations

import json

import pytest

from ift.config import ConfigError
from ift.data import mix
from ift.data.ingest import RowOptions, clean_rows, iter_raw_records, pair_rows
from ift.data.preference import convert_pair, pair_hash, tokenize_pairs
from ift.data.readers import plan_reads
from ift.data.record import ConvertError, make_record

FILE_INDEX = 5


def _opts(**kw) -> RowOptions:
    base = {"seed": 0, "placeholders": {}, "columns": {}, "task": "", "system": None}
    return RowOptions(**{**base, **kw})


def _rows(tmp_path, lines: list[str], fmt: str, opts: RowOptions, name: str = "rows.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tasks, _ = plan_reads("src", 0, [str(path)], fmt, 0, FILE_INDEX)
    assert len(tasks) == 1
    return list(clean_rows(tasks[0], opts))


def _chat(user: str, assistant: str | None = None, **extra) -> str:
    msgs = [{"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return json.dumps({"messages": msgs, **extra}, ensure_ascii=False)


def test_every_row_gets_its_file_and_line_key_and_each_reject_its_reason(tmp_path):
    lines = [
        _chat("Hello there", "Hi"),                  # 1: kept
        "",                                          # 2: blank, not a row
        "{not json",                                 # 3: unreadable
        "[1, 2]",                                    # 4: not an object
        json.dumps({"messages": "hello"}),           # 5: cannot convert
        _chat("only a question"),                    # 6: converts, fails validation
        _chat("Second", "Fine"),                     # 7: kept
    ]
    out = _rows(tmp_path, lines, "openai", _opts())
    assert [line for _k, line, *_ in out] == [1, 3, 4, 5, 6, 7]
    assert [key for key, *_ in out] == [(FILE_INDEX << 36) | n for n in (1, 3, 4, 5, 6, 7)]
    by_line = {line: (rec, reason, raw) for _k, line, rec, reason, raw in out}
    for n in (1, 7):
        rec, reason, raw = by_line[n]
        assert reason is None and raw == lines[n - 1]
        assert rec["id"] == f"src-{FILE_INDEX}-{n}" and rec["source"] == "src"
    assert by_line[1][0]["messages"] == [{"role": "user", "content": "Hello there"},
                                         {"role": "assistant", "content": "Hi"}]
    assert by_line[1][0]["lang"] == "en" and by_line[1][0]["task"] == "chat"
    rec, reason, raw = by_line[3]
    assert rec is None and raw == "{not json"
    assert reason.startswith("malformed JSON: ") and reason.endswith("at column 2")
    assert by_line[4][:2] == (None, "JSONL line is a list, not an object")
    assert by_line[5][:2] == (None, "field 'messages' is a string, expected a list of turns")
    assert by_line[6][:2] == (None, "conversation ends with a user turn (expected assistant)")
    assert by_line[6][2] == lines[5]  # the raw text travels with the reject


def test_columns_task_and_default_system_reach_the_record(tmp_path):
    lines = [json.dumps({"question": "Capital of France?", "answer": "Paris"}),
             json.dumps({"question": "Capital of Spain?", "answer": "Madrid",
                         "system": "Answer in one word."})]
    opts = _opts(columns={"instruction": "question", "output": "answer"}, task="qa",
                 system="You are terse.")
    out = _rows(tmp_path, lines, "alpaca", opts)
    recs = [rec for _k, _n, rec, reason, _raw in out]
    assert [r["messages"] for r in recs] == [
        [{"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "Paris"}],
        [{"role": "user", "content": "Capital of Spain?"},
         {"role": "assistant", "content": "Madrid"}]]
    assert [r["task"] for r in recs] == ["qa", "qa"]
    # The option is a default: a row's own system prompt wins.
    assert [r["system"] for r in recs] == ["You are terse.", "Answer in one word."]
    # Without the mapping the rows have no instruction; a mapped column that is absent
    # is named with its field.
    plain = _rows(tmp_path, lines, "alpaca", _opts(), name="plain.jsonl")
    assert [reason for _k, _n, _rec, reason, _r in plain] == ["missing field 'instruction'"] * 2
    gap = _rows(tmp_path, [json.dumps({"answer": "x"})], "alpaca", opts, name="gap.jsonl")
    assert gap[0][3] == "missing field 'instruction' (column 'question')"


def test_placeholders_are_filled_before_validation_and_the_language_is_redetected(tmp_path):
    lines = [_chat("{{q}}", "{{a}}", system="Bot {{name}}"),
             _chat("Ask {{q}}", "{{blank}}")]
    values = {"q": "今天天气怎么样", "a": "今天天气很好", "name": "小明", "blank": "  "}
    out = _rows(tmp_path, lines, "openai", _opts(placeholders=values))
    (_k1, _n1, rec, reason, raw), (_k2, _n2, bad, bad_reason, _r2) = out
    assert reason is None
    assert rec["system"] == "Bot 小明"
    assert [m["content"] for m in rec["messages"]] == ["今天天气怎么样", "今天天气很好"]
    assert rec["lang"] == "zh"  # the row as written is ASCII ("en"); as filled, Chinese
    assert "{{q}}" in raw  # the reject/raw text stays as read
    # A placeholder filled with blanks empties the turn: rejected like any empty turn.
    assert bad is None and bad_reason == "turn 2 (assistant): empty content"
    # Without values the placeholders stay and the language is that of the text as read.
    kept = _rows(tmp_path, lines[:1], "openai", _opts(), name="unfilled.jsonl")
    assert kept[0][2]["messages"][0]["content"] == "{{q}}" and kept[0][2]["lang"] == "en"


def _jsonl(path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_iter_raw_records_reads_a_comma_list_in_order(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [_chat("1+1?", "2"), _chat("2+2?", "4")])
    b = _jsonl(tmp_path / "b.jsonl", [_chat("3+3?", "6")])
    got = list(iter_raw_records(f"{b}, ,{a}"))
    assert [w for w, _ in got] == [f"{b}:1", f"{a}:1", f"{a}:2"]
    assert [r["id"] for _, r in got] == ["b:1", "a:1", "a:2"]
    assert [r["source"] for _, r in got] == ["b", "a", "a"]
    assert got[1][1]["messages"][0]["content"] == "1+1?"


def test_iter_raw_records_fills_placeholders_as_training_does(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [_chat("Who are you?", "I am {{name}}, by {{author}}.")])
    (_where, rec), = iter_raw_records(a, placeholders={"name": "ift"})
    assert rec["messages"][1]["content"] == "I am ift, by {{author}}."
    (_where, raw), = iter_raw_records(a)
    assert raw["messages"][1]["content"] == "I am {{name}}, by {{author}}."


def test_iter_raw_records_errors_name_the_key_file_and_line(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError) as e:
        list(iter_raw_records(missing, key="predict.data"))
    assert str(e.value) == f"predict.data={missing!r}: {missing} does not exist or matches no file"
    with pytest.raises(ConfigError, match=r"matches no file"):
        list(iter_raw_records(str(tmp_path / "*.parquet")))
    bad = _jsonl(tmp_path / "bad.jsonl", [_chat("q", "a"), "{oops"])
    with pytest.raises(ConfigError) as e:
        list(iter_raw_records(bad))
    assert str(e.value).startswith(f"eval.data: {bad}:2: cannot read row: malformed JSON")
    odd = _jsonl(tmp_path / "odd.jsonl",
                 [_chat("q", "a"), {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(ConfigError) as e:
        list(iter_raw_records(odd))
    assert str(e.value).startswith(f"eval.data: {odd}:2: cannot convert row: turn 1: "
                                   "unknown speaker 'robot'")



# The texts the module's tokenizer (conftest's chatml_tok) is trained on.
RECORDS = [make_record(id="r", source="s", system="Be brief.", messages=[
    {"role": "user", "content": "Add 2 and 3. Add 1 and 1."},
    {"role": "assistant", "content": "5. Well, it is 5. 2."},
])]


def test_pair_rows_keep_drop_or_reject_every_raw_row(tmp_path, chatml_tok):
    good = {"instruction": "Add 2 and 3.", "chosen": "5.", "rejected": "Well, it is 5."}
    same = {**good, "rejected": "5."}
    long = {"instruction": "Add 2 and 3. " * 40, "chosen": "5.", "rejected": "No."}
    other = {**good, "instruction": "Add 1 and 1.", "chosen": "2."}
    lines = [json.dumps(good), "{not json", json.dumps(same), json.dumps(long), json.dumps(other)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tasks, _ = plan_reads("prefs", 3, [str(path)], "alpaca_pairs", 0, FILE_INDEX)
    rows = pair_rows(tasks[0], {"task": "", "system": None}, chatml_tok, template="chatml",
                     max_seq_len=48, batch_size=2)  # a flush after every two pairs
    rows.sort(key=lambda r: r["key"])  # rejects come out at once, pairs at each flush

    assert [(r["line"], r["status"]) for r in rows] == [
        (1, "kept"), (2, "rejected"), (3, "rejected"), (4, "kept"), (5, "kept")]
    assert [r["key"] for r in rows] == [int(mix.make_key(FILE_INDEX, n)) for n in range(1, 6)]
    assert all(r["src"] == 3 for r in rows)
    assert all(r["source"] == "prefs" for r in rows if r["status"] != "kept")
    assert rows[1]["raw"] == "{not json" and "JSON" in rows[1]["reason"]
    with pytest.raises(ConvertError) as e:
        convert_pair("alpaca_pairs", same, id="x", source="prefs", task="", system=None)
    assert rows[2]["reason"] == str(e.value) and rows[2]["raw"] == lines[2]
    assert max(rows[3]["num_tokens"], rows[3]["rejected_num_tokens"]) == 48  # prompt cut

    # Kept rows: what the converter and tokenizer give for the same pairs, one by one.
    for row, (line, raw) in zip([rows[0], rows[4]], [(1, good), (5, other)]):
        pair = convert_pair("alpaca_pairs", raw, id=f"prefs-{FILE_INDEX}-{line}",
                            source="prefs", task="", system=None)
        (want,), lost = tokenize_pairs([pair], chatml_tok, template="chatml", max_seq_len=48)
        assert not lost
        assert row["hash"] == pair_hash(pair) and row["lang"] == pair["lang"]
        assert {k: row[k] for k in want} == want

    # A pair with no reply token left within max_seq_len is dropped, with its id and why.
    tiny = pair_rows(tasks[0], {"task": "", "system": None}, chatml_tok, template="chatml",
                     max_seq_len=1, batch_size=2)
    dropped = sorted((r for r in tiny if r["status"] == "dropped"), key=lambda r: r["key"])
    assert [r["id"] for r in dropped] == [f"prefs-{FILE_INDEX}-{n}" for n in (1, 4, 5)]
    assert all("no trainable token left" in r["reason"] for r in dropped)
    assert sum(r["status"] == "rejected" for r in tiny) == 2


def test_pair_rows_of_an_empty_file_are_none(tmp_path, chatml_tok):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    tasks, _ = plan_reads("prefs", 0, [str(path)], "alpaca_pairs", 0, FILE_INDEX)
    assert all(pair_rows(t, {"task": "", "system": None}, chatml_tok, template="chatml",
                         max_seq_len=48, batch_size=2) == [] for t in tasks)
