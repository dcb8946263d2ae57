"""CoT templates: deterministic choice, spread, and answers that parse back."""

from __future__ import annotations

import collections

import pytest

from ift.data.cot_templates import (
    ANSWER_PHRASES,
    TEMPLATES,
    answer_phrase,
    normalize_answer,
    parse_final_answer,
    render_prompt,
    template_index,
)


def test_templates_are_many_distinct_and_hold_the_question_once():
    assert len(TEMPLATES) >= 8 and len(set(TEMPLATES)) == len(TEMPLATES)
    for t in TEMPLATES:
        assert t.count("{question}") == 1
        assert t.format(question="Q?").count("Q?") == 1
    assert len(ANSWER_PHRASES) >= 4
    for p in ANSWER_PHRASES:
        assert p.count("{answer}") == 1


def test_template_choice_is_deterministic_and_seeded():
    q = "How many wheels do 3 bicycles have?"
    assert render_prompt(q, 42) == render_prompt(q, 42)
    assert template_index(q, 42) == template_index(q, 42)
    assert len({template_index(q, s) for s in range(100)}) >= 8


def test_rows_spread_over_templates():
    counts = collections.Counter(template_index(f"question number {i}", 42) for i in range(2000))
    assert len(counts) == len(TEMPLATES) >= 8
    # Roughly even: no template is left with a sliver of the rows.
    assert min(counts.values()) > 2000 / len(TEMPLATES) / 2


@pytest.mark.parametrize("answer", ["72", "(C)", "1,000", "-3.50", "Paris", "yes", "22 1/2 %",
                                    "42."])
def test_every_answer_phrase_parses_back(answer):
    for p in ANSWER_PHRASES:
        text = "Some reasoning.\nMore steps: 3 + 4 = 7.\n" + p.format(answer=answer.rstrip("."))
        assert parse_final_answer(text) == normalize_answer(answer), p
    for key in range(50):
        sentence = answer_phrase(answer, str(key), 7)
        assert parse_final_answer(sentence) == normalize_answer(answer)
        assert ".." not in sentence


def test_answer_phrase_is_deterministic_and_varied():
    assert answer_phrase("5", "k", 1) == answer_phrase("5", "k", 1)
    assert len({answer_phrase("5", f"k{i}", 1) for i in range(200)}) == len(ANSWER_PHRASES)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is 72.", "72"),
        ("Answer: (C)", "C"),
        ("The final answer: (E).", "E"),
        ("Therefore, the answer is 1,234,567.", "1234567"),
        ("答案是 42。", "42"),
        ("答案：(B)", "B"),
        ("The answer is $5.00.", "5"),
        ("The answer is (A) 300.", "A"),
        ("The answer is \\boxed{9}", "9"),
        ("The answer is 3.5", "3.5"),
        # The last statement wins over an earlier one.
        ("First guess: the answer is 3. On reflection the answer is 4.", "4"),
        ("Answer would be a multiple of 83 which is 166 So the answer is (B).", "B"),
        ("I cannot tell.", None),
        ("", None),
    ],
)
def test_parse_final_answer(text, expected):
    assert parse_final_answer(text) == expected


def test_normalize_answer():
    assert normalize_answer("(c)") == "C"
    assert normalize_answer("C") == "C"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("  72.  ") == "72"
    assert normalize_answer('"Paris".') == "Paris"
    assert normalize_answer("10.0") == "10"
