"""`ift eval`: loss, perplexity and generation metrics of a trained model on held-out data.

    ift eval -c CONFIG [key=value ...]            the run <train.output>/<train.run_name>
    ift eval --run RUN_DIR [--data DIR]           a run directory (its config.yaml is used)
    ift eval --adapter PATH [--data DIR] -c ...   an adapter or full model directory
    ift eval --models base,A,B,MERGED [--data ...] several models side by side (compare.py)
    ... --benchmarks mmlu=PATH,ceval              multiple choice by log-likelihood

The model is the run's `final/` directory: a PEFT adapter (loaded on its base model,
`model.name_or_path` of the run's config) or a full HF model. Held-out data is `--data`,
else `eval.data`, else the run's prepared dataset (its val split); see ift.eval.heldout.

Loss and perplexity cover every held-out row (mean over trained tokens). Generation is
greedy, through the serving engine (ift.eval.generate), on the first `eval.max_samples`
rows. `eval.benchmarks` are scored too (ift.eval.benchmarks). Results go to
`<output>/eval.json` (metrics and what was evaluated) and `<output>/samples.jsonl` (one
line per generated sample: prompt, reference, output, gold, predicted, correct, ...);
output is `eval.output`, else the run directory. Metrics are logged as `heldout/*` to the
run's MLflow run (a training run or a Tune trial's child run), else to a new run.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import yaml
from peft import PeftModel

from ift import storage, tracking
from ift.artifacts import (
    CONFIG_FILE,
    FINAL_DIR,
    RUN_FILE,
    FinalModel,
    PromptFormat,
    bundled_path,
    read_prompt_format,
)
from ift.config import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    apply_override,
    build_config,
    load_config,
)
from ift.data import dataset
from ift.data.templates import choose_prompt_format, prompt_format, resolve_template
from ift.eval import benchmarks, heldout, ie, metrics
from ift.eval import preference as pref_eval
from ift.eval.generate import context_limit, generate
from ift.models import load_model, load_tokenizer, tokenizer_identity
from ift.train.collate import collate
from ift.train.loss import token_loss_sum

EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"
BENCH_SAMPLES_FILE = "benchmark_samples.jsonl"
BENCH_TABLE_FILE = "benchmarks.md"
BENCH_PREFIX = "bench/"
IE_REPORT = "ie_scores"  # .md and .csv: per-type IE scores, when the held-out data is IE
METRIC_PREFIX = "heldout/"


def _log(msg: str) -> None:
    print(f"[ift eval] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


def adapter_settings(path: str, where: str) -> dict[str, Any] | None:
    """adapter_config.json of an adapter dir, None for a full model dir; anything else is
    a ConfigError that starts with `where`."""
    found = FinalModel(path)
    settings = found.adapter_settings()
    if settings is None and not found.is_model():
        raise ConfigError(f"{where}: holds neither a PEFT adapter (adapter_config.json) nor "
                          "a HF model (config.json)")
    return settings


def load_for_eval(model_dir: str, model_cfg: ModelConfig, device: str = "cpu"):
    """(model in eval mode, tokenizer, description) for an adapter or full-model directory,
    loaded with the options of the model section (dtype, revision, trust_remote_code, ...).

    An adapter loads on `model_cfg.name_or_path`, else on the base named in its
    adapter_config.json. The tokenizer is the one saved beside the weights, else the base's.
    """
    local = storage.local_copy(model_dir)
    if not storage.exists(local):
        raise ConfigError(f"model {model_dir} does not exist")
    adapter_cfg = adapter_settings(local, model_dir)
    if adapter_cfg is not None:
        base = model_cfg.name_or_path or adapter_cfg.get("base_model_name_or_path") or ""
        if not base:
            raise ConfigError(f"{model_dir} is an adapter but no base model is known: set "
                              "model.name_or_path")
        model = load_model(replace(model_cfg, name_or_path=base), device=device)
        model = PeftModel.from_pretrained(model, local)
        tok_dir = local if storage.exists(os.path.join(local, "tokenizer_config.json")) else base
        desc = {"adapter": model_dir, "base": base}
    else:
        model = load_model(replace(model_cfg, name_or_path=local), device=device)
        tok_dir = local
        desc = {"model": model_dir}
    tokenizer = load_tokenizer(tok_dir, trust_remote_code=model_cfg.trust_remote_code)
    model.eval()
    return model, tokenizer, desc


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------
# Loss and generation
# ---------------------------------------------------------------------------------------


def token_loss(model, rows: list[dict[str, Any]], pad_id: int, batch_size: int,
               device: str = "cpu") -> tuple[float | None, int]:
    """(mean next-token loss over trained tokens, trained tokens) of tokenized rows: the
    training loop's batches (`collate`) and loss (`ift.train.loss`), shortest first."""
    total, count = 0.0, 0
    rows = sorted(rows, key=lambda r: len(r["input_ids"]))
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size], pad_id, packed=False)
            out = model(input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device), use_cache=False)
            s, n = token_loss_sum(out.logits, batch["labels"])
            total += s
            count += n
    return (total / count if count else None), count


# ---------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------


def _manifest_format(prepared: str | None, tokenizer):
    """The prompt format of the template a prepared dataset was rendered with (None when
    `prepared` is not a prepared dir or names no template)."""
    if prepared and dataset.is_prepared(prepared):
        name = dataset.read_manifest(prepared).get("template")
        if name:
            return prompt_format(name, tokenizer)
    return None


def training_prompt_format(data_cfg: DataConfig, prepared: str | None, tokenizer):
    """The prompt format of the model being trained (what the run records beside its
    models): the prepared manifest's template, else data.template, for this tokenizer."""
    return _manifest_format(prepared, tokenizer) or prompt_format(data_cfg.template or "auto",
                                                                  tokenizer)


def _prompt_format(data_cfg: DataConfig, model_dir: str, prepared: str | None, tokenizer):
    """The prompt format the model was trained with: recorded beside it, else the prepared
    manifest's template, else data.template (for this tokenizer). A data.template that
    differs from the record overrides it, with a warning."""
    recorded = read_prompt_format(model_dir) or _manifest_format(prepared, tokenizer)
    return choose_prompt_format(recorded, data_cfg.template, tokenizer, model_dir,
                                logging.getLogger("ift.eval"))


def _check_tokenizer(prepared: str, tokenizer, model_dir: str) -> None:
    """Token ids of a prepared set only mean something to the tokenizer that made them."""
    theirs = dataset.read_manifest(prepared).get("tokenizer") or {}
    ours = tokenizer_identity(tokenizer)
    if theirs.get("sha256") and theirs["sha256"] != ours["sha256"]:
        raise ConfigError(
            f"eval.data={prepared} was tokenized with {theirs.get('name_or_path')!r} (vocab "
            f"{theirs.get('vocab_size')}), not with the tokenizer of {model_dir} ({ours['class']}, "
            f"vocab {ours['vocab_size']}); evaluate on raw files or a dataset prepared with "
            "this model's tokenizer"
        )


@dataclass
class HeldOut:
    """A held-out set made ready for one tokenizer: loss rows and generation items."""

    data: str
    rows: list[dict[str, Any]]
    """Tokenized rows (input_ids, labels) for the loss."""
    items: list[heldout.Item]
    """Generation items (the first eval.max_samples rows)."""
    source: dict[str, Any]
    """What kind of data it is (eval.json's data_kind)."""
    prompt_format: PromptFormat
    """The format the items' prompts are rendered in; generation stops at its end-of-turn
    tokens."""
    pairs: list[dict[str, Any]] | None = None
    """Preference pairs (held-out pair data), scored for preference accuracy."""


def heldout_set(data_cfg: DataConfig, eval_cfg: EvalConfig, data: str, tokenizer, *,
                prepared: str | None, model_dir: str, limit: int | None) -> HeldOut:
    """Read `data` (a prepared dir's val split or raw files) for `tokenizer`; `limit` is
    the model's context (raw rows are tokenized to fit it, and to data.max_seq_len). Raw
    records are read with the data section's seed, sources and placeholders, as training
    read them; eval.max_samples bounds the items, eval.max_loss_rows the rows of
    conversations (held-out preference pairs are all scored)."""
    e = eval_cfg
    fmt = _prompt_format(data_cfg, model_dir, prepared, tokenizer)
    pairs = pref_eval.held_out_pairs(
        data_cfg, data, tokenizer, None if dataset.is_prepared(data) else fmt.template)
    if pairs is not None:  # preference pairs: loss and generation on the chosen side
        if dataset.is_prepared(data):
            _check_tokenizer(data, tokenizer, model_dir)
        rows = pairs.rows
        items = heldout.items_from_rows(rows[: e.max_samples], tokenizer)
        source: dict[str, Any] = {"kind": "preference", "skipped": len(pairs.skipped)}
        if pairs.skipped:
            print(f"[ift eval] {len(pairs.skipped)} held-out pair(s) left out, first: "
                  f"{pairs.skipped[0]}", flush=True)
    elif dataset.is_prepared(data):
        _check_tokenizer(data, tokenizer, model_dir)
        rows = list(itertools.islice(dataset.iter_samples(data, "val"),
                                     e.max_loss_rows or None))
        items = heldout.items_from_rows(rows[: e.max_samples], tokenizer)
        source = {"kind": "prepared", "split": "val"}
    else:
        # placeholders filled as `ift data prepare` fills the training rows
        records = heldout.raw_records(data, seed=data_cfg.seed, sources=data_cfg.sources,
                                      placeholders=data_cfg.placeholders)
        template = fmt.template
        items = heldout.items_from_records(records[: e.max_samples], tokenizer, template)
        rows = heldout.loss_rows_from_records(records[: e.max_loss_rows or None],
                                              tokenizer, template,
                                              min(limit or data_cfg.max_seq_len,
                                                  max(data_cfg.max_seq_len, 8)))
        source = {"kind": "raw", "template": template}
    if not items:
        raise ConfigError(f"eval.data={data}: no held-out rows")
    return HeldOut(data=data, rows=rows, items=items, source=source,
                   prompt_format=fmt, pairs=None if pairs is None else pairs.rows)


def encode_benchmarks(data_cfg: DataConfig, eval_cfg: EvalConfig, tokenizer,
                      names: list[str] | None = None) -> dict[str, benchmarks.EncodedBenchmark]:
    """eval.benchmarks (or the named ones) read and tokenized for `tokenizer`; chat
    benchmarks are rendered with data.template."""
    chosen = eval_cfg.benchmarks if names is None else {
        n: eval_cfg.benchmarks[n] for n in names}
    template = resolve_template(data_cfg.template, tokenizer) \
        if any(b.chat for b in chosen.values()) else "auto"
    return {n: benchmarks.encode(n, b, tokenizer, template) for n, b in chosen.items()}


def score_model(eval_cfg: EvalConfig, train_cfg: TrainConfig, model, tokenizer,
                held: HeldOut | None, benches: dict[str, benchmarks.EncodedBenchmark],
                device: str = "cpu") -> dict[str, Any]:
    """Every metric of one model: {metrics, samples, benchmarks, benchmark_samples}.

    metrics: held-out loss, perplexity and generation metrics (empty without held-out
    data); benchmarks: per benchmark, per subject and overall accuracy. Batches and
    generation length come from eval_cfg; preference pairs' implicit reward uses
    train_cfg.beta.
    """
    e = eval_cfg
    out: dict[str, Any] = {"metrics": {}, "samples": [], "benchmarks": {},
                           "benchmark_samples": []}
    if held is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        loss, loss_tokens = token_loss(model, held.rows, pad_id, max(1, e.batch_size), device)
        samples = generate_samples(model, tokenizer, held.items, max_new_tokens=e.max_new_tokens,
                                   batch_size=max(1, e.batch_size), device=device,
                                   prompt_format=held.prompt_format)
        ie_metrics, out["ie_rows"] = ie_scores(held.items, samples)
        out["metrics"] = {"loss": loss, "perplexity": metrics.perplexity(loss),
                          "loss_rows": len(held.rows), "loss_tokens": loss_tokens,
                          **metrics.aggregate(samples), **metrics.task_metrics(samples),
                          **ie_metrics}
        if held.pairs is not None:
            out["metrics"].update(pref_eval.pair_metrics(
                model, held.pairs, pad_id, max(1, e.batch_size), device, train_cfg.beta))
        out["samples"] = samples
    for name, enc in benches.items():
        res, bsamples = benchmarks.score_benchmark(model, enc, device)
        out["benchmarks"][name] = res
        out["benchmark_samples"] += bsamples
    return out


def generate_samples(model, tokenizer, items: list[heldout.Item], *, max_new_tokens: int,
                     batch_size: int, device: str = "cpu",
                     prompt_format: PromptFormat | None = None) -> list[dict[str, Any]]:
    """Generate on held-out items (prompts rendered in `prompt_format`) and score each
    output (one samples.jsonl line each); generation ends at eos or at one of the format's
    end-of-turn tokens."""
    outs = generate(model, tokenizer, [it.prompt_ids for it in items],
                    max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                    prompt_format=prompt_format)
    samples = []
    for it, o in zip(items, outs):
        scored = metrics.score_sample(o["text"], it.reference, it.gold, it.options)
        samples.append({
            "id": it.id, "prompt": it.prompt, "reference": it.reference,
            "output": o["text"], "gold": it.gold, **scored,
            "options": it.options or None, "finish_reason": o["finish_reason"],
            "completion_tokens": o["tokens"], **({"task": it.task} if it.task else {}),
        })
    return samples


def evaluate(cfg: Config, *, model_dir: str, data: str | None, output: str,
             prepared: str | None = None, mlflow_run_id: str | None = None,
             step: int | None = None, run_name: str = "eval",
             parent_run_id: str | None = None) -> dict[str, Any]:
    """Evaluate `model_dir` on `data` and eval.benchmarks; write eval.json and
    samples.jsonl (and benchmarks.md, benchmark_samples.jsonl) under `output`; log to
    MLflow run `mlflow_run_id` (a new run when empty and tracking is on).

    `prepared` is the training data (its manifest names the chat template used to render
    prompts of raw held-out files). Returns eval.json's content.
    """
    started = time.time()
    device = _device()
    model, tokenizer, desc = load_for_eval(model_dir, cfg.model, device)
    if not data and not cfg.eval.benchmarks:
        raise ConfigError("nothing to evaluate: give held-out data (--data, eval.data) or "
                          "eval.benchmarks")
    held = heldout_set(cfg.data, cfg.eval, data, tokenizer, prepared=prepared,
                       model_dir=model_dir, limit=context_limit(model)) if data else None
    benches = encode_benchmarks(cfg.data, cfg.eval, tokenizer)
    if held is not None:
        _log(f"{len(held.rows)} held-out rows for loss, {len(held.items)} for generation "
             f"(max {cfg.eval.max_new_tokens} new tokens) on {device}")
    for name, enc in benches.items():
        _log(f"benchmark {name}: {sum(len(v) for v in enc.subjects.values())} questions in "
             f"{len(enc.subjects)} subjects, {enc.k_shot}-shot, {len(enc.rejects)} rows rejected")
    scored = score_model(cfg.eval, cfg.train, model, tokenizer, held, benches, device)
    result = {
        "metrics": scored["metrics"],
        **desc,
        "data": data or "",
        "data_kind": held.source if held is not None else None,
        "max_samples": cfg.eval.max_samples,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 2),
        "mlflow_run_id": "",
    }
    if benches:
        result["benchmarks"] = scored["benchmarks"]
    artifacts = write_outputs(output, scored)
    eval_path = storage.join(output, EVAL_FILE)
    run_id = _log_mlflow(cfg, result, mlflow_run_id, step, run_name, parent_run_id, artifacts)
    result["mlflow_run_id"] = run_id
    storage.write_text(eval_path, json.dumps(result, indent=2, ensure_ascii=False))
    if run_id:
        tracking.log_artifact(run_id, eval_path, "eval")
    _log(summary_text(result))
    return result


def ie_scores(items: list, samples: list[dict[str, Any]]
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """IE metrics of the held-out rows that are IE records (ift.eval.ie): flat metrics and
    the per-type rows (written beside eval.json as IE_REPORT .md and .csv)."""
    scored = [(it.ie["task"], s["output"], it.ie.get("gold") or [])
              for it, s in zip(items, samples) if it.ie]
    if not scored:
        return {}, []
    for it, s in zip(items, samples):
        if it.ie:
            s["ie_task"] = it.ie["task"]
            s["ie_pred"] = ie.parse_output(it.ie["task"], s["output"])
    values, rows, _ = ie.score_samples(scored)
    return values, rows


def write_outputs(output: str, scored: dict[str, Any]) -> list[str]:
    """samples.jsonl (held-out), benchmark_samples.jsonl and benchmarks.md, and for IE data
    ie_scores.md/.csv, under `output`; returns the paths written."""
    storage.makedirs(output)
    paths = []
    if scored.get("ie_rows"):
        md = storage.join(output, IE_REPORT + ".md")
        csv_path = storage.join(output, IE_REPORT + ".csv")
        storage.write_text(md, "# IE scores per type\n\n" + ie.table_markdown(scored["ie_rows"]))
        storage.write_text(csv_path, ie.table_csv(scored["ie_rows"]))
        paths += [md, csv_path]
    if scored["samples"]:
        paths.append(_write_jsonl(storage.join(output, SAMPLES_FILE), scored["samples"]))
    if scored["benchmarks"]:
        paths.append(_write_jsonl(storage.join(output, BENCH_SAMPLES_FILE),
                                  scored["benchmark_samples"]))
        path = storage.join(output, BENCH_TABLE_FILE)
        storage.write_text(path, benchmarks.markdown_table(scored["benchmarks"]))
        paths.append(path)
    return paths


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> str:
    storage.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _log_mlflow(cfg: Config, result: dict[str, Any], run_id: str | None, step: int | None,
                run_name: str, parent_run_id: str | None, artifacts: list[str]) -> str:
    if not cfg.tracking.enabled:
        return ""
    new = not run_id
    run_id = tracking.start_run(
        cfg.tracking, cfg.storage.root, run_name, run_id=run_id or None,
        parent_run_id=parent_run_id if new else None,
        tags={"ift.eval.data": result["data"] or ",".join(result.get("benchmarks") or {})}
        | ({"ift.command": "eval"} if new else {}))
    if new:
        tracking.log_params(run_id, {"eval": {**asdict(cfg.eval), "data": result["data"]},
                                     **{k: result[k] for k in ("adapter", "base", "model")
                                        if k in result}})
    values = {METRIC_PREFIX + k: v for k, v in result["metrics"].items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    values.update({BENCH_PREFIX + k: v for k, v in
                   benchmarks.flat_metrics(result.get("benchmarks") or {}).items()})
    tracking.log_metrics(run_id, values, int(step or 0))
    for path in artifacts:
        tracking.log_artifact(run_id, path, "eval")
    tracking.end_run(run_id, "FINISHED")
    return run_id


def summary_text(result: dict[str, Any]) -> str:
    m = result["metrics"]

    def num(v, fmt=".4f"):
        return "-" if v is None else format(v, fmt)

    bench = "  ".join(f"{name} acc {num(r['overall']['acc'], '.3f')} acc_norm "
                      f"{num(r['overall']['acc_norm'], '.3f')} (n={r['overall']['n']})"
                      for name, r in (result.get("benchmarks") or {}).items())
    if not m:
        return bench
    return (f"loss {num(m['loss'])}  ppl {num(m['perplexity'], '.2f')}  exact match "
            f"{num(m['exact_match'], '.3f')} (n={m['exact_match_n']})  mc accuracy "
            f"{num(m['mc_accuracy'], '.3f')} (n={m['mc_n']})  rouge-L {num(m['rouge_l'], '.3f')}"
            f"  answered {num(m['answered'], '.2f')} of {m['samples']} samples"
            + "".join(f"  {k[3:]} {m[k]:.3f}" for k in ("ie_ner_f1", "ie_re_f1",
                                                        "ie_ee_trigger_f1", "ie_ee_argument_f1")
                      if k in m)
            + (f"  IE unparseable {m['ie_unparseable']}" if "ie_unparseable" in m else "")
            + (f"  preference accuracy {num(m['pref_accuracy'], '.3f')} margin "
               f"{num(m['pref_margin'], '.3f')} (n={m['pref_pairs']})"
               + (f"  reward accuracy {num(m['reward_accuracy'], '.3f')}"
                  if "reward_accuracy" in m else "") if "pref_accuracy" in m else "")
            + (f"  {bench}" if bench else ""))


# ---------------------------------------------------------------------------------------
# Resolving what to evaluate
# ---------------------------------------------------------------------------------------


def data_path(cfg: Config, path: str) -> str:
    """A held-out path as configured: each comma-separated part is taken as given when it
    exists there (source files, like data.sources paths), else under storage.root (a
    prepared directory, like data.output)."""
    parts = []
    for part in (bundled_path(p.strip()) for p in path.split(",")):
        if not part:
            continue
        if storage.is_remote(part) or os.path.isabs(part) or os.path.exists(part) \
                or any(c in part for c in "*?["):
            parts.append(os.path.abspath(part) if not storage.is_remote(part)
                         and os.path.exists(part) else part)
        else:
            parts.append(cfg.resolve(part))
    return ",".join(parts)


def read_run(run_dir: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(run.json, the run's config as a dict or None) of a training run directory."""
    info: dict[str, Any] = {}
    path = storage.join(run_dir, RUN_FILE)
    if storage.exists(path):
        try:
            info = json.loads(storage.read_text(path))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    cfg_path = storage.join(run_dir, CONFIG_FILE)
    raw = yaml.safe_load(storage.read_text(cfg_path)) if storage.exists(cfg_path) else None
    return info, raw


def evaluate_run(cfg: Config, run_dir: str, *, data: str | None = None,
                 output: str | None = None, parent_run_id: str | None = None
                 ) -> dict[str, Any]:
    """Evaluate a training run's final model; metrics go to the run's own MLflow run."""
    info, _ = read_run(run_dir)
    model_dir = storage.join(run_dir, FINAL_DIR)
    if not storage.is_complete(model_dir):
        raise ConfigError(f"{run_dir} has no complete {FINAL_DIR}/: the run did not finish")
    prepared = info.get("prepared") or None
    data = data or (data_path(cfg, cfg.eval.data) if cfg.eval.data else None) or prepared
    if not data and not cfg.eval.benchmarks:
        raise ConfigError("no held-out data: pass --data, set eval.data, or evaluate a run "
                          "whose run.json names its prepared dataset")
    return evaluate(cfg, model_dir=model_dir, data=data,
                    output=output or (cfg.resolve(cfg.eval.output) if cfg.eval.output
                                      else run_dir),
                    prepared=prepared, mlflow_run_id=info.get("mlflow_run_id") or None,
                    step=info.get("steps"), run_name=f"eval-{info.get('run_name', 'run')}",
                    parent_run_id=parent_run_id)


def eval_cmd(args) -> int:
    """`ift eval`: see the module docstring."""
    run_dir = getattr(args, "run", None)
    adapter = getattr(args, "adapter", None)
    data = getattr(args, "data", None)
    models = getattr(args, "models", None)
    bench_names, bench_overrides = parse_benchmarks_arg(getattr(args, "benchmarks", None))
    overrides = list(args.overrides or []) + bench_overrides
    info: dict[str, Any] = {}
    if args.config:
        cfg = load_config(args.config, overrides)
    elif run_dir:
        info, raw = read_run(run_dir)
        if raw is None:
            raise ConfigError(f"{run_dir} has no config.yaml; pass -c CONFIG")
        for item in overrides:
            apply_override(raw, item)
        cfg = build_config(raw)
    else:
        cfg = load_config(None, overrides)
    if run_dir and not info:
        info, _ = read_run(run_dir)
    if info.get("tracking_uri") and not cfg.tracking.uri:
        # Log to the store that holds the training run.
        cfg.tracking.uri = info["tracking_uri"]
    if bench_names is not None:
        missing = [n for n in bench_names if n not in cfg.eval.benchmarks]
        if missing:
            raise ConfigError(f"--benchmarks {','.join(missing)}: not in eval.benchmarks (give "
                              "NAME=PATH, or configure eval.benchmarks.NAME.path)")
        cfg.eval.benchmarks = {n: cfg.eval.benchmarks[n] for n in bench_names}

    if models:
        from ift.eval.compare import compare  # cycle: compare imports this module

        data = data or (data_path(cfg, cfg.eval.data) if cfg.eval.data else None) \
            or info.get("prepared") or (_prepared_of(cfg) if not cfg.eval.benchmarks else None)
        out = (cfg.resolve(cfg.eval.output) if cfg.eval.output else None) or \
            storage.join(cfg.resolve("runs/eval"), "compare")
        compare(cfg, models, data=data, output=out,
                prepared=info.get("prepared") or _prepared_of(cfg))
        return 0
    if adapter:
        data = data or (data_path(cfg, cfg.eval.data) if cfg.eval.data else None) \
            or info.get("prepared") or _prepared_of(cfg)
        if not data and not cfg.eval.benchmarks:
            raise ConfigError("no held-out data: pass --data or set eval.data")
        out = (cfg.resolve(cfg.eval.output) if cfg.eval.output else None) or run_dir or \
            storage.join(cfg.resolve("runs/eval"), _slug(adapter))
        evaluate(cfg, model_dir=adapter, data=data, output=out,
                 prepared=info.get("prepared") or _prepared_of(cfg),
                 mlflow_run_id=info.get("mlflow_run_id") or None, step=info.get("steps"),
                 run_name=f"eval-{_slug(adapter)}")
        return 0
    if not run_dir:
        run_dir = storage.join(cfg.resolve(cfg.train.output), cfg.train.run_name)
        if not storage.exists(run_dir):
            raise ConfigError(f"run directory {run_dir} (train.output/train.run_name) does not "
                              "exist; pass --run RUN_DIR or --adapter PATH")
    evaluate_run(cfg, run_dir, data=data)
    return 0


def _prepared_of(cfg: Config) -> str | None:
    path = cfg.train.data or cfg.data.output
    if not path:
        return None
    path = cfg.resolve(path)
    return path if dataset.is_prepared(path) else None


def _slug(path: str) -> str:
    parts = [p for p in path.rstrip("/").split("/") if p]
    tail = parts[-2:] if parts and parts[-1] == FINAL_DIR else parts[-1:]
    return "-".join(tail) or "model"


def parse_benchmarks_arg(value: str | None) -> tuple[list[str] | None, list[str]]:
    """`--benchmarks mmlu=PATH,ceval` -> (names to run, config overrides): NAME=PATH sets
    eval.benchmarks.NAME.path, a bare NAME picks a configured benchmark. None: all."""
    if not value:
        return None, []
    names, overrides = [], []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name, eq, path = part.partition("=")
        name = name.strip()
        if eq:
            if not path.strip():
                raise ConfigError(f"--benchmarks {part!r}: give NAME=PATH")
            path = path.strip()
            path = path if storage.is_remote(path) else os.path.abspath(path)
            overrides.append(f"eval.benchmarks.{name}.path={path}")
        names.append(name)
    return names, overrides
