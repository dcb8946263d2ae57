"""Search-space expansion and mixture re-weighting (pure functions, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from ift.config import ConfigError, TuneConfig, load_config
from ift.data import mix
from ift.tune import space


def tune_cfg(**kw) -> TuneConfig:
    return TuneConfig(**kw)


def test_grid_is_the_cartesian_product_times_seeds_in_axis_order():
    t = tune_cfg(space={"train.lr": [1e-4, 3e-4], "exclude_tags": [[], ["cot"], ["zh"]]},
                 seeds=[1, 2])
    points = space.expand(t)
    assert len(points) == 2 * 3 * 2
    assert [p["name"] for p in points] == [f"t{i:03d}" for i in range(12)]
    assert [p["index"] for p in points] == list(range(12))
    # The first axis varies slowest, seeds fastest.
    assert [(p["params"]["train.lr"], p["params"]["exclude_tags"], p["seed"])
            for p in points[:4]] == [(1e-4, [], 1), (1e-4, [], 2), (1e-4, ["cot"], 1),
                                     (1e-4, ["cot"], 2)]
    assert {(p["params"]["train.lr"], tuple(p["params"]["exclude_tags"])) for p in points} == {
        (lr, tuple(ex)) for lr in (1e-4, 3e-4) for ex in ([], ["cot"], ["zh"])}


def test_grid_num_samples_repeats_and_empty_space_is_one_point_per_seed():
    assert len(space.expand(tune_cfg(space={"peft.r": [4, 8]}, seeds=[0], num_samples=3))) == 6
    points = space.expand(tune_cfg(space={}, seeds=[5, 6, 7]))
    assert [(p["params"], p["seed"]) for p in points] == [({}, 5), ({}, 6), ({}, 7)]


def test_random_search_is_deterministic_and_in_range():
    t = tune_cfg(search="random", num_samples=20, seeds=[0], name="sweep-a",
                 space={"train.lr": {"min": 1e-5, "max": 1e-3, "log": True},
                        "peft.dropout": {"min": 0.0, "max": 0.2},
                        "peft.r": {"values": [4, 8, 16]},
                        "train.epochs": {"min": 1, "max": 3, "int": True},
                        "mix.alpaca_en": [0.5, 1.0]})
    a, b = space.expand(t), space.expand(t)
    assert a == b
    lrs = [p["params"]["train.lr"] for p in a]
    assert all(1e-5 <= x <= 1e-3 for x in lrs) and len(set(lrs)) == 20
    assert all(0.0 <= p["params"]["peft.dropout"] <= 0.2 for p in a)
    assert {p["params"]["peft.r"] for p in a} <= {4, 8, 16}
    assert {p["params"]["train.epochs"] for p in a} <= {1, 2, 3}
    assert all(isinstance(p["params"]["train.epochs"], int) for p in a)
    # Log-uniform: most draws sit below the arithmetic midpoint.
    assert sum(x < 5e-4 for x in lrs) > 12
    other = space.expand(tune_cfg(**{**t.__dict__, "name": "sweep-b"}))
    assert [p["params"] for p in other] != [p["params"] for p in a]


@pytest.mark.parametrize("kw,msg", [
    ({"space": {"train.lr": {"min": 1e-5, "max": 1e-3}}}, "grid search needs a list"),
    ({"space": {"train.lr": []}}, "empty list"),
    ({"space": {"train.seed": [1, 2]}}, "set by the sweep"),
    ({"space": {"exclude_tags": ["cot", "zh"]}}, "list of tag lists"),
    ({"space": {"mix.": [1.0]}}, "name a source"),
    ({"space": {"train.lr": 0.1}}, "expected a list"),
    ({"search": "random", "space": {"train.lr": {"min": 0, "max": 1, "log": True}}},
     "log ranges need min > 0"),
    ({"search": "random", "space": {"train.lr": {"min": 2, "max": 1}}}, "min <= max"),
    ({"search": "random", "space": {"train.lr": {"min": 1, "max": 2, "step": 1}}}, "unknown key"),
    ({"seeds": []}, "at least one seed"),
    ({"seeds": [1, 1]}, "seeds repeat"),
])
def test_bad_spaces_name_the_axis(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        space.expand(tune_cfg(**kw))


def test_trial_config_applies_point_seed_and_sets():
    base = load_config(None, ["model.name_or_path=/m", "train.lr=0.001"]).to_dict()
    point = {"index": 3, "name": "t003", "seed": 7,
             "params": {"train.lr": 3e-4, "peft.r": 16, "peft.method": "dora",
                        "exclude_tags": ["cot"], "mix.alpaca_en": 0.5}}
    cfg = space.trial_config(base, point, {"train.run_name": "t003", "train.data": "/d/t003"})
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.peft.r == 16 and cfg.peft.method == "dora"
    assert cfg.train.seed == 7 and cfg.train.run_name == "t003" and cfg.train.data == "/d/t003"
    assert base["train"]["lr"] == 0.001  # the base is not modified
    small = dict(point, params={"train.lr": 1e-07})
    assert space.trial_config(base, small).train.lr == pytest.approx(1e-7)


def test_trial_config_errors_name_the_trial_and_key():
    base = load_config(None, []).to_dict()
    point = {"index": 0, "name": "t000", "seed": 1, "params": {"peft.method": "lorra"}}
    with pytest.raises(ConfigError, match=r"t000.*peft.method='lorra'.*did you mean 'lora'"):
        space.trial_config(base, point)
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        space.trial_config(base, dict(point, params={"train.lrr": 1.0}))


SOURCES = {
    "alpaca_en": {"tags": ["en"], "weight": None, "count": None},
    "alpaca_zh": {"tags": ["zh"], "weight": 0.5, "count": None},
    "cot_arith": {"tags": ["cot", "en"], "weight": None, "count": 40},
}


def test_mixture_request_and_sources():
    point = {"params": {"train.lr": 1e-3, "mix.alpaca_en": 2.5, "exclude_tags": ["cot"]},
             "seed": 1}
    overrides, mixture = space.split_params(point["params"])
    assert overrides == {"train.lr": 1e-3}
    assert mixture == {"mix.alpaca_en": 2.5, "exclude_tags": ["cot"]}
    req = space.mixture_request(point)
    assert req == {"weights": {"alpaca_en": 2.5}, "include_tags": None,
                   "exclude_tags": ["cot"]}
    kept = space.mixture_sources(SOURCES, req)
    assert kept == {"alpaca_en": {"weight": 2.5, "count": None},
                    "alpaca_zh": {"weight": 0.5, "count": None}}
    # include_tags keeps only sources with one of the tags; others keep prepared weights.
    kept = space.mixture_sources(SOURCES, {"include_tags": ["en"]})
    assert kept == {"alpaca_en": {"weight": None, "count": None},
                    "cot_arith": {"weight": None, "count": 40}}
    # a weight replaces a prepared count
    kept = space.mixture_sources(SOURCES, {"weights": {"cot_arith": 0.25}})
    assert kept["cot_arith"] == {"weight": 0.25, "count": None}


@pytest.mark.parametrize("req,msg", [
    ({"weights": {"alpaca_fr": 1.0}}, "mix.alpaca_fr names no prepared source"),
    ({"exclude_tags": ["en", "zh"]}, "keeps none of the sources"),
    ({"include_tags": ["fr"]}, "keeps none of the sources"),
    ({"weights": {"alpaca_en": 0, "alpaca_zh": 0}, "exclude_tags": ["cot"]}, "weight 0"),
])
def test_bad_mixtures(req, msg):
    with pytest.raises(ConfigError, match=msg):
        space.mixture_sources(SOURCES, req)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0, 1.7, 2.5])
def test_reweighting_draws_the_expected_rows(weight):
    # The row multiplicities a weight gives (what `remix` writes): floor(w) copies of every
    # row plus round(frac(w) * n) more rows drawn once, deterministic by seed.
    n = 200
    c = mix.multiplicities(n, weight=weight, count=None, seed=3, salt="alpaca_en")
    assert int(c.sum()) == round(weight * n)
    assert c.min() >= int(weight) and c.max() <= int(weight) + 1
    again = mix.multiplicities(n, weight=weight, count=None, seed=3, salt="alpaca_en")
    assert np.array_equal(c, again)


def test_labels_groups_and_varying_axes():
    t = tune_cfg(space={"exclude_tags": [["answers"], ["cot"]], "peft.method": ["full"]},
                 seeds=[1, 2, 3])
    points = space.expand(t)
    assert space.describe(points[0]) == "exclude_tags=[answers] peft.method=full seed=1"
    assert space.group_key(points[0]) == space.group_key(points[2])
    assert space.group_key(points[0]) != space.group_key(points[3])
    assert space.varying_axes(points) == ["exclude_tags"]
