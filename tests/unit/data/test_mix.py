import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest

from ift.data import mix


def test_weight_down_and_up_sampling_is_exact_and_deterministic():
    for w, expected in [(1.0, 100), (0.25, 25), (2.5, 250), (0.0, 0), (3.0, 300)]:
        m = mix.multiplicities(100, weight=w, seed=7, salt="a")
        assert m.sum() == expected
        assert m.min() >= int(w) and m.max() <= int(w) + 1
        assert np.array_equal(m, mix.multiplicities(100, weight=w, seed=7, salt="a"))
    assert not np.array_equal(mix.multiplicities(100, weight=0.5, seed=7, salt="a"),
                              mix.multiplicities(100, weight=0.5, seed=8, salt="a"))


def test_count_sampling():
    assert mix.multiplicities(10, count=4, seed=0).sum() == 4
    m = mix.multiplicities(10, count=25, seed=0)
    assert m.sum() == 25 and set(m.tolist()) <= {2, 3}
    assert mix.multiplicities(0, count=5, seed=0).sum() == 0
    assert mix.multiplicities(5, seed=0).tolist() == [1] * 5


def test_dedupe_keeps_first_key_per_hash():
    hashes = np.array([b"b", b"a", b"b", b"c", b"a"], dtype="S1")
    keys = np.array([5, 9, 2, 1, 3])
    keep = mix.dedupe_first(hashes, keys)
    assert keep.tolist() == [False, False, True, True, True]


def test_val_split_is_stable_and_capped():
    hashes = [f"{i:032x}" for i in range(1000)]
    s = mix.split_scores(hashes, seed=1)
    assert ((s >= 0) & (s < 1)).all()
    v = mix.assign_val(s, 0.1, 10_000)
    assert 60 < v.sum() < 140
    assert np.array_equal(v, mix.assign_val(mix.split_scores(hashes, seed=1), 0.1, 10_000))
    capped = mix.assign_val(s, 0.1, 20)
    assert capped.sum() == 20 and (capped <= v).all()


def test_keys_order_by_file_then_line():
    assert mix.make_key(0, 99) < mix.make_key(1, 0) < mix.make_key(1, 1)
    assert int(mix.make_key(3, 7)) >> 36 == 3


def test_select_keeps_sources_by_tag_and_takes_named_weights_or_counts():
    from ift.data.mix import select

    sources = {"en": {"tags": ["en"], "weight": 1.0, "count": None},
               "cot": {"tags": ["en", "cot"], "weight": None, "count": 40},
               "zh": {"tags": ["zh"], "weight": 0.5, "count": None}}
    assert select(sources) == {"en": (1.0, None), "cot": (None, 40), "zh": (0.5, None)}
    assert select(sources, exclude_tags=["cot"]) == {"en": (1.0, None), "zh": (0.5, None)}
    assert select(sources, include_tags=["en"], exclude_tags=["cot"]) == {"en": (1.0, None)}
    assert select(sources, include_tags=["cot", "zh"]) == {"cot": (None, 40), "zh": (0.5, None)}
    # a named count wins over a named weight; None keeps the prepared value
    assert select(sources, weights={"en": 2, "cot": 0.25, "zh": None}, counts={"en": 7}) == {
        "en": (None, 7), "cot": (0.25, None), "zh": (0.5, None)}


# --- the draw plan, a drawn shard, the statistics and the child manifest -----------------

def _index(rows):
    """An index of kept rows (key, source, split, shard, num_tokens), sorted by key."""
    rows = sorted(rows)
    return pa.table({
        "key": pa.array([r[0] for r in rows], pa.int64()),
        "source": pa.array([r[1] for r in rows], pa.string()),
        "split": pa.array([r[2] for r in rows], pa.string()),
        "shard": pa.array([r[3] for r in rows], pa.string()),
        "num_tokens": pa.array([r[4] for r in rows], pa.int32()),
    })


# Source "a": ten train rows (4..13 tokens), one val row, and one val candidate past the
# val cap (shard val, split train). Source "b": four train rows of 5 tokens.
INDEX = _index([(i, "a", "train", "train", 4 + i) for i in range(10)]
               + [(10, "a", "val", "val", 30), (11, "a", "train", "val", 31)]
               + [(100 + i, "b", "train", "train", 5) for i in range(4)])


def test_draw_plan_of_a_weight_is_its_multiplicities():
    p = mix.draw_source(INDEX, "a", weight=2.5, count=None, seed=3)
    train = np.array([True] * 10 + [False, True])
    expected = mix.multiplicities(11, weight=2.5, seed=3, salt="a")
    assert p.keys.tolist() == list(range(12))
    assert p.is_val.tolist() == (~train).tolist()
    assert p.counts[train].tolist() == expected.tolist()
    assert p.counts[~train].tolist() == [1]
    assert p.rows_sampled == expected.sum() == round(2.5 * 11) == 28
    assert p.rows_val == 1
    tokens = np.array([4 + i for i in range(10)] + [31])
    assert p.train_lengths.tolist() == np.repeat(tokens, expected).tolist()
    assert p.val_lengths.tolist() == [30]
    assert p.shards == ["train", "val"]


def test_draw_plan_of_weight_zero_keeps_only_val_and_of_a_count_draws_that_many():
    p = mix.draw_source(INDEX, "a", weight=0.0, count=None, seed=3)
    assert p.rows_sampled == 0 and len(p.train_lengths) == 0
    assert p.counts.tolist() == [0] * 10 + [1, 0]
    assert p.shards == ["val"]  # no train shard holds a drawn row
    q = mix.draw_source(INDEX, "b", weight=None, count=10, seed=3)
    assert q.rows_sampled == 10 and q.rows_val == 0 and q.shards == ["train"]
    assert q.counts.tolist() == mix.multiplicities(4, count=10, seed=3, salt="b").tolist()
    assert q.train_lengths.tolist() == [5] * 10
    unknown = mix.draw_source(INDEX, "zz", weight=1.0, count=None, seed=3)
    assert unknown.rows_sampled == unknown.rows_val == 0 and unknown.shards == []


def test_merged_draws_are_sorted_by_key_with_their_counts():
    b = mix.draw_source(INDEX, "b", weight=None, count=6, seed=0)
    a = mix.draw_source(INDEX, "a", weight=1.0, count=None, seed=0)
    draws = mix.merge_draws([b, a])  # any source order
    assert draws.keys.tolist() == list(range(12)) + [100, 101, 102, 103]
    assert draws.counts.tolist() == a.counts.tolist() + b.counts.tolist()
    assert draws.is_val.tolist() == a.is_val.tolist() + b.is_val.tolist()
    empty = mix.merge_draws([])
    assert len(empty.keys) == len(empty.counts) == len(empty.is_val) == 0


def _shard(keys, lengths):
    """A per-source shard (mix.SHARD_COLUMNS); row k's tokens are k*1000 + 0..n-1 and its
    last token alone is trainable."""
    ids = [[k * 1000 + j for j in range(n)] for k, n in zip(keys, lengths)]
    return pa.table({
        "key": pa.array(keys, pa.int64()),
        "id": pa.array([f"r{k}" for k in keys], pa.string()),
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "labels": pa.array([[-100] * (n - 1) + [t[-1]] for t, n in zip(ids, lengths)],
                           pa.list_(pa.int32())),
        "num_tokens": pa.array(lengths, pa.int32()),
        "num_trainable": pa.array([1] * len(keys), pa.int32()),
    })


# Keys 0..19: train rows drawn 0, 1, 2 or 3 times; 20..23 val rows; 24, 25 not drawn at all
# (duplicates, or another mixture's rows).
SHARD = _shard(list(range(26)), [3 + k % 7 for k in range(26)])
DRAWS = mix.Draws(np.arange(24, dtype=np.int64),
                  np.array([k % 4 for k in range(20)] + [1] * 4, np.int64),
                  np.array([False] * 20 + [True] * 4))


def _ids(table):
    return table.column("id").to_pylist()


def test_a_drawn_shard_holds_each_row_its_count_of_times_and_val_rows_once():
    drawn = mix.draw_shard(SHARD, "src", DRAWS, seed=1, item=0, pack_len=0)
    assert [d.split for d in drawn] == ["train", "val"]
    train, val = drawn[0].rows, drawn[1].rows
    assert {i: _ids(train).count(i) for i in set(_ids(train))} == {
        f"r{k}": k % 4 for k in range(20) if k % 4}
    assert sorted(_ids(val)) == ["r20", "r21", "r22", "r23"]
    assert set(train.column("source").to_pylist()) == {"src"}
    assert train.column_names == ["id", "source", "input_ids", "labels", "num_tokens",
                                  "num_trainable"]
    for d in drawn:  # the stats are the table's
        assert d.stats == {
            "split": d.split, "rows": d.rows.num_rows, "samples": d.rows.num_rows,
            "tokens": sum(d.rows.column("num_tokens").to_pylist()),
            "trainable": sum(d.rows.column("num_trainable").to_pylist())}
    assert drawn[0].stats["rows"] == int(DRAWS.counts[:20].sum())


def test_a_drawn_shard_is_shuffled_by_seed_and_item_deterministically():
    def order(seed, item):
        return _ids(mix.draw_shard(SHARD, "s", DRAWS, seed=seed, item=item, pack_len=0)[0].rows)

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(2, 0)
    assert order(1, 0) != order(1, 1)
    assert sorted(order(1, 0)) == sorted(order(2, 0))


def test_a_shard_without_drawn_rows_gives_nothing():
    none = mix.Draws(np.array([500], np.int64), np.array([3], np.int64), np.array([False]))
    assert mix.draw_shard(SHARD, "s", none, seed=0, item=0, pack_len=0) == []


def test_packing_a_drawn_shard_keeps_every_token_and_label():
    plain = mix.draw_shard(SHARD, "s", DRAWS, seed=1, item=0, pack_len=0)
    packed = mix.draw_shard(SHARD, "s", DRAWS, seed=1, item=0, pack_len=16)
    for p, q in zip(plain, packed):
        bins = q.rows
        assert bins.num_rows < p.rows.num_rows
        assert max(bins.column("num_tokens").to_pylist()) <= 16
        assert sorted(t for r in bins.column("input_ids").to_pylist() for t in r) == sorted(
            t for r in p.rows.column("input_ids").to_pylist() for t in r)
        assert sorted(t for r in bins.column("labels").to_pylist() for t in r if t != -100) == \
            sorted(t for r in p.rows.column("labels").to_pylist() for t in r if t != -100)
        assert q.stats == {
            "split": q.split, "rows": bins.num_rows, "samples": p.rows.num_rows,
            "tokens": p.stats["tokens"], "trainable": p.stats["trainable"]}
        assert sum(bins.column("num_samples").to_pylist()) == p.rows.num_rows
        assert {"position_ids", "seq_ids"} <= set(bins.column_names)


def test_pack_table_bins_take_their_first_sample_id_and_source():
    rows = SHARD.slice(0, 4).append_column("source", pa.array(["s"] * 4, pa.string()))
    bins = mix.pack_table(rows, 10).to_pylist()
    assert sum(b["num_samples"] for b in bins) == 4
    for b in bins:
        assert b["id"] in {"r0", "r1", "r2", "r3"} and b["source"] == "s"
        first = int(b["id"][1:])
        assert b["input_ids"][:3] == [first * 1000, first * 1000 + 1, first * 1000 + 2]
        assert b["position_ids"][0] == 0 and b["seq_ids"][0] == 0


def test_mix_stats_sum_the_shards_and_the_lengths_of_the_plans():
    plans = {"a": mix.draw_source(INDEX, "a", weight=2.0, count=None, seed=0),
             "b": mix.draw_source(INDEX, "b", weight=None, count=3, seed=0)}
    totals = {"train": {"rows": 25, "tokens": 300, "trainable": 40, "samples": 25},
              "val": {"rows": 1, "tokens": 30, "trainable": 2, "samples": 1}}
    s = mix.mix_stats(plans, totals, 64, packed=False)
    assert s["rows_sampled"] == {"a": 22, "b": 3} and s["rows_val"] == {"a": 1, "b": 0}
    lens = np.array([4 + i for i in range(10)] * 2 + [31, 31] + [5, 5, 5])
    train = s["splits"]["train"]
    assert train["rows"] == 25 and train["samples"] == len(lens) == 25
    assert train["tokens"] == 300 and train["trainable_tokens"] == 40
    assert train["length"]["max"] == 31 and train["length"]["mean"] == lens.mean()
    assert train["max_seq_len"] == 64
    assert s["splits"]["val"]["length"] == {"mean": 30.0, "p50": 30.0, "p95": 30.0, "max": 30}
    assert s["padding_waste"] == {"unpacked": 1 - lens.sum() / (25 * 64), "packed": None}
    packed = mix.mix_stats(plans, {**totals, "train": {**totals["train"], "rows": 6}}, 64,
                           packed=True)
    assert packed["padding_waste"]["packed"] == 1 - 300 / (6 * 64)
    assert mix.waste(np.zeros(0), 8) == 0.0 and mix.waste(np.array([8, 4]), 8) == 0.25


def test_child_manifest_names_its_parent_and_hashes_the_mixture():
    base = {"version": 2, "hash": "h0", "tokenizer": {"sha256": "t"}, "seed": 42,
            "sources": {"a": {"tags": ["en"], "weight": 1.0, "count": None, "rows_kept": 9},
                        "b": {"tags": ["cot"], "weight": 1.0, "count": None}}}
    mixed = {"rows_sampled": {"a": 4}, "rows_val": {"a": 1},
             "splits": {"train": {"rows": 4}, "val": {"rows": 1}},
             "padding_waste": {"unpacked": 0.5, "packed": None}}
    m = mix.child_manifest(base, "/p", {"a": (0.5, None)}, mixed, 7, "2026-01-01T00:00:00Z")
    assert m["hash"] == hashlib.sha256(json.dumps(
        ["h0", {"a": {"weight": 0.5, "count": None}}, 7], sort_keys=True).encode()).hexdigest()
    assert m["parent"] == {"path": "/p", "hash": "h0"}
    assert m["mixture"] == {"a": {"weight": 0.5, "count": None}}
    assert m["seed"] == 7 and m["created"] == "2026-01-01T00:00:00Z"
    assert m["tokenizer"] == base["tokenizer"] and m["version"] == 2
    assert m["splits"] == mixed["splits"] and m["padding_waste"] == mixed["padding_waste"]
    assert m["sources"] == {"a": {"tags": ["en"], "weight": 0.5, "count": None, "rows_kept": 9,
                                  "rows_sampled": 4, "rows_val": 1}}
    assert base["hash"] == "h0" and "b" in base["sources"]  # the base is left as it was
    other = mix.child_manifest(base, "/p", {"a": (0.5, None)}, mixed, 8, "x")
    assert other["hash"] != m["hash"]
    assert mix.child_manifest(base, "/q", {"a": (0.5, None)}, mixed, 7, "y")["hash"] == m["hash"]


def test_split_stats_describe_the_sample_lengths_as_the_pair_statistics_do():
    lens = np.array([3, 9, 4, 20, 7], dtype=np.int64)
    stats = mix.split_stats({"rows": 4, "tokens": 43, "trainable": 17}, lens, 32)
    assert stats == {"rows": 4, "samples": 5, "tokens": 43, "trainable_tokens": 17,
                     "length": {"mean": 8.6, "p50": 7.0, "p95": pytest.approx(17.8),
                                "max": 20},
                     "max_seq_len": 32}
    assert stats["length"] == mix.length_stats([3, 9, 4, 20, 7])
    assert isinstance(stats["length"]["max"], int)
    empty = mix.split_stats({"rows": 0, "tokens": 0, "trainable": 0}, np.array([]), 32)
    assert empty["length"] == {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}


def test_a_row_key_holds_file_chunk_and_line():
    key = int(mix.make_key(7, 2, 3))
    assert key == (7 << 36) | (3 << 28) | 2
    assert (mix.key_file(key), mix.key_line(key)) == (7, 2)
    keys = np.array([mix.make_key(7, 2), key, mix.make_key(1, (1 << 28) - 1)], dtype=np.int64)
    assert mix.key_chunk(keys).tolist() == [0, 3, 0]
    assert mix.key_line(int(keys[2])) == (1 << 28) - 1
