"""`ift tune`: sweep data mixtures and hyperparameters on Ray Tune.

    ift tune -c CONFIG [key=value ...] [--resume]

1. Prepare the sources when `data.sources` is set (reused when up to date), else use the
   prepared dataset at `train.data` / `data.output`.
2. Expand `tune.space` × `tune.seeds` into trial points (ift.tune.space); every point's
   config and mixture is checked before anything starts.
3. Start (or, with --resume, reopen) one MLflow parent run for the sweep.
4. Run one Tune trial per point (ift.tune.trial): each re-mixes the per-source shards,
   trains with Ray Train (its MLflow run is a child of the parent), and evaluates on the
   held-out set. ASHA (`tune.scheduler: asha`) stops trials whose eval loss lags at a rung.
5. Write trials.json and the report (ift.tune.report), logged to the parent run.

Resources: a trial's own process reserves no CPU (it waits on its Ray Train run), each
Train worker reserves `train.cpus_per_worker`, and at most `tune.max_concurrent_trials` run
at once, so on 2 CPUs one trial with one worker leaves a CPU for Ray Data's re-mix and reads.

Sweep directory <tune.output>/<tune.name>/:

    sweep.json     name, points, prepared data, held-out data, MLflow parent run id
    tune/          Ray Tune's experiment (what --resume restores)
    data/<trial>/  per-trial mixtures           runs/<trial>/  training runs + eval
    trials.json    status and last result of every trial
    report/        report.md, trials.csv, PNG plots
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Any

import ray
from ray import tune as rtune
from ray._raylet import PlacementGroupID
from ray.tune import Callback, FailureConfig, RunConfig, Tuner
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.util.placement_group import PlacementGroup, remove_placement_group

from ift import storage, tracking
from ift.artifacts import RUN_FILE, RUNS_DIR, SWEEP_FILE, TRIAL_FILE, TRIALS_FILE
from ift.config import (
    Config,
    ConfigError,
    DuringTrainingConfig,
    TrainConfig,
    TuneConfig,
    load_config,
)
from ift.data.dataset import PrepareError, read_manifest
from ift.data.pipeline import prepare
from ift.raycluster import init_ray
from ift.tune import report, space
from ift.tune.trial import placement_groups, run_trial

TUNE_DIR = "tune"
# ASHA's horizon in steps. Trials stop on their own when training ends, and
# stop_last_trials=False keeps ASHA from stopping one at the horizon, so this only has to
# exceed any run's length.
ASHA_MAX_T = 1 << 20
TRIAL_MEMORY = 1 << 20


def _log(msg: str) -> None:
    print(f"[ift tune] {msg}", flush=True)


def sweep_dir_of(cfg: Config) -> str:
    """<tune.output>/<tune.name>, absolute (Tune and the trial processes need it so)."""
    return _abs(storage.join(cfg.resolve(cfg.tune.output), cfg.tune.name))


def _abs(path: str) -> str:
    if not path or storage.is_remote(path) or os.path.isabs(path):
        return path
    return os.path.abspath(path)


def absolute_config(cfg: Config, tracking_uri: str) -> dict[str, Any]:
    """The config as a dict whose local paths are absolute (trial and worker processes run
    in other working directories) and whose tracking URI is the sweep's."""
    raw = cfg.to_dict()
    raw["storage"]["root"] = _abs(cfg.storage.root)
    name = cfg.model.name_or_path
    if name and not storage.is_remote(name) and os.path.exists(name):
        raw["model"]["name_or_path"] = os.path.abspath(name)
    tok = cfg.data.tokenizer
    if tok and not storage.is_remote(tok) and os.path.exists(tok):
        raw["data"]["tokenizer"] = os.path.abspath(tok)
    for src in raw["data"]["sources"]:
        src["path"] = _abs(src["path"])
    if cfg.eval.data:
        from ift.eval.run import data_path  # torch and peft: only when eval.data is set

        parts = data_path(cfg, cfg.eval.data).split(",")
        raw["eval"]["data"] = ",".join(_abs(p) for p in parts)
    if tracking_uri:
        raw["tracking"]["uri"] = tracking_uri
    return raw


def _read_json(path: str) -> dict[str, Any]:
    if not storage.exists(path):
        return {}
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def _prepared(cfg: Config, address: str | None) -> tuple[str, dict[str, Any]]:
    if cfg.data.sources:
        manifest = prepare(cfg, address=address)
        return _abs(cfg.resolve(cfg.data.output)), manifest
    path = cfg.train.data or cfg.data.output
    if not path:
        raise ConfigError("no data: set data.sources (prepared by the sweep) or train.data")
    path = _abs(cfg.resolve(path))
    try:
        return path, read_manifest(path)
    except PrepareError as e:
        raise ConfigError(f"train.data={path}: {e}") from e


def _scheduler(tune: TuneConfig, train: TrainConfig, during: DuringTrainingConfig):
    """Tune's trial scheduler for tune.scheduler: FIFO, or ASHA on eval_loss (or on a
    heldout/ metric reported during training) at rungs of train.eval_every steps."""
    if tune.scheduler == "none":
        return FIFOScheduler()
    if tune.grace_period < 1 or tune.reduction_factor < 2:
        raise ConfigError(f"tune.grace_period={tune.grace_period} must be >= 1 and "
                          f"tune.reduction_factor={tune.reduction_factor} >= 2")
    if train.eval_every < 1:
        raise ConfigError("tune.scheduler=asha compares eval losses during training: set "
                          "train.eval_every >= 1 (or tune.scheduler=none)")
    metric, mode = "eval_loss", "min"
    if tune.metric.startswith("heldout/"):
        # A generation metric reported during training (ift.eval.during).
        if during.max_samples <= 0:
            raise ConfigError(f"tune.metric={tune.metric} with tune.scheduler=asha needs the "
                              "metric during training: set eval.during_training.max_samples")
        metric, mode = tune.metric, tune.mode
    # Time is the optimizer step; the grace period counts evaluations.
    return ASHAScheduler(time_attr="step", metric=metric, mode=mode,
                         grace_period=tune.grace_period * train.eval_every,
                         reduction_factor=tune.reduction_factor, max_t=ASHA_MAX_T,
                         stop_last_trials=False)


def trial_name(trial) -> str:
    return trial.config["point"]["name"]


def free_placement_groups(run_dir: str) -> int:
    """Remove the Train placement groups a finished or stopped trial left behind; returns how
    many were still there (a trial that trained to the end has removed its own)."""
    freed = 0
    for hex_id in placement_groups(run_dir):
        pg = PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id)))
        try:
            state = ray.util.placement_group_table(pg).get("state")
        except Exception:  # noqa: BLE001 - an id from an earlier cluster (a resumed sweep)
            continue
        if state in (None, "REMOVED"):
            continue
        remove_placement_group(pg)
        freed += 1
    return freed


def _free_stopped_trials_callback(sweep_dir: str):
    class FreeStoppedTrials(Callback):
        """Frees what a trial's Train run held once Tune is done with the trial (see
        ift.tune.trial.placement_group_recorder): without it, every trial ASHA stops would
        keep its workers' CPUs reserved until the sweep ends, and a small cluster would
        stall."""

        def _free(self, trial) -> None:
            name = trial.config["point"]["name"]
            n = free_placement_groups(storage.join(sweep_dir, RUNS_DIR, name))
            if n:
                _log(f"{name}: freed {n} placement group(s) of its stopped Train run")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._free(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._free(trial)

    return FreeStoppedTrials()


def _check_fits(train: TrainConfig, tune: TuneConfig) -> None:
    """A trial's Train workers must fit the cluster's CPUs (an error); concurrent trials
    that do not all fit wait (a note)."""
    need = train.num_workers * train.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise ConfigError(f"one trial needs train.num_workers × train.cpus_per_worker = {need} "
                          f"CPUs but the cluster has {have}; lower them")
    if need * tune.max_concurrent_trials > have:
        _log(f"note: {tune.max_concurrent_trials} concurrent trials × {need} CPUs exceed "
             f"the cluster's {have}; trials wait for CPUs")


def tune(cfg: Config, *, resume: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; returns {sweep_dir, parent_run_id, trials, report}."""
    t = cfg.tune
    if t.max_concurrent_trials < 1:
        raise ConfigError(f"tune.max_concurrent_trials={t.max_concurrent_trials}: must be >= 1")
    sweep_dir = sweep_dir_of(cfg)
    if storage.is_remote(sweep_dir):
        raise ConfigError(f"tune.output={t.output}: sweeps run in a local (or shared) "
                          "directory; s3:// is not supported for tune.output")
    sweep_file = storage.join(sweep_dir, SWEEP_FILE)
    previous = _read_json(sweep_file)
    if previous and not resume:
        raise ConfigError(f"sweep {sweep_dir} exists: pass --resume to continue it, or set "
                          "tune.name to start another")
    if resume and not previous:
        raise ConfigError(f"--resume: no sweep at {sweep_dir} ({SWEEP_FILE} is missing)")

    points = space.expand(t)
    if previous and previous.get("points") != json.loads(json.dumps(points)):
        raise ConfigError(f"--resume: tune.space/tune.seeds differ from the sweep in "
                          f"{sweep_file}; resume with the same config or start a new tune.name")
    prepared, manifest = _prepared(cfg, address)
    tracking_uri = tracking.resolve_uri(cfg.tracking, cfg.storage.root) \
        if cfg.tracking.enabled else ""
    base = absolute_config(cfg, tracking_uri)
    for p in points:  # every trial's config and mixture, checked before any trial starts
        space.trial_config(base, p, {"train.run_name": p["name"]})
        space.mixture_sources(manifest["sources"], space.mixture_request(p))
    eval_data = base["eval"]["data"] or prepared

    parent = ""
    if cfg.tracking.enabled:
        parent = tracking.start_run(cfg.tracking, cfg.storage.root, t.name,
                                    run_id=previous.get("parent_run_id") or None,
                                    tags={"ift.command": "tune", "ift.sweep_dir": sweep_dir})
        tracking.log_params(parent, {"tune": asdict(t), "model": asdict(cfg.model),
                                     "peft": asdict(cfg.peft), "train": asdict(cfg.train),
                                     "data": {"prepared": prepared, "hash": manifest["hash"]},
                                     "eval": {**asdict(cfg.eval), "data": eval_data}})
    sweep = {
        "name": t.name, "dir": sweep_dir, "prepared": prepared, "eval_data": eval_data,
        "parent_run_id": parent, "tracking_uri": tracking_uri, "eval_after": t.eval_after,
        "metric": t.metric, "mode": t.mode, "scheduler": t.scheduler,
    }
    storage.write_text(sweep_file, json.dumps({
        **sweep, "points": points, "created": previous.get("created") or _now(),
        "config": base}, indent=2, ensure_ascii=False))
    _log(f"sweep {t.name}: {len(points)} trials ({t.search} search, scheduler {t.scheduler}, "
         f"{t.max_concurrent_trials} at a time) -> {sweep_dir}")

    # Train reports every step but evaluates every train.eval_every steps: ASHA acts on the
    # reports that carry eval_loss, and Tune must not reject the others.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Save the experiment state often, so a killed sweep resumes close to where it was.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "10")
    init_ray(address)
    _check_fits(cfg.train, cfg.tune)
    trainable = rtune.with_resources(
        rtune.with_parameters(run_trial, base=base, sweep=sweep),
        # The trial process mostly waits on its Train run, whose workers hold the CPUs: it
        # reserves no CPU, only a nominal MiB of memory (a placement group needs something).
        {"CPU": 0, "memory": TRIAL_MEMORY},
    )
    tune_dir = storage.join(sweep_dir, TUNE_DIR)
    status = "FAILED"
    try:
        if resume and Tuner.can_restore(tune_dir):
            _log(f"resuming {tune_dir}")
            tuner = Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
        else:
            if resume:
                # Killed before Tune saved any state: trials run again, and each one that
                # had finished returns its recorded result at once (ift.tune.trial).
                _log(f"{tune_dir} holds no Tune state to restore; starting the trials again")
            tuner = Tuner(
                trainable,
                param_space={"point": rtune.grid_search(points)},
                tune_config=rtune.TuneConfig(
                    scheduler=_scheduler(cfg.tune, cfg.train, cfg.eval.during_training),
                    num_samples=1,
                    max_concurrent_trials=t.max_concurrent_trials,
                    trial_name_creator=trial_name, trial_dirname_creator=trial_name,
                ),
                run_config=RunConfig(name=TUNE_DIR, storage_path=sweep_dir,
                                     failure_config=FailureConfig(max_failures=0),
                                     callbacks=[_free_stopped_trials_callback(sweep_dir)],
                                     verbose=1),
            )
        results = tuner.fit()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED" and parent:
            tracking.end_run(parent, status)

    trials = collect(results, points, sweep_dir)
    storage.write_text(storage.join(sweep_dir, TRIALS_FILE), json.dumps(trials, indent=2))
    _close_stopped(cfg, trials)
    paths = report.write_report(sweep_dir)
    if parent:
        report.log_report(sweep_dir, paths)
        tracking.end_run(parent, "FINISHED")
    _log(f"{sum(1 for x in trials if x['status'] == 'finished')} finished, "
         f"{sum(1 for x in trials if x['status'] == 'stopped')} stopped early, "
         f"{sum(1 for x in trials if x['status'] == 'error')} failed; report: {paths['markdown']}")
    return {"sweep_dir": sweep_dir, "parent_run_id": parent, "trials": trials, "report": paths}


def collect(results, points: list[dict[str, Any]], sweep_dir: str) -> list[dict[str, Any]]:
    """One entry per point: status (finished, stopped by the scheduler, error, not run)
    and the last result Tune saw."""
    by_name: dict[str, Any] = {}
    for r in results:
        point = (r.config or {}).get("point") or {}
        if point.get("name"):
            by_name[point["name"]] = r
    out = []
    for p in points:
        r = by_name.get(p["name"])
        last = dict(r.metrics or {}) if r is not None else {}
        done = storage.exists(storage.join(sweep_dir, RUNS_DIR, p["name"], TRIAL_FILE))
        if r is None:
            status = "not_run"
        elif r.error is not None:
            status = "error"
        elif last.get("trial_done") or done:
            status = "finished"
        else:
            status = "stopped"  # ended without its final report: the scheduler stopped it
        out.append({
            "name": p["name"], "status": status,
            "error": str(r.error).splitlines()[0][:500] if r is not None and r.error else None,
            "last_step": last.get("step"), "last_eval_loss": last.get("eval_loss"),
            "iterations": last.get("training_iteration"),
        })
    return out


STOPPED_CLOSE_WAIT_S = 60.0
"""How long the sweep waits for a stopped trial's own training run to record its end."""


def _close_stopped(cfg: Config, trials: list[dict[str, Any]]) -> None:
    """Mark the MLflow runs of trials the scheduler stopped (KILLED) or that errored.

    A stopped trial's training run may still be closing itself (as FAILED, since it was
    interrupted) when the Tuner returns: its run.json gets `finished` when it has. The
    mark is made after that (or after STOPPED_CLOSE_WAIT_S, for a process ended before it
    could close anything), so the scheduler's stop is what the run says last."""
    if not cfg.tracking.enabled:
        return
    for t in trials:
        if t["status"] not in ("stopped", "error"):
            continue
        path = storage.join(sweep_dir_of(cfg), RUNS_DIR, t["name"], RUN_FILE)
        info = _read_json(path)
        deadline = time.time() + STOPPED_CLOSE_WAIT_S
        while info.get("mlflow_run_id") and not info.get("finished") and time.time() < deadline:
            time.sleep(0.5)
            info = _read_json(path)
        run_id = info.get("mlflow_run_id")
        if not run_id:
            continue
        tracking.start_run(cfg.tracking, cfg.storage.root, t["name"], run_id=run_id)
        tracking.set_tags(run_id, {"ift.tune.status": t["status"]})
        tracking.end_run(run_id, "KILLED" if t["status"] == "stopped" else "FAILED")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def tune_cmd(args) -> int:
    """`ift tune -c CONFIG [--resume]`."""
    cfg = load_config(args.config, args.overrides)
    tune(cfg, resume=bool(getattr(args, "resume", False)), address=getattr(args, "address", None))
    return 0
