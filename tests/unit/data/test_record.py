"""The unified record: construction, reasoning removal, text normalization, the duplicate
and split hashes, and the parquet row round trip."""

from __future__ import annotations

import json

from ift.data.record import (
    conversation_hash,
    drop_reasoning,
    make_record,
    normalize_text,
    record_to_row,
    row_to_record,
    split_hash,
)


def _rec(*turns, system: str = "", meta: dict | None = None) -> dict:
    """A record from (role, content[, reasoning]) tuples."""
    msgs = []
    for t in turns:
        m = {"role": t[0], "content": t[1]}
        if len(t) > 2:
            m["reasoning"] = t[2]
        msgs.append(m)
    return make_record(id="r", source="s", system=system, messages=msgs, meta=meta)


def test_make_record_keeps_role_content_and_non_empty_reasoning_only():
    rec = make_record(id="r1", source="src", system=None, meta=None, messages=[
        {"role": "user", "content": "Hi", "name": "alice"},
        {"role": "assistant", "content": "Hello", "reasoning": ""},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning": "2 and 2 make 4"},
    ])
    assert rec == {
        "id": "r1", "source": "src", "lang": "", "task": "", "system": "", "meta": {},
        "messages": [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello"},
                     {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4", "reasoning": "2 and 2 make 4"}],
    }


def test_drop_reasoning_returns_a_copy_without_it_and_leaves_the_input_alone():
    plain = _rec(("user", "q"), ("assistant", "a"))
    assert drop_reasoning(plain) is plain  # nothing to drop: the record itself
    thinking = _rec(("user", "q"), ("assistant", "a", "because"), system="sys",
                    meta={"k": 1})
    out = drop_reasoning(thinking)
    assert out["messages"] == [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a"}]
    assert (out["system"], out["meta"], out["id"]) == ("sys", {"k": 1}, "r")
    assert thinking["messages"][1]["reasoning"] == "because"


def test_normalize_text_applies_nfkc_and_collapses_every_kind_of_whitespace():
    # Full-width letters and digits, a no-break space, an ideographic space, tabs, newlines.
    assert normalize_text("\tＨｅｌｌｏ\u00a0 ｗｏｒｌｄ\u3000１２\n\n") == "Hello world 12"
    assert normalize_text("ﬁne") == "fine"  # the fi ligature decomposes
    assert normalize_text("") == ""
    # The ASCII separators the hashes put between fields are whitespace to str.split.
    assert normalize_text("a\x1eb\x1fc\x1dd") == "a b c d"


def test_conversation_hash_ignores_spacing_and_width_but_not_words_roles_or_turns():
    base = _rec(("user", "What is 2+2?"), ("assistant", "4"), system="Be brief.")
    h = conversation_hash(base)
    assert len(h) == 32 and int(h, 16) >= 0  # a 16-byte hex digest
    same = _rec(("user", "  What  is\n2+2？"), ("assistant", "４ "),
                system="Be\tbrief.")
    assert conversation_hash(same) == h
    assert conversation_hash({**base, "system": None}) != h
    assert conversation_hash(_rec(("user", "What is 2+2?"), ("assistant", "4"))) == \
        conversation_hash({**base, "system": None})  # no system = empty system
    assert conversation_hash(_rec(("user", "What is 2+3?"), ("assistant", "4"),
                                  system="Be brief.")) != h
    # The same text under another role, or split at another turn boundary, is another row.
    assert conversation_hash(_rec(("user", "a"), ("assistant", "b"))) != \
        conversation_hash(_rec(("assistant", "a"), ("user", "b")))
    assert conversation_hash(_rec(("user", "a b"), ("assistant", "c"))) != \
        conversation_hash(_rec(("user", "a"), ("assistant", "b c")))


def test_conversation_hash_cannot_be_forged_with_separator_characters():
    two_turns = _rec(("user", "a"), ("assistant", "b"))
    one_turn = _rec(("user", "a\x1eassistant\x1fb"))
    assert conversation_hash(one_turn) != conversation_hash(two_turns)
    with_reasoning = _rec(("user", "q"), ("assistant", "x", "y"))
    assert conversation_hash(with_reasoning) != conversation_hash(
        _rec(("user", "q"), ("assistant", "x\x1dy")))
    # Reasoning counts, and an empty one is the same as none.
    assert conversation_hash(with_reasoning) != conversation_hash(
        _rec(("user", "q"), ("assistant", "x")))
    assert conversation_hash({**with_reasoning, "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "x",
                                           "reasoning": ""}]}) == \
        conversation_hash(_rec(("user", "q"), ("assistant", "x")))


def test_split_hash_of_an_ie_record_follows_its_normalized_text_only():
    a = _rec(("user", "Extract: 甲和乙"), ("assistant", "[]"), meta={"ie": {"text": "甲 和乙"}})
    b = _rec(("user", "另一个问题"), ("assistant", "{}"),
             meta={"ie": {"text": " 甲\u3000和乙\n", "task": "ner"}})
    assert split_hash(a) == split_hash(b)
    assert split_hash(a) != conversation_hash(a)
    assert len(split_hash(a)) == 32
    # meta without an IE text (none, null, an IE block without text): the conversation hash
    for meta in (None, {"ie": None}, {"ie": {"task": "re"}}, {"tools": "[]"}):
        r = {**a, "meta": meta}
        assert split_hash(r) == conversation_hash(r), meta


def test_row_round_trip_serialises_meta_as_sorted_unescaped_json():
    rec = _rec(("user", "café?"), ("assistant", "oui", "il demande"), system="S",
               meta={"z": [1, 2], "a": "é", "tools": {"x": None}})
    row = record_to_row(rec)
    assert row["meta"] == '{"a": "é", "tools": {"x": null}, "z": [1, 2]}'
    assert rec["meta"] == {"z": [1, 2], "a": "é", "tools": {"x": None}}  # input untouched
    back = row_to_record(row)
    assert back == rec
    back["messages"][0]["content"] = "changed"
    assert row["messages"][0]["content"] == "café?"  # messages are copies
    assert record_to_row({**rec, "meta": None})["meta"] == "{}"


def test_row_to_record_accepts_empty_missing_or_already_parsed_meta():
    base = {"id": "r", "messages": [{"role": "user", "content": "x"}]}
    assert row_to_record({**base, "meta": ""})["meta"] == {}
    assert row_to_record({**base, "meta": None})["meta"] == {}
    assert row_to_record(base)["meta"] == {}
    assert row_to_record({**base, "meta": {"k": 1}})["meta"] == {"k": 1}
    assert row_to_record({**base, "meta": json.dumps({"k": [1]})})["meta"] == {"k": [1]}
