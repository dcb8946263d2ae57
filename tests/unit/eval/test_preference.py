"""Which held-out data `ift eval` scores as preference pairs, and the pair rows it reads.
(pair_metrics is tested on a LoRA model in train/test_preference.py.)"""

from __future__ import annotations

import json
import re

import pytest
from prepared_support import write_prepared

from ift.config import ConfigError, DataConfig, load_config
from ift.eval.preference import held_out_pairs

RECORDS: list[dict] = []  # the conftest tokenizers train on ift's fallback texts only
CFG = load_config(None, [])


def _prepared(d, kind: str | None) -> str:
    rows = [{"id": "p1", "input_ids": [1, 2, 3], "labels": [-100, 2, 3],
             "rejected_input_ids": [1, 2, 4], "rejected_labels": [-100, 2, 4]}]
    return write_prepared(d, {"val": rows}, **({"kind": kind} if kind else {}))


def test_a_prepared_dataset_gives_its_val_pairs_only_when_it_holds_pairs(tmp_path, chatml_tok):
    pairs = _prepared(tmp_path / "pairs", "preference")
    held = held_out_pairs(CFG.data, pairs, chatml_tok, None)
    assert held.rows == [
        {"id": "p1", "input_ids": [1, 2, 3], "labels": [-100, 2, 3],
         "rejected_input_ids": [1, 2, 4], "rejected_labels": [-100, 2, 4]}]
    assert held.skipped == []
    assert held_out_pairs(CFG.data, _prepared(tmp_path / "sft", None), chatml_tok, None) is None


def _jsonl(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def _trained(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != -100])


def test_raw_pair_files_are_tokenized_with_the_template_and_rejected_pairs_named(
        tmp_path, chatml_tok):
    f = _jsonl(tmp_path / "pairs.jsonl", [
        {"instruction": "Name a color.", "chosen": "Blue.", "rejected": "Seven."},
        {"instruction": "Name a color.", "chosen": "Red.", "rejected": "Red."},  # same replies
        {"instruction": "Name a number.", "chosen": "Seven.", "rejected": "Blue."},
    ])
    held = held_out_pairs(CFG.data, f, chatml_tok, "chatml")
    rows = held.rows
    assert [r["id"] for r in rows] == [f"{f}:1", f"{f}:3"]
    assert held.skipped == [f"{f}:2: chosen equals rejected"]
    first = rows[0]
    assert _trained(chatml_tok, first["input_ids"], first["labels"]) == "Blue.<|im_end|>"
    assert _trained(chatml_tok, first["rejected_input_ids"],
                    first["rejected_labels"]) == "Seven.<|im_end|>"
    n = first["prompt_tokens"]
    assert first["input_ids"][:n] == first["rejected_input_ids"][:n]
    assert chatml_tok.decode(first["input_ids"][:n]) == (
        "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n")


def test_an_unreadable_raw_pair_row_is_an_error_naming_its_file_and_line(tmp_path,
                                                                        chatml_tok):
    f = _jsonl(tmp_path / "pairs.jsonl", [
        {"instruction": "Name a color.", "chosen": "Blue.", "rejected": "Seven."},
        "{broken",
    ])
    with pytest.raises(ConfigError, match=rf"eval.data: {re.escape(f)}:2: cannot read row"):
        held_out_pairs(CFG.data, f, chatml_tok, "chatml")


def test_raw_pairs_are_cut_to_the_data_sections_max_seq_len(tmp_path, chatml_tok):
    f = _jsonl(tmp_path / "pairs.jsonl", [
        {"instruction": "Name a color.", "chosen": "Blue.", "rejected": "Seven."}])
    whole = held_out_pairs(DataConfig(), f, chatml_tok, "chatml").rows[0]
    assert len(whole["input_ids"]) > 12
    cut = held_out_pairs(DataConfig(max_seq_len=12), f, chatml_tok, "chatml").rows[0]
    assert len(cut["input_ids"]) == len(cut["rejected_input_ids"]) == 12


def test_anything_but_pair_files_is_not_pairs(tmp_path, chatml_tok):
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    pairs = _jsonl(tmp_path / "pairs.jsonl", [
        {"instruction": "Name a color.", "chosen": "Blue.", "rejected": "Seven."}])
    assert held_out_pairs(CFG.data, chat, chatml_tok, "chatml") is None
    assert held_out_pairs(CFG.data, f"{pairs},{chat}", chatml_tok, "chatml") is None  # mixed
    assert held_out_pairs(CFG.data, str(tmp_path / "*.parquet"), chatml_tok, "chatml") is None
    # A path that does not exist is not pairs either: the conversation reader then names
    # it in its error (eval.data=...: ... does not exist), instead of a traceback here.
    assert held_out_pairs(CFG.data, str(tmp_path / "missing.jsonl"), chatml_tok, "chatml") is None
