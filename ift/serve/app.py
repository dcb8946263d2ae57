"""`ift serve`: an OpenAI-compatible Ray Serve application.

Two plain classes, wrapped with `serve.deployment` when the app is built (`build_app`):

- `Ingress`, named `llm-<base id>`: the FastAPI ingress (ROUTES, mounted by
  `fastapi_app`), which is also the base model's replica. It checks auth, parses and
  validates requests (4xx with a message for anything malformed) and resolves each
  request's model id once, into a `protocol.ModelRequest` that names the adapter and its
  path. Base-model requests are answered here, one hop from Serve's HTTP proxy; with more
  than one replica, a request for an adapter this replica does not hold goes through a
  handle to a replica that does (Serve model multiplexing routes it by the adapter id).
- `ModelServer`: one model's engine (engine.py, which batches requests for any mix of
  adapters into one forward pass), its LRU of `max_adapters_per_replica` adapters (local
  or s3://) and its admission (admission.py: an overload is a 503 with a JSON body, a
  request over `request_timeout_s` a 504). Deployed as is for each merged model, under its
  own id, and held by the ingress for the base model.

Routes: POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET
/v1/models, GET /health, GET / (a small chat page).

`serve.backend: vllm` builds the app with `ray.serve.llm` instead (GPU clusters), see
`build_vllm_app`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route annotations
# (`request: Request`) at run time on the replica, after the class has been pickled.
import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import threading
import time
import types
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ift import storage
from ift.config import Config, ConfigError, ModelConfig, ServeConfig, load_config
from ift.models import check_model_path
from ift.raycluster import init_ray
from ift.serve import openapi, vllm
from ift.serve.adapters import Catalog, public_entry
from ift.serve.admission import Admission, Overloaded
from ift.serve.protocol import (
    SSE_DONE,
    GenerationRequest,
    ModelRequest,
    RequestError,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    internal_error,
    new_id,
    parse_chat_request,
    parse_completion_request,
    sse,
    usage_chunk,
)
from ift.serve.sampling import SamplingParams

log = logging.getLogger(__name__)

APP_NAME = "ift"
UNBOUNDED_ONGOING = 4096  # Serve's per-replica cap when serve.max_queued_requests is -1
LIGHT_REQUESTS = 32  # room over the admission limits for /health, /v1/models and the page


# ---------------------------------------------------------------------------------------
# Settings handed to the deployments
# ---------------------------------------------------------------------------------------


def _path(root: str, p: str) -> str:
    """A configured path: under the storage root (storage.root) when it is relative and
    exists there, else as given (a local path, s3:// path or hub id)."""
    if not p or os.path.exists(p) or storage.is_remote(p) or os.path.isabs(p):
        return p
    under = storage.join(root, p)
    return under if storage.exists(under) else p


def base_model_path(serve: ServeConfig, model: ModelConfig, root: str) -> str:
    """The base model's path: serve.base_model, else model.name_or_path (see `_path`)."""
    p = serve.base_model or model.name_or_path
    if not p:
        raise ConfigError("serve.base_model (or model.name_or_path) is required")
    return _path(root, p)


def catalog_kwargs(serve: ServeConfig, model: ModelConfig, root: str) -> dict[str, Any]:
    """The `Catalog` arguments: the base model, adapters and merged models, their paths
    resolved under the storage root `root` (see `_path`)."""
    return {
        "base_id": serve.base_model_id,
        "base_path": base_model_path(serve, model, root),
        "adapters": {k: _path(root, v) for k, v in serve.adapters.items()},
        "adapter_root": _path(root, serve.adapter_root) if serve.adapter_root else "",
        "merged": {k: _path(root, v) for k, v in serve.merged_models.items()},
    }


def engine_kwargs(serve: ServeConfig, model: ModelConfig, template: str) -> dict[str, Any]:
    """The `Engine` arguments of every replica: device and torch threads from the replica's
    resources, batching from the serve section, dtype from the model section, and the chat
    template (data.template) that prompts fall back to."""
    return {
        "dtype": model.dtype,
        "device": "cuda" if serve.gpus_per_replica > 0 else "cpu",
        "template": template,
        "max_batch_size": serve.max_batch_size,
        "batch_wait_timeout_s": serve.batch_wait_timeout_s,
        "trust_remote_code": model.trust_remote_code,
        "num_threads": max(1, int(serve.cpus_per_replica)),
    }


def api_key_digest(serve: ServeConfig) -> str:
    """sha256 of the bearer key named by serve.api_key_env ('' when auth is off).

    Only the digest travels to the ingress, so the key itself never appears in the Serve
    config or the dashboard.
    """
    env = serve.api_key_env
    if not env:
        return ""
    key = os.environ.get(env, "")
    if not key:
        raise ConfigError(f"serve.api_key_env={env!r}: the environment variable {env} is "
                          "empty or unset; set it to the bearer key, or clear api_key_env")
    return hashlib.sha256(key.encode()).hexdigest()


def _deployment_name(prefix: str, model_id: str) -> str:
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_-]+', '_', model_id)}"[:100]


# ---------------------------------------------------------------------------------------
# Deployments
# ---------------------------------------------------------------------------------------


class AdapterRef:
    """What the multiplexed loader returns; Serve calls __del__ when it evicts the adapter."""

    def __init__(self, engine, key: str):
        self.engine = engine
        self.key = key
        self._released = False

    def __del__(self):
        if not self._released:
            self._released = True
            try:
                self.engine.release_adapter(self.key)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


def _error_event(e: Exception) -> dict[str, Any]:
    if isinstance(e, RequestError):
        return {"type": "error", "status": e.status, "message": e.message, "param": e.param}
    # adapter download/load failures, a dead engine
    return {"type": "error", "status": 500, "message": internal_error("request failed")}


class ModelServer:
    """What every model replica does: hold one model's engine, load adapters on demand into
    an LRU of `max_adapters` (Serve model multiplexing), admit generation requests and
    answer them as events. `build_app` deploys it as is for merged models; the ingress
    holds one for the base model."""

    def __init__(self, model_path: str, engine_args: dict[str, Any], limits: dict[str, int],
                 max_adapters: int):
        # The model stack (torch, transformers, peft) loads in the replicas: imported at the
        # top it would make the `ift serve` driver's import of this module 5 s, not 1 s.
        from ift.serve.engine import Engine

        self.engine = Engine(model_path, **engine_args)
        self.admission = Admission(limits["max_ongoing_requests"], limits["max_queued_requests"])
        self._adapter_paths: dict[str, str] = {}

        async def load(adapter: str) -> AdapterRef:
            return await self._load_adapter(adapter)

        # The LRU's size is this deployment's; Serve reports the ids held here to its
        # router, so requests sent with an adapter as multiplexed id come to this replica.
        self._adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load)

    def __del__(self):
        self.stop()

    async def _load_adapter(self, adapter: str) -> AdapterRef:
        local = await asyncio.to_thread(storage.local_copy, self._adapter_paths[adapter])
        await asyncio.wrap_future(self.engine.load_adapter(adapter, local))
        return AdapterRef(self.engine, adapter)

    async def _prepare(self, req: ModelRequest) -> tuple[list[int], SamplingParams]:
        if req.adapter is not None:
            self._adapter_paths[req.adapter] = req.adapter_path
            await self._adapter(req.adapter)
        if req.kind == "chat":
            ids = self.engine.chat_prompt_ids(req.messages, req.adapter)
        else:
            ids = self.engine.completion_prompt_ids(req.prompt)
        return ids, self.engine.check_length(ids, req.params)

    async def generate(self, req: ModelRequest):
        """Events for one request: start, deltas, then end (or one error event)."""
        try:
            async with self.admission.slot():
                try:
                    ids, params = await self._prepare(req)
                    events = self.engine.stream(ids, params, req.adapter)
                except Exception as e:  # noqa: BLE001 - sent as an event
                    yield _error_event(e)
                    return
                yield {"type": "start", "prompt_tokens": len(ids)}
                async for ev in events:
                    yield ev
        except Overloaded as e:  # no admission slot
            yield _error_event(e)

    async def complete(self, req: ModelRequest) -> dict[str, Any]:
        """The whole result in one message: {type: end, text, ...} or an error event."""
        try:
            async with self.admission.slot():
                ids, params = await self._prepare(req)
                return await self.engine.complete(ids, params, req.adapter)
        except Exception as e:  # noqa: BLE001 - sent as an event
            return _error_event(e)

    def info(self) -> dict[str, Any]:
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "model_path": self.engine.model_path,
                "adapters": self.engine.loaded_adapters(), "steps": self.engine.steps,
                "adapter_loads": self.engine.adapter_loads,
                "running": self.admission.running, "waiting": self.admission.waiting}

    def check_health(self) -> None:
        if not self.engine.alive():
            raise RuntimeError("the decode engine has stopped")

    def stop(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5)


class _LocalStream:
    """A replica's own event stream with the `cancel()` of a handle's response generator."""

    def __init__(self, agen):
        self._agen = agen
        self._closing = None

    def __anext__(self):
        return self._agen.__anext__()

    def cancel(self) -> None:
        if self._closing is None:  # releases the admission slot and the engine request
            self._closing = asyncio.get_running_loop().create_task(self._agen.aclose())


def _json_error(status: int, message: str, type: str = "invalid_request_error",
                param: str | None = None, code: str | None = None, headers=None):
    return JSONResponse(error_body(message, type, param, code), status_code=status,
                        headers=headers)


def _internal_error(what: str):
    """A JSON 500 naming the request id under which the failure is logged."""
    return _json_error(500, internal_error(what), "server_error")


def _status_type(status: int) -> str:
    return {401: "authentication_error", 404: "invalid_request_error",
            503: "overloaded_error", 504: "timeout_error"}.get(
                status, "invalid_request_error" if status < 500 else "server_error")


def _event_error(ev: dict[str, Any]):
    """The HTTP answer to an error event from a model replica (503: overloaded)."""
    headers = {"Retry-After": "1"} if ev["status"] == 503 else None
    return _json_error(ev["status"], ev["message"], _status_type(ev["status"]),
                       ev.get("param"), headers=headers)


def _timeout(seconds: float):
    return _json_error(504, f"request timed out after {seconds:g}s", "timeout_error")


class Ingress:
    """The HTTP ingress, which is also the base model's replica (it holds its
    `ModelServer`).

    Each request's model id is resolved once, here, into a `ModelRequest`. Base-model
    requests, and adapter requests on a replica that holds the adapter (or when the
    deployment has one replica), are answered where they arrive: one hop from the HTTP
    proxy. Other adapter requests go through a handle to this deployment with the adapter
    as multiplexed model id, so Serve routes them to a replica that already holds it;
    merged models go to their own deployments. `build_app` mounts ROUTES on a FastAPI app.
    """

    def __init__(self, model_path: str, engine_args: dict[str, Any],
                 catalog_args: dict[str, Any], limits: dict[str, int], max_adapters: int,
                 merged: dict[str, Any], settings: dict[str, Any]):
        self.model = ModelServer(model_path, engine_args, limits, max_adapters)
        self.catalog = Catalog(**catalog_args)
        self.merged = merged
        self.max_tokens_limit = int(settings["max_tokens_limit"])
        self.timeout = float(settings["request_timeout_s"])
        self.key_digest = settings.get("api_key_sha256", "")
        self.route_adapters = bool(settings.get("route_adapters", False))
        # Callers of /v1/models see server paths when they hold the key, or when the
        # config says everyone may.
        self.show_paths = bool(self.key_digest) or bool(settings.get("show_model_paths"))
        self.created = int(time.time())
        self._self_handle = None

    async def __del__(self):
        self.model.stop()
        await super().__del__()  # the ASGI app's lifespan shutdown (Serve's ingress wrapper)

    # ------------------------------------------------------------------ the model replica
    # (what a handle to this deployment calls: adapter requests routed by Serve)

    async def generate(self, req: ModelRequest):
        events = self.model.generate(req)
        try:
            async for ev in events:
                yield ev
        finally:
            await events.aclose()  # releases the admission slot and the engine request

    async def complete(self, req: ModelRequest) -> dict[str, Any]:
        return await self.model.complete(req)

    def info(self) -> dict[str, Any]:
        return self.model.info()

    def check_health(self) -> None:
        self.model.check_health()

    # ------------------------------------------------------------------ helpers

    def _unauthorized(self, request: Request):
        if not self.key_digest:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() == "bearer" and hmac.compare_digest(digest, self.key_digest):
            return None
        return _json_error(401, "missing or invalid bearer token (Authorization: Bearer KEY)",
                           "authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def _handle(self, req: ModelRequest):
        """The handle that answers a request, or None to answer it on this replica."""
        if req.model in self.merged and req.adapter is None:
            return self.merged[req.model]
        if (req.adapter is None or not self.route_adapters
                or self.model.engine.has_adapter(req.adapter)):
            return None

        if self._self_handle is None:
            ctx = serve.get_replica_context()
            self._self_handle = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
        return self._self_handle.options(multiplexed_model_id=req.adapter)

    async def _parse(self, request: Request, kind: str) -> tuple[GenerationRequest, ModelRequest]:
        raw = await request.body()
        if not raw.strip():
            raise RequestError("request body is empty; send a JSON object")
        try:
            body = json.loads(raw)
        except UnicodeDecodeError as e:
            raise RequestError(f"request body is not UTF-8 text: {e}") from e
        except json.JSONDecodeError as e:
            raise RequestError(f"request body is not valid JSON: {e.msg} at line "
                               f"{e.lineno} column {e.colno}") from e
        except RecursionError:
            raise RequestError("request body is nested too deeply") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise RequestError(f"request body is not valid JSON: {e}") from None
        parse = parse_chat_request if kind == "chat" else parse_completion_request
        greq = parse(body, self.max_tokens_limit)
        if self.catalog.is_static(greq.model):
            target = self.catalog.resolve(greq.model)
        else:  # a name under adapter_root: its existence is checked on disk or S3
            target = await asyncio.to_thread(self.catalog.resolve, greq.model)
        if target.kind == "adapter":
            return greq, greq.for_model(target.model_id, target.path)
        return greq, greq.for_model()

    # ------------------------------------------------------------------ routes

    async def index(self):
        return HTMLResponse(_index_html())

    async def health(self):
        return {"status": "ok"}

    async def models(self, request: Request):
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        rows = await asyncio.to_thread(self.catalog.list_models, self.created)
        # The last lineage stage: which app and deployment serve each id, at which URL.
        url = str(request.base_url).rstrip("/") + "/v1"
        ctx = serve.get_replica_context()
        for row in rows:
            handle = self.merged.get(row["id"])
            if handle is None:  # the base and its adapters: this deployment
                where = {"app": ctx.app_name, "deployment": ctx.deployment}
            else:
                where = {"app": getattr(handle, "app_name", None),
                         "deployment": getattr(handle, "deployment_name", None)}
            row["metadata"]["serving"] = {"url": url, **where}
        if not self.show_paths:
            rows = [public_entry(row) for row in rows]
        return {"object": "list", "data": rows}

    async def chat_completions(self, request: Request):
        return await self._generate(request, "chat")

    async def completions(self, request: Request):
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str):
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        try:
            greq, req = await self._parse(request, kind)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        handle = self._handle(req)
        deadline = time.monotonic() + self.timeout
        if greq.stream:
            return await self._stream(handle, req, greq, deadline)
        resp = self.model.complete(req) if handle is None else handle.complete.remote(req)
        try:
            out = await asyncio.wait_for(resp, self.timeout)  # cancels a local request
        except asyncio.TimeoutError:
            if handle is not None:
                resp.cancel()
            return _timeout(self.timeout)
        except Exception:  # noqa: BLE001 - a replica failure, not a bad request
            return _internal_error("generation failed")
        if out["type"] == "error":
            return _event_error(out)
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        build = chat_response if kind == "chat" else completion_response
        return build(rid, greq.model, out["text"], out["finish_reason"],
                     out["prompt_tokens"], out["completion_tokens"])

    async def _stream(self, handle, req: ModelRequest, greq: GenerationRequest,
                      deadline: float):
        if handle is None:
            gen = _LocalStream(self.model.generate(req))
        else:
            gen = handle.options(stream=True).generate.remote(req)
        try:
            first = await asyncio.wait_for(gen.__anext__(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            gen.cancel()
            return _timeout(self.timeout)
        except StopAsyncIteration:
            return _json_error(500, "generation ended early", "server_error")
        except Exception:  # noqa: BLE001
            gen.cancel()
            return _internal_error("generation failed")
        if first["type"] == "error":
            gen.cancel()  # a local stream holds its admission slot until closed
            return _event_error(first)
        events = _sse_events(gen, greq, first.get("prompt_tokens", 0), deadline, self.timeout)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse_events(gen, greq: GenerationRequest, prompt_tokens: int, deadline: float,
                      timeout: float):
    """A replica's events after `start` as OpenAI stream chunks, ending with [DONE]."""
    kind, model = greq.kind, greq.model
    rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
    created = int(time.time())
    if kind == "chat":
        yield sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                ev = await asyncio.wait_for(gen.__anext__(), max(0.0, left))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                yield sse(error_body(f"request timed out after {timeout:g}s", "timeout_error"))
                break
            if ev["type"] == "delta":
                if kind == "chat":
                    yield sse(chat_chunk(rid, model, created, {"content": ev["text"]}))
                else:
                    yield sse(completion_chunk(rid, model, created, ev["text"]))
            elif ev["type"] == "end":
                if kind == "chat":
                    yield sse(chat_chunk(rid, model, created, {}, ev["finish_reason"]))
                else:
                    yield sse(completion_chunk(rid, model, created, "", ev["finish_reason"]))
                if greq.include_usage:
                    yield sse(usage_chunk(rid, model, created, kind, prompt_tokens,
                                          ev["completion_tokens"]))
                break
            elif ev["type"] == "error":
                yield sse(error_body(ev["message"], _status_type(ev["status"])))
                break
    except Exception:  # noqa: BLE001 - the stream is already 200
        yield sse(error_body(internal_error("stream failed"), "server_error"))
    finally:
        gen.cancel()
    yield SSE_DONE


# (path, HTTP method, Ingress method, route options)
ROUTES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("/", "GET", "index", {"response_class": HTMLResponse}),
    ("/health", "GET", "health", {}),
    ("/v1/models", "GET", "models", {}),
    ("/v1/chat/completions", "POST", "chat_completions",
     {"openapi_extra": openapi.request_body(openapi.CHAT_REQUEST)}),
    ("/v1/completions", "POST", "completions",
     {"openapi_extra": openapi.request_body(openapi.COMPLETION_REQUEST)}),
]


def fastapi_app():
    """A FastAPI app with the ingress's routes and JSON error answers (one per build: Serve
    rebinds an app's routes to the class it wraps)."""
    api = FastAPI(title="ift", docs_url=None, redoc_url=None)

    async def http_error(request, exc):  # 404 for unknown routes, 405, ... as JSON
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"),
                            status_code=exc.status_code)

    async def validation_error(request, exc):
        return JSONResponse(error_body(str(exc), "invalid_request_error"), status_code=400)

    async def unexpected(request, exc):  # anything a route did not answer itself
        return _internal_error(f"{request.method} {request.url.path} failed")

    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(Exception, unexpected)
    for path, method, name, options in ROUTES:
        api.add_api_route(path, _endpoint(getattr(Ingress, name)), methods=[method], **options)
    return api


def _endpoint(method):
    """A copy of an Ingress method for one app's route. Serve rewrites a route's `self`
    parameter into a dependency on the replica's instance by setting the endpoint's
    signature; a copy carries that signature to the replicas (the module's own function,
    pickled by reference, would arrive without it)."""
    copy = types.FunctionType(method.__code__, method.__globals__, method.__name__,
                              method.__defaults__, method.__closure__)
    copy.__qualname__ = method.__qualname__
    copy.__kwdefaults__ = method.__kwdefaults__
    copy.__annotations__ = dict(method.__annotations__)
    copy.__doc__ = method.__doc__
    return copy


def _index_html() -> str:
    return resources.files("ift.serve").joinpath("static/index.html").read_text("utf-8")


# ---------------------------------------------------------------------------------------
# Building and running the application
# ---------------------------------------------------------------------------------------


def _scaling(s: ServeConfig) -> dict[str, Any]:
    # Replicas admit generation requests themselves (admission.py), so an overload is a
    # 503 with a JSON body; Serve's own cap only leaves room for those and the light routes.
    if s.max_queued_requests < 0:
        cap = UNBOUNDED_ONGOING
    else:
        cap = s.max_ongoing_requests + s.max_queued_requests + LIGHT_REQUESTS
    opts: dict[str, Any] = {
        "max_ongoing_requests": cap,
        "max_queued_requests": -1,
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        "graceful_shutdown_wait_loop_s": 1.0,
        "graceful_shutdown_timeout_s": min(60.0, s.request_timeout_s + 5),
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
    }
    if s.autoscaling:
        opts["autoscaling_config"] = dict(s.autoscaling)
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


def preflight(cfg: Config) -> dict[str, Any]:
    """The catalog arguments, once id clashes, bad adapter ids and missing local model
    directories have failed here, before anything starts."""
    cat = catalog_kwargs(cfg.serve, cfg.model, cfg.storage.root)
    Catalog(**cat)
    check_model_path(cat["base_path"], "serve.base_model")
    for mid, path in cat["merged"].items():
        check_model_path(path, f"serve.merged_models.{mid}")
    return cat


def build_app(cfg: Config):
    """The Serve application for a config (transformers backend, or vLLM when asked)."""
    if cfg.serve.backend == "vllm":
        return build_vllm_app(cfg)

    s = cfg.serve
    cat = preflight(cfg)
    eng = engine_kwargs(s, cfg.model, cfg.data.template)
    limits = {"max_ongoing_requests": s.max_ongoing_requests,
              "max_queued_requests": s.max_queued_requests}
    merged = {
        mid: serve.deployment(ModelServer).options(
            name=_deployment_name("merged", mid), **_scaling(cfg.serve)).bind(
                path, eng, limits, s.max_adapters_per_replica)
        for mid, path in cat["merged"].items()
    }
    settings = {"max_tokens_limit": s.max_tokens_limit, "request_timeout_s": s.request_timeout_s,
                "api_key_sha256": api_key_digest(cfg.serve),
                "show_model_paths": s.show_model_paths,
                # One fixed replica holds every adapter it is asked for; with more, adapter
                # requests go where the adapter already is.
                "route_adapters": bool(s.autoscaling) or s.num_replicas > 1}
    ingress = serve.deployment(serve.ingress(fastapi_app())(Ingress))
    return ingress.options(name=_deployment_name("llm", s.base_model_id), **_scaling(cfg.serve)).bind(
        cat["base_path"], eng, cat, limits, s.max_adapters_per_replica, merged, settings)


def vllm_llm_configs(cfg: Config, adapters: dict[str, dict[str, Any]] | None = None
                     ) -> list[dict[str, Any]]:
    """The `ray.serve.llm` LLMConfig fields for a config, as plain dicts (ift.serve.vllm);
    `adapters` maps each adapter served to its adapter_config.json contents."""
    paths = catalog_kwargs(cfg.serve, cfg.model, cfg.storage.root)
    return vllm.llm_configs(cfg.serve, cfg.data.template, paths["base_path"], paths["merged"],
                            paths["adapter_root"], adapters or {})


def build_vllm_app(cfg: Config):
    """The same OpenAI routes served by vLLM through `ray.serve.llm` (GPU clusters).

    The base model and each merged model become an `LLMConfig`; adapters (serve.adapters
    and those under serve.adapter_root, see ift.serve.vllm) are loaded dynamically from
    `serve.adapter_root` (s3:// or gs://, as vLLM's loader requires) and are addressed as
    `<base_model_id>:<adapter name>`. Replica counts, autoscaling,
    accelerator type and engine arguments come from the serve section. Needs `pip install
    "ray[llm]"` (which brings vLLM) on GPU nodes; the chat page, auth and the adapter
    catalog of the transformers backend are not part of this app.
    """
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as e:
        raise ConfigError(f"serve.backend=vllm needs ray[llm] (vLLM) installed (pip install "
                          f"'ift[vllm]' on GPU nodes): {e}") from e
    served = catalog_kwargs(cfg.serve, cfg.model, cfg.storage.root)
    root = served["adapter_root"]
    paths = vllm.collect_adapters(served["adapters"], root)
    adapters = vllm.read_adapter_configs(paths)
    configs = [LLMConfig(**c) for c in vllm_llm_configs(cfg, adapters)]  # checks first
    if root:
        vllm.stage_adapters(paths, root)
    return build_openai_app({"llm_configs": configs})


def start(cfg: Config, *, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Start Serve's HTTP proxy on serve.host:serve.port (if it is not running yet) and
    deploy the app under `route_prefix`; returns its URL."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port,
                              "request_timeout_s": cfg.serve.request_timeout_s + 30})
    serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{cfg.serve.host}:{cfg.serve.port}{route_prefix.rstrip('/')}"


def serve_cmd(args) -> int:
    """`ift serve -c CONFIG [key=value ...]`: run until Ctrl-C or SIGTERM, then drain."""
    cfg = load_config(args.config, args.overrides)
    if cfg.serve.backend != "vllm":
        preflight(cfg)  # before Ray starts
    init_ray(getattr(args, "address", None))
    stop = threading.Event()

    def _on_signal(signum, frame):
        stop.set()

    # After ray.init (which installs its own SIGTERM handler) and before the server is up:
    # a signal that arrives once clients can connect always drains.
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    url = start(cfg)
    print(f"ift serve: {url}/v1 (chat page at {url}/)", flush=True)
    while not stop.wait(1.0):
        pass
    print("ift serve: shutting down (in-flight requests finish first)", flush=True)
    serve.delete(APP_NAME)
    serve.shutdown()
    return 0
