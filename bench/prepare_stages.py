"""Where `ift data prepare`'s seconds go: one read task's ingest, stage by stage, in one
process on one core (no Ray), against the tokenizer alone.

Pass 1 of `ift data prepare` runs this per read task in a Ray Data worker (see
ift/data/pipeline.py `_ingest_udf`). Here the same functions run in order on one file of
synthetic Alpaca rows (bench/data_prepare.py's generator), each timed on its own:

  read      ift.data.readers.iter_raw: bytes -> JSON rows
  clean     ift.data.ingest.clean_rows minus `read`: convert, validate, detect language
  hash      conversation_hash + split_hash per record (dedupe and the val split)
  tokenize  ift.data.tokenize.tokenize_arrays: render the template, encode, mask
  tokenize+write  pipeline._tokenize_batch: `tokenize` again, then the Arrow columns,
            the val split, two parquet shards and the per-row meta table (the write alone
            is reported as the difference of the two medians)
  encode    the Rust tokenizer's encode_batch_fast alone on one thread, on the rendered texts
            of the same rows (the part of `tokenize` no Python wrapper can remove)

Each stage's rows/s is rows / its seconds; `ingest` is read + clean + hash +
tokenize+write, the rate one core sustains. Medians over --repeats, with min and max. Writes
bench/results/prepare_stages.json.

    python bench/prepare_stages.py                  # 50k rows, 3 repeats
    python bench/prepare_stages.py --rows 5000 --repeats 1
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from common import REPO, format_table, write_result  # noqa: E402

sys.path.insert(0, str(REPO))

import data_prepare  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402

from ift.data import pipeline  # noqa: E402
from ift.data.ingest import RowOptions, clean_rows  # noqa: E402
from ift.data.readers import ReadTask, iter_raw  # noqa: E402
from ift.data.record import conversation_hash, split_hash  # noqa: E402
from ift.data.tokenize import tokenize_arrays  # noqa: E402
from ift.models import load_tokenizer  # noqa: E402

NAME = "prepare_stages"
STAGES = ("read", "clean", "hash", "tokenize+write")
BATCH = 1024


def one_pass(path: str, tokenizer, out: str) -> dict[str, float]:
    """Every stage once over the file; seconds per stage."""
    task = ReadTask("bench", 0, path, 0, "alpaca", 0, os.path.getsize(path), 1)
    opts = RowOptions(seed=0, placeholders={}, columns={}, task="", system=None)
    tok = {"name": "", "template": data_prepare.TEMPLATE, "max_seq_len": data_prepare.MAX_SEQ_LEN,
           "train_on_prompt": False, "truncation": "right", "batch_size": BATCH,
           "val_ratio": 0.02}
    t: dict[str, float] = {}
    gc.disable()  # as pipeline._no_cyclic_gc does for a read task
    try:
        t0 = time.perf_counter()
        n_raw = sum(1 for _ in iter_raw(task))
        t["read"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        recs = [(key, rec) for key, _line, rec, _reason, _raw in clean_rows(task, opts) if rec]
        t["clean"] = time.perf_counter() - t0 - t["read"]

        t0 = time.perf_counter()
        pending = [(key, rec, conversation_hash(rec), split_hash(rec)) for key, rec in recs]
        t["hash"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for i in range(0, len(pending), BATCH):
            tokenize_arrays([r for _, r, _, _ in pending[i:i + BATCH]], tokenizer,
                            template=tok["template"], max_seq_len=tok["max_seq_len"])
        t["tokenize"] = time.perf_counter() - t0

        shards = pipeline._ShardWriter(pafs.LocalFileSystem(), out, 0, 1_000_000)
        t0 = time.perf_counter()
        for i in range(0, len(pending), BATCH):
            pipeline._tokenize_batch(0, pending[i:i + BATCH], [], tokenizer, tok, 0, shards)
        shards.close()
        t["tokenize+write"] = time.perf_counter() - t0

        texts = data_prepare.rendered_texts([r for _, r in recs], tokenizer)
        backend = tokenizer.backend_tokenizer
        t0 = time.perf_counter()
        for i in range(0, len(texts), BATCH):
            backend.encode_batch_fast(texts[i:i + BATCH], add_special_tokens=False)
        t["encode"] = time.perf_counter() - t0
    finally:
        gc.enable()
    t["rows"] = float(n_raw)
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="results folder (default bench/results)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ift-stages-") as scratch:
        files = data_prepare.write_rows(os.path.join(scratch, "rows"), args.rows)
        tok_dir = data_prepare.build_tokenizer(files, os.path.join(scratch, "tokenizer"))
        tokenizer = load_tokenizer(tok_dir)
        passes = []
        for r in range(args.repeats):
            passes.append(one_pass(files[0], tokenizer, os.path.join(scratch, f"out-{r}")))
            print(f"pass {r + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in passes[-1].items()
                                                if k != "rows"), flush=True)
    rows = passes[0]["rows"]
    stages = {}
    for k in (*STAGES, "tokenize", "encode"):
        secs = [p_[k] for p_ in passes]
        stages[k] = {"s_median": round(statistics.median(secs), 3),
                     "s_min": round(min(secs), 3), "s_max": round(max(secs), 3),
                     "rows_per_s": round(rows / statistics.median(secs), 1)}
    ingest = [sum(p_[k] for k in STAGES) for p_ in passes]
    total = statistics.median(ingest)
    for k in (*STAGES, "tokenize", "encode"):
        stages[k]["share"] = round(stages[k]["s_median"] / total, 3)
    write = stages["tokenize+write"]["s_median"] - stages["tokenize"]["s_median"]
    doc = {
        "settings": {"rows": rows, "repeats": args.repeats, "batch": BATCH,
                     "template": data_prepare.TEMPLATE, "max_seq_len": data_prepare.MAX_SEQ_LEN,
                     "threads": 1},
        "stages": stages,
        "write_s_estimate": round(write, 3),
        "ingest": {"s_median": round(total, 3), "s_min": round(min(ingest), 3),
                   "s_max": round(max(ingest), 3), "rows_per_s_one_core": round(rows / total, 1)},
    }
    path = write_result(NAME, doc, args.out)
    print(format_table([{"stage": k, **v} for k, v in stages.items()],
                       ["stage", "s_median", "s_min", "s_max", "rows_per_s", "share"]))
    print(f"ingest on one core: {doc['ingest']['rows_per_s_one_core']} rows/s "
          f"({total:.2f}s for {rows:.0f} rows); write alone about {write:.2f}s")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
