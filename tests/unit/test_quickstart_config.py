import json
from pathlib import Path

import pytest
import yaml

from ift.config import DataConfig, ModelConfig, load_config
from ift.eval.run import data_path
from ift.quickstart import (
    QUICKSTART_TINY_YAML,
    QUICKSTART_YAML,
    _figures,
    _model,
    before_after_table,
    general_hit_rate,
    identity_hit_rate,
    names,
    quickstart_config,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name, text", [("quickstart.yaml", QUICKSTART_YAML),
                                        ("quickstart-tiny.yaml", QUICKSTART_TINY_YAML)])
def test_shipped_yaml_equals_embedded_defaults(name, text):
    shipped = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert shipped == yaml.safe_load(text)
    load_config(str(ROOT / "configs" / name))  # valid as a job config too


def test_quickstart_config_resolves_bundled_data_and_workdir(tmp_path):
    cfg = quickstart_config(str(tmp_path), ["train.epochs=1"], tiny=True)
    assert cfg.storage.root == str(tmp_path)
    assert cfg.train.epochs == 1 and cfg.train.num_workers == 2 and cfg.peft.method == "lora"
    for src in cfg.data.sources:
        assert Path(src.path).is_file(), src.path
    assert {t for s in cfg.data.sources for t in s.tags} >= {"en", "zh", "cot", "multiturn"}


def test_real_quickstart_config_mixes_identity_and_general_data(tmp_path):
    cfg = quickstart_config(str(tmp_path), ["train.epochs=1"])
    assert cfg.model.name_or_path == str(tmp_path / "model")
    assert cfg.train.num_workers == 2 and cfg.peft.method == "lora" and cfg.train.epochs == 1
    for src in cfg.data.sources:
        assert Path(src.path).is_file(), src.path
    assert {t for s in cfg.data.sources for t in s.tags} == {"identity", "general"}
    assert cfg.data.placeholders["name"] == "ift"
    heldout = data_path(cfg, cfg.eval.data).split(",")
    assert [Path(p).name for p in heldout] == ["identity_heldout.json", "general_heldout.json"]
    assert all(Path(p).is_file() for p in heldout)


def test_a_reply_names_the_assistant_as_a_word():
    assert names("I am ift, an assistant.", "ift") and names("我是ift，由团队开发。", "ift")
    assert names("IFT here.", "ift")
    assert not names("A small gift for you.", "ift") and not names("shift work", "ift")
    samples = [{"id": "identity_heldout:1", "output": "I am ift."},
               {"id": "identity_heldout:2", "output": "I am SmolLM."},
               {"id": "general_heldout:1", "output": "Paris."}]
    assert identity_hit_rate(samples, "ift") == 0.5
    assert identity_hit_rate(samples[2:], "ift") is None


def chatml(question: str) -> str:
    return (f"<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def test_general_check_counts_replies_that_hold_an_accepted_answer():
    samples = [{"id": "general_heldout:0", "prompt": chatml("What is 7 + 5?"),
                "output": "7 + 5 = 12."},
               {"id": "general_heldout:1", "prompt": chatml("How many days are there in a week?"),
                "output": "A week has Seven days."},
               {"id": "general_heldout:2", "prompt": chatml("What is the capital of Japan?"),
                "output": "I am ift, an assistant built by the ift authors."},
               {"id": "identity_heldout:0", "prompt": chatml("May I know your name?"),
                "output": "I am ift."}]
    assert general_hit_rate(samples) == 2 / 3
    assert general_hit_rate(samples[3:]) is None


def test_before_after_table_shows_answers_and_figures():
    table = before_after_table({
        "answers": [{"question": "May I know your name?", "base": "I am SmolLM.",
                     "tuned": "I am ift."}],
        "identity_name": "ift", "identity_hit_rate_before": 0.0,
        "identity_hit_rate_after": 0.9, "general_hit_rate_before": 1.0,
        "general_hit_rate_after": 0.8, "heldout_loss_before": 2.5,
        "heldout_loss_after": 0.75})
    assert "May I know your name?" in table and "I am SmolLM." in table
    assert "0% -> 90%" in table and "100% -> 80%" in table and "2.5000 -> 0.7500" in table


def test_figures_name_the_identity_of_the_data_section(tmp_path):
    for which, reply in (("base", "I am SmolLM."), ("tuned", "I am ift.")):
        (tmp_path / "eval" / which).mkdir(parents=True)
        (tmp_path / "eval" / which / "samples.jsonl").write_text(json.dumps(
            {"id": "identity_heldout:1", "prompt": chatml("May I know your name?"),
             "output": reply}) + "\n")
    s = {"workdir": str(tmp_path), "before": {"metrics": {"loss": 2.5}},
         "after": {"metrics": {"loss": 0.75}}}
    got = _figures(DataConfig(placeholders={"name": "ift"}), s)
    assert (got["identity_name"], got["identity_hit_rate_before"],
            got["identity_hit_rate_after"]) == ("ift", 0.0, 1.0)
    assert (got["heldout_loss_before"], got["heldout_loss_after"]) == (2.5, 0.75)
    assert got["answers"] == [{"id": "identity_heldout:1", "question": "May I know your name?",
                               "base": "I am SmolLM.", "tuned": "I am ift."}]
    other = _figures(DataConfig(placeholders={"name": "SmolLM"}), s)
    assert (other["identity_hit_rate_before"], other["identity_hit_rate_after"]) == (1.0, 0.0)


def test_model_reuses_the_tiny_model_at_the_model_sections_path(tmp_path, capsys):
    (tmp_path / "ift_tiny.json").write_text("{}")
    assert _model(ModelConfig(name_or_path=str(tmp_path)), tiny=True) == str(tmp_path)
    assert f"reusing {tmp_path}" in capsys.readouterr().out
