"""ift.models against an S3-compatible server: tokenizer data, tiny model output, loading."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ift import models, storage
from ift.config import ModelConfig


def test_tiny_model_round_trip_through_s3(s3_bucket, tmp_path):
    rows = [{"instruction": f"Question {i}: what is {i} + {i}?", "output": f"{i} + {i} = {2 * i}."}
            for i in range(30)]
    rows += [{"instruction": "翻译：你好，世界。", "output": "Hello, world."}] * 5
    storage.write_text(f"{s3_bucket}/src/a.jsonl",
                       "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["parquet text on s3 光合作用"]}), buf)
    storage.write_bytes(f"{s3_bucket}/src/b.parquet", buf.getvalue())

    texts = list(models.iter_texts([f"{s3_bucket}/src"]))
    assert "parquet text on s3 光合作用" in texts
    assert "Question 3: what is 3 + 3?" in texts
    assert len(texts) == 2 * len(rows) + 1

    out = f"{s3_bucket}/models/tiny"
    models.init_tiny(out, arch="llama", data=[f"{s3_bucket}/src"], vocab_size=512,
                     hidden_size=32, seed=1)
    names = storage.listdir(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "ift_tiny.json"):
        assert name in names
    meta = json.loads(storage.read_text(f"{out}/ift_tiny.json"))
    assert meta["data"] == [f"{s3_bucket}/src"]

    tok = models.load_tokenizer(out)
    assert tok.decode(tok.encode("翻译：你好，世界。")) == "翻译：你好，世界。"
    assert models.tokenizer_identity(tok)["sha256"] == meta["tokenizer_sha256"]
    model = models.load_model(ModelConfig(name_or_path=out))
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("1 + 1 = 2.")])).logits
    assert logits.shape[-1] == len(tok)
