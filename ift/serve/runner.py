"""Running a batch of requests on the model: prefill, decode steps, the KV cache.

A `Batch` is the rows decoding together: per-row token choice and text, the attention
mask, positions and transformers' `DynamicCache`. Rows are left-padded so every row ends
at the same column; finished rows leave (`select`), and requests prefilled later join a
running batch (`join`, continuous batching). Both edit the cache's layers in place, which
is only sound for plain `DynamicLayer`s: `Runner.joinable` says whether the model's cache
is made of them.

The runner knows nothing of queues or threads; the engine (engine.py) decides which
requests run and calls it on its thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ift.serve.sampling import SamplingParams, TextStream, TokenChooser


@dataclass
class Request:
    """One request as the engine runs it: its prompt, decoding parameters and adapter,
    and `sink`, which receives its events."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    sink: Callable[[dict[str, Any]], None]
    deltas: bool = True  # send text as it comes; else once, in the end event
    cancelled: bool = False
    done: bool = False


class Runner:
    """Prefill and decode steps for batches of requests on one model."""

    def __init__(self, tokenizer, *, device: str, pad_id: int,
                 forward: Callable[[dict, list[str | None]], Any],
                 stop_ids: Callable[[str | None], set[int]],
                 finish: Callable[[Request, dict[str, Any] | None], None]):
        """`forward(kwargs, adapters)` runs the model on a batch whose row i uses
        adapters[i]; `stop_ids(adapter)` are the tokens that end a reply; `finish(req,
        event)` ends a request (event None: it was cancelled)."""
        self.tokenizer = tokenizer
        self.device = device
        self.pad_id = pad_id
        self._forward_fn = forward
        self._stop_ids = stop_ids
        self._finish = finish
        self.steps = 0
        self.joinable: bool | None = None  # known after the first prefill

    def _forward(self, ids, mask, pos, cache, rows: list[Request]):
        kwargs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                      position_ids=pos.to(self.device), past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
        out = self._forward_fn(kwargs, [r.adapter for r in rows])
        self.steps += 1
        return out.logits[:, -1, :]

    def prefill(self, reqs: list[Request]) -> Batch:
        """Run the prompts (left-padded) and choose each row's first token."""
        longest = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), longest), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: every row ends at the same column
            n = len(r.prompt_ids)
            ids[i, longest - n:] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, longest - n:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with torch.inference_mode():
            logits = self._forward(ids, mask, pos, cache, reqs)
        if self.joinable is None:  # rows can join a batch only with plain dynamic layers
            self.joinable = all(type(layer) is DynamicLayer for layer in cache.layers)
        batch = Batch(self.tokenizer, reqs, mask, pos[:, -1:], cache)
        self._advance(batch, logits)
        return batch

    def step(self, batch: Batch) -> None:
        """One decode step for every row of the batch."""
        batch.mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=torch.long)], 1)
        batch.pos = batch.pos + 1
        step_ids = torch.tensor([[t] for t in batch.next_tokens], dtype=torch.long)
        with torch.inference_mode():
            logits = self._forward(step_ids, batch.mask, batch.pos, batch.cache, batch.rows)
        self._advance(batch, logits)

    def _advance(self, batch: Batch, logits) -> None:
        """Choose a token per row, send text, finish rows that are done, drop them."""
        scores = logits.float().cpu()
        greedy = torch.argmax(scores, dim=-1).tolist()
        keep: list[int] = []
        next_tokens: list[int] = []
        for i, r in enumerate(batch.rows):
            if r.cancelled:
                self._finish(r, None)
                continue
            chooser, text = batch.choosers[i], batch.texts[i]
            if chooser.plain_greedy:
                tok = greedy[i]
            else:
                tok = chooser.choose(batch.history(i), scores[i:i + 1])
            batch.counts[i] += 1
            reason = None
            if tok in self._stop_ids(r.adapter):
                reason = "stop"
                delta = text.flush()
            else:
                batch.push(i, tok)
                delta = text.push(tok)
                if text.stopped:
                    reason = "stop"
                elif batch.counts[i] >= r.params.max_tokens:
                    reason = "length"
                    delta += text.flush()
            if delta and r.deltas and not r.cancelled:
                r.sink({"type": "delta", "text": delta})
            if reason is not None:
                end = {"type": "end", "finish_reason": reason,
                       "prompt_tokens": len(r.prompt_ids), "completion_tokens": batch.counts[i]}
                if not r.deltas:
                    end["text"], end["token_ids"] = text.text, list(text.ids)
                self._finish(r, end)
            else:
                keep.append(i)
                next_tokens.append(tok)
        batch.select(keep)
        batch.next_tokens = next_tokens


class Batch:
    """The rows decoding together: per-row state, attention mask, positions, KV cache."""

    def __init__(self, tokenizer, rows: list[Request], mask, pos, cache):
        self.rows = list(rows)
        self.choosers = [TokenChooser(r.params) for r in rows]
        self.texts = [TextStream(tokenizer, r.params.stop, deltas=r.deltas) for r in rows]
        # Token history (prompt + output) only for rows whose penalties read it.
        self.hist: list[list[int] | None] = [
            list(r.prompt_ids) if c.needs_history else None
            for r, c in zip(rows, self.choosers)]
        self.counts = [0] * len(rows)
        self.mask = mask  # [rows, cache length]: 0 on left padding
        self.pos = pos  # [rows, 1]: position of each row's last token
        self.cache = cache
        self.next_tokens: list[int] = []

    def history(self, i: int):
        h = self.hist[i]
        return torch.tensor([h if h is not None else []], dtype=torch.long)

    def push(self, i: int, tok: int) -> None:
        if self.hist[i] is not None:
            self.hist[i].append(tok)

    def select(self, keep: list[int]) -> None:
        """Keep only these rows, and drop cache columns no remaining row attends to."""
        if len(keep) == len(self.rows):
            return
        idx = torch.tensor(keep, dtype=torch.long)
        if keep:
            self.cache.batch_select_indices(idx.to(self.mask.device))
            self.mask, self.pos = self.mask[idx], self.pos[idx]
            used = (self.mask.sum(0) > 0).nonzero()
            first = int(used[0]) if len(used) else 0
            if first > 0:
                self.mask = self.mask[:, first:]
                for layer in self.cache.layers:
                    layer.keys = layer.keys[..., first:, :]
                    layer.values = layer.values[..., first:, :]
        for name in ("rows", "choosers", "texts", "hist", "counts"):
            items = getattr(self, name)
            setattr(self, name, [items[i] for i in keep])

    def join(self, other: Batch) -> Batch:
        """Append other's rows: both caches are left-padded to the longer one."""
        if not other.rows:
            return self
        n = max(self.mask.shape[1], other.mask.shape[1])

        def lpad(t, dim: int):
            short = n - t.shape[dim]
            if short == 0:
                return t
            shape = list(t.shape)
            shape[dim] = short
            return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([lpad(mine.keys, -2), lpad(theirs.keys, -2)], 0)
            mine.values = torch.cat([lpad(mine.values, -2), lpad(theirs.values, -2)], 0)
        self.mask = torch.cat([lpad(self.mask, 1), lpad(other.mask, 1)], 0)
        self.pos = torch.cat([self.pos, other.pos], 0)
        for name in ("rows", "choosers", "texts", "hist", "counts", "next_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self
