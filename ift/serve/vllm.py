"""The vLLM backend's configuration: which adapters it serves, and the engine arguments
they need. Everything up to the engine call is here and pure, so it is tested without a
GPU; `ift.serve.app.build_vllm_app` stages the adapters and builds the app.

Adapters. vLLM (through `ray.serve.llm`) loads an adapter `<base_id>:<name>` from one
cloud folder, `<lora root>/<name>/`. The adapters served are `serve.adapters` (any path)
and the adapters found under `serve.adapter_root`, including a run directory's `final/`
(served under the run's name). Adapters that are not already at `<lora root>/<name>/`
are copied there before the app starts; the lora root is `serve.adapter_root`, which must
be on s3:// (or gs://).

vLLM serves plain LoRA only: DoRA, AdaLoRA and prompt-learning adapters are refused
with the adapter named. `max_lora_rank` is the smallest rank vLLM accepts that covers
the largest adapter rank (vLLM's default of 16 refuses r=32), `max_loras` the adapters a
batch may mix, and `max_num_seqs` stays vLLM's own default unless engine_kwargs set it
(the transformers backend's max_batch_size is a different knob).
"""

from __future__ import annotations

import tempfile
from typing import Any

from ift import storage
from ift.artifacts import ADAPTER_CONFIG
from ift.config import ConfigError, ServeConfig
from ift.models import CHATML_TEMPLATE
from ift.serve.adapters import Catalog

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""Ranks vLLM's max_lora_rank accepts."""
REFUSED_PEFT_TYPES = {
    "ADALORA": "AdaLoRA", "PROMPT_TUNING": "prompt tuning", "PREFIX_TUNING": "prefix tuning",
    "P_TUNING": "p-tuning",
}
FINAL_SUFFIX = "/final"


def served_name(rel: str) -> str:
    """An adapter's name from its path under the root: a run's final/ is the run."""
    return rel[: -len(FINAL_SUFFIX)] if rel.endswith(FINAL_SUFFIX) else rel


def adapter_rank(name: str, config: dict[str, Any]) -> int:
    """The largest LoRA rank of an adapter config; a ConfigError for what vLLM cannot load."""
    kind = str(config.get("peft_type", "")).upper()
    if kind in REFUSED_PEFT_TYPES:
        raise ConfigError(f"serve.backend=vllm: adapter {name!r} is a "
                          f"{REFUSED_PEFT_TYPES[kind]} adapter, which vLLM cannot load; "
                          "serve it with serve.backend=transformers")
    if kind != "LORA":
        raise ConfigError(f"serve.backend=vllm: adapter {name!r} has peft_type={kind!r}; "
                          "vLLM loads LoRA adapters only")
    if config.get("use_dora"):
        raise ConfigError(f"serve.backend=vllm: adapter {name!r} is a DoRA adapter "
                          "(use_dora), which vLLM cannot load; serve it with "
                          "serve.backend=transformers, or merge it (ift merge)")
    ranks = [int(config.get("r", 8))] + [int(v) for v in
                                         (config.get("rank_pattern") or {}).values()]
    return max(ranks)


def max_lora_rank(ranks: list[int]) -> int:
    need = max(ranks)
    for r in VLLM_LORA_RANKS:
        if r >= need:
            return r
    raise ConfigError(f"serve.backend=vllm: adapter rank {need} exceeds vLLM's largest "
                      f"max_lora_rank {VLLM_LORA_RANKS[-1]}")


def chat_template(template: str) -> str | None:
    """The jinja chat template vLLM renders requests with, for the training template
    `template` (data.template; None: the tokenizer's own)."""
    if template in ("auto", "tokenizer"):
        return None
    if template == "chatml":
        return CHATML_TEMPLATE
    raise ConfigError(f"serve.backend=vllm: data.template={template} has no jinja form for "
                      "vLLM to render prompts with; use serve.backend=transformers, or train "
                      "with data.template=chatml or tokenizer")


def llm_configs(serve: ServeConfig, template: str, base_path: str, merged: dict[str, str],
                lora_root: str, adapters: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The `ray.serve.llm` LLMConfig fields (plain dicts) for the serve section and the
    training template (data.template): the base model with its adapters (name ->
    adapter_config.json contents), then each merged model."""
    deployment: dict[str, Any] = {"max_ongoing_requests": serve.max_ongoing_requests}
    if serve.autoscaling:
        deployment["autoscaling_config"] = dict(serve.autoscaling)
    else:
        deployment["num_replicas"] = serve.num_replicas
    jinja = chat_template(template)

    def one(model_id: str, source: str) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "model_loading_config": {"model_id": model_id, "model_source": source},
            "deployment_config": dict(deployment),
            "engine_kwargs": dict(serve.engine_kwargs),
        }
        if jinja is not None:
            conf["engine_kwargs"].setdefault("chat_template", jinja)
        if serve.accelerator_type:
            conf["accelerator_type"] = serve.accelerator_type
        return conf

    base = one(serve.base_model_id, base_path)
    if adapters and not lora_root:
        raise ConfigError("serve.backend=vllm with serve.adapters needs serve.adapter_root "
                          "(an s3:// folder vLLM loads adapters from; they are copied there)")
    if lora_root:
        base["lora_config"] = {"dynamic_lora_loading_path": lora_root,
                               "max_num_adapters_per_replica": serve.max_adapters_per_replica}
        kw = base["engine_kwargs"]
        kw.setdefault("enable_lora", True)
        kw.setdefault("max_loras", min(max(len(adapters), 1), serve.max_adapters_per_replica))
        if adapters:
            ranks = [adapter_rank(name, c) for name, c in sorted(adapters.items())]
            kw.setdefault("max_lora_rank", max_lora_rank(ranks))
    return [base] + [one(mid, path) for mid, path in merged.items()]


def collect_adapters(adapters: dict[str, str], root: str) -> dict[str, str]:
    """Name -> directory of every adapter served: the configured ones, and those under the
    root (a run's final/ under the run's name)."""
    found = {served_name(rel): path
             for rel, path in Catalog("", "", adapter_root=root).discover().items()} if root else {}
    return {**found, **adapters}


def read_adapter_configs(paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, path in paths.items():
        conf = storage.join(path, ADAPTER_CONFIG)
        if not storage.exists(conf):
            raise ConfigError(f"serve: adapter {name!r}: {conf} does not exist")
        out[name] = storage.read_json(conf)
    return out


def stage_adapters(paths: dict[str, str], root: str) -> None:
    """Copy each adapter that is not at <root>/<name>/ there (vLLM's loader reads only
    that layout)."""
    for name, path in paths.items():
        dest = storage.join(root, *name.split("/"))
        if path.rstrip("/") == dest.rstrip("/"):
            continue
        with tempfile.TemporaryDirectory(prefix="ift-vllm-") as tmp:
            local = storage.download_dir(path, tmp) if storage.is_remote(path) else path
            storage.upload_dir(local, dest)
