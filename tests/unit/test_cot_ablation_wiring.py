"""The CoT ablation's configs are wired to the corpora they train and score on: the toy
job writes both arms where configs/cot-ablation.yaml reads them, and the SmolLM2 config
reads the public files beside the repository (and says which one is missing)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from ift.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _job():
    spec = importlib.util.spec_from_file_location("cot_ablation_job",
                                                  REPO / "jobs" / "cot_ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_toy_job_writes_the_arms_the_config_trains_and_scores(tmp_path, monkeypatch):
    job = _job()
    cfg = load_config(str(REPO / job.CONFIG))
    by_tag = {s.tags[0]: s for s in cfg.data.sources}
    assert set(by_tag) == set(job.ARMS) == {"cot", "answers"}
    # an arm excludes the other's tag: [answers] trains on rationales, [cot] on answers
    assert cfg.tune.space == {"exclude_tags": [["answers"], ["cot"]]}
    assert len(cfg.tune.seeds) == 3 and cfg.tune.scheduler == "none"
    assert cfg.model.name_or_path == os.path.join(job.WORK, "model")
    assert cfg.eval.data == os.path.join(job.WORK, "corpus", "cot", "test.json")

    monkeypatch.chdir(tmp_path)
    corpus = job.write_corpus(job.DEFAULT_TASK, 40, 10, seed=0)
    assert corpus == os.path.join(job.WORK, "corpus")
    rows = {}
    for tag, src in by_tag.items():
        rows[tag] = json.loads(open(src.path).read())
        assert len(rows[tag]) == 40 and src.format == "alpaca"
        # rationales in every row of the cot arm, in none of the answers arm
        assert [r["output"].startswith("Steps: ") for r in rows[tag]] == [job.ARMS[tag]] * 40
    cot_q = [r["instruction"] for r in rows["cot"]]
    assert cot_q == [r["instruction"] for r in rows["answers"]]
    assert [r["output"].splitlines()[-1] for r in rows["cot"]] == [
        r["output"] for r in rows["answers"]]
    held = {r["instruction"] for r in json.loads(open(cfg.eval.data).read())}
    assert len(held) == 10 and not held & set(cot_q)
    with pytest.raises(SystemExit, match="holds the"):
        job.write_corpus("add" if job.DEFAULT_TASK != "add" else "parity", 40, 10, seed=0)


def test_smollm2_config_reads_the_shared_data_and_names_a_missing_file(tmp_path, monkeypatch,
                                                                      tiny_model):
    from ift.data.dataset import PrepareError
    from ift.data.pipeline import plan_inputs

    path = REPO / "configs" / "cot-ablation-smollm2.yaml"
    cfg = load_config(str(path))
    data = "../shared/data/alpaca-cot/"

    def as_loaded(p: str) -> str:  # made absolute when the file is there (config.absolute_paths)
        return os.path.abspath(p) if os.path.exists(p) else p

    assert [s.path for s in cfg.data.sources] == [as_loaded(data + "gsm8k_train.tsv")] * 2
    assert cfg.eval.data == as_loaded(data + "aqua_train.tsv")
    assert cfg.tune.space == {"exclude_tags": [["answers"], ["cot"]]}
    assert cfg.peft.method == "lora"
    # run from a checkout without ../shared/data: the first source names the file
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    cfg = load_config(str(path), [f"model.name_or_path={tiny_model}",
                                  f"storage.root={tmp_path / 'work'}"])
    with pytest.raises(PrepareError, match=r"data.sources.0 \(gsm8k_cot\): "
                       r"\.\./shared/data/alpaca-cot/gsm8k_train.tsv does not exist"):
        plan_inputs(cfg)
