"""MLflow tracking: an embedded sqlite store by default, a tracking server when one is given.

Callers are rank 0 only (the train driver or the rank-0 worker, Tune trials, eval). Every
call goes through an `MlflowClient` bound to an explicit run id, never through
`mlflow.start_run()`'s process-global active run, so it is safe in Ray workers and threads.

Where runs go (`resolve_uri`):
  1. `tracking.uri` from the config (e.g. http://mlflow.internal:5000);
  2. else the MLFLOW_TRACKING_URI environment variable;
  3. else `sqlite:///<storage.root>/mlflow.db`, with artifacts in `<storage.root>/mlartifacts`.
     SQLite cannot live on S3, so for an `s3://` storage root the database sits in a local
     `./ift-work/mlflow.db` and the experiment's artifacts go to `<storage.root>/mlartifacts`
     on S3 (boto3 honours AWS_ENDPOINT_URL, so S3-compatible stores work too).

`tracking.artifact_location` puts a new experiment's artifacts elsewhere, e.g.
`s3://bucket/mlflow`, with any of the stores above.

A process that did not create a run resumes it before logging: `start_run(cfg.tracking,
cfg.storage.root, name, run_id=...)`. With `tracking.enabled: false` every function is a
no-op and run ids are "". `resolve_uri` and `start_run` take the config's `tracking`
section and its storage.root.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from ift import __version__, storage
from ift.config import TrackingConfig

# mlflow (and matplotlib for the loss curve) are imported where a run is logged: tracking
# is optional (tracking.enabled), and every stage imports this module.

log = logging.getLogger(__name__)

# MLflow's server-side limits (mlflow.utils.validation); a longer value is rejected.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

PARENT_TAG = "mlflow.parentRunId"
CODE_TAG = "ift.code_version"

# Run id -> tracking URI, so that calls given only a run id reach the store that holds it.
_RUN_URIS: dict[str, str] = {}

T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# Where
# ---------------------------------------------------------------------------------------


def resolve_uri(tracking: TrackingConfig, root: str) -> str:
    """The tracking URI for a job whose storage.root is `root` (see the module docstring
    for the order)."""
    if tracking.uri:
        return tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    local = _local_root(root)
    os.makedirs(local, exist_ok=True)
    return f"sqlite:///{local}/mlflow.db"


def _local_root(root: str) -> str:
    """The folder of the default sqlite store: `root` made absolute, or ./ift-work for an
    s3:// root (sqlite cannot live on S3)."""
    if storage.is_remote(root):
        root = "./ift-work"
    return os.path.abspath(root)


def _artifact_location(tracking: TrackingConfig, root: str, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: tracking.artifact_location when set (a local
    folder becomes a file: URI), else beside the data (storage root `root`) for sqlite
    stores; a tracking server (http) or a store of another kind decides for itself."""
    where = tracking.artifact_location
    if where:
        # A URI (s3://, file:, mlflow-artifacts:/, ...) as it is; a plain path made absolute.
        return where if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", where) \
            else Path(os.path.abspath(where)).as_uri()
    if not uri.startswith("sqlite:"):
        return None
    if storage.is_remote(root):
        return storage.join(root, "mlartifacts")
    return Path(os.path.abspath(root), "mlartifacts").as_uri()


@lru_cache(maxsize=8)
def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _client_for(run_id: str):
    # A run started in another process: fall back to MLFLOW_TRACKING_URI / mlflow's default.
    uri = _RUN_URIS.get(run_id)
    if uri is None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            log.warning("mlflow run %s was not started or resumed in this process and "
                        "MLFLOW_TRACKING_URI is unset; call start_run(tracking, root, name, "
                        "run_id=...) first", run_id)
        uri = mlflow.get_tracking_uri()
        _RUN_URIS[run_id] = uri
    return _client(uri)


def _retry(fn: Callable[[], T], what: str, attempts: int = 6) -> T:
    """Retry a locked sqlite store: concurrent trials writing one mlflow.db can find it
    locked for a moment. (MLflow's HTTP client already retries a tracking server itself.)"""
    delay = 0.2
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - narrowed by message below
            if "is locked" not in str(e).lower() or i == attempts - 1:
                raise
            log.warning("mlflow %s failed (%s); retrying in %.1fs", what, e, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------


def _experiment_id(client, name: str, artifact_location: str | None,
                   explicit: bool = False) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # noqa: BLE001 - another process created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if explicit and artifact_location and \
            exp.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        log.warning("tracking.artifact_location=%s is ignored: experiment %r already keeps "
                    "its artifacts in %s (MLflow fixes it at creation; use another "
                    "tracking.experiment)", artifact_location, name, exp.artifact_location)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def start_run(tracking: TrackingConfig, root: str, run_name: str, *,
              run_id: str | None = None, parent_run_id: str | None = None,
              tags: dict | None = None) -> str:
    """Start a run in experiment `tracking.experiment`, or resume `run_id`; `root` is the
    job's storage.root (where the default sqlite store lives, see `resolve_uri`).

    A child run (a Tune trial, an eval of a training run) names its parent with
    `parent_run_id`; MLflow's UI nests it. Returns the run id ("" when tracking is off).
    A run id that the store does not know (a wiped database) starts a fresh run instead,
    with a warning; the caller keeps whichever id is returned.
    """
    if not tracking.enabled:
        return ""
    uri = resolve_uri(tracking, root)
    client = _client(uri)
    all_tags = {CODE_TAG: code_version(), **_strings(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id

    if run_id:
        from mlflow.exceptions import MlflowException

        try:
            run = _retry(lambda: client.get_run(run_id), "get_run")
        except MlflowException as e:
            log.warning("mlflow run %s not found at %s (%s); starting a new run", run_id, uri, e)
        else:
            _RUN_URIS[run_id] = uri
            if run.info.status != "RUNNING":
                _retry(lambda: client.update_run(run_id, status="RUNNING"), "update_run")
            set_tags(run_id, all_tags)
            return run_id

    exp_id = _retry(lambda: _experiment_id(client, tracking.experiment,
                                           _artifact_location(tracking, root, uri),
                                           explicit=bool(tracking.artifact_location)),
                    "experiment")
    run = _retry(lambda: client.create_run(exp_id, run_name=run_name, tags=all_tags),
                 "create_run")
    _RUN_URIS[run.info.run_id] = uri
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark a run FINISHED, FAILED or KILLED."""
    if not run_id:
        return
    client = _client_for(run_id)
    _retry(lambda: client.set_terminated(run_id, status=status), "set_terminated")


# ---------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------


def _scalar(v: Any) -> str:
    # YAML-style scalars, so a logged param replays as a `key=value` override.
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _key(k: Any) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; anything else becomes _.
    return re.sub(r"[^\w\-. /]", "_", str(k))


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts and lists -> {"a.b.0.c": "value"}.

    Lists of scalars stay one value (JSON, e.g. '["q_proj", "v_proj"]'); empty dicts and
    lists are kept as "{}" / "[]" so that every config key shows up.
    """
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            if not node and key:
                out[key] = "{}"
            for k, v in node.items():
                walk(v, f"{key}.{_key(k)}" if key else _key(k))
        elif isinstance(node, (list, tuple)):
            if all(not isinstance(v, (dict, list, tuple)) for v in node):
                out[key] = json.dumps(list(node), default=str)
            else:
                for i, v in enumerate(node):
                    walk(v, f"{key}.{i}")
        else:
            out[key] = _scalar(node)

    walk(d, prefix)
    return out


def _strings(d: dict) -> dict[str, str]:
    return {str(k): _scalar(v) for k, v in d.items()}


def _trim(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def log_params(run_id: str, params: dict) -> None:
    """Log a (nested) dict as params, flattened to dotted keys.

    Keys already logged with the same value are skipped, so a resumed run re-logs its
    config without error. A key logged before with a different value cannot change in
    MLflow; the new value goes to a tag `param_changed.<key>` with a warning.
    """
    if not run_id:
        return
    from mlflow.entities import Param, RunTag

    client = _client_for(run_id)
    flat = {_trim(k, MAX_KEY): _trim(v, MAX_PARAM_VALUE) for k, v in flatten(params).items()}
    existing = _retry(lambda: client.get_run(run_id), "get_run").data.params
    new = {k: v for k, v in flat.items() if k not in existing}
    changed = {k: v for k, v in flat.items() if k in existing and existing[k] != v}
    for k, v in changed.items():
        log.warning("param %s was %r in run %s, now %r; recorded as a tag", k, existing[k],
                    run_id, v)
    items = list(new.items())
    for i in range(0, len(items), PARAMS_PER_BATCH):
        chunk = [Param(k, v) for k, v in items[i : i + PARAMS_PER_BATCH]]
        _retry(lambda c=chunk: client.log_batch(run_id, params=c), "log_batch")
    if changed:
        tags = [RunTag(_trim(f"param_changed.{k}", MAX_KEY), v) for k, v in changed.items()]
        for i in range(0, len(tags), PARAMS_PER_BATCH):
            chunk = tags[i : i + PARAMS_PER_BATCH]
            _retry(lambda c=chunk: client.log_batch(run_id, tags=c), "log_batch")


def log_metrics(run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log metrics at one step in batches. None values are skipped; a value that is not a
    number is an error naming its key."""
    if not run_id:
        return
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = []
    for k, v in metrics.items():
        if v is None:
            continue
        try:
            value = float(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metric {k!r}={v!r} is not a number") from e
        if math.isnan(value):
            log.warning("metric %s is NaN at step %d", k, step)
        batch.append(Metric(_trim(_key(k), MAX_KEY), value, ts, int(step)))
    client = _client_for(run_id)
    for i in range(0, len(batch), METRICS_PER_BATCH):
        chunk = batch[i : i + METRICS_PER_BATCH]
        _retry(lambda c=chunk: client.log_batch(run_id, metrics=c), "log_batch")


def set_tags(run_id: str, tags: dict) -> None:
    """Set run tags (values become strings)."""
    if not run_id or not tags:
        return
    from mlflow.entities import RunTag

    client = _client_for(run_id)
    items = [RunTag(_trim(k, MAX_KEY), _trim(v, MAX_TAG_VALUE)) for k, v in _strings(tags).items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        chunk = items[i : i + PARAMS_PER_BATCH]
        _retry(lambda c=chunk: client.log_batch(run_id, tags=c), "log_batch")


def log_artifact(run_id: str, local_path: str, artifact_path: str | None = None) -> None:
    """Upload a file or a directory (local or s3://) to the run's artifacts.

    A file lands as `<artifact_path>/<name>`; a directory lands as `<artifact_path>/` when
    given, else under its own name (so `final/` stays `final/`).
    """
    if not run_id:
        return
    client = _client_for(run_id)
    with tempfile.TemporaryDirectory(prefix="ift-artifact-") as tmp:
        path = _local(local_path, tmp)
        if os.path.isdir(path):
            dest = artifact_path or os.path.basename(os.path.normpath(local_path.rstrip("/")))
            _retry(lambda: client.log_artifacts(run_id, path, dest), "log_artifacts")
        elif os.path.isfile(path):
            _retry(lambda: client.log_artifact(run_id, path, artifact_path), "log_artifact")
        else:
            raise FileNotFoundError(f"artifact {local_path!r} does not exist")


def _local(path: str, tmp: str) -> str:
    """A local copy of an s3:// file or folder (the path itself when local)."""
    if not storage.is_remote(path):
        return path
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if storage.isdir(path):
        return storage.download_dir(path, os.path.join(tmp, name))
    if not storage.exists(path):
        raise FileNotFoundError(f"artifact {path!r} does not exist")
    dest = os.path.join(tmp, name)
    with open(dest, "wb") as f:
        f.write(storage.read_bytes(path))
    return dest


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def loss_curve_png(history: list[dict], path: str) -> str:
    """Plot train loss against step (and eval loss points where present) to a PNG.

    Rows are per-step dicts as in a run's metrics.jsonl: `step` plus `loss` or `train_loss`,
    and optionally `eval_loss`. Uses the Agg canvas directly (no pyplot global state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def points(keys: tuple[str, ...]) -> tuple[list, list]:
        xs, ys = [], []
        for i, row in enumerate(history):
            for k in keys:
                if row.get(k) is not None:
                    xs.append(row.get("step", i))
                    ys.append(float(row[k]))
                    break
        return xs, ys

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    tx, ty = points(("loss", "train_loss"))
    ex, ey = points(("eval_loss",))
    if tx:
        ax.plot(tx, ty, label="train loss", linewidth=1.2)
    if ex:
        ax.plot(ex, ey, "o-", label="eval loss", markersize=4)
    if not tx and not ex:
        ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if tx or ex:
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return path


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the checkout holding this package ("-dirty" when tracked files are
    modified), or the package version when it is not a git checkout."""
    pkg = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", pkg, *args], capture_output=True, text=True,
                               timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    # The package must be tracked by the repository (a venv inside some other repo is not).
    commit = git("rev-parse", "HEAD")
    if not commit or git("ls-files", "--error-unmatch", "__init__.py") is None:
        return __version__
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}-dirty" if dirty else commit
