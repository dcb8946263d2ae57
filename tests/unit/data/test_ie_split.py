"""No IE text on both sides of a split: the schema chunks of one text share the split hash
that places them in train or val (and the val cap keeps them together), and the synthetic
corpus's held-out names never occur in a train sentence."""

from __future__ import annotations

import json

import numpy as np

from ift.corpora.ie_synthetic import corpus_texts, name_pools
from ift.data import ie, mix
from ift.data.ingest import RowOptions, clean_rows
from ift.data.readers import plan_reads
from ift.data.record import conversation_hash, make_record, split_hash

SCHEMA = {f"关系{i:02d}": {"subject_type": "x", "object_type": {"@value": "y"}}
          for i in range(12)}


def _duie_file(tmp_path, n: int) -> str:
    lines = []
    for i in range(n):
        a, b = f"甲{i}", f"乙{i}"
        spo = [{"predicate": f"关系{(i + k) % 12:02d}", "subject": a, "object": {"@value": b}}
               for k in range(2)]
        lines.append(json.dumps({"text": f"{a}与{b}第{i}次见面。", "spo_list": spo},
                                ensure_ascii=False))
    path = tmp_path / "duie.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_schema_chunks_of_one_text_share_the_split_hash():
    row = {"text": "甲和乙", "spo_list": [{"predicate": "关系05", "subject": "甲",
                                          "object": {"@value": "乙"}}]}
    recs = ie.to_records("duie", row, id="r", source="s", schema=SCHEMA,
                         labels=ie.LabelOptions(max_labels=4, split=True))
    assert len(recs) == 3
    assert len({conversation_hash(r) for r in recs}) == 3  # distinct rows, not duplicates
    assert len({split_hash(r) for r in recs}) == 1
    other = ie.to_records("duie", {**row, "text": "甲和乙。"}, id="r2", source="s",
                          schema=SCHEMA, labels=ie.LabelOptions(max_labels=4, split=True))
    assert split_hash(other[0]) != split_hash(recs[0])
    # the same text under another IE task goes with it
    ner = ie.to_records("cluener", {"text": "甲和乙", "label": {"人": {"甲": [[0, 0]]}}},
                        id="n", source="s", schema={"人": None})
    assert split_hash(ner[0]) == split_hash(recs[0])
    plain = make_record(id="p", source="s", messages=[
        {"role": "user", "content": "甲和乙"}, {"role": "assistant", "content": "好"}])
    assert split_hash(plain) == conversation_hash(plain)


def test_prepare_rows_of_one_text_land_in_one_split(tmp_path):
    """Through prepare's row function and its val rule: every line's chunks on one side,
    both sides used."""
    tasks, _ = plan_reads("fx", 0, [_duie_file(tmp_path, 200)], "auto", 0, 0)
    opts = RowOptions(seed=42, placeholders={}, columns={}, task="", system=None,
                      ie_schema=SCHEMA, max_labels=4, schema_split=True)
    lines, groups = [], []
    for _key, line, rec, reason, _raw in clean_rows(tasks[0], opts):
        assert reason is None
        lines.append(line)
        groups.append(split_hash(rec))
    assert len(lines) == 600  # 200 texts x 3 chunks
    scores = mix.split_scores(groups, seed=42)
    for is_val in (scores < 0.3, mix.assign_val(scores, 0.3, 25)):
        side: dict[int, set[bool]] = {}
        for line, v in zip(lines, is_val):
            side.setdefault(line, set()).add(bool(v))
        assert all(len(s) == 1 for s in side.values())
        assert 0 < is_val.sum() < len(lines)
    capped = mix.assign_val(scores, 0.3, 25)
    assert capped.sum() <= 25 and capped.sum() % 3 == 0


def test_val_cap_keeps_a_group_whole():
    scores = np.array([0.1, 0.1, 0.2, 0.2, 0.2, 0.05, 0.9])
    assert mix.assign_val(scores, 0.5, 4).tolist() == [True, True, False, False, False,
                                                        True, False]
    assert mix.assign_val(scores, 0.5, 6).sum() == 6


def test_synthetic_heldout_names_never_occur_in_train_text():
    files = corpus_texts(300, 100, seed=0)
    train_text = "\n".join(json.loads(x)["text"]
                           for x in files["train/duie.jsonl"].splitlines())
    held = set()
    for line in files["heldout/duee.jsonl"].splitlines():
        for ev in json.loads(line)["event_list"]:
            held |= {a["argument"] for a in ev["arguments"]
                     if a["role"] in ("获奖者", "奖项", "收购方", "被收购方", "震中")}
    for line in files["heldout/duie.jsonl"].splitlines():
        for spo in json.loads(line)["spo_list"]:
            held.add(spo["subject"])
            held |= {v for k, v in spo["object"].items() if k != "onDate"
                     and spo["predicate"] != "成立日期"}
    for line in files["heldout/cluener.jsonl"].splitlines():
        for etype, ents in json.loads(line)["label"].items():
            if etype != "日期":
                held |= set(ents)
    assert len(held) > 100
    leaked = sorted(n for n in held if n in train_text)
    assert not leaked, leaked[:10]
    pools = name_pools(0)
    assert set(pools) == {"person", "work", "org", "place", "award"}
    for train, heldout in pools.values():
        assert train and heldout and not set(train) & set(heldout)
