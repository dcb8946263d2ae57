"""`ift eval`: loss, perplexity and generation metrics of a trained model on held-out data.

    ift eval -c CONFIG [key=value ...]            the run <train.output>/<train.run_name>
    ift eval --run RUN_DIR [--data DIR]           a run directory (its config.yaml is used)
    ift eval --adapter PATH [--data DIR] -c ...   an adapter or full model directory

The model is the run's `final/` directory: a PEFT adapter (loaded on its base model,
`model.name_or_path` of the run's config) or a full HF model. Held-out data is `--data`,
else `eval.data`, else the run's prepared dataset (its val split); see ift.eval.heldout.

Loss and perplexity cover every held-out row (mean over trained tokens). Generation is
greedy, batched with left padding, on the first `eval.max_samples` rows. Results go to
`<output>/eval.json` (metrics and what was evaluated) and `<output>/samples.jsonl` (one
line per generated sample: prompt, reference, output, gold, predicted, correct, ...);
output is `eval.output`, else the run directory. Metrics are logged as `heldout/*` to the
run's MLflow run (a training run or a Tune trial's child run), else to a new run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any

import yaml

from ift import storage
from ift.artifacts import ADAPTER_CONFIG, FINAL_DIR, RUN_FILE
from ift.config import Config, ConfigError, build_config, load_config
from ift.eval import heldout, metrics
from ift.eval import preference as pref_eval

EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"
IE_REPORT = "ie_scores"  # .md and .csv: per-type IE scores, when the held-out data is IE
METRIC_PREFIX = "heldout/"


def _log(msg: str) -> None:
    print(f"[ift eval] {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


def is_adapter(path: str) -> bool:
    return storage.exists(storage.join(path, ADAPTER_CONFIG))


def load_for_eval(model_dir: str, cfg: Config, device: str = "cpu"):
    """(model in eval mode, tokenizer, description) for an adapter or full-model directory.

    An adapter loads on `cfg.model.name_or_path`, else on the base named in its
    adapter_config.json. The tokenizer is the one saved beside the weights, else the base's.
    """
    from ift.models import load_model, load_tokenizer

    local = storage.local_copy(model_dir)
    if not storage.exists(local):
        raise ConfigError(f"model {model_dir} does not exist")
    if is_adapter(local):
        from peft import PeftModel

        with open(os.path.join(local, ADAPTER_CONFIG), encoding="utf-8") as f:
            adapter_cfg = json.load(f)
        base = cfg.model.name_or_path or adapter_cfg.get("base_model_name_or_path") or ""
        if not base:
            raise ConfigError(f"{model_dir} is an adapter but no base model is known: set "
                              "model.name_or_path")
        model = load_model(replace(cfg.model, name_or_path=base), device=device)
        model = PeftModel.from_pretrained(model, local)
        tok_dir = local if storage.exists(os.path.join(local, "tokenizer_config.json")) else base
        desc = {"adapter": model_dir, "base": base}
    else:
        if not storage.exists(os.path.join(local, "config.json")):
            raise ConfigError(f"{model_dir} holds neither a PEFT adapter (adapter_config.json) "
                              "nor a HF model (config.json)")
        model = load_model(replace(cfg.model, name_or_path=local), device=device)
        tok_dir = local
        desc = {"model": model_dir}
    tokenizer = load_tokenizer(tok_dir, trust_remote_code=cfg.model.trust_remote_code)
    model.eval()
    return model, tokenizer, desc


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _eos_ids(model, tokenizer, stop_ids: list[int] | None = None) -> list[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.update(int(t) for t in stop_ids or [])  # the prompt format's end-of-turn tokens
    return sorted(ids)


def _max_positions(model) -> int | None:
    from ift.train.driver import max_positions

    return max_positions(getattr(model, "config", None))


# ---------------------------------------------------------------------------------------
# Loss and generation
# ---------------------------------------------------------------------------------------


def token_loss(model, rows: list[dict[str, Any]], pad_id: int, batch_size: int,
               device: str = "cpu") -> tuple[float | None, int]:
    """(mean next-token loss over trained tokens, trained tokens) of tokenized rows."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    rows = sorted(rows, key=lambda r: len(r["input_ids"]))
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), heldout.IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[j, :n] = torch.tensor(r["input_ids"])
                labels[j, :n] = torch.tensor(r["labels"])
                mask[j, :n] = 1
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        use_cache=False)
            # Prompt-learning adapters prepend virtual tokens: score the last `width` positions.
            logits = out.logits[:, -width:, :].float()
            shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            total += float(F.cross_entropy(shift_logits, shift_labels,
                                           ignore_index=heldout.IGNORE_INDEX, reduction="sum"))
            count += int((shift_labels != heldout.IGNORE_INDEX).sum())
    return (total / count if count else None), count


def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
             batch_size: int, device: str = "cpu",
             stop_ids: list[int] | None = None) -> list[dict[str, Any]]:
    """Greedy continuations of prompt token lists, batched with left padding, ending at eos
    or at one of `stop_ids` (the prompt format's end-of-turn tokens).

    Prompts are grouped by length (less padding) and results returned in input order, each
    {text, tokens, finish_reason}. A prompt longer than the model's positions minus
    `max_new_tokens` keeps its last tokens.
    """
    import torch

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer, stop_ids)
    limit = _max_positions(model)
    keep = max(1, limit - max_new_tokens) if limit else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = [list(prompts[i][-keep:] if keep else prompts[i]) or [pad_id] for i in idx]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, p in enumerate(batch):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=pad_id, eos_token_id=eos or None,
            )
            new = out[:, width:].tolist()
            for j, i in enumerate(idx):
                toks = new[j]
                finish = "length"
                for k, t in enumerate(toks):
                    if t in eos:
                        toks, finish = toks[:k], "stop"
                        break
                toks = [t for t in toks if t != pad_id]
                results[i] = {"text": tokenizer.decode(toks, skip_special_tokens=True),
                              "tokens": len(toks), "finish_reason": finish}
    return [r for r in results if r is not None]


# ---------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------


def _prompt_format(cfg: Config, model_dir: str, prepared: str | None, tokenizer):
    """The prompt format the model was trained with: recorded beside it, else the prepared
    manifest's template, else the config's (for this tokenizer). A data.template that
    differs from the record overrides it, with a warning."""
    import logging

    from ift.artifacts import read_prompt_format
    from ift.data.templates import choose_prompt_format, prompt_format

    recorded = read_prompt_format(model_dir)
    if recorded is None and prepared and heldout.is_prepared(prepared):
        from ift.data.pipeline import read_manifest

        name = read_manifest(prepared).get("template")
        if name:
            recorded = prompt_format(name, tokenizer)
    return choose_prompt_format(recorded, cfg.data.template, tokenizer, model_dir,
                                logging.getLogger("ift.eval"))


def _check_tokenizer(prepared: str, tokenizer, model_dir: str) -> None:
    """Token ids of a prepared set only mean something to the tokenizer that made them."""
    from ift.data.pipeline import read_manifest
    from ift.models import tokenizer_identity

    theirs = read_manifest(prepared).get("tokenizer") or {}
    ours = tokenizer_identity(tokenizer)
    if theirs.get("sha256") and theirs["sha256"] != ours["sha256"]:
        raise ConfigError(
            f"eval.data={prepared} was tokenized with {theirs.get('name_or_path')!r} (vocab "
            f"{theirs.get('vocab_size')}), not with the tokenizer of {model_dir} ({ours['class']}, "
            f"vocab {ours['vocab_size']}); evaluate on raw files or a dataset prepared with "
            "this model's tokenizer"
        )


def evaluate(cfg: Config, *, model_dir: str, data: str, output: str,
             prepared: str | None = None, mlflow_run_id: str | None = None,
             step: int | None = None, run_name: str = "eval",
             parent_run_id: str | None = None) -> dict[str, Any]:
    """Evaluate `model_dir` on `data`; write eval.json and samples.jsonl under `output`;
    log to MLflow run `mlflow_run_id` (a new run when empty and tracking is on).

    `prepared` is the training data (its manifest names the chat template used to render
    prompts of raw held-out files). Returns eval.json's content.
    """
    started = time.time()
    device = _device()
    model, tokenizer, desc = load_for_eval(model_dir, cfg, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    e = cfg.eval
    fmt = _prompt_format(cfg, model_dir, prepared, tokenizer)

    pairs = pref_eval.held_out_pairs(
        cfg, data, tokenizer, None if heldout.is_prepared(data) else
        fmt.template)
    if pairs is not None:  # preference pairs: loss and generation on the chosen side
        if heldout.is_prepared(data):
            _check_tokenizer(data, tokenizer, model_dir)
        rows = pairs
        items = heldout.items_from_rows(rows[: e.max_samples], tokenizer)
        source = {"kind": "preference"}
    elif heldout.is_prepared(data):
        _check_tokenizer(data, tokenizer, model_dir)
        rows = heldout.prepared_rows(data, "val")
        items = heldout.items_from_rows(rows[: e.max_samples], tokenizer)
        template = None
        source = {"kind": "prepared", "split": "val"}
    else:
        records = heldout.raw_records(data, seed=cfg.data.seed, sources=cfg.data.sources)
        if cfg.data.placeholders:  # filled as `ift data prepare` fills the training rows
            from ift.data.quality import substitute_placeholders

            records = [substitute_placeholders(r, cfg.data.placeholders) for r in records]
        template = fmt.template
        items = heldout.items_from_records(records[: e.max_samples], tokenizer, template)
        limit = _max_positions(model) or cfg.data.max_seq_len
        rows = heldout.loss_rows_from_records(records, tokenizer, template,
                                              min(limit, max(cfg.data.max_seq_len, 8)))
        source = {"kind": "raw", "template": template}
    if not items:
        raise ConfigError(f"eval.data={data}: no held-out rows")
    _log(f"{len(rows)} held-out rows for loss, {len(items)} for generation "
         f"(max {e.max_new_tokens} new tokens) on {device}")

    loss, loss_tokens = token_loss(model, rows, pad_id, max(1, e.batch_size), device)
    outs = generate(model, tokenizer, [it.prompt_ids for it in items],
                    max_new_tokens=e.max_new_tokens, batch_size=max(1, e.batch_size),
                    device=device, stop_ids=fmt.stop_token_ids)
    samples = []
    for it, out in zip(items, outs):
        scored = metrics.score_sample(out["text"], it.reference, it.gold, it.options)
        samples.append({
            "id": it.id, "prompt": it.prompt, "reference": it.reference,
            "output": out["text"], "gold": it.gold, **scored,
            "options": it.options or None, "finish_reason": out["finish_reason"],
            "completion_tokens": out["tokens"],
        })
    agg = metrics.aggregate(samples)
    ie_metrics, ie_paths = _ie_scores(items, samples, output)
    result_metrics = {
        "loss": loss, "perplexity": metrics.perplexity(loss), "loss_rows": len(rows),
        "loss_tokens": loss_tokens, **agg, **ie_metrics,
    }
    if pairs is not None:
        result_metrics.update(pref_eval.pair_metrics(model, pairs, pad_id, max(1, e.batch_size),
                                                     device, cfg.train.beta))
    result = {
        "metrics": result_metrics,
        **desc,
        "data": data,
        "data_kind": source,
        "max_samples": e.max_samples,
        "max_new_tokens": e.max_new_tokens,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 2),
        "mlflow_run_id": "",
    }

    storage.makedirs(output)
    samples_path = storage.join(output, SAMPLES_FILE)
    storage.write_text(samples_path, "".join(json.dumps(s, ensure_ascii=False) + "\n"
                                             for s in samples))
    eval_path = storage.join(output, EVAL_FILE)
    run_id = _log_mlflow(cfg, result, mlflow_run_id, step, run_name, parent_run_id,
                         [samples_path, *ie_paths])
    result["mlflow_run_id"] = run_id
    storage.write_text(eval_path, json.dumps(result, indent=2, ensure_ascii=False))
    if run_id:
        from ift import tracking

        tracking.log_artifact(run_id, eval_path, "eval")
    _log(summary_text(result))
    return result


def _ie_scores(items: list, samples: list[dict[str, Any]], output: str
               ) -> tuple[dict[str, Any], list[str]]:
    """IE metrics of the held-out rows that are IE records (ift.eval.ie): flat metrics, and
    the per-type tables written beside eval.json (IE_REPORT .md and .csv)."""
    from ift.eval import ie

    scored = [(it.ie["task"], s["output"], it.ie.get("gold") or [])
              for it, s in zip(items, samples) if it.ie]
    if not scored:
        return {}, []
    for it, s in zip(items, samples):
        if it.ie:
            s["ie_task"] = it.ie["task"]
            s["ie_pred"] = ie.parse_output(it.ie["task"], s["output"])
    values, rows, _ = ie.score_samples(scored)
    storage.makedirs(output)
    md = storage.join(output, IE_REPORT + ".md")
    csv_path = storage.join(output, IE_REPORT + ".csv")
    storage.write_text(md, "# IE scores per type\n\n" + ie.table_markdown(rows))
    storage.write_text(csv_path, ie.table_csv(rows))
    return values, [md, csv_path]


def _log_mlflow(cfg: Config, result: dict[str, Any], run_id: str | None, step: int | None,
                run_name: str, parent_run_id: str | None, artifacts: list[str]) -> str:
    from ift import tracking

    if not cfg.tracking.enabled:
        return ""
    new = not run_id
    run_id = tracking.start_run(
        cfg, run_name, run_id=run_id or None, parent_run_id=parent_run_id if new else None,
        tags={"ift.eval.data": result["data"]} | ({"ift.command": "eval"} if new else {}))
    if new:
        tracking.log_params(run_id, {"eval": {**cfg.eval.__dict__, "data": result["data"]},
                                     **{k: result[k] for k in ("adapter", "base", "model")
                                        if k in result}})
    values = {METRIC_PREFIX + k: v for k, v in result["metrics"].items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracking.log_metrics(run_id, values, int(step or 0))
    for path in artifacts:
        tracking.log_artifact(run_id, path, "eval")
    tracking.end_run(run_id, "FINISHED")
    return run_id


def summary_text(result: dict[str, Any]) -> str:
    m = result["metrics"]

    def num(v, fmt=".4f"):
        return "-" if v is None else format(v, fmt)

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
                  if "reward_accuracy" in m else "") if "pref_accuracy" in m else ""))


# ---------------------------------------------------------------------------------------
# Resolving what to evaluate
# ---------------------------------------------------------------------------------------


def data_path(cfg: Config, path: str) -> str:
    """A held-out path as configured: each comma-separated part is taken as given when it
    exists there (source files, like data.sources paths; `@sample/`, `@quickstart/` name
    bundled files), else under storage.root (a prepared directory, like data.output)."""
    parts = []
    from ift.artifacts import bundled_path

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
    cfg_path = storage.join(run_dir, "config.yaml")
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
    if not data:
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
    overrides = list(args.overrides or [])
    info: dict[str, Any] = {}
    if args.config:
        cfg = load_config(args.config, overrides)
    elif run_dir:
        info, raw = read_run(run_dir)
        if raw is None:
            raise ConfigError(f"{run_dir} has no config.yaml; pass -c CONFIG")
        from ift.config import apply_override

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

    if adapter:
        data = data or (data_path(cfg, cfg.eval.data) if cfg.eval.data else None) \
            or info.get("prepared") or _prepared_of(cfg)
        if not data:
            raise ConfigError("no held-out data: pass --data or set eval.data")
        out = (cfg.resolve(cfg.eval.output) if cfg.eval.output else None) or run_dir or \
            storage.join(cfg.resolve("runs/eval"), _slug(adapter))
        evaluate(cfg, model_dir=adapter, data=data, output=out,
                 prepared=info.get("prepared") or _prepared_of(cfg),
                 mlflow_run_id=info.get("mlflow_run_id") or None, step=info.get("steps"),
                 run_name=f"eval-{_slug(adapter)}")
        return 0
    if not run_dir:
        from ift.train.driver import run_dir_of

        run_dir = run_dir_of(cfg)
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
    return path if heldout.is_prepared(path) else None


def _slug(path: str) -> str:
    parts = [p for p in path.rstrip("/").split("/") if p]
    tail = parts[-2:] if parts and parts[-1] == FINAL_DIR else parts[-1:]
    return "-".join(tail) or "model"
