"""Tokenization with label masking and truncation."""

from __future__ import annotations

import pytest

from ift.data.templates import TemplateError, render_prompt, render_segments
from ift.data.tokenize import IGNORE_INDEX, tokenize_records
from ift.models import train_tokenizer


def rec(rid: str, messages: list[tuple[str, str]], system: str = "", meta=None) -> dict:
    return {
        "id": rid, "source": f"src-{rid}", "lang": "en", "task": "chat", "system": system,
        "messages": [{"role": r, "content": c} for r, c in messages], "meta": meta or {},
    }


MULTI = rec("multi", [
    ("user", "What is the capital of France?"),
    ("assistant", "Paris."),
    ("user", "And the weather there?"),
    ("assistant", "Let me check the forecast."),
    ("tool", '{"paris": "sunny, 24C"}'),
    ("assistant", "It is sunny and 24 degrees in Paris."),
], system="You are a terse assistant.")
LEAD_SYSTEM = rec("lead", [("system", "Answer in one word.")] + [
    ("user", "Colour of the sky?"), ("assistant", "Blue."),
    ("user", "And at night?"), ("assistant", "Black."),
])
ZH = rec("zh", [("user", "中国的首都是哪里？"), ("assistant", "中国的首都是北京。")])
ALPACA = rec("alpaca", [
    ("user", "Translate into French.\nThe weather is nice today."),
    ("assistant", "Il fait beau aujourd'hui."),
], meta={"instruction": "Translate into French.", "input": "The weather is nice today."})
RECORDS = [MULTI, LEAD_SYSTEM, ZH, ALPACA]


@pytest.fixture(scope="module")
def toks(chatml_tok, plain_tok, llama_tok, no_marker_tok):
    return {"chatml": chatml_tok, "plain": plain_tok, "llama": llama_tok,
            "no_marker": no_marker_tok}


def assistant_replies(r: dict) -> list[str]:
    return [m["content"] for m in r["messages"] if m["role"] == "assistant"]


# (template, tokenizer) -> how each assistant reply appears in the labels
CASES = {
    ("chatml", "chatml"): lambda c: c + "<|im_end|>",
    ("alpaca", "chatml"): lambda c: c + "<|endoftext|>",
    ("human_assistant", "chatml"): lambda c: " " + c + "<|endoftext|>",
    ("tokenizer", "chatml"): lambda c: c + "<|im_end|>",
    ("auto", "plain"): lambda c: c + "<|im_end|>",
    ("chatml", "llama"): lambda c: c + "<|im_end|></s>",
    ("alpaca", "llama"): lambda c: c + "</s>",
    ("human_assistant", "llama"): lambda c: " " + c + "</s>",
    ("tokenizer", "llama"): lambda c: " " + c + " </s>",
    ("auto", "no_marker"): lambda c: c + "<|endoftext|>",
}


def labelled_spans(row: dict, tok) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    spans, current = [], []
    for tid, lab in zip(row["input_ids"], row["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == tid
            current.append(tid)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tok.decode(s, skip_special_tokens=False) for s in spans]


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("template,tok_name", list(CASES))
def test_labels_cover_exactly_the_assistant_replies(template, tok_name, toks):
    tok = toks[tok_name]
    rows, dropped = tokenize_records(RECORDS, tok, template=template, max_seq_len=4096)
    assert dropped == []
    assert [r["id"] for r in rows] == [r["id"] for r in RECORDS]
    for record, row in zip(RECORDS, rows):
        expected = [CASES[template, tok_name](c) for c in assistant_replies(record)]
        assert labelled_spans(row, tok) == expected
        # the text round-trips: tokens decode to the rendered conversation
        rendered = "".join(t for t, _ in render_segments(record, template, tok))
        assert decode(tok, row["input_ids"]) == rendered
        assert row["num_tokens"] == len(row["input_ids"]) == len(row["labels"])
        assert row["num_trainable"] == sum(lab != IGNORE_INDEX for lab in row["labels"])
        assert row["source"] == record["source"]


@pytest.mark.parametrize("template,tok_name", list(CASES))
def test_train_on_prompt_labels_everything(template, tok_name, toks):
    tok = toks[tok_name]
    masked, _ = tokenize_records(RECORDS, tok, template=template, max_seq_len=4096)
    rows, dropped = tokenize_records(RECORDS, tok, template=template, max_seq_len=4096,
                                     train_on_prompt=True)
    assert dropped == []
    for m, r in zip(masked, rows):
        assert r["input_ids"] == m["input_ids"]
        assert r["labels"] == r["input_ids"]
        assert r["num_trainable"] == r["num_tokens"] > m["num_trainable"]


@pytest.mark.parametrize("template", ["chatml", "alpaca", "human_assistant", "tokenizer"])
def test_prompt_tokens_equal_inference_tokens(template, toks):
    """The tokens before each reply are those serving gets from render_prompt."""
    tok = toks["chatml"]
    for record in RECORDS:
        msgs = record["messages"]
        for j, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            part = {**record, "messages": msgs[: j + 1]}
            (row,), _ = tokenize_records([part], tok, template=template, max_seq_len=4096)
            labels = row["labels"]
            start = max(i for i in range(len(labels)) if labels[i] != IGNORE_INDEX
                        and (i == 0 or labels[i - 1] == IGNORE_INDEX))
            prompt = render_prompt(msgs[:j], tok, template, system=record["system"],
                                   meta=record["meta"])
            assert row["input_ids"][:start] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_prompt_text_is_tokenized_in_one_piece(tokenizer_corpus):
    """Template pieces that join into one pre-token ("</user>" + "<assistant>" holds "><")
    tokenize as they do in the whole prompt."""
    xml = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
           "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = train_tokenizer(
        tokenizer_corpus + ["<system>x</system><user>y</user><assistant>z</assistant>"] * 20,
        vocab_size=700,
    )
    tok.chat_template = xml
    assert len(tok("><", add_special_tokens=False)["input_ids"]) == 1
    (row,), _ = tokenize_records([ZH], tok, template="tokenizer", max_seq_len=512)
    prompt = render_prompt(ZH["messages"][:1], tok)
    assert prompt.endswith("</user><assistant>")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert row["input_ids"][: len(ids)] == ids
    assert labelled_spans(row, tok) == ["中国的首都是北京。</assistant>"]


def test_batch_equals_one_by_one(toks):
    tok = toks["llama"]
    batch, _ = tokenize_records(RECORDS * 2, tok, template="tokenizer", max_seq_len=4096)
    single = [tokenize_records([r], tok, template="tokenizer", max_seq_len=4096)[0][0]
              for r in RECORDS * 2]
    assert batch == single


# ---------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------


def test_right_truncation_cuts_the_end(toks):
    tok = toks["chatml"]
    (full,), _ = tokenize_records([MULTI], tok, template="chatml", max_seq_len=4096)
    limit = full["num_tokens"] - 5
    (row,), dropped = tokenize_records([MULTI], tok, template="chatml", max_seq_len=limit)
    assert dropped == []
    assert row["num_tokens"] == limit
    assert row["input_ids"] == full["input_ids"][:limit]
    assert row["labels"] == full["labels"][:limit]
    assert row["num_trainable"] > 0


def test_right_truncation_drops_a_sample_with_no_reply_left(toks):
    tok = toks["chatml"]
    long_prompt = rec("long", [("user", "word " * 200), ("assistant", "Short.")])
    rows, dropped = tokenize_records([long_prompt, ZH], tok, template="chatml", max_seq_len=64)
    assert [r["id"] for r in rows] == ["zh"]
    assert dropped == [{
        "id": "long", "source": "src-long",
        "reason": dropped[0]["reason"],
    }]
    assert "right truncation" in dropped[0]["reason"]
    assert "max_seq_len=64" in dropped[0]["reason"]


@pytest.mark.parametrize("template,tok_name", [("chatml", "chatml"), ("alpaca", "chatml"),
                                               ("human_assistant", "llama"),
                                               ("tokenizer", "llama")])
def test_left_truncation_drops_leading_exchanges(template, tok_name, toks):
    tok = toks[tok_name]
    # Without the first exchange (question + "Paris."), the rest fits.
    rest = {**MULTI, "messages": MULTI["messages"][2:]}
    (short,), _ = tokenize_records([rest], tok, template=template, max_seq_len=4096)
    (full,), _ = tokenize_records([MULTI], tok, template=template, max_seq_len=4096)
    assert short["num_tokens"] < full["num_tokens"]
    (row,), dropped = tokenize_records([MULTI], tok, template=template,
                                       max_seq_len=short["num_tokens"], truncation="left")
    assert dropped == []
    text = decode(tok, row["input_ids"])
    assert MULTI["system"] in text  # the system prompt stays
    assert "capital of France" not in text and "Paris." not in text.split("24C")[0]
    assert labelled_spans(row, tok) == [CASES[template, tok_name](c)
                                        for c in assistant_replies(rest)]
    if template == "chatml":
        # whole turns removed: exactly the text of the shorter conversation
        assert row["input_ids"] == short["input_ids"]
        assert row["labels"] == short["labels"]


def test_left_truncation_keeps_as_many_latest_exchanges_as_fit(toks):
    tok = toks["chatml"]
    turns = [("user", "One?"), ("assistant", "First."), ("user", "Two?"),
             ("assistant", "Second."), ("user", "Three?"), ("assistant", "Third.")]
    three = rec("three", turns, system="Count.")
    last_two = rec("three", turns[2:], system="Count.")
    (want,), _ = tokenize_records([last_two], tok, template="chatml", max_seq_len=4096)
    for slack in (0, 3):  # exactly fits, and a little room that the first exchange can't use
        (row,), _ = tokenize_records([three], tok, template="chatml",
                                     max_seq_len=want["num_tokens"] + slack, truncation="left")
        assert row["input_ids"] == want["input_ids"]
        assert labelled_spans(row, tok) == ["Second.<|im_end|>", "Third.<|im_end|>"]


def test_left_truncation_cuts_a_single_long_exchange_from_the_left(toks):
    tok = toks["chatml"]
    long_q = rec("long", [("user", "word " * 300), ("assistant", "Done.")], system="Sys.")
    (full,), _ = tokenize_records([long_q], tok, template="chatml", max_seq_len=4096)
    (row,), dropped = tokenize_records([long_q], tok, template="chatml", max_seq_len=40,
                                       truncation="left")
    assert dropped == []
    assert row["num_tokens"] == 40
    text = decode(tok, row["input_ids"])
    assert text.startswith("<|im_start|>system\nSys.<|im_end|>\n")
    assert text.endswith("word <|im_end|>\n<|im_start|>assistant\nDone.<|im_end|>\n")
    tail = len(tok("<|im_start|>system\nSys.<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert row["input_ids"][tail:] == full["input_ids"][-(40 - tail):]
    assert labelled_spans(row, tok) == ["Done.<|im_end|>"]


def test_left_truncation_drops_when_no_reply_is_left(toks):
    tok = toks["chatml"]
    ends_with_user = rec("tail", [("user", "Hi"), ("assistant", "Hello."),
                                  ("user", "word " * 300)])
    rows, dropped = tokenize_records([ends_with_user], tok, template="chatml", max_seq_len=50,
                                     truncation="left")
    assert rows == []
    assert dropped[0]["id"] == "tail" and "left truncation" in dropped[0]["reason"]


# ---------------------------------------------------------------------------------------
# Dropped and rejected input
# ---------------------------------------------------------------------------------------


def test_records_without_a_reply_or_unrenderable_are_dropped_with_reasons(toks):
    tok = toks["chatml"]
    no_reply = rec("noreply", [("user", "Hello?")])
    bad_role = rec("badrole", [("user", "Hi"), ("bot", "Hello")])
    rows, dropped = tokenize_records([no_reply, ZH, bad_role], tok, template="chatml",
                                     max_seq_len=128)
    assert [r["id"] for r in rows] == ["zh"]
    reasons = {d["id"]: d["reason"] for d in dropped}
    assert set(reasons) == {"noreply", "badrole"}
    assert "no assistant turn" in reasons["noreply"]
    assert "role='bot'" in reasons["badrole"]
    # with train_on_prompt a prompt-only record still has tokens to learn from
    rows, dropped = tokenize_records([no_reply], tok, template="chatml", max_seq_len=128,
                                     train_on_prompt=True)
    assert len(rows) == 1 and dropped == []


def test_template_failing_on_one_record_drops_it(make_llama_tokenizer):
    tok = make_llama_tokenizer(
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools here') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    rows, dropped = tokenize_records([MULTI, ZH], tok, template="tokenizer", max_seq_len=512)
    assert [r["id"] for r in rows] == ["zh"]
    assert dropped[0]["id"] == "multi" and "no tools here" in dropped[0]["reason"]


def test_unusable_template_raises(make_llama_tokenizer):
    tok = make_llama_tokenizer("{% for m in messages %}{{ m['content'] }}|{% endfor %}"
                               "{{ messages | length }}")
    with pytest.raises(TemplateError, match="rewrites earlier text"):
        tokenize_records([MULTI], tok, template="tokenizer", max_seq_len=512)


def test_bad_arguments(toks):
    with pytest.raises(ValueError, match="truncation='middle'"):
        tokenize_records([ZH], toks["chatml"], template="chatml", max_seq_len=64,
                         truncation="middle")
    with pytest.raises(ValueError, match="template 'chatlm'"):
        tokenize_records([ZH], toks["chatml"], template="chatlm", max_seq_len=64)


def _as_rows(arrays, records) -> list[dict]:
    out = []
    for j, i in enumerate(arrays.index):
        lo, hi = arrays.offsets[j], arrays.offsets[j + 1]
        out.append({"id": records[i]["id"], "source": records[i]["source"],
                    "input_ids": arrays.input_ids[lo:hi].tolist(),
                    "labels": arrays.labels[lo:hi].tolist(),
                    "num_tokens": int(arrays.num_tokens[j]),
                    "num_trainable": int(arrays.num_trainable[j])})
    return out


NO_REPLY = rec("noreply", [("user", "Hello?")])
LONG_PROMPT = rec("longq", [("user", "word " * 300), ("assistant", "Short.")])
BAD_ROLE = rec("badrole", [("user", "Hi"), ("wizard", "Poof")])


@pytest.mark.parametrize("template,tok_name", list(CASES))
@pytest.mark.parametrize("max_seq_len", [4096, 64, 20])
@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("truncation", ["right", "left"])
def test_array_output_equals_the_row_output(template, tok_name, max_seq_len, train_on_prompt,
                                            truncation, toks):
    """tokenize_arrays gives the same rows and drop decisions as tokenize_records, with
    duplicates, unrenderable records, prompt-only records and prompts cut by truncation."""
    from ift.data.tokenize import tokenize_arrays

    tok = toks[tok_name]
    records = RECORDS + [NO_REPLY, LONG_PROMPT, ZH, BAD_ROLE, MULTI]
    kw = dict(template=template, max_seq_len=max_seq_len, train_on_prompt=train_on_prompt,
              truncation=truncation)
    rows, dropped = tokenize_records(records, tok, **kw)
    arrays, dropped_at = tokenize_arrays(records, tok, **kw)
    assert _as_rows(arrays, records) == rows
    assert arrays.offsets[-1] == len(arrays.input_ids) == len(arrays.labels)
    assert arrays.input_ids.dtype == arrays.labels.dtype == "int32"
    assert sorted(records[i]["id"] for i, _ in dropped_at) == sorted(d["id"] for d in dropped)
    assert sorted(r for _, r in dropped_at) == sorted(d["reason"] for d in dropped)
    assert not set(arrays.index) & {i for i, _ in dropped_at}
    assert len(arrays) + len(dropped_at) == len(records)


def test_reasoning_is_labelled_with_the_reply_and_can_be_dropped(toks):
    from ift.data.record import drop_reasoning

    tok = toks["chatml"]
    thinking = rec("t1", [("user", "2 + 2?"), ("assistant", "4.")])
    thinking["messages"][1]["reasoning"] = "Two and two make four."
    (row,), dropped = tokenize_records([thinking], tok, template="chatml", max_seq_len=4096)
    assert dropped == []
    assert labelled_spans(row, tok) == ["<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>"]
    (plain,), _ = tokenize_records([drop_reasoning(thinking)], tok, template="chatml",
                                   max_seq_len=4096)
    assert labelled_spans(plain, tok) == ["4.<|im_end|>"]
    (same,), _ = tokenize_records([rec("t1", [("user", "2 + 2?"), ("assistant", "4.")])], tok,
                                  template="chatml", max_seq_len=4096)
    assert same["input_ids"] == plain["input_ids"] and same["labels"] == plain["labels"]


def test_fast_encoding_gives_the_ids_of_the_tokenizer_call(toks):
    """Without offsets the Rust tokenizer's encode_batch_fast is used: the same ids as the
    transformers call, on English, Chinese, emoji and control tokens."""
    from ift.data.tokenize import _encode

    texts = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "你好，世界！今天天气很好。",
             "emoji 🙂👍🏽 and tabs\tand  spaces", ""]
    for tok in toks.values():
        ids, offsets = _encode(texts, tok, False)
        assert ids == tok(texts, add_special_tokens=False)["input_ids"]
        assert offsets == [[] for _ in texts]
        with_offsets, spans = _encode(texts, tok, True)
        assert with_offsets == ids and len(spans[0]) == len(ids[0])
