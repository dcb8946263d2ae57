"""The batch runner on a tiny random llama, without the engine's thread and queues: how
rows finish (length, stop token, cancel), what events they send, and the KV cache and
mask when rows leave a batch or join it."""

from __future__ import annotations

import pytest

from ift.serve.runner import Request, Runner
from ift.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def model_and_tok(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), \
        AutoTokenizer.from_pretrained(tiny_model)


class _Run:
    """A Runner with every finished request's event recorded."""

    def __init__(self, model, tok, stops: set[int] | None = None):
        self.finished: list[tuple[Request, dict | None]] = []
        self.runner = Runner(tok, device="cpu", pad_id=tok.pad_token_id,
                             forward=lambda kwargs, adapters: model(**kwargs),
                             stop_ids=lambda adapter: stops or set(),
                             finish=lambda req, ev: self.finished.append((req, ev)))

    def until_done(self, batch, limit: int = 64) -> None:
        while batch.rows and limit:
            self.runner.step(batch)
            limit -= 1


def _request(ids, n: int, events: list, deltas: bool = True) -> Request:
    return Request(prompt_ids=list(ids), params=SamplingParams(max_tokens=n, temperature=0.0),
                   adapter=None, sink=events.append, deltas=deltas)


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """n argmax tokens, each from a full forward pass over the text so far (no cache, no
    padding, no stop tokens)."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(torch.argmax(logits)))
    return out


PROMPTS = ["The river runs", "Hello"]


def test_rows_of_different_lengths_end_at_max_tokens_with_their_greedy_text(model_and_tok):
    model, tok = model_and_tok
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert len(ids[0]) != len(ids[1])
    run = _Run(model, tok)
    events: list[list] = [[], []]
    batch = run.runner.prefill([_request(ids[i], 6, events[i]) for i in range(2)])
    run.until_done(batch)
    assert [r.prompt_ids for r, _ in run.finished] == ids  # both end on the same step
    for i in range(2):
        end = run.finished[i][1]
        assert end == {"type": "end", "finish_reason": "length", "prompt_tokens": len(ids[i]),
                       "completion_tokens": 6}
        text = "".join(e["text"] for e in events[i] if e["type"] == "delta")
        assert text == tok.decode(_greedy(model, ids[i], 6), skip_special_tokens=True)
    assert run.runner.steps == 6  # one prefill and five decode steps
    assert run.runner.joinable is True


def test_a_stop_token_ends_a_row_unseen_and_without_deltas_the_text_comes_at_the_end(
        model_and_tok):
    model, tok = model_and_tok
    ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    want = _greedy(model, ids, 10)
    # The first token after the first that has not come before: it ends the reply there.
    k = next(i for i in range(1, 10) if want[i] not in want[:i])
    run = _Run(model, tok, stops={want[k]})
    events: list = []
    batch = run.runner.prefill([_request(ids, 10, events, deltas=False)])
    run.until_done(batch)
    (_req, end), = run.finished
    assert events == []  # no deltas were asked for
    # The stop token counts as generated but is not part of the text.
    assert end["finish_reason"] == "stop" and end["completion_tokens"] == k + 1
    assert end["text"] == tok.decode(want[:k], skip_special_tokens=True)


def test_a_cancelled_row_leaves_the_batch_and_its_cache_columns_go(model_and_tok):
    model, tok = model_and_tok
    long_ids = tok(PROMPTS[0] + " and the hills are green today", add_special_tokens=False)[
        "input_ids"]
    short_ids = tok(PROMPTS[1], add_special_tokens=False)["input_ids"]
    run = _Run(model, tok)
    long_events: list = []
    short_events: list = []
    long_req = _request(long_ids, 20, long_events)
    batch = run.runner.prefill([long_req, _request(short_ids, 5, short_events)])
    assert batch.mask.shape == (2, len(long_ids))
    long_req.cancelled = True
    run.runner.step(batch)
    assert run.finished[0] == (long_req, None)  # cancelled: finished without an event
    assert len(batch.rows) == 1
    # The short row's left padding is dropped from the mask and from every cache layer.
    width = len(short_ids) + 1
    assert batch.mask.shape == (1, width) and int(batch.mask.sum()) == width
    assert all(layer.keys.shape[-2] == width for layer in batch.cache.layers)
    run.until_done(batch)
    text = "".join(e["text"] for e in short_events if e["type"] == "delta")
    assert text == tok.decode(_greedy(model, short_ids, 5), skip_special_tokens=True)


def test_a_row_that_joins_a_running_batch_gets_the_text_it_gets_alone(model_and_tok):
    model, tok = model_and_tok
    first_ids = tok(PROMPTS[1], add_special_tokens=False)["input_ids"]
    late_ids = tok("Once upon a time there was a", add_special_tokens=False)["input_ids"]
    run = _Run(model, tok)
    first_events: list = []
    late_events: list = []
    batch = run.runner.prefill([_request(first_ids, 8, first_events)])
    for _ in range(3):
        run.runner.step(batch)
    late = run.runner.prefill([_request(late_ids, 4, late_events)])
    joined = batch.join(late)
    assert joined is batch and len(batch.rows) == 2
    width = max(len(first_ids) + 3, len(late_ids))  # prefill + 3 steps
    assert batch.mask.shape == (2, width)
    assert all(layer.keys.shape[-2] == width and layer.keys.shape[0] == 2
               for layer in batch.cache.layers)
    run.until_done(batch)
    for ids, events, n in ((first_ids, first_events, 8), (late_ids, late_events, 4)):
        text = "".join(e["text"] for e in events if e["type"] == "delta")
        assert text == tok.decode(_greedy(model, ids, n), skip_special_tokens=True)
