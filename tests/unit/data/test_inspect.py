"""`ift data inspect`: the manifest table, trained spans marked in decoded samples, and the
command on a prepared directory."""

from __future__ import annotations

from argparse import Namespace

import pytest
from train_support import build_prepared, read_rows

from ift.data.inspect import (
    GREEN,
    RESET,
    TRAIN_CLOSE,
    TRAIN_OPEN,
    inspect_cmd,
    mark_trained,
    summary,
)

RECORDS: list[dict] = []  # the conftest tokenizers train on ift's fallback texts only

MANIFEST = {
    "hash": "0123456789abcdef0123456789", "template": "chatml", "max_seq_len": 512,
    "packed": True,
    "tokenizer": {"name_or_path": "tiny", "vocab_size": 700, "sha256": "aabbccddeeff00112233"},
    "sources": {
        "a_very_long_source_name_that_is_cut": {
            "rows_read": 10, "rows_kept": 7, "rows_rejected": 2, "rows_duplicate": 1,
            "rows_dropped": 0, "rows_sampled": 7, "rows_val": 1, "tags": ["zh", "cot"]},
        "b": {},
    },
    "splits": {"train": {"rows": 6, "samples": 9, "tokens": 1234, "trainable_tokens": 456,
                         "length": {"mean": 137.11, "p50": 120.4, "p95": 300.6, "max": 310}}},
    "padding_waste": {"unpacked": 0.25, "packed": 0.031},
    "rejects": {"total": 2, "files": ["rejects/a.jsonl", "rejects/b.jsonl"]},
}


def _column_ends(header: str, names: list[str]) -> list[int]:
    return [header.index(n) + len(n) for n in names]


def test_summary_lists_sources_and_splits_in_aligned_columns():
    lines = summary(MANIFEST).split("\n")
    assert lines[0] == ("prepared dataset  hash 0123456789abcdef  template chatml  "
                        "max_seq_len 512  packed True")
    assert lines[1] == "tokenizer         tiny (vocab 700, sha aabbccddeeff)"
    header, long_row, empty_row = lines[3], lines[4], lines[5]
    names = ["read", "kept", "reject", "dup", "drop", "sampled", "val"]
    values = ["10", "7", "2", "1", "0", "7", "1"]
    # A source name is cut to 23 characters; each count ends where its column name ends.
    assert long_row.startswith("a_very_long_source_name ")
    for end, v in zip(_column_ends(header, names), values):
        assert long_row[end - len(v):end] == v and long_row[end - len(v) - 1] == " "
    assert long_row.endswith("  zh,cot")
    assert empty_row.split() == ["b"] + ["0"] * 7  # missing counts are 0, no tags
    split_header, train = lines[7], lines[8]
    assert split_header.split() == ["split", "rows", "samples", "tokens", "trainable", "mean",
                                    "p50", "p95", "max"]
    # mean to one decimal, percentiles rounded to whole tokens
    assert train.split() == ["train", "6", "9", "1234", "456", "137.1", "120", "301", "310"]
    assert lines[-2] == "padding waste: unpacked 25.0%, packed 3.1%"
    assert lines[-1] == "rejected rows: 2 (see rejects/a.jsonl, rejects/b.jsonl)"


def test_summary_without_packing_or_rejects():
    m = {**MANIFEST, "padding_waste": {"unpacked": 0.125, "packed": None},
         "rejects": {"total": 0, "files": []}}
    lines = summary(m).split("\n")
    assert lines[-1] == "padding waste: unpacked 12.5% (packing off)"
    assert not any(line.startswith("rejected rows") for line in lines)
    assert summary({k: v for k, v in m.items() if k != "rejects"}).split("\n")[-1] == \
        "padding waste: unpacked 12.5% (packing off)"


class _Chars:
    """A tokenizer whose token ids are code points: decode joins the characters."""

    def decode(self, ids, skip_special_tokens=False):
        assert skip_special_tokens is False  # markers and special tokens must stay visible
        return "".join(chr(i) for i in ids)


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_mark_trained_wraps_each_run_of_trained_tokens():
    tok = _Chars()
    ids = _ids("Q:hi A:yo!")
    labels = [-100] * 7 + ids[7:]
    assert mark_trained(tok, ids, labels) == f"Q:hi A:{TRAIN_OPEN}yo!{TRAIN_CLOSE}"
    # Several runs, one starting the sample; a label of 0 is a trained token too.
    ids = _ids("xyzw")
    labels = [0, 5, -100, 9]
    assert mark_trained(tok, ids, labels) == f"{TRAIN_OPEN}xy{TRAIN_CLOSE}z{TRAIN_OPEN}w{TRAIN_CLOSE}"
    assert mark_trained(tok, ids, labels, color=True) == f"{GREEN}xy{RESET}z{GREEN}w{RESET}"
    assert mark_trained(tok, ids, [-100] * 4) == "xyzw"
    assert mark_trained(tok, [], []) == ""


def test_mark_trained_with_a_real_tokenizer_decodes_the_whole_sample(chatml_tok):
    text = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n"
    ids = chatml_tok(text, add_special_tokens=False)["input_ids"]
    reply = chatml_tok("Hi there<|im_end|>", add_special_tokens=False)["input_ids"]
    start = len(ids) - len(reply) - 1  # the reply and its end marker, not the newline
    assert ids[start:-1] == reply
    labels = [-100] * start + ids[start:-1] + [-100]
    out = mark_trained(chatml_tok, ids, labels)
    assert out == ("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
                   f"{TRAIN_OPEN}Hi there<|im_end|>{TRAIN_CLOSE}\n")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model):
    return build_prepared(str(tmp_path_factory.mktemp("inspect") / "prepared"), tiny_model,
                          n_train=4, n_val=2, shards=1)


def test_inspect_prints_the_summary_and_marked_samples(prepared, capsys):
    assert inspect_cmd(Namespace(dir=prepared, tokenizer=None, split="val", num_samples=5)) == 0
    out = capsys.readouterr().out
    rows = read_rows(prepared, "val")
    assert out.startswith("prepared dataset  hash toy-0-4-2-64-Fal ")
    heads = [line for line in out.split("\n") if line.startswith("--- val sample")]
    assert len(heads) == 2  # five asked for, the split has two
    for i, row in enumerate(rows):
        trained = sum(1 for lab in row["labels"] if lab != -100)
        assert heads[i] == (f"--- val sample {i}: id {row['id']}  source toy  "
                            f"{len(row['input_ids'])} tokens, {trained} trained "
                            f"(inside {TRAIN_OPEN} {TRAIN_CLOSE})")
    samples = [line for line in out.split("\n") if TRAIN_OPEN in line and line not in heads]
    assert len(samples) == 2 and all(s.count(TRAIN_OPEN) == 1 for s in samples)  # one reply each


def test_inspect_of_a_missing_directory_exits_2_naming_it(tmp_path, capsys):
    missing = str(tmp_path / "none")
    assert inspect_cmd(Namespace(dir=missing, tokenizer=None, split="train",
                                 num_samples=1)) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"ift data inspect: prepared dataset {missing} does not exist; "
                           "run `ift data prepare`")
