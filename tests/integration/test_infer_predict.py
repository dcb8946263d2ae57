"""`ift predict`: Ray Data batch generation in input order, resumable by shard."""

from __future__ import annotations

import json
import os

import pytest
from train_support import random_lora_adapter

pytestmark = pytest.mark.timeout(600)


def make_adapter(base: str, out: str, seed: int, r: int = 4) -> str:
    return random_lora_adapter(base, out, seed, r, target_modules=("q_proj", "v_proj"))


QUESTIONS = [f"Question number {i}: what is {i} plus {i}?" for i in range(10)]


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory):
    """A prepared dataset dir in the documented layout, tokenized with the tiny model."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ift.data.templates import render_prompt
    from ift.models import load_tokenizer, tokenizer_identity

    tok = load_tokenizer(tiny_model)
    out = tmp_path_factory.mktemp("prepared")
    rows = []
    for i, q in enumerate(QUESTIONS):
        prompt = tok(render_prompt([{"role": "user", "content": q}], tok),
                     add_special_tokens=False)["input_ids"]
        reply = tok(f"It is {2 * i}.<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append({"id": f"row-{i:02d}", "source": "arith", "input_ids": prompt + reply,
                     "labels": [-100] * len(prompt) + reply,
                     "num_tokens": len(prompt) + len(reply), "num_trainable": len(reply)})
    os.makedirs(out / "val")
    pq.write_table(pa.Table.from_pylist(rows), out / "val" / "part-00000.parquet")
    manifest = {"version": 1, "hash": "test", "tokenizer": tokenizer_identity(tok),
                "template": "chatml", "max_seq_len": 512, "packed": False,
                "splits": {"val": {"rows": len(rows)}}, "sources": {"arith": {}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "_COMPLETE").write_text("")
    return str(out)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_predict_prepared_val_split_in_order_and_resumable(ray_cluster, tiny_model, prepared,
                                                           tmp_path):
    from ift.config import build_config
    from ift.infer.predict import SHARDS, predict
    from ift.serve.engine import Engine
    from ift.serve.sampling import SamplingParams

    out = tmp_path / "pred"
    cfg = build_config({"predict": {"data": prepared, "output": str(out), "model": tiny_model,
                                    "max_tokens": 6, "batch_size": 3, "shard_rows": 4}})
    summary = predict(cfg)
    assert (summary["rows"], summary["shards"], summary["shards_run"]) == (10, 3, 3)
    rows = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == [f"row-{i:02d}" for i in range(10)]
    assert rows[3]["reference"] == "It is 6."
    assert all(QUESTIONS[i] in rows[i]["input"] for i in range(10))
    # Each output is the greedy continuation of its own prompt.
    eng = Engine(tiny_model)
    try:
        for i in (0, 7):
            ids = eng.chat_prompt_ids([{"role": "user", "content": QUESTIONS[i]}])
            want = eng.generate(ids, SamplingParams(max_tokens=6, temperature=0.0))
            assert rows[i]["output"] == want["text"]
            assert rows[i]["prompt_tokens"] == len(ids)
    finally:
        eng.shutdown()

    # Resume: only the missing shard runs again; finished shards are not rewritten.
    shard_dir = out / SHARDS
    kept = {n: os.stat(shard_dir / n).st_mtime_ns for n in os.listdir(shard_dir)}
    os.remove(shard_dir / "shard-00001.jsonl")
    again = predict(cfg)
    assert again["shards_run"] == 1
    for n in ("shard-00000.jsonl", "shard-00002.jsonl"):
        assert os.stat(shard_dir / n).st_mtime_ns == kept[n]
    assert read_jsonl(out / "predictions.jsonl") == rows
    assert predict(cfg)["shards_run"] == 0


def test_predict_raw_files_with_an_adapter(ray_cluster, tiny_model, sample_data_dir, tmp_path):
    from ift.config import build_config
    from ift.infer.predict import predict

    adapter = make_adapter(tiny_model, str(tmp_path / "adapter"), seed=9)
    src = str(sample_data_dir / "alpaca_en.json")
    base_cfg = {"data": src, "model": tiny_model, "max_tokens": 5, "batch_size": 4,
                "shard_rows": 3, "max_rows": 5}
    plain = predict(build_config({"predict": {**base_cfg, "output": str(tmp_path / "p")}}))
    tuned = predict(build_config({"predict": {**base_cfg, "output": str(tmp_path / "t"),
                                              "adapter": adapter}}))
    assert plain["rows"] == tuned["rows"] == 5
    a = read_jsonl(tmp_path / "p" / "predictions.jsonl")
    b = read_jsonl(tmp_path / "t" / "predictions.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] == sorted(
        [r["id"] for r in a], key=lambda s: int(s.rsplit(":", 1)[1]))
    assert all(r["input"][-1]["role"] == "user" and r["reference"] for r in a)
    assert [r["output"] for r in a] != [r["output"] for r in b]  # the adapter is applied


def test_predict_cli_rejects_missing_data(tmp_path):
    from ift.cli import main

    assert main(["predict", f"predict.output={tmp_path}", "predict.model=x"]) == 2
