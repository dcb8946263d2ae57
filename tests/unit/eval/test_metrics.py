"""Evaluation metrics: exact match over every answer phrasing, multiple choice, ROUGE-L."""

from __future__ import annotations

import math

import pytest

from ift.data.cot_templates import ANSWER_PHRASES, answer_phrase
from ift.data.pack import unpack
from ift.data.tokenize import split_last_turn
from ift.eval import metrics


@pytest.mark.parametrize("phrase", ANSWER_PHRASES)
def test_exact_match_reads_every_answer_phrasing(phrase):
    output = "48 / 2 = 24. 24 + 17 = 41.\n" + phrase.format(answer="41")
    assert metrics.final_answer(output) == "41"
    assert metrics.exact_match(output, "41")
    assert not metrics.exact_match(output, "42")


def test_exact_match_on_phrases_the_converter_writes():
    # The converter picks a phrase per question; every pick must read back.
    for i in range(40):
        text = "1 + 1 = 2.\n" + answer_phrase(f"{i * 7}", f"question {i}", seed=3)
        assert metrics.exact_match(text, str(i * 7)), text


@pytest.mark.parametrize("output,gold,expected", [
    ("So the answer is 1,234.50.", "1234.5", True),
    ("The answer is (C).", "C", True),
    ("Answer: $72", "72", True),
    ("答案是 15。", "15", True),
    ("first the answer is 3, then I changed my mind: the answer is 5.", "5", True),
    ("first the answer is 3, then I changed my mind: the answer is 5.", "3", False),
    ("72", "72", True),                       # a bare answer counts as the answer
    ("I think it is 72 probably", "72", False),  # prose without an answer phrase does not
    ("", "72", False),
])
def test_exact_match_cases(output, gold, expected):
    assert metrics.exact_match(output, gold) is expected


def test_long_output_without_phrase_has_no_answer():
    text = "Some reasoning that goes on.\nAnd on without ever stating a result"
    assert metrics.final_answer(text) is None
    assert not metrics.exact_match(text, "3")


AQUA = ("Rs. 5600 is divided into three parts A, B and C. How much A is more than C?\n"
        "Options:\n(A) 300\n(B) 992\n(C) 1120\n(D) 552\n(E) 312")


def test_extract_options_one_per_line_and_inline():
    assert metrics.extract_options(AQUA) == {"A": "300", "B": "992", "C": "1120", "D": "552",
                                             "E": "312"}
    inline = "Pick one: (A) red (B) green (C) blue"
    assert metrics.extract_options(inline) == {"A": "red", "B": "green", "C": "blue"}
    lines = "Which is a fruit?\nA. carrot\nB. apple\nC. potato"
    assert metrics.extract_options(lines) == {"A": "carrot", "B": "apple", "C": "potato"}


def test_extract_options_ignores_prose():
    assert metrics.extract_options("Compute (a) the sum and then the product.") == {}
    assert metrics.extract_options("Only one option (A) here") == {}
    assert metrics.extract_options("no options at all") == {}


def test_mc_accuracy_by_letter_or_by_option_text():
    opts = metrics.extract_options(AQUA)
    assert metrics.mc_correct("... So the answer is (C).", "(C)", opts) is True
    assert metrics.mc_correct("The answer is C", "(C)", opts) is True
    assert metrics.mc_correct("The answer is 1120.", "(C)", opts) is True  # the option's text
    assert metrics.mc_correct("The answer is (A).", "(C)", opts) is False
    assert metrics.mc_correct("The answer is 7.", "(C)", opts) is False
    assert metrics.mc_correct("The answer is (C).", "(C)", {}) is None


def test_rouge_tokens_whitespace_and_cjk():
    assert metrics.rouge_tokens("The cat, sat!") == ["the", "cat", "sat"]
    assert metrics.rouge_tokens("我喜欢猫 cats") == ["我", "喜", "欢", "猫", "cats"]
    assert metrics.rouge_tokens("北京是中国的首都。") == ["北", "京", "是", "中", "国", "的", "首", "都"]
    assert metrics.rouge_tokens(" ... ") == []


def test_lcs_length_hand_examples():
    assert metrics.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert metrics.lcs_length([], ["a"]) == 0
    assert metrics.lcs_length(["a", "b"], ["a", "b"]) == 2


def test_rouge_l_hand_examples():
    # reference "the cat sat on the mat" (6), prediction "the cat on the mat" (5): LCS 5.
    s = metrics.rouge_l("the cat on the mat", "the cat sat on the mat")
    assert s["precision"] == pytest.approx(1.0)
    assert s["recall"] == pytest.approx(5 / 6)
    assert s["f1"] == pytest.approx(2 * (5 / 6) / (1 + 5 / 6))
    # order matters: LCS of "a b c d" and "d c b a" is 1
    assert metrics.rouge_l("a b c d", "d c b a")["f1"] == pytest.approx(0.25)
    assert metrics.rouge_l("xyz", "abc")["f1"] == 0.0
    assert metrics.rouge_l("", "")["f1"] == 1.0
    assert metrics.rouge_l("", "abc")["f1"] == 0.0
    # Chinese: 我喜欢猫 vs 我喜欢狗 -> LCS 3 of 4 each side
    assert metrics.rouge_l("我喜欢猫", "我喜欢狗")["f1"] == pytest.approx(0.75)


def test_score_and_aggregate():
    opts = {"A": "1", "B": "2"}
    samples = [
        metrics.score_sample("The answer is 4.", "2 + 2 = 4. The answer is 4.", "4"),
        metrics.score_sample("The answer is 5.", "2 + 2 = 4. The answer is 4.", "4"),
        metrics.score_sample("The answer is (B).", "The answer is (B).", "(B)", opts),
        metrics.score_sample("hello there my friend, how are you doing today?", "hi", None),
    ]
    agg = metrics.aggregate(samples)
    assert agg["exact_match"] == pytest.approx(2 / 3) and agg["exact_match_n"] == 3
    assert agg["mc_accuracy"] == 1.0 and agg["mc_n"] == 1
    assert agg["rouge_l_n"] == 4 and 0 < agg["rouge_l"] < 1
    assert agg["answered"] == pytest.approx(3 / 4)
    assert metrics.aggregate([])["exact_match"] is None


def test_mean_spread_and_perplexity():
    s = metrics.mean_spread([0.1, 0.2, 0.3])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.2)
    assert s["std"] == pytest.approx(0.1) and s["min"] == 0.1 and s["max"] == 0.3
    assert metrics.mean_spread([0.5])["std"] == 0.0
    assert metrics.mean_spread([])["mean"] is None
    assert metrics.perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert metrics.perplexity(None) is None


def test_split_last_turn_takes_the_last_assistant_span():
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    labels = [-100, -100, 3, 4, -100, -100, -100, 8, 9, -100]
    prompt, ref = split_last_turn(ids, labels)
    assert prompt == [1, 2, 3, 4, 5, 6, 7] and ref == [8, 9]
    assert split_last_turn([1, 2], [-100, -100]) == ([1, 2], [])


def test_unpack_packed_bins():
    row = {"id": "b0", "input_ids": [1, 2, 3, 4, 0], "labels": [-100, 2, -100, 4, -100],
           "seq_ids": [0, 0, 1, 1, -1]}
    parts = unpack(row)
    assert [p["id"] for p in parts] == ["b0", "b0#1"]
    assert parts[1]["input_ids"] == [3, 4] and parts[1]["labels"] == [-100, 4]


@pytest.mark.parametrize("output,expected", [
    ("72", "72"), ("$1,234.50", "1234.5"), ("-3", "-3"), ("(C)", "C"), ("B.", "B"),
    ("xq lorem", None), ("ĠĠ the the", None), ("<|im_end|>", None), ("hello", None),
    ("Z", None), ("12 apples and", None),
])
def test_bare_output_is_an_answer_only_when_it_parses_as_one(output, expected):
    assert metrics.final_answer(output) == expected


def test_answered_is_zero_on_gibberish():
    # Short one-line outputs of a random-init model: none states an answer.
    outputs = ["ĠĠ the the", "zq", "tok tok tok", "<|im_start|>", "...", "ab cd"]
    samples = [metrics.score_sample(o, "The answer is 4.", "4") for o in outputs]
    assert metrics.aggregate(samples)["answered"] == 0.0
