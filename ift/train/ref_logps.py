"""DPO reference log-probs computed once per dataset (`train.precompute_ref_logps: true`).

DPO's reference model is frozen, so the summed reply log-probs it gives each pair depend
only on the prepared dataset, the base model (and its load dtype) and the reference
adapter (`model.adapter`, or none: the base itself). One Ray task computes them for the
train and val splits before the training workers start and stores them beside the
prepared data, under a key of those three:

    <prepared>/ref_logps/<key>/train.parquet, val.parquet   id, ref_chosen_logp,
                                                            ref_rejected_logp
    <prepared>/ref_logps/<key>/done.json                    what the key was made of
                                                            (written last)

A later run with the same key reuses them. The training rows then carry the two values,
`collate_pairs` stacks them into the batch's `ref_logps` (chosen first, like the
sequences) and the DPO loss takes them instead of running the reference model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ift import storage
from ift.artifacts import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MODEL_CONFIG,
    REF_LOGPS_DIR,
    REF_LOGPS_DONE,
)
from ift.config import ModelConfig, TrainConfig
from ift.data.dataset import iter_split_rows
from ift.models import load_model, load_tokenizer
from ift.train.collate import model_inputs

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
SPLITS = ("train", "val")


def _dir_identity(path: str) -> dict[str, Any]:
    """Path, config and weight file sizes of a model or adapter dir (local), or the path."""
    out: dict[str, Any] = {"path": path}
    if storage.is_remote(path) or not os.path.isdir(path):
        return out
    for name in (MODEL_CONFIG, ADAPTER_CONFIG):
        f = os.path.join(path, name)
        if os.path.exists(f):
            out[name] = hashlib.sha256(open(f, "rb").read()).hexdigest()
    out["weights"] = sorted(
        (n, os.path.getsize(os.path.join(path, n))) for n in os.listdir(path)
        if n.endswith((".safetensors", ".bin")))
    adapter = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.exists(adapter):  # adapters are small: hash their weights
        out["adapter_sha256"] = hashlib.sha256(open(adapter, "rb").read()).hexdigest()
    return out


def cache_key(model: ModelConfig, data_hash: str, dtype: str) -> tuple[str, dict[str, Any]]:
    """(key, what it is made of): dataset hash, base model, load dtype, reference adapter."""
    parts = {"data_hash": data_hash, "base_model": _dir_identity(model.name_or_path),
             "dtype": dtype,
             "reference_adapter": _dir_identity(model.adapter) if model.adapter else None}
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16], parts


def cache_dir(prepared: str, key: str) -> str:
    return storage.join(prepared, REF_LOGPS_DIR, key)


def reference_logps(model, rows: Sequence[dict[str, Any]], pad_id: int, batch_size: int,
                    device: str = "cpu") -> np.ndarray:
    """[len(rows), 2] summed reply log-probs (chosen, rejected) of a frozen model."""
    # cycle: ift.train.preference imports this module
    from ift.train.preference import _forward_logps, collate_pairs

    attn = getattr(model.config, "_attn_implementation", None)
    out = np.zeros((len(rows), 2), dtype=np.float32)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            inputs = model_inputs(collate_pairs(chunk, pad_id), attn_implementation=attn,
                                  device=device)
            labels = inputs.pop("labels")
            logps = _forward_logps(model, inputs, labels).cpu().numpy()
            b = len(chunk)
            out[i:i + b, 0], out[i:i + b, 1] = logps[:b], logps[b:]
    return out


def _read_split(prepared: str, split: str) -> list[dict[str, Any]]:
    return list(iter_split_rows(prepared, split, ["id", "input_ids", "labels",
                                                  "rejected_input_ids", "rejected_labels"]))


def compute_and_store(model_cfg: ModelConfig, train: TrainConfig, prepared: str, out: str,
                      parts: dict[str, Any], dtype: str, batch_size: int = 8
                      ) -> dict[str, Any]:
    """Load the reference model, score every pair of both splits, write `out`."""
    t0 = time.time()
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    device = "cuda" if train.use_gpu and torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(model_cfg.name_or_path,
                               trust_remote_code=model_cfg.trust_remote_code,
                               revision=model_cfg.revision)
    model = load_model(model_cfg, device=device, dtype=dtype)
    if model_cfg.adapter:
        from peft import PeftModel  # in the Ray task (see ift.train.methods)

        model = PeftModel.from_pretrained(model, storage.local_copy(model_cfg.adapter),
                                          is_trainable=False)
    counts = {}
    for split in SPLITS:
        rows = _read_split(prepared, split)
        if not rows:
            continue
        logps = reference_logps(model, rows, tokenizer.pad_token_id, batch_size, device)
        table = pa.table({"id": [r["id"] for r in rows],
                          REF_COLUMNS[0]: pa.array(logps[:, 0], pa.float32()),
                          REF_COLUMNS[1]: pa.array(logps[:, 1], pa.float32())})
        fs, inner = storage.arrow_fs(storage.join(out, f"{split}.parquet"))
        if not storage.is_remote(out):
            os.makedirs(out, exist_ok=True)
        pq.write_table(table, inner, filesystem=fs)
        counts[split] = len(rows)
    record = {**parts, "pairs": counts, "seconds": round(time.time() - t0, 2)}
    storage.write_text(storage.join(out, REF_LOGPS_DONE), json.dumps(record, indent=2))
    return record


def precompute(model: ModelConfig, train: TrainConfig, prepared: str, data_hash: str,
               dtype: str) -> str:
    """The cache dir of this run's reference log-probs, computed in one Ray task first
    when absent. Prints what it did."""
    key, parts = cache_key(model, data_hash, dtype)
    out = cache_dir(prepared, key)
    if storage.exists(storage.join(out, REF_LOGPS_DONE)):
        print(f"[ift train] reference log-probs: reusing {out}", flush=True)
        return out
    import ray  # ift.train.loop imports this module and loads without Ray

    task = ray.remote(num_cpus=max(1, int(train.cpus_per_worker)),
                      num_gpus=1 if train.use_gpu else 0)(compute_and_store)
    record = ray.get(task.remote(model, train, prepared, out, parts, dtype))
    print(f"[ift train] reference log-probs of {record['pairs']} pairs computed in "
          f"{record['seconds']}s -> {out}", flush=True)
    return out


def lookup(out: str, split: str) -> dict[str, tuple[float, float]]:
    """id -> (chosen, rejected) reference log-probs of a split ({} when it has none)."""
    path = storage.join(out, f"{split}.parquet")
    if not storage.exists(path):
        return {}
    fs, inner = storage.arrow_fs(path)
    t = pq.read_table(inner, filesystem=fs).to_pydict()
    return {i: (c, r) for i, c, r in zip(t["id"], t[REF_COLUMNS[0]], t[REF_COLUMNS[1]])}


def attach(batch: dict[str, Any], table: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """A Ray Data batch (numpy columns) with the reference columns added by id."""
    vals = np.array([table[str(i)] for i in batch["id"]], dtype=np.float32).reshape(-1, 2)
    batch[REF_COLUMNS[0]], batch[REF_COLUMNS[1]] = vals[:, 0], vals[:, 1]
    return batch
