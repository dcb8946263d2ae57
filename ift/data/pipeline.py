"""`ift data prepare`: sources in, one clean, tokenized, sharded collection out, on Ray Data.

Two streaming passes, each a Ray Data job whose memory does not grow with the data:

1. ingest  read -> convert -> validate -> placeholders -> language, hash -> render template
           -> tokenize and mask -> per-source shards `sources/source=NAME/split=S/`. Every
           row read lands in one partition: `train`, `val` (its hash scores it a val
           candidate), `dropped` (no trainable token within max_seq_len) or `rejected`
           (with its reason and raw text). Rows are read, parsed and tokenized once.
   driver  reads back only keys, hashes and lengths: drops exact duplicates across
           sources, caps val, writes `sources/_index.parquet` (the kept rows, their split
           and shard), rejects/ and dropped/ (JSONL), then deletes the `rejected` and
           `dropped` partitions.
2. mix     read the kept rows' shards -> draw each row by its source's weight or count ->
           shuffle within batches -> pack (optional) -> write train/ and val/.

The `mix` pass is also what a sweep runs to re-mix sources without tokenizing again.
Duplicates are tokenized before they are known to be duplicates; that costs what their
share of the data costs, and it is what lets every row be read only once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ift import storage
from ift.config import Config, ConfigError, SourceConfig
from ift.data import mix
from ift.data.record import ConvertError, conversation_hash

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: sources/_index.parquet, one ingest pass
SOURCES_DIR = "sources"
INDEX_FILE = "_index.parquet"  # the "_" keeps it out of hive-partitioned dataset reads
PARTITIONS = ("train", "val", "dropped", "rejected")
_IDS = pa.list_(pa.int32())
SHARD_SCHEMA = pa.schema([
    ("key", pa.int64()), ("id", pa.string()), ("lang", pa.string()), ("task", pa.string()),
    ("hash", pa.string()), ("input_ids", _IDS), ("labels", _IDS), ("num_tokens", pa.int32()),
    ("num_trainable", pa.int32()), ("reason", pa.string()), ("raw", pa.string()),
    ("source", pa.string()), ("split", pa.string()),
])


class PrepareError(ValueError):
    """Bad data-preparation input; the message names the file, source or key."""


# ---------------------------------------------------------------------------------------
# Pure row processing shared by the scan and tokenize passes
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowOptions:
    """What turns a raw row into a clean record, identical in both passes."""

    seed: int
    placeholders: dict[str, str]
    columns: dict[str, str]
    task: str
    system: str | None


def clean_rows(task, opts: RowOptions) -> Iterator[tuple[int, int, dict | None, str | None, str]]:
    """(key, line, record or None, reject reason or None, raw text) for every row of a read task."""
    from ift.data.formats import convert
    from ift.data.quality import detect_lang, substitute_placeholders, validate
    from ift.data.readers import iter_raw

    for line, raw, error, raw_text in iter_raw(task):
        key = int(mix.make_key(task.file_index, line))
        if error is not None:
            yield key, line, None, error, raw_text
            continue
        try:
            rec = convert(
                task.format,
                raw,
                id=f"{task.source}-{task.file_index}-{line}",
                source=task.source,
                seed=opts.seed,
                columns=opts.columns or None,
                task=opts.task,
                system=opts.system,
            )
        except ConvertError as e:
            yield key, line, None, str(e), raw_text
            continue
        if opts.placeholders:
            rec = substitute_placeholders(rec, opts.placeholders)
        reason = validate(rec)
        if reason is not None:
            yield key, line, None, reason, raw_text
            continue
        if opts.placeholders or not rec.get("lang"):  # substitution may change the script
            rec["lang"] = detect_lang(
                " ".join([rec.get("system") or ""] + [m["content"] for m in rec["messages"]])
            )
        yield key, line, rec, None, raw_text


# ---------------------------------------------------------------------------------------
# Ray Data UDFs (module-level so they pickle by reference)
# ---------------------------------------------------------------------------------------


def _task_of(batch: dict[str, np.ndarray]):
    from ift.data.readers import ReadTask

    fields = {f.name: batch[f.name][0] for f in dataclasses.fields(ReadTask)}
    return ReadTask(**{k: v.item() if hasattr(v, "item") else v for k, v in fields.items()})


def _opts_of(batch: dict[str, np.ndarray]) -> RowOptions:
    return RowOptions(**json.loads(batch["options"][0]))


def _ingest_udf(batch: dict[str, np.ndarray], tok: dict) -> Iterator[pa.Table]:
    """Pass 1: one read task in, every one of its rows out in bounded tables (SHARD_SCHEMA)."""
    task, opts = _task_of(batch), _opts_of(batch)
    tokenizer = _tokenizer(tok["name"])
    pending: list[tuple[int, dict, str]] = []
    rejects: list[tuple[int, str, str]] = []

    def flush() -> pa.Table:
        table = _shard_table(task.source, pending, rejects, tokenizer, tok, opts.seed)
        pending.clear()
        rejects.clear()
        return table

    for key, _line, rec, reason, raw_text in clean_rows(task, opts):
        if rec is None:
            rejects.append((key, reason, raw_text[:100_000]))
        else:
            pending.append((key, rec, conversation_hash(rec)))
        if len(pending) + len(rejects) >= tok["batch_size"]:
            yield flush()
    if pending or rejects:
        yield flush()


def _shard_table(source: str, pending: list[tuple[int, dict, str]],
                 rejects: list[tuple[int, str, str]], tokenizer, tok: dict, seed: int) -> pa.Table:
    """Tokenized rows (split train or val), dropped rows and rejected rows of one batch."""
    from ift.data.tokenize import tokenize_arrays

    recs = [r for _, r, _ in pending]
    arrays, dropped = tokenize_arrays(
        recs, tokenizer, template=tok["template"], max_seq_len=tok["max_seq_len"],
        train_on_prompt=tok["train_on_prompt"], truncation=tok["truncation"])
    hashes = [h for _, _, h in pending]
    is_val = mix.split_scores(hashes, seed) < tok["val_ratio"]
    keys = np.array([k for k, _, _ in pending], np.int64)
    idx = arrays.index
    offsets = pa.array(arrays.offsets.astype(np.int32))
    kept = pa.table({
        "key": pa.array(keys[idx]),
        "id": pa.array([recs[i]["id"] for i in idx], pa.string()),
        "lang": pa.array([recs[i]["lang"] for i in idx], pa.string()),
        "task": pa.array([recs[i].get("task") or "" for i in idx], pa.string()),
        "hash": pa.array([hashes[i] for i in idx], pa.string()),
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(arrays.input_ids)),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(arrays.labels)),
        "num_tokens": pa.array(arrays.num_tokens),
        "num_trainable": pa.array(arrays.num_trainable),
        "reason": pa.nulls(len(idx), pa.string()),
        "raw": pa.nulls(len(idx), pa.string()),
        "source": pa.array([source] * len(idx), pa.string()),
        "split": pa.array(np.where(is_val[idx], "val", "train").tolist(), pa.string()),
    }, schema=SHARD_SCHEMA)
    parts = [kept]
    if dropped:
        d = [i for i, _ in dropped]
        parts.append(_side_table(source, "dropped", keys[d].tolist(), [r for _, r in dropped],
                                 [None] * len(d), ids=[recs[i]["id"] for i in d],
                                 langs=[recs[i]["lang"] for i in d], hashes=[hashes[i] for i in d]))
    if rejects:
        parts.append(_side_table(source, "rejected", [k for k, _, _ in rejects],
                                 [r for _, r, _ in rejects], [t for _, _, t in rejects]))
    return pa.concat_tables(parts) if len(parts) > 1 else kept


def _side_table(source: str, split: str, keys: list[int], reasons: list[str],
                raws: list[str | None], *, ids=None, langs=None, hashes=None) -> pa.Table:
    """Rows with no tokens: dropped (they still take part in dedupe) or rejected."""
    n = len(keys)
    none = [None] * n
    return pa.table({
        "key": pa.array(keys, pa.int64()),
        "id": pa.array(ids or none, pa.string()),
        "lang": pa.array(langs or none, pa.string()),
        "task": pa.array(none, pa.string()),
        "hash": pa.array(hashes or none, pa.string()),
        "input_ids": pa.array([[]] * n, _IDS),
        "labels": pa.array([[]] * n, _IDS),
        "num_tokens": pa.array([0] * n, pa.int32()),
        "num_trainable": pa.array([0] * n, pa.int32()),
        "reason": pa.array(reasons, pa.string()),
        "raw": pa.array(raws, pa.string()),
        "source": pa.array([source] * n, pa.string()),
        "split": pa.array([split] * n, pa.string()),
    }, schema=SHARD_SCHEMA)


_BROADCAST: dict[str, Any] = {}


def _kept(ref_holder: list) -> tuple[np.ndarray, np.ndarray]:
    """A driver-side pair of arrays (sorted keys, values), fetched once per worker process."""
    import ray

    ref = ref_holder[0]
    name = ref.hex()
    if name not in _BROADCAST:
        _BROADCAST.clear()
        _BROADCAST[name] = ray.get(ref)
    return _BROADCAST[name]


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(name: str):
    if name not in _TOKENIZERS:
        from ift.models import load_tokenizer

        _TOKENIZERS[name] = load_tokenizer(storage.local_copy(name))
    return _TOKENIZERS[name]


def _mix_udf(table: pa.Table, draws_ref: list, pack_len: int, seed: int) -> pa.Table:
    """Pass 3: repeat each row by its draw count, shuffle within the batch, pack if asked."""
    keys, counts = _kept(draws_ref)
    k = table.column("key").to_numpy()
    idx = np.searchsorted(keys, k)
    idx = np.clip(idx, 0, max(len(keys) - 1, 0))
    found = (keys[idx] == k) if len(keys) else np.zeros(len(k), dtype=bool)
    reps = np.where(found, counts[idx], 0)
    take = np.repeat(np.arange(len(k)), reps)
    if len(take):
        # Shuffle by a seed derived from the batch content so re-runs give the same order.
        rng = np.random.default_rng([seed, int(k[0]) & 0x7FFFFFFF, len(k)])
        take = take[rng.permutation(len(take))]
    out = table.take(pa.array(take, pa.int64())).select(
        ["id", "source", "input_ids", "labels", "num_tokens", "num_trainable"]
    )
    if pack_len:
        from ift.data.pack import pack

        rows = out.to_pylist()
        bins = pack(rows, pack_len)
        ids = pa.list_(pa.int32())
        first = [rows[b["members"][0]] for b in bins]
        return pa.table({
            "id": pa.array([r["id"] for r in first], pa.string()),
            "source": pa.array([r["source"] for r in first], pa.string()),
            "input_ids": pa.array([b["input_ids"] for b in bins], ids),
            "labels": pa.array([b["labels"] for b in bins], ids),
            "position_ids": pa.array([b["position_ids"] for b in bins], ids),
            "seq_ids": pa.array([b["seq_ids"] for b in bins], ids),
            "num_tokens": pa.array([b["num_tokens"] for b in bins], pa.int32()),
            "num_trainable": pa.array([b["num_trainable"] for b in bins], pa.int32()),
            "num_samples": pa.array([b["num_samples"] for b in bins], pa.int32()),
        })
    return out


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


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


def prepare(cfg: Config, *, fresh: bool = False, address: str | None = None) -> dict:
    """Run the whole preparation; returns the manifest. Re-running with unchanged inputs and
    config reuses a complete output; `fresh` rebuilds it."""
    from ift.data.readers import plan_reads
    from ift.data.templates import resolve_template
    from ift.models import load_tokenizer, tokenizer_identity
    from ift.raycluster import init_ray

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
    t0 = time.time()
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
    digest = input_hash(files, dataclasses.asdict(d), identity["sha256"])
    if not fresh and storage.is_complete(out):
        old = read_manifest(out)
        if old.get("hash") == digest:
            _log(f"{out} is complete and up to date (hash {digest[:12]}); reusing it")
            return old
    if storage.exists(out):
        storage.rmtree(out)
    _log(f"planned {len(tasks)} read tasks over {len(files)} files from {len(sources)} sources "
         f"in {time.time() - t0:.1f}s")

    init_ray(address)
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs -> same shards, row for row
    items = [
        {**dataclasses.asdict(t), "options": json.dumps(dataclasses.asdict(RowOptions(
            seed=d.seed, placeholders=d.placeholders, columns=sources[t.source_index].columns,
            task=sources[t.source_index].task, system=sources[t.source_index].system)))}
        for t in tasks
    ]
    remote = {"num_cpus": d.num_cpus_per_task}

    # Pass 1: ingest, every row read, converted and tokenized once.
    _log(f"pass 1/2: read, convert, validate, hash, render template {template!r}, tokenize "
         f"and mask (max_seq_len {d.max_seq_len})")
    tok = {"name": tok_name, "template": template, "max_seq_len": d.max_seq_len,
           "train_on_prompt": d.train_on_prompt, "truncation": d.truncation,
           "batch_size": d.batch_size, "val_ratio": d.val_ratio}
    fs, root = storage.arrow_fs(out)
    ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _ingest_udf, batch_size=1, batch_format="numpy", fn_kwargs={"tok": tok}, **remote,
    ).write_parquet(f"{root}/{SOURCES_DIR}", filesystem=fs, partition_cols=["source", "split"],
                    min_rows_per_file=d.shard_rows)

    # Driver: duplicates, the val cap, rejects and dropped rows, the index of kept rows.
    stats, langs, reject_files = _settle(out, sources, files, d)
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
        "rejects": {
            "total": sum(s["rows_rejected"] for s in stats.values()),
            "files": [f"rejects/{n}.jsonl" for n in sorted(reject_files["rejected"])],
        },
        "dropped": {
            "total": sum(s["rows_dropped"] for s in stats.values()),
            "files": [f"dropped/{n}.jsonl" for n in sorted(reject_files["dropped"])],
        },
        "config": dataclasses.asdict(d),
    }
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False))
    storage.mark_complete(out, digest)
    _log(f"wrote {out}: train {manifest['splits']['train']['rows']} rows, "
         f"val {manifest['splits']['val']['rows']} rows in {time.time() - t0:.1f}s")
    return manifest


def _dataset(path: str, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.dataset as pads

    fs, root = storage.arrow_fs(path)
    try:
        ds = pads.dataset(root, filesystem=fs, format="parquet", partitioning="hive")
    except (FileNotFoundError, OSError):
        return pa.table({c: [] for c in columns or []})
    return ds.to_table(columns=columns)


_PARTITIONING_SCHEMA = pa.schema([("source", pa.string()), ("split", pa.string())])


def _read_shards(prepared: str, columns: list[str], splits: tuple[str, ...] = PARTITIONS
                 ) -> pa.Table:
    """Columns of the per-source shards (plus `source` and `split` from their folders)."""
    import pyarrow.dataset as pads

    fs, root = storage.arrow_fs(storage.join(prepared, SOURCES_DIR))
    part = pads.partitioning(_PARTITIONING_SCHEMA, flavor="hive")
    try:
        ds = pads.dataset(root, filesystem=fs, format="parquet", partitioning=part)
    except (FileNotFoundError, OSError):
        return pa.table({c: pa.array([], SHARD_SCHEMA.field(c).type) for c in columns})
    return ds.to_table(columns=columns, filter=pc.field("split").isin(list(splits)))


def _settle(out: str, sources: list[SourceConfig], files: list[dict], d) -> tuple[dict, dict, dict]:
    """After the ingest pass: per-source counts and languages, duplicates dropped across
    sources (the first in config order wins), val capped, the kept rows' index written,
    rejected and dropped rows written as JSONL and their partitions removed."""
    t = _read_shards(out, ["key", "hash", "lang", "num_tokens", "source", "split"])
    names = [s.name for s in sources]
    # Codes and fixed-width bytes rather than a Python object per row: this is 1M rows and more.
    src = _codes(t.column("source"), names)
    split = _codes(t.column("split"), list(PARTITIONS))
    keys = t.column("key").to_numpy()
    valid = split != PARTITIONS.index("rejected")
    dropped = split == PARTITIONS.index("dropped")
    hashes = _fixed_bytes(t.column("hash").filter(pa.array(valid)), 32)
    keep = np.zeros(len(keys), dtype=bool)
    keep[valid] = (mix.dedupe_first(hashes, keys[valid]) if d.dedupe
                   else np.ones(int(valid.sum()), dtype=bool))
    hash_of = np.zeros(len(keys), dtype="S32")
    hash_of[valid] = hashes
    final_val = np.zeros(len(keys), dtype=bool)
    stats: dict[str, dict[str, int]] = {}
    langs: dict[str, dict[str, int]] = {}
    for si, name in enumerate(names):
        m = src == si
        stats[name] = {
            "rows_read": int(m.sum()),
            "rows_rejected": int((m & ~valid).sum()),
            "rows_duplicate": int((m & valid & ~keep).sum()),
            "rows_kept": int((m & keep).sum()),
            "rows_dropped": int((m & keep & dropped).sum()),
        }
        counts = pc.value_counts(t.column("lang").filter(pa.array(m & valid))).to_pylist()
        langs[name] = {c["values"]: int(c["counts"]) for c in counts}
        cand = np.nonzero(m & keep & (split == PARTITIONS.index("val")))[0]
        scores = mix.split_scores([h.decode() for h in hash_of[cand]], d.seed)
        final_val[cand] = mix.assign_val(scores, d.val_ratio, d.val_max_rows)

    rows = np.nonzero(keep & ~dropped)[0]
    rows = rows[np.argsort(keys[rows], kind="stable")]
    index = pa.table({
        "key": pa.array(keys[rows]),
        "source": pc.take(pa.array(names, pa.string()), pa.array(src[rows])),
        "split": pa.array(np.where(final_val[rows], "val", "train")),
        "shard": pc.take(pa.array(PARTITIONS, pa.string()), pa.array(split[rows])),
        "num_tokens": pa.array(t.column("num_tokens").to_numpy()[rows]),
    })
    _write_index(out, index)
    del t, hash_of, hashes

    written: dict[str, list[str]] = {"rejected": [], "dropped": []}
    dropped_keys = np.sort(keys[keep & dropped])
    side = _read_shards(out, ["key", "id", "reason", "raw", "source", "split"],
                        ("rejected", "dropped"))
    side = side.take(pc.sort_indices(side, [("key", "ascending")]))
    for name in names:
        for part, folder in (("rejected", "rejects"), ("dropped", "dropped")):
            r = side.filter((pc.field("source") == name) & (pc.field("split") == part))
            if r.num_rows == 0:
                continue
            if part == "dropped":  # a dropped duplicate is counted as a duplicate, not here
                k = r.column("key").to_numpy()
                r = r.filter(pa.array(np.isin(k, dropped_keys)))
            lines = []
            for row in r.to_pylist():
                f = files[row["key"] >> 36]
                pos = "line" if f.get("line_based") else "index"
                entry = {"source": name, "file": f["path"], pos: row["key"] & _LINE_MASK}
                if part == "dropped":
                    entry["id"] = row["id"]
                entry["reason"] = row["reason"]
                if part == "rejected":
                    entry["raw"] = row["raw"]
                lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
            if lines:
                storage.write_bytes(storage.join(out, folder, f"{name}.jsonl"),
                                    "".join(lines).encode("utf-8"))
                written[part].append(name)
        for part in ("rejected", "dropped"):
            sub = storage.join(out, SOURCES_DIR, f"source={name}", f"split={part}")
            if storage.exists(sub):
                storage.rmtree(sub)
        if not storage.is_remote(out):  # an empty source folder would look like a source
            folder = storage.join(out, SOURCES_DIR, f"source={name}")
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
    return stats, langs, written


_LINE_MASK = (1 << 36) - 1


def _codes(column: pa.ChunkedArray, values: list[str]) -> np.ndarray:
    """The position of each string of `column` in `values`, as an int64 array."""
    return pc.index_in(column, value_set=pa.array(values, pa.string())).to_numpy(
        zero_copy_only=False).astype(np.int64)


def _fixed_bytes(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """Fixed-width strings as a numpy bytes array, without a Python object per row."""
    if len(column) == 0:
        return np.zeros(0, dtype=f"S{width}")
    a = pc.cast(column, pa.binary(width)).combine_chunks()
    return np.frombuffer(a.buffers()[1], f"S{width}", count=len(a), offset=a.offset * width)


def _write_index(prepared: str, index: pa.Table) -> None:
    import pyarrow.parquet as pq

    fs, root = storage.arrow_fs(storage.join(prepared, SOURCES_DIR, INDEX_FILE))
    pq.write_table(index, root, filesystem=fs)


def load_index(prepared: str) -> pa.Table:
    """The kept rows of a prepared dataset: key, source, split, shard, num_tokens (by key).

    Datasets prepared before the index existed hold exactly the kept rows in their
    `split=train|val` folders; their index is read off those.
    """
    import pyarrow.parquet as pq

    path = storage.join(prepared, SOURCES_DIR, INDEX_FILE)
    if storage.exists(path):
        fs, root = storage.arrow_fs(path)
        return pq.read_table(root, filesystem=fs)
    t = _read_shards(prepared, ["key", "source", "split", "num_tokens"], ("train", "val"))
    t = t.append_column("shard", t.column("split"))
    return t.take(pc.sort_indices(t, [("key", "ascending")]))


def source_names(prepared: str) -> list[str]:
    """Sources with at least one kept row, sorted."""
    return sorted(pc.unique(load_index(prepared).column("source")).to_pylist())


def mix_sources(prepared: str, out: str, *, sources: dict[str, tuple[float | None, int | None]],
                seed: int, pack: bool, max_seq_len: int, shard_rows: int = 20000,
                init: bool = True, address: str | None = None) -> dict:
    """Draw each source's tokenized train rows by weight or count, write `out`/train and
    `out`/val (val: every listed source, unweighted). Returns split statistics.

    Used by `prepare` and by sweeps, which pass their own weights and a subset of sources.
    """
    import ray

    if init:
        from ift.raycluster import init_ray

        init_ray(address)
    index = load_index(prepared)
    known = set(pc.unique(index.column("source")).to_pylist())
    unknown = sorted(set(sources) - known)
    if unknown:
        raise ConfigError(f"unknown source(s) {unknown} in mixture; {prepared} has {sorted(known)}")
    fs, out_root = storage.arrow_fs(out)
    result: dict[str, Any] = {"splits": {}, "rows_sampled": {}, "rows_val": {},
                              "padding_waste": {}}
    for split in ("train", "val"):
        all_keys, all_counts, lengths = [], [], []
        dirs = []
        for name, (weight, count) in sources.items():
            t = index.filter((pc.field("source") == name) & (pc.field("split") == split))
            if t.num_rows == 0:
                continue
            k = t.column("key").to_numpy()  # the index is sorted by key
            n_tok = t.column("num_tokens").to_numpy()
            if split == "train":
                c = mix.multiplicities(len(k), weight=weight, count=count, seed=seed, salt=name)
                result["rows_sampled"][name] = int(c.sum())
            else:
                c = np.ones(len(k), dtype=np.int64)
                result["rows_val"][name] = int(len(k))
            all_keys.append(k)
            all_counts.append(c)
            lengths.append(np.repeat(n_tok, c))
            # The shards holding drawn rows (val candidates past the val cap train).
            shards = np.asarray(t.column("shard").to_numpy(zero_copy_only=False), dtype=object)
            for shard in sorted(set(shards[c > 0])):
                sub = storage.join(prepared, SOURCES_DIR, f"source={name}", f"split={shard}")
                dirs.append(storage.arrow_fs(sub)[1])
        keys = np.concatenate(all_keys) if all_keys else np.zeros(0, np.int64)
        counts = np.concatenate(all_counts) if all_counts else np.zeros(0, np.int64)
        lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        order = np.argsort(keys, kind="stable")
        draws_ref = ray.put((keys[order], counts[order]))
        dest = f"{out_root}/{split}"
        if dirs:
            ds = ray.data.read_parquet(
                dirs, filesystem=fs,
                columns=["key", "id", "input_ids", "labels", "num_tokens", "num_trainable"],
                include_paths=True,
            )
            ds = ds.map_batches(_with_source, batch_format="pyarrow", batch_size=None)
            ds.map_batches(
                _mix_udf, batch_format="pyarrow", batch_size=4096,
                fn_kwargs={"draws_ref": [draws_ref], "pack_len": max_seq_len if pack else 0,
                           "seed": seed},
            ).write_parquet(dest, filesystem=fs, min_rows_per_file=shard_rows)
        result["splits"][split] = _split_stats(out, split, lens, max_seq_len, pack)
        if split == "train":
            result["padding_waste"] = {
                "unpacked": _waste(lens, max_seq_len),
                "packed": (1.0 - result["splits"][split]["tokens"]
                           / max(1, result["splits"][split]["rows"] * max_seq_len)) if pack else None,
            }
    return result


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
    weights, counts = dict(weights or {}), dict(counts or {})
    unknown = sorted((set(weights) | set(counts)) - set(base["sources"]))
    if unknown:
        raise ConfigError(f"mixture names unknown source(s) {unknown}; "
                          f"{prepared} has {sorted(base['sources'])}")
    chosen: dict[str, tuple[float | None, int | None]] = {}
    for name, src in base["sources"].items():
        tags = set(src.get("tags") or [])
        if include_tags and not tags & set(include_tags):
            continue
        if exclude_tags and tags & set(exclude_tags):
            continue
        if name in counts and counts[name] is not None:
            chosen[name] = (None, int(counts[name]))
        elif name in weights and weights[name] is not None:
            chosen[name] = (float(weights[name]), None)
        else:
            chosen[name] = (src.get("weight"), src.get("count"))
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
    mix_desc = {n: {"weight": w, "count": c} for n, (w, c) in chosen.items()}
    digest = hashlib.sha256(json.dumps([base["hash"], mix_desc, seed], sort_keys=True)
                            .encode()).hexdigest()
    manifest = {
        **base,
        "hash": digest,
        "parent": {"path": prepared, "hash": base["hash"]},
        "mixture": mix_desc,
        "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "splits": mixed["splits"],
        "padding_waste": mixed["padding_waste"],
        "sources": {
            n: {**base["sources"][n], "weight": w, "count": c,
                "rows_sampled": mixed["rows_sampled"].get(n, 0),
                "rows_val": mixed["rows_val"].get(n, 0)}
            for n, (w, c) in chosen.items()
        },
    }
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False))
    storage.mark_complete(out, digest)
    return manifest


def _with_source(table: pa.Table) -> pa.Table:
    """The source name from the hive path (source=NAME/split=...)."""
    paths = pc.dictionary_encode(table.column("path")).combine_chunks()  # one path per file
    names = pa.array([p.split("source=", 1)[1].split("/", 1)[0]
                      for p in paths.dictionary.to_pylist()], pa.string())
    source = pc.take(names, paths.indices)
    return table.drop_columns(["path"]).append_column("source", source)


def _waste(lengths: np.ndarray, max_seq_len: int) -> float:
    if len(lengths) == 0:
        return 0.0
    return float(1.0 - lengths.sum() / (len(lengths) * max_seq_len))


def _split_stats(out: str, split: str, sample_lengths: np.ndarray, max_seq_len: int,
                 packed: bool) -> dict:
    cols = ["num_tokens", "num_trainable"] + (["num_samples"] if packed else [])
    t = _dataset(storage.join(out, split), cols)
    tokens = int(pc.sum(t.column("num_tokens")).as_py() or 0) if t.num_rows else 0
    trainable = int(pc.sum(t.column("num_trainable")).as_py() or 0) if t.num_rows else 0
    lens = sample_lengths
    return {
        "rows": t.num_rows,
        "samples": int(len(lens)),
        "tokens": tokens,
        "trainable_tokens": trainable,
        "length": {
            "mean": float(lens.mean()) if len(lens) else 0.0,
            "p50": float(np.percentile(lens, 50)) if len(lens) else 0.0,
            "p95": float(np.percentile(lens, 95)) if len(lens) else 0.0,
            "max": int(lens.max()) if len(lens) else 0,
        },
        "max_seq_len": max_seq_len,
    }


def read_manifest(prepared: str) -> dict:
    """The manifest of a complete prepared directory, or a PrepareError saying what is wrong."""
    if not storage.exists(prepared):
        raise PrepareError(f"prepared dataset {prepared} does not exist; run `ift data prepare`")
    path = storage.join(prepared, MANIFEST)
    if not storage.exists(path):
        raise PrepareError(f"{prepared} has no {MANIFEST}: not a prepared dataset, or "
                           "preparation did not finish; re-run `ift data prepare`")
    if not storage.is_complete(prepared):
        raise PrepareError(f"{prepared} is partial (no {storage.COMPLETE_MARKER} marker): "
                           "preparation did not finish; re-run `ift data prepare`")
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path}: not valid JSON ({e})") from e
    for key in ("version", "hash", "tokenizer", "splits", "sources"):
        if key not in manifest:
            raise PrepareError(f"{path}: missing key {key!r}")
    return manifest


def split_files(prepared: str, split: str) -> list[str]:
    """The parquet shards of a split, sorted."""
    return [f for f in storage.walk_files(storage.join(prepared, split)) if f.endswith(".parquet")]


def prepare_cmd(args) -> int:
    from ift.config import load_config

    cfg = load_config(args.config, args.overrides)
    try:
        manifest = prepare(cfg, fresh=getattr(args, "fresh", False), address=args.address)
    except PrepareError as e:
        print(f"ift data prepare: {e}", flush=True)
        return 1
    from ift.data.inspect import summary

    print(summary(manifest))
    return 0
