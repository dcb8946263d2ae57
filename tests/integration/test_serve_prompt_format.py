"""`ift serve` builds the prompt a model was trained with, from the model's own record.

One Serve app on a local Ray: the tiny ChatML base model, an adapter trained (recorded) on
the alpaca template, one on chatml, and both merged. Each greedy reply equals plain
transformers + PeftModel.generate on the prompt built from the recorded jinja, stopping at
the recorded end-of-turn tokens, token for token; the merged dirs' own tokenizers build
that prompt with a plain `apply_chat_template`. With IFT_REAL_MODEL_DIR set, the same runs
on that model too.
"""

from __future__ import annotations

import os

import pytest
import requests
from train_support import random_lora_adapter, served_text, torch_threads

pytestmark = pytest.mark.timeout(600)

MAX_TOKENS = 16
REPLICA_THREADS = 1  # cpus_per_replica 0.5: the engine runs on 1 thread
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "中国的首都是哪里？"}],
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["tiny", "real"])
def served(request, ray_cluster, tiny_model, tmp_path_factory):
    from ray import serve

    from ift.artifacts import write_prompt_format
    from ift.config import build_config
    from ift.data.templates import prompt_format
    from ift.merge import merge
    from ift.models import load_tokenizer
    from ift.serve.app import start

    base = tiny_model
    if request.param == "real":
        base = os.environ.get("IFT_REAL_MODEL_DIR", "")
        if not base:
            pytest.skip("IFT_REAL_MODEL_DIR is not set")
    tok = load_tokenizer(base)
    root = tmp_path_factory.mktemp(f"fmt-{request.param}")
    adapters, merged = {}, {}
    for i, template in enumerate(("alpaca", "chatml")):
        path = random_lora_adapter(base, str(root / template), seed=10 + i)
        write_prompt_format(path, prompt_format(template, tok))
        adapters[template] = path
        merged[f"merged-{template}"] = str(root / f"merged-{template}")
        merge(base, path, merged[f"merged-{template}"])
    port = free_port()
    cfg = build_config({"serve": {
        "base_model": base, "port": port, "max_tokens_limit": 64, "cpus_per_replica": 0.5,
        "batch_wait_timeout_s": 0.0, "adapters": adapters, "merged_models": merged}})
    url = start(cfg, name="fmt", route_prefix="/fmt")
    yield {"url": url, "base": base, "adapters": adapters, "merged": merged}
    serve.shutdown()


def reply(url: str, model: str, messages) -> dict:
    r = requests.post(url + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS})
    assert r.status_code == 200, r.text
    return r.json()


def reference(model_dir: str, adapter: str | None, messages) -> tuple[int, str, int]:
    """(prompt tokens, reply, reply tokens) from plain transformers (+ PeftModel): the
    prompt from the recorded jinja (the merged dir's own tokenizer template), greedy
    generate stopping at the recorded stop tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ift.artifacts import read_prompt_format

    fmt = read_prompt_format(adapter or model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    # A merged dir's tokenizer carries the template; an adapter's comes from its record.
    template = fmt.chat_template if adapter else None
    ids = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    x = torch.tensor([list(ids)])
    stops = sorted({*fmt.stop_token_ids, tok.eos_token_id} - {None})
    with torch_threads(REPLICA_THREADS):
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS,
                             do_sample=False, eos_token_id=stops,
                             pad_token_id=model.config.pad_token_id)
    new = out[0, x.shape[1]:].tolist()
    return x.shape[1], served_text(tok, [t for t in new if t not in stops]), len(new)


def test_adapter_replies_equal_peft_generate_in_the_recorded_format(served):
    for template, path in served["adapters"].items():
        for messages in CONVERSATIONS:
            got = reply(served["url"], template, messages)
            n_prompt, text, n_reply = reference(served["base"], path, messages)
            assert got["usage"]["prompt_tokens"] == n_prompt, (template, messages)
            assert got["choices"][0]["message"]["content"] == text, (template, messages)
            assert got["usage"]["completion_tokens"] == n_reply, (template, messages)


def test_merged_replies_equal_generate_with_the_merged_tokenizer_template(served):
    from transformers import AutoTokenizer

    from ift.artifacts import read_prompt_format

    for model_id, path in served["merged"].items():
        fmt = read_prompt_format(path)
        assert fmt.template == model_id.removeprefix("merged-")
        assert AutoTokenizer.from_pretrained(path).chat_template == fmt.chat_template
        for messages in CONVERSATIONS:
            got = reply(served["url"], model_id, messages)
            n_prompt, text, n_reply = reference(path, None, messages)
            assert got["usage"]["prompt_tokens"] == n_prompt, (model_id, messages)
            assert got["choices"][0]["message"]["content"] == text, (model_id, messages)
            assert got["usage"]["completion_tokens"] == n_reply, (model_id, messages)


def test_the_alpaca_adapter_is_prompted_in_alpaca_not_the_bases_chatml(served):
    """Each adapter is prompted in its recorded template (alpaca, ift's chatml), the base in
    its own (the tiny base's is ift's chatml; SmolLM2's own ChatML jinja adds a default
    system prompt, so there the base prompt is longer than the chatml adapter's)."""
    from ift.data.templates import render_prompt
    from ift.models import load_tokenizer

    tok = load_tokenizer(served["base"])
    msgs = CONVERSATIONS[0]
    n = {m: reply(served["url"], m, msgs)["usage"]["prompt_tokens"]
         for m in ("base", "chatml", "alpaca")}
    want = {t: len(tok(render_prompt(msgs, tok, t), add_special_tokens=False)["input_ids"])
            for t in ("chatml", "alpaca")}
    base = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                   return_dict=False)
    assert n["chatml"] == want["chatml"] and n["alpaca"] == want["alpaca"]
    assert n["chatml"] != n["alpaca"]
    assert n["base"] == len(base)
