"""`ift eval --models base,ADAPTER_A,ADAPTER_B,MERGED`: several models side by side.

Every model is scored on the same held-out data and benchmarks in one process, with the
metrics of `ift eval` (ift.eval.run.score_model). Each entry of `--models` is:

* `base`: the base model, `model.name_or_path`;
* a LoRA adapter directory (or a training run directory, whose `final/` is used);
* any other model directory: a full or merged model, or another kind of adapter.

LoRA adapters on the configured base share one copy of its weights: they are loaded into
one PeftModel as named adapters, each scored with its adapter active, and `base` with the
adapters disabled. Other models load one at a time. Held-out rows and benchmark prompts
are read and tokenized once per tokenizer.

Written under the output directory:

    compare.md, compare.csv   one row per model, one column per metric
    compare.png               a bar chart: a panel per metric, a bar per model
    compare.json              the same table with each model's path
    disagreements.jsonl       held-out samples and benchmark questions the models answer
                              differently (each model's output and verdict)
    <label>/                  each model's eval.json, samples.jsonl, benchmark files
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, replace
from typing import Any

from peft import PeftModel

from ift import storage, tracking
from ift.artifacts import FinalModel
from ift.config import Config, ConfigError, ModelConfig
from ift.eval import run
from ift.models import load_model, load_tokenizer, tokenizer_identity

TABLE_MD = "compare.md"
TABLE_CSV = "compare.csv"
CHART = "compare.png"
TABLE_JSON = "compare.json"
DISAGREEMENTS = "disagreements.jsonl"
# Held-out metrics in the table, in order (benchmark columns follow).
HELDOUT_COLUMNS = ("loss", "perplexity", "exact_match", "mc_accuracy", "rouge_l", "answered",
                   "pref_accuracy", "pref_margin", "reward_accuracy", "reward_margin")


def _log(msg: str) -> None:
    print(f"[ift eval] {msg}", flush=True)


@dataclass
class ModelSpec:
    """One entry of --models."""

    label: str
    """Its name in the table (and its output sub-folder)."""
    kind: str
    """base, lora (an adapter sharing the base) or alone (loaded by itself)."""
    path: str
    """The model or adapter directory as given (base: model.name_or_path)."""


def parse_models(value: str, model_cfg: ModelConfig) -> list[ModelSpec]:
    """--models entries as specs; an entry that names nothing loadable is an error. `base`
    is model_cfg.name_or_path."""
    specs: list[ModelSpec] = []
    seen: dict[str, int] = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        if part == "base":
            if not model_cfg.name_or_path:
                raise ConfigError("--models base: set model.name_or_path")
            spec = ModelSpec("base", "base", model_cfg.name_or_path)
        else:
            path = part
            final = storage.join(path, run.FINAL_DIR)
            if not FinalModel(path).is_adapter() and storage.exists(final):
                path = final  # a training run directory
            if not storage.exists(path):
                raise ConfigError(f"--models {part}: does not exist")
            spec = ModelSpec(run._slug(path), _kind(path, model_cfg, part), path)
        n = seen.get(spec.label, 0)
        seen[spec.label] = n + 1
        if n:
            spec.label = f"{spec.label}-{n + 1}"
        specs.append(spec)
    if not specs:
        raise ConfigError("--models: name at least one model (base, adapter or model dirs)")
    return specs


def _kind(path: str, model_cfg: ModelConfig, given: str) -> str:
    """lora: a LoRA adapter on model_cfg.name_or_path (or naming no base), scored on the
    shared base; alone: any other adapter or model, loaded by itself."""
    acfg = run.adapter_settings(path, f"--models {given}")
    if acfg is None:
        return "alone"
    base = acfg.get("base_model_name_or_path") or ""
    same_base = not model_cfg.name_or_path or not base or \
        os.path.abspath(base) == os.path.abspath(model_cfg.name_or_path)
    if str(acfg.get("peft_type", "")).upper() == "LORA" and model_cfg.name_or_path \
            and same_base:
        return "lora"
    return "alone"


# ---------------------------------------------------------------------------------------
# Scoring every model
# ---------------------------------------------------------------------------------------


class _Inputs:
    """Held-out set and encoded benchmarks per tokenizer (read and tokenized once)."""

    def __init__(self, cfg: Config, data: str | None, prepared: str | None):
        self.cfg, self.data, self.prepared = cfg, data, prepared
        self.cache: dict[str, tuple[Any, dict]] = {}

    def get(self, tokenizer, model, model_dir: str):
        key = tokenizer_identity(tokenizer)["sha256"]
        if key not in self.cache:
            held = run.heldout_set(self.cfg.data, self.cfg.eval, self.data, tokenizer,
                                   prepared=self.prepared, model_dir=model_dir,
                                   limit=run.context_limit(model)) if self.data else None
            self.cache[key] = (held, run.encode_benchmarks(self.cfg.data, self.cfg.eval,
                                                           tokenizer))
        return self.cache[key]


def score_all(cfg: Config, specs: list[ModelSpec], *, data: str | None,
              prepared: str | None, device: str = "cpu") -> dict[str, dict[str, Any]]:
    """label -> score_model's result for every model (in --models order)."""
    inputs = _Inputs(cfg, data, prepared)
    results: dict[str, dict[str, Any]] = {}
    shared = [s for s in specs if s.kind in ("base", "lora")]
    if shared:
        base_path = storage.local_copy(cfg.model.name_or_path)
        model = load_model(replace(cfg.model, name_or_path=base_path), device=device)
        tokenizer = load_tokenizer(base_path, trust_remote_code=cfg.model.trust_remote_code)
        adapters = [s for s in shared if s.kind == "lora"]
        if adapters:
            model = PeftModel.from_pretrained(model, storage.local_copy(adapters[0].path),
                                              adapter_name="m0", is_trainable=False)
            for i, s in enumerate(adapters[1:], start=1):
                model.load_adapter(storage.local_copy(s.path), adapter_name=f"m{i}",
                                   is_trainable=False)
        model.eval()
        names = {s.label: f"m{i}" for i, s in enumerate(adapters)}
        held, benches = inputs.get(tokenizer, model, base_path)
        for s in shared:
            t0 = time.time()
            if s.kind == "base" and adapters:
                with model.disable_adapter():
                    results[s.label] = run.score_model(cfg.eval, cfg.train, model, tokenizer,
                                                       held, benches, device)
            else:
                if adapters:
                    model.set_adapter(names[s.label], inference_mode=True)
                results[s.label] = run.score_model(cfg.eval, cfg.train, model, tokenizer,
                                                   held, benches, device)
            _log(f"{s.label}: scored in {time.time() - t0:.1f}s")
        del model
    for s in specs:
        if s.kind != "alone":
            continue
        t0 = time.time()
        model, tokenizer, _desc = run.load_for_eval(s.path, cfg.model, device)
        held, benches = inputs.get(tokenizer, model, s.path)
        results[s.label] = run.score_model(cfg.eval, cfg.train, model, tokenizer, held,
                                           benches, device)
        _log(f"{s.label}: scored in {time.time() - t0:.1f}s")
        del model
    return {s.label: results[s.label] for s in specs}


# ---------------------------------------------------------------------------------------
# The table, the chart, the disagreements
# ---------------------------------------------------------------------------------------


def table_rows(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, one row per model): held-out metrics, then <benchmark>/acc and acc_norm.
    A column no model has a value for is left out."""
    cols = [c for c in HELDOUT_COLUMNS
            if any(r["metrics"].get(c) is not None for r in results.values())]
    bench_cols: list[str] = []
    for r in results.values():
        for name in r["benchmarks"]:
            for k in ("acc", "acc_norm"):
                if f"{name}/{k}" not in bench_cols:
                    bench_cols.append(f"{name}/{k}")
    rows = []
    for label, r in results.items():
        row: dict[str, Any] = {"model": label}
        for c in cols:
            row[c] = r["metrics"].get(c)
        for c in bench_cols:
            name, k = c.rsplit("/", 1)
            row[c] = (r["benchmarks"].get(name) or {}).get("overall", {}).get(k)
        rows.append(row)
    return cols + bench_cols, rows


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| model | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", *columns])
    for row in rows:
        w.writerow([row["model"], *("" if row[c] is None else row[c] for c in columns)])
    return buf.getvalue()


def bar_chart(columns: list[str], rows: list[dict[str, Any]], path: str) -> None:
    """A panel per metric, a bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(columns))
    per_row = min(n, 4)
    nrows = -(-n // per_row)
    fig, axes = plt.subplots(nrows, per_row, figsize=(3.2 * per_row, 2.8 * nrows),
                             squeeze=False)
    labels = [r["model"] for r in rows]
    colors = [f"C{i % 10}" for i in range(len(rows))]
    for i, col in enumerate(columns):
        ax = axes[i // per_row][i % per_row]
        values = [r[col] if r[col] is not None else 0.0 for r in rows]
        ax.bar(range(len(rows)), values, color=colors)
        ax.set_title(col, fontsize=9)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    for j in range(len(columns), nrows * per_row):
        axes[j // per_row][j % per_row].axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def _verdict(sample: dict[str, Any]) -> Any:
    if sample.get("gold"):
        return (sample.get("correct"), sample.get("predicted"))
    return sample.get("output")


def disagreements(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Held-out samples whose verdict (correct and predicted answer; the output itself
    without a gold answer) differs between models, and benchmark questions whose predicted
    letter differs."""
    out: list[dict[str, Any]] = []
    labels = list(results)
    first = results[labels[0]]
    by_model = {m: {s["id"]: s for s in results[m]["samples"]} for m in labels}
    for s in first["samples"]:
        per = {m: by_model[m].get(s["id"]) for m in labels}
        if len({json.dumps(_verdict(p), sort_keys=True) for p in per.values() if p}) <= 1:
            continue
        out.append({"kind": "heldout", "id": s["id"], "prompt": s["prompt"],
                    "reference": s["reference"], "gold": s["gold"],
                    "models": {m: {"output": p["output"], "predicted": p["predicted"],
                                   "correct": p["correct"]} for m, p in per.items() if p}})
    bench = {m: {(b["benchmark"], b["id"]): b for b in results[m]["benchmark_samples"]}
             for m in labels}
    for key, b in bench[labels[0]].items():
        per = {m: bench[m].get(key) for m in labels}
        if len({p["predicted"] for p in per.values() if p}) <= 1:
            continue
        out.append({"kind": "benchmark", "benchmark": b["benchmark"], "id": b["id"],
                    "subject": b["subject"], "answer": b["answer"],
                    "models": {m: {"predicted": p["predicted"], "correct": p["correct"]}
                               for m, p in per.items() if p}})
    return out


def compare(cfg: Config, models: str, *, data: str | None, output: str,
            prepared: str | None = None) -> dict[str, Any]:
    """Score every model of `models` (comma-separated) and write the side-by-side files;
    returns compare.json's content."""
    specs = parse_models(models, cfg.model)
    if not data and not cfg.eval.benchmarks:
        raise ConfigError("nothing to evaluate: give held-out data (--data, eval.data) or "
                          "eval.benchmarks (--benchmarks NAME=PATH)")
    started = time.time()
    _log(f"comparing {len(specs)} models: " + ", ".join(f"{s.label} ({s.kind})" for s in specs))
    results = score_all(cfg, specs, data=data, prepared=prepared, device=run._device())
    storage.makedirs(output)
    for s in specs:
        sub = storage.join(output, s.label)
        r = results[s.label]
        run.write_outputs(sub, r)
        storage.write_text(storage.join(sub, run.EVAL_FILE), json.dumps(
            {"metrics": r["metrics"], "benchmarks": r["benchmarks"], "model": s.path,
             "kind": s.kind, "data": data or ""}, indent=2, ensure_ascii=False))
    columns, rows = table_rows(results)
    storage.write_text(storage.join(output, TABLE_MD), markdown(columns, rows))
    storage.write_text(storage.join(output, TABLE_CSV), csv_text(columns, rows))
    bar_chart(columns, rows, storage.join(output, CHART))
    dis = disagreements(results)
    storage.write_text(storage.join(output, DISAGREEMENTS),
                       "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dis))
    summary = {"models": [{"label": s.label, "kind": s.kind, "path": s.path} for s in specs],
               "columns": columns, "rows": rows, "data": data or "",
               "benchmarks": list(cfg.eval.benchmarks), "disagreements": len(dis),
               "seconds": round(time.time() - started, 2), "mlflow_run_id": ""}
    summary["mlflow_run_id"] = _track(cfg, summary, output)
    storage.write_text(storage.join(output, TABLE_JSON),
                       json.dumps(summary, indent=2, ensure_ascii=False))
    _log(f"{len(specs)} models, {len(dis)} disagreements -> {output}\n"
         + markdown(columns, rows))
    return summary


def _track(cfg: Config, summary: dict[str, Any], output: str) -> str:
    """One MLflow run: <model>/<metric> for every cell, the files as artifacts."""
    if not cfg.tracking.enabled:
        return ""
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "eval-compare",
                                tags={"ift.command": "eval-compare"})
    tracking.log_params(run_id, {"models": ",".join(m["label"] for m in summary["models"]),
                                 "data": summary["data"]})
    values = {f"{row['model']}/{c}": row[c] for row in summary["rows"]
              for c in summary["columns"] if isinstance(row[c], (int, float))}
    tracking.log_metrics(run_id, values, 0)
    for name in (TABLE_MD, TABLE_CSV, CHART, DISAGREEMENTS):
        tracking.log_artifact(run_id, storage.join(output, name), "compare")
    tracking.end_run(run_id, "FINISHED")
    return run_id
