"""IE converters: DuIE, DuEE, CLUENER, span lists and BIO/BIOES files to instruction records,
on hand-written fixtures with bad rows; schemas, candidate labels, phrasings, chunks; the
synthetic corpus and the bundled samples."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ift.corpora.ie_synthetic import corpus_texts, name_pools, write_corpus
from ift.data import ie, mix
from ift.data.ingest import RowOptions, clean_rows
from ift.data.readers import detect_format, iter_raw, plan_reads
from ift.data.record import ConvertError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "ie")
BUNDLED = Path(__file__).resolve().parents[3] / "ift" / "sample_data" / "ie"


def schema(name: str, fmt: str) -> dict:
    path = os.path.join(FIXTURES, name)
    return ie.parse_schema(fmt, open(path, encoding="utf-8").read(), path)


def outcomes(name: str, schema: dict | None = None, max_labels: int = 0, split: bool = False
             ) -> tuple[str, dict[int, list[dict] | str]]:
    """(detected format, line -> records or the reason the row was refused), through the
    prepare pipeline's own row function."""
    path = os.path.join(FIXTURES, name)
    tasks, _ = plan_reads("fx", 0, [path], "auto", 0, 0)
    opts = RowOptions(seed=42, placeholders={}, columns={}, task="", system=None,
                      ie_schema=schema, max_labels=max_labels, schema_split=split)
    out: dict[int, list[dict] | str] = {}
    for t in tasks:
        for _key, n, rec, reason, _raw in clean_rows(t, opts):
            if rec is None:
                out[n] = reason
            else:
                out.setdefault(n, []).append(rec)
    return tasks[0].format, out


def answer(rec: dict) -> list[dict]:
    assert rec["messages"][-1]["role"] == "assistant"
    return json.loads(rec["messages"][-1]["content"])


# ---------------------------------------------------------------------------------------
# DuIE
# ---------------------------------------------------------------------------------------


def test_duie_rows_schema_and_multi_slot_objects():
    fmt, out = outcomes("duie.jsonl", schema=schema("duie_schema.json", "duie"))
    assert fmt == "duie"
    assert answer(out[1][0]) == [{"subject": "远山记", "predicate": "作者", "object": "李明"}]
    # a multi-slot object keeps every slot, in sorted key order
    assert answer(out[2][0]) == [{"subject": "王芳", "predicate": "获奖", "object": {
        "@value": "金星奖最佳女主角", "inWork": "河流", "period": "3"}}]
    assert out[2][0]["meta"]["ie"]["gold"] == answer(out[2][0])
    assert out[3] == "empty text"
    assert "predicate '毕业院校' is not in the schema" in out[4]
    assert "object slot 'onDate' is not in the schema of '出生地'" in out[5]
    assert answer(out[6][0]) == []
    assert "object has no '@value'" in out[7]
    assert out[8].startswith("malformed JSON")
    user = out[1][0]["messages"][0]["content"]
    for rel in ("作者", "获奖", "出生地"):  # the whole schema is the candidate list
        assert rel in user
    assert "远山记" in user and out[1][0]["task"] == "re" and out[1][0]["lang"] == "zh"


def test_duie_without_schema_lists_the_rows_own_relations():
    _, out = outcomes("duie.jsonl")
    assert out[1][0]["meta"]["ie"]["labels"] == ["作者"]
    assert answer(out[4][0])[0]["predicate"] == "毕业院校"  # no schema: nothing to check
    assert "no candidate labels" in out[6]  # nothing to ask about


def test_schema_files_are_checked_with_file_and_line():
    with pytest.raises(ValueError, match=r"s.json:2: no 'predicate'"):
        ie.parse_schema("duie", '{"predicate": "a", "object_type": {"@value": "x"}}\n{}\n',
                        "s.json")
    with pytest.raises(ValueError, match=r"s.json:1: 'role_list' must be a list"):
        ie.parse_schema("duee", '{"event_type": "e"}\n', "s.json")
    with pytest.raises(ValueError, match="no entity types"):
        ie.parse_schema("cluener", "\n", "t.txt")
    assert list(ie.parse_schema("ner_bio", "PER\nLOC\n")) == ["PER", "LOC"]
    with pytest.raises(ValueError, match="takes no schema"):
        ie.parse_schema("alpaca", "[]")


# ---------------------------------------------------------------------------------------
# DuEE
# ---------------------------------------------------------------------------------------


def test_duee_rows_offsets_and_schema():
    fmt, out = outcomes("duee.jsonl", schema=schema("duee_schema.json", "duee"))
    assert fmt == "duee"
    assert answer(out[1][0]) == [{"event_type": "财经/交易-收购", "trigger": "收购", "arguments": [
        {"role": "收购方", "argument": "甲公司"}, {"role": "时间", "argument": "昨日"},
        {"role": "被收购方", "argument": "乙公司"}]}]
    assert out[1][0]["meta"]["ie"]["source_id"] == "a1"
    assert answer(out[2][0])[0]["trigger"] == "地震"
    assert "event type '灾害/意外-洪水' is not in the schema" in out[3]
    assert "role '出售方' is not a role of '财经/交易-收购'" in out[4]
    assert out[5] == "empty text"
    assert "trigger: offset 3 does not match the text" in out[6]
    user = out[1][0]["messages"][0]["content"]
    assert "收购方" in user and "震级" in user  # event types are listed with their roles


# ---------------------------------------------------------------------------------------
# NER: CLUENER, span lists, BIO / BIOES
# ---------------------------------------------------------------------------------------


def test_cluener_nested_and_repeated_spans_and_bad_offsets():
    fmt, out = outcomes("cluener.jsonl")
    assert fmt == "cluener"
    assert answer(out[1][0]) == [{"entity": "浙商银行", "type": "company"},
                                 {"entity": "叶老桂", "type": "name"}]
    # nested (北京 inside 北京大学) and repeated (北京 twice) spans; duplicates folded
    assert answer(out[2][0]) == [{"entity": "北京", "type": "address"},
                                 {"entity": "北京大学", "type": "organization"}]
    assert "span [0, 3] does not match the text (end is inclusive)" in out[3]
    assert "offset 1 does not match the text" in out[4]
    assert out[5] == "empty text"
    assert answer(out[6][0]) == [{"entity": "他", "type": "name"}]


def test_cluener_types_outside_the_schema_are_rejected():
    _, out = outcomes("cluener.jsonl", schema={"name": None, "address": None})
    assert "entity type 'company' is not in the schema" in out[1]
    assert answer(out[6][0]) == [{"entity": "他", "type": "name"}]


def test_span_lists_english_gets_english_and_offsets_either_end():
    fmt, out = outcomes("ner_spans.jsonl")
    assert fmt == "ner_spans"
    rec = out[1][0]
    assert rec["lang"] == "en"
    assert answer(rec) == [{"entity": "John", "type": "PER"}, {"entity": "New York", "type": "LOC"}]
    assert any(p.split("{")[0] in rec["messages"][0]["content"]
               for p in ie.PHRASINGS["ner"]["en"])
    assert "Answer with a JSON list" in rec["messages"][0]["content"]
    assert "entity_list item 2: offset 2 does not match the text" in out[2]
    assert answer(out[3][0]) == [{"entity": "张三", "type": "PER"}]


def test_bio_file_sentences_broken_tags_and_bad_lines():
    fmt, out = outcomes("ner.bio")
    assert fmt == "ner_bio"
    assert answer(out[1][0]) == [{"entity": "张三", "type": "PER"}, {"entity": "北京", "type": "LOC"}]
    assert out[1][0]["meta"]["ie"]["text"] == "张三在北京"
    assert answer(out[7][0]) == [{"entity": "李四", "type": "PER"}]
    assert out[10] == "char 2: I-LOC without a preceding B-LOC"
    assert out[14] == "line 15: expected `char tag`, found 1 fields"


def test_bioes_file():
    fmt, out = outcomes("ner.bioes")
    assert fmt == "ner_bio"
    assert answer(out[1][0]) == [{"entity": "张小三", "type": "PER"}, {"entity": "京", "type": "LOC"}]
    assert out[7] == "char 4: E-LOC without a preceding B-LOC"


def test_bio_spans_tag_schemes():
    assert ie.bio_spans(["B-A", "I-A", "O", "B-B", "B-B", "I-B"]) == [(0, 2, "A"), (3, 4, "B"),
                                                                      (4, 6, "B")]
    assert ie.bio_spans(["B-A", "M-A", "E-A", "S-B"]) == [(0, 3, "A"), (3, 4, "B")]
    with pytest.raises(ConvertError, match="char 2: I-B without a preceding B-B"):
        ie.bio_spans(["B-A", "I-B"])
    with pytest.raises(ConvertError, match="tag 'X' is not"):
        ie.bio_spans(["X"])


def test_detection_by_keys_and_bio_content():
    assert detect_format("x.jsonl", b'{"text": "a", "spo_list": []}\n') == "duie"
    assert detect_format("x.jsonl", b'{"text": "a", "id": "1", "event_list": []}\n') == "duee"
    assert detect_format("x.jsonl", b'{"text": "a", "label": {}}\n') == "cluener"
    assert detect_format("x.jsonl", b'{"text": "a", "entity_list": []}\n') == "ner_spans"
    assert detect_format("x.txt", "张 B-PER\n三 I-PER\n\n".encode()) == "ner_bio"
    assert detect_format("x.bmes", "张 B-PER\n".encode()) == "ner_bio"


# ---------------------------------------------------------------------------------------
# Candidate labels, phrasings, chunks
# ---------------------------------------------------------------------------------------

BIG = {f"关系{i:02d}": {"subject_type": "x", "object_type": {"@value": "y"}} for i in range(30)}
ROW = {"text": "甲和乙", "spo_list": [{"predicate": "关系17", "subject": "甲", "object": {"@value": "乙"}}]}


def test_large_schema_lists_gold_plus_sampled_negatives_deterministically():
    opts = ie.LabelOptions(max_labels=5)
    a = ie.to_records("duie", ROW, id="r1", source="s", seed=1, schema=BIG, labels=opts)
    b = ie.to_records("duie", ROW, id="r1", source="s", seed=1, schema=BIG, labels=opts)
    c = ie.to_records("duie", ROW, id="r1", source="s", seed=2, schema=BIG, labels=opts)
    assert len(a) == 1 and a == b
    labels = a[0]["meta"]["ie"]["labels"]
    assert len(labels) == 5 and "关系17" in labels and labels == sorted(labels)
    assert c[0]["meta"]["ie"]["labels"] != labels  # another seed samples other negatives
    assert answer(a[0]) == [{"subject": "甲", "predicate": "关系17", "object": "乙"}]


def test_schema_split_makes_one_record_per_chunk_with_its_own_gold():
    recs = ie.to_records("duie", ROW, id="r1", source="s", schema=BIG,
                         labels=ie.LabelOptions(max_labels=8, split=True))
    assert [r["meta"]["ie"]["chunk"] for r in recs] == [0, 1, 2, 3]
    assert {r["meta"]["ie"]["chunks"] for r in recs} == {4}
    assert [r["id"] for r in recs] == ["r1", "r1#1", "r1#2", "r1#3"]
    assert [len(answer(r)) for r in recs] == [0, 0, 1, 0]  # 关系17 is in the third chunk
    assert sum(len(r["meta"]["ie"]["labels"]) for r in recs) == 30


def test_prepare_rows_of_schema_chunks_get_their_own_keys():
    path = os.path.join(FIXTURES, "duie.jsonl")
    tasks, _ = plan_reads("fx", 0, [path], "auto", 0, 7)
    opts = RowOptions(seed=42, placeholders={}, columns={}, task="", system=None,
                      ie_schema=schema("duie_schema.json", "duie"), max_labels=2,
                      schema_split=True)
    rows = [(k, n) for k, n, rec, _r, _raw in clean_rows(tasks[0], opts) if rec is not None
            and n == 2]
    assert [n for _k, n in rows] == [2, 2]  # 3 relations in chunks of 2
    assert [k for k, _n in rows] == [(7 << 36) | 2, (7 << 36) | 2 | (1 << mix.CHUNK_SHIFT)]


def test_phrasings_per_task_and_language_chosen_by_seed():
    for task in ie.TASKS:
        assert len(set(ie.PHRASINGS[task]["zh"])) >= 8
        assert len(set(ie.PHRASINGS[task]["en"])) >= 4
        for lang in ("zh", "en"):
            for p in ie.PHRASINGS[task][lang]:
                assert "{labels}" in p and "{text}" in p
    picks = {ie.template_index("re", "zh", 42, f"row{i}") for i in range(200)}
    assert picks == set(range(8))
    assert ie.template_index("re", "zh", 42, "row1") == ie.template_index("re", "zh", 42, "row1")


def test_identical_facts_give_identical_targets():
    a = {"text": "甲乙", "spo_list": [
        {"predicate": "p", "subject": "甲", "object": {"@value": "乙"}},
        {"predicate": "q", "subject": "乙", "object": {"@value": "甲"}}]}
    b = {"text": "甲乙", "spo_list": list(reversed(a["spo_list"])) + [a["spo_list"][0]]}
    ra, rb = (ie.to_records("duie", x, id="i", source="s")[0] for x in (a, b))
    assert ra["messages"][1]["content"] == rb["messages"][1]["content"]


# ---------------------------------------------------------------------------------------
# Synthetic corpus and bundled samples
# ---------------------------------------------------------------------------------------


def test_synthetic_corpus_every_layout_converts_and_splits_share_no_names(tmp_path):
    write_corpus(str(tmp_path), 60, 30, seed=3)
    schemas = {"re": ie.parse_schema("duie", (tmp_path / "duie_schema.json").read_text()),
               "ee": ie.parse_schema("duee", (tmp_path / "duee_schema.json").read_text()),
               "ner": ie.parse_schema("cluener", (tmp_path / "ner_types.json").read_text())}
    gold: dict[str, set] = {"train": set(), "heldout": set()}
    formats = {}
    for split in ("train", "heldout"):
        for f in sorted((tmp_path / split).iterdir()):
            tasks, _ = plan_reads("s", 0, [str(f)], "auto", 0, 0)
            n = 0
            for t in tasks:
                formats[f.name] = t.format
                for line, raw, err, _ in iter_raw(t):
                    assert err is None, (f, line, err)
                    for r in ie.to_records(t.format, raw, id=f"{f.name}{line}", source="s",
                                           schema=schemas[ie.TASK_OF[t.format]]):
                        n += 1
                        if t.format == "cluener":
                            gold[split] |= {g["entity"] for g in r["meta"]["ie"]["gold"]
                                            if g["type"] != "日期"}
            assert n == (60 if split == "train" else 30)
    assert formats == {"duie.jsonl": "duie", "duee.jsonl": "duee", "cluener.jsonl": "cluener",
                       "ner_spans.jsonl": "ner_spans", "ner.bio": "ner_bio",
                       "ner.bioes": "ner_bio"}
    assert gold["train"] and gold["heldout"] and not gold["train"] & gold["heldout"]
    pools = name_pools(3)
    for train, held in pools.values():
        assert not set(train) & set(held)
    # every relation and event of the schema occurs
    duie = (tmp_path / "train" / "duie.jsonl").read_text()
    for rel in ("作者", "出生地", "主演", "成立日期", "总部地点", "获奖", "inWork"):
        assert rel in duie
    duee = (tmp_path / "train" / "duee.jsonl").read_text()
    for ev in ("获奖", "收购", "地震"):
        assert f'"event_type": "{ev}"' in duee


def test_bundled_ie_samples_match_the_generator():
    expected = corpus_texts(12, 8, seed=0)
    bundled = sorted(str(p.relative_to(BUNDLED)) for p in BUNDLED.rglob("*") if p.is_file())
    assert bundled == sorted(expected), "stale or missing files in ift/sample_data/ie"
    for rel, text in expected.items():
        assert (BUNDLED / rel).read_text(encoding="utf-8") == text, (
            f"ift/sample_data/ie/{rel} differs from the generator; run "
            "`python -m ift.corpora.ie_synthetic ift/sample_data/ie --train 12 --heldout 8`")


def test_source_schema_is_checked_before_any_work(tmp_path):
    from ift.config import ConfigError, SourceConfig
    from ift.data.dataset import PrepareError
    from ift.data.pipeline import load_source_schema

    duie = os.path.join(FIXTURES, "duie.jsonl")
    files = [{"source": "d", "format": "duie"}]
    src = SourceConfig(path=duie, name="d", schema=os.path.join(FIXTURES, "duie_schema.json"))
    assert set(load_source_schema(0, src, files)) == {"作者", "获奖", "出生地"}
    with pytest.raises(PrepareError, match=r"data.sources.0.schema: .*nope.json does not exist"):
        load_source_schema(0, SourceConfig(path=duie, name="d", schema="nope.json"), files)
    with pytest.raises(PrepareError, match="a schema applies to one IE task; the source's "
                                           "files are alpaca"):
        load_source_schema(0, src, [{"source": "d", "format": "alpaca"}])
    bad = tmp_path / "s.json"
    bad.write_text('{"predicate": "p", "object_type": 3}\n', encoding="utf-8")
    with pytest.raises(PrepareError, match=r"s.json:1: 'object_type' must be an object"):
        load_source_schema(0, SourceConfig(path=duie, name="d", schema=str(bad)), files)
    assert load_source_schema(0, SourceConfig(path=duie, name="d"), files) is None
    with pytest.raises(ConfigError, match="schema_split needs max_labels > 0"):
        SourceConfig(path=duie, schema_split=True)


def test_ie_zh_config_prepares_three_tasks_with_general_data_and_evaluates_each():
    from ift.config import load_config

    root = Path(__file__).resolve().parents[3]
    cfg = load_config(str(root / "configs" / "ie-zh.yaml"), [])
    schemas = {Path(s.path).name: Path(s.schema).name for s in cfg.data.sources if s.schema}
    assert schemas == {"duie.jsonl": "duie_schema.json", "duee.jsonl": "duee_schema.json",
                       "cluener.jsonl": "ner_types.json"}
    assert any(s.path.endswith("alpaca_zh.jsonl") for s in cfg.data.sources)
    held = [Path(p) for p in cfg.eval.data.split(",")]
    assert [p.name for p in held] == ["duie.jsonl", "duee.jsonl", "cluener.jsonl"]
    assert {p.parent.name for p in held} == {"heldout"}
    assert cfg.eval.max_samples >= 3 * 60  # every held-out sentence of the documented run
