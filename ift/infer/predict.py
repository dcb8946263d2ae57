"""`ift predict`: batch generation over a dataset with Ray Data.

Input is a prepared dataset (its val split by default: prompts are the tokens before the
last assistant reply, which becomes the reference) or raw source files (any format
`ift data prepare` reads; the last assistant turn, when there is one, is the reference).
Rows are numbered in input order and cut into shards of `predict.shard_rows`; each shard is
written as one JSONL file when all its rows are done, and a re-run skips shards already on
disk. `predictions.jsonl` is the shards concatenated, so it keeps the input order, one line
per row: {id, input, output, reference, finish_reason, prompt_tokens, completion_tokens}.

Generation runs in an actor pool of `predict.num_actors` actors (default: every CPU but one,
so that reading blocks always has a CPU; on 2 CPUs that is one actor), each a decode
engine batching `predict.batch_size` rows.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ray

from ift import storage
from ift.config import Config, ConfigError, load_config
from ift.data import dataset
from ift.data.dataset import iter_samples
from ift.data.ingest import iter_raw_records
from ift.data.tokenize import split_last_turn
from ift.raycluster import init_ray
from ift.serve.sampling import SamplingParams

log = logging.getLogger(__name__)

SHARDS = "shards"
PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"


# ---------------------------------------------------------------------------------------
# Inputs (pure functions)
# ---------------------------------------------------------------------------------------


def prepared_items(prepared: str, split: str, max_rows: int = 0) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for sample in iter_samples(prepared, split, key="predict.data"):
        prompt, ref = split_last_turn(sample["input_ids"], sample["labels"])
        items.append({"id": sample["id"], "prompt_ids": prompt, "reference_ids": ref,
                      "messages": ""})
        if max_rows and len(items) >= max_rows:
            break
    return items


def record_prompt(record: dict[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    """(messages to answer, reference reply): the conversation up to its last assistant turn,
    which is the reference; a conversation that ends in a user turn is answered whole, with
    no reference."""
    msgs = [dict(m) for m in record["messages"]]
    if record.get("system") and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": record["system"]})
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None or msgs[-1]["role"] == "user":
        return msgs, None
    return msgs[:last], msgs[last]["content"]


def raw_items(data: str, max_rows: int = 0) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for where, rec in iter_raw_records(data, key="predict.data"):
        msgs, ref = record_prompt(rec)
        if not any(m["role"] == "user" for m in msgs):
            raise ConfigError(f"predict.data: {where}: no user turn to answer")
        items.append({"id": rec["id"], "prompt_ids": [], "reference_ids": [],
                      "messages": json.dumps(msgs, ensure_ascii=False), "reference": ref})
        if max_rows and len(items) >= max_rows:
            break
    return items


def load_items(data: str, split: str, max_rows: int = 0) -> list[dict[str, Any]]:
    """Rows to predict on, in input order, from a prepared dir or raw files."""
    if not data:
        raise ConfigError("predict.data is required (a prepared dataset dir or source files)")
    if dataset.is_prepared(data):
        return prepared_items(data, split, max_rows)
    return raw_items(data, max_rows)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.jsonl"


# ---------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------


class Predictor:
    """One generation actor: an engine over the model (and adapter) given."""

    def __init__(self, model: str, adapter: str, engine_args: dict[str, Any],
                 params: dict[str, Any]):
        from ift.serve.engine import Engine  # in the actors: the driver imports 1 s, not 7 s

        self.engine = Engine(model, **engine_args)
        self.adapter = None
        if adapter:
            self.engine.load_adapter("adapter", storage.local_copy(adapter)).result()
            self.adapter = "adapter"
        self.params = params

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        tok = self.engine.tokenizer
        n = len(batch["id"])
        jobs = []
        inputs = []
        for i in range(n):
            msgs = batch["messages"][i]
            if msgs:
                messages = json.loads(msgs)
                ids = self.engine.chat_prompt_ids(messages, self.adapter)
                inputs.append(messages)
            else:
                ids = [int(t) for t in batch["prompt_ids"][i]]
                inputs.append(tok.decode(ids, skip_special_tokens=False))
            p = dict(self.params)
            if p.get("seed") is not None:
                p["seed"] = int(p["seed"]) + int(batch["pos"][i])
            params = self.engine.check_length(ids, SamplingParams(**p))
            jobs.append((ids, params, self.adapter))
        results = self.engine.generate_many(jobs)
        refs = []
        for i in range(n):
            ref_ids = batch["reference_ids"][i]
            if ref_ids is not None and len(ref_ids):
                refs.append(tok.decode([int(t) for t in ref_ids], skip_special_tokens=True))
            else:
                ref = batch["reference"][i] if "reference" in batch else None
                refs.append(ref if isinstance(ref, str) else None)
        return {
            "pos": [int(p) for p in batch["pos"]],
            "line": [json.dumps({"id": str(batch["id"][i]), "input": inputs[i],
                                 "output": r["text"], "reference": refs[i],
                                 "finish_reason": r["finish_reason"],
                                 "prompt_tokens": r["prompt_tokens"],
                                 "completion_tokens": r["completion_tokens"]},
                                ensure_ascii=False) for i, r in enumerate(results)],
        }


# ---------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------


def predict(cfg: Config) -> dict[str, Any]:
    """Generate for every row not yet in a finished shard; returns the summary."""
    p = cfg.predict
    model = p.model or cfg.serve.base_model or cfg.model.name_or_path
    if not model:
        raise ConfigError("predict.model (or serve.base_model / model.name_or_path) is required")
    out = cfg.resolve(p.output)
    data = p.data if (storage.is_remote(p.data) or os.path.exists(p.data.split(",")[0])
                      or any(c in p.data for c in "*?[")) else cfg.resolve(p.data)
    items = load_items(data, p.split, p.max_rows)
    for pos, it in enumerate(items):
        it["pos"] = pos
        it.setdefault("reference", None)
    n_shards = (len(items) + p.shard_rows - 1) // p.shard_rows
    shard_dir = storage.join(out, SHARDS)
    done = set(storage.listdir(shard_dir))
    todo = [k for k in range(n_shards) if shard_name(k) not in done]
    pending = [it for it in items if it["pos"] // p.shard_rows in todo]
    log.info("predict: %d rows, %d shards, %d to do", len(items), n_shards, len(todo))

    if pending:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = p.num_actors or max(1, cpus - 1)
        engine_args = {"dtype": cfg.model.dtype, "template": cfg.data.template,
                       "max_batch_size": p.batch_size, "batch_wait_timeout_s": 0.0,
                       "trust_remote_code": cfg.model.trust_remote_code,
                       "num_threads": max(1, int(p.cpus_per_actor))}
        params = {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
                  "seed": p.seed}
        ds = ray.data.from_items(pending, override_num_blocks=max(1, len(pending) // p.batch_size))
        ds = ds.map_batches(
            Predictor, fn_constructor_args=(model, p.adapter, engine_args, params),
            batch_size=p.batch_size, concurrency=actors, num_cpus=p.cpus_per_actor,
            batch_format="numpy",
        )
        lines: dict[int, str] = {}
        written = 0
        for row in ds.iter_rows():
            lines[int(row["pos"])] = str(row["line"])
            written += _flush_shards(lines, shard_dir, p.shard_rows, len(items))
        written += _flush_shards(lines, shard_dir, p.shard_rows, len(items))
        if lines:
            raise RuntimeError(f"predict: {len(lines)} rows were generated for unfinished shards")

    # Every shard is on disk now: the final file is their concatenation, in order.
    parts = [storage.read_text(storage.join(shard_dir, shard_name(k))) for k in range(n_shards)]
    storage.write_text(storage.join(out, PREDICTIONS), "".join(parts))
    summary = {"rows": len(items), "shards": n_shards, "shards_run": len(todo),
               "model": model, "adapter": p.adapter or None, "data": data,
               "output": storage.join(out, PREDICTIONS)}
    storage.write_text(storage.join(out, SUMMARY), json.dumps(summary, indent=2))
    return summary


def _flush_shards(lines: dict[int, str], shard_dir: str, shard_rows: int, total: int) -> int:
    """Write every shard whose rows are all in `lines` (and drop them from it)."""
    written = 0
    for k in sorted({pos // shard_rows for pos in lines}):
        lo, hi = k * shard_rows, min(total, (k + 1) * shard_rows)
        if all(i in lines for i in range(lo, hi)):
            text = "".join(lines.pop(i) + "\n" for i in range(lo, hi))
            storage.write_text(storage.join(shard_dir, shard_name(k)), text)
            written += 1
    return written


def predict_cmd(args) -> int:
    """`ift predict -c CONFIG [key=value ...]`."""
    cfg = load_config(args.config, args.overrides)
    init_ray(getattr(args, "address", None))
    summary = predict(cfg)
    print(f"ift predict: {summary['rows']} rows ({summary['shards_run']} of "
          f"{summary['shards']} shards run) -> {summary['output']}")
    return 0
