"""Benchmark: `ift data prepare` (Ray Data) against a Hugging Face `datasets` baseline.

For each size (default 100k and 1M rows) the harness writes synthetic Alpaca JSONL rows into
several files, then runs each arm in a fresh subprocess while sampling the summed RSS of
that process tree every 0.2 s (the driver, and for ift the Ray processes it starts):

* ift       `ift.data.pipeline.prepare(cfg)`: read, convert, validate, dedupe, split,
            render ChatML, tokenize + mask, write parquet shards and a manifest.
* baseline  `datasets.Dataset.from_json(files).map(convert_and_tokenize, batched=True,
            num_proc=2)` doing the same conversion (ift.data.formats.convert, Alpaca ->
            messages) and ChatML rendering + tokenization + masking
            (ift.data.tokenize.tokenize_records), then `.to_parquet(...)`.
* tokenizer the ceiling: the Rust tokenizer's `encode_batch_fast` alone (its own threads) on
            each row's ChatML text, read and rendered before the clock starts.

Same rendering, tokenizer call and masks in both arms. The baseline's map function returns
Python lists, as a `datasets` map function does; ift's ingest builds its Arrow columns from
flat arrays (ift.data.tokenize.tokenize_arrays; a unit test checks that both give the same
rows) and runs with the cyclic garbage collector off while a task tokenizes.

Both arms use the same tokenizer (a tiny byte-level BPE trained on the generated rows with
ift.models.train_tokenizer), template (chatml) and max_seq_len. rows/s = rows read / wall
seconds of the measured call (in the subprocess, after imports). Results go to
bench/results/data_prepare.json; targets: ift rows/s >= 2 x baseline at the largest size, and
ift peak RSS at the largest size <= 1.5 x that at the smallest.

    python bench/data_prepare.py                      # 100k and 1M rows
    python bench/data_prepare.py --quick              # 2k and 20k rows (smoke test)
    python bench/data_prepare.py --rows 50000 --arms baseline
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, format_table, run_measured, write_result  # noqa: E402

NAME = "data_prepare"
TEMPLATE = "chatml"
MAX_SEQ_LEN = 512
BASELINE_NUM_PROC = 2
SAMPLE_INTERVAL_S = 0.2
ROWS_PER_FILE = 125_000
TOKENIZER_ROWS = 20_000

# ---------------------------------------------------------------------------------------
# Synthetic Alpaca rows
# ---------------------------------------------------------------------------------------

_FILLER = "the a of to and in is it that for on with as was at by this from or be are an".split()
_NOUNS = ("river lantern meadow harbor compass orbit maple canyon falcon pebble anchor window "
          "garden bridge market engine signal planet forest valley station library kitchen "
          "number list word sentence answer question step reason result total value price "
          "distance weight minute hour day week meter kilogram liter dollar apple pencil book"
          ).split()
_VERBS = ("build measure compare explain describe convert reverse sort count divide multiply "
          "add subtract write read plan check travel share borrow return collect repair").split()
_ADJS = ("small large bright quiet heavy narrow gentle sharp early late green blue golden "
         "quickly slowly carefully often rarely always never almost nearly simply clearly").split()
_WORDS = _FILLER * 3 + _NOUNS + _VERBS + _ADJS
_TASKS = (
    "Summarize note {i} about the {a} and the {b}.",
    "Explain why the {a} is {c} in example {i}.",
    "Write two sentences about the {a} near the {b} (draft {i}).",
    "List the steps to {v} the {a}, case {i}.",
    "Convert {x} {u} to smaller units for record {i}.",
    "Describe the {c} {a} from report {i}.",
)
_UNITS = ("meters", "kilograms", "liters", "hours", "days", "dollars")


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = rng.choices(_WORDS, k=rng.randint(lo, hi))
    return " ".join(words).capitalize() + "."


def alpaca_row(rng: random.Random, i: int) -> dict:
    """One unique Alpaca row (the index is in the instruction, so dedupe keeps all)."""
    instruction = rng.choice(_TASKS).format(
        i=i, a=rng.choice(_NOUNS), b=rng.choice(_NOUNS), c=rng.choice(_ADJS),
        v=rng.choice(_VERBS), x=rng.randint(2, 999), u=rng.choice(_UNITS))
    inp = _sentence(rng, 8, 30) if rng.random() < 0.4 else ""
    output = " ".join(_sentence(rng, 6, 24) for _ in range(rng.randint(1, 6)))
    return {"instruction": instruction, "input": inp, "output": output}


def write_rows(out_dir: str, rows: int, seed: int = 0) -> list[str]:
    """`rows` Alpaca JSONL rows over ceil(rows / 125k) files (at least 2)."""
    os.makedirs(out_dir, exist_ok=True)
    n_files = max(2, -(-rows // ROWS_PER_FILE))
    rng = random.Random(seed)
    paths = []
    start = 0
    for f in range(n_files):
        count = rows // n_files + (1 if f < rows % n_files else 0)
        path = os.path.join(out_dir, f"part-{f:03d}.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(alpaca_row(rng, i), ensure_ascii=False) + "\n"
                          for i in range(start, start + count))
        start += count
        paths.append(path)
    return paths


def build_tokenizer(files: list[str], out_dir: str) -> str:
    """A tiny BPE tokenizer trained on the first rows of the data."""
    from ift.models import train_tokenizer

    def texts():
        n = 0
        for path in files:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    yield from (v for v in json.loads(line).values() if v)
                    n += 1
                    if n >= TOKENIZER_ROWS:
                        return

    tok = train_tokenizer(texts(), vocab_size=2048)
    tok.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------
# The two arms (each runs in its own subprocess: `--worker ARM`)
# ---------------------------------------------------------------------------------------


def run_ift(data_dir: str, tokenizer: str, work: str) -> dict:
    from ift.config import build_config
    from ift.data.pipeline import prepare

    cfg = build_config({
        "data": {
            "sources": [{"path": data_dir, "name": "bench", "format": "alpaca"}],
            "tokenizer": tokenizer,
            "output": os.path.join(work, "prepared"),
            "template": TEMPLATE,
            "max_seq_len": MAX_SEQ_LEN,
        },
        "storage": {"root": work},
    })
    t0 = time.perf_counter()
    manifest = prepare(cfg)
    wall = time.perf_counter() - t0
    src = manifest["sources"]["bench"]
    splits = manifest["splits"]
    import ray

    ray.shutdown()
    return {
        "rows_read": src["rows_read"],
        "rows_written": splits["train"]["rows"] + splits["val"]["rows"],
        "rows_rejected": src["rows_rejected"],
        "rows_duplicate": src["rows_duplicate"],
        "wall_s": wall,
    }


_TOKENIZER: dict = {}


def convert_and_tokenize(batch: dict, indices: list[int], tokenizer_path: str) -> dict:
    """Alpaca batch -> records -> ChatML segments -> input_ids and masked labels."""
    from ift.data.formats import convert
    from ift.data.record import ConvertError
    from ift.data.tokenize import tokenize_records
    from ift.models import load_tokenizer

    if tokenizer_path not in _TOKENIZER:
        _TOKENIZER[tokenizer_path] = load_tokenizer(tokenizer_path)
    tok = _TOKENIZER[tokenizer_path]
    names = list(batch)
    records = []
    for j, idx in enumerate(indices):
        raw = {k: batch[k][j] for k in names}
        try:
            records.append(convert("alpaca", raw, id=str(idx), source="bench"))
        except ConvertError:
            continue
    rows, _ = tokenize_records(records, tok, template=TEMPLATE, max_seq_len=MAX_SEQ_LEN)
    return {
        "id": [r["id"] for r in rows],
        "input_ids": [r["input_ids"] for r in rows],
        "labels": [r["labels"] for r in rows],
        "num_tokens": [r["num_tokens"] for r in rows],
    }


def run_baseline(data_dir: str, tokenizer: str, work: str) -> dict:
    # A cache inside the run's work dir: nothing reused between runs, nothing left behind.
    os.environ["HF_DATASETS_CACHE"] = os.path.join(work, "hf-cache")
    from datasets import Dataset

    files = sorted(glob.glob(os.path.join(data_dir, "*.jsonl")))
    t0 = time.perf_counter()
    ds = Dataset.from_json(files)
    rows_read = len(ds)
    out = ds.map(convert_and_tokenize, batched=True, with_indices=True,
                 num_proc=BASELINE_NUM_PROC, remove_columns=ds.column_names,
                 fn_kwargs={"tokenizer_path": tokenizer})
    out.to_parquet(os.path.join(work, "baseline.parquet"))
    wall = time.perf_counter() - t0
    return {"rows_read": rows_read, "rows_written": len(out), "wall_s": wall}


TOKENIZER_CHUNK = 8192


def run_tokenizer(data_dir: str, tokenizer: str, work: str) -> dict:
    """The ceiling: the Rust tokenizer's encode_batch_fast alone (ids without offsets, its
    own threads, both cores) on each row's whole text as ift renders it. Reading,
    converting and rendering happen before the clock starts."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from ift.data.formats import convert
    from ift.models import load_tokenizer

    tok = load_tokenizer(tokenizer)
    backend = tok.backend_tokenizer
    records = []
    for path in sorted(glob.glob(os.path.join(data_dir, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            records.extend(convert("alpaca", json.loads(line), id=str(i), source="bench")
                           for i, line in enumerate(f))
    texts = rendered_texts(records, tok)
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), TOKENIZER_CHUNK):
        enc = backend.encode_batch_fast(texts[i:i + TOKENIZER_CHUNK], add_special_tokens=False)
        tokens += sum(len(e.ids) for e in enc)
    wall = time.perf_counter() - t0
    return {"rows_read": len(texts), "rows_written": len(texts), "tokens": tokens,
            "wall_s": wall}


def rendered_texts(records: list[dict], tokenizer) -> list[str]:
    """Each record's whole text as ift renders it (ift.data.templates.render_segments)."""
    from ift.data.templates import render_segments

    return ["".join(text for text, _ in render_segments(r, TEMPLATE, tokenizer))
            for r in records]


ARMS = {"ift": run_ift, "baseline": run_baseline, "tokenizer": run_tokenizer}


def worker_main(args: argparse.Namespace) -> int:
    fn = ARMS[args.worker]
    result = fn(args.data, args.tokenizer, args.work)
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")
    return 0


# ---------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------


def measure(arm: str, data_dir: str, tokenizer: str, scratch: str, timeout: float) -> dict:
    """One arm on one data set in a fresh subprocess; wall time, rows and peak tree RSS."""
    work = tempfile.mkdtemp(prefix=f"{arm}-", dir=scratch)
    result_file = os.path.join(work, "result.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--data", data_dir,
           "--tokenizer", tokenizer, "--work", work, "--result", result_file]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    proc = run_measured(cmd, env=env, cwd=str(REPO), timeout=timeout,
                        log_path=os.path.join(scratch, f"{arm}-{os.path.basename(data_dir)}.log"),
                        interval=SAMPLE_INTERVAL_S)
    out: dict = {"arm": arm, "returncode": proc["returncode"],
                 "process_wall_s": proc["wall_s"], "peak_rss_mb": proc["peak_rss_mb"]}
    if proc["returncode"] == 0 and os.path.exists(result_file):
        res = json.loads(Path(result_file).read_text(encoding="utf-8"))
        out.update(res)
        out["wall_s"] = round(res["wall_s"], 2)
        out["rows_per_s"] = round(res["rows_read"] / res["wall_s"], 1) if res["wall_s"] else None
    else:
        out["error"] = proc["log_tail"][-2000:]
    shutil.rmtree(work, ignore_errors=True)
    return out


def summarize(sizes: dict[int, dict[str, dict]]) -> dict:
    rows = sorted(sizes)
    big, small = rows[-1], rows[0]
    ift_big, base_big = sizes[big].get("ift", {}), sizes[big].get("baseline", {})
    ceiling = sizes[big].get("tokenizer", {})
    ratio = ceiling_fraction = None
    if ift_big.get("rows_per_s") and base_big.get("rows_per_s"):
        ratio = round(ift_big["rows_per_s"] / base_big["rows_per_s"], 3)
    if ift_big.get("rows_per_s") and ceiling.get("rows_per_s"):
        ceiling_fraction = round(ift_big["rows_per_s"] / ceiling["rows_per_s"], 3)
    growth = None
    if len(rows) > 1 and sizes[small].get("ift", {}).get("peak_rss_mb") and ift_big.get("peak_rss_mb"):
        growth = round(ift_big["peak_rss_mb"] / sizes[small]["ift"]["peak_rss_mb"], 3)
    return {
        "throughput_ratio_ift_over_baseline": {
            "rows": big, "value": ratio, "target": ">= 2.0",
            "met": None if ratio is None else ratio >= 2.0},
        "ift_fraction_of_tokenizer_ceiling": {"rows": big, "value": ceiling_fraction},
        "ift_peak_rss_ratio": {
            "rows": [big, small], "value": growth, "target": "<= 1.5",
            "met": None if growth is None else growth <= 1.5},
    }


def parse_rows(text: str) -> list[int]:
    try:
        rows = sorted({int(x.replace("_", "")) for x in text.split(",") if x.strip()})
    except ValueError as e:
        raise SystemExit(f"--rows {text!r}: expected comma-separated integers ({e})") from e
    if not rows or rows[0] < 1:
        raise SystemExit(f"--rows {text!r}: sizes must be >= 1")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="100000,1000000", help="comma-separated sizes")
    p.add_argument("--quick", action="store_true", help="2k and 20k rows (smoke test)")
    p.add_argument("--arms", default="ift,baseline,tokenizer",
                   help="comma-separated: ift, baseline, tokenizer (the encode_batch ceiling)")
    p.add_argument("--scratch", help="folder for data and outputs (default: a temp dir, removed)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--out", help="results folder (default bench/results)")
    p.add_argument("--worker", choices=list(ARMS), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)

    sizes = parse_rows("2000,20000" if args.quick else args.rows)
    arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise SystemExit(f"--arms {args.arms!r}: allowed {', '.join(ARMS)}")
    scratch = args.scratch or tempfile.mkdtemp(prefix="ift-bench-data-")
    os.makedirs(scratch, exist_ok=True)
    try:
        data_dirs = {}
        for n in sizes:
            t0 = time.perf_counter()
            data_dirs[n] = os.path.join(scratch, f"rows-{n}")
            files = write_rows(data_dirs[n], n)
            mb = sum(os.path.getsize(f) for f in files) / 2**20
            print(f"wrote {n} rows ({len(files)} files, {mb:.1f} MB) in "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
        tokenizer = build_tokenizer(sorted(glob.glob(os.path.join(data_dirs[sizes[0]], "*.jsonl"))),
                                    os.path.join(scratch, "tokenizer"))
        results: dict[int, dict[str, dict]] = {}
        for n in sizes:
            results[n] = {}
            for arm in arms:
                print(f"[{n} rows] {arm} ...", flush=True)
                r = measure(arm, data_dirs[n], tokenizer, scratch, args.timeout)
                results[n][arm] = r
                if r["returncode"] != 0:
                    print(f"[{n} rows] {arm} FAILED (rc {r['returncode']}):\n{r.get('error', '')}",
                          flush=True)
                else:
                    print(f"[{n} rows] {arm}: {r['wall_s']} s, {r['rows_per_s']} rows/s, "
                          f"peak RSS {r['peak_rss_mb']} MB", flush=True)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    summary = summarize(results)
    doc = {
        "settings": {
            "rows": sizes, "quick": args.quick, "arms": arms, "template": TEMPLATE,
            "max_seq_len": MAX_SEQ_LEN,
            "baseline_num_proc": BASELINE_NUM_PROC, "rss_sample_interval_s": SAMPLE_INTERVAL_S,
            "rows_per_file": ROWS_PER_FILE, "tokenizer": "byte-level BPE, vocab 2048",
        },
        "sizes": {str(n): results[n] for n in sizes},
        **summary,
    }
    path = write_result(NAME, doc, args.out)
    table = [
        {"rows": n, "arm": arm, **{k: r.get(k) for k in
                                   ("wall_s", "rows_per_s", "peak_rss_mb", "rows_written")}}
        for n in sizes for arm, r in results[n].items()
    ]
    print(format_table(table, ["rows", "arm", "wall_s", "rows_per_s", "peak_rss_mb",
                               "rows_written"]))
    t, g = summary["throughput_ratio_ift_over_baseline"], summary["ift_peak_rss_ratio"]
    print(f"rows/s ift/baseline at {t['rows']} rows: {t['value']} (target {t['target']})")
    c = summary["ift_fraction_of_tokenizer_ceiling"]
    print(f"rows/s ift/tokenizer-only ceiling at {c['rows']} rows: {c['value']}")
    print(f"ift peak RSS {g['rows'][0]}/{g['rows'][1]} rows: {g['value']} (target {g['target']})")
    print(f"wrote {path}")
    failed = [(n, a) for n in sizes for a, r in results[n].items() if r["returncode"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
