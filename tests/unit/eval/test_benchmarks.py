"""Multiple-choice benchmarks: the three CSV layouts with their quirks, k-shot prompts, and
option log-likelihood scoring against a hand computation on a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ift.config import ConfigError, load_config
from ift.eval import benchmarks as bm

SAMPLES = Path(__file__).resolve().parents[3] / "ift" / "eval" / "sample_benchmarks"


def _bench(name: str, path, **kw):
    over = [f"eval.benchmarks.{name}.path={path}"] + [
        f"eval.benchmarks.{name}.{k}={v}" for k, v in kw.items()]
    return load_config(None, over).eval.benchmarks[name]


# ---------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------


def test_mmlu_layout_has_no_header_and_quoted_commas():
    qs, rejects = bm.read_split(str(SAMPLES / "mmlu"), "test", "mmlu")
    assert sorted(qs) == ["arithmetic", "geography"] and rejects == []
    first = qs["arithmetic"][0]  # the first line is a question, not a header
    assert first.question == "What is 8 + 6?" and first.answer == "C"
    assert first.options == {"A": "12", "B": "48", "C": "14", "D": "2"}
    assert first.id.endswith("arithmetic_test.csv:1")
    assert qs["arithmetic"][3].question == "What is 100 / 4, written in digits?"


def test_ceval_layout_reads_by_header_and_withholds_test_answers():
    qs, _ = bm.read_split(str(SAMPLES / "ceval"), "val", "ceval")
    q = qs["math"][2]
    assert q.question == "2, 4, 6 之后是哪个数？" and q.answer == "D"
    assert q.id.endswith("math_val.csv:4")  # line 1 is the header
    test, _ = bm.read_split(str(SAMPLES / "ceval"), "test", "ceval")
    assert [q.answer for q in test["math"]] == [None, None]
    with pytest.raises(ConfigError, match="no answers.*split val"):
        bm.encode("ceval", _bench("ceval", SAMPLES / "ceval", split="test"), _Chars())


def test_cmmlu_layout_bom_index_column_and_bare_subject_files():
    qs, _ = bm.read_split(str(SAMPLES / "cmmlu"), "test", "cmmlu")
    assert list(qs) == ["arithmetic"]
    assert [q.answer for q in qs["arithmetic"]] == ["D", "A", "B"]
    assert qs["arithmetic"][0].question == "4 乘 5 等于多少？"
    assert qs["arithmetic"][0].options["D"] == "20"


def test_bad_rows_are_rejected_with_file_and_line_and_missing_columns_are_errors(tmp_path):
    d = tmp_path / "m" / "test"
    d.mkdir(parents=True)
    (d / "s_test.csv").write_text("Q1,a,b,c,d,B\nQ2,a,b,c,E\nQ3,a,b,c,d,e\nQ4,a,b,c,d,a\n")
    qs, rejects = bm.read_split(str(tmp_path / "m"), "test", "mmlu")
    assert [q.question for q in qs["s"]] == ["Q1", "Q4"]
    assert qs["s"][1].answer == "A"  # lower-case answers are read as letters
    assert [(r.line, r.reason) for r in rejects] == [
        (2, "5 columns, expected 6"), (3, "answer 'e' is not one of A, B, C, D")]
    c = tmp_path / "c" / "test"
    c.mkdir(parents=True)
    (c / "x.csv").write_text("Question,A,B,C,D,Key\nq,1,2,3,4,A\n")
    with pytest.raises(ConfigError, match=r"x.csv:1: .*no 'answer' column"):
        bm.read_split(str(tmp_path / "c"), "test", "cmmlu")
    with pytest.raises(ConfigError, match="no dev split"):
        bm.read_split(str(tmp_path / "c"), "dev", "cmmlu")
    with pytest.raises(ConfigError, match=r"eval.benchmarks.bench.layout"):
        _bench("bench", tmp_path)


# ---------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------


class _Chars:
    """A character-level stand-in tokenizer: ids are code points (BOS 1 when asked)."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_k_shot_prompt_from_dev_split():
    enc = bm.encode("mmlu", _bench("mmlu", SAMPLES / "mmlu", k_shot=2), _Chars())
    e = enc.subjects["arithmetic"][0]
    prefix = "".join(chr(i) for i in e.prefix_ids[1:])
    assert prefix == (
        "The following are multiple choice questions (with answers) about arithmetic.\n\n"
        "What is 7 + 5?\nA. 10\nB. 12\nC. 13\nD. 35\nAnswer: B\n\n"
        "What is 9 * 3?\nA. 27\nB. 12\nC. 21\nD. 93\nAnswer: A\n\n")
    assert "".join(chr(i) for i in e.question_ids) == \
        "What is 8 + 6?\nA. 12\nB. 48\nC. 14\nD. 2\nAnswer:"
    assert [[chr(i) for i in o] for o in e.option_ids] == [[" ", k] for k in "ABCD"]
    # every question of a subject shares the prefix (it is encoded once per model)
    assert all(x.prefix_ids == e.prefix_ids for x in enc.subjects["arithmetic"])
    text = bm.encode("mmlu", _bench("mmlu", SAMPLES / "mmlu", k_shot=0, choices="text",
                                    max_per_subject=1), _Chars())
    e = text.subjects["geography"][0]
    assert [len(o) for o in e.option_ids] == [len(" Everest"), len(" Amazon"),
                                               len(" Atlantic"), len(" Europe")]
    assert e.option_chars == [7, 6, 8, 6]
    assert len(text.subjects["arithmetic"]) == 1
    zh = bm.encode("cmmlu", _bench("cmmlu", SAMPLES / "cmmlu", k_shot=1), _Chars())
    e = zh.subjects["arithmetic"][0]
    assert "".join(chr(i) for i in e.question_ids).endswith("D. 20\n答案：")


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


def _hand_logliks(model, context: list[int], options: list[list[int]]) -> list[float]:
    """log p(option | context) summed token by token, one sequence at a time."""
    import torch

    out = []
    for o in options:
        ids = torch.tensor([context + o])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        out.append(sum(float(logp[len(context) + j - 1, t]) for j, t in enumerate(o)))
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_model)


def test_option_loglik_matches_a_hand_computation(tiny):
    model, tok = tiny
    enc = bm.encode("mmlu", _bench("mmlu", SAMPLES / "mmlu", k_shot=1, choices="text"), tok)
    results, samples = bm.score_benchmark(model, enc)
    by_id = {s["id"]: s for s in samples}
    checked = 0
    for items in enc.subjects.values():
        for e in items:
            hand = _hand_logliks(model, e.prefix_ids + e.question_ids, e.option_ids)
            got = by_id[e.question.id]["loglik"]
            assert [got[k] for k in bm.LETTERS] == pytest.approx(hand, abs=2e-4)
            assert bm.option_logliks_full(model, e.prefix_ids + e.question_ids,
                                          e.option_ids) == pytest.approx(hand, abs=2e-4)
            best = max(range(4), key=lambda i: hand[i])
            best_norm = max(range(4), key=lambda i: hand[i] / e.option_chars[i])
            assert by_id[e.question.id]["predicted"] == bm.LETTERS[best]
            assert by_id[e.question.id]["predicted_norm"] == bm.LETTERS[best_norm]
            checked += 1
    assert checked == 7
    # accuracy per subject and overall (micro over questions)
    acc = {s: sum(by_id[e.question.id]["correct"] for e in items) / len(items)
           for s, items in enc.subjects.items()}
    assert {s: r["acc"] for s, r in results["subjects"].items()} == pytest.approx(acc)
    assert results["overall"]["n"] == 7
    assert results["overall"]["acc"] == pytest.approx(
        sum(by_id[i]["correct"] for i in by_id) / 7)
    assert math.isfinite(results["overall"]["acc_norm"])
    flat = bm.flat_metrics({"mmlu": results})
    assert flat["mmlu/acc"] == results["overall"]["acc"] and "mmlu/geography/acc_norm" in flat
    table = bm.markdown_table({"mmlu": results})
    assert "| geography | 3 |" in table and "**overall** | 7" in table


def test_chat_prompts_keep_the_shared_prefix(tiny):
    model, tok = tiny
    enc = bm.encode("ceval", _bench("ceval", SAMPLES / "ceval", k_shot=2, chat=True), tok,
                    template="chatml")
    e = enc.subjects["math"][0]
    text = tok.decode(e.prefix_ids + e.question_ids)
    assert text.startswith("<|im_start|>user\n以下是关于math考试的单项选择题")
    assert text.endswith("答案：<|im_end|>\n<|im_start|>assistant\n")
    results, samples = bm.score_benchmark(model, enc)
    hand = _hand_logliks(model, e.prefix_ids + e.question_ids, e.option_ids)
    assert [samples[0]["loglik"][k] for k in bm.LETTERS] == pytest.approx(hand, abs=2e-4)
    assert results["overall"]["n"] == 3


def test_prompts_longer_than_the_context_lose_shots_from_the_left(tmp_path):
    from train_support import make_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(str(tmp_path / "m"), max_positions=128)
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), \
        AutoTokenizer.from_pretrained(path)
    limit = model.config.max_position_embeddings
    enc = bm.encode("mmlu", _bench("mmlu", SAMPLES / "mmlu", k_shot=3), tok)
    items = enc.subjects["arithmetic"]
    need = max(len(e.prefix_ids) + len(e.question_ids) + max(map(len, e.option_ids))
               for e in items)
    assert need > limit  # 3 shots do not fit the tiny model's context
    results, samples = bm.score_benchmark(model, enc)
    assert results["truncated"] >= len(items)
    over = need - limit
    e = items[0]
    hand = _hand_logliks(model, (e.prefix_ids + e.question_ids)[over:], e.option_ids)
    assert [samples[0]["loglik"][k] for k in bm.LETTERS] == pytest.approx(hand, abs=2e-4)
    assert "cut from the left" in bm.markdown_table({"mmlu": results})
