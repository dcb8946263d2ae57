"""The CoT ablation's positive-control corpus: scratchpads that compute the answer,
disjoint train and held-out problems, both arms with the same questions."""

from __future__ import annotations

import re

import pytest

from ift.corpora import scratchpad as sp
from ift.data.formats import convert
from ift.eval.metrics import exact_match


def _replay_addition(rationale: str) -> str:
    """The sum the scratchpad writes, read back digit by digit."""
    written = re.findall(r"write (\d+)", rationale)
    return written[-1] + "".join(reversed(written[:-1]))


def test_addition_scratchpad_computes_the_sum():
    assert sp.add_rationale(482, 739) == (
        "2 + 9 = 11, write 1, carry 1. 8 + 3 + 1 = 12, write 2, carry 1. "
        "4 + 7 + 1 = 12, write 12.")
    train, test = sp.addition_split(300, 50, seed=3, digits=4)
    for r in train + test:
        a, b = map(int, re.findall(r"\d+", r["question"]))
        assert r["answer"] == str(a + b) == _replay_addition(r["rationale"])
        assert 1000 <= a <= 9999 and 1000 <= b <= 9999


def test_parity_scratchpad_is_the_running_parity():
    assert sp.parity_rationale("1011") == "1 odd. 0 odd. 1 even. 1 odd."
    train, test = sp.parity_split(200, 40, seed=0, bits=10)
    for r in train + test:
        bits = re.search(r"[01]{10}", r["question"]).group(0)
        assert r["answer"] == ("odd" if bits.count("1") % 2 else "even")
        assert r["rationale"].split()[-1].rstrip(".") == r["answer"]
        assert len(r["rationale"].split(". ")) == 10


def test_indexed_parity_leads_every_bit_and_step_with_its_letter():
    assert sp.indexed("101") == "a1 b0 c1"
    assert sp.parity_rationale("101", hints=True) == "a1 odd. b0 odd. c1 even."
    train, test = sp.parity_split(100, 20, seed=0, bits=10, hints=True)
    plain = sp.parity_split(100, 20, seed=0, bits=10)
    for r, p in zip(train + test, plain[0] + plain[1]):  # the same strings, hinted
        bits = re.search(r"[01]{10}", p["question"]).group(0)
        assert sp.indexed(bits) in r["question"] and r["answer"] == p["answer"]
        assert [s[:2] for s in r["rationale"].split(" ")[::2]] == sp.indexed(bits).split()
    with pytest.raises(ValueError, match="up to 26"):
        sp.indexed("0" * 27)


def test_cased_parity_steps_are_the_letters_cased_by_the_running_count():
    assert sp.cased("1011") == "A b C D"
    assert sp.cased_rationale("1011") == "Steps: A B c D"
    train, test = sp.parity_split(100, 20, seed=0, bits=10, style="cased")
    plain = sp.parity_split(100, 20, seed=0, bits=10)
    for r, p in zip(train + test, plain[0] + plain[1]):  # the same strings, as letters
        bits = re.search(r"[01]{10}", p["question"]).group(0)
        assert sp.cased(bits) in r["question"] and r["answer"] == p["answer"]
        steps = r["rationale"].removeprefix("Steps: ").split(" ")
        assert [s.lower() for s in steps] == list(sp.LETTERS[:10])
        # step i: a capital exactly when step i-1 and letter i of the question differ in case
        letters = sp.cased(bits).split(" ")
        prev = False
        for s, q in zip(steps, letters):
            assert s.isupper() == (prev != q.isupper())
            prev = s.isupper()
        assert ("odd" if steps[-1].isupper() else "even") == r["answer"]
    with pytest.raises(ValueError, match="up to 26"):
        sp.cased("0" * 27)


def test_aligned_parity_writes_one_running_parity_digit_per_bit():
    assert sp.aligned_rationale("1011") == "Steps: 1101"
    train, test = sp.parity_split(100, 20, seed=0, bits=10, style="aligned")
    plain = sp.parity_split(100, 20, seed=0, bits=10)
    for r, p in zip(train + test, plain[0] + plain[1]):  # the same strings
        bits = re.search(r"[01]{10}", p["question"]).group(0)
        assert r["question"] == f"Is the number of 1s in {bits} even or odd?"
        steps = r["rationale"].removeprefix("Steps: ")
        assert len(steps) == 10 and steps[0] == bits[0]
        # step i is bit i XOR step i-1
        assert all(int(steps[i]) == int(bits[i]) ^ int(steps[i - 1]) for i in range(1, 10))
        assert ("odd" if steps[-1] == "1" else "even") == r["answer"] == p["answer"]


def test_alpaca_layout_keeps_one_prompt_and_the_arms_differ_only_in_targets(tmp_path):
    import json

    from ift.data.formats import convert

    cot = sp.write_scratchpad_corpus(str(tmp_path / "cot"), "parity_aligned", 30, 5, seed=0,
                                     layout="alpaca")
    ans = sp.write_scratchpad_corpus(str(tmp_path / "ans"), "parity_aligned", 30, 5, seed=0,
                                     layout="alpaca", with_rationale=False)
    c, a = (json.loads(open(x["train"]).read()) for x in (cot, ans))
    assert [r["instruction"] for r in c] == [r["instruction"] for r in a]
    for rc, ra in zip(c, a):
        assert ra["output"] in ("So the answer is odd.", "So the answer is even.")
        assert rc["output"] == rc["output"].split("\n")[0] + "\n" + ra["output"]
        rec = convert("alpaca", rc, id="x", source="s")
        assert rec["messages"][0]["content"] == rc["instruction"]  # the question, no template
        assert exact_match(rec["messages"][-1]["content"], ra["output"].split()[-1][:-1])
    with pytest.raises(ValueError, match="layout"):
        sp.write_scratchpad_corpus(str(tmp_path / "x"), "add", 1, 1, seed=0, layout="csv")


def test_train_and_heldout_are_disjoint_and_deterministic():
    train, test = sp.addition_split(2000, 100, seed=1)
    firsts = {int(re.findall(r"\d+", r["question"])[0]) for r in train}
    assert not firsts & {int(re.findall(r"\d+", r["question"])[0]) for r in test}
    assert len({r["question"] for r in train}) == 2000
    assert sp.addition_split(2000, 100, seed=1) == (train, test)
    assert sp.addition_split(2000, 100, seed=2)[1] != test
    ptrain, ptest = sp.parity_split(3000, 100, seed=1)
    assert not {r["question"] for r in ptrain} & {r["question"] for r in ptest}
    with pytest.raises(ValueError, match="more than the 16 strings"):
        sp.parity_split(10, 10, seed=0, bits=4)


@pytest.mark.parametrize("task", sp.TASKS)
def test_both_arms_share_questions_and_convert(tmp_path, task):
    cot = sp.write_scratchpad_corpus(str(tmp_path / "cot"), task, 40, 10, seed=0)
    ans = sp.write_scratchpad_corpus(str(tmp_path / "ans"), task, 40, 10, seed=0,
                                     with_rationale=False)
    assert (cot["n_train"], cot["n_test"], ans["with_rationale"]) == (40, 10, False)
    for split in ("train", "test"):
        c = [line.split("\t") for line in open(cot[split]).read().splitlines()]
        a = [line.split("\t") for line in open(ans[split]).read().splitlines()]
        assert [x[:2] for x in c] == [x[:2] for x in a]
        assert all(x[2] for x in c) and not any(x[2] for x in a)
    q, answer, rationale = open(cot["train"]).readline().rstrip("\n").split("\t")
    rec = convert("flan_cot_tsv", {"question": q, "answer": answer, "rationale": rationale},
                  id="x", source="s", seed=0)
    reply = rec["messages"][-1]["content"]
    assert reply.startswith(rationale) and exact_match(reply, answer)
    with pytest.raises(ValueError, match="one of add, parity, parity_indexed, parity_cased, parity_aligned"):
        sp.write_scratchpad_corpus(str(tmp_path / "x"), "sort", 1, 1, seed=0)
