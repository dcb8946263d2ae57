"""`ift eval --models`: several models side by side in one process; evaluation's generation
goes through the serving engine and equals plain transformers + PEFT greedy decoding."""

from __future__ import annotations

import csv
import json
from argparse import Namespace
from pathlib import Path

import pytest
from train_support import random_lora_adapter

from ift.eval.run import eval_cmd

SAMPLES = Path(__file__).resolve().parents[3] / "ift" / "eval" / "sample_benchmarks"


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """Two random LoRA adapters on the tiny llama and a merged copy of the first."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("cmp")
    a = random_lora_adapter(tiny_model, str(root / "run-a" / "final"), seed=1)
    b = random_lora_adapter(tiny_model, str(root / "run-b" / "final"), seed=2)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                       a).merge_and_unload()
    merged.save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(root / "merged")
    heldout = root / "heldout.tsv"
    heldout.write_text(
        "What is 2 plus 3?\t5\t2 + 3 = 5.\n"
        "How many legs do 2 cats have?\t8\t2 * 4 = 8.\n"
        "Pick the prime:\\nOptions:\\n(A) 4\\n(B) 7\\n(C) 9\t(B)\t7 has no divisors.\n"
        "What is 10 minus 4?\t6\t10 - 4 = 6.\n")
    return {"base": tiny_model, "a": a, "b": b, "merged": str(root / "merged"),
            "heldout": str(heldout), "root": root}


def _hf_greedy(base: str, adapter: str | None, prompts: list[list[int]], n: int
               ) -> list[tuple[list[int], str]]:
    """(reply token ids without eos, their decoded text) of transformers' greedy generate,
    one prompt at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ift.serve.engine import eos_ids

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    eos = sorted(eos_ids(model, tok))
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                             dtype=torch.long), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        ids = [t for t in ids if t not in eos]
        out.append((ids, tok.decode(ids, skip_special_tokens=True)))
    return out


def _same_reply(ours: str, transformers_text: str) -> bool:
    """The same text, except that a character cut at the end (its UTF-8 bytes split
    across tokens, which transformers decodes as U+FFFD) is left out of ours, as the
    server leaves it out of a reply."""
    return transformers_text.startswith(ours) and \
        set(transformers_text[len(ours):]) <= {"\ufffd"}


def test_eval_generation_through_the_engine_equals_plain_transformers(models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ift.eval.generate import generate

    tok = AutoTokenizer.from_pretrained(models["base"])
    texts = ["<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nSort these words: cat, apple, dog<|im_end|>\n",
             "Convert 3 km to m.", "12 + 7 ="]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]),
                                      models["a"])
    got = generate(model, tok, prompts, max_new_tokens=12, batch_size=3)
    want = _hf_greedy(models["base"], models["a"], prompts, 12)
    assert [g["token_ids"] for g in got] == [ids for ids, _ in want]
    assert all(_same_reply(g["text"], text) for g, (_, text) in zip(got, want))
    # completion tokens count the stop token, which token_ids leave out
    assert all(g["tokens"] == len(g["token_ids"]) + (g["finish_reason"] == "stop") <= 12
               for g in got)
    assert all(g["finish_reason"] in ("stop", "length") for g in got)


def _args(**kw) -> Namespace:
    base = {"config": None, "overrides": [], "address": None, "run": None, "adapter": None,
            "data": None, "models": None, "benchmarks": None}
    base.update(kw)
    return Namespace(**base)


def test_models_writes_one_row_per_model(models, tmp_path):
    out = tmp_path / "cmp"
    run_a = str(Path(models["a"]).parent)  # a run directory: its final/ is used
    assert eval_cmd(_args(
        models=f"base,{run_a},{models['b']},{models['merged']}", data=models["heldout"],
        benchmarks=f"mmlu={SAMPLES / 'mmlu'},cmmlu={SAMPLES / 'cmmlu'}",
        overrides=[f"model.name_or_path={models['base']}", f"storage.root={tmp_path / 'w'}",
                   "eval.max_new_tokens=8", f"eval.output={out}",
                   "eval.benchmarks.mmlu.k_shot=1", "tracking.experiment=cmp"])) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["model"] for r in rows] == ["base", "run-a-final", "run-b-final", "merged"]
    for col in ("loss", "exact_match", "rouge_l", "mmlu/acc", "mmlu/acc_norm", "cmmlu/acc"):
        assert all(r[col] != "" for r in rows), col
    md = (out / "compare.md").read_text().splitlines()
    assert len(md) == 2 + 4 and md[2].startswith("| base |")
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # each model's own files; the merged model scores what its adapter scores
    per = {r["model"]: json.loads((out / r["model"] / "eval.json").read_text()) for r in rows}
    assert per["merged"]["metrics"]["loss"] == pytest.approx(
        per["run-a-final"]["metrics"]["loss"], rel=1e-4)
    assert per["merged"]["benchmarks"]["mmlu"]["overall"] == pytest.approx(
        per["run-a-final"]["benchmarks"]["mmlu"]["overall"])
    assert per["base"]["metrics"]["loss"] != pytest.approx(per["run-a-final"]["metrics"]["loss"])
    samples = {r["model"]: [json.loads(x) for x in (out / r["model"] / "samples.jsonl")
                            .read_text().splitlines()] for r in rows}
    assert [s["output"] for s in samples["merged"]] == \
        [s["output"] for s in samples["run-a-final"]]
    # the base row, scored with the adapters disabled, is the base model alone
    base_alone = _hf_greedy(models["base"], None,
                            [_prompt_ids(models["base"], s["prompt"]) for s in samples["base"]],
                            8)
    assert len(samples["base"]) == len(base_alone) > 0
    assert all(_same_reply(s["output"], text) for s, (_, text) in zip(samples["base"],
                                                                      base_alone))
    # disagreements: every listed sample has differing verdicts, with every model's answer
    dis = [json.loads(x) for x in (out / "disagreements.jsonl").read_text().splitlines()]
    for d in dis:
        assert set(d["models"]) == set(per)
        if d["kind"] == "benchmark":
            assert len({m["predicted"] for m in d["models"].values()}) > 1
    summary = json.loads((out / "compare.json").read_text())
    assert summary["disagreements"] == len(dis) and len(summary["rows"]) == 4
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'w'}/mlflow.db")
    mrun = client.get_run(summary["mlflow_run_id"])
    assert mrun.data.metrics["merged/mmlu/acc"] == pytest.approx(float(rows[3]["mmlu/acc"]))


def _prompt_ids(base: str, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)(prompt, add_special_tokens=False)["input_ids"]


def test_models_errors_name_the_entry(models, tmp_path):
    from ift.config import ConfigError

    with pytest.raises(ConfigError, match="--models nowhere: does not exist"):
        eval_cmd(_args(models="base,nowhere", data=models["heldout"], overrides=[
            f"model.name_or_path={models['base']}", "tracking.enabled=false"]))
    with pytest.raises(ConfigError, match="--benchmarks mmlu: not in eval.benchmarks"):
        eval_cmd(_args(models="base", benchmarks="mmlu", overrides=[
            f"model.name_or_path={models['base']}", "tracking.enabled=false"]))


def test_benchmarks_alone_go_to_eval_json_markdown_and_mlflow(models, tmp_path):
    out = tmp_path / "bench"
    assert eval_cmd(_args(adapter=models["a"], benchmarks=f"ceval={SAMPLES / 'ceval'}",
                          overrides=[f"model.name_or_path={models['base']}",
                                     f"storage.root={tmp_path / 'w'}", f"eval.output={out}",
                                     "tracking.experiment=bench"])) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["metrics"] == {} and ev["data"] == ""
    r = ev["benchmarks"]["ceval"]
    assert (r["split"], r["k_shot"], r["overall"]["n"]) == ("val", 5, 3)
    assert "| math | 3 |" in (out / "benchmarks.md").read_text()
    lines = (out / "benchmark_samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["answer"] == "B"
    assert not (out / "samples.jsonl").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'w'}/mlflow.db")
    m = client.get_run(ev["mlflow_run_id"]).data.metrics
    assert m["bench/ceval/acc"] == pytest.approx(r["overall"]["acc"])
    assert m["bench/ceval/math/acc_norm"] == pytest.approx(r["subjects"]["math"]["acc_norm"])


def test_parse_models_and_kinds_come_from_the_model_section(models, tmp_path):
    from ift.config import ConfigError, ModelConfig
    from ift.eval.compare import _kind, parse_models

    base = ModelConfig(name_or_path=models["base"])
    run_a = str(Path(models["a"]).parent)
    specs = parse_models(f"base,{run_a},{models['b']},{models['merged']},{models['b']}", base)
    assert [(s.label, s.kind) for s in specs] == [
        ("base", "base"), ("run-a-final", "lora"), ("run-b-final", "lora"),
        ("merged", "alone"), ("run-b-final-2", "lora")]
    assert (specs[0].path, specs[1].path) == (models["base"], models["a"])
    # an adapter is scored on the shared base only when the section names that base
    assert _kind(models["a"], ModelConfig(), "a") == "alone"
    assert _kind(models["a"], ModelConfig(name_or_path=models["merged"]), "a") == "alone"
    with pytest.raises(ConfigError, match="--models base: set model.name_or_path"):
        parse_models("base", ModelConfig())
    with pytest.raises(ConfigError, match="--models empty: holds neither"):
        _kind(str(tmp_path), base, "empty")
