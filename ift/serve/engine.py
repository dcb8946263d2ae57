"""The decode engine of one replica: a model, LoRA adapters on it, dynamic and continuous
batching. It is the scheduler over two parts:

- adapter_manager.py: the adapters loaded on the model (reference-counted, evicted when
  no request uses them) and the forward pass for any mix of them in one batch;
- runner.py: prefill and decode steps of a batch on the model, and its KV cache.

One engine thread owns the model. Requests and adapter commands reach it through a
queue; it forms a batch from what is waiting (up to `max_batch_size`, waiting at most
`batch_wait_timeout_s` for it to fill) and decodes the batch step by step, sending each
request's text deltas back as they are produced. Between steps, requests that arrived
meanwhile are prefilled and join the running batch; rows whose requests finish (or are
cancelled) leave it. Adapter loads and deletions run on the same thread between steps.

No Ray here: the Serve deployment (app.py) wraps an Engine, and so do `ift chat
--model-path`, `ift predict`, `ift eval` and evaluation during training.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from ift.artifacts import PromptFormat, read_prompt_format
from ift.config import ModelConfig
from ift.data.templates import choose_prompt_format, format_prompt
from ift.models import load_model, load_tokenizer
from ift.serve.adapter_manager import AdapterManager
from ift.serve.protocol import RequestError, internal_error
from ift.serve.runner import Request, Runner
from ift.serve.sampling import SamplingParams

log = logging.getLogger(__name__)


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
        cfg = self.model.config
        ctx = max_context or getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None) or self.tokenizer.model_max_length
        self.max_context = int(min(ctx, 1_000_000))
        # The prompt format the model was trained with (recorded in a merged model's dir),
        # or `template` for this tokenizer; each adapter brings its own.
        self.prompt_format = self._choose_format(model_path)
        base_eos = eos_ids(self.model, self.tokenizer)
        self.eos_ids = base_eos | set(self.prompt_format.stop_token_ids)
        """Tokens that end a base-model reply: eos and the template's end-of-turn tokens."""
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids), 0))
        self.adapters = AdapterManager(
            self.model,
            choose_format=lambda path: self._choose_format(path, fallback=self.prompt_format),
            stop_ids=lambda fmt: base_eos | set(fmt.stop_token_ids))
        self.runner = Runner(
            self.tokenizer, device=device, pad_id=self.pad_id, forward=self.adapters.forward,
            stop_ids=lambda adapter: self.adapters.stops.get(adapter, self.eos_ids),
            finish=self._finish)
        self._queue: queue.Queue = queue.Queue()
        self._waiting: list[Request] = []
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ift-engine", daemon=True)
        self._thread.start()

    @property
    def steps(self) -> int:
        """Forward passes run so far."""
        return self.runner.steps

    @property
    def adapter_loads(self) -> int:
        """Adapters read from disk so far (an LRU that thrashes shows here)."""
        return self.adapters.loads

    # -----------------------------------------------------------------------------------
    # Prompts
    # -----------------------------------------------------------------------------------

    def _choose_format(self, path: str, fallback: PromptFormat | None = None) -> PromptFormat:
        """The format recorded at path (or `fallback` when there is none), unless an
        explicit template overrides it (with a warning)."""
        recorded = read_prompt_format(path)
        if recorded is None and fallback is not None:
            return fallback
        return choose_prompt_format(recorded, self.template, self.tokenizer, path, log)

    def format_of(self, adapter: str | None = None) -> PromptFormat:
        """The prompt format of the base model, or of a loaded adapter."""
        return self.adapters.formats.get(adapter, self.prompt_format) if adapter else self.prompt_format

    def chat_prompt_ids(self, messages: list[dict[str, str]],
                        adapter: str | None = None) -> list[int]:
        """Token ids of a conversation rendered in the prompt format of the model (or of
        the loaded adapter), ready to generate."""
        try:
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
               sink: Callable[[dict[str, Any]], None], deltas: bool = True) -> Request:
        """Queue a request; `sink` receives its events on the engine thread:
        {type: delta, text}, then {type: end, finish_reason, prompt_tokens,
        completion_tokens} or {type: error, status, message}. With deltas=False there
        are no delta events and the end event carries the whole `text` and the reply's
        `token_ids`."""
        self._raise_if_dead()
        req = Request(list(prompt_ids), params, adapter, sink, deltas=deltas)
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

    async def _events(self, req: Request, q: asyncio.Queue) -> AsyncIterator[dict[str, Any]]:
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
        return self.adapters.loaded()

    def has_adapter(self, key: str) -> bool:
        """Whether `key` is loaded and not evicted (safe from any thread)."""
        return self.adapters.has(key)

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
    # Engine thread: scheduling
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
                wait = 0.0 if self.runner.joinable else self.batch_wait_timeout_s
                deadline = time.monotonic() + wait
                while len(self._live_waiting()) < self.max_batch_size and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._take(block=True, timeout=left)
                batch = self._admit(self.max_batch_size)
                if batch:
                    self._decode(batch)
                self.adapters.collect()
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

    def _live_waiting(self) -> list[Request]:
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
                req: Request = item[1]
                if req.adapter is not None and not self.adapters.acquire(req.adapter):
                    req.sink({"type": "error", "status": 500,
                              "message": f"adapter {req.adapter!r} is not loaded"})
                    continue
                self._waiting.append(req)
            elif kind == "load":
                _, key, path, fut = item
                try:
                    self.adapters.load(key, path)
                    fut.set_result(key)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            elif kind == "release":
                self.adapters.evict(item[1])
            elif kind == "stop":
                self._stopping = True
                return

    def _finish(self, req: Request, event: dict[str, Any] | None) -> None:
        if req.done:
            return
        req.done = True
        if req.adapter is not None:
            self.adapters.release_ref(req.adapter)
        if event is not None and not req.cancelled:
            req.sink(event)

    def _decode(self, batch: list[Request]) -> None:
        """Generate until every row is done, streaming deltas. Between steps, requests that
        arrived meanwhile are prefilled and join the running batch (continuous batching)."""
        admitted = list(batch)
        try:
            running = self.runner.prefill(batch)
            while True:
                self._take(block=False, timeout=None)  # adapter loads, new requests
                room = self.max_batch_size - len(running.rows)
                if room > 0 and self.runner.joinable:
                    new = self._admit(room)
                    if new:
                        admitted.extend(new)
                        joined = self.runner.prefill(new)
                        running = running.join(joined) if running.rows else joined
                if not running.rows:
                    break
                self.runner.step(running)
        except Exception:  # noqa: BLE001 - one bad batch must not kill the engine
            message = internal_error("batch failed")  # logged with the traceback
            for r in admitted:
                self._finish(r, {"type": "error", "status": 500, "message": message})

    def _admit(self, room: int) -> list[Request]:
        """Up to `room` live waiting requests, oldest first."""
        take: list[Request] = []
        rest: list[Request] = []
        for r in self._waiting:
            if r.cancelled:
                self._finish(r, None)
            elif len(take) < room:
                take.append(r)
            else:
                rest.append(r)
        self._waiting = rest
        return take


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
