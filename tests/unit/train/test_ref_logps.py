"""The cache of precomputed DPO reference log-probs: what its key is made of, and reading
the stored values back into batches. (The values themselves are checked against the live
reference model in test_preference.py.)"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ift.config import load_config
from ift.train.ref_logps import REF_COLUMNS, attach, cache_dir, cache_key, lookup


def _model_dir(path, config: str = '{"a": 1}', weights: bytes = b"x" * 10) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(weights)
    return str(path)


def _model(model: str, adapter: str = ""):
    over = [f"model.name_or_path={model}"]
    if adapter:
        over.append(f"model.adapter={adapter}")
    return load_config(None, over).model


def test_cache_key_is_made_of_data_base_model_dtype_and_adapter(tmp_path):
    model = _model_dir(tmp_path / "m")
    key, parts = cache_key(_model(model), "data1", "bf16")
    assert len(key) == 16 and int(key, 16) >= 0
    assert parts == {
        "data_hash": "data1", "dtype": "bf16", "reference_adapter": None,
        "base_model": {"path": model,
                       "config.json": hashlib.sha256(b'{"a": 1}').hexdigest(),
                       "weights": [("model.safetensors", 10)]},
    }
    assert cache_key(_model(model), "data1", "bf16")[0] == key  # stable
    assert cache_key(_model(model), "data2", "bf16")[0] != key
    assert cache_key(_model(model), "data1", "fp32")[0] != key
    # Files that are not config or weights do not matter; a config edit or resized weights do.
    (tmp_path / "m" / "README.md").write_text("notes")
    assert cache_key(_model(model), "data1", "bf16")[0] == key
    _model_dir(tmp_path / "m", weights=b"x" * 11)
    resized = cache_key(_model(model), "data1", "bf16")[0]
    _model_dir(tmp_path / "m", config='{"a": 2}')
    assert len({key, resized, cache_key(_model(model), "data1", "bf16")[0]}) == 3


def test_a_reference_adapter_is_known_by_its_weights_not_only_their_size(tmp_path):
    model = _model_dir(tmp_path / "m")
    adapter = tmp_path / "ad"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    key, parts = cache_key(_model(model, str(adapter)), "d", "fp32")
    ref = parts["reference_adapter"]
    assert ref["adapter_config.json"] == hashlib.sha256(b'{"r": 8}').hexdigest()
    assert ref["adapter_sha256"] == hashlib.sha256(b"\x00" * 16).hexdigest()
    assert ref["weights"] == [("adapter_model.safetensors", 16)]
    assert key != cache_key(_model(model), "d", "fp32")[0]
    (adapter / "adapter_model.safetensors").write_bytes(b"\x01" * 16)  # same size
    assert cache_key(_model(model, str(adapter)), "d", "fp32")[0] != key


def test_remote_or_hub_models_are_known_by_name(tmp_path):
    for name in ("s3://bucket/models/base", "org/some-model"):
        _key, parts = cache_key(_model(name), "d", "bf16")
        assert parts["base_model"] == {"path": name}
    assert cache_key(_model("org/a"), "d", "bf16")[0] != cache_key(_model("org/b"), "d", "bf16")[0]
    assert cache_dir("s3://b/prepared", "k1") == "s3://b/prepared/ref_logps/k1"


def _store(out, split: str, ids, chosen, rejected) -> None:
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.table({"id": ids, REF_COLUMNS[0]: pa.array(chosen, pa.float32()),
                             REF_COLUMNS[1]: pa.array(rejected, pa.float32())}),
                   os.path.join(out, f"{split}.parquet"))


def test_lookup_and_attach_put_each_rows_values_in_batch_order(tmp_path):
    out = str(tmp_path / "cache")
    _store(out, "train", ["a", "b", "c"], [-1.5, -2.0, -3.25], [-4.0, -5.5, -6.0])
    table = lookup(out, "train")
    assert table == {"a": (-1.5, -4.0), "b": (-2.0, -5.5), "c": (-3.25, -6.0)}
    assert lookup(out, "val") == {}  # a split without pairs
    batch = {"id": np.array(["c", "a"]), "input_ids": np.zeros((2, 3))}
    got = attach(batch, table)
    assert got is batch
    assert got[REF_COLUMNS[0]].dtype == np.float32
    assert got[REF_COLUMNS[0]].tolist() == [-3.25, -1.5]
    assert got[REF_COLUMNS[1]].tolist() == [-6.0, -4.0]
    with pytest.raises(KeyError):  # a row the cache does not know is not silently zero
        attach({"id": np.array(["zzz"])}, table)
