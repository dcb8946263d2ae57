"""A trial's pure parts: its last Tune result, what its evaluation reserves, the recorded
placement groups, and when a re-mixed dataset is reused rather than made again.
(The preference branch of ensure_mixture is tested in data/test_preference.py.)"""

from __future__ import annotations

import json

import pytest

from ift import storage
from ift.config import ConfigError, load_config
from ift.data import pipeline
from ift.tune.trial import PG_FILE, _final_result, ensure_mixture, eval_resources, placement_groups


def test_final_result_maps_eval_names_and_drops_what_is_unknown_or_missing():
    summary = {"steps": 10, "eval_loss": None, "final_loss": 1.5, "heldout/exact_match": 0.2,
               "run_dir": "/x", "lr": 1e-4}
    metrics = {"exact_match": 0.0, "loss": 2.0, "perplexity": 7.5, "rouge_l": None,
               "ie_ner_f1": 0.125, "bleu": 3.0, "pref_accuracy": 0.75}
    assert _final_result(summary, metrics) == {
        "step": 10, "final_loss": 1.5, "heldout/exact_match": 0.2,
        "exact_match": 0.0,  # a zero is a result, not a missing one
        "heldout_loss": 2.0, "heldout_ppl": 7.5, "ie_ner_f1": 0.125, "pref_accuracy": 0.75,
    }
    assert _final_result({}, {}) == {}


def test_eval_resources_are_one_training_workers():
    cfg = load_config(None, ["train.cpus_per_worker=3", "train.gpus_per_worker=0.5",
                             "train.use_gpu=true"])
    assert eval_resources(cfg.train) == {"num_cpus": 3.0, "num_gpus": 0.5}
    cpu = load_config(None, ["train.cpus_per_worker=2", "train.gpus_per_worker=1"])
    assert eval_resources(cpu.train) == {"num_cpus": 2.0, "num_gpus": 0}


def test_placement_groups_reads_the_recorded_ids(tmp_path):
    assert placement_groups(str(tmp_path)) == []
    (tmp_path / PG_FILE).write_text("aa01\n\n  bb02 \ncc03")
    assert placement_groups(str(tmp_path)) == ["aa01", "bb02", "cc03"]
    assert placement_groups("s3://bucket/sweep/runs/t0") == []  # never recorded remotely


SOURCES = {"cot": {"tags": ["cot"], "weight": 1.0, "count": None},
           "plain": {"tags": ["plain"], "weight": None, "count": 100}}
POINT = {"name": "t0", "seed": 7,
         "params": {"mix.cot": 2.5, "exclude_tags": ["plain"], "train.lr": 1e-4}}
KEPT = {"cot": {"weight": 2.5, "count": None}}


def _manifest(**kw) -> dict:
    return {"version": 2, "hash": "H", "tokenizer": {}, "splits": {}, "sources": SOURCES, **kw}


@pytest.fixture
def remixes(monkeypatch):
    """Calls of pipeline.remix (which runs Ray Data): recorded, answered with a marker."""
    calls = []

    def remix(prepared, out, **kw):
        calls.append((prepared, out, kw))
        return {"remixed": True}

    monkeypatch.setattr(pipeline, "remix", remix)
    return calls


def _dirs(tmp_path, old: dict | None, complete: bool = True) -> tuple[str, str]:
    prepared, out = str(tmp_path / "prepared"), str(tmp_path / "data" / "t0")
    storage.write_text(f"{prepared}/manifest.json", json.dumps(_manifest()))
    storage.mark_complete(prepared)
    if old is not None:
        storage.write_text(f"{out}/manifest.json", json.dumps(old))
        if complete:
            storage.mark_complete(out)
    return prepared, out


def test_a_complete_mixture_of_the_same_parent_seed_and_sources_is_reused(tmp_path, remixes):
    old = _manifest(hash="M", parent={"hash": "H"}, seed=7, mixture=KEPT)
    prepared, out = _dirs(tmp_path, old)
    assert ensure_mixture(prepared, out, POINT) == old
    assert remixes == []


@pytest.mark.parametrize("old,complete", [
    (None, True),                                                          # never made
    (_manifest(parent={"hash": "H"}, seed=7, mixture=KEPT), False),         # partial
    (_manifest(parent={"hash": "OTHER"}, seed=7, mixture=KEPT), True),      # other parent
    (_manifest(parent={"hash": "H"}, seed=8, mixture=KEPT), True),          # other seed
    (_manifest(parent={"hash": "H"}, seed=7,
               mixture={"cot": {"weight": 1.0, "count": None}}), True),    # other weights
    ({"not": "a manifest"}, True),                                         # unreadable
])
def test_any_other_mixture_is_made_again_with_the_points_request(tmp_path, remixes, old,
                                                                 complete):
    prepared, out = _dirs(tmp_path, old, complete)
    assert ensure_mixture(prepared, out, POINT) == {"remixed": True}
    assert remixes == [(prepared, out, {"weights": {"cot": 2.5}, "include_tags": None,
                                        "exclude_tags": ["plain"], "seed": 7})]


def test_a_mixture_naming_an_unknown_source_is_refused_before_any_work(tmp_path, remixes):
    prepared, out = _dirs(tmp_path, None)
    with pytest.raises(ConfigError, match=r"^tune.space: mix.nope names no prepared source"):
        ensure_mixture(prepared, out, {**POINT, "params": {"mix.nope": 1.0}})
    assert remixes == []
