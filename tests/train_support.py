"""Helpers for the training tests: tiny models and prepared dataset directories built
directly (tokenized with ift.data.tokenize, packed with ift.data.pack, written with
pyarrow), so the trainer's tests do not depend on the Ray Data preparation pipeline."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq

from ift import storage
from ift.data.pack import pack
from ift.data.record import make_record
from ift.data.tokenize import tokenize_records
from ift.models import init_tiny, load_tokenizer, tokenizer_identity

COLUMNS = ("id", "source", "input_ids", "labels", "num_tokens", "num_trainable",
           "position_ids", "seq_ids", "num_samples")
WORDS = ["red", "blue", "green", "small", "large", "cat", "dog", "bird", "tree", "river"]


def make_tiny_model(out_dir: str, arch: str = "llama", hidden_size: int = 32, layers: int = 2,
                    heads: int = 4, max_positions: int = 128, vocab_size: int = 512) -> str:
    """A tiny random-init model with a tokenizer trained on ift's built-in texts."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    return init_tiny(out_dir, arch=arch, vocab_size=vocab_size, hidden_size=hidden_size,
                     layers=layers, heads=heads, max_positions=max_positions, seed=0,
                     data=None)


def toy_records(n: int, seed: int = 0, prefix: str = "toy") -> list[dict]:
    """Conversations with a learnable pattern: the reply repeats the words asked for."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        q = "Repeat: " + " ".join(words)
        a = " ".join(words) + "."
        out.append(make_record(id=f"{prefix}-{i}", source="toy",
                               messages=[{"role": "user", "content": q},
                                         {"role": "assistant", "content": a}]))
    return out


def _write_split(out: str, split: str, rows: list[dict], shards: int) -> None:
    d = os.path.join(out, split)
    os.makedirs(d, exist_ok=True)
    if not rows:
        return
    per = -(-len(rows) // shards)
    for s in range(shards):
        chunk = rows[s * per:(s + 1) * per]
        if not chunk:
            continue
        cols = {k: [r[k] for r in chunk] for k in COLUMNS if k in chunk[0]}
        types = {k: (pa.list_(pa.int32()) if k in ("input_ids", "labels", "position_ids",
                                                     "seq_ids")
                     else pa.int32() if k in ("num_tokens", "num_trainable", "num_samples")
                     else pa.string())
                 for k in cols}
        table = pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})
        pq.write_table(table, os.path.join(d, f"part-{s:05d}.parquet"))


def _stats(rows: list[dict]) -> dict:
    lens = sorted(r["num_tokens"] for r in rows) or [0]
    return {
        "rows": len(rows),
        "samples": sum(r.get("num_samples", 1) for r in rows),
        "tokens": sum(r["num_tokens"] for r in rows),
        "trainable_tokens": sum(r["num_trainable"] for r in rows),
        "length": {"mean": sum(lens) / len(lens), "p50": lens[len(lens) // 2],
                   "p95": lens[int(0.95 * (len(lens) - 1))], "max": lens[-1]},
    }


def build_prepared(out: str, model_dir: str, *, n_train: int = 48, n_val: int = 8,
                   max_seq_len: int = 64, packed: bool = False, shards: int = 2,
                   seed: int = 0, complete: bool = True) -> str:
    """A prepared dataset directory following the documented contract."""
    tok = load_tokenizer(model_dir)
    split_rows = {}
    for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1000)):
        rows, dropped = tokenize_records(toy_records(n, s, prefix=split), tok,
                                         template="chatml", max_seq_len=max_seq_len)
        assert not dropped, dropped
        for r in rows:
            r["source"] = "toy"
        if packed:
            bins = pack(rows, max_seq_len)
            for i, b in enumerate(bins):
                b["id"] = f"{split}-bin-{i}"
                b["source"] = "toy"
            rows = bins
        split_rows[split] = rows
    os.makedirs(out, exist_ok=True)
    for split, rows in split_rows.items():
        _write_split(out, split, rows, shards)
    manifest = {
        "version": 1,
        "hash": f"toy-{seed}-{n_train}-{n_val}-{max_seq_len}-{packed}",
        "tokenizer": tokenizer_identity(tok),
        "template": "chatml",
        "max_seq_len": max_seq_len,
        "packed": packed,
        "splits": {k: _stats(v) for k, v in split_rows.items()},
        "sources": {"toy": {"path": "toy", "files": [], "format": "openai", "tags": [],
                            "rows_read": n_train + n_val, "rows_kept": n_train + n_val,
                            "rows_rejected": 0, "rows_duplicate": 0, "rows_dropped": 0,
                            "rows_sampled": n_train, "weight": None, "count": None}},
        "padding_waste": {"unpacked": 0.0, "packed": None},
        "config": {},
    }
    storage.write_text(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=2))
    if complete:
        storage.mark_complete(out)
    return out


def read_rows(prepared: str, split: str = "train") -> list[dict]:
    """The rows of a split in file order (what the trainer streams)."""
    files = sorted(f for f in os.listdir(os.path.join(prepared, split)) if f.endswith(".parquet"))
    rows = []
    for f in files:
        rows.extend(pq.read_table(os.path.join(prepared, split, f)).to_pylist())
    return rows


def prepare_sample(sample_dir, model_dir: str, out: str, max_seq_len: int = 64) -> str:
    """The bundled sample data prepared by `ift data prepare` (Ray Data) for model_dir;
    an existing up-to-date output is reused, so several test modules share one."""
    from ift.config import load_config
    from ift.data.pipeline import prepare

    overrides = [f"model.name_or_path={model_dir}", f"data.output={out}",
                 f"data.max_seq_len={max_seq_len}", "data.val_ratio=0.1",
                 "data.placeholders.name=ift", "data.placeholders.author=the ift authors",
                 "tracking.enabled=false"]
    # The chain-of-thought file is left out: its prompts alone exceed 64 tokens, so every
    # row would be dropped at this length.
    files = sorted(p for p in os.listdir(sample_dir)
                   if p.endswith((".json", ".jsonl", ".tsv"))
                   and not p.startswith(("cot_", "pref_")))
    for i, name in enumerate(files):
        overrides.append(f"data.sources.{i}.path={os.path.join(str(sample_dir), name)}")
    prepare(load_config(None, overrides))
    return out


def random_lora_adapter(base: str, out: str, seed: int, r: int = 4,
                        target_modules=("q_proj", "v_proj", "o_proj", "up_proj",
                                        "down_proj")) -> str:
    """A LoRA adapter whose B matrices are random (not zero), so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                            target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft.save_pretrained(out)
    return out


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch on n intra-op threads, then restore the count. A reference computed in the
    test process must use a server replica's thread count (serve sets it from
    `cpus_per_replica`): fp32 sums split over other thread counts can differ in the last
    bits, enough to flip a near-tie in a random model's greedy choice."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def served_text(tok, ids: list[int]) -> str:
    """What the server sends for the generated ids of a byte-level BPE tokenizer:
    transformers' decode, less the U+FFFD it writes for a character cut at the end (the
    reply stopped before its last byte), which the server drops rather than send."""
    text = tok.decode(ids, skip_special_tokens=True)
    alphabet = _byte_level_alphabet()
    special = set(tok.all_special_ids)
    tokens = tok.convert_ids_to_tokens([i for i in ids if i not in special])
    if not all(c in alphabet for t in tokens for c in t):
        return text  # not byte-level: no cut characters
    data = bytes(alphabet[c] for t in tokens for c in t)
    held = codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)
    if held != data.decode("utf-8", "replace") and text.endswith("\ufffd"):
        return text[:-1]
    return text
