"""Chain-of-thought prompt templates, answer phrases, and the parser that reads answers back.

A FLAN-style CoT row (question, answer, rationale) becomes a user turn built from one of
TEMPLATES and an assistant turn of the rationale followed by one of ANSWER_PHRASES. Both
choices are a pure function of (seed, question), so a prepared dataset is reproducible and
rows spread evenly over the phrasings. `parse_final_answer` reads the answer back out of a
model's output; it understands every phrase below (and common ones seen in the wild), so
evaluation can score generations of a model trained on this data.
"""

from __future__ import annotations

import hashlib
import re

# Each template holds {question} exactly once. Written for this project; varied on purpose
# (question first or last, with or without a lead-in) so a model does not latch onto one form.
TEMPLATES: tuple[str, ...] = (
    "{question}\nWork through the problem one step at a time, then state the answer.",
    "Solve the following problem. Show your reasoning first and give the final answer last.\n\n"
    "{question}",
    "Question: {question}\nExplain how you get there before you answer.",
    "{question}\nReason it out carefully, and end with the final answer.",
    "Here is a problem to solve:\n{question}\nLay out your reasoning, then say what the answer is.",
    "Think about the question below step by step and finish with a clear answer.\n{question}",
    "{question}\nBefore answering, write down the steps that lead to the result.",
    "Read the question, reason about it in a few steps, and then answer it.\n\nQ: {question}",
    "Answer the question below. Walk through your thinking first.\n{question}",
    "{question}\nGive a short step-by-step explanation followed by the answer.",
    "Problem: {question}\nWork it out and conclude with the answer.",
    "Let us solve this together, showing each step of the reasoning.\n{question}",
)

# Each phrase holds {answer} once, introduced by "answer is" or "answer:" so that
# `parse_final_answer` finds it.
ANSWER_PHRASES: tuple[str, ...] = (
    "So the answer is {answer}.",
    "Therefore, the answer is {answer}.",
    "The answer is {answer}.",
    "Answer: {answer}",
    "Hence the final answer is {answer}.",
    "Final answer: {answer}",
    "That makes the answer {answer}.",
    "Putting it together, the answer is {answer}.",
)


def _pick(n: int, *parts: object) -> int:
    # blake2b, not hash(): Python's str hash is salted per process.
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "big") % n


def template_index(question: str, seed: int) -> int:
    return _pick(len(TEMPLATES), "template", seed, question)


def render_prompt(question: str, seed: int) -> str:
    """The user turn for a CoT question: one template chosen by (seed, question)."""
    return TEMPLATES[template_index(question, seed)].format(question=question)


def answer_phrase_index(key: str, seed: int) -> int:
    return _pick(len(ANSWER_PHRASES), "answer", seed, key)


def answer_phrase(answer: str, key: str, seed: int) -> str:
    """The closing sentence for `answer`, phrasing chosen by (seed, key)."""
    # "So the answer is 72.." reads badly; the phrase adds its own full stop.
    ans = answer.strip().rstrip(".").rstrip() or answer.strip()
    return ANSWER_PHRASES[answer_phrase_index(key, seed)].format(answer=ans)


# Introducers of a final answer; the last match in the text wins (models restate things).
_ANSWER_RE = re.compile(
    r"(?:\banswers?\s+(?:is|was|would\s+be|will\s+be|should\s+be)\s*[:：]?\s*"
    r"|\banswer\s*[:：=]\s*"
    r"|\bmakes\s+the\s+answer\s+"
    r"|答案\s*(?:是|为|為|[:：])\s*)",
    re.IGNORECASE,
)
_OPTION_RE = re.compile(
    r"^\(([A-Za-z])\)(?=$|[\s.,;:])|^([A-Za-z])\)(?=$|\s)|^([A-Z])$|^option\s+\(?([A-Za-z])\)?$",
    re.IGNORECASE,
)
_NUMBER_RE = re.compile(r"^[-+]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$")
_BOXED_RE = re.compile(r"\\boxed\{(.+)\}")
_STRIP_CHARS = " \t*_`$\"'“”‘’"
_TRAILING_PUNCT = re.compile(r"[\s.。,，;；:：!！?？]+$")


def normalize_answer(text: str) -> str:
    """Canonical form for comparing answers: "(C)" -> "C", "1,234.50" -> "1234.5",
    surrounding markup, quotes and trailing punctuation removed."""
    ans = text.strip()
    boxed = _BOXED_RE.search(ans)
    if boxed:
        ans = boxed.group(1)
    prev = None
    while prev != ans:
        prev = ans
        ans = _TRAILING_PUNCT.sub("", ans.strip(_STRIP_CHARS))
    m = _OPTION_RE.match(ans)
    if m:
        return next(g for g in m.groups() if g).upper()
    if _NUMBER_RE.match(ans):
        num = ans.replace(",", "").replace("$", "").lstrip("+")
        if "." in num:
            num = num.rstrip("0").rstrip(".")
        return num or "0"
    return ans


def parse_final_answer(text: str) -> str | None:
    """The final answer stated in a CoT output, normalized; None when none is stated."""
    if not text:
        return None
    last = None
    for m in _ANSWER_RE.finditer(text):
        last = m
    if last is None:
        return None
    rest = text[last.end():].lstrip()
    ans = rest.split("\n", 1)[0]
    # Cut at the end of the sentence: a full stop before a space or the line end,
    # but not the point inside a decimal number ("3.5").
    cut = re.search(r"\.(?=\s|$)|。", ans)
    if cut:
        ans = ans[: cut.start()]
    out = normalize_answer(ans)
    return out or None
