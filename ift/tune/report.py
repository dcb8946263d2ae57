"""`ift tune report DIR`: the sweep's ablation report.

Reads only the sweep directory (sweep.json, trials.json, and each trial's run.json,
metrics.jsonl, eval.json, trial.json), so it works on a finished sweep, an interrupted one,
or a copy of either, and writes under DIR/report/:

    trials.csv          one row per trial: status, seed, every axis value (mixture and
                        hyperparameters), steps, train and eval loss, held-out metrics, best
    report.md           the same table, then per configuration (points that differ only by
                        seed) the mean ± standard deviation and range of every metric
    <metric>_by_<axis>.png   each metric against each axis that varies: one dot per seed,
                        the mean with a ±1 std bar
    loss_curves.png     train loss (lines) and eval loss (dots) against step, per trial

The best trial is the one with the best `tune.metric` (`--metric/--mode` override it)
among trials that report it; it is marked in both tables. With a parent MLflow run in
sweep.json, the report is logged to it (artifacts under report/, best metric values).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
from typing import Any

from ift import storage, tracking
from ift.artifacts import RUN_FILE, RUNS_DIR, SWEEP_FILE, TRIAL_FILE, TRIALS_FILE
from ift.config import StorageConfig, TrackingConfig
from ift.eval.during import latest as latest_heldout
from ift.eval.metrics import mean_spread
from ift.tune import space

REPORT_DIR = "report"
# Held-out IE F1 (ift.eval.ie), when the held-out data is IE; any ie_* metric of eval.json
# can be tune.metric.
IE_METRICS = ("ie_ner_f1", "ie_re_f1", "ie_ee_trigger_f1", "ie_ee_argument_f1")
# Columns of metrics, in table order, with how they read.
METRICS = ("exact_match", "mc_accuracy", "rouge_l", "answered", "heldout_loss", "heldout_ppl",
           "eval_loss", "final_loss", *IE_METRICS, "pref_accuracy", "pref_margin",
           "reward_accuracy")
LOWER_IS_BETTER = {"heldout_loss", "heldout_ppl", "eval_loss", "final_loss"}
PLOT_METRICS = ("exact_match", "mc_accuracy", "rouge_l", "heldout_loss", "eval_loss")


def _history(run_dir: str) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, the latest line per step (a resumed run repeats steps)."""
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in storage.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed process
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[k] for k in sorted(by_step)]


def trial_rows(sweep_dir: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(sweep.json, one row per trial point with everything the tables show)."""

    sweep = storage.read_json(storage.join(sweep_dir, SWEEP_FILE))
    if not sweep.get("points"):
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory ({SWEEP_FILE} with "
                                "points is missing)")
    statuses = {t["name"]: t for t in (json.loads(storage.read_text(
        storage.join(sweep_dir, TRIALS_FILE))) if storage.exists(
        storage.join(sweep_dir, TRIALS_FILE)) else [])}
    rows = []
    for p in sweep["points"]:
        run_dir = storage.join(sweep_dir, RUNS_DIR, p["name"])
        trial = storage.read_json(storage.join(run_dir, TRIAL_FILE))
        run = storage.read_json(storage.join(run_dir, RUN_FILE))
        ev = (storage.read_json(storage.join(run_dir, "eval.json")).get("metrics")
              or trial.get("eval") or {})
        history = _history(run_dir)
        evals = [h for h in history if h.get("eval_loss") is not None]
        status = statuses.get(p["name"], {}).get("status") or (
            "finished" if trial else "incomplete" if run else "not_run")
        rows.append({
            "trial": p["name"],
            "status": status,
            "seed": p["seed"],
            "group": space.group_key(p),
            "params": p["params"],
            "steps": history[-1]["step"] if history else None,
            "train_rows": trial.get("train_rows"),
            "final_loss": history[-1].get("loss") if history else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "exact_match": ev.get("exact_match"),
            "mc_accuracy": ev.get("mc_accuracy"),
            "rouge_l": ev.get("rouge_l"),
            "answered": ev.get("answered"),
            "heldout_loss": ev.get("loss"),
            "heldout_ppl": ev.get("perplexity"),
            **{k: v for k, v in ev.items() if k.startswith("ie_")},
            "pref_accuracy": ev.get("pref_accuracy"),
            "pref_margin": ev.get("pref_margin"),
            "reward_accuracy": ev.get("reward_accuracy"),
            "mlflow_run_id": run.get("mlflow_run_id") or trial.get("mlflow_run_id") or "",
            "history": history,
            # heldout/* during training, so tune.metric heldout/exact_match picks the best
            **latest_heldout(history),
        })
    return sweep, rows


def best_trial(rows: list[dict[str, Any]], metric: str, mode: str) -> str | None:
    """Name of the trial with the best value of `metric` (None when no trial has it)."""
    scored = [r for r in rows if _num(r.get(metric)) is not None]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: float(r[metric]))["trial"]


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return space._short(v) if isinstance(v, list) else json.dumps(v)
    return str(v)


def _axes(sweep: dict[str, Any]) -> list[str]:
    axes: list[str] = []
    for p in sweep["points"]:
        for k in p["params"]:
            if k not in axes:
                axes.append(k)
    return axes


def table(rows: list[dict[str, Any]], axes: list[str], best: str | None) -> list[list[str]]:
    """Header plus one row per trial, as strings."""
    head = ["trial", "status", "seed", *axes, "steps", "train_rows", *METRICS, "best",
            "mlflow_run_id"]
    out = [head]
    for r in rows:
        out.append([r["trial"], r["status"], str(r["seed"]),
                    *[_fmt(r["params"].get(a)) for a in axes],
                    _fmt(r["steps"]), _fmt(r["train_rows"]),
                    *[_fmt(r.get(m)) for m in METRICS],
                    "best" if r["trial"] == best else "", r["mlflow_run_id"]])
    return out


def groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration (same params, any seed): mean ± spread of every metric."""
    order: list[str] = []
    members: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["group"] not in members:
            order.append(r["group"])
            members[r["group"]] = []
        members[r["group"]].append(r)
    out = []
    for g in order:
        rs = members[g]
        out.append({"group": g, "trials": [r["trial"] for r in rs],
                    "seeds": [r["seed"] for r in rs],
                    "metrics": {m: mean_spread([_num(r.get(m)) for r in rs
                                                if _num(r.get(m)) is not None])
                                for m in METRICS}})
    return out


def _pm(s: dict[str, Any]) -> str:
    if not s["n"]:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.4g}"
    return f"{s['mean']:.4g} ± {s['std']:.2g} [{s['min']:.4g}, {s['max']:.4g}]"


def markdown(sweep: dict[str, Any], rows: list[dict[str, Any]], axes: list[str],
             best: str | None, metric: str, mode: str, plots: list[str]) -> str:
    lines = [f"# Sweep `{sweep.get('name', '')}`", ""]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines.append(f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                 + f". Scheduler: {sweep.get('scheduler', '?')}. Held-out data: "
                 f"`{sweep.get('eval_data', '')}`. Best by `{metric}` ({mode}): "
                 f"**{best or 'none'}**.")
    lines += ["", "## Trials", ""]
    t = table(rows, axes, best)
    keep = [i for i, h in enumerate(t[0]) if h != "mlflow_run_id"
            and any(row[i] for row in t[1:])]
    lines.append("| " + " | ".join(t[0][i] for i in keep) + " |")
    lines.append("|" + "---|" * len(keep))
    for row in t[1:]:
        cells = [f"**{row[i]}**" if row[-2] == "best" and row[i] else row[i] for i in keep]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## By configuration (mean ± std [min, max] over seeds)", ""]
    gs = groups(rows)
    shown = [m for m in METRICS if any(g["metrics"][m]["n"] for g in gs)]
    lines.append("| configuration | seeds | " + " | ".join(shown) + " |")
    lines.append("|" + "---|" * (len(shown) + 2))
    for g in gs:
        lines.append(f"| {g['group']} | {', '.join(map(str, g['seeds']))} | "
                     + " | ".join(_pm(g["metrics"][m]) for m in shown) + " |")
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------


def _figure(width: float = 6, height: float = 4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def metric_plot(rows: list[dict[str, Any]], metric: str, axis: str | None, path: str) -> str:
    """One metric against one axis: a dot per trial (seed), the mean with a ±1 std bar."""
    cats: list[str] = []
    values: dict[str, list[float]] = {}
    for r in rows:
        v = _num(r.get(metric))
        if v is None:
            continue
        c = _fmt(r["params"].get(axis)) if axis else "all"
        c = c or "(unset)"
        if c not in values:
            cats.append(c)
            values[c] = []
        values[c].append(v)
    fig = _figure()
    ax = fig.add_subplot()
    for i, c in enumerate(cats):
        vs = values[c]
        n = len(vs)
        xs = [i + (k - (n - 1) / 2) * 0.06 for k in range(n)]
        ax.scatter(xs, vs, s=18, alpha=0.7, color="tab:blue")
        s = mean_spread(vs)
        ax.errorbar([i + 0.25], [s["mean"]], yerr=[s["std"]], fmt="o", color="tab:red",
                    capsize=4, markersize=6)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=20 if max((len(c) for c in cats), default=0) > 10 else 0)
    ax.set_xlabel(axis or "all trials")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by {axis or 'trial'} (dots: seeds; red: mean ± std)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def loss_curves_plot(rows: list[dict[str, Any]], path: str) -> str:
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    import matplotlib

    colors = matplotlib.colormaps["tab10"]
    drawn = False
    for i, r in enumerate(rows):
        h = r["history"]
        if not h:
            continue
        color = colors(i % 10)
        tx = [x["step"] for x in h if x.get("loss") is not None]
        ty = [x["loss"] for x in h if x.get("loss") is not None]
        ax.plot(tx, ty, color=color, linewidth=1.0, alpha=0.8,
                label=f"{r['trial']} ({r['status']})")
        ex = [x["step"] for x in h if x.get("eval_loss") is not None]
        ey = [x["eval_loss"] for x in h if x.get("eval_loss") is not None]
        if ex:
            ax.plot(ex, ey, "o--", color=color, markersize=3, linewidth=0.8)
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no trial has recorded a step yet", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (lines: train, dots: eval)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# ---------------------------------------------------------------------------------------
# Writing and logging
# ---------------------------------------------------------------------------------------


def write_report(sweep_dir: str, *, metric: str | None = None, mode: str | None = None
                 ) -> dict[str, Any]:
    """Write DIR/report/ (see the module docstring); returns the paths and the best trial."""
    sweep, rows = trial_rows(sweep_dir)
    metric = metric or sweep.get("metric") or "eval_loss"
    mode = mode or sweep.get("mode") or ("min" if metric in LOWER_IS_BETTER else "max")
    best = best_trial(rows, metric, mode)
    axes = _axes(sweep)
    varying = space.varying_axes(sweep["points"])
    out = storage.join(sweep_dir, REPORT_DIR)
    storage.makedirs(out)
    plots: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ift-report-") as tmp:
        for m in PLOT_METRICS:
            if not any(_num(r.get(m)) is not None for r in rows):
                continue
            for axis in varying or [None]:
                name = f"{m}_by_{_safe(axis or 'trial')}.png"
                metric_plot(rows, m, axis, os.path.join(tmp, name))
                plots.append(name)
        loss_curves_plot(rows, os.path.join(tmp, "loss_curves.png"))
        plots.append("loss_curves.png")
        for name in plots:
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(storage.join(out, name), f.read())

    buf = io.StringIO()
    writer = csv.writer(buf)
    for row in table(rows, axes, best):
        writer.writerow(row)
    csv_path = storage.join(out, "trials.csv")
    storage.write_text(csv_path, buf.getvalue())
    md_path = storage.join(out, "report.md")
    storage.write_text(md_path, markdown(sweep, rows, axes, best, metric, mode, plots))
    summary = {"best": best, "metric": metric, "mode": mode,
               "groups": [{k: v for k, v in g.items()} for g in groups(rows)]}
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2))
    return {"dir": out, "markdown": md_path, "csv": csv_path,
            "plots": [storage.join(out, p) for p in plots], "best": best, "metric": metric,
            "mode": mode, "summary": summary}


def log_report(sweep_dir: str, paths: dict[str, Any]) -> str:
    """Log the report directory (and the best trial's metric) to the sweep's parent run."""
    sweep = storage.read_json(storage.join(sweep_dir, SWEEP_FILE))
    parent = sweep.get("parent_run_id") or ""
    if not parent:
        return ""
    root = ((sweep.get("config") or {}).get("storage") or {}).get("root") or StorageConfig().root
    tracking.start_run(TrackingConfig(uri=sweep.get("tracking_uri") or ""), root,
                       sweep.get("name", "sweep"), run_id=parent)
    tracking.log_artifact(parent, paths["dir"], REPORT_DIR)
    _, rows = trial_rows(sweep_dir)
    best = next((r for r in rows if r["trial"] == paths.get("best")), None)
    values: dict[str, float] = {}
    if best is not None:
        values = {f"best/{m}": float(best[m]) for m in METRICS if _num(best.get(m)) is not None}
    for g_i, g in enumerate(paths["summary"]["groups"]):
        for m in ("exact_match", "rouge_l", "eval_loss"):
            s = g["metrics"][m]
            if s["n"]:
                values[f"group{g_i}/{m}_mean"] = s["mean"]
    if values:
        tracking.log_metrics(parent, values, 0)
    tracking.set_tags(parent, {"ift.tune.best_trial": paths.get("best") or "",
                               **{f"ift.tune.group{i}": g["group"]
                                  for i, g in enumerate(paths["summary"]["groups"])}})
    return parent


def report_cmd(args) -> int:
    """`ift tune report DIR [--metric M --mode min|max] [--no-mlflow]`."""
    try:
        paths = write_report(args.dir, metric=args.metric, mode=args.mode)
    except FileNotFoundError as e:
        print(f"ift tune report: {e}", file=sys.stderr, flush=True)
        return 2
    if not getattr(args, "no_mlflow", False):
        parent = log_report(args.dir, paths)
        # A sweep still running keeps its parent run open; a finished one is closed again.
        if parent and storage.exists(storage.join(args.dir, TRIALS_FILE)):
            tracking.end_run(parent, "FINISHED")
    print(storage.read_text(paths["markdown"]))
    print(f"wrote {paths['markdown']}, {paths['csv']} and {len(paths['plots'])} plots", flush=True)
    return 0
