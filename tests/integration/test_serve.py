"""`ift serve` end to end on a local Ray: the official OpenAI client, adapters from local
and s3:// paths, merged models, concurrency, malformed requests, auth, overload, the chat
CLI and the chat page in headless Chromium.

Serve starts once for the module with three applications on one loopback port:
- "/"      the main app: base + adapters (a local root and one on S3) + a merged model;
- "/tight" auth on, one request at a time and a queue of one: for 401s and 503s;
- "/slow"  a 0.05 s request timeout: for 504s;
- "/multi" two replicas holding one adapter each: adapter requests routed to the holder.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest
import requests
from train_support import random_lora_adapter as make_adapter
from train_support import served_text, torch_threads

pytestmark = pytest.mark.timeout(600)

KEY_ENV = "IFT_TEST_SERVE_KEY"
KEY = "s3cret-key"
GREEDY = {"temperature": 0, "max_tokens": 16}
REPLICA_THREADS = 1  # every app here has cpus_per_replica < 2: its engine runs on 1 thread
USER = [{"role": "user", "content": "What is the capital of France?"}]



def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, s3_server, tiny_model, tmp_path_factory):
    import uuid

    from ray import serve

    from ift import storage
    from ift.config import build_config
    from ift.merge import merge
    from ift.serve.app import start

    root = tmp_path_factory.mktemp("serve")
    adapter_root = root / "adapters"
    a = make_adapter(tiny_model, str(adapter_root / "a"), seed=1)
    b = make_adapter(tiny_model, str(adapter_root / "runs" / "b"), seed=2)
    with open(os.path.join(b, "ift_lineage.json"), "w") as f:
        json.dump({"mlflow_run_id": "run-b", "data_manifest_hash": "hash-b", "method": "lora",
                   "base_model": tiny_model}, f)
    c = make_adapter(tiny_model, str(root / "c"), seed=3)
    broken = root / "broken"  # an adapter whose config cannot be read: a load failure
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    bucket = f"ift-serve-{uuid.uuid4().hex[:8]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    s3_c = f"s3://{bucket}/adapters/c"
    storage.upload_dir(c, s3_c)
    merged = str(root / "merged-a")
    merge(tiny_model, a, merged)

    port = free_port()
    common = {"base_model": tiny_model, "port": port, "max_tokens_limit": 64,
              "batch_wait_timeout_s": 0.02}
    main_cfg = build_config({"serve": {
        **common, "adapter_root": str(adapter_root), "adapters": {"from-s3": s3_c},
        "merged_models": {"merged-a": merged}, "cpus_per_replica": 0.5,
        "max_adapters_per_replica": 4, "max_batch_size": 8,
        # A trusted local server: paths shown to anonymous callers (ift lineage reads them).
        "show_model_paths": True}})
    os.environ[KEY_ENV] = KEY
    tight_cfg = build_config({"serve": {
        **common, "api_key_env": KEY_ENV, "cpus_per_replica": 0.25, "max_batch_size": 1,
        "max_ongoing_requests": 1, "max_queued_requests": 1}})
    slow_cfg = build_config({"serve": {
        **common, "max_tokens_limit": 512, "request_timeout_s": 0.05, "cpus_per_replica": 0.25}})
    multi_cfg = build_config({"serve": {
        **common, "adapter_root": str(adapter_root), "num_replicas": 2, "cpus_per_replica": 0.2,
        "max_adapters_per_replica": 1, "adapters": {"broken": str(broken)}}})
    url = start(main_cfg)
    tight = start(tight_cfg, name="tight", route_prefix="/tight")
    slow = start(slow_cfg, name="slow", route_prefix="/slow")
    multi = start(multi_cfg, name="multi", route_prefix="/multi")
    yield {"url": url, "tight": tight, "slow": slow, "multi": multi, "tiny": tiny_model, "a": a,
           "b": b, "c": c, "merged": merged, "s3_c": s3_c, "root": str(root)}
    serve.shutdown()
    os.environ.pop(KEY_ENV, None)


def client(url: str, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def chat(url: str, model: str, messages=USER, **kw) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", timeout=120,
                         json={"model": model, "messages": messages, **GREEDY, **kw})


def reference(model_dir: str, adapter: str | None, messages, max_new_tokens: int) -> str:
    """Plain transformers (+ PeftModel.from_pretrained) greedy generate on the same prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    x = torch.tensor([list(ids)])
    with torch_threads(REPLICA_THREADS):
        out = model.generate(x, attention_mask=torch.ones_like(x),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return served_text(tok, out[0, x.shape[1]:].tolist())


# ---------------------------------------------------------------------------------------
# The OpenAI client, unmodified
# ---------------------------------------------------------------------------------------


def test_models_list_has_base_adapters_and_merged_with_lineage(server):
    models = {m.id: m for m in client(server["url"]).models.list().data}
    assert set(models) == {"base", "a", "runs/b", "from-s3", "merged-a"}
    b = models["runs/b"].model_extra["metadata"]
    assert (b["type"], b["mlflow_run_id"], b["data_manifest_hash"], b["method"]) == (
        "adapter", "run-b", "hash-b", "lora")
    assert models["merged-a"].model_extra["metadata"]["type"] == "merged"
    assert models["merged-a"].model_extra["metadata"]["merged_from"]["adapter"] == server["a"]
    assert models["base"].model_extra["metadata"]["type"] == "base"


def test_models_carry_the_serving_deployment_and_ift_lineage_walks_back(server):
    """The last lineage stage: which app and deployment serve an id, at which URL; `ift
    lineage ID --url` reads it (and the record beside the adapter) from the running server."""
    rows = {r["id"]: r["metadata"] for r in
            requests.get(server["url"] + "/v1/models", timeout=30).json()["data"]}
    assert rows["runs/b"]["serving"] == {"url": server["url"] + "/v1", "app": "ift",
                                         "deployment": "llm-base"}
    assert rows["merged-a"]["serving"]["deployment"] == "merged-merged-a"

    def lineage(*args):
        proc = subprocess.run([sys.executable, "-m", "ift", "lineage", *args, "--json",
                               "--no-mlflow"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["stages"]

    b = lineage("runs/b", "--url", server["url"])
    assert [s["stage"] for s in b] == ["prepared", "run", "adapter", "serving"]
    assert b[0]["hash"] == "hash-b" and b[1]["mlflow_run_id"] == "run-b"
    assert b[2]["path"] == server["b"] and b[3]["model_id"] == "runs/b"
    merged = lineage("merged-a", "--url", server["url"] + "/v1")
    assert [s["stage"] for s in merged] == ["adapter", "merged", "serving"]
    assert merged[0]["path"] == server["a"] and merged[1]["path"] == server["merged"]
    assert merged[2]["deployment"] == "merged-merged-a" and merged[2]["app"] == "ift"
    # An app under a route prefix reports its own URL; its key comes from the environment.
    tight = lineage("base", "--url", server["tight"], "--api-key-env", KEY_ENV)
    assert tight[-1]["url"] == server["tight"] + "/v1" and tight[-1]["app"] == "tight"
    proc = subprocess.run([sys.executable, "-m", "ift", "lineage", "nope", "--url",
                           server["url"]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "nope: not a model served at" in proc.stderr


def test_chat_completion_streaming_and_completions(server):
    c = client(server["url"])
    r = c.chat.completions.create(model="a", messages=USER, **GREEDY)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 1 <= r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # Multi-turn: the history changes the answer's prompt length.
    turns = USER + [{"role": "assistant", "content": text}, {"role": "user", "content": "More?"}]
    r2 = c.chat.completions.create(model="a", messages=turns, **GREEDY)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens + r.usage.completion_tokens - 2

    chunks = list(c.chat.completions.create(model="a", messages=USER, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(deltas) == text  # streaming and not streaming agree (greedy)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    comp = c.completions.create(model="base", prompt="Once upon a time", **GREEDY)
    assert comp.choices[0].text and comp.usage.prompt_tokens > 0
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="base", prompt="Once upon a time", stream=True, **GREEDY) if ch.choices)
    assert streamed == comp.choices[0].text


def test_sse_wire_format_ends_with_done(server):
    with requests.post(server["url"] + "/v1/chat/completions", stream=True, timeout=120,
                       json={"model": "base", "messages": USER, "stream": True, **GREEDY}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert len(payloads) >= 3  # role chunk, content, finish


# ---------------------------------------------------------------------------------------
# Correctness against plain transformers + PEFT
# ---------------------------------------------------------------------------------------


def test_greedy_output_equals_transformers_and_peft_generate(server):
    n = GREEDY["max_tokens"]
    for model, adapter in (("base", None), ("a", server["a"]), ("from-s3", server["c"])):
        got = chat(server["url"], model).json()["choices"][0]["message"]["content"]
        assert got == reference(server["tiny"], adapter, USER, n), model


def test_merged_model_is_served_under_its_own_id(server):
    got = chat(server["url"], "merged-a").json()
    assert got["model"] == "merged-a"
    text = got["choices"][0]["message"]["content"]
    assert text == reference(server["merged"], None, USER, GREEDY["max_tokens"])


def test_two_adapters_on_one_replica_concurrently_each_get_their_own(server):
    url = server["url"]
    prompts = [USER, [{"role": "user", "content": "Name a color."}]]
    alone = {(m, i): chat(url, m, p).json()["choices"][0]["message"]["content"]
             for m in ("a", "runs/b") for i, p in enumerate(prompts)}
    assert alone[("a", 0)] != alone[("runs/b", 0)]
    jobs = [(m, i) for m in ("a", "runs/b") for i in range(2)] * 3
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        futs = [ex.submit(chat, url, m, prompts[i]) for m, i in jobs]
        got = [f.result().json()["choices"][0]["message"]["content"] for f in futs]
    assert got == [alone[j] for j in jobs]


def _stream_text(url: str, model: str) -> str:
    body = {"model": model, "messages": USER, **GREEDY, "stream": True}
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        lines = [ln[6:] for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return "".join(json.loads(x)["choices"][0]["delta"].get("content") or "" for x in lines[:-1])


def test_adapter_requests_go_to_the_replica_that_holds_the_adapter(server):
    """Two replicas, an LRU of one adapter each. HTTP requests land on either replica; one
    that lacks the adapter hands the request to the replica holding it, so each adapter is
    read from disk once. Answered wherever they land, the two adapters would evict each
    other on almost every request."""
    from ray import serve

    multi = server["multi"]
    want = {m: chat(server["url"], m).json()["choices"][0]["message"]["content"]
            for m in ("a", "runs/b")}
    for _ in range(6):
        for m in ("a", "runs/b"):
            r = chat(multi, m)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == want[m]
    assert _stream_text(multi, "a") == want["a"] and _stream_text(multi, "runs/b") == want["runs/b"]
    handle = serve.get_deployment_handle("llm-base", "multi")
    infos: dict = {}
    for _ in range(60):  # the handle spreads calls over both replicas
        info = handle.info.remote().result(timeout_s=60)
        infos[info["replica"]] = info
        if len(infos) == 2:
            break
    assert len(infos) == 2
    assert sorted(a for i in infos.values() for a in i["adapters"]) == ["a", "runs/b"]
    assert sum(i["adapter_loads"] for i in infos.values()) == 2, infos


# ---------------------------------------------------------------------------------------
# Bad requests: 4xx with a message, never 500
# ---------------------------------------------------------------------------------------

M = [{"role": "user", "content": "x"}]
BAD = [
    # (method, path, body (str = raw), status, param or None)
    ("POST", "/v1/chat/completions", "{not json", 400, None),
    ("POST", "/v1/chat/completions", "", 400, None),
    ("POST", "/v1/chat/completions", "[1, 2]", 400, None),
    ("POST", "/v1/chat/completions", b"\xff\xfe", 400, None),
    ("POST", "/v1/chat/completions", {"messages": M}, 400, "model"),
    ("POST", "/v1/chat/completions", {"model": "base"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "bot", "content": "x"}]},
     400, "messages[0].role"),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": M, "temperature": 9}, 400,
     "temperature"),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": M, "top_p": -1}, 400, "top_p"),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": M, "max_tokens": 65}, 400,
     "max_tokens"),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": M, "top_k": "many"}, 400,
     "top_k"),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": M, "stop": {"a": 1}}, 400,
     "stop"),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": M, "seed": 1.5}, 400, "seed"),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": M,
                                      "repetition_penalty": -2}, 400, "repetition_penalty"),
    ("POST", "/v1/chat/completions", {"model": "base", "messages": M, "stream": "true"}, 400,
     "stream"),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": M}, 404, "model"),
    ("POST", "/v1/chat/completions", {"model": "../adapters/a", "messages": M}, 404, "model"),
    ("POST", "/v1/chat/completions", {"model": "runs/../../c", "messages": M}, 404, "model"),
    ("POST", "/v1/chat/completions", {"model": "/etc", "messages": M}, 404, "model"),
    ("POST", "/v1/chat/completions", {"model": "s3://elsewhere/x", "messages": M}, 404, "model"),
    ("POST", "/v1/completions", {"model": "base"}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": "base", "prompt": [1, 2]}, 400, "prompt"),
    ("GET", "/v1/chat/completions", None, 405, None),
    ("GET", "/v1/nothing-here", None, 404, None),
]


def test_malformed_requests_get_the_right_4xx(server):
    assert len(BAD) >= 15
    for method, path, body, status, param in BAD:
        kw = {}
        if isinstance(body, (dict, list)):
            kw["json"] = body
        elif body is not None:
            kw["data"] = body
        r = requests.request(method, server["url"] + path, timeout=60, **kw)
        assert r.status_code == status, (path, body, r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"], (path, body)
        if param:
            assert err["param"] == param, (body, err)
    # Still healthy and answering after all that.
    assert chat(server["url"], "base").status_code == 200


# ---------------------------------------------------------------------------------------
# Auth and overload (the "/tight" app)
# ---------------------------------------------------------------------------------------


def test_bearer_auth_on_and_off(server):
    tight = server["tight"]
    assert requests.get(tight + "/v1/models", timeout=30).status_code == 401
    bad = requests.get(tight + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    r = requests.post(tight + "/v1/chat/completions", json={"model": "base", "messages": USER},
                      timeout=30)
    assert r.status_code == 401
    ok = client(tight, KEY).chat.completions.create(model="base", messages=USER, **GREEDY)
    assert ok.choices[0].message.content is not None
    assert [m.id for m in client(tight, KEY).models.list().data] == ["base"]
    # Auth off on the main app: no header needed.
    assert requests.get(server["url"] + "/v1/models", timeout=30).status_code == 200


def test_overload_gets_503_json_and_the_server_recovers(server):
    tight = server["tight"]
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "base", "messages": USER, "temperature": 0, "max_tokens": 64}
    barrier = threading.Barrier(12)

    def one(_):
        barrier.wait()
        return requests.post(tight + "/v1/chat/completions", json=body, headers=headers,
                             timeout=300)

    with cf.ThreadPoolExecutor(12) as ex:
        results = list(ex.map(one, range(12)))
    codes = [r.status_code for r in results]
    assert 503 in codes and 200 in codes, codes
    assert set(codes) <= {200, 503}
    for r in results:
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "overloaded_error"
    assert requests.get(tight + "/health", timeout=30).status_code == 200
    after = requests.post(tight + "/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert after.status_code == 200


def test_prompt_over_the_context_is_a_400_and_leaves_the_replica_free(server):
    """Found only on the replica (the context is the model's): streamed or not, a 400 that
    names `messages`; the "/tight" replica (one running, one queued) then still answers."""
    tight = server["tight"]
    headers = {"Authorization": f"Bearer {KEY}"}
    long = [{"role": "user", "content": "word " * 5000}]
    for stream in (False, True, False, True):
        r = requests.post(tight + "/v1/chat/completions", headers=headers, timeout=120,
                          json={"model": "base", "messages": long, "stream": stream, **GREEDY})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and "context" in err["message"]
    ok = requests.post(tight + "/v1/chat/completions", headers=headers, timeout=120,
                       json={"model": "base", "messages": USER, **GREEDY})
    assert ok.status_code == 200, ok.text


def test_request_timeout_is_504_and_ends_a_stream(server):
    slow = server["slow"]
    body = {"model": "base", "messages": USER, "temperature": 0, "max_tokens": 512}
    # The tiny model never says eos on this prompt: 512 greedy tokens take far over 0.05 s.
    r = requests.post(slow + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["type"] == "timeout_error"
    with requests.post(slow + "/v1/chat/completions", json={**body, "stream": True},
                       stream=True, timeout=120) as s:
        status = s.status_code
        lines = [ln for ln in s.iter_lines(decode_unicode=True) if ln]
    if status == 200:  # the stream had started: it ends with an error event and [DONE]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["type"] == "timeout_error"
    else:  # timed out before the first event (a slow machine): a plain 504
        assert status == 504 and json.loads(lines[0])["error"]["type"] == "timeout_error"
    assert requests.get(slow + "/health", timeout=30).status_code == 200


# ---------------------------------------------------------------------------------------
# Clients: the terminal chat and the chat page
# ---------------------------------------------------------------------------------------


def test_chat_cli_against_the_server(server):
    proc = subprocess.run(
        [sys.executable, "-m", "ift", "chat", "--url", server["url"], "--model", "runs/b",
         "--temperature", "0", "--max-tokens", "8"],
        input="hello\nand again\n/exit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2
    assert "[error" not in proc.stdout


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_chat_page_streams_a_reply_in_headless_chromium(server):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (scripts/install_chromium.sh installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    url = server["url"]
    profile = tempfile.mkdtemp(prefix="ift-chromium-")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    try:
        with playwright.sync_playwright() as p:
            # A persistent context is how Playwright takes a user-data-dir of our own.
            ctx = p.chromium.launch_persistent_context(
                profile, executable_path=exe, headless=True, args=flags[:-1])
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#model option[value='runs/b']", state="attached", timeout=30000)
            page.select_option("#model", "runs/b")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            history = []
            for i, text in enumerate(["hello there", "and one more thing"]):
                page.fill("#input", text)
                page.click("#send")
                sel = f"#messages .msg:nth-child({2 * i + 2})[data-done='1']"
                page.wait_for_selector(sel, timeout=60000)
                reply = page.inner_text(f"#messages .msg:nth-child({2 * i + 2})")
                assert "error" not in page.get_attribute(f"#messages .msg:nth-child({2 * i + 2})",
                                                         "class")
                history.append({"role": "user", "content": text})
                # The page sent the whole history: the server gives the same greedy answer.
                want = chat(url, "runs/b", history, max_tokens=12).json()
                assert reply == want["choices"][0]["message"]["content"].strip() or \
                    reply == want["choices"][0]["message"]["content"]
                history.append({"role": "assistant", "content": want["choices"][0]["message"]["content"]})
            assert page.locator("#messages .msg.user").count() == 2
            assert page.locator("#messages .msg.assistant").count() == 2
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Hostile bodies, anonymous callers, fuzzing
# ---------------------------------------------------------------------------------------


def _post_raw(url: str, path: str, raw: bytes) -> requests.Response:
    return requests.post(url + path, data=raw, timeout=60,
                         headers={"Content-Type": "application/json"})


def test_lone_surrogate_and_deep_nesting_are_json_400s(server):
    url = server["url"]
    r = _post_raw(url, "/v1/chat/completions",
                  b'{"model": "base", "messages": [{"role": "user", "content": "\\ud800 hi"}]}')
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[0].content"
    r = _post_raw(url, "/v1/completions", b'{"model": "base", "prompt": "a\\udc80"}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = _post_raw(url, path, b"[" * 100_000)
        assert r.status_code == 400, r.text[:200]
        assert "nested too deeply" in r.json()["error"]["message"]
        r = _post_raw(url, path, b'{"model": "base", "max_tokens": ' + b"9" * 5000 + b"}")
        assert r.status_code == 400, r.text[:200]
    assert chat(url, "base").status_code == 200


def test_a_server_error_names_a_request_id_not_the_exception(server):
    multi = server["multi"]
    for stream in (False, True):
        r = chat(multi, "broken", stream=stream)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error", err
        assert re.fullmatch(r"internal server error \(request id req-[0-9a-f]+\); the server "
                            r"log has the details", err["message"]), err
        for leak in ("Error", "Exception", "Traceback", "Expecting", server["root"]):
            assert leak not in r.text, r.text
    assert chat(multi, "a").status_code == 200


def test_v1_models_shows_no_server_path_to_anonymous_callers(server):
    r = requests.get(server["multi"] + "/v1/models", timeout=30)
    assert r.status_code == 200
    for secret in (server["root"], server["tiny"]):
        assert secret not in r.text, r.text
    rows = {m["id"]: m for m in r.json()["data"]}
    assert "root" not in rows["runs/b"]
    b = rows["runs/b"]["metadata"]
    assert (b["type"], b["method"], b["mlflow_run_id"], b["data_manifest_hash"], b["base"]) == (
        "adapter", "lora", "run-b", "hash-b", "base")
    assert "path" not in b and b["serving"]["app"] == "multi"
    # The key holder sees the paths.
    full = requests.get(server["tight"] + "/v1/models", timeout=30,
                        headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert full[0]["root"] == server["tiny"] and full[0]["metadata"]["path"] == server["tiny"]


def test_fuzzing_the_openapi_schema_finds_no_5xx(server, tmp_path):
    """schemathesis against the app's own /openapi.json, bounded in examples and time."""
    schema = requests.get(server["url"] + "/openapi.json", timeout=30).json()
    assert "requestBody" in schema["paths"]["/v1/chat/completions"]["post"]
    st = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    cmd = [st, "run", server["url"] + "/openapi.json", "--checks", "not_a_server_error",
           "--max-examples", "40", "--max-time", "45", "--seed", "13", "--workers", "1",
           "--phases", "examples,coverage,fuzzing", "--generation-database", "none",
           "--request-timeout", "60", "--no-color", "--suppress-health-check", "all"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # Still answering normally afterwards.
    assert chat(server["url"], "base").status_code == 200
    assert requests.get(server["url"] + "/health", timeout=30).json() == {"status": "ok"}
