"""Preference pairs: layout detection, the five converters, rejects with reasons, the
duplicate key, and tokenization (same template both sides, labels on the reply only,
truncation keeping the prompt's end and the replies' starts)."""

from __future__ import annotations

import pytest

from ift.artifacts import IGNORE_INDEX
from ift.data.preference import (
    check_pair,
    convert_pair,
    pair_format_of,
    pair_hash,
    tokenize_pairs,
)
from ift.data.readers import detect_format
from ift.data.record import ConvertError, make_record
from ift.data.templates import render_prompt

RECORDS = [make_record(id="r", source="s", system="Be brief.", messages=[
    {"role": "user", "content": "What is 2 plus 3? Name a color."},
    {"role": "assistant", "content": "5. Blue. Well, that is a long story to tell."},
])]

ROWS = {
    "alpaca_pairs": {"instruction": "Add the numbers.", "input": "2 3", "chosen": "5.",
                     "rejected": "Well, let me think. It is 5.", "system": "Be brief."},
    "sharegpt_pairs": {"conversations": [{"from": "system", "value": "Be brief."},
                                         {"from": "human", "value": "Hi"},
                                         {"from": "gpt", "value": "Hello."},
                                         {"from": "human", "value": "2 plus 3?"}],
                       "chosen": {"from": "gpt", "value": "5."},
                       "rejected": {"from": "gpt", "value": "Five, I think."}},
    "hh_rlhf": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: 2 plus 3?"
                          "\n\nAssistant: 5.",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: 2 plus 3?"
                            "\n\nAssistant: Five, I think."},
    "messages_pairs": {"prompt": "2 plus 3?",
                       "chosen": [{"role": "user", "content": "2 plus 3?"},
                                  {"role": "assistant", "content": "5."}],
                       "rejected": [{"role": "user", "content": "2 plus 3?"},
                                    {"role": "assistant", "content": "Five, I think."}]},
    "openai_preference": {"input": {"messages": [{"role": "user", "content": "2 plus 3?"}]},
                          "preferred_output": [{"role": "assistant", "content": "5."}],
                          "non_preferred_output": [{"role": "assistant",
                                                    "content": "Five, I think."}]},
}


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_each_layout_is_detected_and_converted_to_one_pair(fmt):
    raw = ROWS[fmt]
    assert pair_format_of(raw) == fmt
    pair = convert_pair(fmt, raw, id="x", source="s")
    assert pair["prompt"][-1]["role"] == "user"
    assert pair["chosen"] == "5."
    assert pair["rejected"] in ("Five, I think.", "Well, let me think. It is 5.")
    if fmt in ("sharegpt_pairs", "hh_rlhf"):
        assert [m["content"] for m in pair["prompt"]] == ["Hi", "Hello.", "2 plus 3?"]
    if fmt == "alpaca_pairs":
        assert pair["prompt"] == [{"role": "user", "content": "Add the numbers.\n2 3"}]
    if fmt in ("alpaca_pairs", "sharegpt_pairs"):
        assert pair["system"] == "Be brief."


def test_file_detection_prefers_the_pair_layout(tmp_path):
    import json

    for fmt, raw in ROWS.items():
        head = (json.dumps(raw) + "\n").encode()
        assert detect_format(str(tmp_path / "x.jsonl"), head) == fmt


@pytest.mark.parametrize("fmt,raw,reason", [
    ("alpaca_pairs", {"instruction": "Q", "chosen": "A.", "rejected": " A. "},
     "chosen equals rejected"),
    ("alpaca_pairs", {"instruction": "Q", "chosen": "", "rejected": "B"},
     "empty reply: chosen is empty"),
    ("messages_pairs", {"prompt": [{"role": "system", "content": "S"}],
                        "chosen": "A", "rejected": "B"}, "the prompt has no user turn"),
    ("hh_rlhf", {"chosen": "\n\nHuman: Q\n\nAssistant: A",
                 "rejected": "\n\nHuman: Other\n\nAssistant: B"},
     "hh-rlhf: chosen and rejected do not share a prompt"),
    ("alpaca_pairs", {"instruction": "Q", "chosen": "A"}, "missing field 'rejected'"),
])
def test_bad_pairs_are_rejected_with_their_reason(fmt, raw, reason):
    with pytest.raises(ConvertError, match=reason.replace("(", r"\(")):
        convert_pair(fmt, raw, id="x", source="s")


def test_duplicate_key_ignores_spacing_but_not_the_replies():
    a = convert_pair("alpaca_pairs", {"instruction": "Q  x", "chosen": "A", "rejected": "B"},
                     id="1", source="s")
    b = convert_pair("alpaca_pairs", {"instruction": "Q x", "chosen": "A ", "rejected": "B"},
                     id="2", source="t")
    c = convert_pair("alpaca_pairs", {"instruction": "Q x", "chosen": "B", "rejected": "A"},
                     id="3", source="s")
    assert pair_hash(a) == pair_hash(b) != pair_hash(c)
    assert check_pair(a) is None


def _pair(chosen="5. Blue.", rejected="Well, that is a long story to tell. 5. Blue."):
    return convert_pair("sharegpt_pairs", {
        "conversations": [{"from": "human", "value": "What is 2 plus 3?"},
                          {"from": "gpt", "value": "5."},
                          {"from": "human", "value": "Name a color."}],
        "chosen": {"from": "gpt", "value": chosen},
        "rejected": {"from": "gpt", "value": rejected}}, id="p", source="s")


def test_tokenized_pair_shares_the_prompt_and_labels_only_the_final_reply(chatml_tok):
    pair = _pair()
    rows, lost = tokenize_pairs([pair], chatml_tok, template="chatml", max_seq_len=4096)
    assert lost == []
    (row,) = rows
    n = row["prompt_tokens"]
    assert row["input_ids"][:n] == row["rejected_input_ids"][:n]
    # The prompt (earlier assistant turn included) is masked; the replies are labelled.
    assert all(lab == IGNORE_INDEX for lab in row["labels"][:n])
    assert all(lab == IGNORE_INDEX for lab in row["rejected_labels"][:n])
    prompt_text = render_prompt([*pair["prompt"]], chatml_tok, "chatml")
    assert chatml_tok.decode(row["input_ids"][:n]) == prompt_text
    trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
    assert chatml_tok.decode(trained).startswith("5. Blue.")
    assert row["num_trainable"] == len(trained)
    assert row["num_tokens"] == len(row["input_ids"])


def test_truncation_keeps_the_prompt_end_and_reply_starts(chatml_tok):
    pair = _pair(rejected="Well, " * 60 + "5.")
    (full,), _ = tokenize_pairs([pair], chatml_tok, template="chatml", max_seq_len=4096)
    limit = 40
    (row,), lost = tokenize_pairs([pair], chatml_tok, template="chatml", max_seq_len=limit)
    assert lost == []
    assert len(row["rejected_input_ids"]) == limit and len(row["input_ids"]) <= limit
    n, n_full = row["prompt_tokens"], full["prompt_tokens"]
    assert n == limit // 2 < n_full
    assert row["input_ids"][:n] == full["input_ids"][n_full - n:n_full]  # the prompt's end
    assert row["rejected_input_ids"][n:] == full["rejected_input_ids"][n_full:n_full + limit - n]


def test_a_pair_whose_reply_keeps_no_token_is_dropped_with_a_reason(chatml_tok):
    ok = _pair()
    (full,), _ = tokenize_pairs([ok], chatml_tok, template="chatml", max_seq_len=4096)
    rows, lost = tokenize_pairs([ok], chatml_tok, template="chatml", max_seq_len=1)
    assert rows == []
    assert lost[0][0] == 0 and "no trainable token left" in lost[0][1]


def test_the_dpo_config_loads_and_names_the_bundled_pairs():
    import os
    from pathlib import Path

    from ift.config import load_config

    repo = Path(__file__).resolve().parents[3]
    cfg = load_config(str(repo / "configs" / "dpo.yaml"))
    assert cfg.data.kind == "preference" and cfg.train.objective == "dpo"
    assert os.path.exists(cfg.data.sources[0].path)
    assert (repo / cfg.eval.data).exists()
    assert load_config(str(repo / "configs" / "dpo.yaml"),
                       ["train.objective=simpo"]).train.objective == "simpo"


def test_sweeps_train_on_preference_pairs_as_prepared(tmp_path):
    from prepared_support import write_prepared

    from ift.config import ConfigError
    from ift.tune.trial import ensure_mixture

    prepared = write_prepared(tmp_path / "prepared", kind="preference", marker="h",
                              splits={"train": {"rows": 3}},
                              sources={"pairs": {"tags": ["x"]}})
    point = {"name": "t0", "seed": 42, "params": {"train.beta": 0.5}}
    assert ensure_mixture(prepared, str(tmp_path / "mix"), point)["kind"] == "preference"
    assert not (tmp_path / "mix").exists()
    with pytest.raises(ConfigError, match="sweeps do not re-mix"):
        ensure_mixture(prepared, str(tmp_path / "mix"),
                       {**point, "params": {"exclude_tags": ["x"]}})


def _kind_sources(*specs):
    """(name, kind, format) -> (sources, files) as plan_inputs has them."""
    from ift.config import SourceConfig

    sources = [SourceConfig(path=f"{n}.jsonl", name=n, kind=k) for n, k, _ in specs]
    files = [{"source": n, "path": f"{n}.jsonl", "format": f} for n, _, f in specs]
    return sources, files


def test_a_preparation_takes_the_one_kind_of_its_sources():
    from ift.data.pipeline import dataset_kind

    assert dataset_kind("auto", *_kind_sources(("a", "auto", "alpaca"),
                                               ("b", "auto", "sharegpt"))) == "sft"
    assert dataset_kind("auto", *_kind_sources(("p", "auto", "hh_rlhf"),
                                               ("q", "preference", "alpaca_pairs"))) == "preference"
    assert dataset_kind("preference", *_kind_sources(("p", "auto", "hh_rlhf"))) == "preference"
    assert dataset_kind("sft", *_kind_sources(("a", "sft", "alpaca"))) == "sft"


@pytest.mark.parametrize("kind, specs, match", [
    ("auto", [("chat", "auto", "alpaca"), ("pairs", "auto", "alpaca_pairs")],
     r"data.sources.0 \(chat\) holds sft conversations and data.sources.1 \(pairs\) "
     r"preference pairs: one preparation is of one kind"),
    ("sft", [("pairs", "auto", "hh_rlhf")],
     r"data.sources.0 \(pairs\): pairs.jsonl holds preference pairs \(hh_rlhf\), but "
     r"data.kind=sft"),
    ("auto", [("chat", "auto", "alpaca"), ("pairs", "sft", "hh_rlhf")],
     r"data.sources.1 \(pairs\): .* but data.sources.1.kind=sft"),
    ("preference", [("chat", "auto", "sharegpt")],
     r"data.sources.0 \(chat\): chat.jsonl holds sharegpt conversations, not preference "
     r"pairs \(data.kind=preference expects"),
    ("auto", [("chat", "preference", "alpaca")], r"data.sources.0.kind=preference expects"),
])
def test_a_source_of_the_other_kind_is_named(kind, specs, match):
    from ift.data.dataset import PrepareError
    from ift.data.pipeline import dataset_kind

    with pytest.raises(PrepareError, match=match):
        dataset_kind(kind, *_kind_sources(*specs))


def test_the_kind_is_read_from_the_files_when_none_is_set(tiny_model, sample_data_dir):
    from ift.config import ConfigError, load_config
    from ift.data.dataset import PrepareError
    from ift.data.pipeline import plan_inputs

    pairs = f"data.sources.0.path={sample_data_dir / 'pref_concise_train.jsonl'}"
    cfg = load_config(None, [f"model.name_or_path={tiny_model}", pairs])
    assert cfg.data.kind == "auto" and plan_inputs(cfg).kind == "preference"
    cfg = load_config(None, [f"model.name_or_path={tiny_model}", pairs,
                             f"data.sources.1.path={sample_data_dir / 'alpaca_en.json'}"])
    with pytest.raises(PrepareError, match=r"\(pref_concise_train\) preference pairs"):
        plan_inputs(cfg)
    with pytest.raises(ConfigError, match="kind"):
        load_config(None, [pairs, "data.sources.0.kind=pairs"])
