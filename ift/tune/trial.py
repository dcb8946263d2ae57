"""One Tune trial: re-mix the prepared sources, train on Ray Train, evaluate on held-out data.

The trial function is a Ray Train driver running inside a Tune trial (Train V2's pattern):
it calls `ift.train.driver.train`, which builds and fits a TorchTrainer whose workers are
their own Ray actors. Training reports reach Tune through
`ray.tune.integration.ray_train.TuneReportCallback`, so ASHA sees every eval loss while the
run trains; after training the trial evaluates the final model on the sweep's held-out
set, as a Ray task that reserves a training worker's CPUs and GPU (the trial process
itself reserves none), and reports the task metrics once more; trial.json records where
that task ran and what it reserved (eval_task).

Everything a trial writes lives under the sweep directory:

    data/<trial>/     the trial's mixture (manifest + train/ + val/), from the per-source
                      shards of the prepared dataset, never tokenized again
    runs/<trial>/     the training run directory (final/, metrics.jsonl, run.json, ...),
                      eval.json, samples.jsonl and trial.json (point, summary, metrics)

A trial that is started again (a resumed sweep) reuses a complete mixture and resumes its
training run from the last checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ray
import ray.data
import ray.tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ift import storage, tracking
from ift.artifacts import RUN_FILE, RUNS_DIR, TRIAL_FILE
from ift.config import ConfigError, TrackingConfig, TrainConfig
from ift.data import pipeline
from ift.data.dataset import PREFERENCE, PrepareError, read_manifest
from ift.eval.during import last_metrics
from ift.tune import space

# ift.train.driver and ift.eval.run (torch, transformers, peft) are imported by the trial
# and the eval task, which run in Ray workers: at the top they would take the sweep
# driver's import of ift.tune.driver from 0.9 s to 5 s.

DATA_DIR = "data"
# Metrics a trial reports to Tune after its evaluation (eval.json name -> result key).
EVAL_KEYS = {"exact_match": "exact_match", "mc_accuracy": "mc_accuracy", "rouge_l": "rouge_l",
             "answered": "answered", "loss": "heldout_loss", "perplexity": "heldout_ppl",
             "pref_accuracy": "pref_accuracy", "pref_margin": "pref_margin",
             "reward_accuracy": "reward_accuracy"}


def _log(name: str, msg: str) -> None:
    print(f"[ift tune] {name}: {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# Mixture
# ---------------------------------------------------------------------------------------


def ensure_mixture(prepared: str, out: str, point: dict[str, Any]) -> dict[str, Any]:
    """The trial's re-mixed dataset at `out` (reused when complete and the same mixture)."""
    base = read_manifest(prepared)
    request = space.mixture_request(point)
    if base.get("kind") == PREFERENCE:  # pairs are trained on as prepared, not re-mixed
        if request["weights"] or request["include_tags"] or request["exclude_tags"]:
            raise ConfigError(f"tune.space: {prepared} holds preference pairs, which sweeps "
                              "do not re-mix; sweep train.* and peft.* keys only")
        return base
    kept = space.mixture_sources(base["sources"], request)
    if storage.is_complete(out):
        try:
            old = read_manifest(out)
        except PrepareError:
            old = {}
        if (old.get("parent", {}).get("hash") == base["hash"] and old.get("seed") == point["seed"]
                and old.get("mixture") == kept):
            return old
    return pipeline.remix(prepared, out, weights=request["weights"],
                          include_tags=request["include_tags"],
                          exclude_tags=request["exclude_tags"], seed=point["seed"])


# ---------------------------------------------------------------------------------------
# Hooks into training: Tune reports, placement groups, the MLflow child run
# ---------------------------------------------------------------------------------------

PG_FILE = "placement_groups.txt"


def placement_group_recorder(pg_file: str):
    """A Train callback (it runs in the Train controller) that appends the worker group's
    placement group id to `pg_file`.

    A trial that Tune stops ends its process and with it the Train controller, but the
    placement group lives as long as the sweep's Ray job. Ray Train's own cleaner asks the
    state API, which a local cluster started without a dashboard does not serve, so the
    sweep driver frees the recorded group itself (driver.free_placement_groups).
    """
    class PlacementGroupRecorder(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            state = getattr(worker_group, "_worker_group_state", None)
            handle = getattr(state, "placement_group_handle", None)
            pg = getattr(handle, "placement_group", None)
            if pg is not None:
                with open(pg_file, "a", encoding="utf-8") as f:
                    f.write(pg.id.hex() + "\n")

    return PlacementGroupRecorder()


def train_callbacks(run_dir: str) -> list:
    """Ray Train callbacks of a trial's run: worker reports go to Tune (the documented
    TuneReportCallback, so ASHA sees every eval loss) and the placement group is recorded."""
    callbacks = [TuneReportCallback()]
    if not storage.is_remote(run_dir):
        os.makedirs(run_dir, exist_ok=True)
        callbacks.append(placement_group_recorder(os.path.join(run_dir, PG_FILE)))
    return callbacks


def placement_groups(run_dir: str) -> list[str]:
    """Hex ids of the placement groups a trial's Train runs created."""
    path = os.path.join(run_dir, PG_FILE)
    if storage.is_remote(run_dir) or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def child_run(tracking_cfg: TrackingConfig, root: str, run_dir: str, point: dict[str, Any],
              sweep: dict[str, Any], mixture: dict[str, Any]) -> str:
    """The trial's MLflow run: a child of the sweep's parent run, tagged with the trial and
    its point before training starts (so a trial ASHA stops is labelled too), and named in
    the run's run.json, which training continues. A restarted trial keeps its run."""
    parent = sweep.get("parent_run_id") or ""
    if not tracking_cfg.enabled or not parent:
        return ""
    run_file = storage.join(run_dir, RUN_FILE)
    info = storage.read_json(run_file)
    tags = {"ift.tune.sweep": sweep["name"], "ift.tune.trial": point["name"],
            "ift.tune.group": space.group_key(point), "ift.tune.seed": point["seed"]}
    run_id = tracking.start_run(tracking_cfg, root, point["name"],
                                run_id=info.get("mlflow_run_id") or None,
                                parent_run_id=parent, tags=tags)
    if run_id != info.get("mlflow_run_id"):
        storage.makedirs(run_dir)
        storage.write_text(run_file, json.dumps({**info, "mlflow_run_id": run_id,
                                                 "run_name": point["name"]}, indent=2))
    tracking.log_params(run_id, {"tune": {
        "trial": point["name"], "seed": point["seed"],
        "point": {k: json.dumps(v) if isinstance(v, list) else v
                  for k, v in point["params"].items()},
        "mixture": {n: m.get("weight") if m.get("count") is None else f"count={m['count']}"
                    for n, m in mixture.items()},
    }})
    return run_id


# ---------------------------------------------------------------------------------------
# The trial function
# ---------------------------------------------------------------------------------------


def run_trial(config: dict[str, Any], base: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune's function trainable for one point (config["point"]); see the module docstring.

    `base` is the sweep's resolved config (a dict with absolute paths) and `sweep` holds
    {name, dir, prepared, eval_data, parent_run_id, eval_after}.
    """
    from ift.train import driver

    point = config["point"]
    name = point["name"]
    runs = storage.join(sweep["dir"], RUNS_DIR)
    run_dir = storage.join(runs, name)
    data_dir = storage.join(sweep["dir"], DATA_DIR, name)
    done = storage.read_json(storage.join(run_dir, TRIAL_FILE))
    if done.get("status") == "finished" and done.get("point") == point:
        # Started again after it had finished (a sweep restarted without Tune's state):
        # report what it recorded instead of training again.
        _log(name, "finished before; reporting its recorded result")
        ray.tune.report({**_final_result(done["summary"], done.get("eval") or {}),
                         "trial_done": 1})
        return
    _log(name, space.describe(point))

    # One line per trial in the sweep's log, not a progress bar per re-mix stage.
    ray.data.DataContext.get_current().enable_progress_bars = False
    manifest = ensure_mixture(sweep["prepared"], data_dir, point)
    if manifest.get("kind") == PREFERENCE:
        data_dir = sweep["prepared"]
    cfg = space.trial_config(base, point, {"train.run_name": name, "train.output": runs,
                                           "train.data": data_dir})
    child = child_run(cfg.tracking, cfg.storage.root, run_dir, point, sweep,
                      manifest.get("mixture") or {})
    summary = driver.train(cfg, callbacks=train_callbacks(run_dir),
                           parent_run_id=sweep.get("parent_run_id") or None)
    child = summary.get("mlflow_run_id") or child

    summary.update(last_metrics(run_dir))  # heldout/* of the last step, for tune.metric

    eval_metrics: dict[str, Any] = {}
    eval_task: dict[str, Any] = {}
    if sweep.get("eval_after", True):
        evaluated = eval_remote(cfg, run_dir, sweep.get("eval_data") or None)
        eval_metrics, eval_task = evaluated["metrics"], evaluated["task"]
    result = _final_result(summary, eval_metrics)
    trial = {
        "name": name,
        "point": point,
        "status": "finished",
        "run_dir": run_dir,
        "data_dir": data_dir,
        "mixture": manifest.get("mixture"),
        "train_rows": manifest["splits"]["train"]["rows"],
        "mlflow_run_id": child,
        "summary": {k: v for k, v in summary.items() if isinstance(v, (str, int, float))
                    or v is None},
        "eval": eval_metrics,
        "eval_task": eval_task,
        "trial_pid": os.getpid(),
    }
    storage.write_text(storage.join(run_dir, TRIAL_FILE), json.dumps(trial, indent=2,
                                                                      ensure_ascii=False))
    # The last report: task metrics, so trials compare on more than loss.
    ray.tune.report({**result, "trial_done": 1})


def eval_resources(t: TrainConfig) -> dict[str, float]:
    """What a trial's evaluation reserves: one training worker's CPUs (and GPU), from the
    train section."""
    return {"num_cpus": t.cpus_per_worker, "num_gpus": t.gpus_per_worker if t.use_gpu else 0}


def _evaluate_task(cfg, run_dir: str, data: str | None) -> dict[str, Any]:
    """The body of the evaluation task: `evaluate_run`, plus where it ran ("task": the
    task id, node id, process id and the resources Ray assigned it)."""
    from ift.eval.run import evaluate_run

    ctx = ray.get_runtime_context()
    task = {"task_id": ctx.get_task_id(), "node_id": ctx.get_node_id(), "pid": os.getpid(),
            "resources": ctx.get_assigned_resources()}
    return {**evaluate_run(cfg, run_dir, data=data, output=run_dir), "task": task}


def eval_remote(cfg, run_dir: str, data: str | None) -> dict[str, Any]:
    """`evaluate_run` as a Ray task with its own resources (eval_resources), outside the
    trial's placement group: the trial process reserves no CPU or GPU, so generation run
    inside it would run on whatever the scheduler left it (the head's CPUs on a cluster).
    The result carries "task" (see _evaluate_task), which trial.json keeps as eval_task."""
    task = ray.remote(_evaluate_task).options(
        **eval_resources(cfg.train), max_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return ray.get(task.remote(cfg, run_dir, data))


def _final_result(summary: dict[str, Any], eval_metrics: dict[str, Any]) -> dict[str, Any]:
    """A trial's last Tune result: training's step and losses, the held-out metrics."""
    result = {"step": summary.get("steps"), "eval_loss": summary.get("eval_loss"),
              "final_loss": summary.get("final_loss"),
              **{key: eval_metrics.get(src) for src, key in EVAL_KEYS.items()},
              **{k: v for k, v in eval_metrics.items() if k.startswith("ie_")},
              **{k: v for k, v in summary.items() if k.startswith("heldout/")}}
    return {k: v for k, v in result.items() if v is not None}


