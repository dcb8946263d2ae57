"""`ift quickstart`: the whole chain on embedded defaults, on one laptop.

tiny model + tokenizer -> prepare the bundled sample data -> LoRA on 2 Ray Train workers ->
eval -> merge -> serve (base, adapter and merged model) -> one chat request through the
OpenAI client -> a summary table. Every step reuses finished work; --fresh starts clean.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from typing import Any

import yaml

from ift import storage
from ift.config import Config, build_config

# The embedded defaults (configs/quickstart.yaml is the same text; a test keeps them equal).
# Paths are relative to storage.root, which the command sets to its work directory.
QUICKSTART_YAML = """\
# The quickstart: the bundled sample data, a tiny llama, LoRA on 2 workers, all on CPU.
storage:
  root: ift-work/quickstart
model:
  name_or_path: ift-work/quickstart/model
data:
  output: data
  max_seq_len: 256
  val_ratio: 0.1
  placeholders: {name: ift, author: the ift authors}
  sources:
    - {path: "@sample/alpaca_en.json", tags: [en]}
    - {path: "@sample/alpaca_zh.jsonl", tags: [zh]}
    - {path: "@sample/cot_arith.tsv", tags: [cot]}
    - {path: "@sample/multiturn_sharegpt.json", tags: [multiturn]}
    - {path: "@sample/chat_openai.jsonl", tags: [multiturn]}
    - {path: "@sample/identity_en.json", tags: [identity]}
peft:
  method: lora
  r: 8
  alpha: 16
train:
  run_name: quickstart-lora
  output: runs
  num_workers: 2
  micro_batch_size: 4
  epochs: 3
  lr: 0.003
  warmup_ratio: 0.05
  eval_every: 25
  checkpoint_every: 25
eval:
  max_samples: 24
  max_new_tokens: 48
serve:
  host: 127.0.0.1
  port: 8000
  max_tokens_limit: 128
tracking:
  experiment: ift-quickstart
"""

STEPS = 8


def _step(i: int, title: str) -> float:
    print(f"\n[quickstart {i}/{STEPS}] {title}", flush=True)
    return time.time()


def _done(t0: float, what: str = "done") -> None:
    print(f"[quickstart] {what} in {time.time() - t0:.1f}s", flush=True)


def quickstart_config(workdir: str, overrides: list[str] | None = None) -> Config:
    """The embedded config with paths under `workdir` and the bundled data resolved."""
    from ift.artifacts import SAMPLE_DATA_DIR, SAMPLE_PREFIX
    from ift.config import apply_override

    raw: dict[str, Any] = yaml.safe_load(QUICKSTART_YAML)
    raw["storage"]["root"] = workdir
    raw["model"]["name_or_path"] = os.path.join(workdir, "model")
    for src in raw["data"]["sources"]:
        if src["path"].startswith(SAMPLE_PREFIX):
            src["path"] = os.path.join(SAMPLE_DATA_DIR, src["path"][len(SAMPLE_PREFIX):])
    for item in overrides or []:
        apply_override(raw, item)
    return build_config(raw)


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def run(workdir: str, *, fresh: bool = False, overrides: list[str] | None = None,
        keep_serving: bool = False, address: str | None = None) -> dict[str, Any]:
    from ift.raycluster import init_ray

    workdir = os.path.abspath(workdir)
    if fresh and os.path.isdir(workdir):
        print(f"[quickstart] --fresh: removing {workdir}", flush=True)
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    cfg = quickstart_config(workdir, overrides)
    storage.write_text(os.path.join(workdir, "quickstart.yaml"),
                       yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
    started = time.time()
    summary: dict[str, Any] = {"workdir": workdir}

    # 1. Tiny model and tokenizer.
    t0 = _step(1, "tiny llama + BPE tokenizer trained on the bundled data")
    model_dir = cfg.model.name_or_path
    if os.path.exists(os.path.join(model_dir, "ift_tiny.json")):
        _done(t0, f"reusing {model_dir}")
    else:
        from ift.models import init_tiny

        init_tiny(model_dir, arch="llama", hidden_size=64, layers=2, heads=4, seed=0)
        _done(t0, f"wrote {model_dir}")
    summary["model"] = model_dir

    init_ray(address)

    # 2. Prepare the bundled sample data.
    t0 = _step(2, "prepare the bundled sample data (English, Chinese, CoT, multi-turn)")
    from ift.data.inspect import summary as data_summary
    from ift.data.pipeline import prepare

    manifest = prepare(cfg)
    print(data_summary(manifest), flush=True)
    summary["prepared"] = cfg.resolve(cfg.data.output)
    summary["data_hash"] = manifest["hash"]
    _done(t0)

    # 3. Train LoRA with 2 workers.
    t0 = _step(3, f"LoRA on {cfg.train.num_workers} Ray Train workers")
    from ift.artifacts import FINAL_DIR
    from ift.train.driver import run_dir_of, train

    run_dir = run_dir_of(cfg)
    final = storage.join(run_dir, FINAL_DIR)
    result = train(cfg, address=address)
    summary.update({"run_dir": run_dir, "adapter": final,
                    "mlflow_run_id": result.get("mlflow_run_id"),
                    "train_loss": result.get("final_loss"), "eval_loss": result.get("eval_loss")})
    _done(t0)

    # 4. Evaluate.
    t0 = _step(4, "evaluate: loss, perplexity and generation metrics on the held-out split")
    from ift.eval.run import evaluate_run

    ev = evaluate_run(cfg, run_dir)
    summary["eval"] = ev
    _done(t0)

    # 5. Merge.
    t0 = _step(5, "merge the adapter into the base model")
    from ift.serve.merge import merge

    merged = os.path.join(workdir, "merged")
    if storage.is_complete(merged) and os.path.getmtime(merged) >= os.path.getmtime(final):
        _done(t0, f"reusing {merged}")
    else:
        merge(model_dir, final, merged)
        _done(t0, f"wrote {merged}")
    summary["merged"] = merged

    # 6. Serve base, adapter and merged model.
    t0 = _step(6, "serve base + adapter + merged model (OpenAI-compatible, Ray Serve)")
    from ift.serve.app import APP_NAME, start

    cfg.serve.port = _free_port(cfg.serve.port)
    cfg.serve.adapters = {"quickstart-lora": final}
    cfg.serve.merged_models = {"quickstart-merged": merged}
    url = start(cfg)
    summary["endpoint"] = f"{url}/v1"
    _done(t0, f"serving at {url}/v1")

    # 7. A chat request through the OpenAI client.
    t0 = _step(7, "chat request through the official OpenAI client")
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    models = [m.id for m in client.models.list().data]
    question = "What is 12 + 30?"
    reply = client.chat.completions.create(
        model="quickstart-lora", messages=[{"role": "user", "content": question}],
        max_tokens=48, temperature=0)
    summary["models"] = models
    summary["chat"] = {"question": question, "answer": reply.choices[0].message.content,
                       "usage": reply.usage.model_dump() if reply.usage else None}
    print(f"  models: {', '.join(models)}\n  user: {question}\n"
          f"  quickstart-lora: {summary['chat']['answer']!r}", flush=True)
    _done(t0)

    # 8. Summary.
    _step(8, "summary")
    summary["seconds"] = time.time() - started
    print(summary_table(cfg, summary), flush=True)
    if keep_serving:
        print(f"[quickstart] serving at {url}/v1 until Ctrl-C", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    from ray import serve

    serve.delete(APP_NAME)
    serve.shutdown()
    return summary


def summary_table(cfg: Config, s: dict[str, Any]) -> str:
    from ift import tracking

    ev = (s.get("eval") or {}).get("metrics") or {}

    def num(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, (int, float)) else str(v)

    uri = tracking.resolve_uri(cfg)
    rows = [
        ("train loss (last step)", num(s.get("train_loss"))),
        ("eval loss / perplexity", f"{num(ev.get('loss'))} / {num(ev.get('perplexity'))}"),
        ("exact match", num(ev.get("exact_match"))),
        ("ROUGE-L", num(ev.get("rouge_l"))),
        ("tiny model", s["model"]),
        ("prepared data", f"{s['prepared']} (hash {s['data_hash'][:12]})"),
        ("run dir", s["run_dir"]),
        ("adapter", s["adapter"]),
        ("merged model", s["merged"]),
        ("MLflow run", s.get("mlflow_run_id") or "-"),
        ("MLflow UI", f"mlflow ui --backend-store-uri {uri}"),
        ("endpoint (stopped on exit)", s["endpoint"]),
        ("serve again", f"ift serve -c {s['workdir']}/quickstart.yaml "
                        f"serve.adapters.quickstart-lora={s['adapter']}"),
        ("total time", f"{s['seconds']:.0f}s"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}} | {v}" for k, v in rows] + [line])


def quickstart_cmd(args) -> int:
    run(args.workdir, fresh=args.fresh, overrides=args.overrides,
        keep_serving=args.keep_serving, address=args.address)
    return 0
