"""`ift merge`: fold a LoRA adapter into its base model and write a plain HF model dir.

The result (safetensors weights, config, tokenizer) loads with
AutoModelForCausalLM.from_pretrained and is served as its own model id. Its
`ift_lineage.json` keeps the adapter's lineage (training run id, data manifest hash,
method) and adds where it came from; the merged model is logged to MLflow in a run
tagged with, and nested under, the training run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from peft import PeftConfig, PeftModel

from ift import storage, tracking
from ift.artifacts import ADAPTER_CONFIG, LINEAGE_FILE, read_prompt_format, write_prompt_format
from ift.config import ModelConfig, TrackingConfig, load_config
from ift.lineage import absolute, merged_record
from ift.models import load_model, load_tokenizer
from ift.serve.adapters import read_lineage


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model",
                                                              "vocab.json"))


def merge(base: str, adapter: str, out: str, *, dtype: str = "auto",
          trust_remote_code: bool = False) -> dict[str, Any]:
    """Merge `adapter` into `base` and write the model to `out` (local or s3://).

    Returns the lineage written beside it. The tokenizer is the adapter's own when it
    was saved with one (training may add tokens), else the base model's. The adapter's
    prompt format goes with it: its record, and its jinja as the tokenizer's chat_template,
    so plain transformers or any other server builds the prompt the model was trained on.
    """
    adapter_local = storage.local_copy(adapter)
    if not os.path.exists(os.path.join(adapter_local, ADAPTER_CONFIG)):
        raise FileNotFoundError(f"{adapter}: no adapter_config.json (not a PEFT adapter dir)")
    pcfg = PeftConfig.from_pretrained(adapter_local)
    if pcfg.is_prompt_learning:
        raise ValueError(f"{adapter}: a {pcfg.peft_type} adapter has no weights to merge into "
                         "the base model (only LoRA-style adapters merge)")
    model = load_model(ModelConfig(name_or_path=base, dtype=dtype,
                                   trust_remote_code=trust_remote_code), device="cpu")
    peft_model = PeftModel.from_pretrained(model, adapter_local, is_trainable=False)
    merged = peft_model.merge_and_unload()
    tok_src = adapter_local if _has_tokenizer(adapter_local) else base
    tokenizer = load_tokenizer(tok_src, trust_remote_code=trust_remote_code)
    fmt = read_prompt_format(adapter_local)
    if fmt is not None:
        tokenizer.chat_template = fmt.chat_template

    # Local paths recorded absolute, so the chain resolves from anywhere; a hub id stays.
    lineage = merged_record(read_lineage(adapter),
                            base=absolute(base) if os.path.isdir(base) else base,
                            adapter=absolute(adapter), peft_type=str(pcfg.peft_type))

    tmp = tempfile.mkdtemp(prefix="ift-merge-")
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if fmt is not None:
            write_prompt_format(tmp, fmt)
        with open(os.path.join(tmp, LINEAGE_FILE), "w", encoding="utf-8") as f:
            json.dump(lineage, f, indent=2, sort_keys=True)
        if not storage.is_remote(out) and os.path.isdir(out):
            shutil.rmtree(out)  # a fresh directory: no stale shards from an earlier merge
        storage.upload_dir(tmp, out)
        storage.mark_complete(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lineage


def log_merge(tracking_cfg: TrackingConfig, root: str, out: str, lineage: dict[str, Any], *,
              log_model: bool = True) -> str:
    """An MLflow run for the merge (tracking section, storage root), nested under the
    training run when it is known."""
    parent = lineage.get("training_run_id") or None
    tags = {"ift.kind": "merge", "ift.merged_model": out,
            "ift.base_model": lineage["merged_from"]["base"],
            "ift.adapter": lineage["merged_from"]["adapter"]}
    if parent:
        tags["ift.training_run_id"] = parent
    if lineage.get("data_manifest_hash"):
        tags["ift.data_manifest_hash"] = lineage["data_manifest_hash"]
    name = "merge-" + os.path.basename(os.path.normpath(out.rstrip("/")))
    run_id = tracking.start_run(tracking_cfg, root, name, parent_run_id=parent,
                                tags=tags)
    if not run_id:
        return ""
    try:
        tracking.log_params(run_id, {"base": lineage["merged_from"]["base"],
                                     "adapter": lineage["merged_from"]["adapter"],
                                     "method": lineage.get("method")})
        if log_model:
            tracking.log_artifact(run_id, out, "merged_model")
        else:
            tracking.log_artifact(run_id, storage.join(out, LINEAGE_FILE), "merged_model")
        tracking.end_run(run_id)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    return run_id


def merge_cmd(args) -> int:
    """`ift merge --base B --adapter A --out DIR`."""
    cfg = load_config(getattr(args, "config", None), getattr(args, "overrides", None) or [])
    lineage = merge(args.base, args.adapter, args.out, dtype=cfg.model.dtype,
                    trust_remote_code=cfg.model.trust_remote_code)
    run_id = ""
    if not getattr(args, "no_mlflow", False):
        run_id = log_merge(cfg.tracking, cfg.storage.root, args.out, lineage,
                           log_model=not getattr(args, "no_log_model", False))
        if run_id:
            lineage["merge_run_id"] = run_id
            storage.write_text(storage.join(args.out, LINEAGE_FILE),
                               json.dumps(lineage, indent=2, sort_keys=True))
    print(f"ift merge: wrote {args.out}" + (f" (MLflow run {run_id})" if run_id else ""))
    return 0
