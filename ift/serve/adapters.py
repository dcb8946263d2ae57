"""Which model ids a server knows, where each lives, and what is known about it.

A request's `model` field names one of:

- the base model (`serve.base_model_id`),
- a merged model (`serve.merged_models` ids), served by its own deployment,
- an adapter: an id from `serve.adapters`, or a relative name under `serve.adapter_root`
  such as `sweep-1/runs/t003/final` (local or s3://). The full path under the root
  is accepted too. Names are checked segment by segment (letters, digits, `._-`, no `.`
  or `..`), so a request can never reach a path outside the root.

Lineage (`ift_lineage.json` beside an adapter or merged model: MLflow run id, data
manifest hash, method, base model) is read when present and shown by /v1/models.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from ift import storage
from ift.artifacts import ADAPTER_CONFIG, LINEAGE_FILE
from ift.serve.protocol import RequestError

SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_NAME_LEN = 512
LINEAGE_KEYS = ("mlflow_run_id", "data_manifest_hash", "method", "base_model")


def check_adapter_name(name: str) -> str:
    """A safe relative adapter name, or RequestError(404) saying why it is not one."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
        raise RequestError(f"model {name!r} not found", "model", 404, code="model_not_found")
    parts = name.split("/")
    for p in parts:
        if p in (".", "..") or not SEGMENT_RE.match(p):
            raise RequestError(
                f"model {name!r} not found: adapter names are '/'-separated segments of "
                "letters, digits, '.', '_' and '-' (no '.' or '..' segments)",
                "model", 404, code="model_not_found")
    return name


def _norm_root(root: str) -> str:
    return root.rstrip("/")


@dataclass
class Target:
    """Where a model id is served."""

    kind: str
    """base, merged or adapter."""
    model_id: str
    """The id as requested (canonical for adapters)."""
    path: str
    """Model or adapter directory (local or s3://)."""


class Catalog:
    """Model ids -> paths for one server configuration (no model weights loaded here)."""

    def __init__(self, base_id: str, base_path: str, adapters: dict[str, str] | None = None,
                 adapter_root: str = "", merged: dict[str, str] | None = None):
        self.base_id = base_id
        self.base_path = base_path
        self.adapters = dict(adapters or {})
        self.adapter_root = _norm_root(adapter_root) if adapter_root else ""
        self.merged = dict(merged or {})
        ids = [base_id, *self.adapters, *self.merged]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"serve: model ids used twice: {dup} (base_model_id, adapters, "
                             "merged_models must not overlap)")
        for i in self.adapters:
            check_adapter_name(i)
        self._known: set[str] = set()  # adapter names under the root seen to exist

    def adapter_path(self, name: str) -> str | None:
        """The directory of adapter `name` when the name is allowed (not whether it exists)."""
        if name in self.adapters:
            return self.adapters[name]
        if not self.adapter_root:
            return None
        rel = self._relative(name)
        if rel is None:
            return None
        check_adapter_name(rel)
        return storage.join(self.adapter_root, *rel.split("/"))

    def _relative(self, name: str) -> str | None:
        """A name relative to the root: itself, or the rest of a full path under the root."""
        root = self.adapter_root
        if name.startswith(root + "/"):
            rest = name[len(root) + 1:]
            # A full path must not climb back out of the root.
            if posixpath.normpath("/" + rest) != "/" + rest.rstrip("/"):
                return None
            return rest.rstrip("/")
        if "://" in name or name.startswith(("/", "~", "\\")):
            return None
        return name

    def canonical(self, name: str) -> str:
        """Adapter names under the root are served under their relative name."""
        if name in self.adapters or not self.adapter_root:
            return name
        rel = self._relative(name)
        return rel if rel is not None else name

    def is_static(self, name: str) -> bool:
        """Whether `name` resolves without reading storage (a configured or known id)."""
        return (name == self.base_id or name in self.merged or name in self.adapters
                or name in self._known)

    def resolve(self, name: str) -> Target:
        """Where `name` is served; RequestError(404) when it is not a model here."""
        if name == self.base_id:
            return Target("base", name, self.base_path)
        if name in self.merged:
            return Target("merged", name, self.merged[name])
        if name in self.adapters:
            return Target("adapter", name, self.adapters[name])
        path = self.adapter_path(name) if self.adapter_root else None
        canon = self.canonical(name)
        if path is not None and (canon in self._known or storage.exists(
                storage.join(path, ADAPTER_CONFIG))):
            self._known.add(canon)
            return Target("adapter", canon, path)
        raise RequestError(f"model {name!r} not found; GET /v1/models lists the models served",
                           "model", 404, code="model_not_found")

    def discover(self) -> dict[str, str]:
        """Adapters under adapter_root: relative name -> path (directories with an adapter config)."""
        out: dict[str, str] = {}
        if not self.adapter_root:
            return out
        suffix = "/" + ADAPTER_CONFIG
        prefix = self.adapter_root + "/"
        for f in storage.walk_files(self.adapter_root):
            f = f.replace("\\", "/")
            if not f.endswith(suffix):
                continue
            d = f[: -len(suffix)]
            root = prefix if storage.is_remote(d) else _local_prefix(self.adapter_root)
            rel = d[len(root):] if d.startswith(root) else None
            if not rel:
                continue
            try:
                check_adapter_name(rel)
            except RequestError:
                continue
            out[rel] = storage.join(self.adapter_root, *rel.split("/"))
        return out

    def list_models(self, created: int = 0) -> list[dict[str, Any]]:
        """The /v1/models entries: base, each adapter, each merged model, with lineage."""
        rows = [_entry(self.base_id, "base", self.base_path, None, created)]
        adapters = {**self.discover(), **self.adapters}
        for name in sorted(adapters):
            rows.append(_entry(name, "adapter", adapters[name], self.base_id, created))
        for name in sorted(self.merged):
            rows.append(_entry(name, "merged", self.merged[name], None, created))
        return rows


def _local_prefix(root: str) -> str:
    return os.path.join(root, "").replace("\\", "/")


def read_lineage(path: str) -> dict[str, Any]:
    """Lineage of an adapter or merged model dir: ift_lineage.json, plus the adapter config's
    method when the lineage file is absent. Missing values are None."""
    out: dict[str, Any] = {k: None for k in LINEAGE_KEYS}
    try:
        lineage = json.loads(storage.read_text(storage.join(path, LINEAGE_FILE)))
        if isinstance(lineage, dict):
            out.update({k: v for k, v in lineage.items() if isinstance(k, str)})
    except (FileNotFoundError, ValueError, OSError):
        pass
    except Exception:  # noqa: BLE001 - s3 ClientError for a missing key
        pass
    if out.get("method") is None or out.get("base_model") is None:
        try:
            acfg = json.loads(storage.read_text(storage.join(path, ADAPTER_CONFIG)))
            if out.get("method") is None:
                ptype = str(acfg.get("peft_type", "")).lower()
                out["method"] = "dora" if acfg.get("use_dora") else ptype or None
            if out.get("base_model") is None:
                out["base_model"] = acfg.get("base_model_name_or_path")
        except Exception:  # noqa: BLE001 - not an adapter dir, or unreadable
            pass
    return out


# What an anonymous caller of /v1/models sees of a model's metadata: no server paths.
PUBLIC_METADATA = ("type", "artifact", "method", "mlflow_run_id", "run_name",
                   "data_manifest_hash", "created", "serving")


def public_entry(row: dict[str, Any]) -> dict[str, Any]:
    """A /v1/models entry without server paths: no `root`; `metadata` keeps the
    PUBLIC_METADATA keys, `base` (the served base id of an adapter) and the hash of each
    data source (`sources: [{name, hash}]`)."""
    meta = row.get("metadata") or {}
    public = {k: meta[k] for k in PUBLIC_METADATA if k in meta}
    if meta.get("type") == "adapter":
        public["base"] = row.get("parent")
    sources = meta.get("sources")
    if isinstance(sources, list):
        public["sources"] = [{"name": s.get("name"), "hash": s.get("hash")}
                             for s in sources if isinstance(s, dict)]
    return {**{k: v for k, v in row.items() if k != "root"}, "metadata": public}


def _entry(model_id: str, kind: str, path: str, parent: str | None, created: int) -> dict[str, Any]:
    meta = {"type": kind, "path": path}
    if kind != "base":
        meta.update(read_lineage(path))
    return {"id": model_id, "object": "model", "created": created, "owned_by": "ift",
            "root": path, "parent": parent, "metadata": meta}
