"""Toy tasks on which step-by-step targets are known to matter: a positive control for the
CoT ablation (an ablation that cannot show a known effect cannot be trusted on an unknown
one).

* `add`: multi-digit addition (`digits` digits per operand). The rationale is a detailed
  scratchpad, digit by digit from the right with the carry ("2 + 9 = 11, write 1, carry 1.
  8 + 3 + 1 = 12, write 2, carry 1. 4 + 7 + 1 = 12, write 12."), the kind of format with
  which small transformers learn addition from far fewer samples (Lee et al. 2023,
  "Teaching Arithmetic to Small Transformers").
* `parity`: whether a bit string has an even or odd number of 1s (`bits` long). The
  rationale is the running parity after each bit ("1 odd. 0 odd. 1 even. ..."), the
  decomposition under which parity becomes learnable where the answer alone is not (Wies
  et al. 2023, "Sub-task Decomposition Enables Learning in Sequence to Sequence Tasks").
* `parity_indexed`: the same with index hints: every bit of the question carries a letter
  ("a1 b0 c1 ...") and every step of the rationale repeats it ("a1 odd. b0 odd. c1
  even."), so a step finds its bit by content (the letter after the previous step's)
  instead of by counting positions, which a small model trained from scratch does not
  learn in a few hundred steps (index hints: Zhou et al. 2023, "What Algorithms can
  Transformers Learn?").
* `parity_cased`: the bits as letters, a capital for a 1 ("a B c D"), and the question
  asks whether the capitals are even or odd in number. Step i of the rationale is letter
  i again, a capital when the count so far is odd (for "a B C d": "Steps: a B c d").
  Every step is one token found in one hop: the previous step (a fixed distance back) and
  the question's letter i (the same letter in either case, wherever the prompt template
  puts it), so the update is an XOR of two attended tokens, with no counting of positions
  and no two-hop lookup (which parity_indexed needs: find the letter, then read the token
  after it). The answer alone is still the parity of all the bits at once.

* `parity_aligned`: the bits as digits ("1011") and the running parity as digits too
  ("Steps: 1101": 1 while the count of 1s so far is odd). Every bit and every step is one
  token, and written in the Alpaca layout (`write_alpaca_splits`: one fixed prompt, the
  question itself) the distance from step i back to bit i is the same for every i and
  every row: a fixed-offset lookup and an XOR with the step before, the two things a
  small transformer learns first. (The FLAN CoT layout picks one of 12 prompt templates
  per question, which moves the bits by a different distance in each.)

Train and held-out are disjoint: held-out additions use first operands that no training
problem uses; held-out bit strings never occur in training. Both arms of an ablation get
the same questions and answers, written as FLAN CoT TSV (question, answer, rationale) with
or without the rationale, as `ift.corpora.synthetic.write_arithmetic_corpus` writes them, so
`ift tune`'s `exclude_tags` arms and `jobs/cot_ablation.py --task` work unchanged.

Everything here is pure and deterministic by seed.
"""

from __future__ import annotations

import json
import random

from ift import storage
from ift.corpora.synthetic import write_tsv_splits

TASKS = ("add", "parity", "parity_indexed", "parity_cased", "parity_aligned")
ANSWER_PHRASE = "So the answer is {answer}."
"""The one closing sentence of an Alpaca-layout corpus (`alpaca_rows`)."""
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def add_rationale(a: int, b: int) -> str:
    """The digit-by-digit scratchpad of a + b, least significant digit first."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    n = max(len(da), len(db))
    for i in range(n):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        if i == n - 1:
            steps.append(f"{terms} = {total}, write {total}.")
        else:
            carry = total // 10
            steps.append(f"{terms} = {total}, write {total % 10}"
                         + (f", carry {carry}." if carry else "."))
    return " ".join(steps)


def indexed(bits: str) -> str:
    """The bits with their index hints: "101" -> "a1 b0 c1"."""
    if len(bits) > len(LETTERS):
        raise ValueError(f"{len(bits)} bits: index hints go up to {len(LETTERS)}")
    return " ".join(f"{LETTERS[i]}{b}" for i, b in enumerate(bits))


def cased(bits: str) -> str:
    """The bits as letters, a capital for a 1: "101" -> "A b C"."""
    if len(bits) > len(LETTERS):
        raise ValueError(f"{len(bits)} bits: letters go up to {len(LETTERS)}")
    return " ".join(LETTERS[i].upper() if b == "1" else LETTERS[i] for i, b in enumerate(bits))


def cased_rationale(bits: str) -> str:
    """Letter i again after each bit, a capital while the count of capitals so far is odd:
    "101" -> "Steps: A B c"."""
    ones = 0
    steps = []
    for i, b in enumerate(bits):
        ones += b == "1"
        steps.append(LETTERS[i].upper() if ones % 2 else LETTERS[i])
    return "Steps: " + " ".join(steps)


def aligned_rationale(bits: str) -> str:
    """The running parity as digits, one per bit: "1011" -> "Steps: 1101"."""
    ones, steps = 0, []
    for b in bits:
        ones += b == "1"
        steps.append(str(ones % 2))
    return "Steps: " + "".join(steps)


def parity_rationale(bits: str, hints: bool = False) -> str:
    """The running parity of the 1s after each bit (each step led by its index hint when
    `hints`)."""
    ones = 0
    steps = []
    for i, b in enumerate(bits):
        ones += b == "1"
        steps.append(f"{LETTERS[i] if hints else ''}{b} {'odd' if ones % 2 else 'even'}.")
    return " ".join(steps)


def addition_split(n_train: int, n_test: int, seed: int, digits: int = 3
                   ) -> tuple[list[dict], list[dict]]:
    """Addition problems {question, answer, rationale}; the first operands of held-out
    problems never occur as first operands in training (half of the range each)."""
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    rng = random.Random(f"add-{seed}-{digits}")
    firsts = list(range(lo, hi + 1))
    rng.shuffle(firsts)
    half = len(firsts) // 2
    pools = {"train": firsts[:half], "test": firsts[half:]}
    out: dict[str, list[dict]] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        seen: set[tuple[int, int]] = set()
        rows = []
        if n > len(pools[split]) * (hi - lo + 1):
            raise ValueError(f"{n} {split} problems: more than the {digits}-digit pairs")
        while len(rows) < n:
            a, b = rng.choice(pools[split]), rng.randint(lo, hi)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            rows.append({"question": f"What is {a} + {b}?", "answer": str(a + b),
                         "rationale": add_rationale(a, b)})
        out[split] = rows
    return out["train"], out["test"]


def parity_split(n_train: int, n_test: int, seed: int, bits: int = 12, hints: bool = False,
                 style: str = "bits") -> tuple[list[dict], list[dict]]:
    """Parity problems (with index hints when `hints`; as cased letters when `style` is
    "cased", with digit steps when "aligned"); no held-out bit string occurs in training. The same seed and size give the
    same strings in every style."""
    if n_train + n_test > 2 ** bits:
        raise ValueError(f"{n_train} + {n_test} problems: more than the {2 ** bits} strings "
                         f"of {bits} bits")
    rng = random.Random(f"parity-{seed}-{bits}")
    codes = rng.sample(range(2 ** bits), n_train + n_test)

    def row(code: int) -> dict:
        s = format(code, f"0{bits}b")
        answer = "odd" if s.count("1") % 2 else "even"
        if style == "cased":
            return {"question": f"Is the number of capital letters in {cased(s)} even or odd?",
                    "answer": answer, "rationale": cased_rationale(s)}
        if style == "aligned":
            return {"question": f"Is the number of 1s in {s} even or odd?",
                    "answer": answer, "rationale": aligned_rationale(s)}
        return {"question": f"Is the number of 1s in {indexed(s) if hints else s} even or odd?",
                "answer": answer, "rationale": parity_rationale(s, hints)}

    return [row(c) for c in codes[n_test:]], [row(c) for c in codes[:n_test]]


def alpaca_rows(rows: list[dict], with_rationale: bool = True) -> list[dict]:
    """{question, answer, rationale} rows in the Alpaca layout under one fixed prompt: the
    question is the instruction, the output the rationale and ANSWER_PHRASE, or the phrase
    alone (the answers-only arm: the same prompts, other targets)."""
    out = []
    for r in rows:
        phrase = ANSWER_PHRASE.format(answer=r["answer"])
        out.append({"instruction": r["question"], "input": "",
                    "output": f"{r['rationale']}\n{phrase}" if with_rationale else phrase})
    return out


def write_alpaca_splits(out_dir: str, splits: dict[str, list[dict]],
                        with_rationale: bool = True) -> dict[str, str]:
    """Write <split>.json (Alpaca layout, `alpaca_rows`) per split under out_dir (local or
    s3://). Returns split -> path."""
    storage.makedirs(out_dir)
    paths = {}
    for split, rows in splits.items():
        path = storage.join(out_dir, f"{split}.json")
        storage.write_text(path, json.dumps(alpaca_rows(rows, with_rationale),
                                            ensure_ascii=False, indent=1) + "\n")
        paths[split] = path
    return paths


def task_splits(task: str, n_train: int, n_test: int, seed: int, size: int | None = None
                ) -> tuple[list[dict], list[dict], int]:
    """(train, held-out, size) rows of `task` (add: `size` digits, default 3; the parity
    tasks: `size` bits, default 12)."""
    if task == "add":
        size = size or 3
        return (*addition_split(n_train, n_test, seed, size), size)
    if task in ("parity", "parity_indexed", "parity_cased", "parity_aligned"):
        size = size or 12
        style = {"parity_cased": "cased", "parity_aligned": "aligned"}.get(task, "bits")
        return (*parity_split(n_train, n_test, seed, size, hints=task == "parity_indexed",
                              style=style), size)
    raise ValueError(f"task {task!r}: one of {', '.join(TASKS)}")


def write_scratchpad_corpus(out_dir: str, task: str, n_train: int, n_test: int, seed: int,
                            with_rationale: bool = True, size: int | None = None,
                            layout: str = "tsv") -> dict:
    """Write the train and test splits of `task` (`task_splits`) under out_dir: FLAN CoT
    TSV (train.tsv, test.tsv) or, with layout "alpaca", Alpaca JSON under one fixed prompt
    (train.json, test.json). Returns {train, test, n_train, n_test, task, size,
    with_rationale}."""
    train, test, size = task_splits(task, n_train, n_test, seed, size)
    if layout not in ("tsv", "alpaca"):
        raise ValueError(f"layout {layout!r}: tsv or alpaca")
    write = write_alpaca_splits if layout == "alpaca" else write_tsv_splits
    paths = write(out_dir, {"train": train, "test": test}, with_rationale)
    return {"train": paths["train"], "test": paths["test"], "n_train": len(train),
            "n_test": len(test), "task": task, "size": size, "with_rationale": with_rationale}
