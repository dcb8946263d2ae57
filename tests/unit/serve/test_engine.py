"""The decode engine against plain transformers + PEFT, adapters, LRU release, catalog."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import time

import pytest
from train_support import random_lora_adapter as make_adapter

from ift.serve.adapters import Catalog, check_adapter_name, read_lineage
from ift.serve.protocol import RequestError
from ift.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)



@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = make_adapter(tiny_model, str(root / "a"), seed=1)
    b = make_adapter(tiny_model, str(root / "runs" / "b"), seed=2)
    with open(os.path.join(b, "ift_lineage.json"), "w") as f:
        json.dump({"mlflow_run_id": "run123", "data_manifest_hash": "abc", "method": "lora",
                   "base_model": tiny_model}, f)
    return {"root": str(root), "a": a, "b": b}


@pytest.fixture(scope="module")
def engine(tiny_model, adapters):
    from ift.serve.engine import Engine

    eng = Engine(tiny_model, max_batch_size=8, batch_wait_timeout_s=0.02)
    eng.load_adapter("a", adapters["a"]).result()
    eng.load_adapter("runs/b", adapters["b"]).result()
    yield eng
    eng.shutdown()


def reference_ids(tiny_model, adapter: str | None, prompt_ids: list[int], n: int) -> list[int]:
    """Plain transformers (+ PeftModel.from_pretrained) greedy generate."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                         dtype=torch.long), max_new_tokens=n, do_sample=False,
                         pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def decode_like_engine(engine, ids: list[int]) -> str:
    eos = engine.eos_ids
    kept = []
    for t in ids:
        if t in eos:
            break
        kept.append(t)
    return engine.tokenizer.decode(kept, skip_special_tokens=True)


def test_greedy_equals_transformers_generate_for_base_and_adapters(engine, tiny_model, adapters):
    ids = engine.chat_prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    outs = {}
    for key, path in ((None, None), ("a", adapters["a"]), ("runs/b", adapters["b"])):
        got = engine.generate(ids, GREEDY, key)
        ref = reference_ids(tiny_model, path, ids, GREEDY.max_tokens)
        assert got["text"] == decode_like_engine(engine, ref), key
        assert got["prompt_tokens"] == len(ids)
        assert 1 <= got["completion_tokens"] <= GREEDY.max_tokens
        outs[key] = got["text"]
    assert len(set(outs.values())) == 3  # each adapter changes the output


def test_concurrent_requests_for_different_adapters_each_get_their_own(engine):
    ids = engine.chat_prompt_ids([{"role": "user", "content": "Name three colors."}])
    short = engine.chat_prompt_ids([{"role": "user", "content": "Hi"}])
    alone = {(k, tuple(p)): engine.generate(p, GREEDY, k)["text"]
             for k in (None, "a", "runs/b") for p in (ids, short)}
    jobs = [(ids, None), (ids, "a"), (short, "runs/b"), (ids, "runs/b"), (short, "a"), (short, None)] * 2
    steps = engine.steps
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        futs = [ex.submit(engine.generate, p, GREEDY, k) for p, k in jobs]
        got = [f.result()["text"] for f in futs]
    assert got == [alone[(k, tuple(p))] for p, k in jobs]
    # They were batched: far fewer decode steps than one request after another.
    assert engine.steps - steps < len(jobs) * GREEDY.max_tokens / 2


def test_generate_many_keeps_order_and_batches(engine):
    prompts = [engine.completion_prompt_ids(t) for t in ("one", "two words", "three words here")]
    res = engine.generate_many([(p, GREEDY, "a") for p in prompts])
    assert [r["text"] for r in res] == [engine.generate(p, GREEDY, "a")["text"] for p in prompts]


def test_max_tokens_stop_strings_and_seeded_sampling(engine):
    ids = engine.completion_prompt_ids("Once upon a time")
    r = engine.generate(ids, SamplingParams(max_tokens=5, temperature=0.0))
    assert r["completion_tokens"] <= 5
    full = engine.generate(ids, SamplingParams(max_tokens=20, temperature=0.0))
    if full["finish_reason"] == "length":
        assert full["completion_tokens"] == 20
    text = full["text"]
    if len(text) > 4:
        stop = text[2:4]
        cut = engine.generate(ids, SamplingParams(max_tokens=20, temperature=0.0, stop=[stop]))
        assert cut["finish_reason"] == "stop"
        assert cut["text"] == text[: text.find(stop)]
    s1 = engine.generate(ids, SamplingParams(max_tokens=12, temperature=1.0, seed=5))
    s2 = engine.generate(ids, SamplingParams(max_tokens=12, temperature=1.0, seed=5))
    assert s1["text"] == s2["text"]


def test_prompt_longer_than_context_is_a_request_error(engine):
    with pytest.raises(RequestError) as e:
        engine.check_length([1] * (engine.max_context + 1), GREEDY)
    assert e.value.status == 400
    fitted = engine.check_length([1] * (engine.max_context - 3), GREEDY)
    assert fitted.max_tokens == 3


def test_released_adapter_is_deleted_only_when_unused(tiny_model, adapters):
    from ift.serve.engine import Engine

    eng = Engine(tiny_model, max_batch_size=4)
    try:
        eng.load_adapter("a", adapters["a"]).result()
        eng.load_adapter("b", adapters["b"]).result()
        ids = eng.completion_prompt_ids("hello")
        before = eng.generate(ids, GREEDY, "a")["text"]
        # Release "a" while a request for it is queued: the request still completes.
        done = []
        eng.submit(ids, GREEDY, "a", lambda ev: done.append(ev))
        eng.release_adapter("a")
        eng.generate(ids, GREEDY, "b")
        assert done[-1]["type"] == "end"
        assert "".join(e["text"] for e in done if e["type"] == "delta") == before
        assert eng.loaded_adapters() == ["b"]
        assert "a" not in eng.adapters.names  # actually deleted from the model
        # The last adapter is never deleted from PEFT, but it is reloadable and usable.
        eng.release_adapter("b")
        eng.load_adapter("a", adapters["a"]).result()
        assert eng.generate(ids, GREEDY, "a")["text"] == before
        # A request for an adapter that is not loaded fails cleanly.
        with pytest.raises(RequestError):
            eng.generate(ids, GREEDY, "never-loaded")
    finally:
        eng.shutdown()


def test_base_batches_run_the_plain_model_and_peft_still_finds_its_layers(tiny_model, adapters):
    """Base-only batches take the LoRA layers out of the model tree; adapter batches and
    PEFT's own loads and deletes must see them again, whatever ran last."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ift.serve.engine import Engine

    def lora_names(eng) -> set[str]:
        return {k for m in eng.adapters.peft.modules() if isinstance(m, BaseTunerLayer)
                for k in m.lora_A}

    eng = Engine(tiny_model, max_batch_size=4)
    try:
        ids = eng.completion_prompt_ids("The weather today")
        plain = eng.generate(ids, GREEDY)["text"]
        eng.load_adapter("a", adapters["a"]).result()
        eng.load_adapter("b", adapters["b"]).result()
        with_a = eng.generate(ids, GREEDY, "a")["text"]
        with_b = eng.generate(ids, GREEDY, "b")["text"]
        assert len({plain, with_a, with_b}) == 3
        assert eng.generate(ids, GREEDY)["text"] == plain
        assert not any(isinstance(m, BaseTunerLayer) for m in eng.model.modules())
        # "b" is deleted once the next batch, a base one with the LoRA layers out, is over.
        eng.release_adapter("b")
        assert eng.generate(ids, GREEDY)["text"] == plain
        assert eng.loaded_adapters() == ["a"]
        deadline = time.monotonic() + 60  # the engine thread deletes it just after the batch
        while "b" in eng.adapters.names and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "b" not in eng.adapters.names
        assert eng.generate(ids, GREEDY, "a")["text"] == with_a
        assert lora_names(eng) == {eng.adapters.names["a"]}  # gone from every layer
        # Loading right after a base batch: PEFT wraps each layer once, not twice.
        assert eng.generate(ids, GREEDY)["text"] == plain
        eng.load_adapter("b", adapters["b"]).result()
        assert eng.generate(ids, GREEDY, "b")["text"] == with_b
        assert not any(isinstance(m.base_layer, BaseTunerLayer)
                       for m in eng.model.modules() if isinstance(m, BaseTunerLayer))
        assert eng.generate(ids, GREEDY)["text"] == plain
    finally:
        eng.shutdown()


def test_non_lora_adapter_is_refused_with_a_reason(tiny_model, tmp_path):
    from ift.serve.engine import Engine

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    eng = Engine(tiny_model)
    try:
        with pytest.raises(RequestError, match="PREFIX_TUNING"):
            eng.load_adapter("p", str(tmp_path)).result()
    finally:
        eng.shutdown()


# ---------------------------------------------------------------------------------------
# Catalog: names, traversal, listing with lineage
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/../../etc", "/etc/passwd", "a//b", ".", "a/./b",
                                  "-x", "a b", "x" * 600, "", "a\\b", "s3://other/bucket"])
def test_unsafe_adapter_names_are_not_found(name):
    with pytest.raises(RequestError) as e:
        check_adapter_name(name)
    assert e.value.status == 404


def test_catalog_resolves_lists_and_never_leaves_the_root(tiny_model, adapters, tmp_path):
    outside = make_adapter(tiny_model, str(tmp_path / "outside"), seed=3)
    cat = Catalog("base", tiny_model, {"fixed": adapters["a"]}, adapters["root"],
                  {"merged-x": tiny_model})
    assert cat.resolve("base").kind == "base"
    assert cat.resolve("merged-x").kind == "merged"
    assert cat.resolve("fixed").path == adapters["a"]
    t = cat.resolve("runs/b")
    assert (t.kind, t.model_id) == ("adapter", "runs/b")
    # The full path under the root names the same adapter.
    assert cat.resolve(os.path.join(adapters["root"], "runs", "b")).model_id == "runs/b"
    for bad in ("../outside", outside, "runs/../../outside", "nope", "runs"):
        with pytest.raises(RequestError) as e:
            cat.resolve(bad)
        assert e.value.status == 404, bad
    models = {m["id"]: m for m in cat.list_models()}
    assert set(models) == {"base", "fixed", "a", "runs/b", "merged-x"}
    meta = models["runs/b"]["metadata"]
    assert (meta["mlflow_run_id"], meta["data_manifest_hash"], meta["method"]) == (
        "run123", "abc", "lora")
    assert models["a"]["metadata"]["method"] == "lora"  # from adapter_config.json
    assert models["a"]["metadata"]["mlflow_run_id"] is None
    assert models["merged-x"]["metadata"]["type"] == "merged"
    with pytest.raises(ValueError, match="used twice"):
        Catalog("base", tiny_model, {"base": adapters["a"]})


def test_lineage_of_a_plain_dir_is_empty(tmp_path):
    assert read_lineage(str(tmp_path)) == {"mlflow_run_id": None, "data_manifest_hash": None,
                                           "method": None, "base_model": None}


def test_stacked_lora_equals_peft_mixed_batches(tiny_model, adapters):
    """The one-pass multi-adapter path computes what PEFT's mixed batches compute."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ift.serve.multilora import StackedLoRA, supported

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    peft = PeftModel.from_pretrained(model, adapters["a"], adapter_name="x")
    peft.load_adapter(adapters["b"], adapter_name="y")
    assert supported(peft)
    stacked = StackedLoRA(peft)
    slots = stacked.rebuild(["x", "y"])
    ids = torch.randint(0, model.config.vocab_size, (4, 7), generator=torch.Generator().manual_seed(0))
    names = ["x", "__base__", "y", "x"]
    with torch.no_grad():
        want = peft(input_ids=ids, adapter_names=names).logits
        with stacked.rows(torch.tensor([slots["x"], 0, slots["y"], slots["x"]])):
            got = peft(input_ids=ids).logits
        after = peft(input_ids=ids, adapter_names=names).logits  # the patch is inert outside
    assert (got - want).abs().max().item() < 1e-4
    assert torch.equal(after, want)
    assert (want[0] - want[2]).abs().max().item() > 1e-2  # the adapters do differ


def test_a_request_joins_a_running_batch(engine):
    """Continuous batching: a request that arrives mid-generation does not wait for the
    running batch to finish, and still gets the output it gets alone."""
    import threading

    long_ids = engine.completion_prompt_ids("A long story begins here and")
    short_ids = engine.chat_prompt_ids([{"role": "user", "content": "Quick one"}])
    short = SamplingParams(max_tokens=3, temperature=0.0)
    long = SamplingParams(max_tokens=400, temperature=0.0)
    alone = engine.generate(short_ids, short, "a")["text"]
    order: list[str] = []
    started = threading.Event()
    finished = threading.Event()

    def long_sink(ev):
        started.set()
        if ev["type"] != "delta":
            order.append("long")
            finished.set()

    engine.submit(long_ids, long, None, long_sink)
    assert started.wait(60)
    got = engine.generate(short_ids, short, "a", timeout=60)
    order.append("short")
    assert finished.wait(120)
    assert order == ["short", "long"]
    assert got["text"] == alone


def test_complete_without_deltas_equals_the_streamed_text(engine):
    import asyncio

    ids = engine.chat_prompt_ids([{"role": "user", "content": "Say something long."}])
    params = SamplingParams(max_tokens=20, temperature=0.0)

    async def both():
        streamed = [ev async for ev in engine.stream(ids, params, "runs/b")]
        whole = await engine.complete(ids, params, "runs/b")
        return streamed, whole

    streamed, whole = asyncio.run(both())
    assert streamed[-1]["type"] == "end" and whole["type"] == "end"
    assert whole["text"] == "".join(e["text"] for e in streamed if e["type"] == "delta")
    assert whole["completion_tokens"] == streamed[-1]["completion_tokens"]
