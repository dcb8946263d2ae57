"""Lineage: where every artifact came from, and `ift lineage PATH_OR_MODEL_ID`.

The chain, oldest first:

    sources          files with their sha256 (manifest.json of the prepared dataset)
    prepared         the prepared dataset dir and its manifest hash (a sweep's re-mixed
                     data names its parent dataset too)
    training run     the run dir, its config.yaml, the MLflow run id and tracking URI
    adapter / model  <run dir>/final/ (a full model for full/freeze runs)
    merged           a model dir written by `ift merge`
    serving          a model id on a running `ift serve` (GET /v1/models)

What each artifact carries to walk back:

- a prepared dataset: manifest.json (`hash`, `sources` with files and hashes, `parent`);
- a run dir: run.json and config.yaml;
- final/: `ift_lineage.json`, written by training inside final/ before its _COMPLETE
  marker (`training_record`);
- a merged model dir: `ift_lineage.json`, the adapter's record plus `merged_from`
  (`merged_record`);
- a served model: its /v1/models metadata, which holds the lineage file's keys and the
  serving deployment.

The records are flat JSON objects whose keys `mlflow_run_id`, `data_manifest_hash`,
`method` and `base_model` are what the server shows (ift.serve.adapters.LINEAGE_KEYS).
`chain` turns a path or a served model id into the list of stages; `render` prints it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import yaml

from ift import storage
from ift.artifacts import (
    ADAPTER_CONFIG,
    CONFIG_FILE,
    FINAL_DIR,
    LINEAGE_FILE,
    MANIFEST_FILE,
    MODEL_CONFIG,
    RUN_FILE,
)

STAGE_LABELS = {
    "sources": "sources",
    "prepared": "prepared",
    "run": "training run",
    "adapter": "adapter",
    "model": "model",
    "merged": "merged",
    "serving": "serving",
}


class LineageError(ValueError):
    """The thing asked about is not an artifact ift knows; the message names it."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def absolute(path: str) -> str:
    """A local path made absolute (records must not depend on the reader's cwd)."""
    if not path or storage.is_remote(path):
        return path
    return os.path.abspath(path)


# ---------------------------------------------------------------------------------------
# Records (pure)
# ---------------------------------------------------------------------------------------


def files_digest(files: list[dict[str, Any]]) -> str | None:
    """One hash for a source's files: the file's sha256 when there is one file, else the
    sha256 of the sorted `path<TAB>sha256` lines; None when the files are not known."""
    known = [f for f in files if f.get("sha256")]
    if not known:
        return None
    if len(known) == 1:
        return str(known[0]["sha256"])
    lines = sorted(f"{f.get('path')}\t{f['sha256']}" for f in known)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def source_entries(manifest: dict[str, Any],
                   parent: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """[{name, path, files: [{path, sha256}], hash}] for each source of a manifest, in the
    manifest's order. A re-mixed dataset's manifest copies its parent's source entries;
    where one lacks its files, the parent manifest's are used."""
    theirs = (parent or {}).get("sources") or {}
    out = []
    for name, src in (manifest.get("sources") or {}).items():
        src = src if isinstance(src, dict) else {}
        up = theirs.get(name) if isinstance(theirs.get(name), dict) else {}
        files = [{"path": f.get("path"), "sha256": f.get("sha256")}
                 for f in (src.get("files") or up.get("files") or []) if isinstance(f, dict)]
        out.append({"name": name, "path": src.get("path") or up.get("path"), "files": files,
                    "hash": files_digest(files)})
    return out


def training_record(*, manifest: dict[str, Any], prepared: str, run_dir: str, run_name: str,
                    method: str, base_model: str, mlflow_run_id: str = "",
                    tracking_uri: str = "", config_path: str = "", artifact: str = "adapter",
                    parent_manifest: dict[str, Any] | None = None,
                    created: str | None = None) -> dict[str, Any]:
    """The record a training run writes to final/ift_lineage.json.

    `artifact` is "adapter" for PEFT methods and "model" for full/freeze runs, whose
    final/ is a whole HF model.
    """
    tok = manifest.get("tokenizer") or {}
    return {
        "artifact": artifact,
        "mlflow_run_id": mlflow_run_id or None,
        "tracking_uri": tracking_uri or None,
        "run_name": run_name,
        "run_dir": run_dir,
        "config": config_path or (storage.join(run_dir, CONFIG_FILE) if run_dir else None),
        "method": method,
        "base_model": base_model,
        "data_manifest_hash": manifest.get("hash"),
        "prepared": prepared,
        "data_parent": manifest.get("parent"),
        "mixture": manifest.get("mixture"),
        "tokenizer": {"name_or_path": tok.get("name_or_path"), "sha256": tok.get("sha256")},
        "sources": source_entries(manifest, parent_manifest),
        "created": created or _now(),
    }


def merged_record(adapter_record: dict[str, Any], *, base: str, adapter: str,
                  peft_type: str | None = None, created: str | None = None) -> dict[str, Any]:
    """The record of a merged model: the adapter's record (its keys stay at the top, so a
    server shows the training run and data of a merged model as of its adapter) plus where
    the merge came from. `created` is the merge's time; the adapter's moves to
    `adapter_created`."""
    rec = dict(adapter_record)
    rec.update({
        "artifact": "merged",
        "merged_from": {"base": base, "adapter": adapter},
        "training_run_id": adapter_record.get("mlflow_run_id"),
        "adapter_created": adapter_record.get("created"),
        "created": created or _now(),
    })
    if peft_type is not None:
        rec["peft_type"] = peft_type
    if rec.get("base_model") is None:
        rec["base_model"] = base
    return rec


def is_merged(record: dict[str, Any]) -> bool:
    return isinstance(record.get("merged_from"), dict)


# ---------------------------------------------------------------------------------------
# Stages (pure)
# ---------------------------------------------------------------------------------------


def manifest_stages(manifest: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """sources -> (parent dataset) -> prepared, from a prepared dataset's manifest."""
    stages = [{"stage": "sources", "sources": source_entries(manifest)}]
    parent = manifest.get("parent")
    if isinstance(parent, dict):
        stages.append({"stage": "prepared", "role": "parent", "path": parent.get("path"),
                       "hash": parent.get("hash")})
    splits = manifest.get("splits") or {}
    stages.append({"stage": "prepared", "path": path, "hash": manifest.get("hash"),
                   "created": manifest.get("created"), "mixture": manifest.get("mixture"),
                   "rows": {k: v.get("rows") for k, v in splits.items() if isinstance(v, dict)}})
    return stages


def record_stages(record: dict[str, Any], artifact_path: str | None) -> list[dict[str, Any]]:
    """The stages a lineage record describes, oldest first. `artifact_path` is where the
    record was read (the final/ or merged dir); None leaves out the artifact stages (a run
    that has not written final/ yet). A run that started from an existing adapter
    (model.adapter) lists that adapter's own chain first."""
    stages: list[dict[str, Any]] = []
    parent_adapter = record.get("parent_adapter")
    if isinstance(parent_adapter, dict) and isinstance(parent_adapter.get("lineage"), dict):
        stages.extend(record_stages(parent_adapter["lineage"], parent_adapter.get("path")))
    elif isinstance(parent_adapter, dict):
        stages.append({"stage": "adapter", "path": parent_adapter.get("path"),
                       "notes": [f"no {LINEAGE_FILE} recorded for the parent adapter"]})
    own = len(stages)
    sources = record.get("sources")
    if sources:
        stages.append({"stage": "sources", "sources": list(sources)})
    parent = record.get("data_parent")
    if isinstance(parent, dict):
        stages.append({"stage": "prepared", "role": "parent", "path": parent.get("path"),
                       "hash": parent.get("hash")})
    if record.get("prepared") or record.get("data_manifest_hash"):
        stages.append({"stage": "prepared", "path": record.get("prepared"),
                       "hash": record.get("data_manifest_hash"),
                       "mixture": record.get("mixture")})
    if record.get("run_dir") or record.get("mlflow_run_id"):
        stages.append({"stage": "run", "path": record.get("run_dir"),
                       "run_name": record.get("run_name"),
                       "mlflow_run_id": record.get("mlflow_run_id"),
                       "tracking_uri": record.get("tracking_uri"),
                       "config": record.get("config"), "method": record.get("method")})
    if artifact_path is None:
        return stages
    if is_merged(record):
        src = record["merged_from"]
        stages.append({"stage": "adapter", "path": src.get("adapter"),
                       "method": record.get("method"), "base_model": record.get("base_model"),
                       "created": record.get("adapter_created")})
        stages.append({"stage": "merged", "path": artifact_path, "base": src.get("base"),
                       "merge_run_id": record.get("merge_run_id"),
                       "created": record.get("created")})
    else:
        kind = "model" if record.get("artifact") == "model" else "adapter"
        stages.append({"stage": kind, "path": artifact_path, "method": record.get("method"),
                       "base_model": record.get("base_model"), "created": record.get("created")})
    if len(stages) == own + 1:
        stages[own]["notes"] = [f"no {LINEAGE_FILE} recorded: where this came from is unknown"]
    return stages


def parent_adapter_record(path: str) -> dict[str, Any]:
    """What a run that starts from an existing adapter (model.adapter) records of it: its
    path and its own lineage record, so base -> SFT adapter -> DPO adapter, with the data
    of each, stays on file."""
    return {"path": absolute(path), "lineage": read_record(path)}


def serving_stage(row: dict[str, Any], url: str) -> dict[str, Any]:
    """The serving stage of one /v1/models entry."""
    meta = row.get("metadata") or {}
    serving = meta.get("serving") or {}
    return {"stage": "serving", "model_id": row.get("id"), "type": meta.get("type"),
            "url": serving.get("url") or api_base(url), "app": serving.get("app"),
            "deployment": serving.get("deployment"), "path": meta.get("path") or row.get("root")}


# ---------------------------------------------------------------------------------------
# Reading artifacts
# ---------------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any] | None:
    """A JSON object file, or None when it is absent or unreadable (local or s3)."""
    try:
        value = json.loads(storage.read_text(path))
    except Exception:  # noqa: BLE001 - missing: OSError locally, ClientError on s3
        return None
    return value if isinstance(value, dict) else None


def _exists(path: str) -> bool:
    try:
        return storage.exists(path)
    except Exception:  # noqa: BLE001 - e.g. an s3 bucket that does not exist
        return False


def read_record(path: str) -> dict[str, Any] | None:
    """The ift_lineage.json beside an adapter or model, or None."""
    return _read_json(storage.join(path, LINEAGE_FILE))


def run_record(run_dir: str) -> dict[str, Any] | None:
    """A training record rebuilt from a run dir's run.json, config.yaml and the prepared
    dataset's manifest (runs whose final/ carries no lineage file, or has none yet)."""
    info = _read_json(storage.join(run_dir, RUN_FILE))
    if info is None:
        return None
    base_model = None
    try:
        cfg = yaml.safe_load(storage.read_text(storage.join(run_dir, CONFIG_FILE)))
        base_model = ((cfg or {}).get("model") or {}).get("name_or_path")
    except Exception:  # noqa: BLE001 - the config is optional here
        pass
    prepared = info.get("prepared") or ""
    manifest = _read_json(storage.join(prepared, MANIFEST_FILE)) if prepared else None
    manifest = manifest or {"hash": info.get("data_hash")}
    method = info.get("method")
    return training_record(
        manifest=manifest, prepared=prepared, run_dir=info.get("run_dir") or run_dir,
        run_name=info.get("run_name") or "", method=method, base_model=base_model,
        mlflow_run_id=info.get("mlflow_run_id") or "",
        tracking_uri=info.get("tracking_uri") or "",
        config_path=storage.join(run_dir, CONFIG_FILE),
        artifact="model" if method in ("full", "freeze") else "adapter",
        created=info.get("started"))


def path_stages(path: str) -> list[dict[str, Any]]:
    """The stages of a local or s3 path: a final/ or merged dir, a run dir, a prepared
    dataset, or an adapter/model dir without a record."""
    path = path.rstrip("/") if storage.is_remote(path) else os.path.normpath(path)
    if not _exists(path):
        raise LineageError(f"{path}: no such file or directory (to look up a model id "
                           "served by `ift serve`, give --url)")
    record = read_record(path)
    if record is not None:
        return record_stages(record, path)
    if _exists(storage.join(path, RUN_FILE)):
        final = storage.join(path, FINAL_DIR)
        record = read_record(final)
        if record is not None:
            return record_stages(record, final)
        record = run_record(path) or {}
        done = _exists(storage.join(final, storage.COMPLETE_MARKER))
        stages = record_stages(record, final if done else None)
        if not done:
            stages[-1].setdefault("notes", []).append(f"{final} is not written (yet)")
        return stages
    manifest = _read_json(storage.join(path, MANIFEST_FILE))
    if manifest is not None and "hash" in manifest:
        return manifest_stages(manifest, path)
    adapter = _exists(storage.join(path, ADAPTER_CONFIG))
    if adapter or _exists(storage.join(path, MODEL_CONFIG)):
        parent = path.rsplit("/", 1)[0] if storage.is_remote(path) else os.path.dirname(path)
        if _exists(storage.join(parent, RUN_FILE)):  # final/ of a run from before records
            record = run_record(parent) or {}
            return record_stages(record, path)
        return record_stages({"method": _adapter_method(path) if adapter else None,
                              "artifact": "adapter" if adapter else "model"}, path)
    raise LineageError(
        f"{path}: not an artifact ift knows: no {LINEAGE_FILE}, {RUN_FILE}, {MANIFEST_FILE}, "
        f"{ADAPTER_CONFIG} or {MODEL_CONFIG} in it; give a prepared dataset, a run dir, its "
        "final/ dir, a merged model dir, or a served model id with --url")


def _adapter_method(path: str) -> str | None:
    acfg = _read_json(storage.join(path, ADAPTER_CONFIG)) or {}
    peft_type = str(acfg.get("peft_type") or "").lower()
    return "dora" if acfg.get("use_dora") else peft_type or None


# ---------------------------------------------------------------------------------------
# Checks against what is there now
# ---------------------------------------------------------------------------------------


def mlflow_run_status(run_id: str | None, tracking_uri: str | None,
                      timeout_s: int = 5) -> dict[str, Any]:
    """Whether the MLflow run exists: {"status": found|missing|unreachable|unknown, ...}.
    Never raises; an unreachable store is reported, not fatal."""
    if not run_id:
        return {"status": "unknown", "detail": "no MLflow run id recorded"}
    if not tracking_uri:
        return {"status": "unknown", "detail": "no tracking URI recorded"}
    if tracking_uri.startswith("sqlite:"):
        db = tracking_uri.split("sqlite:///", 1)[-1]
        # Opening a missing sqlite file would create an empty store; report it instead.
        if not os.path.exists(db):
            return {"status": "unreachable", "detail": f"{db} does not exist here"}
    elif tracking_uri.startswith("file:"):
        local = urllib.parse.urlparse(tracking_uri).path
        if not os.path.isdir(local):
            return {"status": "unreachable", "detail": f"{local} does not exist here"}
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
        except MlflowException as e:
            if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return {"status": "missing", "detail": f"no run {run_id} in {tracking_uri}"}
            return {"status": "unreachable", "detail": _short(e)}
        return {"status": "found", "run_status": run.info.status,
                "experiment_id": run.info.experiment_id, "run_name": run.info.run_name}
    except Exception as e:  # noqa: BLE001 - any failure to reach the store
        return {"status": "unreachable", "detail": _short(e)}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def check(stages: list[dict[str, Any]], *, mlflow: bool = True) -> list[dict[str, Any]]:
    """Add notes where what is on disk now differs from the record: a dataset whose
    manifest hash changed or that is gone, a run's status, the MLflow run (when `mlflow`)."""
    for st in stages:
        notes = st.setdefault("notes", [])
        path = st.get("path")
        if st["stage"] == "prepared" and path:
            manifest = _read_json(storage.join(path, MANIFEST_FILE))
            if manifest is None:
                notes.append(f"{path}/{MANIFEST_FILE} is not readable here")
            elif st.get("hash") and manifest.get("hash") != st["hash"]:
                notes.append(f"its manifest now has hash {manifest.get('hash')}: the data "
                             "changed after this was recorded")
        elif st["stage"] == "run":
            info = _read_json(storage.join(path, RUN_FILE)) if path else None
            if path and info is None:
                notes.append(f"{path}/{RUN_FILE} is not readable here")
            elif info is not None:
                st["status"] = info.get("status")
            if mlflow:
                st["mlflow"] = mlflow_run_status(st.get("mlflow_run_id"), st.get("tracking_uri"))
        elif (st["stage"] in ("adapter", "model", "merged") and path
              and st.get("role") != "base" and not _exists(path)):
            notes.append(f"{path} is not readable here")
        if not notes:
            del st["notes"]
    return stages


# ---------------------------------------------------------------------------------------
# A running server
# ---------------------------------------------------------------------------------------


def api_base(url: str) -> str:
    """http://host:port[/prefix]/v1 for a server URL given with or without /v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def served_models(url: str, api_key: str | None = None,
                  timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """GET /v1/models of a running server."""
    endpoint = api_base(url) + "/models"
    req = urllib.request.Request(endpoint)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        hint = " (the server wants a bearer key: --api-key-env VAR)" if e.code == 401 else ""
        raise LineageError(f"GET {endpoint}: HTTP {e.code}{hint}") from e
    except (urllib.error.URLError, OSError) as e:
        raise LineageError(f"GET {endpoint}: cannot reach the server "
                           f"({getattr(e, 'reason', e)})") from e
    except ValueError as e:
        raise LineageError(f"GET {endpoint}: the answer is not JSON ({e})") from e
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise LineageError(f"GET {endpoint}: no `data` list in the answer")
    return [r for r in data if isinstance(r, dict)]


def find_served(rows: list[dict[str, Any]], target: str) -> dict[str, Any] | None:
    """The entry whose id is `target`, else the one served from the path `target`."""
    for r in rows:
        if r.get("id") == target:
            return r
    want = {target.rstrip("/"), absolute(target).rstrip("/")}
    for r in rows:
        path = (r.get("metadata") or {}).get("path") or r.get("root") or ""
        if path.rstrip("/") in want:
            return r
    return None


# ---------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------


def chain(target: str, *, url: str | None = None, api_key: str | None = None,
          check_mlflow: bool = True) -> list[dict[str, Any]]:
    """The stages behind `target`, oldest first: a final/ or merged model dir, a run dir, a
    prepared dataset (local or s3://), or, with `url`, a model id (or path) served there.

    Each stage is a dict with `stage` (sources, prepared, run, adapter, model, merged,
    serving) and what is known of it; `notes` say where the record and what is there now
    disagree, or what could not be read. Raises LineageError for anything else.
    """
    if not target:
        raise LineageError("give a path or a served model id")
    if not url:
        return check(path_stages(target), mlflow=check_mlflow)
    rows = served_models(url, api_key)
    row = find_served(rows, target)
    if row is None:
        ids = ", ".join(str(r.get("id")) for r in rows) or "none"
        raise LineageError(f"{target}: not a model served at {api_base(url)} (it serves: {ids})")
    meta = row.get("metadata") or {}
    path = meta.get("path") or row.get("root") or ""
    if meta.get("type") == "base":
        stages = [{"stage": "model", "path": path, "role": "base",
                   "notes": ["the base model: not trained by ift"]}]
    elif path and _exists(path):
        stages = path_stages(path)  # the files say the most
    else:
        stages = record_stages(meta, path or None)  # the server's copy of the record
    stages = check(stages, mlflow=check_mlflow)
    stages.append(serving_stage(row, url))
    return stages


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------


def _mlflow_text(m: dict[str, Any] | None) -> str:
    if not m:
        return ""
    if m["status"] == "found":
        return f"[found in MLflow, {m.get('run_status')}]"
    if m["status"] == "missing":
        return "[not found in MLflow]"
    if m["status"] == "unreachable":
        return f"[MLflow unreachable: {m.get('detail')}]"
    return ""


def render(stages: list[dict[str, Any]], target: str = "") -> str:
    """The chain as text, one block per stage, oldest first."""
    width = max(len(v) for v in STAGE_LABELS.values()) + 2
    pad = " " * (width + 2)
    lines = [f"lineage of {target}"] if target else []
    for st in stages:
        label = STAGE_LABELS.get(st["stage"], st["stage"])
        if st.get("role") == "parent":
            label = "prepared (parent)"
        head = f"  {label:<{width}}"
        kind = st["stage"]
        if kind == "sources":
            srcs = st.get("sources") or []
            lines.append(f"{head}{len(srcs)} source{'s' if len(srcs) != 1 else ''}")
            for s in srcs:
                lines.append(f"{pad}{s.get('name')}: {s.get('path')}"
                             + (f"  sha256 {s['hash']}" if s.get("hash") else ""))
                if len(s.get("files") or []) > 1:
                    for f in s["files"]:
                        lines.append(f"{pad}  {f.get('path')}  sha256 {f.get('sha256')}")
        elif kind == "prepared":
            lines.append(f"{head}{st.get('path') or '(path not recorded)'}  "
                         f"manifest hash {st.get('hash')}")
            if st.get("mixture"):
                mix = ", ".join(f"{k}={v.get('weight') if isinstance(v, dict) else v}"
                                for k, v in st["mixture"].items())
                lines.append(f"{pad}mixture {mix}")
        elif kind == "run":
            bits = [b for b in (st.get("run_name"), st.get("method"), st.get("status")) if b]
            lines.append(f"{head}{st.get('path') or '(run dir not recorded)'}"
                         + (f"  ({', '.join(bits)})" if bits else ""))
            if st.get("mlflow_run_id"):
                where = f" at {st['tracking_uri']}" if st.get("tracking_uri") else ""
                lines.append(f"{pad}mlflow run {st['mlflow_run_id']}{where} "
                             f"{_mlflow_text(st.get('mlflow'))}".rstrip())
            else:
                lines.append(f"{pad}no MLflow run (tracking was off)")
            if st.get("config"):
                lines.append(f"{pad}config {st['config']}")
        elif kind in ("adapter", "model"):
            bits = [b for b in (st.get("method"),
                                st.get("base_model") and f"on {st['base_model']}",
                                st.get("created")) if b]
            lines.append(f"{head}{st.get('path')}" + (f"  ({', '.join(bits)})" if bits else ""))
        elif kind == "merged":
            lines.append(f"{head}{st.get('path')}  (base {st.get('base')})")
            if st.get("merge_run_id"):
                lines.append(f"{pad}mlflow merge run {st['merge_run_id']}")
        elif kind == "serving":
            lines.append(f"{head}model {st.get('model_id')!r} ({st.get('type')}) at {st.get('url')}")
            if st.get("app") or st.get("deployment"):
                lines.append(f"{pad}app {st.get('app')}, deployment {st.get('deployment')}")
        for note in st.get("notes") or []:
            lines.append(f"{pad}! {note}")
    return "\n".join(lines)


def lineage_cmd(args) -> int:
    """`ift lineage PATH_OR_MODEL_ID [--url URL] [--json]`."""
    key = None
    env = getattr(args, "api_key_env", None)
    if env:
        key = os.environ.get(env)
        if not key:
            print(f"ift lineage: --api-key-env {env}: the variable is empty or unset",
                  file=sys.stderr)
            return 2
    try:
        stages = chain(args.target, url=getattr(args, "url", None), api_key=key,
                       check_mlflow=not getattr(args, "no_mlflow", False))
    except LineageError as e:
        print(f"ift lineage: {e}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps({"target": args.target, "stages": stages}, indent=2, default=str))
    else:
        print(render(stages, args.target))
    return 0
