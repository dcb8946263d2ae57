"""IE metrics: the tolerant output parser, DuIE-rule triple F1, strict NER F1, EE trigger and
argument F1, empty sets, per-type tables and `ift eval score` on dataset-layout files."""

from __future__ import annotations

import csv
import io
import json

import pytest

from ift.cli import main
from ift.eval import ie

# ---------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------


def test_parser_reads_json_fenced_json_embedded_json_and_tuple_lines():
    item = {"subject": "甲", "predicate": "作者", "object": "乙"}
    assert ie.parse_output("re", json.dumps([item], ensure_ascii=False)) == [item]
    fenced = "结果如下：\n```json\n" + json.dumps([item], ensure_ascii=False) + "\n```\n完毕"
    assert ie.parse_output("re", fenced) == [item]
    assert ie.parse_output("re", "答案是 " + json.dumps(item, ensure_ascii=False) + " 。") == [item]
    lines = "(甲, 作者, 乙)\n（丙，出生地，丁）\nnot a triple"
    assert ie.parse_output("re", lines) == [
        item, {"subject": "丙", "predicate": "出生地", "object": "丁"}]
    assert ie.parse_output("ner", "- (张三, PER)") == [{"entity": "张三", "type": "PER"}]
    assert ie.parse_output("re", "[]") == []


def test_parser_unparseable_is_none_and_bad_items_are_skipped():
    assert ie.parse_output("re", "我不知道") is None
    assert ie.parse_output("re", "") is None
    assert ie.parse_output("ee", '[{"event_type": "e"') is None  # cut off
    got = ie.parse_output("ner", '[{"entity": "a", "type": "T"}, {"entity": "b"}, 3, '
                                 '{"entity": "", "type": "T"}]')
    assert got == [{"entity": "a", "type": "T"}]
    ee = ie.parse_output("ee", '[{"event_type": "E", "trigger": "t", "arguments": '
                               '[{"role": "r", "argument": "x"}, {"role": 1}]}]')
    assert ee == [{"event_type": "E", "trigger": "t", "arguments": [{"role": "r", "argument": "x"}]}]


# ---------------------------------------------------------------------------------------
# Normalisation and counting
# ---------------------------------------------------------------------------------------


def test_duie_rules_lowercase_booknames_dedupe_and_every_object_slot():
    gold = [{"subject": "《Hello》", "predicate": "作者", "object": "Tom"},
            {"subject": "王芳", "predicate": "获奖", "object": {"@value": "金星奖", "inWork": "河流"}}]
    pred = [{"subject": "hello", "predicate": "作者", "object": "《tom》"},
            {"subject": "Hello", "predicate": "作者", "object": "TOM"},  # duplicate after rules
            {"subject": "王芳", "predicate": "获奖", "object": "金星奖"}]  # inWork slot missing
    sc = ie.Scorer("re")
    sc.add(pred, gold)
    m = sc.metrics()
    assert sc.counts["re"] == {"tp": 1, "pred": 2, "gold": 2}
    assert m["ie_re_precision"] == 0.5 and m["ie_re_recall"] == 0.5 and m["ie_re_f1"] == 0.5
    assert ie.norm_duie(" 《Ab》 ") == "ab" and ie.norm_duie("《A") == "《a"
    # predicates are compared as written
    sc2 = ie.Scorer("re")
    sc2.add([{"subject": "a", "predicate": "X", "object": "b"}],
            [{"subject": "a", "predicate": "x", "object": "b"}])
    assert sc2.metrics()["ie_re_f1"] == 0.0


def test_ner_strict_on_type_and_string_with_per_type_rows():
    gold = [{"entity": "北京", "type": "LOC"}, {"entity": "北京大学", "type": "ORG"},
            {"entity": "张三", "type": "PER"}]
    pred = [{"entity": "北京", "type": "LOC"}, {"entity": "北京大学", "type": "LOC"},
            {"entity": "张三 ", "type": "PER"}, {"entity": "张三", "type": "PER"}]
    sc = ie.Scorer("ner")
    sc.add(pred, gold)
    m = sc.metrics()
    assert (m["ie_ner_precision"], m["ie_ner_recall"]) == (2 / 3, 2 / 3)
    rows = {r["type"]: r for r in sc.rows()}
    assert rows["(all)"]["tp"] == 2
    assert rows["LOC"] == {"kind": "ner", "type": "LOC", "tp": 1, "pred": 2, "gold": 1,
                           "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3)}
    assert rows["ORG"]["f1"] == 0.0 and rows["PER"]["f1"] == 1.0


def test_ee_trigger_and_argument_f1():
    gold = [{"event_type": "收购", "trigger": "收购", "arguments": [
        {"role": "收购方", "argument": "甲"}, {"role": "被收购方", "argument": "乙"}]}]
    pred = [{"event_type": "收购", "trigger": "收购", "arguments": [
        {"role": "收购方", "argument": "甲"}, {"role": "被收购方", "argument": "丙"},
        {"role": "时间", "argument": "昨日"}]}]
    sc = ie.Scorer("ee")
    sc.add(pred, gold)
    m = sc.metrics()
    assert m["ie_ee_trigger_f1"] == 1.0
    assert m["ie_ee_argument_precision"] == pytest.approx(1 / 3)
    assert m["ie_ee_argument_recall"] == 0.5
    assert m["ie_ee_argument_f1"] == pytest.approx(0.4)
    # a trigger with the wrong event type counts against both
    sc.add([{"event_type": "地震", "trigger": "收购", "arguments": []}], gold)
    assert sc.counts["ee_trigger"] == {"tp": 1, "pred": 2, "gold": 2}


def test_f1_with_no_predictions_no_gold_and_unparseable_answers():
    assert ie.prf(0, 0, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert ie.prf(0, 0, 4) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert ie.prf(0, 3, 0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    gold = [{"entity": "a", "type": "T"}]
    values, rows, scorers = ie.score_samples([
        ("ner", "garbage", gold), ("ner", "[]", []), ("ner", '[{"entity": "a", "type": "T"}]', gold)])
    assert values["ie_ner_unparseable"] == 1 and values["ie_unparseable"] == 1
    assert values["ie_ner_sentences"] == 3
    assert values["ie_ner_precision"] == 1.0 and values["ie_ner_recall"] == 0.5
    assert ie.score_samples([]) == ({}, [], {})


def test_tables_markdown_and_csv():
    _, rows, _ = ie.score_samples([("re", '[{"subject": "a", "predicate": "p", "object": "b"}]',
                                    [{"subject": "a", "predicate": "p", "object": "b"},
                                     {"subject": "a", "predicate": "q", "object": "c"}])])
    md = ie.table_markdown(rows)
    assert md.splitlines()[0] == "| kind | type | tp | pred | gold | precision | recall | f1 |"
    assert "| re | q | 0 | 0 | 1 | 0.0000 | 0.0000 | 0.0000 |" in md
    parsed = list(csv.DictReader(io.StringIO(ie.table_csv(rows))))
    assert [r["type"] for r in parsed] == ["(all)", "p", "q"]
    assert float(parsed[0]["recall"]) == 0.5


# ---------------------------------------------------------------------------------------
# Scoring files in the datasets' layouts
# ---------------------------------------------------------------------------------------


def _jl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def test_score_duie_files_match_by_text(tmp_path, capsys):
    gold = [{"text": "《远山》是李明写的", "spo_list": [
                {"predicate": "作者", "subject": "《远山》", "object": {"@value": "李明"}}]},
            {"text": "王芳获奖", "spo_list": [
                {"predicate": "获奖", "subject": "王芳",
                 "object": {"@value": "金星奖", "onDate": "2001年"}}]},
            {"text": "无关系", "spo_list": []}]
    pred = [{"text": "王芳获奖", "spo_list": [
                {"predicate": "获奖", "subject": "王芳",
                 "object": {"@value": "金星奖", "onDate": "2001年"}}]},
            {"text": "《远山》是李明写的", "spo_list": [
                {"predicate": "作者", "subject": "远山", "object": {"@value": "李明"}},
                {"predicate": "出生地", "subject": "李明", "object": {"@value": "远山"}}]}]
    (tmp_path / "g.jsonl").write_text(_jl(gold), encoding="utf-8")
    (tmp_path / "p.jsonl").write_text(_jl(pred), encoding="utf-8")
    rc = main(["eval", "score", "--task", "re", "--pred", str(tmp_path / "p.jsonl"),
               "--gold", str(tmp_path / "g.jsonl"), "--json", "--csv", str(tmp_path / "t.csv")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    m = out["metrics"]
    assert (m["ie_re_precision"], m["ie_re_recall"]) == (2 / 3, 1.0)
    assert m["ie_re_sentences"] == 3
    assert {r["type"] for r in out["per_type"]} == {"(all)", "作者", "获奖", "出生地"}
    assert (tmp_path / "t.csv").read_text().startswith("kind,type,tp,pred,gold")
    rc = main(["eval", "score", "--task", "re", "--pred", str(tmp_path / "p.jsonl"),
               "--gold", str(tmp_path / "g.jsonl")])
    text = capsys.readouterr().out
    assert rc == 0 and "| re | (all) | 2 | 3 | 2 |" in text and "3 sentences" in text


def test_score_duee_and_cluener_files_and_errors(tmp_path, capsys):
    gold = [{"id": "1", "text": "t", "event_list": [{"event_type": "E", "trigger": "x",
                                                     "arguments": [{"role": "r", "argument": "a"}]}]},
            {"id": "2", "text": "t", "event_list": [{"event_type": "E", "trigger": "y",
                                                     "arguments": []}]}]
    pred = [{"id": "2", "event_list": [{"event_type": "E", "trigger": "y", "arguments": []}]}]
    values, _ = ie.score_files("ee", "p", _jl(pred), "g", _jl(gold))
    assert values["ie_ee_trigger_precision"] == 1.0 and values["ie_ee_trigger_recall"] == 0.5
    assert values["ie_ee_argument_recall"] == 0.0
    g = [{"text": "张三在北京", "label": {"PER": {"张三": [[0, 1]]}, "LOC": {"北京": [[3, 4]]}}}]
    p = [{"text": "张三在北京", "label": {"PER": {"张三": [[0, 1]]}}}]
    values, _ = ie.score_files("ner", "p", _jl(p), "g", _jl(g))
    assert values["ie_ner_precision"] == 1.0 and values["ie_ner_recall"] == 0.5
    p = [{"text": "张三在北京", "entity_list": [{"type": "LOC", "entity": "北京"}]}]
    assert ie.score_files("ner", "p", _jl(p), "g", _jl(g))[0]["ie_ner_recall"] == 0.5
    with pytest.raises(ValueError, match=r"p: row 1 \(text '别的'\) is not in g"):
        ie.score_files("ner", "p", _jl([{"text": "别的", "label": {}}]), "g", _jl(g))
    with pytest.raises(ValueError, match=r"g:2: malformed JSON"):
        ie.score_files("ner", "p", "", "g", _jl(g) + "{oops\n")
    (tmp_path / "g.jsonl").write_text(_jl(g), encoding="utf-8")
    rc = main(["eval", "score", "--task", "ner", "--pred", str(tmp_path / "missing.jsonl"),
               "--gold", str(tmp_path / "g.jsonl")])
    assert rc == 2 and "--pred" in capsys.readouterr().err


def test_ie_metrics_reach_tune_results_and_report_columns():
    from ift.tune import report
    from ift.tune.trial import _final_result

    result = _final_result({"steps": 3, "eval_loss": 1.0}, {"ie_re_f1": 0.5, "loss": 2.0,
                                                            "ie_ee_argument_f1": 0.25})
    assert result["ie_re_f1"] == 0.5 and result["ie_ee_argument_f1"] == 0.25
    assert result["heldout_loss"] == 2.0
    for k in ("ie_ner_f1", "ie_re_f1", "ie_ee_trigger_f1", "ie_ee_argument_f1"):
        assert k in report.METRICS and k not in report.LOWER_IS_BETTER
    rows = [{"trial": "a", "ie_re_f1": 0.2}, {"trial": "b", "ie_re_f1": 0.6}]
    assert report.best_trial(rows, "ie_re_f1", "max") == "b"
