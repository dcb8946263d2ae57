import numpy as np

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
