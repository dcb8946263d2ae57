"""A synthetic Chinese information-extraction corpus written by this project.

People, works, films, organisations, places, awards and dates are built from character
lists below (no name is taken from a real data set); sentences state facts about them:

* relations 作者, 出生地, 主演, 成立日期, 总部地点, and 获奖 with the DuIE multi-slot object
  {"@value": award, "inWork": work, "onDate": date};
* entities of types 人物, 作品, 机构, 地点, 日期;
* events 获奖 (时间, 获奖者, 奖项), 收购 (时间, 收购方, 被收购方), 地震 (时间, 震中, 震级).

Each split is written in every real layout (DuIE, DuEE, CLUENER, span lists, BIO and BIOES
character-per-line files) with its schema files, so the converters meet their own formats.
Train and held-out entities (people, works, organisations, places, awards) come from
disjoint name pools, and no held-out name occurs anywhere in a train sentence; dates and
earthquake magnitudes are values drawn from the same ranges on both sides.

    python -m ift.corpora.ie_synthetic OUT_DIR [--train N] [--heldout N] [--seed S]

writes OUT_DIR/{train,heldout}/{duie.jsonl, duee.jsonl, cluener.jsonl, ner_spans.jsonl,
ner.bio, ner.bioes} and OUT_DIR/{duie_schema.json, duee_schema.json, ner_types.json}.
The bundled samples (ift/sample_data/ie) are `write_corpus(dir, 12, 8, seed=0)`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Any

SURNAMES = "王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗梁宋郑谢韩唐冯于董萧程曹袁邓许傅沈曾彭吕"
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉萍红鹏飞宇浩然子轩梓涵欣怡"
WORK_A = "春秋山海风雪星河月光云梦长夜晨曦远方故园流年归途暗潮白塔青石"
WORK_B = "之歌记录传说往事笔记之城之门旅人"
ORG_A = "华瑞博远天启星辰恒通宏达云帆锦程启明鼎盛"
ORG_B = ("科技有限公司", "集团", "研究院", "出版社", "影业")
PLACE_A = "江河湖山川平安宁泰清丰临盛"
PLACE_B = ("州", "阳", "城", "县", "镇")
AWARDS = ("金星奖", "银河文学奖", "青峰电影奖", "长河创作奖", "白鹭表演奖", "远山科学奖")
"""Award names: the first three for train, the rest held out."""

ENTITY_TYPES = ["人物", "作品", "机构", "地点", "日期"]
RELATIONS = {
    "作者": ("图书作品", {"@value": "人物"}),
    "出生地": ("人物", {"@value": "地点"}),
    "主演": ("影视作品", {"@value": "人物"}),
    "成立日期": ("机构", {"@value": "Date"}),
    "总部地点": ("机构", {"@value": "地点"}),
    "获奖": ("人物", {"@value": "奖项", "inWork": "作品", "onDate": "Date"}),
}
EVENTS = {"获奖": ["时间", "获奖者", "奖项"], "收购": ["时间", "收购方", "被收购方"],
          "地震": ["时间", "震中", "震级"]}


def _pool(rng: random.Random, make, n: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        x = make(rng)
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def name_pools(seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """kind -> (train names, held-out names), disjoint."""
    rng = random.Random(seed)
    makers = {
        "person": lambda r: r.choice(SURNAMES) + "".join(r.sample(GIVEN, r.choice((1, 2)))),
        "work": lambda r: r.choice(WORK_A) + r.choice(WORK_A) + r.choice(WORK_B),
        "org": lambda r: r.choice(ORG_A) + r.choice(ORG_A) + r.choice(ORG_B),
        "place": lambda r: r.choice(PLACE_A) + r.choice(PLACE_A) + r.choice(PLACE_B),
    }
    pools = {}
    for kind, make in makers.items():
        names = _pool(rng, make, 120)
        # a name may not contain another (a span would then be ambiguous in the text)
        names = [n for n in names if not any(m != n and m in n for m in names)]
        half = len(names) // 2
        pools[kind] = (names[:half], names[half:])
    pools["award"] = (list(AWARDS[:3]), list(AWARDS[3:]))
    return pools


def _date(rng: random.Random) -> str:
    return f"{rng.randrange(1950, 2024)}年{rng.randrange(1, 13)}月{rng.randrange(1, 29)}日"


class _Sentence:
    """Text built from pieces; entity pieces remember their offsets."""

    def __init__(self) -> None:
        self.text = ""
        self.entities: list[dict[str, Any]] = []

    def add(self, piece: str, etype: str | None = None) -> tuple[str, int]:
        start = len(self.text)
        self.text += piece
        if etype:
            self.entities.append({"entity": piece, "type": etype, "start": start})
        return piece, start


def _facts(rng: random.Random, names: dict[str, list[str]]):
    """One sentence: (text, entities, spo_list, event_list)."""
    s = _Sentence()
    spo: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    p, w, o, pl = (rng.choice(names[k]) for k in ("person", "work", "org", "place"))
    kind = rng.randrange(8)
    if kind == 0:
        s.add("《")
        s.add(w, "作品")
        s.add("》是")
        s.add(p, "人物")
        s.add("创作的长篇小说。")
        spo.append({"predicate": "作者", "subject": w, "subject_type": "图书作品",
                    "object": {"@value": p}, "object_type": {"@value": "人物"}})
    elif kind == 1:
        s.add(p, "人物")
        s.add("出生于")
        s.add(pl, "地点")
        s.add("，代表作有《")
        s.add(w, "作品")
        s.add("》。")
        spo.append({"predicate": "出生地", "subject": p, "subject_type": "人物",
                    "object": {"@value": pl}, "object_type": {"@value": "地点"}})
        spo.append({"predicate": "作者", "subject": w, "subject_type": "图书作品",
                    "object": {"@value": p}, "object_type": {"@value": "人物"}})
    elif kind == 2:
        s.add("电影《")
        s.add(w, "作品")
        s.add("》由")
        s.add(p, "人物")
        s.add("主演。")
        spo.append({"predicate": "主演", "subject": w, "subject_type": "影视作品",
                    "object": {"@value": p}, "object_type": {"@value": "人物"}})
    elif kind == 3:
        d = _date(rng)
        s.add(o, "机构")
        s.add("成立于")
        s.add(d, "日期")
        s.add("，总部位于")
        s.add(pl, "地点")
        s.add("。")
        spo.append({"predicate": "成立日期", "subject": o, "subject_type": "机构",
                    "object": {"@value": d}, "object_type": {"@value": "Date"}})
        spo.append({"predicate": "总部地点", "subject": o, "subject_type": "机构",
                    "object": {"@value": pl}, "object_type": {"@value": "地点"}})
    elif kind == 4:
        d, award = _date(rng), rng.choice(names["award"])
        s.add(d, "日期")
        s.add("，")
        _, ps = s.add(p, "人物")
        s.add("凭借《")
        s.add(w, "作品")
        _, ts = s.add("》获得")
        s.add(award)
        spo.append({"predicate": "获奖", "subject": p, "subject_type": "人物",
                    "object": {"@value": award, "inWork": w, "onDate": d},
                    "object_type": {"@value": "奖项", "inWork": "作品", "onDate": "Date"}})
        events.append({"event_type": "获奖", "trigger": "获得", "trigger_start_index": ts + 1,
                       "arguments": [
                           {"role": "时间", "argument": d, "argument_start_index": 0},
                           {"role": "获奖者", "argument": p, "argument_start_index": ps},
                           {"role": "奖项", "argument": award,
                            "argument_start_index": ts + 3}]})
        s.add("。")
    elif kind == 5:
        d = _date(rng)
        o2 = rng.choice([x for x in names["org"] if x != o])
        s.add(d, "日期")
        s.add("，")
        _, a = s.add(o, "机构")
        _, t = s.add("宣布收购")
        _, b = s.add(o2, "机构")
        s.add("。")
        events.append({"event_type": "收购", "trigger": "收购", "trigger_start_index": t + 2,
                       "arguments": [
                           {"role": "时间", "argument": d, "argument_start_index": 0},
                           {"role": "收购方", "argument": o, "argument_start_index": a},
                           {"role": "被收购方", "argument": o2, "argument_start_index": b}]})
    elif kind == 6:
        d, mag = _date(rng), f"{rng.randrange(30, 80) / 10:.1f}"
        s.add(d, "日期")
        s.add("，")
        _, c = s.add(pl, "地点")
        s.add("发生")
        _, m = s.add(mag)
        _, t = s.add("级地震")
        s.add("。")
        events.append({"event_type": "地震", "trigger": "地震", "trigger_start_index": t + 1,
                       "arguments": [
                           {"role": "时间", "argument": d, "argument_start_index": 0},
                           {"role": "震中", "argument": pl, "argument_start_index": c},
                           {"role": "震级", "argument": mag, "argument_start_index": m}]})
    else:
        s.add(p, "人物")
        s.add("今天去了")
        s.add(pl, "地点")
        s.add("散步。")  # no relation, no event: the answer is []
    return s.text, s.entities, spo, events


def _layouts(rows: list[tuple]) -> dict[str, str]:
    def jl(items):
        return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items)

    duie, duee, clue, spans, bio, bioes = [], [], [], [], [], []
    for i, (text, ents, spo, events) in enumerate(rows):
        duie.append({"text": text, "spo_list": spo})
        duee.append({"text": text, "id": f"e{i}", "event_list": [
            {**e, "class": e["event_type"]} for e in events]})
        label: dict[str, dict[str, list]] = {}
        for e in ents:
            label.setdefault(e["type"], {}).setdefault(e["entity"], []).append(
                [e["start"], e["start"] + len(e["entity"]) - 1])
        clue.append({"text": text, "label": label})
        spans.append({"text": text, "entity_list": [
            {"type": e["type"], "entity": e["entity"], "start_idx": e["start"],
             "end_idx": e["start"] + len(e["entity"])} for e in ents]})
        tags_bio, tags_bioes = ["O"] * len(text), ["O"] * len(text)
        for e in ents:
            a, n, t = e["start"], len(e["entity"]), e["type"]
            for k in range(n):
                tags_bio[a + k] = ("B-" if k == 0 else "I-") + t
                tags_bioes[a + k] = ("S-" if n == 1 else "B-" if k == 0
                                     else "E-" if k == n - 1 else "I-") + t
        bio.append("".join(f"{c} {g}\n" for c, g in zip(text, tags_bio)))
        bioes.append("".join(f"{c} {g}\n" for c, g in zip(text, tags_bioes)))
    return {"duie.jsonl": jl(duie), "duee.jsonl": jl(duee), "cluener.jsonl": jl(clue),
            "ner_spans.jsonl": jl(spans), "ner.bio": "\n".join(bio),
            "ner.bioes": "\n".join(bioes)}


def schema_texts() -> dict[str, str]:
    duie = "".join(json.dumps({"predicate": p, "subject_type": st, "object_type": ot},
                              ensure_ascii=False) + "\n" for p, (st, ot) in RELATIONS.items())
    duee = "".join(json.dumps({"event_type": e, "role_list": [{"role": r} for r in roles]},
                              ensure_ascii=False) + "\n" for e, roles in EVENTS.items())
    return {"duie_schema.json": duie, "duee_schema.json": duee,
            "ner_types.json": json.dumps(ENTITY_TYPES, ensure_ascii=False) + "\n"}


def corpus_texts(n_train: int, n_heldout: int, seed: int = 0) -> dict[str, str]:
    """Relative path -> file content of the whole corpus."""
    pools = name_pools(seed)
    out = dict(schema_texts())
    for split, n, side in (("train", n_train, 0), ("heldout", n_heldout, 1)):
        rng = random.Random(f"{seed}-{split}")
        names = {k: v[side] for k, v in pools.items()}
        rows, seen = [], set()
        while len(rows) < n:
            row = _facts(rng, names)
            if row[0] not in seen:
                seen.add(row[0])
                rows.append(row)
        for name, text in _layouts(rows).items():
            out[f"{split}/{name}"] = text
    return out


def write_corpus(out_dir: str, n_train: int = 400, n_heldout: int = 100,
                 seed: int = 0) -> list[str]:
    paths = []
    for rel, text in corpus_texts(n_train, n_heldout, seed).items():
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m ift.corpora.ie_synthetic")
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for p in write_corpus(a.out, a.train, a.heldout, a.seed):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
