"""Held-out items for `ift eval` from tokenized rows and from records: prompt, reference,
gold answer and options. (Reading the rows and records: data/test_dataset.py and
data/test_ingest.py; `split_last_turn` and `unpack`: test_metrics.py.)"""

from __future__ import annotations

import pytest

from ift.config import ConfigError
from ift.data.record import make_record
from ift.eval.heldout import items_from_records, items_from_rows, loss_rows_from_records
from ift.eval.metrics import mc_correct

RECORDS: list[dict] = []  # the conftest tokenizers train on ift's fallback texts only

PROMPT = "<|im_start|>user\nPick one:\n(A) red\n(B) blue<|im_end|>\n<|im_start|>assistant\n"
REPLY = "The answer is blue.<|im_end|>"


def _row(tok, id: str, prompt: str, reply: str) -> dict:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(reply, add_special_tokens=False)["input_ids"]
    return {"id": id, "input_ids": p + r, "labels": [-100] * len(p) + r}


def test_items_from_rows_take_prompt_reference_gold_and_options(chatml_tok):
    row = _row(chatml_tok, "r1", PROMPT, REPLY)
    (item,) = items_from_rows([row], chatml_tok)
    n = len(chatml_tok(PROMPT, add_special_tokens=False)["input_ids"])
    assert item.id == "r1" and item.prompt_ids == row["input_ids"][:n]
    assert item.prompt == PROMPT  # as the model reads it, markers included
    assert item.reference == "The answer is blue."  # special tokens dropped
    assert item.gold == "blue"
    # The last option ends the user turn: its text is "blue", not "blue<|im_end|>", so the
    # gold answer names option B as it does for the same question read from raw files.
    assert item.options == {"A": "red", "B": "blue"}
    assert mc_correct("The answer is (B).", item.gold, item.options) is True


def test_items_from_rows_without_trained_tokens_have_no_reference(chatml_tok):
    ids = chatml_tok(PROMPT, add_special_tokens=False)["input_ids"]
    (item,) = items_from_rows([{"id": 7, "input_ids": ids, "labels": [-100] * len(ids)}],
                              chatml_tok)
    assert (item.id, item.reference, item.gold) == ("7", None, None)
    assert item.prompt_ids == ids


def test_items_from_records_render_the_history_and_pick_the_gold_answer(chatml_tok):
    mc = make_record(id="mc", source="s", system="Be brief.", messages=[
        {"role": "user", "content": "Pick one:\n(A) red\n(B) blue"},
        {"role": "assistant", "content": "The answer is (B)."}])
    flan = make_record(id="flan", source="s", task="cot", meta={"answer": "12"}, messages=[
        {"role": "user", "content": "3*4?"},
        {"role": "assistant", "content": "3 times 4 is 12. So the answer is 13."}])
    open_q = make_record(id="open", source="s", messages=[
        {"role": "user", "content": "Tell me a joke."}])
    items = items_from_records([mc, flan, open_q], chatml_tok, "chatml")
    assert items[0].prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                               "<|im_start|>user\nPick one:\n(A) red\n(B) blue<|im_end|>\n"
                               "<|im_start|>assistant\n")
    assert items[0].prompt_ids == chatml_tok(items[0].prompt,
                                             add_special_tokens=False)["input_ids"]
    assert (items[0].reference, items[0].gold) == ("The answer is (B).", "B")
    assert items[0].options == {"A": "red", "B": "blue"}
    # meta["answer"] (FLAN CoT rows) wins over what the reference states.
    assert (items[1].gold, items[1].task, items[1].options) == ("12", "cot", {})
    # No assistant turn: everything is prompt, nothing to compare with.
    assert (items[2].reference, items[2].gold) == (None, None)
    assert items[2].prompt.endswith("Tell me a joke.<|im_end|>\n<|im_start|>assistant\n")


def test_a_conversation_ending_in_a_user_turn_is_scored_on_its_last_answered_turn(
        chatml_tok):
    rec = make_record(id="c", source="s", messages=[
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And then?"}])
    (item,) = items_from_records([rec], chatml_tok, "chatml")
    assert item.reference == "Hello."
    assert item.prompt == "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"


def test_a_record_that_cannot_be_rendered_is_an_error_naming_it(chatml_tok):
    bad = make_record(id="r42", source="s", messages=[
        {"role": "user", "content": 5}, {"role": "assistant", "content": "x"}])
    with pytest.raises(ConfigError, match=r"^eval\.data: record r42: cannot render the prompt.*content must be a string"):
        items_from_records([bad], chatml_tok, "chatml")


def test_loss_rows_skip_records_without_an_assistant_turn(chatml_tok):
    recs = [make_record(id="a", source="s", messages=[{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]),
            make_record(id="b", source="s", messages=[{"role": "user", "content": "only"}])]
    rows = loss_rows_from_records(recs, chatml_tok, "chatml", 64)
    assert [r["id"] for r in rows] == ["a"]
    reply = chatml_tok("hello<|im_end|>", add_special_tokens=False)["input_ids"]
    assert [t for t in rows[0]["labels"] if t != -100] == reply
