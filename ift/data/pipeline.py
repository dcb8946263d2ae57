"""`ift data prepare`: sources in, one clean, tokenized, sharded collection out, on Ray Data.

The only module of the data package that uses Ray: it plans the reads, runs the tasks and
moves files; what the tasks and the driver compute lives in Ray-free modules (ingest:
ift.data.ingest, tokenize; the driver's dedupe, val cap and index: ift.data.settle; the
draws, shuffle, packing and statistics of mixing: ift.data.mix).

Two streaming passes; every row is read, parsed and tokenized once, and no token data
passes through the driver or the object store:

1. ingest  one Ray Data task per read task (a file, or a newline-aligned byte range of
           one): read -> convert -> validate -> placeholders -> language, hash -> render
           template -> tokenize and mask. The task writes its rows to its source's shards
           (`sources/source=NAME/split=train|val/`; val if its split hash scores it a val
           candidate: record.split_hash, shared by the schema chunks of one IE text) and
           streams a few bytes per row read to the driver: key, hash, length, language,
           and for dropped (no trainable token within max_seq_len) and rejected rows the
           reason.
   driver  (settle.IngestLedger) drops exact duplicates across sources (the first in
           config order wins), caps val, writes `sources/_index.parquet` (the kept rows,
           their split and shard), `rejects/` and `dropped/` (JSONL).
2. mix     one task per shard holding drawn rows (mix.draw_shard): draw each row by its
           source's weight or count (val rows once) -> shuffle within the shard -> pack
           (optional) -> write `train/` and `val/`; split statistics stream back.

A preference preparation (data.kind=preference, `prepare_pairs`) is one pass: each task
converts and tokenizes its pairs (ingest.pair_rows) and sends them to the driver, which
settles and writes them (settle.settle_pairs).

The `mix` pass is also what a sweep runs to re-mix sources without tokenizing again
(`remix`). Duplicates are tokenized before they are known to be duplicates; that costs
what their share of the data costs, and it is what lets every row be read once. Each task
writes its own files under names that depend only on the task, so a retried task
overwrites what a failed try left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from ift import storage
from ift.artifacts import MANIFEST_FILE
from ift.config import PAIR_FORMATS, Config, ConfigError, DataConfig, SourceConfig, load_config
from ift.data import dataset, ie, mix
from ift.data.dataset import (
    MANIFEST_VERSION,
    SHARD_SCHEMA,
    SOURCES_DIR,
    PrepareError,
    load_index,
    read_manifest,
    source_names,
)
from ift.data.ingest import RowOptions, clean_rows, pair_rows
from ift.data.inspect import summary
from ift.data.readers import ReadTask, plan_reads
from ift.data.record import conversation_hash, split_hash
from ift.data.settle import (
    DROPPED,
    META_SCHEMA,
    PAIR_ROW_SCHEMA,
    REJECTED,
    TRAIN,
    VAL,
    IngestLedger,
    settle_pairs,
)
from ift.data.templates import resolve_template
from ift.data.tokenize import tokenize_arrays
from ift.models import load_tokenizer, tokenizer_identity
from ift.raycluster import init_ray

# ---------------------------------------------------------------------------------------
# Ray Data UDFs (module-level so they pickle by reference)
# ---------------------------------------------------------------------------------------


def _task_of(batch: dict[str, np.ndarray]):
    fields = {f.name: batch[f.name][0] for f in dataclasses.fields(ReadTask)}
    return ReadTask(**{k: v.item() if hasattr(v, "item") else v for k, v in fields.items()})


def _opts_of(batch: dict[str, np.ndarray]) -> RowOptions:
    return RowOptions(**json.loads(batch["options"][0]))


def _ingest_udf(batch: dict[str, np.ndarray], tok: dict, dest: dict) -> Iterator[pa.Table]:
    """Pass 1: one read task in; its tokenized rows written to its source's shards, and one
    META_SCHEMA row per row read yielded to the driver, in bounded tables."""
    task, opts = _task_of(batch), _opts_of(batch)
    tokenizer = _tokenizer(tok["name"])
    shards = _ShardWriter(dest["fs"], f"{dest['root']}/{SOURCES_DIR}/source={task.source}",
                          int(batch["task_index"][0]), dest["shard_rows"])
    pending: list[tuple[int, dict, str, str]] = []
    rejects: list[tuple[int, str, str]] = []

    def flush() -> pa.Table:
        meta = _tokenize_batch(task.source_index, pending, rejects, tokenizer, tok, opts.seed,
                               shards)
        pending.clear()
        rejects.clear()
        return meta

    with _no_cyclic_gc():
        for key, _line, rec, reason, raw_text in clean_rows(task, opts):
            if rec is None:
                rejects.append((key, reason, raw_text[:100_000]))
            else:
                pending.append((key, rec, conversation_hash(rec), split_hash(rec)))
            if len(pending) + len(rejects) >= tok["batch_size"]:
                yield flush()
        if pending or rejects:
            yield flush()
        shards.close()


class _ShardWriter:
    """The parquet shards of one read task: `<dir>/split=S/part-TTTTTT-NNN.parquet`.

    Names depend only on the task, so a retried task overwrites what a failed try left.
    """

    def __init__(self, fs, directory: str, task_index: int, shard_rows: int) -> None:
        self.fs, self.dir, self.task, self.cap = fs, directory, task_index, max(1, shard_rows)
        self.open: dict[str, list] = {}  # split -> [writer, stream, rows, file number]

    def write(self, split: str, table: pa.Table) -> None:
        while table.num_rows:
            w = self.open.get(split)
            if w is not None and w[2] >= self.cap:
                self._close(split)
                w = self.open[split] = [None, None, 0, w[3] + 1]
            if w is None or w[0] is None:
                n = 0 if w is None else w[3]
                folder = f"{self.dir}/split={split}"
                self.fs.create_dir(folder, recursive=True)
                stream = self.fs.open_output_stream(
                    f"{folder}/part-{self.task:06d}-{n:03d}.parquet")
                w = self.open[split] = [pq.ParquetWriter(stream, SHARD_SCHEMA), stream, 0, n]
            part = table.slice(0, self.cap - w[2])
            w[0].write_table(part)
            w[2] += part.num_rows
            table = table.slice(part.num_rows)

    def _close(self, split: str) -> None:
        w = self.open[split]
        w[0].close()
        w[1].close()

    def close(self) -> None:
        for split in list(self.open):
            if self.open[split][0] is not None:
                self._close(split)
        self.open.clear()


@contextlib.contextmanager
def _no_cyclic_gc():
    """Cyclic garbage collection off while a task's rows are processed.

    Rows are plain dicts and lists that reference counting frees; the collector would only
    walk them (and the tokenizer's and libraries' long-lived objects) again and again:
    measured at a quarter of the ingest time per row.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _tokenize_batch(src: int, pending: list[tuple[int, dict, str, str]],
                    rejects: list[tuple[int, str, str]], tokenizer, tok: dict, seed: int,
                    shards: _ShardWriter) -> pa.Table:
    """Tokenize a batch of clean records, write them to the train/val shards, and return
    the batch's META_SCHEMA rows (kept, dropped and rejected)."""
    recs = [r for _, r, _, _ in pending]
    arrays, dropped = tokenize_arrays(
        recs, tokenizer, template=tok["template"], max_seq_len=tok["max_seq_len"],
        train_on_prompt=tok["train_on_prompt"], truncation=tok["truncation"])
    hashes = [h for _, _, h, _ in pending]
    groups = [g for _, _, _, g in pending]
    keys = np.array([k for k, _, _, _ in pending], np.int64)
    idx = arrays.index
    is_val = mix.split_scores([groups[i] for i in idx], seed) < tok["val_ratio"]
    offsets = pa.array(arrays.offsets.astype(np.int32))
    langs = [recs[i]["lang"] for i in idx]
    rows = pa.table({
        "key": pa.array(keys[idx]),
        "id": pa.array([recs[i]["id"] for i in idx], pa.string()),
        "lang": pa.array(langs, pa.string()),
        "task": pa.array([recs[i].get("task") or "" for i in idx], pa.string()),
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(arrays.input_ids)),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(arrays.labels)),
        "num_tokens": pa.array(arrays.num_tokens),
        "num_trainable": pa.array(arrays.num_trainable),
    }, schema=SHARD_SCHEMA)
    shards.write("train", rows.filter(pa.array(~is_val)))
    shards.write("val", rows.filter(pa.array(is_val)))

    d = [i for i, _ in dropped]
    n_kept, n_drop, n_rej = len(idx), len(d), len(rejects)
    n = n_kept + n_drop + n_rej
    return pa.table({
        "key": pa.array(np.concatenate([keys[idx], keys[d], np.array([k for k, _, _ in rejects],
                                                                      np.int64)])),
        "src": pa.array(np.full(n, src, np.int32)),
        "split": pa.array(np.concatenate([np.where(is_val, VAL, TRAIN), np.full(n_drop, DROPPED),
                                          np.full(n_rej, REJECTED)]).astype(np.int8)),
        "hash": pa.array([hashes[i] for i in idx] + [hashes[i] for i in d] + [None] * n_rej,
                         pa.string()),
        "group": pa.array([groups[i] for i in idx] + [groups[i] for i in d] + [None] * n_rej,
                          pa.string()),
        "lang": pa.array(langs + [recs[i]["lang"] for i in d] + [None] * n_rej, pa.string()),
        "num_tokens": pa.array(np.concatenate([arrays.num_tokens, np.zeros(n_drop + n_rej,
                                                                           np.int32)])),
        "id": pa.array([None] * n_kept + [recs[i]["id"] for i in d] + [None] * n_rej,
                       pa.string()),
        "reason": pa.array([None] * n_kept + [r for _, r in dropped]
                           + [r for _, r, _ in rejects], pa.string()),
        "raw": pa.array([None] * (n_kept + n_drop) + [t for _, _, t in rejects], pa.string()),
    }, schema=META_SCHEMA)


_BROADCAST: dict[str, Any] = {}


def _kept(ref_holder: list) -> mix.Draws:
    """The driver's draw arrays (sorted keys, counts, is_val), fetched once per worker."""
    ref = ref_holder[0]
    name = ref.hex()
    if name not in _BROADCAST:
        _BROADCAST.clear()
        _BROADCAST[name] = ray.get(ref)
    return _BROADCAST[name]


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(name: str):
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(storage.local_copy(name))
    return _TOKENIZERS[name]


def _mix_udf(batch: dict[str, np.ndarray], draws_ref: list, pack_len: int, seed: int,
             dest: dict) -> pa.Table:
    """Pass 2: one per-source shard in; its rows drawn (mix.draw_shard) and written to
    `train/` and `val/`; their statistics out."""
    path, source, item = str(batch["file"][0]), str(batch["source"][0]), int(batch["item"][0])
    fs = dest["fs"]
    with fs.open_input_file(path) as f:
        table = pq.read_table(f, columns=mix.SHARD_COLUMNS)
    with _no_cyclic_gc():
        drawn = mix.draw_shard(table, source, _kept(draws_ref), seed=seed, item=item,
                               pack_len=pack_len)
    for split, rows, _ in drawn:
        for n, o in enumerate(range(0, rows.num_rows, dest["shard_rows"])):
            part = rows.slice(o, dest["shard_rows"])
            folder = f"{dest['root']}/{split}"
            fs.create_dir(folder, recursive=True)
            with fs.open_output_stream(f"{folder}/part-{item:06d}-{n:03d}.parquet") as f:
                pq.write_table(part, f)
    return pa.Table.from_pylist([d.stats for d in drawn], schema=mix.STATS_SCHEMA)


def _configure_data_context() -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs -> same shards, row for row
    # Per-operator reservations hold back half the cluster for other operators; with one
    # fused read->tokenize->write operator on 2 CPUs that left one CPU idle (measured:
    # four 3-second tasks ran one after another instead of two by two). Every operator
    # here is a task pool, whose tasks end and free their CPUs, so none can starve.
    ctx.op_resource_reservation_enabled = False


def _log(msg: str) -> None:
    print(f"[ift data] {msg}", flush=True)


def resolve_sources(sources: list[SourceConfig]) -> list[SourceConfig]:
    """Sources with names filled in (file stem by default) and checked to be unique and safe."""
    out, seen = [], set()
    for i, s in enumerate(sources):
        name = s.name or _stem(s.path)
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(
                f"data.sources.{i}.name={name!r}: use letters, digits, '-', '_' or '.' "
                "(it names folders of the prepared dataset)"
            )
        if name in seen:
            raise ConfigError(f"data.sources.{i}: source name {name!r} is used twice; set `name`")
        seen.add(name)
        out.append(dataclasses.replace(s, name=name))
    return out


def load_source_schema(si: int, src: SourceConfig, files: list[dict]) -> dict | None:
    """The parsed schema of an IE source (None without one); errors name the source."""
    if not src.schema:
        return None
    fmts = sorted({f["format"] for f in files if f["source"] == src.name})
    tasks = {ie.TASK_OF.get(f) for f in fmts}
    if None in tasks or len(tasks) != 1:
        raise PrepareError(f"data.sources.{si} ({src.name}): a schema applies to one IE task; "
                           f"the source's files are {', '.join(fmts)}")
    if not storage.exists(src.schema):
        raise PrepareError(f"data.sources.{si}.schema: {src.schema} does not exist")
    try:
        return ie.parse_schema(fmts[0], storage.read_text(src.schema), src.schema)
    except ValueError as e:
        raise PrepareError(f"data.sources.{si}.schema: {e}") from e


def _stem(path: str) -> str:
    base = path.rstrip("/").split("/")[-1]
    for ch in "*?[":
        base = base.split(ch)[0]
    base = base.split(".")[0].strip("-_") or "source"
    return base


def input_hash(files: list[dict], data_cfg: dict, tokenizer_sha: str) -> str:
    """Digest of what the prepared dataset is a function of: input bytes, config, tokenizer."""
    cfg = {k: v for k, v in data_cfg.items() if k not in ("output", "num_cpus_per_task",
                                                          "batch_size", "read_chunk_mb")}
    h = hashlib.sha256()
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(tokenizer_sha.encode())
    for f in files:
        h.update(f"{f['source']}:{f['sha256']}".encode())
    return h.hexdigest()


class Inputs(NamedTuple):
    """What a preparation reads and how (`plan_inputs`)."""

    out: str
    tok_name: str
    template: str
    identity: dict
    sources: list[SourceConfig]
    tasks: list
    files: list[dict]
    """Per file: path, format, bytes, sha256, source."""
    digest: str
    """The input hash: files, schemas, data config and tokenizer."""
    schemas: list[dict | None]
    """IE schema per source."""
    kind: str
    """sft or preference (`dataset_kind`)."""


def dataset_kind(kind: str, sources: list[SourceConfig], files: list[dict]) -> str:
    """The preparation's kind: data.kind, else the one kind of all its sources.

    A source is of the kind it names, else of its files' detected formats (the pair
    layouts are preference). PrepareError when a source's files are not of its kind or of
    data.kind, and when sources of both kinds meet under data.kind=auto.
    """
    by_source: dict[int, str] = {}
    for si, src in enumerate(sources):
        for f in (f for f in files if f["source"] == src.name):
            found = "preference" if f["format"] in PAIR_FORMATS else "sft"
            want = src.kind if src.kind != "auto" else kind
            if want != "auto" and found != want:
                whose = f"data.sources.{si}.kind" if src.kind != "auto" else "data.kind"
                raise PrepareError(
                    f"data.sources.{si} ({src.name}): {f['path']} holds "
                    + (f"preference pairs ({f['format']}), but {whose}={want}; prepare them "
                       "with kind preference" if found == "preference" else
                       f"{f['format']} conversations, not preference pairs ({whose}="
                       f"preference expects {', '.join(PAIR_FORMATS)}); set the source's "
                       "format or kind sft"))
            by_source.setdefault(si, found)
    if kind != "auto":
        return kind
    kinds = {k: si for si, k in sorted(by_source.items(), reverse=True)}
    if len(kinds) > 1:
        s, p = kinds["sft"], kinds["preference"]
        raise PrepareError(
            f"data.sources.{s} ({sources[s].name}) holds sft conversations and "
            f"data.sources.{p} ({sources[p].name}) preference pairs: one preparation is of "
            "one kind; prepare each kind with its own data.output (data.kind=sft, "
            "data.kind=preference), e.g. an SFT run's data and the DPO run's pairs")
    return next(iter(kinds), "sft")


def plan_inputs(cfg: Config) -> Inputs:
    """What a preparation reads: files, formats, byte ranges, content hashes, IE schemas
    and its kind. PrepareError when a source names no file or holds the other data kind
    (preference pairs in an sft preparation, or the reverse)."""
    d = cfg.data
    if not d.sources:
        raise ConfigError("data.sources is empty: list at least one source with a path")
    out = cfg.resolve(d.output)
    tok_name = d.tokenizer or cfg.model.name_or_path
    if not tok_name:
        raise ConfigError("data.tokenizer (or model.name_or_path) must name a tokenizer")
    tok_local = storage.local_copy(tok_name) if storage.is_remote(tok_name) else tok_name
    tokenizer = load_tokenizer(tok_local, trust_remote_code=cfg.model.trust_remote_code)
    template = resolve_template(d.template, tokenizer)
    identity = tokenizer_identity(tokenizer)
    sources = resolve_sources(d.sources)

    # Plan: files, formats, byte ranges, content hashes.
    tasks, files = [], []
    for si, src in enumerate(sources):
        paths = storage.expand(src.path)
        missing = [p for p in paths if not storage.exists(p)]
        if not paths or missing:
            raise PrepareError(
                f"data.sources.{si} ({src.name}): {missing[0] if missing else src.path} "
                "does not exist or matches no file"
            )
        try:
            src_tasks, info = plan_reads(src.name, si, paths, src.format,
                                         d.read_chunk_mb << 20, len(files))
        except ValueError as e:
            raise PrepareError(f"data.sources.{si} ({src.name}): {e}") from e
        tasks.extend(src_tasks)
        files.extend({**f, "source": src.name} for f in info)
    kind = dataset_kind(d.kind, sources, files)
    schemas = [load_source_schema(si, src, files) for si, src in enumerate(sources)]
    digest = input_hash(files + [{"source": f"schema:{s.name}", "sha256": json.dumps(
        schemas[i], sort_keys=True, ensure_ascii=False)} for i, s in enumerate(sources)
        if schemas[i] is not None], {**dataclasses.asdict(d), "kind": kind},
        identity["sha256"])
    return Inputs(out, tok_name, template, identity, sources, tasks, files, digest, schemas,
                  kind)


def reuse_or_clear(out: str, digest: str, fresh: bool) -> dict | None:
    """The manifest of a complete output prepared from the same inputs (unless `fresh`);
    otherwise None, with whatever is at `out` removed."""
    if not fresh and storage.is_complete(out):
        old = read_manifest(out)
        if old.get("hash") == digest:
            _log(f"{out} is complete and up to date (hash {digest[:12]}); reusing it")
            return old
    if storage.exists(out):
        storage.rmtree(out)
    return None


def prepare(cfg: Config, *, fresh: bool = False, address: str | None = None) -> dict:
    """Run the whole preparation; returns the manifest. Re-running with unchanged inputs and
    config reuses a complete output; `fresh` rebuilds it."""
    d = cfg.data
    t0 = time.time()
    planned = plan_inputs(cfg)
    if planned.kind == "preference":
        return prepare_pairs(cfg.data, planned, fresh=fresh, address=address)
    out, tok_name, template, identity, sources, tasks, files, digest, schemas, _ = planned
    old = reuse_or_clear(out, digest, fresh)
    if old is not None:
        return old
    _log(f"planned {len(tasks)} read tasks over {len(files)} files from {len(sources)} sources "
         f"in {time.time() - t0:.1f}s")

    init_ray(address)
    _configure_data_context()
    items = [
        {**dataclasses.asdict(t), "task_index": i, "options": json.dumps(dataclasses.asdict(RowOptions(
            seed=d.seed, placeholders=d.placeholders, columns=sources[t.source_index].columns,
            task=sources[t.source_index].task, system=sources[t.source_index].system,
            keep_reasoning=d.keep_reasoning,
            ie_schema=schemas[t.source_index], max_labels=sources[t.source_index].max_labels,
            schema_split=sources[t.source_index].schema_split)))}
        for i, t in enumerate(tasks)
    ]
    remote = {"num_cpus": d.num_cpus_per_task}

    # Pass 1: ingest, every row read, converted and tokenized once.
    _log(f"pass 1/2: read, convert, validate, hash, render template {template!r}, tokenize "
         f"and mask (max_seq_len {d.max_seq_len})")
    tok = {"name": tok_name, "template": template, "max_seq_len": d.max_seq_len,
           "train_on_prompt": d.train_on_prompt, "truncation": d.truncation,
           "batch_size": d.batch_size, "val_ratio": d.val_ratio}
    fs, root = storage.arrow_fs(out)
    ingest = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _ingest_udf, batch_size=1, batch_format="numpy", **remote,
        fn_kwargs={"tok": tok, "dest": {"fs": fs, "root": root, "shard_rows": d.shard_rows}})
    with IngestLedger([s.name for s in sources], files) as ledger:
        for b in ingest.iter_batches(batch_format="pyarrow", batch_size=None):
            ledger.add(b)
        # Driver: duplicates, the val cap, rejects and dropped rows, the index of kept rows.
        stats, langs, reject_files = ledger.settle(out, d)
    total = sum(s["rows_read"] for s in stats.values())
    kept = sum(s["rows_kept"] for s in stats.values())
    _log(f"read {total} rows: {kept} kept, "
         f"{sum(s['rows_rejected'] for s in stats.values())} rejected, "
         f"{sum(s['rows_duplicate'] for s in stats.values())} duplicates, "
         f"{sum(s['rows_dropped'] for s in stats.values())} dropped by truncation")
    if kept == 0:
        raise PrepareError("no row survived conversion and validation; see the rejects above: "
                           + ", ".join(f"{k}: {v['rows_rejected']} rejected" for k, v in stats.items()))

    # Pass 2: mix and (optionally) pack.
    _log("pass 2/2: mix sources" + (" and pack" if d.pack else ""))
    present = set(source_names(out))
    if not present:
        raise PrepareError("every kept row was dropped: no sample keeps a trainable token "
                           f"within data.max_seq_len={d.max_seq_len}; raise it")
    mixed = mix_sources(out, out, sources={s.name: (s.weight, s.count) for s in sources
                                           if s.name in present},
                        seed=d.seed, pack=d.pack, max_seq_len=d.max_seq_len,
                        shard_rows=d.shard_rows, init=False)

    manifest = {
        "version": MANIFEST_VERSION,
        "hash": digest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": identity,
        "template": template,
        "max_seq_len": d.max_seq_len,
        "packed": d.pack,
        "train_on_prompt": d.train_on_prompt,
        "seed": d.seed,
        "splits": mixed["splits"],
        "padding_waste": mixed["padding_waste"],
        "sources": {
            s.name: {
                "path": s.path,
                "format": sorted({f["format"] for f in files if f["source"] == s.name}),
                "tags": list(s.tags),
                "weight": s.weight,
                "count": s.count,
                "files": [{k: f[k] for k in ("path", "format", "bytes", "sha256")}
                          for f in files if f["source"] == s.name],
                "langs": dict(langs[s.name]),
                **{k: int(v) for k, v in stats[s.name].items()},
                "rows_sampled": mixed["rows_sampled"].get(s.name, 0),
                "rows_val": mixed["rows_val"].get(s.name, 0),
            }
            for s in sources
        },
        **dataset.side_manifest({"rejected": sum(s["rows_rejected"] for s in stats.values()),
                                 "dropped": sum(s["rows_dropped"] for s in stats.values())},
                                reject_files),
        "config": dataclasses.asdict(d),
    }
    storage.write_text(storage.join(out, MANIFEST_FILE), json.dumps(manifest, indent=2, ensure_ascii=False))
    storage.mark_complete(out, digest)
    _log(f"wrote {out}: train {manifest['splits']['train']['rows']} rows, "
         f"val {manifest['splits']['val']['rows']} rows in {time.time() - t0:.1f}s")
    return manifest


def _pairs_udf(batch: dict[str, np.ndarray], tok: dict) -> Iterator[pa.Table]:
    """A preference read task in; one PAIR_ROW_SCHEMA row per raw row out."""
    rows = pair_rows(_task_of(batch), json.loads(batch["options"][0]), _tokenizer(tok["name"]),
                     template=tok["template"], max_seq_len=tok["max_seq_len"],
                     batch_size=tok["batch_size"])
    for i in range(0, len(rows), 512):
        yield pa.Table.from_pylist(rows[i:i + 512], schema=PAIR_ROW_SCHEMA)
    if not rows:
        yield PAIR_ROW_SCHEMA.empty_table()


def prepare_pairs(d: DataConfig, planned: Inputs, *, fresh: bool = False,
                  address: str | None = None) -> dict:
    """`ift data prepare` with data.kind=preference: pair sources in, tokenized pairs out.

    One Ray Data task per read task converts (ift.data.preference), validates and
    tokenizes its pairs (ingest.pair_rows) and streams them to the driver, which settles
    them (settle.settle_pairs): duplicates dropped, val held out, train drawn by weight or
    count, train/ and val/ (dataset.PAIR_SCHEMA), rejects/ and dropped/ written. Preference
    sets are small next to SFT collections (tens of thousands of pairs), so tokenized
    pairs pass through the driver. Returns the manifest; reuses a complete, unchanged
    output unless `fresh`."""
    out, tok_name, template, identity, sources, tasks, files, digest, _, _ = planned
    old = reuse_or_clear(out, digest, fresh)
    if old is not None:
        return old

    init_ray(address)
    _configure_data_context()
    items = [{**dataclasses.asdict(t), "task_index": i, "options": json.dumps(
        {"task": sources[t.source_index].task, "system": sources[t.source_index].system})}
        for i, t in enumerate(tasks)]
    tok = {"name": tok_name, "template": template, "max_seq_len": d.max_seq_len,
           "batch_size": d.batch_size}
    _log(f"preference pairs: read, convert, validate, render template {template!r}, "
         f"tokenize both sides (max_seq_len {d.max_seq_len}) in {len(tasks)} tasks")
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _pairs_udf, batch_size=1, batch_format="numpy", num_cpus=d.num_cpus_per_task,
        fn_kwargs={"tok": tok})
    tables = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    rows.sort(key=lambda r: r["key"])
    manifest = settle_pairs(rows, sources, files, d, out, digest, identity, template)
    counts = {k: sum(s[k] for s in manifest["sources"].values())
              for k in ("rows_read", "rows_kept", "rows_rejected", "rows_duplicate",
                        "rows_dropped")}
    _log(f"read {counts['rows_read']} pairs: {counts['rows_kept']} kept, "
         f"{counts['rows_rejected']} rejected, {counts['rows_duplicate']} duplicates, "
         f"{counts['rows_dropped']} dropped by truncation")
    storage.write_text(storage.join(out, MANIFEST_FILE),
                       json.dumps(manifest, indent=2, ensure_ascii=False))
    storage.mark_complete(out, digest)
    return manifest


def mix_sources(prepared: str, out: str, *, sources: dict[str, tuple[float | None, int | None]],
                seed: int, pack: bool, max_seq_len: int, shard_rows: int = 20000,
                init: bool = True, address: str | None = None) -> dict:
    """Draw each source's tokenized train rows by weight or count, write `out`/train and
    `out`/val (val: every listed source, unweighted). Returns split statistics.

    Used by `prepare` and by sweeps, which pass their own weights and a subset of sources.
    """
    if init:
        init_ray(address)
    _configure_data_context()
    index = load_index(prepared)
    known = set(pc.unique(index.column("source")).to_pylist())
    unknown = sorted(set(sources) - known)
    if unknown:
        raise ConfigError(f"unknown source(s) {unknown} in mixture; {prepared} has {sorted(known)}")
    plans = {name: mix.draw_source(index, name, weight=weight, count=count, seed=seed)
             for name, (weight, count) in sources.items()}
    items = []
    for name, plan in plans.items():
        for shard in plan.shards:
            folder = storage.join(prepared, SOURCES_DIR, f"source={name}", f"split={shard}")
            items.extend({"file": storage.arrow_fs(f)[1], "source": name}
                         for f in sorted(storage.walk_files(folder)) if f.endswith(".parquet"))
    for i, item in enumerate(items):
        item["item"] = i
    draws_ref = ray.put(mix.merge_draws(plans.values()))

    fs, out_root = storage.arrow_fs(out)
    totals = {split: {"rows": 0, "tokens": 0, "trainable": 0, "samples": 0}
              for split in ("train", "val")}
    if items:
        mixed = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _mix_udf, batch_size=1, batch_format="numpy",
            fn_kwargs={"draws_ref": [draws_ref], "pack_len": max_seq_len if pack else 0,
                       "seed": seed, "dest": {"fs": fs, "root": out_root,
                                              "shard_rows": shard_rows}})
        for b in mixed.iter_batches(batch_format="pyarrow", batch_size=None):
            for r in b.to_pylist():
                for k in ("rows", "tokens", "trainable", "samples"):
                    totals[r["split"]][k] += r[k]
    return mix.mix_stats(plans, totals, max_seq_len, packed=pack)


def remix(prepared: str, out: str, *, weights: dict[str, float | None] | None = None,
          counts: dict[str, int | None] | None = None, include_tags: list[str] | None = None,
          exclude_tags: list[str] | None = None, seed: int | None = None,
          address: str | None = None) -> dict:
    """A complete prepared dataset at `out` re-mixed from `prepared`'s per-source shards.

    Sources keep their prepared weight or count unless `weights`/`counts` name them (a
    weight of 0 leaves a source out of train). `include_tags` keeps only sources carrying
    one of the tags; `exclude_tags` drops sources carrying any (the "without cot" arm).
    Val is every kept source's val rows, so arms that keep the same sources share it.
    Nothing is tokenized again. Returns the new manifest (its `parent` names `prepared`).
    """
    base = read_manifest(prepared)
    unknown = sorted((set(weights or {}) | set(counts or {})) - set(base["sources"]))
    if unknown:
        raise ConfigError(f"mixture names unknown source(s) {unknown}; "
                          f"{prepared} has {sorted(base['sources'])}")
    chosen = mix.select(base["sources"], weights=weights, counts=counts,
                        include_tags=include_tags, exclude_tags=exclude_tags)
    present = set(source_names(prepared))  # sources with no surviving rows have no shards
    chosen = {n: v for n, v in chosen.items() if n in present}
    if not chosen:
        raise ConfigError(f"the mixture keeps no source of {sorted(base['sources'])} "
                          f"(include_tags={include_tags}, exclude_tags={exclude_tags})")
    seed = base.get("seed", 0) if seed is None else seed
    if storage.exists(out):
        storage.rmtree(out)
    mixed = mix_sources(prepared, out, sources=chosen, seed=seed, pack=bool(base.get("packed")),
                        max_seq_len=int(base["max_seq_len"]), address=address)
    manifest = mix.child_manifest(base, prepared, chosen, mixed, seed,
                                  time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    storage.write_text(storage.join(out, MANIFEST_FILE), json.dumps(manifest, indent=2, ensure_ascii=False))
    storage.mark_complete(out, manifest["hash"])
    return manifest


def prepare_cmd(args) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        manifest = prepare(cfg, fresh=getattr(args, "fresh", False), address=args.address)
    except PrepareError as e:
        print(f"ift data prepare: {e}", file=sys.stderr, flush=True)
        return 2
    print(summary(manifest))
    return 0
