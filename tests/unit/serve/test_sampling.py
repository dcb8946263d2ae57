"""Stop strings, incremental detokenizing and token choice (ift.serve.sampling)."""

from __future__ import annotations

import pytest

from ift.serve.sampling import SamplingParams, TextStream, TokenChooser


class CharTokenizer:
    """Each token id is one character (ids are code points): enough to test detokenizing."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(stream: TextStream, text: str) -> str:
    out = "".join(stream.push(ord(c)) for c in text if not stream.stopped)
    return out + stream.flush()


def test_text_stream_cuts_before_the_stop_string_and_holds_prefixes():
    s = TextStream(CharTokenizer(), ["END"])
    assert s.push(ord("a")) == "a"
    assert s.push(ord("E")) == ""  # may begin END: held back
    assert s.push(ord("N")) == ""
    assert s.push(ord("x")) == "ENx"  # it did not
    assert feed(s, "yyEND and more") == "yy"
    assert s.stopped and s.text == "aENxyy"


def test_text_stream_without_stop_returns_everything():
    s = TextStream(CharTokenizer(), [])
    assert feed(s, "hello world") == "hello world"
    assert not s.stopped


def test_text_stream_stop_at_start_and_across_many_stops():
    s = TextStream(CharTokenizer(), ["\n\n", "###"])
    assert feed(s, "###tail") == ""
    s = TextStream(CharTokenizer(), ["\n\n", "###"])
    assert feed(s, "one\ntwo\n\nthree") == "one\ntwo"


def test_token_chooser_greedy_applies_penalties_like_transformers():
    import torch

    scores = torch.tensor([[1.0, 3.0, 2.9, 0.0]])
    ids = torch.tensor([[1]])
    assert TokenChooser(SamplingParams(temperature=0.0)).choose(ids, scores.clone()) == 1
    # Token 1 is in the history: a penalty of 2 halves its positive logit, so 2 wins.
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert TokenChooser(params).choose(ids, scores.clone()) == 2


def test_token_chooser_sampling_is_seeded_and_respects_top_k():
    import torch

    scores = torch.zeros((1, 50))
    ids = torch.tensor([[0]])
    a = [TokenChooser(SamplingParams(temperature=1.0, seed=7)).choose(ids, scores.clone())
         for _ in range(5)]
    assert len(set(a)) == 1  # same seed, same first draw
    chooser = TokenChooser(SamplingParams(temperature=1.0, seed=3))
    seq = [chooser.choose(ids, scores.clone()) for _ in range(40)]
    assert len(set(seq)) > 5  # it does sample
    other = TokenChooser(SamplingParams(temperature=1.0, seed=3))
    assert [other.choose(ids, scores.clone()) for _ in range(40)] == seq
    biased = torch.arange(50, dtype=torch.float).unsqueeze(0)
    chooser = TokenChooser(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {chooser.choose(ids, biased.clone()) for _ in range(30)} <= {48, 49}


def test_text_stream_without_deltas_decodes_once_at_the_end():
    class CountingTokenizer(CharTokenizer):
        calls = 0

        def decode(self, ids, **kw):
            CountingTokenizer.calls += 1
            return super().decode(ids, **kw)

    s = TextStream(CountingTokenizer(), [], deltas=False)
    assert [s.push(ord(c)) for c in "hello"] == [""] * 5
    assert s.flush() == "hello" and s.text == "hello"
    assert CountingTokenizer.calls == 1
    # A stop string still has to be watched token by token.
    s = TextStream(CharTokenizer(), ["lo"], deltas=False)
    assert feed(s, "hello world") == "hel" and s.stopped


# Characters the tiny byte-level tokenizer splits into several tokens (rare CJK, emoji),
# with ones it has merges for: runs of split characters are what once leaked U+FFFD.
SPLIT_TEXTS = ["餮测天🚀习", "你好，世界！🙂🚀 emoji 👩‍💻 done", "龘鬱饕餮魑魅魍魉", "蓝色的天空🌈🎉𝄞"]


def test_text_stream_never_sends_a_split_character_as_u_fffd(tiny_model):
    """Chinese and emoji whose UTF-8 bytes span several byte-level BPE tokens: every delta
    is whole characters and the deltas add up to the text. (The earlier rule, hold at most
    3 tokens, sent '🚀\\ufffd' for the first text and lost the '习'.)"""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rng = random.Random(0)
    pool = "".join(SPLIT_TEXTS)
    texts = SPLIT_TEXTS + ["".join(rng.choice(pool) for _ in range(rng.randint(2, 9)))
                           for _ in range(300)]
    split = 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        split += sum("\ufffd" in tok.decode([i]) for i in ids)
        for stop in ([], ["天空"]):
            s = TextStream(tok, stop)
            deltas = [s.push(i) for i in ids] + [s.flush()]
            assert not any("\ufffd" in d for d in deltas), (text, deltas)
            want = text.split(stop[0])[0] if stop and stop[0] in text else text
            assert "".join(deltas) == want, (text, deltas)
    assert split > 100  # the texts do split characters across tokens


def test_text_stream_drops_a_character_cut_at_the_end(tiny_model):
    """A reply that ends inside a character (max_tokens or the end-of-turn token came before
    its last byte): the incomplete tail is dropped, as push holds it back, in the streamed
    deltas and in the whole text of a non-streamed reply; every whole character stays."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "餮测天🚀习龘鬱饕餮魑魅魍魉"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cut = 0
    for k in range(1, len(ids) + 1):
        whole = tok.decode(ids[:k])  # byte-level BPE: one U+FFFD for a cut character
        cut += whole.endswith("\ufffd")
        want = whole.removesuffix("\ufffd")
        assert text.startswith(want)
        for stop in ([], ["END"]):
            streamed = TextStream(tok, stop)
            deltas = [streamed.push(i) for i in ids[:k]] + [streamed.flush()]
            assert "".join(deltas) == want == streamed.text, (k, deltas)
            quiet = TextStream(tok, stop, deltas=False)
            for i in ids[:k]:
                quiet.push(i)
            quiet.flush()
            assert quiet.text == want, (k, quiet.text)
    assert cut >= 5  # the cuts do fall inside characters


def test_text_stream_sends_bytes_that_never_form_a_character(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    # A lead byte of a 3-byte character followed by plain text: invalid for good.
    cont = tok.convert_tokens_to_ids("ä")  # byte 0xE4 in the byte-level alphabet
    a = tok("a", add_special_tokens=False)["input_ids"]
    s = TextStream(tok, [])
    assert s.push(cont) == ""  # may still become a character
    assert s.push(a[0]) == "\ufffda"
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_p=5e-324, repetition_penalty=5e-324, seed=0),
    SamplingParams(temperature=1e-300, seed=0),
    SamplingParams(temperature=1.0, repetition_penalty=5e-324, seed=0),
])
def test_token_chooser_survives_overflowing_logits(params):
    # Found by fuzzing the server: logits divided by a tiny penalty or temperature overflow
    # to inf and softmax to nan; the limit of such a distribution is its argmax.
    import torch

    scores = torch.tensor([[1.0, 3.0, 2.9, 0.0]])
    ids = torch.tensor([[1, 2]])
    for _ in range(3):
        assert TokenChooser(params).choose(ids, scores.clone()) in (1, 2)  # the top logits
