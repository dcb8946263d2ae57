"""`ift data prepare`: sources in, one clean, tokenized, sharded collection out, on Ray Data.

Three streaming passes, each a Ray Data job whose memory does not grow with the data:

1. scan      read -> convert -> validate -> placeholders -> hash. Only a key and a hash per
             row reach the driver (plus the rejected rows, written to rejects/ and counted);
             the driver drops exact duplicates across sources and assigns the val split.
2. tokenize  read -> convert again -> keep the surviving keys -> render template -> tokenize
             and mask -> write per-source shards (sources/source=NAME/split=SPLIT/).
3. mix       read the per-source shards -> draw each row by its source's weight or count ->
             shuffle within batches -> pack (optional) -> write train/ and val/.

The `mix` pass is also what a sweep runs to re-mix sources without tokenizing again.
Reading twice costs a JSON parse per row; tokenization costs far more, and it is what
keeps the driver's memory to a few bytes per row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
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
MANIFEST_VERSION = 1
SOURCES_DIR = "sources"
TOKEN_COLUMNS = ["key", "id", "source", "lang", "task", "input_ids", "labels",
                 "num_tokens", "num_trainable"]


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


def _scan_udf(batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
    """Pass 1: one read task in, (key, hash) rows and rejects out, in bounded batches."""
    task, opts = _task_of(batch), _opts_of(batch)
    cols: dict[str, list] = defaultdict(list)

    def flush() -> pa.Table:
        t = pa.table({
            "key": pa.array(cols["key"], pa.int64()),
            "src": pa.array(cols["src"], pa.int32()),
            "hash": pa.array(cols["hash"], pa.string()),
            "lang": pa.array(cols["lang"], pa.string()),
            "line": pa.array(cols["line"], pa.int64()),
            "reason": pa.array(cols["reason"], pa.string()),
            "raw": pa.array(cols["raw"], pa.string()),
        })
        cols.clear()
        return t

    n = 0
    for key, line, rec, reason, raw_text in clean_rows(task, opts):
        cols["key"].append(key)
        cols["src"].append(task.source_index)
        cols["line"].append(line)
        if rec is None:
            cols["hash"].append("")
            cols["lang"].append("")
            cols["reason"].append(reason)
            cols["raw"].append(raw_text[:100_000])
        else:
            cols["hash"].append(conversation_hash(rec))
            cols["lang"].append(rec["lang"])
            cols["reason"].append(None)
            cols["raw"].append(None)
        n += 1
        if n % 8192 == 0:
            yield flush()
    if cols:
        yield flush()


_BROADCAST: dict[str, Any] = {}


def _kept(ref_holder: list) -> tuple[np.ndarray, np.ndarray]:
    """The driver's (sorted kept keys, is_val) arrays, fetched once per worker process."""
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


def _tokenize_udf(batch: dict[str, np.ndarray], kept_ref: list, tok: dict) -> Iterator[pa.Table]:
    """Pass 2: one read task in, tokenized rows of the surviving keys out."""
    from ift.data.tokenize import tokenize_records

    task, opts = _task_of(batch), _opts_of(batch)
    keys, is_val = _kept(kept_ref)
    tokenizer = _tokenizer(tok["name"])
    pending: list[tuple[int, dict, bool]] = []

    def flush() -> pa.Table:
        recs = [r for _, r, _ in pending]
        rows, _dropped = tokenize_records(
            recs,
            tokenizer,
            template=tok["template"],
            max_seq_len=tok["max_seq_len"],
            train_on_prompt=tok["train_on_prompt"],
            truncation=tok["truncation"],
        )
        by_id = {r["id"]: r for r in rows}
        out: dict[str, list] = defaultdict(list)
        for key, rec, val in pending:
            row = by_id.get(rec["id"])
            if row is None:  # no trainable token left after truncation: counted by the driver
                continue
            out["key"].append(key)
            out["id"].append(rec["id"])
            out["source"].append(rec["source"])
            out["split"].append("val" if val else "train")
            out["lang"].append(rec["lang"])
            out["task"].append(rec.get("task") or "")
            out["input_ids"].append(row["input_ids"])
            out["labels"].append(row["labels"])
            out["num_tokens"].append(row["num_tokens"])
            out["num_trainable"].append(row["num_trainable"])
        pending.clear()
        return _token_table(out)

    for key, _line, rec, _reason, _raw in clean_rows(task, opts):
        if rec is None:
            continue
        i = np.searchsorted(keys, key)
        if i >= len(keys) or keys[i] != key:
            continue  # a duplicate of an earlier row
        pending.append((key, rec, bool(is_val[i])))
        if len(pending) >= tok["batch_size"]:
            yield flush()
    if pending:
        yield flush()


def _token_table(cols: dict[str, list]) -> pa.Table:
    ids = pa.list_(pa.int32())
    data = {
        "key": pa.array(cols.get("key", []), pa.int64()),
        "id": pa.array(cols.get("id", []), pa.string()),
        "source": pa.array(cols.get("source", []), pa.string()),
        "lang": pa.array(cols.get("lang", []), pa.string()),
        "task": pa.array(cols.get("task", []), pa.string()),
        "input_ids": pa.array(cols.get("input_ids", []), ids),
        "labels": pa.array(cols.get("labels", []), ids),
        "num_tokens": pa.array(cols.get("num_tokens", []), pa.int32()),
        "num_trainable": pa.array(cols.get("num_trainable", []), pa.int32()),
    }
    if "split" in cols:
        data["split"] = pa.array(cols["split"], pa.string())
    return pa.table(data)


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

    # Pass 1: scan.
    _log("pass 1/3: read, convert, validate, hash")
    scan = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _scan_udf, batch_size=1, batch_format="numpy", **remote)
    file_of = {f_index: f for f_index, f in enumerate(files)}
    stats = {s.name: defaultdict(int) for s in sources}
    langs = {s.name: defaultdict(int) for s in sources}
    keys, srcs, hashes = [], [], []
    reject_dir = tempfile.mkdtemp(prefix="ift-rejects-")
    reject_files: dict[str, Any] = {}
    try:
        for b in scan.iter_batches(batch_format="pyarrow", batch_size=None):
            reason = b.column("reason")
            ok = pc.is_null(reason).to_numpy(zero_copy_only=False)
            src_arr = b.column("src").to_numpy()
            for si in np.unique(src_arr):
                name = sources[si].name
                mask = src_arr == si
                stats[name]["rows_read"] += int(mask.sum())
                stats[name]["rows_rejected"] += int((mask & ~ok).sum())
            if ok.any():
                good = b.filter(pa.array(ok))
                keys.append(good.column("key").to_numpy())
                srcs.append(good.column("src").to_numpy())
                hashes.append(np.array(good.column("hash").to_pylist(), dtype="S32"))
                for si, lang in zip(good.column("src").to_pylist(), good.column("lang").to_pylist()):
                    langs[sources[si].name][lang] += 1
            if (~ok).any():
                bad = b.filter(pa.array(~ok)).to_pylist()
                for r in bad:
                    name = sources[r["src"]].name
                    f = file_of[int(r["key"]) >> 36]
                    pos = "line" if f.get("line_based") else "index"
                    if name not in reject_files:
                        reject_files[name] = open(os.path.join(reject_dir, f"{name}.jsonl"), "w",
                                                  encoding="utf-8")
                    reject_files[name].write(json.dumps({
                        "source": name, "file": f["path"], pos: r["line"],
                        "reason": r["reason"], "raw": r["raw"]}, ensure_ascii=False) + "\n")
    finally:
        for fh in reject_files.values():
            fh.close()
    keys_a = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    srcs_a = np.concatenate(srcs) if srcs else np.zeros(0, np.int32)
    hashes_a = np.concatenate(hashes) if hashes else np.zeros(0, "S32")

    # Exact duplicates across all sources: the first occurrence in config order wins.
    keep = mix.dedupe_first(hashes_a, keys_a) if d.dedupe else np.ones(len(keys_a), bool)
    is_val = np.zeros(len(keys_a), dtype=bool)
    for si, src in enumerate(sources):
        m = srcs_a == si
        stats[src.name]["rows_duplicate"] = int((m & ~keep).sum())
        stats[src.name]["rows_kept"] = int((m & keep).sum())
        idx = np.nonzero(m & keep)[0]
        scores = mix.split_scores([h.decode() for h in hashes_a[idx]], d.seed)
        is_val[idx] = mix.assign_val(scores, d.val_ratio, d.val_max_rows)
    order = np.argsort(keys_a[keep], kind="stable")
    kept_keys = keys_a[keep][order]
    kept_val = is_val[keep][order]
    total = sum(s["rows_read"] for s in stats.values())
    _log(f"scanned {total} rows: {len(kept_keys)} kept, "
         f"{sum(s['rows_rejected'] for s in stats.values())} rejected, "
         f"{sum(s['rows_duplicate'] for s in stats.values())} duplicates")
    if len(kept_keys) == 0:
        raise PrepareError("no row survived conversion and validation; see the rejects above: "
                           + ", ".join(f"{k}: {v['rows_rejected']} rejected" for k, v in stats.items()))

    # Pass 2: tokenize into per-source shards.
    _log(f"pass 2/3: render template {template!r}, tokenize and mask (max_seq_len {d.max_seq_len})")
    kept_ref = ray.put((kept_keys, kept_val))
    tok = {"name": tok_name, "template": template, "max_seq_len": d.max_seq_len,
           "train_on_prompt": d.train_on_prompt, "truncation": d.truncation,
           "batch_size": d.batch_size}
    fs, root = storage.arrow_fs(out)
    ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _tokenize_udf, batch_size=1, batch_format="numpy",
        fn_kwargs={"kept_ref": [kept_ref], "tok": tok}, **remote,
    ).write_parquet(f"{root}/{SOURCES_DIR}", filesystem=fs, partition_cols=["source", "split"],
                    min_rows_per_file=d.shard_rows)
    for src in sources:
        n = _count_rows(out, f"{SOURCES_DIR}/source={src.name}")
        stats[src.name]["rows_dropped"] = stats[src.name]["rows_kept"] - n

    # Pass 3: mix and (optionally) pack.
    _log("pass 3/3: mix sources" + (" and pack" if d.pack else ""))
    # A source whose every row was dropped (too long to keep a trainable token) has no shards.
    present = set(source_names(out))
    if not present:
        raise PrepareError("every kept row was dropped: no sample keeps a trainable token "
                           f"within data.max_seq_len={d.max_seq_len}; raise it")
    mixed = mix_sources(out, out, sources={s.name: (s.weight, s.count) for s in sources
                                           if s.name in present},
                        seed=d.seed, pack=d.pack, max_seq_len=d.max_seq_len,
                        shard_rows=d.shard_rows, init=False)

    for name in reject_files:
        with open(os.path.join(reject_dir, f"{name}.jsonl"), "rb") as fh:
            storage.write_bytes(storage.join(out, "rejects", f"{name}.jsonl"), fh.read())
    shutil.rmtree(reject_dir, ignore_errors=True)
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
            "files": [f"rejects/{n}.jsonl" for n in sorted(reject_files)],
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


def _count_rows(out: str, sub: str) -> int:
    import pyarrow.dataset as pads

    fs, root = storage.arrow_fs(storage.join(out, sub))
    try:
        return pads.dataset(root, filesystem=fs, format="parquet", partitioning="hive").count_rows()
    except (FileNotFoundError, OSError):
        return 0


def source_names(prepared: str) -> list[str]:
    return [n.split("=", 1)[1] for n in storage.listdir(storage.join(prepared, SOURCES_DIR))
            if n.startswith("source=")]


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
    known = set(source_names(prepared))
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
            sub = storage.join(prepared, SOURCES_DIR, f"source={name}", f"split={split}")
            t = _dataset(sub, ["key", "num_tokens"])
            if t.num_rows == 0:
                continue
            order = np.argsort(t.column("key").to_numpy(), kind="stable")
            k = t.column("key").to_numpy()[order]
            n_tok = t.column("num_tokens").to_numpy()[order]
            if split == "train":
                c = mix.multiplicities(len(k), weight=weight, count=count, seed=seed, salt=name)
                result["rows_sampled"][name] = int(c.sum())
            else:
                c = np.ones(len(k), dtype=np.int64)
                result["rows_val"][name] = int(len(k))
            all_keys.append(k)
            all_counts.append(c)
            lengths.append(np.repeat(n_tok, c))
            if c.sum() > 0:
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
    paths = table.column("path").to_pylist()
    names = [p.split("source=", 1)[1].split("/", 1)[0] for p in paths]
    return table.drop_columns(["path"]).append_column("source", pa.array(names, pa.string()))


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
