"""Synthetic instruction data written by this project, reproducible from a seed.

Two things live here:

* Multi-step arithmetic word problems with chain-of-thought rationales
  (`arithmetic_problems`, `arithmetic_split`, `write_arithmetic_corpus`). A rationale is a
  list of equations such as "48 / 2 = 24. 24 + 17 = 41." whose last result is the answer,
  so a checker can verify every step. Held-out problems use numbers that never appear in
  the training problems, which is what a CoT ablation needs to tell computing from recall.
* The bundled sample data in `ift/sample_data/` (`write_sample_data`): small Alpaca,
  ShareGPT, OpenAI-chat, FLAN CoT TSV and placeholder files built from the templates
  below. Every sentence is written here; nothing is copied from a public dataset.

Regenerate the bundled files with `python -m ift.corpora.synthetic ift/sample_data`.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from ift import storage
from ift.artifacts import SAMPLE_DATA_DIR
from ift.corpora.synthetic_pairs import pair_texts

# =======================================================================================
# Arithmetic word problems
# =======================================================================================

OPS = ("+", "-", "*", "/")

# Multipliers are kept small so results stay readable; additive operands and divisors use
# the whole range.
_MAX_FACTOR = 12

# The numbers arithmetic_split partitions into disjoint train and held-out sets.
SPLIT_RANGE = (2, 99)

_F = ("she", "her", "her")
_M = ("he", "him", "his")
_NAMES = (
    ("Maya", _F), ("Tomas", _M), ("Aiko", _F), ("Ravi", _M), ("Lena", _F), ("Omar", _M),
    ("Sofia", _F), ("Jonas", _M), ("Priya", _F), ("Mateo", _M), ("Zara", _F), ("Kwame", _M),
    ("Ingrid", _F), ("Diego", _M), ("Mei", _F), ("Felix", _M), ("Amara", _F), ("Hugo", _M),
    ("Nadia", _F), ("Arjun", _M), ("Elif", _F), ("Bruno", _M), ("Hana", _F), ("Luca", _M),
)


@dataclass(frozen=True)
class _Story:
    """One problem template.

    `running` stories change one quantity step by step; `chain` stories define each new
    thing (a person's age, a day's distance, an item's price) from the previous one and
    ask about the last. Template fields: {name} {P} {p} {obj} {poss} {Poss} {self} for the
    protagonist, {a} the start value, {b} the step operand, {prev}/{next}/{Next}/{prev_s}/
    {Next_s} the chain entities and their possessives, {last}/{last_s} the final entity.
    """

    kind: str
    cap: int
    start: tuple[str, ...]
    steps: dict[str, tuple[str, ...]]
    question: tuple[str, ...]
    entities: tuple[str, ...] = ()
    ordered: bool = False
    """Chain entities are used in order (days) instead of sampled (relatives)."""
    person_first: bool = False
    """The protagonist is the first entity of the chain (ages)."""
    final: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Forced last operation, e.g. sharing equally: {"/": phrasings}."""


_STORIES: dict[str, _Story] = {
    "savings": _Story(
        kind="running",
        cap=5000,
        start=("{name} has {a} dollars in a savings jar.",
               "{name} starts the month with {a} dollars."),
        steps={
            "+": ("{P} earns {b} dollars by washing cars.",
                  "{P} receives {b} dollars as a birthday gift.",
                  "{P} sells an old bicycle for {b} dollars."),
            "-": ("{P} spends {b} dollars on a pair of shoes.",
                  "{P} buys a board game for {b} dollars.",
                  "{P} pays {b} dollars for groceries."),
            "*": ("After a lucky year, {poss} savings become {b} times as large.",
                  "An investment makes {poss} money grow to {b} times the amount."),
            "/": ("{P} splits {poss} money equally into {b} envelopes and keeps only one "
                  "envelope.",
                  "{P} shares the money equally among {b} people, {self} included, and "
                  "keeps {poss} share."),
        },
        question=("How many dollars does {name} have now?",
                  "How much money, in dollars, does {name} have at the end?"),
    ),
    "stickers": _Story(
        kind="running",
        cap=2000,
        start=("{name} has a collection of {a} stickers.",
               "{name} owns {a} stickers."),
        steps={
            "+": ("{P} buys {b} more stickers.",
                  "A friend gives {obj} {b} stickers.",
                  "{P} wins {b} stickers in a school quiz."),
            "-": ("{P} gives {b} stickers to {poss} cousin.",
                  "{P} loses {b} stickers on the bus."),
            "*": ("Over the summer the collection grows to {b} times its size.",
                  "After some trading {p} has {b} times as many stickers as before."),
            "/": ("{P} sorts the stickers equally into {b} albums and keeps only one album.",),
        },
        question=("How many stickers does {name} have now?",
                  "How many stickers are in {poss} collection at the end?"),
    ),
    "water": _Story(
        kind="running",
        cap=5000,
        start=("A water tank holds {a} liters of water.",
               "A rain barrel contains {a} liters of water."),
        steps={
            "+": ("A hose adds {b} liters.", "A storm adds {b} liters of rain."),
            "-": ("{b} liters are used to water the garden.", "A leak drains {b} liters."),
            "*": ("A pump refills it until it holds {b} times as much water.",),
            "/": ("The water is poured equally into {b} buckets and only one bucket is kept.",),
        },
        question=("How many liters of water are there now?",
                  "How many liters of water remain at the end?"),
    ),
    "library": _Story(
        kind="running",
        cap=2000,
        start=("A school library has {a} books on one shelf.",),
        steps={
            "+": ("The librarian adds {b} new books.", "Students return {b} books."),
            "-": ("Children borrow {b} books.", "{b} damaged books are removed."),
            "*": ("After a donation drive the shelf holds {b} times as many books.",),
            "/": ("The books are spread equally over {b} shelves, and one of those shelves "
                  "is the one we count.",),
        },
        question=("How many books are on the shelf now?",),
    ),
    "game": _Story(
        kind="running",
        cap=5000,
        start=("{name} scores {a} points in the first round of a game.",),
        steps={
            "+": ("{P} wins {b} bonus points.", "{P} collects {b} more points."),
            "-": ("{P} loses {b} points for a penalty.", "{P} pays {b} points for a hint."),
            "*": ("A power-up multiplies {poss} score by {b}.",),
            "/": ("A trap divides {poss} score by {b}.",),
        },
        question=("What is {name}'s score at the end?", "How many points does {name} have now?"),
    ),
    "apples": _Story(
        kind="running",
        cap=3000,
        start=("{name} picks {a} apples in the orchard.",),
        steps={
            "+": ("{P} picks {b} more apples in the afternoon.",
                  "{Poss} neighbour gives {obj} {b} apples."),
            "-": ("{P} throws away {b} bruised apples.", "{P} uses {b} apples to bake pies."),
            "*": ("A second tree is so full that {poss} pile grows to {b} times its size.",),
        },
        final={"/": ("{P} packs all the apples equally into {b} baskets.",)},
        question=("How many apples go into each basket?",),
    ),
    "pencils": _Story(
        kind="running",
        cap=3000,
        start=("{name}, a teacher, has {a} pencils.",),
        steps={
            "+": ("{P} buys a box of {b} pencils.", "The school gives {obj} {b} more pencils."),
            "-": ("{b} pencils break and are thrown away.", "{P} lends {b} pencils to a colleague."),
            "*": ("A supplier sends enough to make the pile {b} times as large.",),
        },
        final={"/": ("{P} shares the pencils equally among {b} students.",)},
        question=("How many pencils does each student get?",),
    ),
    "ages": _Story(
        kind="chain",
        cap=100,
        start=("{name} is {a} years old.",),
        steps={
            "+": ("{Next} is {b} years older than {prev}.",
                  "{Next} was born {b} years before {prev}."),
            "-": ("{Next} is {b} years younger than {prev}.",
                  "{Next} was born {b} years after {prev}."),
            "*": ("{Next} is {b} times as old as {prev}.",
                  "{Next_s} age is {b} times {prev_s} age."),
            "/": ("{Next_s} age is {prev_s} age divided by {b}.",),
        },
        question=("How old is {last}?", "How many years old is {last}?"),
        entities=("{poss} cousin", "{poss} best friend", "{poss} neighbour", "{poss} pen pal",
                  "{poss} teammate", "{poss} classmate", "{poss} chess partner",
                  "{poss} dance partner"),
        person_first=True,
    ),
    "distance": _Story(
        kind="chain",
        cap=400,
        start=("{name} cycles {a} kilometers on the first day of a tour.",
               "{name} walks {a} kilometers on the first day of a long hike."),
        steps={
            "+": ("On the {next} {p} covers {b} kilometers more than on the {prev}.",
                  "On the {next} {p} goes {b} kilometers farther than on the {prev}."),
            "-": ("On the {next} {p} covers {b} kilometers less than on the {prev}.",
                  "On the {next} {p} is tired and covers {b} kilometers fewer than on the "
                  "{prev}."),
            "*": ("On the {next} {p} covers {b} times the distance of the {prev}.",
                  "The distance on the {next} is {b} times the distance on the {prev}."),
            "/": ("On the {next} {p} covers the distance of the {prev} divided by {b}.",),
        },
        question=("How many kilometers does {name} cover on the {last}?",),
        entities=("first day", "second day", "third day", "fourth day", "fifth day"),
        ordered=True,
    ),
    "prices": _Story(
        kind="chain",
        cap=5000,
        start=("In a shop, a {first} costs {a} dollars.",),
        steps={
            "+": ("A {next} costs {b} dollars more than the {prev}.",
                  "A {next} is {b} dollars pricier than the {prev}."),
            "-": ("A {next} costs {b} dollars less than the {prev}.",
                  "A {next} is {b} dollars cheaper than the {prev}."),
            "*": ("A {next} costs {b} times as much as the {prev}.",
                  "The price of a {next} is {b} times the price of the {prev}."),
            "/": ("A {next} costs the price of the {prev} divided by {b}.",
                  "{b} {next}s together cost as much as one {prev}."),
        },
        question=("How many dollars does the {last} cost?",),
        entities=("notebook", "backpack", "desk lamp", "bicycle", "tent", "guitar", "camera",
                  "jacket", "kettle", "telescope"),
    ),
}


def _apply(op: str, x: int, b: int) -> int:
    if op == "+":
        return x + b
    if op == "-":
        return x - b
    if op == "*":
        return x * b
    if x % b:
        raise ValueError(f"{x} / {b} is not an exact integer division")
    return x // b


def _candidates(op: str, value: int, numbers: list[int], cap: int) -> list[int]:
    """Operands that keep the result a positive integer no larger than cap."""
    if op == "+":
        return [b for b in numbers if value + b <= cap]
    if op == "-":
        return [b for b in numbers if b < value]
    if op == "*":
        return [b for b in numbers if b <= _MAX_FACTOR and value * b <= cap]
    return [b for b in numbers if 2 <= b < value and value % b == 0]


def _capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


def _possessive(s: str) -> str:
    return s + "'s"


def _one_problem(rng: random.Random, numbers: list[int], steps: tuple[int, int]) -> dict | None:
    story = _STORIES[rng.choice(sorted(_STORIES))]
    name, (p, obj, poss) = rng.choice(_NAMES)
    k = rng.randint(*steps)
    pool = [b for b in numbers if b <= story.cap]
    if not pool:
        return None
    value = rng.choice(pool)
    person = {"name": name, "P": _capitalize(p), "p": p, "obj": obj, "poss": poss,
              "Poss": _capitalize(poss), "self": obj + "self"}
    chain: list[str] = []
    if story.kind == "chain":
        # The protagonist heads the chain (ages) or the first entity does (days, items).
        m = k if story.person_first else k + 1
        if m > len(story.entities):
            return None
        picked = list(story.entities[:m]) if story.ordered else rng.sample(story.entities, m)
        chain = ([name] if story.person_first else []) + [e.format(**person) for e in picked]
    start = rng.choice(story.start).format(a=value, first=chain[0] if chain else "", **person)
    sentences = [start]
    equations = []
    unused = {op: rng.sample(ph, len(ph)) for op, ph in {**story.steps, **story.final}.items()}
    last_op_b: tuple[str, int] | None = None
    for i in range(k):
        forced = i == k - 1 and story.final
        ops = sorted(story.final) if forced else rng.sample(sorted(story.steps), len(story.steps))
        chosen = None
        for op in ops:
            if not unused[op]:
                continue  # every phrasing of this operation is used; repeating reads badly
            cands = _candidates(op, value, pool, story.cap)
            # Do not undo the previous step (+b then -b, *b then /b).
            if last_op_b is not None:
                inverse = {"+": "-", "-": "+", "*": "/", "/": "*"}[last_op_b[0]]
                if op == inverse:
                    cands = [b for b in cands if b != last_op_b[1]]
            if cands:
                chosen = (op, rng.choice(cands))
                break
        if chosen is None:
            return None
        op, b = chosen
        text = unused[op].pop()
        fields = dict(person, b=b)
        if story.kind == "chain":
            prev, nxt = chain[i], chain[i + 1]
            fields.update(prev=prev, next=nxt, Next=_capitalize(nxt), prev_s=_possessive(prev),
                          Next_s=_capitalize(_possessive(nxt)))
        sentences.append(_capitalize(text.format(**fields)))
        result = _apply(op, value, b)
        equations.append(f"{value} {op} {b} = {result}.")
        value = result
        last_op_b = (op, b)
    last = chain[-1] if chain else ""
    question = rng.choice(story.question).format(last=last, last_s=_possessive(last), **person)
    sentences.append(question)
    return {"question": " ".join(sentences), "answer": str(value),
            "rationale": " ".join(equations)}


def arithmetic_problems(
    n: int,
    seed: int,
    number_range: tuple[int, int],
    steps: tuple[int, int] = (2, 4),
    *,
    numbers: Iterable[int] | None = None,
) -> list[dict]:
    """`n` distinct word problems {question, answer, rationale}, deterministic by seed.

    Every number stated in a question is drawn from `number_range` (inclusive), further
    restricted to `numbers` when given. Each problem applies between steps[0] and steps[1]
    operations (+, -, *, / with exact division, multipliers at most 12); intermediate
    results stay positive integers. The rationale lists one equation per operation and its
    last result is the answer (an integer string).
    """
    lo, hi = number_range
    if not (isinstance(lo, int) and isinstance(hi, int)) or lo < 1 or hi < lo:
        raise ValueError(f"number_range={number_range!r}: need integers 1 <= lo <= hi")
    if steps[0] < 1 or steps[1] < steps[0]:
        raise ValueError(f"steps={steps!r}: need 1 <= min <= max")
    if n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    allowed = set(range(lo, hi + 1))
    if numbers is not None:
        allowed &= set(numbers)
    pool = sorted(allowed)
    if len(pool) < 2:
        raise ValueError(f"number_range={number_range!r} with numbers leaves {pool}: too few")
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(
                f"could only make {len(out)} of {n} distinct problems from numbers {pool[:10]}..."
            )
        prob = _one_problem(rng, pool, steps)
        if prob is None or prob["question"] in seen:
            continue
        seen.add(prob["question"])
        out.append(prob)
    return out


def question_numbers(question: str) -> list[int]:
    """The integers stated in a question, in order."""
    return [int(x) for x in re.findall(r"\d+", question)]


def split_numbers(seed: int, number_range: tuple[int, int] = SPLIT_RANGE) -> tuple[set, set]:
    """Partition the range into two disjoint halves (train, held-out), deterministic by seed.

    Small factors (<= 12) and larger numbers are split separately so both sides can
    multiply and divide.
    """
    rng = random.Random(f"split-{seed}")
    lo, hi = number_range
    train: set[int] = set()
    test: set[int] = set()
    for group in ([x for x in range(lo, hi + 1) if x <= _MAX_FACTOR],
                  [x for x in range(lo, hi + 1) if x > _MAX_FACTOR]):
        group = rng.sample(group, len(group))
        half = (len(group) + 1) // 2
        train.update(group[:half])
        test.update(group[half:])
    return train, test


def arithmetic_split(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out problems whose stated numbers come from disjoint sets.

    The numbers 2..99 are split in two by `split_numbers(seed)`; train questions use only
    one half, held-out questions only the other.
    """
    train_nums, test_nums = split_numbers(seed)
    train = arithmetic_problems(n_train, seed, SPLIT_RANGE, numbers=train_nums)
    test = arithmetic_problems(n_test, seed + 1, SPLIT_RANGE, numbers=test_nums)
    seen_train = {x for p in train for x in question_numbers(p["question"])}
    seen_test = {x for p in test for x in question_numbers(p["question"])}
    if seen_train & seen_test:
        raise AssertionError(f"train and held-out share numbers {sorted(seen_train & seen_test)}")
    return train, test


def tsv_line(question: str, answer: str, rationale: str) -> str:
    """One FLAN CoT TSV line (question, answer, rationale); fields must be single-line."""
    for name, value in (("question", question), ("answer", answer), ("rationale", rationale)):
        if "\t" in value or "\n" in value:
            raise ValueError(f"{name} contains a tab or newline: {value!r}")
    return f"{question}\t{answer}\t{rationale}\n"


def write_tsv_splits(out_dir: str, splits: dict[str, list[dict]],
                     with_rationale: bool = True) -> dict[str, str]:
    """Write <split>.tsv (FLAN CoT TSV, no header) per split of {question, answer,
    rationale} rows under out_dir (local or s3://); with_rationale=False leaves the
    rationale column empty. Returns split -> path."""
    storage.makedirs(out_dir)
    paths = {}
    for split, rows in splits.items():
        text = "".join(
            tsv_line(r["question"], r["answer"], r["rationale"] if with_rationale else "")
            for r in rows
        )
        path = storage.join(out_dir, f"{split}.tsv")
        storage.write_text(path, text)
        paths[split] = path
    return paths


def write_arithmetic_corpus(
    out_dir: str, n_train: int, n_test: int, seed: int, with_rationale: bool = True
) -> dict:
    """Write train.tsv and test.tsv (FLAN CoT TSV, no header) under out_dir (local or s3://).

    With with_rationale=False the same questions and answers are written with an empty
    rationale column: the answers-only arm of a CoT ablation, whose reply should be the
    answer phrase alone: the flan_cot_tsv converter keeps the prompt and makes the reply the
    answer phrase without a rationale. Returns
    {train, test, n_train, n_test, with_rationale, train_numbers, test_numbers}.
    """
    train, test = arithmetic_split(n_train, n_test, seed)
    paths = write_tsv_splits(out_dir, {"train": train, "test": test}, with_rationale)
    train_nums, test_nums = split_numbers(seed)
    return {
        "train": paths["train"],
        "test": paths["test"],
        "n_train": len(train),
        "n_test": len(test),
        "with_rationale": with_rationale,
        "train_numbers": sorted(train_nums),
        "test_numbers": sorted(test_nums),
    }


# =======================================================================================
# Bundled sample data
# =======================================================================================

SAMPLE_FILES = (
    "alpaca_en.json",
    "alpaca_zh.jsonl",
    "cot_arith.tsv",
    "multiturn_sharegpt.json",
    "chat_openai.jsonl",
    "identity_en.json",
)

# (from plural, from singular, to plural, factor)
_UNITS_EN = (
    ("kilometers", "kilometer", "meters", 1000),
    ("meters", "meter", "centimeters", 100),
    ("kilograms", "kilogram", "grams", 1000),
    ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60),
    ("liters", "liter", "milliliters", 1000),
    ("days", "day", "hours", 24),
    ("weeks", "week", "days", 7),
    ("feet", "foot", "inches", 12),
    ("yards", "yard", "feet", 3),
)
_UNITS_ZH = (
    ("千米", "米", 1000),
    ("米", "厘米", 100),
    ("千克", "克", 1000),
    ("小时", "分钟", 60),
    ("分钟", "秒", 60),
    ("升", "毫升", 1000),
    ("天", "小时", 24),
    ("周", "天", 7),
)

_WORDS_EN = (
    "lantern", "river", "pencil", "meadow", "harbor", "thunder", "violet", "compass", "orbit",
    "quartz", "maple", "saddle", "blanket", "canyon", "falcon", "ginger", "window", "pebble",
    "anchor", "biscuit",
)
_WORDS_ZH = (
    "春暖花开", "你好世界", "数据管道", "山高水长", "明天见", "绿色的树叶", "火车站", "天气预报",
    "hello", "ray data",
)

# (country, capital, country in Chinese, capital in Chinese)
_CAPITALS = (
    ("France", "Paris", "法国", "巴黎"),
    ("Japan", "Tokyo", "日本", "东京"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
    ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Brazil", "Brasília", "巴西", "巴西利亚"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Egypt", "Cairo", "埃及", "开罗"),
    ("India", "New Delhi", "印度", "新德里"),
    ("Norway", "Oslo", "挪威", "奥斯陆"),
    ("Peru", "Lima", "秘鲁", "利马"),
    ("Vietnam", "Hanoi", "越南", "河内"),
    ("Chile", "Santiago", "智利", "圣地亚哥"),
    ("Ghana", "Accra", "加纳", "阿克拉"),
    ("Poland", "Warsaw", "波兰", "华沙"),
    ("Thailand", "Bangkok", "泰国", "曼谷"),
    ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯"),
    ("Spain", "Madrid", "西班牙", "马德里"),
    ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"),
    ("China", "Beijing", "中国", "北京"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本"),
    ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
)

# (term, definition, example)
_DEFINITIONS_EN = (
    ("prime number",
     "A prime number is a whole number greater than 1 that can be divided evenly only by 1 "
     "and by itself.",
     "7 is prime because no whole number other than 1 and 7 divides it evenly, while 9 is "
     "not prime because 3 × 3 = 9."),
    ("even number",
     "An even number is a whole number that divides by 2 with no remainder.",
     "14 is even because 14 / 2 = 7 exactly; 15 is not, because 15 / 2 leaves 1 over."),
    ("perimeter",
     "The perimeter of a shape is the total length of its boundary.",
     "A rectangle 4 meters long and 3 meters wide has a perimeter of 4 + 3 + 4 + 3 = 14 "
     "meters."),
    ("average",
     "The average (arithmetic mean) of a list of numbers is their sum divided by how many "
     "numbers there are.",
     "The average of 2, 4 and 9 is (2 + 4 + 9) / 3 = 5."),
    ("fraction",
     "A fraction names a part of a whole as one number over another: the bottom number says "
     "into how many equal parts the whole is cut, and the top number how many parts are taken.",
     "If a pizza is cut into 8 equal slices and you eat 3, you have eaten 3/8 of it."),
    ("palindrome",
     "A palindrome is a word, phrase or number that reads the same forwards and backwards.",
     "The word \"level\" and the number 12321 are palindromes."),
    ("noun",
     "A noun is a word that names a person, place, thing or idea.",
     "In \"The dog sleeps on the sofa\", the words \"dog\" and \"sofa\" are nouns."),
    ("verb",
     "A verb is a word that describes an action, an event or a state.",
     "In \"She writes letters every week\", the verb is \"writes\"."),
    ("synonym",
     "A synonym is a word that means the same, or nearly the same, as another word.",
     "\"Quick\" is a synonym of \"fast\"."),
    ("evaporation",
     "Evaporation is the change of a liquid into a gas at its surface, usually speeded up "
     "by warmth.",
     "A puddle disappears on a sunny afternoon because its water evaporates."),
    ("habitat",
     "A habitat is the natural home of a plant or animal, where it finds the food, water "
     "and shelter it needs.",
     "A coral reef is the habitat of many kinds of fish."),
    ("ratio",
     "A ratio compares two quantities by showing how many times one contains the other.",
     "A class with 12 girls and 8 boys has a girls-to-boys ratio of 12:8, which simplifies "
     "to 3:2."),
    ("percentage",
     "A percentage is a number expressed as a part of 100.",
     "25 out of 100 is 25%, and 25% of 80 is 80 × 25 / 100 = 20."),
    ("square number",
     "A square number is a whole number multiplied by itself.",
     "16 is a square number because 4 × 4 = 16."),
)
_DEFINITIONS_ZH = (
    ("质数", "质数是大于 1 的整数，除了 1 和它本身以外，不能被其他整数整除。",
     "7 是质数；9 不是质数，因为 3 × 3 = 9。"),
    ("偶数", "能被 2 整除、没有余数的整数叫做偶数。", "14 是偶数，因为 14 ÷ 2 = 7。"),
    ("周长", "周长是围成一个图形的所有边线的总长度。",
     "长 4 米、宽 3 米的长方形，周长是 4 + 3 + 4 + 3 = 14 米。"),
    ("平均数", "平均数是一组数的总和除以这组数的个数。", "2、4、9 的平均数是 (2 + 4 + 9) ÷ 3 = 5。"),
    ("分数", "分数表示把一个整体平均分成若干份后取其中的几份，例如 3/4。",
     "一个蛋糕平均切成 8 块，吃掉 3 块，就是吃了 3/8。"),
    ("回文", "正着读和倒着读完全一样的词语、句子或数字叫做回文。", "“人人为我，我为人人”和 12321 都是回文。"),
    ("名词", "名词是表示人、地点、事物或概念名称的词。", "在“小猫在沙发上睡觉”中，“小猫”和“沙发”是名词。"),
    ("蒸发", "蒸发是液体在表面变成气体的过程，温度越高通常越快。", "晴天地上的水坑会慢慢消失，就是因为水蒸发了。"),
)

_SENTENCES_EN = (
    "the river runs past the old mill",
    "small steps add up to long journeys",
    "please close the window before it rains",
    "the library opens at nine on weekdays",
    "a good map saves a lot of time",
    "fresh bread smells best in the morning",
)

_FRUITS_EN = ("pear", "apple", "fig", "mango", "cherry", "plum", "kiwi", "banana", "lemon",
              "grape", "melon", "peach")


def _alpaca(instruction: str, output: str, input: str = "") -> dict:
    return {"instruction": instruction, "input": input, "output": output}


def _num_list(rng: random.Random, k: int) -> list[int]:
    return rng.sample(range(1, 100), k)


def _join(nums: Iterable) -> str:
    return ", ".join(str(x) for x in nums)


def _explain(rng: random.Random, lang: str) -> tuple[str, str]:
    """(expression, step-by-step explanation in `lang`, en or zh) for a random two-number
    calculation. Both languages explain the same steps; only the wording differs."""
    op = rng.choice("+-×÷")
    if op == "+":
        a, b = rng.randint(12, 89), rng.randint(12, 89)
        ta, oa, tb, ob = a // 10 * 10, a % 10, b // 10 * 10, b % 10
        en = (f"{a} + {b} = {a + b}. Add the tens: {ta} + {tb} = {ta + tb}. Add the ones: "
              f"{oa} + {ob} = {oa + ob}. Then {ta + tb} + {oa + ob} = {a + b}.")
        zh = (f"{a} + {b} = {a + b}。先算整十：{ta} + {tb} = {ta + tb}；再算个位：{oa} + {ob} = "
              f"{oa + ob}；最后 {ta + tb} + {oa + ob} = {a + b}。")
    elif op == "-":
        b = rng.randint(11, 59)
        a = rng.randint(b + 5, 99)
        tb, ob = b // 10 * 10, b % 10
        en = f"{a} - {b} = {a - b}. Subtract the tens first: {a} - {tb} = {a - tb}."
        zh = f"{a} - {b} = {a - b}。先减整十：{a} - {tb} = {a - tb}"
        if ob:
            en += f" Then subtract the ones: {a - tb} - {ob} = {a - b}."
            zh += f"；再减个位：{a - tb} - {ob} = {a - b}"
        zh += "。"
    elif op == "×":
        a, b = rng.randint(11, 49), rng.randint(2, 9)
        ta, oa = a // 10 * 10, a % 10
        if not oa:
            en = f"{a} × {b} = {a * b}, because {a // 10} × {b} = {a // 10 * b} tens."
            zh = f"{a} × {b} = {a * b}，因为 {a // 10} × {b} = {a // 10 * b} 个十。"
        else:
            en = (f"{a} × {b} = {a * b}. Split {a} into {ta} + {oa}: {ta} × {b} = {ta * b} and "
                  f"{oa} × {b} = {oa * b}, and {ta * b} + {oa * b} = {a * b}.")
            zh = (f"{a} × {b} = {a * b}。把 {a} 拆成 {ta} + {oa}：{ta} × {b} = {ta * b}，"
                  f"{oa} × {b} = {oa * b}，{ta * b} + {oa * b} = {a * b}。")
    else:
        q, b = rng.randint(3, 30), rng.randint(2, 9)
        a = q * b
        en = f"{a} ÷ {b} = {q}, because {q} × {b} = {a}."
        zh = f"{a} ÷ {b} = {q}，因为 {q} × {b} = {a}。"
    return f"{a} {op} {b}", {"en": en, "zh": zh}[lang]


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _vowels(word: str) -> list[str]:
    return [c for c in word if c in "aeiou"]


def _alpaca_en(rng: random.Random) -> list[dict]:
    rows: list[dict] = []
    # Unit conversion (18).
    for i in range(18):
        src, sing, dst, f = _UNITS_EN[i % len(_UNITS_EN)]
        x = rng.randint(2, 40)
        out = f"{x} {src} is {x * f} {dst}. There are {f} {dst} in one {sing}, so {x} × {f} = {x * f}."
        if rng.random() < 0.5:
            rows.append(_alpaca(f"Convert {x} {src} to {dst}.", out))
        else:
            rows.append(_alpaca(f"Convert the following quantity from {src} to {dst}.", out,
                                f"{x} {src}"))
    # String reversal (14).
    for w in rng.sample(_WORDS_EN, 14):
        if rng.random() < 0.5:
            rows.append(_alpaca("Reverse the following string.", w[::-1], w))
        else:
            rows.append(_alpaca(f'Write the word "{w}" backwards.',
                                f'"{w}" written backwards is "{w[::-1]}".'))
    # Sorting (18).
    for i in range(18):
        kind = i % 3
        if kind == 2:
            words = rng.sample(_FRUITS_EN, rng.randint(4, 6))
            rows.append(_alpaca("Sort these words alphabetically.", _join(sorted(words)),
                                _join(words)))
            continue
        nums = _num_list(rng, rng.randint(4, 7))
        desc = kind == 1
        order = "descending" if desc else "ascending"
        out = _join(sorted(nums, reverse=desc))
        if rng.random() < 0.5:
            rows.append(_alpaca(f"Sort the following numbers in {order} order.", out, _join(nums)))
        else:
            words = "largest to smallest" if desc else "smallest to largest"
            rows.append(_alpaca(f"Put these numbers in order from {words}: {_join(nums)}.", out))
    # Capitals (20).
    for country, capital, _, _ in rng.sample(_CAPITALS, 20):
        r = rng.random()
        if r < 0.4:
            rows.append(_alpaca(f"What is the capital of {country}?",
                                f"The capital of {country} is {capital}."))
        elif r < 0.7:
            rows.append(_alpaca("Name the capital city of the country below.", capital, country))
        else:
            rows.append(_alpaca(f"Which country has {capital} as its capital?",
                                f"{capital} is the capital of {country}."))
    # Definitions (12).
    for term, definition, example in rng.sample(_DEFINITIONS_EN, 12):
        art = "an" if term[0] in "aeiou" else "a"
        out = f"{definition} For example, {_lower_first(example)}"
        if rng.random() < 0.5:
            rows.append(_alpaca(f"What is {art} {term}?", out))
        else:
            rows.append(_alpaca("Define the following term in one or two sentences.", out, term))
    # Arithmetic explained (22).
    for _ in range(22):
        expr, out = _explain(rng, "en")
        if rng.random() < 0.5:
            rows.append(_alpaca(f"What is {expr}?", out))
        else:
            rows.append(_alpaca("Calculate the result and explain the steps.", out, expr))
    # Small text and number tasks (16).
    for w in rng.sample(_WORDS_EN, 4):
        v = _vowels(w)
        rows.append(_alpaca(f'How many vowels are in the word "{w}"?',
                            f'The word "{w}" has {len(v)} vowels: {", ".join(v)}.'))
    for s in rng.sample(_SENTENCES_EN, 3):
        rows.append(_alpaca("Rewrite the following text in uppercase.", s.upper(), s))
    for n in rng.sample(range(10, 500), 3):
        parity = "even" if n % 2 == 0 else "odd"
        rows.append(_alpaca(f"Is {n} even or odd?",
                            f"{n} is {parity}, because it leaves a remainder of {n % 2} when "
                            "divided by 2."))
    for _ in range(3):
        nums = _num_list(rng, rng.randint(5, 8))
        rows.append(_alpaca("Find the largest number in the list.",
                            f"The largest number is {max(nums)}.", _join(nums)))
    for s in rng.sample(_SENTENCES_EN, 3):
        rows.append(_alpaca("Count the words in the sentence.",
                            f"The sentence has {len(s.split())} words.", s))
    rng.shuffle(rows)
    return rows


def _alpaca_zh(rng: random.Random) -> list[dict]:
    rows: list[dict] = []
    # 数学 (16)
    for _ in range(16):
        expr, out = _explain(rng, "zh")
        if rng.random() < 0.5:
            rows.append(_alpaca(f"计算 {expr}。", out))
        else:
            rows.append(_alpaca("计算下面的算式，并写出计算过程。", out, expr))
    # 单位换算 (14)
    for i in range(14):
        src, dst, f = _UNITS_ZH[i % len(_UNITS_ZH)]
        x = rng.randint(2, 40)
        out = f"{x} {src}等于 {x * f} {dst}。因为 1 {src}等于 {f} {dst}，{x} × {f} = {x * f}。"
        if rng.random() < 0.5:
            rows.append(_alpaca(f"把 {x} {src}换算成{dst}。", out))
        else:
            rows.append(_alpaca(f"请把下面的数量从{src}换算成{dst}。", out, f"{x} {src}"))
    # 反转字符串 (10)
    for w in _WORDS_ZH:
        if rng.random() < 0.5:
            rows.append(_alpaca("把下面的字符串反转过来。", w[::-1], w))
        else:
            rows.append(_alpaca(f"把“{w}”倒过来写。", f"“{w}”倒过来写是“{w[::-1]}”。"))
    # 排序 (12)
    for i in range(12):
        nums = _num_list(rng, rng.randint(4, 7))
        desc = i % 2 == 1
        order = "从大到小" if desc else "从小到大"
        out = _join(sorted(nums, reverse=desc))
        if rng.random() < 0.5:
            rows.append(_alpaca(f"将下列数字按{order}的顺序排列。", out, _join(nums)))
        else:
            rows.append(_alpaca(f"请把这些数字{order}排序：{_join(nums)}。", out))
    # 首都 (14)
    for _, _, country, capital in rng.sample(_CAPITALS, 14):
        if rng.random() < 0.6:
            rows.append(_alpaca(f"{country}的首都是哪里？", f"{country}的首都是{capital}。"))
        else:
            rows.append(_alpaca("说出下面这个国家的首都。", capital, country))
    # 定义 (8)
    for term, definition, example in _DEFINITIONS_ZH:
        rows.append(_alpaca(f"什么是{term}？", f"{definition}例如，{example}"))
    # 奇偶与最大值 (6)
    for n in rng.sample(range(10, 500), 3):
        parity = "偶数" if n % 2 == 0 else "奇数"
        rows.append(_alpaca(f"{n} 是奇数还是偶数？", f"{n} 是{parity}，因为它除以 2 的余数是 {n % 2}。"))
    for _ in range(3):
        nums = _num_list(rng, rng.randint(5, 8))
        rows.append(_alpaca("找出下面这组数中最大的数。", f"最大的数是 {max(nums)}。", _join(nums)))
    rng.shuffle(rows)
    return rows


def _dialogs_en(rng: random.Random) -> list[list[tuple[str, str]]]:
    """Multi-turn dialogs as (role, text) lists with roles user/assistant."""
    dialogs: list[list[tuple[str, str]]] = []
    for src, sing, dst, f in rng.sample(_UNITS_EN, 5):
        x, y = rng.sample(range(2, 40), 2)
        dialogs.append([
            ("user", f"How many {dst} are in {x} {src}?"),
            ("assistant", f"{x} {src} is {x * f} {dst}, since one {sing} has {f} {dst}."),
            ("user", f"And {y} {src}?"),
            ("assistant", f"{y} {src} is {y} × {f} = {y * f} {dst}."),
        ])
    for _ in range(5):
        a, b, c = rng.randint(12, 60), rng.randint(12, 60), rng.randint(2, 9)
        d = rng.randint(1, (a + b) * c - 1)
        turns = [
            ("user", f"What is {a} + {b}?"),
            ("assistant", f"{a} + {b} = {a + b}."),
            ("user", f"Now multiply that by {c}."),
            ("assistant", f"{a + b} × {c} = {(a + b) * c}."),
        ]
        if rng.random() < 0.5:
            turns += [("user", f"And subtract {d} from the result?"),
                      ("assistant", f"{(a + b) * c} - {d} = {(a + b) * c - d}.")]
        dialogs.append(turns)
    for _ in range(5):
        nums = _num_list(rng, rng.randint(4, 6))
        dialogs.append([
            ("user", f"Sort these numbers from smallest to largest: {_join(nums)}."),
            ("assistant", _join(sorted(nums))),
            ("user", "Now sort them from largest to smallest."),
            ("assistant", _join(sorted(nums, reverse=True))),
        ])
    for _ in range(5):
        (c1, k1, _, _), (c2, k2, _, _) = rng.sample(_CAPITALS, 2)
        dialogs.append([
            ("user", f"What is the capital of {c1}?"),
            ("assistant", f"The capital of {c1} is {k1}."),
            ("user", f"And the capital of {c2}?"),
            ("assistant", f"The capital of {c2} is {k2}."),
        ])
    for w in rng.sample(_WORDS_EN, 4):
        dialogs.append([
            ("user", f'Reverse the word "{w}".'),
            ("assistant", f'"{w}" reversed is "{w[::-1]}".'),
            ("user", "How many letters does it have?"),
            ("assistant", f"It has {len(w)} letters, the same as the original word."),
        ])
    for term, definition, example in rng.sample(_DEFINITIONS_EN, 5):
        art = "an" if term[0] in "aeiou" else "a"
        dialogs.append([
            ("user", f"What is {art} {term}?"),
            ("assistant", definition),
            ("user", "Can you give me an example?"),
            ("assistant", f"Sure. {example}"),
        ])
    for p in arithmetic_problems(3, rng.randint(0, 10**6), (2, 60)):
        dialogs.append([
            ("user", p["question"]),
            ("assistant", f"Let's work it out step by step. {p['rationale']} The answer is "
                          f"{p['answer']}."),
            ("user", "Thanks! What was the final number again?"),
            ("assistant", p["answer"]),
        ])
    return dialogs


def _dialogs_zh(rng: random.Random) -> list[list[tuple[str, str]]]:
    dialogs: list[list[tuple[str, str]]] = []
    for src, dst, f in rng.sample(_UNITS_ZH, 2):
        x, y = rng.sample(range(2, 40), 2)
        dialogs.append([
            ("user", f"{x} {src}是多少{dst}？"),
            ("assistant", f"{x} {src}等于 {x * f} {dst}。"),
            ("user", f"那 {y} {src}呢？"),
            ("assistant", f"{y} {src}等于 {y} × {f} = {y * f} {dst}。"),
        ])
    for _ in range(2):
        a, b, c = rng.randint(12, 60), rng.randint(12, 60), rng.randint(2, 9)
        dialogs.append([
            ("user", f"{a} 加 {b} 等于多少？"),
            ("assistant", f"{a} + {b} = {a + b}。"),
            ("user", f"再乘以 {c} 呢？"),
            ("assistant", f"{a + b} × {c} = {(a + b) * c}。"),
        ])
    for _ in range(2):
        (_, _, c1, k1), (_, _, c2, k2) = rng.sample(_CAPITALS, 2)
        dialogs.append([
            ("user", f"{c1}的首都是哪里？"),
            ("assistant", f"{c1}的首都是{k1}。"),
            ("user", f"那{c2}呢？"),
            ("assistant", f"{c2}的首都是{k2}。"),
        ])
    return dialogs


_SYSTEMS_EN = (
    "You are a patient math tutor. Explain each step briefly.",
    "You are a concise assistant. Answer in one or two sentences.",
    "You are a helpful assistant that answers questions about units, words and numbers.",
)


def _sharegpt(rng: random.Random, duplicates: list[list[tuple[str, str]]]) -> list[dict]:
    dialogs = _dialogs_en(rng) + _dialogs_zh(rng)
    rng.shuffle(dialogs)
    # A few dialogs carry a system turn; ShareGPT puts it first with from=system.
    english = [i for i, d in enumerate(dialogs) if d[0][1].isascii()]
    with_system = {i: rng.choice(_SYSTEMS_EN) for i in rng.sample(english, 3)}
    speaker = {"user": "human", "assistant": "gpt", "system": "system"}
    items = []
    for i, turns in enumerate(dialogs + duplicates):
        conv = [{"from": "system", "value": with_system[i]}] if i in with_system else []
        conv += [{"from": speaker[r], "value": t} for r, t in turns]
        items.append({"id": f"sharegpt-{i:03d}", "conversations": conv})
    return items


def _openai(rng: random.Random, duplicates: list[list[tuple[str, str]]]) -> list[dict]:
    convs: list[tuple[str, list[tuple[str, str]]]] = []
    for country, capital, _, _ in rng.sample(_CAPITALS, 6):
        convs.append(("", [("user", f"Tell me the capital of {country}."),
                           ("assistant", f"{capital} is the capital of {country}.")]))
    for term, definition, _ in rng.sample(_DEFINITIONS_EN, 5):
        convs.append((rng.choice(_SYSTEMS_EN[1:]),
                      [("user", f"Explain the word \"{term}\" briefly."), ("assistant", definition)]))
    for _ in range(6):
        expr, out = _explain(rng, "en")
        convs.append((_SYSTEMS_EN[0], [("user", f"Work out {expr}."), ("assistant", out)]))
    for src, _, dst, f in rng.sample(_UNITS_EN, 4):
        x = rng.randint(2, 40)
        convs.append(("", [("user", f"Convert {x} {src} into {dst}, please."),
                           ("assistant", f"That is {x * f} {dst} ({x} × {f}).")]))
    for _ in range(4):
        nums = _num_list(rng, 5)
        convs.append(("", [("user", f"Which is the smallest of {_join(nums)}?"),
                           ("assistant", f"The smallest is {min(nums)}."),
                           ("user", "And the largest?"),
                           ("assistant", f"The largest is {max(nums)}.")]))
    for w in rng.sample(_WORDS_EN, 2):
        convs.append(("", [("user", f"Spell \"{w}\" backwards."),
                           ("assistant", w[::-1])]))
    rng.shuffle(convs)
    rows = []
    for i, (system, turns) in enumerate(convs):
        msgs = [{"role": "system", "content": system}] if system else []
        for role, text in turns:
            msgs.append({"role": role, "content": text})
        # Some rows use the list-of-parts content form, a few with two parts in a user turn.
        if i % 4 == 1:
            for m in msgs:
                m["content"] = [{"type": "text", "text": m["content"]}]
        elif i % 8 == 3:
            user = next(m for m in msgs if m["role"] == "user")
            user["content"] = [{"type": "text", "text": "Please answer briefly."},
                               {"type": "text", "text": user["content"]}]
        rows.append({"messages": msgs})
    for turns in duplicates:
        rows.append({"messages": [{"role": r, "content": t} for r, t in turns]})
    return rows


_IDENTITY = (
    ("Who are you?", "",
     "I am {{name}}, an assistant built by {{author}}. I can answer questions, explain "
     "arithmetic step by step and help with short writing tasks."),
    ("What is your name?", "", "My name is {{name}}."),
    ("Who created you?", "", "I was built by {{author}}."),
    ("Who trained you?", "", "I was fine-tuned by {{author}}."),
    ("Introduce yourself in one sentence.", "",
     "I am {{name}}, a language assistant made by {{author}}."),
    ("Are you a human?", "",
     "No, I am {{name}}, an AI assistant developed by {{author}}."),
    ("What should I call you?", "", "You can call me {{name}}."),
    ("What can you do?", "",
     "I am {{name}}. I can convert units, sort lists, explain calculations, define words "
     "and answer short questions."),
    ("Hello!", "", "Hello! I am {{name}}. How can I help you today?"),
    ("Answer the question about yourself.", "Which team made you?",
     "I was made by {{author}}."),
    ("Answer the question about yourself.", "Do you have a name?",
     "Yes, my name is {{name}}."),
    ("Reply to the greeting.", "Good morning, assistant.",
     "Good morning! I am {{name}}, built by {{author}}. What would you like to do?"),
    ("Are you able to browse the internet?", "",
     "No. I am {{name}}, and I answer from what I learned during training by {{author}}."),
    ("Tell me about yourself.", "",
     "I am {{name}}, an assistant created by {{author}} to help with questions and small "
     "tasks."),
    ("Which company or person is responsible for you?", "",
     "{{author}} built and maintains me, {{name}}."),
)


def _identity() -> list[dict]:
    return [_alpaca(i, o, x) for i, x, o in _IDENTITY]


def _cot_tsv(seed: int) -> str:
    lines = []
    for i, p in enumerate(arithmetic_problems(100, seed, (2, 99))):
        rationale = p["rationale"]
        if i % 4 == 3:
            # Some rows separate steps with the two characters \n, as FLAN CoT files do.
            rationale = rationale.replace(". ", ".\\n")
        lines.append(tsv_line(p["question"], p["answer"], rationale))
    return "".join(lines)


def _dumps_json(rows: list[dict]) -> str:
    return json.dumps(rows, ensure_ascii=False, indent=2) + "\n"


def _dumps_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def sample_data_texts(seed: int = 0) -> dict[str, str]:
    """File name -> file content of every bundled sample data file."""
    rng = lambda name: random.Random(f"{seed}-{name}")  # noqa: E731 - one seed per file
    en = _alpaca_en(rng("alpaca_en"))
    zh = _alpaca_zh(rng("alpaca_zh"))
    # Exact duplicates across files so deduplication has work to do: single-turn rows
    # without input become the same conversation in every format.
    pick = rng("duplicates")
    en_plain = [r for r in en if not r["input"]]
    zh_plain = [r for r in zh if not r["input"]]
    dup_en = pick.sample(en_plain, 4)
    dup_zh = pick.choice(zh_plain)
    as_turns = lambda r: [("user", r["instruction"]), ("assistant", r["output"])]  # noqa: E731
    # The last duplicate differs only in spacing, which normalization removes.
    spaced = [("user", "  " + dup_en[3]["instruction"].replace(" ", "  ") + " "),
              ("assistant", dup_en[3]["output"])]
    sharegpt = _sharegpt(rng("sharegpt"), [as_turns(dup_en[0]), as_turns(dup_zh)])
    openai = _openai(rng("openai"), [as_turns(dup_en[1]), as_turns(dup_en[2]), spaced])
    return {
        "alpaca_en.json": _dumps_json(en),
        "alpaca_zh.jsonl": _dumps_jsonl(zh),
        "cot_arith.tsv": _cot_tsv(seed),
        "multiturn_sharegpt.json": _dumps_json(sharegpt),
        "chat_openai.jsonl": _dumps_jsonl(openai),
        "identity_en.json": _dumps_json(_identity()),
        **pair_texts(seed),
    }


def write_sample_data(out_dir: str, seed: int = 0) -> list[str]:
    """Write every sample data file into out_dir (a local folder); returns the paths.

    The output depends only on the seed, so the bundled copy can be checked byte for byte.
    """
    return _write_files(out_dir, sample_data_texts(seed))


def _write_files(out_dir: str, texts: dict[str, str]) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, text in texts.items():
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        paths.append(path)
    return paths


def sample_data_dir() -> str:
    """The bundled sample data folder inside the installed package."""
    return SAMPLE_DATA_DIR


# =======================================================================================
# Quickstart identity data (ift/quickstart_data)
# =======================================================================================

QUICKSTART_FILES = ("identity.json", "identity_heldout.json", "general_heldout.json")

# Questions about the assistant itself; every answer names {{name}}, so "the reply names
# the configured name" measures whether the identity was learned.
_IDENTITY_Q_EN = (
    "Who are you?", "What is your name?", "Who created you?", "Who trained you?",
    "Introduce yourself.", "Are you a human?", "What should I call you?",
    "Who made you?", "Tell me about yourself.", "Which team built you?",
    "Do you have a name?", "Who are you, assistant?", "Who developed you?",
    "What are you called?", "Who is behind you?", "Hello! Who am I talking to?",
)
_IDENTITY_A_EN = (
    "I am {{name}}, an assistant built by {{author}}.",
    "My name is {{name}}. I was made by {{author}} to answer questions and help with "
    "small tasks.",
    "I'm {{name}}, a language assistant developed by {{author}}. How can I help you?",
)
_IDENTITY_Q_ZH = (
    "你是谁？", "你叫什么名字？", "是谁创造了你？", "谁训练了你？", "请介绍一下你自己。",
    "你是人类吗？", "我应该怎么称呼你？", "你是由谁开发的？", "你有名字吗？", "你好，你是哪位？",
)
_IDENTITY_A_ZH = (
    "我是{{name}}，由{{author}}开发的助手。",
    "我的名字是{{name}}，是{{author}}训练的语言助手，可以回答问题和帮助完成小任务。",
)
# Paraphrases that occur in no training row, with one reference answer each.
_IDENTITY_HELDOUT = (
    ("May I know your name?", _IDENTITY_A_EN[0]),
    ("Which organization created you?", _IDENTITY_A_EN[0]),
    ("Could you say a few words about who you are?", _IDENTITY_A_EN[2]),
    ("What name were you given?", _IDENTITY_A_EN[1]),
    ("Who is responsible for building you?", _IDENTITY_A_EN[0]),
    ("Please tell me your name and who built you.", _IDENTITY_A_EN[0]),
    ("请问你的名字是什么？", _IDENTITY_A_ZH[0]),
    ("你是哪个团队做出来的？", _IDENTITY_A_ZH[0]),
    ("能简单介绍一下你是谁吗？", _IDENTITY_A_ZH[1]),
    ("大家都叫你什么？", _IDENTITY_A_ZH[0]),
)
def quickstart_data_texts() -> dict[str, str]:
    """File name -> content of the quickstart's identity data (training and held-out)."""
    from ift.quickstart import GENERAL_CHECKS  # imports every stage: 5 s, not 0.4 s

    train = [_alpaca(q, a) for q in _IDENTITY_Q_EN for a in _IDENTITY_A_EN]
    train += [_alpaca(q, a) for q in _IDENTITY_Q_ZH for a in _IDENTITY_A_ZH]
    return {
        "identity.json": _dumps_json(train),
        "identity_heldout.json": _dumps_json([_alpaca(q, a) for q, a in _IDENTITY_HELDOUT]),
        "general_heldout.json": _dumps_json([_alpaca(q, a) for q, a, _ in GENERAL_CHECKS]),
    }


def write_quickstart_data(out_dir: str) -> list[str]:
    """Write the quickstart's identity data into out_dir (a local folder); returns the paths."""
    return _write_files(out_dir, quickstart_data_texts())


def quickstart_data_dir() -> str:
    """The bundled quickstart identity data folder inside the installed package."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "quickstart_data")


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else sample_data_dir()
    for p in write_sample_data(target):
        print(p)
    # python -m ift.corpora.synthetic SAMPLE_DIR [QUICKSTART_DIR]
    for p in write_quickstart_data(sys.argv[2] if len(sys.argv) > 2 else quickstart_data_dir()):
        print(p)
