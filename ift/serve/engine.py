"""The decode engine of one replica: a base model, LoRA adapters on it, dynamic batching.

One engine thread owns the model. Requests and adapter commands reach it through a
queue; it forms a batch from what is waiting (up to `max_batch_size`, waiting at most
`batch_wait_timeout_s` for it to fill) and decodes the batch step by step with a KV cache,
sending each request's text deltas back as they are produced. Rows whose requests finish
(or are cancelled) leave the batch.

Requests for different adapters share one forward pass: PEFT's mixed-adapter batch
inference (`adapter_names=` per row, `__base__` for the base model) applies each row's
own LoRA weights, so a batch never has to be split by adapter and no shared "active
adapter" is switched under a running request. Adapter loads and deletions run on the
same thread between decode steps; an adapter evicted while requests still use it is
deleted only after they finish.

No Ray here: the Serve deployment (app.py) wraps an Engine, and so do `ift chat
--model-path` and `ift predict`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ift.artifacts import ADAPTER_CONFIG, PromptFormat, read_prompt_format
from ift.serve.generation import (
    RequestError,
    SamplingParams,
    TextStream,
    TokenChooser,
    internal_error,
)

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
SUPPORTED_PEFT_TYPES = ("LORA",)


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    sink: Callable[[dict[str, Any]], None]
    deltas: bool = True  # send text as it comes; else once, in the end event
    cancelled: bool = False
    done: bool = False
    submitted: float = field(default_factory=time.monotonic)


class Engine:
    """A model, its tokenizer and a thread decoding batches of requests."""

    def __init__(self, model_path: str, *, dtype: str = "auto", device: str = "cpu",
                 template: str = "auto", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.01, trust_remote_code: bool = False,
                 num_threads: int | None = None, max_context: int | None = None,
                 model=None, tokenizer=None):
        """`model` and `tokenizer`, when given, are used as they are instead of loading
        `model_path` (which then only names them): `ift eval` and evaluation during
        training decode with a model they already hold."""
        import torch

        from ift.config import ModelConfig
        from ift.models import load_model, load_tokenizer

        if num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
        self.model_path = model_path
        self.template = template
        self.device = device
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_wait_timeout_s = max(0.0, float(batch_wait_timeout_s))
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(
            model_path, trust_remote_code=trust_remote_code)
        if model is None:
            mcfg = ModelConfig(name_or_path=model_path, dtype=dtype,
                               trust_remote_code=trust_remote_code)
            model = load_model(mcfg, device=device)
        self.model = model
        self.model.eval()
        self.peft = None  # the PeftModel wrapping self.model once an adapter is loaded
        self.stacked = None  # StackedLoRA over self.peft when its adapters qualify
        self._lora_slots: list | None = None  # (parent, name, LoRA layer) in the model tree
        self._detached = False  # LoRA layers swapped out for their base layers
        self._active: str | None = None  # PEFT's active adapter, when this engine set it
        self._joinable: bool | None = None  # known after the first prefill
        cfg = self.model.config
        ctx = max_context or getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None) or self.tokenizer.model_max_length
        self.max_context = int(min(ctx, 1_000_000))
        # The prompt format the model was trained with (recorded in a merged model's dir),
        # or `template` for this tokenizer; each adapter brings its own (see _load).
        self.prompt_format = self._choose_format(model_path)
        self._formats: dict[str, PromptFormat] = {}
        self.eos_ids = eos_ids(self.model, self.tokenizer) | set(self.prompt_format.stop_token_ids)
        """Tokens that end a base-model reply: eos and the template's end-of-turn tokens."""
        self._stops: dict[str, set[int]] = {}  # the same per adapter
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids), 0))
        self._adapters: dict[str, str] = {}  # loaded: public key -> PEFT adapter name
        self._evicted: set[str] = set()
        self._refs: dict[str, int] = {}
        self._counter = 0
        self._queue: queue.Queue = queue.Queue()
        self._waiting: list[_Request] = []
        self._stopping = False
        self._error: BaseException | None = None
        self.steps = 0
        self.adapter_loads = 0  # adapters read from disk (an LRU that thrashes shows here)
        self._thread = threading.Thread(target=self._run, name="ift-engine", daemon=True)
        self._thread.start()

    # -----------------------------------------------------------------------------------
    # Prompts
    # -----------------------------------------------------------------------------------

    def _choose_format(self, path: str, fallback: PromptFormat | None = None) -> PromptFormat:
        """The format recorded at path (or `fallback` when there is none), unless an
        explicit template overrides it (with a warning)."""
        from ift.data.templates import choose_prompt_format

        recorded = read_prompt_format(path)
        if recorded is None and fallback is not None:
            return fallback
        return choose_prompt_format(recorded, self.template, self.tokenizer, path, log)

    def format_of(self, adapter: str | None = None) -> PromptFormat:
        """The prompt format of the base model, or of a loaded adapter."""
        return self._formats.get(adapter, self.prompt_format) if adapter else self.prompt_format

    def chat_prompt_ids(self, messages: list[dict[str, str]],
                        adapter: str | None = None) -> list[int]:
        """Token ids of a conversation rendered in the prompt format of the model (or of
        the loaded adapter), ready to generate."""
        try:
            from ift.data.templates import format_prompt

            text = format_prompt(messages, self.tokenizer, self.format_of(adapter))
        except (ValueError, KeyError) as e:
            raise RequestError(f"messages cannot be rendered: {e}", "messages") from e
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def check_length(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Fit max_tokens into the context window; a prompt that fills it is a 400."""
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise RequestError(
                f"the prompt is {len(prompt_ids)} tokens; this model's context holds "
                f"{self.max_context}", "messages")
        if params.max_tokens > room:
            params = SamplingParams(**{**params.to_dict(), "max_tokens": room})
        return params

    # -----------------------------------------------------------------------------------
    # Public, thread-safe API
    # -----------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
               sink: Callable[[dict[str, Any]], None], deltas: bool = True) -> _Request:
        """Queue a request; `sink` receives its events on the engine thread:
        {type: delta, text}, then {type: end, finish_reason, prompt_tokens,
        completion_tokens} or {type: error, status, message}. With deltas=False there
        are no delta events and the end event carries the whole `text`."""
        self._raise_if_dead()
        req = _Request(list(prompt_ids), params, adapter, sink, deltas=deltas)
        self._queue.put(("req", req))
        return req

    def stream(self, prompt_ids: list[int], params: SamplingParams,
               adapter: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Submit now (so the adapter is referenced before anything else can run) and return
        the request's events as an async iterator; leaving it early cancels the request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = self.submit(prompt_ids, params, adapter,
                          lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        return self._events(req, q)

    async def _events(self, req: _Request, q: asyncio.Queue) -> AsyncIterator[dict[str, Any]]:
        try:
            while True:
                ev = await q.get()
                # Coalesce what is already there into one event (fewer messages under load).
                while ev["type"] == "delta" and not q.empty():
                    nxt = q.get_nowait()
                    if nxt["type"] != "delta":
                        yield ev
                        ev = nxt
                        break
                    ev = {"type": "delta", "text": ev["text"] + nxt["text"]}
                yield ev
                if ev["type"] in ("end", "error"):
                    return
        finally:
            req.cancelled = True

    async def complete(self, prompt_ids: list[int], params: SamplingParams,
                       adapter: str | None = None) -> dict[str, Any]:
        """The whole result as one event (no per-token traffic to the event loop)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def sink(ev: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(ev))

        req = self.submit(prompt_ids, params, adapter, sink, deltas=False)
        try:
            return await fut
        finally:
            req.cancelled = True

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 adapter: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Blocking: the whole result {text, finish_reason, prompt_tokens, completion_tokens}."""
        done = threading.Event()
        parts: list[str] = []
        end: dict[str, Any] = {}

        def sink(ev: dict[str, Any]) -> None:
            if ev["type"] == "delta":
                parts.append(ev["text"])
            else:
                end.update(ev)
                done.set()

        req = self.submit(prompt_ids, params, adapter, sink)
        if not done.wait(timeout):
            req.cancelled = True
            raise TimeoutError(f"generation did not finish in {timeout}s")
        if end["type"] == "error":
            raise RequestError(end["message"], end.get("param"), end.get("status", 500))
        return {"text": "".join(parts), **{k: v for k, v in end.items() if k != "type"}}

    def generate_many(self, jobs: list[tuple[list[int], SamplingParams, str | None]],
                      timeout: float | None = None, deltas: bool = True
                      ) -> list[dict[str, Any]]:
        """Blocking: submit every job at once (so they batch) and return results in order.
        deltas=False decodes each output once, at its end (no streaming)."""
        results: list[dict[str, Any]] = [{} for _ in jobs]
        parts: list[list[str]] = [[] for _ in jobs]
        left = threading.Semaphore(0)

        def sink_for(i: int):
            def sink(ev: dict[str, Any]) -> None:
                if ev["type"] == "delta":
                    parts[i].append(ev["text"])
                else:
                    results[i] = dict(ev)
                    left.release()
            return sink

        reqs = [self.submit(ids, params, adapter, sink_for(i), deltas=deltas)
                for i, (ids, params, adapter) in enumerate(jobs)]
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in jobs:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not left.acquire(timeout=wait):
                for r in reqs:
                    r.cancelled = True
                raise TimeoutError(f"generation did not finish in {timeout}s")
        out = []
        for res, p in zip(results, parts):
            if res["type"] == "error":
                raise RuntimeError(res["message"])
            out.append({"text": "".join(p), **{k: v for k, v in res.items() if k != "type"}})
        return out

    def load_adapter(self, key: str, local_path: str) -> concurrent.futures.Future:
        """Load a PEFT adapter directory under `key` (on the engine thread)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(("load", key, local_path, fut))
        return fut

    def release_adapter(self, key: str) -> None:
        """The adapter may be deleted once no request uses it (LRU eviction)."""
        self._queue.put(("release", key))

    def loaded_adapters(self) -> list[str]:
        return sorted(k for k in list(self._adapters) if k not in self._evicted)

    def has_adapter(self, key: str) -> bool:
        """Whether `key` is loaded and not evicted (safe from any thread)."""
        return key in self._adapters and key not in self._evicted

    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def shutdown(self, timeout: float = 10.0) -> None:
        self._queue.put(("stop",))
        self._thread.join(timeout)

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"engine stopped: {self._error!r}")
        if self._stopping or not self._thread.is_alive():
            raise RuntimeError("engine is shut down")

    # -----------------------------------------------------------------------------------
    # Engine thread
    # -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._take(block=not self._waiting, timeout=None)
                if self._stopping:
                    break
                if not self._waiting:
                    continue
                # Dynamic batching: give a batch a moment to fill. Once rows are known to
                # join running batches (continuous batching), a late request joins at the
                # next step instead, so nobody waits.
                wait = 0.0 if self._joinable else self.batch_wait_timeout_s
                deadline = time.monotonic() + wait
                while len(self._live_waiting()) < self.max_batch_size and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._take(block=True, timeout=left)
                batch = []
                rest = []
                for r in self._waiting:
                    if r.cancelled:
                        self._finish(r, None)
                    elif len(batch) < self.max_batch_size:
                        batch.append(r)
                    else:
                        rest.append(r)
                self._waiting = rest
                if batch:
                    self._decode(batch)
                self._collect_adapters()
        except BaseException as e:  # noqa: BLE001 - report to every waiting request
            self._error = e
            message = internal_error("engine thread failed")  # logged with the traceback
            for r in self._waiting:
                r.sink({"type": "error", "status": 500, "message": message})
            self._waiting = []
        finally:
            while True:  # requests still queued when the engine stops
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item[0] == "req":
                    self._waiting.append(item[1])
                elif item[0] == "load":
                    item[3].set_exception(RuntimeError("engine is shut down"))
            for r in self._waiting:
                if not r.cancelled:
                    r.sink({"type": "error", "status": 503, "message": "server shutting down"})
            self._waiting = []

    def _live_waiting(self) -> list[_Request]:
        return [r for r in self._waiting if not r.cancelled]

    def _take(self, block: bool, timeout: float | None) -> None:
        """Move queued requests to the waiting list and run queued commands."""
        first = True
        while True:
            try:
                item = self._queue.get(block=block and first, timeout=timeout if first else None)
            except queue.Empty:
                return
            first = False
            kind = item[0]
            if kind == "req":
                req: _Request = item[1]
                if req.adapter is not None:
                    if req.adapter not in self._adapters:
                        req.sink({"type": "error", "status": 500,
                                  "message": f"adapter {req.adapter!r} is not loaded"})
                        continue
                    self._refs[req.adapter] = self._refs.get(req.adapter, 0) + 1
                self._waiting.append(req)
            elif kind == "load":
                _, key, path, fut = item
                try:
                    self._load(key, path)
                    fut.set_result(key)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            elif kind == "release":
                if item[1] in self._adapters:
                    self._evicted.add(item[1])
            elif kind == "stop":
                self._stopping = True
                return

    def _load(self, key: str, path: str) -> None:
        self._attach_lora()
        if key in self._adapters:
            self._evicted.discard(key)
            return
        acfg_path = os.path.join(path, ADAPTER_CONFIG)
        if not os.path.exists(acfg_path):
            raise RequestError(f"adapter {key!r}: no adapter_config.json in {path}", "model", 404)
        with open(acfg_path, encoding="utf-8") as f:
            acfg = json.load(f)
        ptype = str(acfg.get("peft_type", "")).upper()
        if ptype not in SUPPORTED_PEFT_TYPES:
            raise RequestError(
                f"adapter {key!r} is a {ptype or 'unknown'} adapter; the server batches LoRA "
                "adapters (lora, qlora, dora). Serve other methods as a merged model or "
                "with `ift predict`.", "model", 422)
        from peft import PeftModel

        self._counter += 1
        name = f"adapter_{self._counter}"  # PEFT names cannot hold '.' or '/'
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=name,
                                                  is_trainable=False)
            self.peft.eval()
        else:
            self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
        self._adapters[key] = name
        fmt = self._choose_format(path, fallback=self.prompt_format)
        self._formats[key] = fmt
        self._stops[key] = eos_ids(self.model, self.tokenizer) | set(fmt.stop_token_ids)
        self.adapter_loads += 1
        self._collect_adapters()
        self._restack()

    def _collect_adapters(self) -> None:
        """Delete evicted adapters no request uses. PEFT cannot drop its last adapter, so
        one stays resident (its memory is small) until another replaces it."""
        for key in sorted(self._evicted):
            if self._refs.get(key, 0) > 0 or len(self._adapters) <= 1:
                continue
            name = self._adapters.pop(key)
            self._formats.pop(key, None)
            self._stops.pop(key, None)
            self._evicted.discard(key)
            self._refs.pop(key, None)
            self._attach_lora()
            self.peft.delete_adapter(name)
            self._restack()

    def _detach_lora(self) -> None:
        """Put each LoRA layer's base layer in its place in the model tree, so base-only
        batches run the plain transformers model, with no PEFT wrapper around every linear
        layer (32 base tokens on the tiny llama with two adapters loaded: 19.1 -> 16.4 ms,
        the same as with none). Stays so until a batch needs an adapter or PEFT changes
        adapters."""
        if self._detached:
            return
        if self._lora_slots is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora_slots = []
            for name, module in self.model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    parent, _, attr = name.rpartition(".")
                    self._lora_slots.append((self.model.get_submodule(parent), attr, module))
            # Nested tuner layers: only the outermost is swapped (for the innermost base).
            inner = {id(m.base_layer) for _, _, m in self._lora_slots}
            self._lora_slots = [s for s in self._lora_slots if id(s[2]) not in inner]
        for parent, attr, layer in self._lora_slots:
            setattr(parent, attr, layer.get_base_layer())
        self._detached = True

    def _attach_lora(self) -> None:
        """Put the LoRA layers back: before any adapter runs and before PEFT loads, deletes
        or stacks adapters (it finds its layers by walking the model tree)."""
        if not self._detached:
            return
        for parent, attr, layer in self._lora_slots:
            setattr(parent, attr, layer)
        self._detached = False

    def _restack(self) -> None:
        self._attach_lora()
        self._lora_slots = None
        self._active = None  # loading or deleting may change PEFT's active adapter
        from ift.serve import multilora

        if self.peft is None or not multilora.supported(self.peft):
            self.stacked = None
            return
        if self.stacked is None:
            self.stacked = multilora.StackedLoRA(self.peft)
        self.stacked.rebuild(list(self._adapters.values()))

    def _finish(self, req: _Request, event: dict[str, Any] | None) -> None:
        if req.done:
            return
        req.done = True
        if req.adapter is not None:
            self._refs[req.adapter] = self._refs.get(req.adapter, 1) - 1
            if req.adapter in self._evicted:
                self._collect_adapters()
        if event is not None and not req.cancelled:
            req.sink(event)

    def _forward(self, ids, mask, pos, cache, rows: list[_Request]):
        import torch

        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=pos,
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        if self.peft is None:
            out = self.model(**kwargs)
        elif all(r.adapter is None for r in rows):
            # Base rows only: the plain model, LoRA layers out of the tree. Cheaper than
            # PEFT's disable_adapter(), a mixed batch of `__base__` rows, or LoRA layers
            # told to skip their adapters (all measured on the tiny llama).
            self._detach_lora()
            out = self.model(**kwargs)
        else:
            self._attach_lora()  # PEFT's layers back in the tree for any adapter row
            if self.stacked is not None and len({r.adapter for r in rows} - {None}) >= 2:
                # Several adapters in the batch: one gather-and-bmm per LoRA layer.
                slots = torch.tensor([0 if r.adapter is None else
                                      self.stacked.slots[self._adapters[r.adapter]] for r in rows],
                                     dtype=torch.long, device=ids.device)
                with self.stacked.rows(slots):
                    out = self.peft(**kwargs)
            elif len({r.adapter for r in rows}) == 1:
                # Every row wants the same adapter: make it PEFT's active one (only this thread
                # runs the model) and run PEFT's plain LoRA forward, exactly PeftModel's output
                # and much cheaper than a mixed batch (64 -> 26 ms for 32 tokens, tiny llama).
                name = self._adapters[rows[0].adapter]
                if self._active != name:
                    self.peft.base_model.set_adapter(name, inference_mode=True)
                    self._active = name
                out = self.peft.base_model.model(**kwargs)
            else:
                # One adapter and base rows: PEFT's mixed batch, exactly PeftModel's output.
                names = [self._adapters[r.adapter] if r.adapter is not None else BASE for r in rows]
                out = self.peft(**kwargs, adapter_names=names)
        return out.logits[:, -1, :]

    def _decode(self, batch: list[_Request]) -> None:
        """Generate until every row is done, streaming deltas. Between steps, requests that
        arrived meanwhile are prefilled and join the running batch (continuous batching)."""
        admitted = list(batch)
        try:
            running = self._prefill(batch)
            while True:
                self._take(block=False, timeout=None)  # adapter loads, new requests
                room = self.max_batch_size - len(running.rows)
                if room > 0 and self._joinable:
                    new = self._admit(room)
                    if new:
                        admitted.extend(new)
                        joined = self._prefill(new)
                        running = running.join(joined) if running.rows else joined
                if not running.rows:
                    break
                self._step(running)
        except Exception:  # noqa: BLE001 - one bad batch must not kill the engine
            message = internal_error("batch failed")  # logged with the traceback
            for r in admitted:
                self._finish(r, {"type": "error", "status": 500, "message": message})

    def _admit(self, room: int) -> list[_Request]:
        """Up to `room` live waiting requests, oldest first."""
        take: list[_Request] = []
        rest: list[_Request] = []
        for r in self._waiting:
            if r.cancelled:
                self._finish(r, None)
            elif len(take) < room:
                take.append(r)
            else:
                rest.append(r)
        self._waiting = rest
        return take

    def _prefill(self, reqs: list[_Request]) -> _Batch:
        """Run the prompts (left-padded) and choose each row's first token."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

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
            logits = self._forward(ids.to(self.device), mask.to(self.device),
                                   pos.to(self.device), cache, reqs)
        self.steps += 1
        if self._joinable is None:  # rows can join a batch only with plain dynamic layers
            self._joinable = all(type(layer) is DynamicLayer for layer in cache.layers)
        batch = _Batch(self, reqs, mask, pos[:, -1:], cache)
        self._advance(batch, logits)
        return batch

    def _step(self, batch: _Batch) -> None:
        """One decode step for every row of the batch."""
        import torch

        batch.mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=torch.long)], 1)
        batch.pos = batch.pos + 1
        step_ids = torch.tensor([[t] for t in batch.next_tokens], dtype=torch.long)
        with torch.inference_mode():
            logits = self._forward(step_ids.to(self.device), batch.mask.to(self.device),
                                   batch.pos.to(self.device), batch.cache, batch.rows)
        self.steps += 1
        self._advance(batch, logits)

    def _advance(self, batch: _Batch, logits) -> None:
        """Choose a token per row, send text, finish rows that are done, drop them."""
        import torch

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
            if tok in self._stops.get(r.adapter, self.eos_ids):
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
                    end["text"] = text.text
                self._finish(r, end)
            else:
                keep.append(i)
                next_tokens.append(tok)
        batch.select(keep)
        batch.next_tokens = next_tokens


class _Batch:
    """The rows decoding together: per-row state, attention mask, positions, KV cache."""

    def __init__(self, engine: Engine, rows: list[_Request], mask, pos, cache):
        self.rows = list(rows)
        self.choosers = [TokenChooser(r.params) for r in rows]
        self.texts = [TextStream(engine.tokenizer, r.params.stop, deltas=r.deltas) for r in rows]
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
        import torch

        h = self.hist[i]
        return torch.tensor([h if h is not None else []], dtype=torch.long)

    def push(self, i: int, tok: int) -> None:
        if self.hist[i] is not None:
            self.hist[i].append(tok)

    def select(self, keep: list[int]) -> None:
        """Keep only these rows, and drop cache columns no remaining row attends to."""
        import torch

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

    def join(self, other: _Batch) -> _Batch:
        """Append other's rows: both caches are left-padded to the longer one."""
        import torch

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


def eos_ids(model, tokenizer) -> set[int]:
    """The generation config's and the tokenizer's eos ids (a prompt format adds its
    end-of-turn tokens to these)."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
