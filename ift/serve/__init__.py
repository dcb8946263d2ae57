"""Serving: an OpenAI-compatible Ray Serve app. Merging adapters (`ift.merge`), batch
prediction and terminal chat (`ift.infer`, on this package's decode engine) are not HTTP
serving and live elsewhere.

Commands
--------

`ift serve -c serve.yaml`
    Starts the app on `serve.host:serve.port`. Routes: POST /v1/chat/completions and
    POST /v1/completions (`stream: true` sends server-sent events ending with
    `data: [DONE]`; `stream_options.include_usage` adds a usage chunk), GET /v1/models
    (base, every adapter, every merged model, with MLflow run id, data manifest hash and
    method from `ift_lineage.json`), GET /health, and GET / (a chat page). The `model` field
    picks the base (`serve.base_model_id`), a merged model (`serve.merged_models`), or an
    adapter (`serve.adapters` ids, or names under `serve.adapter_root`, local or s3://).
    Sampling: temperature (0 = greedy), top_p, top_k, max_tokens (at most
    `serve.max_tokens_limit`), stop, repetition_penalty, no_repeat_ngram_size, seed; a value
    out of range is a 400 naming the parameter. With `serve.api_key_env: NAME`, requests
    need `Authorization: Bearer $NAME`. A replica runs `max_ongoing_requests` generation
    requests at once and queues `max_queued_requests` more (-1: no bound); past that a
    request gets 503 with a JSON body and `Retry-After`; past `request_timeout_s`, 504.
    Malformed bodies (lone surrogates, deep nesting) are 400s naming the field; a 500 names
    a request id, never the exception, which the server logs under that id. Anonymous
    callers of /v1/models get no server paths (`ift.serve.adapters.public_entry`) unless
    `serve.show_model_paths`; bearer-key holders always see them. /openapi.json describes
    the request bodies (`ift.serve.openapi`).

Modules: `app` (the deployments and how the app is built), `protocol` (OpenAI request
validation, typed requests, response shapes), `adapters` (model ids -> paths, lineage),
`admission`, `engine` (the scheduler) over `adapter_manager` and `runner`, `sampling`
(token choice and detokenizing), `multilora`, `openapi`, `vllm`.

Prompts: chat requests are rendered in the prompt format recorded in the model's or the
adapter's dir (`ift.artifacts.read_prompt_format`; `data.template` when there is none, or
when it is set to another template, with a warning), and replies end at the format's
end-of-turn tokens.

Example config::

    model: {name_or_path: runs/tiny}
    serve:
      port: 8000
      adapter_root: s3://bucket/runs/train        # every run's final/ is servable
      adapters: {support-v2: runs/train/support/final}
      merged_models: {support-merged: runs/merged/support}
      max_adapters_per_replica: 8                 # LRU of adapters held by one replica
      num_replicas: 2                             # or autoscaling: {min_replicas, max_replicas}
      cpus_per_replica: 2
      max_batch_size: 16

How a replica serves many adapters
----------------------------------

The base model's deployment is the HTTP ingress itself: a request for the base model is
answered on the replica Serve's proxy hands it to, one hop, with no second deployment in
between. Each replica holds one copy of the base weights. Adapters load on first use into
an LRU cache (`@serve.multiplexed`). With one replica every adapter request is answered
there; with more (or autoscaling), a replica that does not hold the requested adapter
passes the request through a handle with the adapter as multiplexed model id, so Serve
routes it to a replica that already holds it. Merged models have their own deployments,
reached through handles. Admission is the replica's own (`admission.py`) rather than
Serve's `max_queued_requests`, whose refusal is a plain-text 503 from the proxy; Serve's
cap per replica is set above it, with room for the light routes. The replica's engine (`engine.py`) batches whatever
requests are waiting, for any mix of adapters, into one forward pass per decode step: a batch
with several adapters uses stacked LoRA weights and batched matmuls (`multilora.py`), a
batch with one adapter uses PEFT's own computation. No request ever switches a shared
"active adapter" under another. Batching is the engine's own rather than `@serve.batch`,
because `@serve.batch` splits every batch by multiplexed model id, which would turn 8
adapters into 8 small batches.

The vLLM switch (GPU clusters)
------------------------------

`serve.backend: vllm` builds the app with `ray.serve.llm` instead (`app.build_vllm_app`):
the base and each merged model become an `LLMConfig` served by vLLM, with replicas or
autoscaling, `serve.accelerator_type` and `serve.engine_kwargs` (e.g.
`{tensor_parallel_size: 2, max_model_len: 4096}`) from the config. Adapters load
dynamically from `serve.adapter_root`, which must be s3:// or gs:// there, and are asked
for as `<base_model_id>:<adapter name>`. It needs `pip install "ray[llm]"` on GPU nodes;
the chat page, bearer auth and the adapter catalog above belong to the transformers
backend only. Its test (`tests/integration/test_serve_vllm.py`, marked gpu) runs where a
GPU, vLLM and `IFT_VLLM_TEST_MODEL` are present and is skipped elsewhere.
"""
