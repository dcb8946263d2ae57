"""`ift data prepare` end to end on a local Ray cluster: bundled data, real shared data, s3."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest

from ift import storage
from ift.config import load_config
from ift.data.dataset import PrepareError, read_manifest
from ift.data.ingest import RowOptions, clean_rows
from ift.data.pipeline import mix_sources, prepare, resolve_sources
from ift.data.readers import plan_reads
from ift.data.templates import render_segments
from ift.models import load_tokenizer

SAMPLE_TAGS = {
    "alpaca_en": ["en"],
    "alpaca_zh": ["zh"],
    "cot_arith": ["cot"],
    "multiturn_sharegpt": ["multiturn"],
    "chat_openai": ["multiturn"],
    "identity_en": ["identity"],
}


def sample_config(sample_dir, tiny_model, out, *extra):
    overrides = [f"model.name_or_path={tiny_model}", f"data.output={out}",
                 "data.max_seq_len=256", "data.val_ratio=0.1", "data.placeholders.name=ift",
                 "data.placeholders.author=the ift authors", "tracking.enabled=false"]
    i = 0
    for name, tags in SAMPLE_TAGS.items():
        files = sorted(p for p in os.listdir(sample_dir) if p.startswith(name + "."))
        if not files:
            continue
        overrides += [f"data.sources.{i}.path={sample_dir / files[0]}",
                      f"data.sources.{i}.tags=[{','.join(tags)}]"]
        i += 1
    return load_config(None, overrides + list(extra))


def records_by_id(cfg):
    """Every clean record of the config's sources, by id, through the same pure functions."""
    out = {}
    sources = resolve_sources(cfg.data.sources)
    nfiles = 0
    for si, src in enumerate(sources):
        files = storage.expand(src.path)
        tasks, _ = plan_reads(src.name, si, files, src.format, 1 << 20, nfiles)
        nfiles += len(files)
        opts = RowOptions(seed=cfg.data.seed, placeholders=cfg.data.placeholders,
                          columns=src.columns, task=src.task, system=src.system)
        for t in tasks:
            for _key, _line, rec, _reason, _raw in clean_rows(t, opts):
                if rec is not None:
                    out[rec["id"]] = rec
    return out


def load_split(out, split):
    return pads.dataset(os.path.join(out, split), format="parquet").to_table().to_pylist()


def check_masks(rows, recs, tokenizer, template, max_seq_len):
    """Labels cover exactly the assistant segments; decoding round-trips the rendered text."""
    checked = 0
    for row in rows:
        rec = recs[row["id"]]
        segs = render_segments(rec, template, tokenizer)
        text = "".join(s for s, _ in segs)
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) == row["num_tokens"] <= max_seq_len
        if len(ids) < max_seq_len:  # not truncated: the whole conversation is there
            assert tokenizer.decode(ids, skip_special_tokens=False) == text
            trained = [t for t, lab in zip(ids, labels) if lab != -100]
            expected = "".join(s for s, trainable in segs if trainable)
            assert tokenizer.decode(trained, skip_special_tokens=False) == expected
            assert row["num_trainable"] == len(trained)
            checked += 1
    return checked


@pytest.fixture(scope="module")
def prepared(ray_cluster, tiny_model, sample_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "ds"
    cfg = sample_config(sample_data_dir, tiny_model, out)
    manifest = prepare(cfg)
    return cfg, str(out), manifest


def test_counts_add_up_and_files_load(prepared):
    cfg, out, manifest = prepared
    assert read_manifest(out)["hash"] == manifest["hash"]
    total_dup = 0
    for name, s in manifest["sources"].items():
        assert s["rows_read"] > 0, name
        assert s["rows_kept"] + s["rows_rejected"] + s["rows_duplicate"] == s["rows_read"], name
        assert s["rows_sampled"] + s["rows_val"] == s["rows_kept"] - s["rows_dropped"], name
        total_dup += s["rows_duplicate"]
    assert total_dup > 0, "the bundled data carries cross-file duplicates"
    train, val = load_split(out, "train"), load_split(out, "val")
    assert len(train) == manifest["splits"]["train"]["rows"] > 0
    assert len(val) == manifest["splits"]["val"]["rows"] > 0
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    assert sum(r["num_tokens"] for r in train) == manifest["splits"]["train"]["tokens"]
    assert manifest["tokenizer"]["sha256"]
    assert 0 < manifest["padding_waste"]["unpacked"] < 1
    langs = manifest["sources"]["alpaca_zh"]["langs"]
    assert langs.get("zh", 0) > 0.9 * sum(langs.values())


def test_masks_cover_exactly_the_assistant_turns(prepared, tiny_model):
    cfg, out, manifest = prepared
    tok = load_tokenizer(tiny_model)
    recs = records_by_id(cfg)
    rows = load_split(out, "train") + load_split(out, "val")
    checked = check_masks(rows, recs, tok, manifest["template"], cfg.data.max_seq_len)
    assert checked > 0.9 * len(rows)


def test_placeholders_substituted(prepared, tiny_model):
    cfg, out, manifest = prepared
    tok = load_tokenizer(tiny_model)
    texts = [tok.decode(r["input_ids"]) for r in load_split(out, "train")
             if r["source"] == "identity_en"]
    assert texts and all("{{" not in t for t in texts)
    assert any("the ift authors" in t for t in texts)


def test_rerun_reuses_complete_output(prepared):
    cfg, out, manifest = prepared
    before = os.path.getmtime(os.path.join(out, "manifest.json"))
    again = prepare(cfg)
    assert again["hash"] == manifest["hash"]
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == before


def test_remix_by_weight_without_retokenizing(prepared, tmp_path):
    cfg, out, manifest = prepared
    n_en = manifest["sources"]["alpaca_en"]["rows_sampled"]
    stats = mix_sources(out, str(tmp_path / "mix"), sources={"alpaca_en": (2.0, None),
                                                             "cot_arith": (None, 7)},
                        seed=1, pack=False, max_seq_len=cfg.data.max_seq_len)
    assert stats["rows_sampled"] == {"alpaca_en": 2 * n_en, "cot_arith": 7}
    rows = load_split(str(tmp_path / "mix"), "train")
    assert len(rows) == 2 * n_en + 7
    assert {r["source"] for r in rows} == {"alpaca_en", "cot_arith"}
    val = load_split(str(tmp_path / "mix"), "val")
    assert {r["source"] for r in val} <= {"alpaca_en", "cot_arith"}


def test_remix_by_tags_is_a_complete_prepared_dir(prepared, tmp_path):
    from ift.data.pipeline import remix

    cfg, out, manifest = prepared
    dest = str(tmp_path / "no-cot")
    m = remix(out, dest, exclude_tags=["cot"], weights={"alpaca_zh": 0.5})
    assert read_manifest(dest)["hash"] == m["hash"] != manifest["hash"]
    assert m["parent"]["hash"] == manifest["hash"]
    assert "cot_arith" not in m["sources"] and "alpaca_en" in m["sources"]
    assert m["sources"]["alpaca_zh"]["rows_sampled"] == round(
        0.5 * manifest["sources"]["alpaca_zh"]["rows_sampled"])
    rows = load_split(dest, "train")
    assert len(rows) == m["splits"]["train"]["rows"]
    assert "cot_arith" not in {r["source"] for r in rows}
    assert m["tokenizer"] == manifest["tokenizer"]
    with pytest.raises(Exception, match="unknown source"):
        remix(out, str(tmp_path / "x"), weights={"nope": 1.0})


def test_remix_of_a_dataset_prepared_before_the_index(prepared, tmp_path):
    """Older prepared dirs have no sources/_index.parquet: their shards hold exactly the kept
    rows, and re-mixing reads the index off them."""
    import pyarrow.parquet as pq

    from ift.data.dataset import INDEX_FILE, load_index
    from ift.data.pipeline import remix

    _, out, manifest = prepared
    old = tmp_path / "old"
    shutil.copytree(out, old)
    # The old layout: shards of kept rows only, no index.
    kept = load_index(out).column("key").to_numpy()
    for f in (old / "sources").glob("source=*/split=*/*.parquet"):
        t = pq.read_table(f)
        pq.write_table(t.filter(np.isin(t.column("key").to_numpy(), kept)), f)
    (old / "sources" / INDEX_FILE).unlink()
    rebuilt = load_index(str(old))
    assert rebuilt.num_rows == sum(s["rows_sampled"] + s["rows_val"]
                                   for s in manifest["sources"].values())
    m = remix(str(old), str(tmp_path / "remixed"))
    assert m["splits"]["train"]["rows"] == manifest["splits"]["train"]["rows"]
    assert m["splits"]["val"]["rows"] == manifest["splits"]["val"]["rows"]


def test_packing(ray_cluster, tiny_model, sample_data_dir, tmp_path, prepared):
    _, _, unpacked = prepared
    out = tmp_path / "packed"
    cfg = sample_config(sample_data_dir, tiny_model, out, "data.pack=true", "data.shard_rows=40")
    manifest = prepare(cfg)
    rows = load_split(str(out), "train")
    # shard_rows caps every file the two passes write.
    import pyarrow.parquet as pq

    sizes = [pq.ParquetFile(f).metadata.num_rows for f in out.glob("**/part-*.parquet")]
    assert sizes and max(sizes) <= 40
    assert len(list((out / "train").glob("*.parquet"))) > 1
    assert manifest["packed"] and rows
    assert sum(r["num_samples"] for r in rows) == manifest["splits"]["train"]["samples"]
    assert manifest["splits"]["train"]["samples"] == unpacked["splits"]["train"]["rows"]
    assert manifest["splits"]["train"]["tokens"] == unpacked["splits"]["train"]["tokens"]
    for r in rows:
        assert len(r["input_ids"]) == len(r["position_ids"]) == len(r["seq_ids"]) <= 256
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert len(starts) == r["num_samples"]
    pw = manifest["padding_waste"]
    assert pw["packed"] < pw["unpacked"]


def test_bad_rows_are_rejected_with_file_and_line(ray_cluster, tiny_model, tmp_path):
    src = tmp_path / "mixed.jsonl"
    good = {"instruction": "Say hi", "input": "", "output": "hi"}
    long_row = {"instruction": "Repeat after me: " + "lorem ipsum " * 60, "input": "",
                "output": "no room left for this reply"}
    lines = [
        json.dumps(good).encode(),
        b'{"instruction": "broken", "output": ',  # malformed JSON (line 2)
        json.dumps({"instruction": "", "input": "", "output": "x"}).encode(),  # empty turn (3)
        b'{"instruction": "caf\xe9", "input": "", "output": "bad bytes"}',  # non-UTF-8 (4)
        json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}).encode(),  # dup (5)
        json.dumps({"instruction": "Name a colour", "input": "", "output": "blue"}).encode(),
        json.dumps({"instruction": ["a"], "input": "", "output": "x"}).encode(),  # a list (7)
        json.dumps(long_row).encode(),  # no trainable token within max_seq_len (8)
        json.dumps(long_row).encode(),  # its duplicate (9)
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    cfg = load_config(None, [f"model.name_or_path={tiny_model}", f"data.output={out}",
                             f"data.sources.0.path={src}", "data.val_ratio=0",
                             "data.max_seq_len=48"])
    manifest = prepare(cfg)
    s = manifest["sources"]["mixed"]
    assert s["rows_read"] == 9
    assert s["rows_rejected"] == 4 and s["rows_duplicate"] == 2 and s["rows_kept"] == 3
    assert s["rows_dropped"] == 1 and s["rows_sampled"] == 2
    dropped = [json.loads(x) for x in (out / "dropped" / "mixed.jsonl").read_text().splitlines()]
    assert [(d["line"], d["file"]) for d in dropped] == [(8, str(src))]
    assert "max_seq_len=48" in dropped[0]["reason"]
    assert manifest["dropped"] == {"total": 1, "files": ["dropped/mixed.jsonl"]}
    # Only kept rows' shards stay; the index lists the two kept, trainable rows.
    parts = {p.name for p in (out / "sources" / "source=mixed").iterdir()}
    assert parts == {"split=train"}
    index = pads.dataset(str(out / "sources" / "_index.parquet")).to_table().to_pylist()
    assert [(r["key"] & ((1 << 36) - 1), r["split"]) for r in index] == [(1, "train"),
                                                                        (6, "train")]
    rejects = [json.loads(x) for x in (out / "rejects" / "mixed.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == [2, 3, 4, 7]
    for r in rejects:
        assert r["file"] == str(src) and r["reason"] and r["source"] == "mixed"
    by_line = {r["line"]: r["reason"].lower() for r in rejects}
    assert "json" in by_line[2]
    assert "utf-8" in by_line[4]


def test_missing_source_and_partial_dir_errors(ray_cluster, tiny_model, tmp_path):
    cfg = load_config(None, [f"model.name_or_path={tiny_model}", f"data.output={tmp_path}/o",
                             f"data.sources.0.path={tmp_path}/nope.json"])
    with pytest.raises(PrepareError, match="nope.json"):
        prepare(cfg)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "manifest.json").write_text("{}")
    with pytest.raises(PrepareError, match="partial"):
        read_manifest(str(tmp_path / "partial"))
    with pytest.raises(PrepareError, match="does not exist"):
        read_manifest(str(tmp_path / "absent"))


def test_s3_input_and_output(ray_cluster, s3_bucket, tiny_model, sample_data_dir, prepared):
    _, _, local_manifest = prepared
    prefix = f"{s3_bucket}/inputs"
    for f in sorted(os.listdir(sample_data_dir)):
        if f.endswith((".json", ".jsonl", ".tsv")):
            storage.write_bytes(f"{prefix}/{f}", (sample_data_dir / f).read_bytes())
    overrides = [f"model.name_or_path={tiny_model}", f"data.output={s3_bucket}/prepared",
                 "data.max_seq_len=256", "data.val_ratio=0.1", "data.placeholders.name=ift",
                 "data.placeholders.author=the ift authors"]
    i = 0
    for name, tags in SAMPLE_TAGS.items():
        files = sorted(p for p in os.listdir(sample_data_dir) if p.startswith(name + "."))
        if files:
            overrides += [f"data.sources.{i}.path={prefix}/{files[0]}",
                          f"data.sources.{i}.tags=[{','.join(tags)}]"]
            i += 1
    manifest = prepare(load_config(None, overrides))
    assert read_manifest(f"{s3_bucket}/prepared")["hash"] == manifest["hash"]
    assert storage.is_complete(f"{s3_bucket}/prepared")
    # Same bytes and config as the local run: the same rows come out.
    for split in ("train", "val"):
        assert manifest["splits"][split] == local_manifest["splits"][split]
    local = storage.local_copy(f"{s3_bucket}/prepared")
    assert len(load_split(local, "train")) == manifest["splits"]["train"]["rows"]


def test_real_shared_data(ray_cluster, tiny_model, shared_data, tmp_path):
    out = tmp_path / "real"
    ac, lf = shared_data / "alpaca-cot", shared_data / "llama-factory"
    srcs = [
        (ac / "gsm8k_train.tsv", "cot"), (ac / "aqua_train.tsv", "cot"),
        (ac / "aqua_train.formatted.json", "cot"), (lf / "alpaca_en_demo.json", "en"),
        (lf / "glaive_toolcall_en_demo.json", "tools"), (lf / "identity.json", "identity"),
    ]
    overrides = [f"model.name_or_path={tiny_model}", f"data.output={out}",
                 "data.max_seq_len=384", "data.placeholders.name=ift",
                 "data.placeholders.author=the ift authors"]
    for i, (p, tag) in enumerate(srcs):
        if not p.exists():
            pytest.skip(f"{p} is absent")
        overrides += [f"data.sources.{i}.path={p}", f"data.sources.{i}.tags=[{tag}]",
                      f"data.sources.{i}.name={p.name.replace('.', '_')}"]
    cfg = load_config(None, overrides)
    manifest = prepare(cfg)
    total_read = 0
    for name, s in manifest["sources"].items():
        assert s["rows_kept"] + s["rows_rejected"] + s["rows_duplicate"] == s["rows_read"], name
        total_read += s["rows_read"]
    assert total_read == 7473 + 2728 + 2728 + 999 + 300 + 91
    assert manifest["sources"]["gsm8k_train_tsv"]["rows_read"] == 7473
    tok = load_tokenizer(tiny_model)
    recs = records_by_id(cfg)
    rows = load_split(str(out), "train")
    rng = np.random.default_rng(0)
    pick = [rows[i] for i in rng.choice(len(rows), size=min(400, len(rows)), replace=False)]
    assert check_masks(pick, recs, tok, manifest["template"], 384) > 0.5 * len(pick)
    shutil.rmtree(out)


@pytest.mark.parametrize("keep", [True, False])
def test_llamafactory_v1_reasoning_through_prepare(ray_cluster, tiny_model, tmp_path, keep):
    """LLaMA-Factory v1 rows become kept rows whose think block is trained (or dropped with
    data.keep_reasoning=false); the malformed ones are rejects naming what is wrong."""
    src = os.path.join(os.path.dirname(__file__), "..", "unit", "fixtures", "formats",
                       "llamafactory_v1.jsonl")
    out = tmp_path / "out"
    cfg = load_config(None, [f"model.name_or_path={tiny_model}", f"data.output={out}",
                             f"data.sources.0.path={src}", "data.sources.0.name=v1",
                             "data.val_ratio=0", "data.max_seq_len=512",
                             f"data.keep_reasoning={str(keep).lower()}"])
    manifest = prepare(cfg)
    s = manifest["sources"]["v1"]
    assert (s["rows_read"], s["rows_kept"], s["rows_rejected"]) == (8, 3, 5)
    rejects = {r["line"]: r["reason"] for r in
               map(json.loads, (out / "rejects" / "v1.jsonl").read_text().splitlines())}
    assert "neither 'text' nor 'value'" in rejects[4] and "tool_call" in rejects[6]
    tok = load_tokenizer(tiny_model)
    rows = load_split(out, "train")
    trained = ["".join(tok.decode([t for t, lab in zip(r["input_ids"], r["labels"])
                                   if lab != -100]))
               for r in rows]
    thinking = [t for t in trained if "Two cats have 8 legs." in t]
    assert len(thinking) == 1
    assert ("<think>\nA cat has 4 legs. 2 x 4 = 8.\n</think>" in thinking[0]) is keep
