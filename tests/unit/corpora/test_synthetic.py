"""The synthetic arithmetic generator and the bundled sample data it writes."""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path

import pytest

from ift.corpora.synthetic import (
    SAMPLE_FILES,
    SPLIT_RANGE,
    arithmetic_problems,
    arithmetic_split,
    question_numbers,
    split_numbers,
    tsv_line,
    write_arithmetic_corpus,
    write_sample_data,
)
from ift.corpora.synthetic_pairs import PAIR_FILES
from ift.data.formats import convert
from ift.data.quality import substitute_placeholders, validate
from ift.data.readers import iter_raw, plan_reads
from ift.data.record import ConvertError, conversation_hash

BUNDLED = Path(__file__).resolve().parents[3] / "ift" / "sample_data"
EQUATION = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)\.$")


def equations(rationale: str) -> list[tuple[int, str, int, int]]:
    """Parse "a op b = c." steps, separated by spaces or the two characters \\n."""
    steps = [s for s in re.split(r"(?<=\.)(?: |\\n)", rationale) if s]
    out = []
    for s in steps:
        m = EQUATION.match(s)
        assert m, f"not an equation: {s!r} in {rationale!r}"
        out.append((int(m[1]), m[2], int(m[3]), int(m[4])))
    return out


def evaluate(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    assert a % b == 0, f"{a} / {b} is not exact"
    return a // b


# ---------------------------------------------------------------------------------------
# Arithmetic problems
# ---------------------------------------------------------------------------------------


def test_problems_are_deterministic_by_seed():
    a = arithmetic_problems(50, seed=7, number_range=(2, 99))
    b = arithmetic_problems(50, seed=7, number_range=(2, 99))
    c = arithmetic_problems(50, seed=8, number_range=(2, 99))
    assert a == b
    assert a != c
    assert len({p["question"] for p in a}) == 50


def test_rationales_evaluate_and_end_at_the_answer():
    probs = arithmetic_problems(400, seed=0, number_range=(2, 99), steps=(2, 4))
    ops_seen = collections.Counter()
    for p in probs:
        eqs = equations(p["rationale"])
        assert 2 <= len(eqs) <= 4
        for a, op, b, c in eqs:
            assert evaluate(a, op, b) == c, p
            assert c >= 1
            ops_seen[op] += 1
        # A chain: each step starts from the previous result, the last result is the answer.
        for (_, _, _, c), (a, _, _, _) in zip(eqs, eqs[1:]):
            assert a == c, p
        assert p["answer"] == str(eqs[-1][3])
        # The question states exactly the start value and each step's operand, in order.
        assert question_numbers(p["question"]) == [eqs[0][0]] + [b for _, _, b, _ in eqs], p
    assert set(ops_seen) == {"+", "-", "*", "/"}
    assert min(ops_seen.values()) > 100


def test_number_range_and_steps_are_respected():
    probs = arithmetic_problems(200, seed=3, number_range=(20, 40), steps=(3, 3))
    for p in probs:
        assert all(20 <= x <= 40 for x in question_numbers(p["question"])), p
        assert len(equations(p["rationale"])) == 3
    only = {2, 3, 5, 30, 45, 60, 77}
    for p in arithmetic_problems(100, seed=1, number_range=(2, 99), numbers=only):
        assert set(question_numbers(p["question"])) <= only, p


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"number_range": (0, 10)}, "number_range"),
        ({"number_range": (10, 5)}, "number_range"),
        ({"number_range": (2, 9), "steps": (3, 2)}, "steps"),
        ({"number_range": (2, 9), "numbers": {5}}, "too few"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        arithmetic_problems(5, seed=0, **kwargs)


def test_split_uses_disjoint_numbers():
    train_nums, test_nums = split_numbers(0)
    assert not train_nums & test_nums
    assert train_nums | test_nums == set(range(SPLIT_RANGE[0], SPLIT_RANGE[1] + 1))
    train, test = arithmetic_split(500, 150, seed=0)
    assert len(train) == 500 and len(test) == 150
    seen_train = {x for p in train for x in question_numbers(p["question"])}
    seen_test = {x for p in test for x in question_numbers(p["question"])}
    assert seen_train <= train_nums
    assert seen_test <= test_nums
    assert not seen_train & seen_test
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert arithmetic_split(500, 150, seed=0) == (train, test)
    assert arithmetic_split(500, 150, seed=1)[0] != train


def _read_tsv(path: str) -> list[list[str]]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


def _convert_file(path: str, seed: int = 42) -> tuple[list[dict], list[tuple[int, str]]]:
    """Every row of a file through the real reader and converter: (records, rejects)."""
    tasks, _ = plan_reads("src", 0, [path], "auto", 0, 0)
    records, rejects = [], []
    for task in tasks:
        for line, raw, error, _ in iter_raw(task):
            if error:
                rejects.append((line, error))
                continue
            try:
                rec = convert(task.format, raw, id=f"{line}", source="src", seed=seed)
            except ConvertError as e:
                rejects.append((line, str(e)))
                continue
            reason = validate(rec)
            if reason:
                rejects.append((line, reason))
            else:
                records.append(rec)
    return records, rejects


def test_write_arithmetic_corpus_with_and_without_rationale(tmp_path):
    cot = write_arithmetic_corpus(str(tmp_path / "cot"), n_train=60, n_test=20, seed=5)
    plain = write_arithmetic_corpus(str(tmp_path / "plain"), n_train=60, n_test=20, seed=5,
                                    with_rationale=False)
    assert (cot["n_train"], cot["n_test"]) == (60, 20)
    assert not set(cot["train_numbers"]) & set(cot["test_numbers"])
    for split in ("train", "test"):
        rows_cot, rows_plain = _read_tsv(cot[split]), _read_tsv(plain[split])
        assert len(rows_cot) == cot[f"n_{split}"]
        assert all(len(r) == 3 for r in rows_cot + rows_plain)
        # Same questions and answers; only the rationale column differs.
        assert [r[:2] for r in rows_cot] == [r[:2] for r in rows_plain]
        assert all(r[2] for r in rows_cot)
        assert all(r[2] == "" for r in rows_plain)
        for _, a, rationale in rows_cot:
            assert equations(rationale)[-1][3] == int(a)
    records, rejects = _convert_file(cot["train"])
    assert not rejects
    assert len(records) == 60
    first = _read_tsv(cot["train"])[0]
    assert records[0]["messages"][0]["role"] == "user"
    assert first[0] in records[0]["messages"][0]["content"]
    assert records[0]["messages"][1]["content"].startswith(first[2])
    assert first[1] in records[0]["messages"][1]["content"]


def test_answers_only_rows_convert_to_answer_replies(tmp_path):
    plain = write_arithmetic_corpus(str(tmp_path), n_train=10, n_test=2, seed=0,
                                    with_rationale=False)
    records, rejects = _convert_file(plain["train"])
    assert not rejects, rejects[:2]
    rows = _read_tsv(plain["train"])
    for rec, (_, answer, _) in zip(records, rows):
        reply = rec["messages"][-1]["content"]
        assert answer in reply
        assert not EQUATION.search(reply)


def test_tsv_line_refuses_tabs_and_newlines():
    assert tsv_line("q", "1", "r") == "q\t1\tr\n"
    with pytest.raises(ValueError, match="rationale"):
        tsv_line("q", "1", "a\tb")
    with pytest.raises(ValueError, match="question"):
        tsv_line("q\nx", "1", "r")


# ---------------------------------------------------------------------------------------
# Bundled sample data
# ---------------------------------------------------------------------------------------


def test_bundled_sample_data_matches_the_generator(tmp_path):
    written = write_sample_data(str(tmp_path), seed=0)
    every = SAMPLE_FILES + PAIR_FILES
    assert sorted(os.path.basename(p) for p in written) == sorted(every)
    bundled = sorted(p.name for p in BUNDLED.iterdir() if p.name != "README.md"
                     and p.is_file())  # ie/: test_ie_formats.py
    assert bundled == sorted(every), "stale or missing files in ift/sample_data"
    for name in every:
        assert (tmp_path / name).read_bytes() == (BUNDLED / name).read_bytes(), (
            f"ift/sample_data/{name} differs from the generator; run "
            "`python -m ift.corpora.synthetic ift/sample_data`"
        )
    other = tmp_path / "other"
    write_sample_data(str(other), seed=1)
    assert (other / "alpaca_en.json").read_bytes() != (BUNDLED / "alpaca_en.json").read_bytes()


def test_sample_data_files_have_the_documented_shape():
    total = sum(p.stat().st_size for p in BUNDLED.iterdir())
    assert total < 1_000_000
    en = json.loads((BUNDLED / "alpaca_en.json").read_text(encoding="utf-8"))
    zh = [json.loads(x) for x in (BUNDLED / "alpaca_zh.jsonl").read_text(encoding="utf-8")
          .splitlines()]
    sharegpt = json.loads((BUNDLED / "multiturn_sharegpt.json").read_text(encoding="utf-8"))
    chat = [json.loads(x) for x in (BUNDLED / "chat_openai.jsonl").read_text(encoding="utf-8")
            .splitlines()]
    identity = json.loads((BUNDLED / "identity_en.json").read_text(encoding="utf-8"))
    tsv = _read_tsv(str(BUNDLED / "cot_arith.tsv"))
    assert (len(en), len(zh), len(tsv), len(sharegpt), len(chat), len(identity)) == (
        120, 80, 100, 40, 30, 15)
    for rows in (en, zh, identity):
        assert all(set(r) == {"instruction", "input", "output"} for r in rows)
    assert 30 < sum(bool(r["input"]) for r in en) < 90
    assert all(re.search(r"[\u4e00-\u9fff]", r["instruction"] + r["output"]) for r in zh[:20])
    assert all("{{name}}" in r["output"] or "{{author}}" in r["output"] for r in identity)
    convs = [d["conversations"] for d in sharegpt]
    assert all(sum(t["from"] == "human" for t in c) >= 1 for c in convs)
    assert sum(sum(t["from"] == "human" for t in c) >= 2 for c in convs) >= 30
    assert sum(c[0]["from"] == "system" for c in convs) >= 2
    assert sum(bool(re.search(r"[\u4e00-\u9fff]", c[0]["value"])) for c in convs) >= 4
    assert sum(any(isinstance(m["content"], list) for m in r["messages"]) for r in chat) >= 5
    for _, a, rationale in tsv:
        assert equations(rationale)[-1][3] == int(a)
    assert any("\\n" in r[2] for r in tsv)


def test_every_sample_row_converts_and_duplicates_are_planted():
    hashes: collections.Counter = collections.Counter()
    formats = {}
    for name in SAMPLE_FILES:
        path = str(BUNDLED / name)
        records, rejects = _convert_file(path)
        assert not rejects, (name, rejects[:3])
        formats[name] = plan_reads("src", 0, [path], "auto", 0, 0)[1][0]["format"]
        for rec in records:
            rec = substitute_placeholders(rec, {"name": "ift", "author": "the ift team"})
            assert "{{" not in json.dumps(rec, ensure_ascii=False)
            hashes[conversation_hash(rec)] += 1
    assert formats == {
        "alpaca_en.json": "alpaca",
        "alpaca_zh.jsonl": "alpaca",
        "cot_arith.tsv": "flan_cot_tsv",
        "multiturn_sharegpt.json": "sharegpt",
        "chat_openai.jsonl": "openai",
        "identity_en.json": "alpaca",
    }
    assert sum(hashes.values()) == 385
    assert sum(n - 1 for n in hashes.values()) == 5


# ---------------------------------------------------------------------------------------
# The quickstart's identity data
# ---------------------------------------------------------------------------------------


def test_bundled_quickstart_data_matches_the_generator(tmp_path):
    from ift.corpora.synthetic import QUICKSTART_FILES, quickstart_data_dir, write_quickstart_data

    written = write_quickstart_data(str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == sorted(QUICKSTART_FILES)
    bundled = Path(quickstart_data_dir())
    # general.json is the base model's own answers (ift.corpora.distill), not the generator's.
    assert sorted(p.name for p in bundled.iterdir() if p.suffix == ".json") == \
        sorted(QUICKSTART_FILES + ("general.json",))
    for name in QUICKSTART_FILES:
        assert (bundled / name).read_bytes() == (tmp_path / name).read_bytes(), (
            f"ift/quickstart_data/{name} differs from the generator; run "
            "`python -m ift.corpora.synthetic ift/sample_data ift/quickstart_data`")


def test_identity_heldout_paraphrases_are_not_in_training_and_name_the_assistant():
    from ift.corpora.synthetic import quickstart_data_dir

    folder = Path(quickstart_data_dir())
    train = json.loads((folder / "identity.json").read_text(encoding="utf-8"))
    heldout = json.loads((folder / "identity_heldout.json").read_text(encoding="utf-8"))
    general = json.loads((folder / "general_heldout.json").read_text(encoding="utf-8"))
    assert len(train) >= 60 and len(heldout) >= 8 and len(general) >= 3
    zh = re.compile(r"[\u4e00-\u9fff]")
    for rows in (train, heldout):
        assert sum(bool(zh.search(r["instruction"])) for r in rows) >= len(rows) // 5
        assert all("{{name}}" in r["output"] for r in rows)
    asked = {r["instruction"] for r in train}
    assert not asked & {r["instruction"] for r in heldout}
    assert not any("{{" in r["output"] for r in general)
    for name in ("identity.json", "identity_heldout.json", "general_heldout.json"):
        records, rejects = _convert_file(str(folder / name))
        assert records and not rejects


def test_self_distilled_general_data_asks_no_held_out_question():
    """general.json: the base model's answers to ift.corpora.distill's prompts, in their
    order, each holding its accepted answer; none is a held-out check question, none is
    empty or cut off mid-token."""
    from ift.corpora.distill import GENERAL_PROMPTS, holds_answer
    from ift.corpora.synthetic import quickstart_data_dir
    from ift.quickstart import GENERAL_CHECKS

    rows = json.loads((Path(quickstart_data_dir()) / "general.json").read_text(encoding="utf-8"))
    asked = [r["instruction"] for r in rows]
    assert len(rows) >= 10 and asked == [p for p, _ in GENERAL_PROMPTS if p in set(asked)]
    accepted = dict(GENERAL_PROMPTS)
    assert all(holds_answer(r["output"], accepted[r["instruction"]]) for r in rows)
    assert not {p for p, _ in GENERAL_PROMPTS} & {q for q, _, _ in GENERAL_CHECKS}
    assert all(r["output"].strip() and "\ufffd" not in r["output"] and "{{" not in r["output"]
               for r in rows)
    heldout = json.loads((Path(quickstart_data_dir()) / "general_heldout.json")
                         .read_text(encoding="utf-8"))
    assert [r["instruction"] for r in heldout] == [q for q, _, _ in GENERAL_CHECKS]
    records, rejects = _convert_file(str(Path(quickstart_data_dir()) / "general.json"))
    assert len(records) == len(rows) and not rejects


def test_a_distilled_answer_is_kept_only_when_it_holds_an_accepted_answer():
    from ift.corpora.distill import holds_answer

    assert holds_answer("8 * 7 = 56.", ("56",)) and not holds_answer("8 * 7 = 54.", ("56",))
    assert holds_answer("The Pacific Ocean.", ("pacific",))
    assert holds_answer("Anything at all.", ())
