"""A config field's allowed values have one owner: the `Literal` annotation, or the module
that implements the choices. Each list here is checked against its owner, and every
`Literal` field refuses a value outside it however the section is built."""

from __future__ import annotations

import dataclasses

import pytest

from ift import config as c
from ift.data import formats, ie, preference, templates
from ift.eval import benchmarks
from ift.train import methods
from ift.train import preference as objectives

SECTIONS = {"data": c.DataConfig, "model": c.ModelConfig, "peft": c.PeftConfig,
            "train": c.TrainConfig, "tune": c.TuneConfig, "serve": c.ServeConfig,
            "eval.benchmarks.<name>": c.BenchmarkConfig}


def test_choice_lists_match_the_modules_that_implement_them():
    train = c.literal_choices(c.TrainConfig)
    assert train["objective"] == objectives.OBJECTIVES
    assert train["dpo_loss"] == objectives.DPO_LOSSES
    assert set(c.PEFT_METHODS) == set(methods.METHODS)
    assert c.TEMPLATES == templates.TEMPLATES
    assert set(c.FORMATS) - {"auto"} == set(formats.CONVERTERS) | set(ie.PARSERS)
    assert set(c.PAIR_FORMATS) == set(preference._CONVERTERS)
    assert set(c.literal_choices(c.BenchmarkConfig)["layout"]) - {""} == set(benchmarks.LAYOUTS)
    assert c.literal_choices(c.DataConfig)["kind"] == c.DATA_KINDS
    assert c.literal_choices(c.SourceConfig)["kind"] == c.DATA_KINDS


@pytest.mark.parametrize("section", SECTIONS)
def test_every_literal_field_refuses_a_value_outside_its_list(section):
    cls = SECTIONS[section]
    choices = c.literal_choices(cls)
    assert choices, f"{cls.__name__} has no Literal field"
    for name, allowed in choices.items():
        assert dataclasses.fields(cls)  # a dataclass section
        with pytest.raises(c.ConfigError, match=rf"{section}.{name}='bogus' is not allowed"
                                                rf".*\(allowed: {', '.join(map(str, allowed))}\)"):
            cls(**{name: "bogus"})
        key = f"{section}.{name}"
        if not section.startswith("eval."):  # the loader names the same key
            with pytest.raises(c.ConfigError, match=rf"{key}='bogus' is not allowed"):
                c.load_config(None, [f"{key}=bogus"])
