"""The vLLM backend up to the engine call: adapters from serve.adapters and from a root
(a run's final/ included), max_lora_rank covering r = 8, 32 and 64, DoRA / AdaLoRA /
prompt adapters refused by name, the training chat template passed, vLLM's own
max_num_seqs kept."""

from __future__ import annotations

import os

import pytest
from train_support import make_tiny_model, random_lora_adapter

from ift.config import ConfigError, build_config
from ift.models import CHATML_TEMPLATE
from ift.serve import vllm
from ift.serve.app import vllm_llm_configs


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("vllm")
    base = make_tiny_model(str(root / "base"))
    out = {}
    for r in (8, 32, 64):
        d = root / "runs" / f"r{r}" / "final"  # a run directory's final adapter
        random_lora_adapter(base, str(d), seed=r, r=r)
        out[f"r{r}"] = str(d)
    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=8, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(str(root / "dora"))
    out["dora"] = str(root / "dora")
    return base, str(root / "runs"), out


def _cfg(base, **serve):
    return build_config({"model": {"name_or_path": base}, "data": {"template": "chatml"},
                         "serve": {"backend": "vllm", "base_model_id": "base",
                                   "adapter_root": "s3://bucket/adapters", **serve}})


def test_ranks_8_32_64_from_a_root_of_run_directories(adapters):
    base, runs, paths = adapters
    found = vllm.collect_adapters({}, runs)
    assert found == {"r8": paths["r8"], "r32": paths["r32"], "r64": paths["r64"]}
    confs = vllm.read_adapter_configs(found)
    (conf,) = vllm_llm_configs(_cfg(base, max_adapters_per_replica=2), confs)
    kw = conf["engine_kwargs"]
    assert kw["enable_lora"] and kw["max_lora_rank"] == 64 and kw["max_loras"] == 2
    assert "max_num_seqs" not in kw  # vLLM's default, not the transformers batch size
    assert kw["chat_template"] == CHATML_TEMPLATE
    assert conf["lora_config"]["dynamic_lora_loading_path"] == "s3://bucket/adapters"
    # r=32 alone needs 32: vLLM's default of 16 would refuse it.
    (only32,) = vllm_llm_configs(_cfg(base), {"r32": confs["r32"]})
    assert only32["engine_kwargs"]["max_lora_rank"] == 32


def test_serve_adapters_are_honoured_and_a_dora_adapter_is_refused(adapters):
    base, _, paths = adapters
    named = vllm.collect_adapters({"mine": paths["r8"]}, "")
    assert named == {"mine": paths["r8"]}
    with pytest.raises(ConfigError, match="adapter 'dora' is a DoRA adapter"):
        vllm_llm_configs(_cfg(base), vllm.read_adapter_configs({"dora": paths["dora"],
                                                                "mine": paths["r8"]}))


@pytest.mark.parametrize("peft_type,what", [("ADALORA", "AdaLoRA"),
                                            ("PROMPT_TUNING", "prompt tuning"),
                                            ("PREFIX_TUNING", "prefix tuning")])
def test_adapters_vllm_cannot_load_are_refused(peft_type, what):
    with pytest.raises(ConfigError, match=f"adapter 'a' is a {what} adapter"):
        vllm.adapter_rank("a", {"peft_type": peft_type, "r": 8})


def test_chat_template_follows_training_and_adapters_need_a_root(adapters):
    base, _, paths = adapters
    cfg = build_config({"model": {"name_or_path": base}, "data": {"template": "alpaca"},
                        "serve": {"backend": "vllm"}})
    with pytest.raises(ConfigError, match="data.template=alpaca"):
        vllm_llm_configs(cfg)
    tok = build_config({"model": {"name_or_path": base}, "data": {"template": "tokenizer"},
                        "serve": {"backend": "vllm"}})
    assert "chat_template" not in vllm_llm_configs(tok)[0]["engine_kwargs"]
    no_root = build_config({"model": {"name_or_path": base},
                            "serve": {"backend": "vllm", "adapters": {"a": paths["r8"]}}})
    with pytest.raises(ConfigError, match="needs serve.adapter_root"):
        vllm_llm_configs(no_root, vllm.read_adapter_configs({"a": paths["r8"]}))
    assert os.path.exists(os.path.join(paths["r8"], "adapter_config.json"))


def test_llm_configs_take_the_serve_section_and_the_template_name():
    assert vllm.chat_template("chatml") == CHATML_TEMPLATE
    assert vllm.chat_template("auto") is None and vllm.chat_template("tokenizer") is None
    with pytest.raises(ConfigError, match="data.template=human_assistant"):
        vllm.chat_template("human_assistant")
    serve = build_config({"serve": {"backend": "vllm", "base_model_id": "b", "num_replicas": 2,
                                    "engine_kwargs": {"chat_template": "{{ x }}"}}}).serve
    base, merged = vllm.llm_configs(serve, "chatml", "/models/b", {"m": "/models/m"}, "", {})
    assert base["model_loading_config"] == {"model_id": "b", "model_source": "/models/b"}
    assert base["deployment_config"]["num_replicas"] == 2 and "lora_config" not in base
    # serve.engine_kwargs' own chat_template wins over the training template's
    assert base["engine_kwargs"] == {"chat_template": "{{ x }}"}
    assert merged["model_loading_config"]["model_source"] == "/models/m"
