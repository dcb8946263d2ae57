"""Evaluation metrics as pure functions: exact match of a final answer, multiple-choice
accuracy, ROUGE-L, and their aggregation over samples.

* Exact match reads the final answer out of a (chain-of-thought) output with
  `ift.data.cot_templates.parse_final_answer`, which knows every answer phrasing the
  project's CoT templates write ("So the answer is X.", "Answer: X", "Final answer: X", ...)
  and common ones seen in the wild; an output that is nothing but a short answer ("72")
  counts as that answer when it parses as one (a number or an option letter; "xq lorem"
  does not). Both sides are compared after `normalize_answer` ("(C)" == "C",
  "1,234.50" == "1234.5").
* Multiple-choice accuracy applies when the prompt lists options ("(A) 300", "B) 992",
  "C. 1120", one per line or inline): the prediction is the letter the output names, or
  the option whose text the output's answer equals.
* ROUGE-L is the F1 of the longest common subsequence of tokens. Tokens: lowercased text
  split on whitespace, with every CJK character a token of its own and punctuation
  around words dropped, so Chinese and English are both scored word by word.
"""

from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ift.data.cot_templates import normalize_answer, parse_final_answer

# ---------------------------------------------------------------------------------------
# Exact match
# ---------------------------------------------------------------------------------------

# An output with no answer phrase still states an answer when it is this short and
# parses as a number or an option letter.
_BARE_ANSWER_CHARS = 40
_BARE_ANSWER = re.compile(r"^(?:[-+]?\d+(?:\.\d+)?|[A-H])$")


def final_answer(output: str) -> str | None:
    """The normalized final answer an output states, or None.

    An answer phrase wins (the last one, as models restate things); otherwise an output of
    one short line is taken as the answer itself when it normalizes to a number or an
    option letter ("72", "$1,234.50", "(C)"); other text states no answer.
    """
    if not output:
        return None
    parsed = parse_final_answer(output)
    if parsed is not None:
        return parsed
    text = output.strip()
    if text and "\n" not in text and len(text) <= _BARE_ANSWER_CHARS:
        norm = normalize_answer(text)
        return norm if _BARE_ANSWER.match(norm) else None
    return None


def exact_match(output: str, gold: str) -> bool:
    """Whether the final answer stated in `output` equals `gold` after normalization."""
    pred = final_answer(output)
    return pred is not None and pred == normalize_answer(gold)


# ---------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------

# "(A) text" anywhere (inline lists and one-per-line lists alike).
_PAREN_OPTION = re.compile(r"\(([A-H])\)\s*")
# "A) text" or "A. text" or "A: text" at the start of a line.
_LINE_OPTION = re.compile(r"^\s*([A-H])[).:]\s+(.+?)\s*$", re.MULTILINE)


def extract_options(prompt: str) -> dict[str, str]:
    """Answer options listed in a prompt: letter -> option text ({} when there are none).

    Needs at least two options with consecutive letters from A, so a stray "(a)" in
    ordinary prose does not make a question multiple choice.
    """
    options: dict[str, str] = {}
    marks = list(_PAREN_OPTION.finditer(prompt))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(prompt)
        text = prompt[m.end():end].split("\n", 1)[0].strip().rstrip(",;")
        options.setdefault(m.group(1), text)
    if not _valid_options(options):
        options = {m.group(1): m.group(2) for m in _LINE_OPTION.finditer(prompt)}
    return options if _valid_options(options) else {}


def _valid_options(options: dict[str, str]) -> bool:
    letters = sorted(options)
    return len(letters) >= 2 and letters == [chr(ord("A") + i) for i in range(len(letters))]


def choice_of(answer: str | None, options: dict[str, str]) -> str | None:
    """The option letter an answer names: a letter among the options, or the letter of
    the option whose text equals the answer (after normalization)."""
    if answer is None or not options:
        return None
    norm = normalize_answer(answer)
    if norm.upper() in options and len(norm) == 1:
        return norm.upper()
    for letter, text in options.items():
        if normalize_answer(text) == norm:
            return letter
    return None


def mc_correct(output: str, gold: str, options: dict[str, str]) -> bool | None:
    """Multiple-choice correctness of an output (None when there are no options or the
    gold answer names none of them)."""
    if not options:
        return None
    gold_letter = choice_of(gold, options)
    if gold_letter is None:
        return None
    return choice_of(final_answer(output), options) == gold_letter


# ---------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= cp <= 0x4DBF  # extension A
        or 0x20000 <= cp <= 0x2EBEF  # extensions B-F
        or 0xF900 <= cp <= 0xFAFF  # compatibility ideographs
        or 0x3040 <= cp <= 0x30FF  # hiragana, katakana
        or 0xAC00 <= cp <= 0xD7AF  # hangul syllables
    )


def _strip_punct(token: str) -> str:
    start, end = 0, len(token)
    while start < end and unicodedata.category(token[start]).startswith("P"):
        start += 1
    while end > start and unicodedata.category(token[end - 1]).startswith("P"):
        end -= 1
    return token[start:end]


def rouge_tokens(text: str) -> list[str]:
    """Lowercased tokens: whitespace-separated words, each CJK character on its own,
    punctuation at word edges dropped (a token of punctuation alone disappears)."""
    out: list[str] = []
    for word in unicodedata.normalize("NFKC", text).lower().split():
        buf = ""
        for ch in word:
            if _is_cjk(ch):
                if buf:
                    out.append(buf)
                    buf = ""
                out.append(ch)
            else:
                buf += ch
        if buf:
            out.append(buf)
    return [t for t in (_strip_punct(t) for t in out) if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-L precision, recall and F1 of a prediction against one reference.

    Two empty texts score 1.0 (nothing to say, nothing said); one empty side scores 0.
    """
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p and not r:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    lcs = lcs_length(p, r)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    prec, rec = lcs / len(p), lcs / len(r)
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec)}


# ---------------------------------------------------------------------------------------
# Per sample and aggregate
# ---------------------------------------------------------------------------------------


def score_sample(output: str, reference: str | None, gold: str | None,
                 options: dict[str, str] | None = None) -> dict[str, Any]:
    """Every metric for one generated output: predicted answer, exact match (None without
    a gold answer), multiple-choice correctness (None without options) and ROUGE-L F1
    against the reference (None without one)."""
    options = options or {}
    pred = final_answer(output)
    return {
        "predicted": pred,
        "correct": exact_match(output, gold) if gold else None,
        "mc_correct": mc_correct(output, gold, options) if gold else None,
        "rouge_l": rouge_l(output, reference)["f1"] if reference is not None else None,
    }


def _mean(values: Iterable[float]) -> float | None:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else None


def aggregate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Corpus metrics from scored samples: exact_match over samples with a gold answer,
    mc_accuracy over multiple-choice samples, rouge_l over samples with a reference,
    with the count behind each."""
    em = [bool(s["correct"]) for s in samples if s.get("correct") is not None]
    mc = [bool(s["mc_correct"]) for s in samples if s.get("mc_correct") is not None]
    rl = [float(s["rouge_l"]) for s in samples if s.get("rouge_l") is not None]
    return {
        "exact_match": _mean(em),
        "exact_match_n": len(em),
        "mc_accuracy": _mean(mc),
        "mc_n": len(mc),
        "rouge_l": _mean(rl),
        "rouge_l_n": len(rl),
        "answered": _mean(s.get("predicted") is not None for s in samples) if samples else None,
        "samples": len(samples),
    }


# Metrics particular to one kind of task, computed over the samples whose record has that
# `task` ("ie" for the IE tasks, ...): task -> function of those scored samples (each with
# output, reference, gold) returning {metric name: value}. A task's module adds its entry.
TASK_METRICS: dict[str, Callable[[Sequence[dict[str, Any]]], dict[str, Any]]] = {}


def task_metrics(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The TASK_METRICS of every task present among the samples."""
    out: dict[str, Any] = {}
    for task, fn in TASK_METRICS.items():
        mine = [s for s in samples if s.get("task") == task]
        if mine:
            out.update(fn(mine))
    return out


def perplexity(loss: float | None) -> float | None:
    """exp(loss), capped so a diverged model does not overflow."""
    if loss is None or math.isnan(loss):
        return None
    return math.exp(min(loss, 50.0))


def mean_spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation, min and max of per-seed values (None when empty)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": len(vals),
        "mean": sum(vals) / len(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
    }
