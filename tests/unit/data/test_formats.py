"""Converters: every source format to the unified record, on hand-written fixtures with bad rows."""

from __future__ import annotations

import collections
import glob
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ift.data import cot_templates
from ift.data.formats import CONVERTERS, convert, split_human_assistant
from ift.data.quality import validate
from ift.data.readers import iter_raw, plan_reads
from ift.data.record import ConvertError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "formats")


def outcomes(name: str, fmt: str | None = None, **kw) -> dict[int, dict | str]:
    """Line/index -> record, or the reason the row was refused (read, convert or validate)."""
    path = os.path.join(FIXTURES, name)
    tasks, _ = plan_reads("fx", 0, [path], fmt or "auto", 64, 0)
    out: dict[int, dict | str] = {}
    for t in tasks:
        for n, raw, err, _ in iter_raw(t):
            if err:
                out[n] = f"read: {err}"
                continue
            try:
                rec = convert(t.format, raw, id=f"fx-{n}", source="fx", **kw)
            except ConvertError as e:
                out[n] = f"convert: {e}"
                continue
            reason = validate(rec)
            out[n] = f"validate: {reason}" if reason else rec
    return out


def turns(rec: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in rec["messages"]]


def test_converters_dict_names_every_configurable_format():
    from ift.config import FORMATS
    from ift.data import ie

    # IE formats make one or more records per row (ift.data.ie.to_records)
    assert set(CONVERTERS) | set(ie.FORMATS) == set(FORMATS) - {"auto"}
    assert not set(CONVERTERS) & set(ie.FORMATS)
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        convert("nope", {}, id="x", source="s")
    with pytest.raises(ConvertError, match="row is a list"):
        convert("alpaca", ["a"], id="x", source="s")


# ---------------------------------------------------------------------------------------
# alpaca
# ---------------------------------------------------------------------------------------


def test_alpaca():
    out = outcomes("alpaca.json")
    r0 = out[0]
    assert r0["id"] == "fx-0" and r0["source"] == "fx" and r0["task"] == "instruction"
    assert r0["lang"] == "en" and r0["system"] == "" and r0["meta"] == {}
    assert turns(r0) == [("user", "Name three primary colors."),
                         ("assistant", "Red, yellow and blue.")]
    assert turns(out[1])[0] == ("user", "Translate the sentence into French.\nThe cat sleeps.")
    assert out[2]["system"] == "You are a careful translator."
    assert turns(out[2]) == [
        ("user", "Translate 'cat' into French."), ("assistant", "Chat."),
        ("user", "And 'dog'?"), ("assistant", "Chien."),
        ("user", "And the plural?"), ("assistant", "Les chats dorment."),
    ]
    assert out[3]["lang"] == "zh"
    # A number is not text: rejected naming the field, as docs/data.md says.
    assert out[4] == "convert: field 'output' is a number, expected text"
    assert out[5] == "convert: missing field 'output'"
    assert out[6] == "convert: field 'output' is a list (preference data?), expected text"
    assert out[7] == "convert: history item 1 is not a [query, response] pair of texts"
    assert out[8] == "validate: turn 2 (assistant): empty content"
    assert out[9] == "read: list item is a string, not an object"


def test_alpaca_columns_rename_and_source_system():
    raw = {"q": "Why is the sky blue?", "a": "Rayleigh scattering.", "sys": ""}
    rec = convert("alpaca", raw, id="1", source="s", columns={"instruction": "q", "output": "a",
                                                                "system": "sys"},
                  system="Be brief.", task="qa")
    assert turns(rec) == [("user", "Why is the sky blue?"), ("assistant", "Rayleigh scattering.")]
    assert rec["system"] == "Be brief." and rec["task"] == "qa"
    with pytest.raises(ConvertError, match=r"missing field 'output' \(column 'a'\)"):
        convert("alpaca", {"q": "x"}, id="1", source="s", columns={"instruction": "q", "output": "a"})
    # A row's own system prompt wins over the source's.
    rec = convert("alpaca", {"instruction": "x", "output": "y", "system": "Mine."}, id="1",
                  source="s", system="Source default.")
    assert rec["system"] == "Mine."


# ---------------------------------------------------------------------------------------
# alpaca_cot_multiturn
# ---------------------------------------------------------------------------------------


def test_alpaca_cot_multiturn():
    out = outcomes("alpaca_cot_multiturn.jsonl")
    assert turns(out[1]) == [
        ("user", "Hi, can you help me plan a trip?"),
        ("assistant", "Of course. Where would you like to go?"),
        ("user", "Kyoto, for three days."),
        ("assistant", "Day one: temples in the east; day two: Arashiyama; day three: markets and "
                      "Fushimi Inari."),
    ]
    assert out[1]["task"] == "chat"
    # Full-width colons; empty output: the last Assistant segment is the answer.
    assert turns(out[2])[-1] == ("assistant", "我无法获取实时天气，建议查看天气预报。")
    assert len(out[2]["messages"]) == 4 and out[2]["lang"] == "zh"
    # Text before the first marker is the system prompt; input joins the last user turn.
    assert out[3]["system"] == "You are a polite assistant."
    assert turns(out[3])[-2:] == [("user", "And times 3?\nShow the arithmetic."),
                                  ("assistant", "(2+2)*3 = 12.")]
    assert out[5].startswith("convert: no final answer")
    assert out[6].startswith("convert: instruction ends with a complete Assistant: turn")
    assert out[7].startswith("read: malformed JSON")
    assert out[8] == "convert: field 'instruction' holds no Human:/Assistant: turns"


def test_split_human_assistant_ignores_markers_inside_words():
    pre, t = split_human_assistant("Human: Is SuperHuman: a word?\nAssistant: No.")
    assert pre == "" and t == [("user", "Is SuperHuman: a word?"), ("assistant", "No.")]
    with pytest.raises(ValueError):
        split_human_assistant("plain text")


# ---------------------------------------------------------------------------------------
# sharegpt
# ---------------------------------------------------------------------------------------


def test_sharegpt():
    out = outcomes("sharegpt.json")
    r0 = out[0]
    assert [m["role"] for m in r0["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(r0["messages"][1]["content"])["name"] == "get_weather"
    assert r0["meta"]["tool_calls"] == [1]
    assert json.loads(r0["meta"]["tools"])[0]["name"] == "get_weather"
    assert out[1]["system"] == "Answer briefly."
    assert turns(out[1])[0] == ("user", "Capital of Japan?")
    assert "tools" not in out[1]["meta"] and "tool_calls" not in out[1]["meta"]
    # tools given as a list is kept as JSON text; "tool" is an alias of observation.
    assert json.loads(out[2]["meta"]["tools"]) == [{"name": "order",
                                                    "parameters": {"type": "object"}}]
    assert out[2]["messages"][2] == {"role": "tool", "content": "shipped"}
    assert out[3].startswith("convert: turn 2: unknown speaker 'narrator'")
    assert out[4].startswith("convert: field 'tools' is not valid JSON")
    assert out[5] == "convert: field 'conversations' is a string, expected a list of turns"
    assert out[6] == "validate: turn 1: assistant turn at the start (expected user)"


def test_sharegpt_columns_rename_conversations():
    raw = {"dialog": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    rec = convert("sharegpt", raw, id="1", source="s", columns={"conversations": "dialog"})
    assert turns(rec) == [("user", "a"), ("assistant", "b")]


# ---------------------------------------------------------------------------------------
# openai
# ---------------------------------------------------------------------------------------


def test_openai():
    out = outcomes("openai.jsonl")
    assert out[1]["system"] == "Be concise."
    assert turns(out[1]) == [("user", "Define entropy."), ("assistant", "A measure of disorder.")]
    assert turns(out[2]) == [("user", "Summarise:\nRain fell all day."),
                             ("assistant", "It rained all day.")]
    assert out[3] == ("convert: turn 1: content part of type 'image_url' is not supported "
                      "(text only)")
    r4 = out[4]
    assert [m["role"] for m in r4["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(r4["messages"][1]["content"]) == {"name": "add",
                                                        "arguments": {"a": 2, "b": 3}}
    assert r4["meta"]["tool_calls"] == [1] and "add" in r4["meta"]["tools"]
    assert out[5].startswith("convert: turn 2: unknown speaker 'wizard'")
    assert out[6] == "validate: conversation ends with a user turn (expected assistant)"
    assert out[7] == "read: JSONL line is a list, not an object"
    assert out[8].startswith("read: malformed JSON")


# ---------------------------------------------------------------------------------------
# moss
# ---------------------------------------------------------------------------------------


def test_moss():
    out = outcomes("moss.jsonl")
    r1 = out[1]
    assert r1["system"].startswith("You are an AI assistant whose name is MOSS.\n- MOSS")
    # turn_2 came first in the file; turns follow their numbers.
    assert turns(r1) == [
        ("user", "怎样养成早睡早起的习惯？"),
        ("assistant", "关键是规律作息，并减少睡前的刺激。"),
        ("user", "能再具体一点吗？"),
        ("assistant", "可以，每天固定时间起床，睡前一小时不看手机。"),
    ]
    assert r1["lang"] == "zh" and r1["meta"]["category"] == "Brainstorming"
    for m in r1["messages"]:
        assert "<|" not in m["content"] and "<eo" not in m["content"]
    r2 = out[2]
    assert turns(r2) == [
        ("user", "What is 12 times 34?"),
        ("assistant", 'Calculate("12*34")'),
        ("tool", 'Calculate("12*34") => 408'),
        ("assistant", "12 times 34 is 408."),
    ]
    assert r2["meta"]["tool_calls"] == [1]
    assert r2["meta"]["inner_thoughts"] == {"1": "I should use the calculator."}
    assert out[3] == "convert: chat.turn_1 lacks MOSS"
    assert out[4] == "convert: chat key 'round_one' is not turn_N"
    assert out[5] == "validate: turn 2 (assistant): empty content"


# ---------------------------------------------------------------------------------------
# flan_cot_tsv
# ---------------------------------------------------------------------------------------


def test_flan_cot_tsv():
    out = outcomes("flan_cot.tsv", seed=42)
    r1 = out[1]
    assert r1["task"] == "cot" and r1["meta"]["answer"] == "12"
    user, reply = r1["messages"][0]["content"], r1["messages"][1]["content"]
    idx = r1["meta"]["cot_template"]
    assert user == cot_templates.TEMPLATES[idx].format(question="What is 15% of 80?")
    assert reply.startswith("15% of 80 is 0.15 * 80 = 12.\n")
    assert cot_templates.parse_final_answer(reply) == "12"
    # Literal \n escapes become line breaks in question and rationale.
    r2 = out[2]
    assert "What is its speed?\nOptions:\n(A) 40 km/h\n(B) 60 km/h" in r2["messages"][0]["content"]
    assert "\\n" not in r2["messages"][0]["content"]
    assert r2["messages"][1]["content"].startswith("Speed = distance / time.\n120 / 2 = 60 km/h.\n")
    assert cot_templates.parse_final_answer(r2["messages"][1]["content"]) == "B"
    assert out[4].startswith("read: TSV line has 2")
    assert cot_templates.parse_final_answer(out[5]["messages"][1]["content"]) == "1000"
    assert out[6] == "convert: empty answer"
    assert out[7].startswith("read: TSV line has 4")


def test_flan_cot_answers_only_row_keeps_prompt_and_replies_with_answer_phrase():
    with_r = {"question": "What is 6 x 7?", "answer": "42", "rationale": "6 x 7 = 42."}
    plain = {"question": "What is 6 x 7?", "answer": "42", "rationale": ""}
    a = convert("flan_cot_tsv", with_r, id="1", source="s", seed=3)
    b = convert("flan_cot_tsv", plain, id="1", source="s", seed=3)
    assert a["messages"][0] == b["messages"][0]
    assert b["messages"][1]["content"] == a["messages"][1]["content"].split("\n", 1)[1]
    assert "6 x 7 = 42" not in b["messages"][1]["content"]
    assert cot_templates.parse_final_answer(b["messages"][1]["content"]) == "42"
    assert a["meta"]["rationale"] is True and b["meta"]["rationale"] is False


def test_flan_cot_is_deterministic_by_seed():
    raw = {"question": "What is 6 x 7?", "answer": "42", "rationale": "6 x 7 = 42."}
    a = convert("flan_cot_tsv", raw, id="1", source="s", seed=1)
    b = convert("flan_cot_tsv", raw, id="2", source="s", seed=1)
    assert a["messages"] == b["messages"]
    prompts = {convert("flan_cot_tsv", raw, id="1", source="s", seed=s)["messages"][0]["content"]
               for s in range(40)}
    assert len(prompts) >= 6  # the seed moves the choice


# ---------------------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------------------


def test_table_csv_with_alpaca_columns():
    cols = {"instruction": "question", "input": "context", "output": "answer"}
    out = outcomes("table.csv", columns=cols)
    assert turns(out[0]) == [
        ("user", "Write a haiku about rain."),
        ("assistant", "Soft rain on the roof\ncounting the hours\nuntil the light returns"),
    ]
    assert turns(out[1])[0] == ("user", "Summarise the text.\nRay Data runs\n"
                                        "transformations in parallel.")
    assert out[2] == "read: CSV row has 2 fields, the header has 4"
    assert turns(out[3])[1] == ("assistant", "4")
    assert out[0]["task"] == "instruction"


def test_table_without_columns_names_what_it_saw():
    out = outcomes("table.csv")
    assert out[0].startswith("convert: row has no messages or instruction/output fields")
    assert "'question'" in out[0]


def test_table_parquet_messages_and_json_text(tmp_path):
    path = tmp_path / "chat.parquet"
    dialog = [{"role": "system", "content": "Terse."}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}]
    pq.write_table(pa.table({
        "dialog": [dialog, None, None],
        "dialog_json": [None, json.dumps(dialog[1:]), "{broken"],
    }), path)
    tasks, infos = plan_reads("t", 0, [str(path)], "auto", 0, 0)
    rows = [raw for t in tasks for _, raw, _, _ in iter_raw(t)]
    rec = convert("table", rows[0], id="0", source="t", columns={"messages": "dialog"})
    assert rec["system"] == "Terse." and turns(rec) == [("user", "hi"), ("assistant", "hello")]
    assert rec["task"] == "chat"
    rec = convert("table", rows[1], id="1", source="t", columns={"messages": "dialog_json"})
    assert turns(rec) == [("user", "hi"), ("assistant", "hello")]
    with pytest.raises(ConvertError, match=r"'messages' \(column 'dialog_json'\) is text but not "
                                           r"valid JSON"):
        convert("table", rows[2], id="2", source="t", columns={"messages": "dialog_json"})


def test_table_history_as_json_text():
    raw = {"q": "and 3+3?", "a": "6", "h": json.dumps([["1+1?", "2"]])}
    rec = convert("table", raw, id="0", source="t",
                  columns={"instruction": "q", "output": "a", "history": "h"})
    assert turns(rec) == [("user", "1+1?"), ("assistant", "2"), ("user", "and 3+3?"),
                          ("assistant", "6")]


# ---------------------------------------------------------------------------------------
# Real public data (../shared/data), when present
# ---------------------------------------------------------------------------------------

EXPECTED_ROWS = {
    "alpaca-cot/gsm8k_train.tsv": 7473,
    "alpaca-cot/aqua_train.tsv": 2728,
    "alpaca-cot/aqua_train.formatted.json": 2728,
    "llama-factory/alpaca_en_demo.json": 999,
    "llama-factory/glaive_toolcall_en_demo.json": 300,
    "llama-factory/identity.json": 91,
}


def test_shared_data_converts_every_row(shared_data):
    root = str(shared_data)
    files = sorted(glob.glob(os.path.join(root, "alpaca-cot", "*.tsv"))
                   + glob.glob(os.path.join(root, "alpaca-cot", "*.json"))
                   + glob.glob(os.path.join(root, "llama-factory", "*.json")))
    assert files
    failures: dict[str, collections.Counter] = {}
    counts: dict[str, int] = {}
    formats: dict[str, str] = {}
    for path in files:
        rel = os.path.relpath(path, root)
        tasks, infos = plan_reads(rel, 0, [path], "auto", 256 * 1024, 0)
        formats[rel] = infos[0]["format"]
        bad: collections.Counter = collections.Counter()
        n = 0
        for t in tasks:
            for line, raw, err, _ in iter_raw(t):
                n += 1
                if err:
                    bad[f"read: {err}"] += 1
                    continue
                try:
                    rec = convert(t.format, raw, id=f"{rel}:{line}", source=rel)
                except ConvertError as e:
                    bad[f"convert: {e}"] += 1
                    continue
                reason = validate(rec)
                if reason:
                    bad[f"validate: {reason}"] += 1
                elif t.format == "flan_cot_tsv":
                    # The answer phrase appended to each rationale reads back as the gold answer.
                    got = cot_templates.parse_final_answer(rec["messages"][-1]["content"])
                    if got != cot_templates.normalize_answer(rec["meta"]["answer"]):
                        bad["answer does not parse back"] += 1
        counts[rel] = n
        if bad:
            failures[rel] = bad
    assert failures == {}, f"rows that failed, by file and reason: {failures}"
    for rel, expected in EXPECTED_ROWS.items():
        if rel in counts:
            assert counts[rel] == expected, rel
    assert formats.get("llama-factory/glaive_toolcall_en_demo.json") in (None, "sharegpt")
    assert formats.get("alpaca-cot/gsm8k_train.tsv") in (None, "flan_cot_tsv")
    assert formats.get("llama-factory/alpaca_en_demo.json") in (None, "alpaca")


# ---------------------------------------------------------------------------------------
# non-text values
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,raw,reason", [
    ("alpaca", {"instruction": 42, "output": "x"}, "field 'instruction' is a number, expected text"),
    ("alpaca", {"instruction": "x", "output": 4.5}, "field 'output' is a number, expected text"),
    ("alpaca", {"instruction": "x", "output": True}, "field 'output' is a boolean, expected text"),
    ("alpaca", {"q": "x", "a": 7}, "field 'output' (column 'a') is a number, expected text"),
    ("openai", {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant",
                                                                   "content": 5}]},
     "turn 2: content is a number, expected text"),
    ("flan_cot_tsv", {"question": "q", "answer": 3}, "field 'answer' is a number, expected text"),
])
def test_non_text_values_are_rejected_naming_the_field(fmt, raw, reason):
    columns = {"instruction": "q", "output": "a"} if "q" in raw else None
    with pytest.raises(ConvertError) as e:
        convert(fmt, raw, id="x", source="s", columns=columns)
    assert str(e.value) == reason


# ---------------------------------------------------------------------------------------
# LLaMA-Factory v1 messages: typed parts with `value`, reasoning, tool_call, tool turns
# ---------------------------------------------------------------------------------------


def test_llamafactory_v1_parts():
    out = outcomes("llamafactory_v1.jsonl")
    r1 = out[1]
    assert r1["messages"] == [
        {"role": "user", "content": "How many legs do two cats have?"},
        {"role": "assistant", "content": "Two cats have 8 legs.",
         "reasoning": "A cat has 4 legs. 2 x 4 = 8."}]
    r2 = out[2]
    assert r2["system"] == "You can call tools."
    assert [m["role"] for m in r2["messages"]] == ["user", "assistant", "tool", "assistant"]
    call = r2["messages"][1]
    assert json.loads(call["content"]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert call["reasoning"] == "I should look it up."
    assert r2["messages"][2] == {"role": "tool", "content": '{"temp_c": -3}'}
    assert r2["meta"]["tool_calls"] == [1]
    assert json.loads(r2["meta"]["tools"])[0]["name"] == "get_weather"
    assert turns(out[3]) == [("user", "Say hi."), ("assistant", "Hi!")]
    assert "reasoning" not in out[3]["messages"][1]
    assert out[4] == ("convert: turn 1: content part 0 (text) has neither 'text' nor 'value' "
                      "(keys: type, content)")
    assert out[5] == "convert: turn 1: a user turn holds a reasoning part (only assistant turns may)"
    assert out[6].startswith("convert: turn 2: tool_call part 0 is not valid JSON")
    assert out[7].startswith("convert: turn 1: content part of type 'image' is not supported")
    assert out[8] == "convert: turn 1: content part 0 (text) 'value' is a number, expected text"


def test_llamafactory_v1_tool_call_equals_sharegpt_function_call():
    # The same exchange in both layouts gives the same record.
    call = {"name": "order", "arguments": {"id": 17}}
    v1 = {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Look up order 17."}]},
        {"role": "assistant", "content": [{"type": "tool_call", "value": json.dumps(call)}]},
        {"role": "tool", "content": [{"type": "text", "value": "shipped"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "It has shipped."}]}],
        "tools": json.dumps([{"name": "order"}])}
    sharegpt = {"conversations": [
        {"from": "human", "value": "Look up order 17."},
        {"from": "function_call", "value": json.dumps(call)},
        {"from": "observation", "value": "shipped"},
        {"from": "gpt", "value": "It has shipped."}], "tools": json.dumps([{"name": "order"}])}
    a = convert("openai", v1, id="x", source="s")
    b = convert("sharegpt", sharegpt, id="x", source="s")
    assert [(m["role"], json.loads(m["content"]) if i == 1 else m["content"])
            for i, m in enumerate(a["messages"])] == [
        (m["role"], json.loads(m["content"]) if i == 1 else m["content"])
        for i, m in enumerate(b["messages"])]
    assert a["meta"] == b["meta"]


@pytest.mark.parametrize("keep", [True, False])
def test_data_keep_reasoning_switch(keep):
    from ift.data.ingest import RowOptions, clean_rows

    path = os.path.join(FIXTURES, "llamafactory_v1.jsonl")
    tasks, _ = plan_reads("v1", 0, [path], "auto", 0, 0)
    opts = RowOptions(seed=1, placeholders={}, columns={}, task="", system=None,
                      keep_reasoning=keep)
    records = {line: rec for t in tasks for _, line, rec, _, _ in clean_rows(t, opts) if rec}
    assert sorted(records) == [1, 2, 3]
    assert ("reasoning" in records[1]["messages"][1]) is keep
    assert records[1]["messages"][1]["content"] == "Two cats have 8 legs."
