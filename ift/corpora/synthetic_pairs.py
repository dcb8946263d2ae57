"""A project-written preference set with a learnable preference: concise over rambling.

Every prompt is a short task (arithmetic, opposites, plurals, spelling backwards) with one
right answer. The chosen reply is the answer alone ("12."); the rejected reply reaches the
same answer after a few sentences of filler ("Well, that is an interesting question. ...
the answer is 12."). Both replies are correct, so the only thing a model can learn from the
pairs is the style: answer first, no preamble.

    pref_concise_train.jsonl    alpaca_pairs  {instruction, input, chosen, rejected}
    pref_concise_heldout.jsonl  messages_pairs {prompt, chosen: [turns], rejected: [turns]}

The two files share no prompt. Written by `write_sample_data` (ift.corpora.synthetic).
"""

from __future__ import annotations

import json
import random

PAIR_FILES = ("pref_concise_train.jsonl", "pref_concise_heldout.jsonl")
TRAIN_PAIRS = 200
HELDOUT_PAIRS = 40

_OPPOSITES = (("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"),
              ("early", "late"), ("open", "closed"), ("light", "dark"), ("wet", "dry"),
              ("full", "empty"), ("old", "new"), ("high", "low"), ("strong", "weak"))
_PLURALS = (("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"),
            ("city", "cities"), ("leaf", "leaves"), ("tooth", "teeth"), ("bus", "buses"),
            ("foot", "feet"), ("story", "stories"), ("knife", "knives"), ("goose", "geese"))
_WORDS = ("river", "planet", "garden", "window", "pencil", "rocket", "castle", "forest",
          "silver", "marble", "butter", "ladder")
_OPENERS = (
    "Well, that is a really interesting question, and I am glad you asked it.",
    "Great question! There is actually quite a lot that could be said about this.",
    "Let me think about this for a moment, because it deserves some care.",
    "Hmm, people wonder about this kind of thing all the time, so let me explain.",
    "Before I answer, it is worth taking a step back to consider the question.",
)
_FILLERS = (
    "There are many ways to look at it, and each of them has its own merits.",
    "It helps to go slowly and consider every detail along the way.",
    "I want to be thorough here, so I will walk through my thinking first.",
    "Some people get this wrong by rushing, which is why patience matters.",
)
_CLOSINGS = ("So, after all of that, the answer is", "In the end, the answer turns out to be",
             "Putting it all together, I would say the answer is")


def _tasks() -> list[tuple[str, str, str]]:
    """(instruction, input, answer) of every distinct task."""
    out = []
    for a in range(2, 14):
        for b in range(2, 10):
            out.append((f"What is {a} plus {b}?", "", str(a + b)))
            out.append((f"What is {a} times {b}?", "", str(a * b)))
    for w, o in _OPPOSITES:
        out.append(("Give the opposite of this word.", w, o))
        out.append(("Give the opposite of this word.", o, w))
    for s, p in _PLURALS:
        out.append(("What is the plural of this word?", s, p))
    for w in _WORDS:
        out.append(("Spell this word backwards.", w, w[::-1]))
    return out


def _rambling(rng: random.Random, answer: str) -> str:
    fillers = rng.sample(_FILLERS, rng.randint(1, 2))
    return " ".join([rng.choice(_OPENERS), *fillers, f"{rng.choice(_CLOSINGS)} {answer}."])


def pair_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of the concise-vs-rambling set."""
    rng = random.Random(f"{seed}-pref_concise")
    tasks = _tasks()
    rng.shuffle(tasks)
    train, held = tasks[:TRAIN_PAIRS], tasks[TRAIN_PAIRS:TRAIN_PAIRS + HELDOUT_PAIRS]
    train_rows = [{"instruction": q, "input": x, "chosen": f"{a}.",
                   "rejected": _rambling(rng, a)} for q, x, a in train]
    held_rows = []
    for q, x, a in held:
        prompt = f"{q}\n{x}" if x else q
        user = {"role": "user", "content": prompt}
        held_rows.append({
            "prompt": prompt,
            "chosen": [user, {"role": "assistant", "content": f"{a}."}],
            "rejected": [user, {"role": "assistant", "content": _rambling(rng, a)}],
        })
    return train_rows, held_rows


def pair_texts(seed: int = 0) -> dict[str, str]:
    """File name -> content of the bundled preference files."""
    train, held = pair_rows(seed)
    dump = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # noqa: E731
    return {PAIR_FILES[0]: dump(train), PAIR_FILES[1]: dump(held)}
