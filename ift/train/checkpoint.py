"""Training checkpoints: what is saved, how it is loaded, and how a half-written one is told.

A checkpoint directory holds

    adapter_config.json, adapter_model.safetensors    adapter methods (PEFT's own format)
    config.json, model.safetensors, ...               full / freeze (HF format)
    optimizer.pt, scheduler.pt                        optimizer and LR schedule state
    training_state.pt                                 step, epoch, data position, RNG states
    checkpoint.json                                   every file above with its size; written last

The loop saves into a local temporary directory and hands it to `ray.train.report`, which
copies it to <run dir>/checkpoint_NNNNNNN/ and records it in Ray's checkpoint list (which
`CheckpointConfig.num_to_keep` prunes). A run resumes from the newest *complete*
checkpoint directory in the run dir (`find_latest`), not only from Ray's list: Ray records
a checkpoint when its controller next polls the workers, so a worker that dies between
the upload and that poll leaves a complete checkpoint Ray does not know of (seen with Ray
2.60). Complete means `checkpoint.json` is there and every file it lists has its size; an
upload cut short fails that test and is never used.

The final model goes to `<run dir>/final/` (adapter or HF model plus the tokenizer and the
run's lineage record, `ift_lineage.json`, see ift.lineage), staged
elsewhere and moved into place (local) or uploaded with its `_COMPLETE` marker last (s3).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ift import storage
from ift.artifacts import (
    ADAPTER_WEIGHTS,
    FINAL_DIR,
    LINEAGE_FILE,
    PromptFormat,
    write_prompt_format,
)
from ift.train import fsdp
from ift.train.fsdp import clean_module_names
from ift.train.methods import is_adapter, unwrap

STATE_FILE = "training_state.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
INDEX_FILE = "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or does not fit the run; the message names the file."""


# ---------------------------------------------------------------------------------------
# RNG state (plain types, so torch.load(weights_only=True) reads it)
# ---------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------
# Model weights
# ---------------------------------------------------------------------------------------


def full_state_dict(model: nn.Module, strategy: str, method: str = "full"
                    ) -> dict[str, torch.Tensor] | None:
    """FSDP: gather the full (unsharded) state dict, keys without wrapper prefixes; adapter
    methods gather only the trainable tensors (ift.train.fsdp). A collective: every rank
    calls it; the result is for rank 0 to save. DDP/single: None (each rank holds it whole)."""
    if strategy != "fsdp":
        return None

    return fsdp.model_state_dict(model, adapter=is_adapter(method))


def save_model(model: nn.Module, out_dir: str, method: str,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Adapters in PEFT format, full/freeze as an HF safetensors model. An adapter file
    without tensors is an error (a state dict whose keys PEFT did not recognise)."""
    # PeftModel.save_pretrained writes only the adapter; a plain HF model writes itself.
    with clean_module_names(unwrap(model)) as inner:
        # A frozen reference adapter beside the trained one (DPO from model.adapter) stays out.
        extra = {"selected_adapters": ["default"]} if len(getattr(inner, "peft_config", {})) > 1 \
            else {}
        inner.save_pretrained(out_dir, state_dict=state_dict, **extra)
    if is_adapter(method) and method != "adalora":
        _check_adapter_file(out_dir)


def _check_adapter_file(out_dir: str) -> None:
    path = os.path.join(out_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(path):
        return  # PEFT wrote another format (e.g. .bin); nothing to count here
    with safe_open(path, framework="pt") as f:
        if not list(f.keys()):
            raise CheckpointError(
                f"{path}: the adapter was saved with 0 tensors; the state dict given to "
                "save_pretrained had no adapter keys PEFT recognises"
            )


def load_model_weights(ckpt_dir: str, model: nn.Module, method: str,
                       state: dict[str, Any] | None = None) -> None:
    """Load a checkpoint's weights into a freshly built (not yet wrapped) model."""
    if is_adapter(method):
        from peft import set_peft_model_state_dict  # in the workers (see ift.train.methods)

        extra = (state or {}).get("adalora")
        if extra is not None:
            # AdaLoRA: the unpruned adapter tensors and the rank allocator's running scores;
            # the PEFT file alone holds rank-pruned tensors that cannot train further.
            missing = _load_partial(model, extra["trainable"])
            if missing:
                raise CheckpointError(f"{ckpt_dir}: adalora state lacks {missing[:3]}")
            allocator = model.base_model.rankallocator
            for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                getattr(allocator, key).update(extra["allocator"].get(key, {}))
            model.peft_config["default"].rank_pattern = extra.get("rank_pattern")
            return
        path = os.path.join(ckpt_dir, ADAPTER_WEIGHTS)
        if not os.path.exists(path):
            raise CheckpointError(f"{ckpt_dir}: no {ADAPTER_WEIGHTS} (not an adapter checkpoint)")
        tensors = load_file(path)
        result = set_peft_model_state_dict(model, tensors)
        # Prompt-learning adapters store their table as "prompt_embeddings", which PEFT
        # loads separately and still lists as unexpected.
        unexpected = [k for k in getattr(result, "unexpected_keys", []) or []
                      if k != "prompt_embeddings"]
        if unexpected:
            raise CheckpointError(
                f"{path}: tensors that the model does not have: {unexpected[:5]} "
                f"(was the checkpoint made with another peft config?)"
            )
        missing = _missing_adapter_keys(model, result, "prompt_embeddings" in tensors)
        if missing:
            raise CheckpointError(
                f"{path}: lacks adapter tensors the model has: {missing[:5]} "
                f"({len(missing)} in all); resuming would restart them from init"
            )
        return
    weights = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors"))
    if not weights:
        raise CheckpointError(f"{ckpt_dir}: no *.safetensors model weights")
    sd: dict[str, torch.Tensor] = {}
    for name in weights:
        sd.update(load_file(os.path.join(ckpt_dir, name)))
    result = model.load_state_dict(sd, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{ckpt_dir}: unexpected tensors {result.unexpected_keys[:5]}")
    # save_pretrained leaves out tensors tied to others (the LM head tied to the embeddings).
    tied = {name for name, _ in _tied_names(model)}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: missing tensors {missing[:5]}")


def _missing_adapter_keys(model: nn.Module, result: Any, had_prompt_table: bool) -> list[str]:
    """Trainable tensors of a PEFT model that loading left at their init values (PEFT
    loads a prompt table apart and still lists its encoder as missing)."""
    missing = set(getattr(result, "missing_keys", []) or [])
    return [name for name, p in unwrap(model).named_parameters()
            if p.requires_grad and name in missing
            and not (had_prompt_table and name.startswith("prompt_encoder."))]


def _tied_names(model: nn.Module) -> list[tuple[str, str]]:
    """(name, name of the first parameter sharing its storage) for every shared parameter."""
    seen: dict[int, str] = {}
    out = []
    for name, param in model.named_parameters(remove_duplicate=False):
        key = param.data_ptr()
        if key in seen:
            out.append((name, seen[key]))
        else:
            seen[key] = name
    return out


def _load_partial(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return missing


def adalora_state(model: nn.Module) -> dict[str, Any]:
    """What AdaLoRA needs to resume exactly: unpruned adapter tensors and allocator scores."""
    inner = unwrap(model)
    allocator = inner.base_model.rankallocator
    return {
        "trainable": {n: p.detach().cpu().clone()
                      for n, p in inner.named_parameters() if p.requires_grad},
        "allocator": {k: {n: t.detach().cpu().clone() for n, t in getattr(allocator, k).items()}
                      for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")},
        "rank_pattern": inner.peft_config["default"].rank_pattern,
    }


# ---------------------------------------------------------------------------------------
# Whole checkpoints
# ---------------------------------------------------------------------------------------


def save(out_dir: str, *, model: nn.Module, method: str, state: dict[str, Any],
         optimizer_state: dict[str, Any], scheduler_state: dict[str, Any],
         model_state: dict[str, torch.Tensor] | None = None,
         prompt_format: dict[str, Any] | None = None) -> None:
    """Write a complete checkpoint into out_dir (rank 0), with the run's prompt format
    when given. `checkpoint.json` goes last."""
    os.makedirs(out_dir, exist_ok=True)
    save_model(model, out_dir, method, model_state)
    if prompt_format is not None:
        write_prompt_format(out_dir, PromptFormat.from_dict(prompt_format))
    torch.save(optimizer_state, os.path.join(out_dir, OPTIMIZER_FILE))
    torch.save(scheduler_state, os.path.join(out_dir, SCHEDULER_FILE))
    torch.save(state, os.path.join(out_dir, STATE_FILE))
    files = {}
    for root, _dirs, names in os.walk(out_dir):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, out_dir)] = os.path.getsize(path)
    index = {"step": state.get("step"), "method": method, "files": files,
             "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_text(os.path.join(out_dir, INDEX_FILE), json.dumps(index, indent=2))


def verify(ckpt_dir: str) -> dict[str, Any]:
    """The checkpoint's index after checking every listed file is there, whole."""
    index_path = os.path.join(ckpt_dir, INDEX_FILE)
    if not os.path.exists(index_path):
        raise CheckpointError(f"{ckpt_dir}: no {INDEX_FILE}; the checkpoint is incomplete")
    index = json.loads(storage.read_text(index_path))
    for rel, size in index["files"].items():
        path = os.path.join(ckpt_dir, rel)
        if not os.path.exists(path):
            raise CheckpointError(f"{ckpt_dir}: {rel} is missing; the checkpoint is incomplete")
        if os.path.getsize(path) != size:
            raise CheckpointError(
                f"{ckpt_dir}: {rel} has {os.path.getsize(path)} bytes, expected {size}; "
                "the checkpoint is incomplete"
            )
    return index


def _complete(ckpt_dir: str) -> dict[str, Any] | None:
    """The index of a local or s3 checkpoint directory whose files are all there, whole.

    A missing or malformed file makes the checkpoint incomplete (None). A store that does
    not answer is an error: taking it for "no checkpoint" would start the run over."""
    index_path = storage.join(ckpt_dir, INDEX_FILE)
    try:
        index = json.loads(storage.read_text(index_path))
        for rel, size in index["files"].items():
            if storage.size(storage.join(ckpt_dir, *rel.split(os.sep))) != size:
                return None
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError,
            AttributeError):
        return None  # missing locally, or an index that is not what save() writes
    except Exception as e:  # noqa: BLE001 - narrowed to "not found" answers below
        if _missing_on_s3(e):
            return None
        raise
    return index


def _missing_on_s3(e: Exception) -> bool:
    """A botocore ClientError that says the key does not exist."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return False
    return str(response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound")


CHECKPOINT_PREFIX = "checkpoint_"


def find_latest(run_dir: str) -> tuple[int, str] | None:
    """(step, path) of the newest complete checkpoint under a run dir, or None."""
    names = [n for n in storage.listdir(run_dir)
             if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit()]
    for name in sorted(names, key=lambda n: int(n[len(CHECKPOINT_PREFIX):]), reverse=True):
        path = storage.join(run_dir, name)
        index = _complete(path)
        if index is not None:
            return int(index.get("step") or int(name[len(CHECKPOINT_PREFIX):])), path
    return None


@contextlib.contextmanager
def local_dir(path: str) -> Iterator[str]:
    """A local directory holding a (local or s3) checkpoint."""
    if not storage.is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ift-resume-") as tmp:
        yield storage.download_dir(path, tmp)


def load_state(ckpt_dir: str) -> dict[str, Any]:
    """training_state.pt of a verified checkpoint."""
    verify(ckpt_dir)
    return torch.load(os.path.join(ckpt_dir, STATE_FILE), map_location="cpu", weights_only=True)


def load_optimizer_states(ckpt_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    opt = torch.load(os.path.join(ckpt_dir, OPTIMIZER_FILE), map_location="cpu",
                     weights_only=True)
    sched = torch.load(os.path.join(ckpt_dir, SCHEDULER_FILE), map_location="cpu",
                       weights_only=True)
    return opt, sched


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                    strategy: str) -> dict[str, Any]:
    """The optimizer state to save. FSDP gathers a full one (a collective: all ranks call)."""
    if strategy != "fsdp":
        return optimizer.state_dict()

    return fsdp.optimizer_state_dict(model, optimizer)


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                      state: dict[str, Any], strategy: str) -> None:
    if strategy != "fsdp":
        optimizer.load_state_dict(state)
        return

    fsdp.load_optimizer_state_dict(model, optimizer, state)


# ---------------------------------------------------------------------------------------
# The final model
# ---------------------------------------------------------------------------------------


def save_final(run_dir: str, *, model: nn.Module, method: str, tokenizer=None,
               model_state: dict[str, torch.Tensor] | None = None,
               lineage: dict[str, Any] | None = None,
               prompt_format: dict[str, Any] | None = None) -> str:
    """Write <run_dir>/final/: adapter (PEFT format) or HF model, plus the tokenizer, the
    lineage record (ift_lineage.json, stamped with the time final/ is written) and the
    prompt format (ift_prompt_format.json; the tokenizer's chat_template is its jinja). All
    of it is in place before the _COMPLETE marker, so a complete final/ has its lineage."""
    dest = storage.join(run_dir, FINAL_DIR)
    fmt = PromptFormat.from_dict(prompt_format) if prompt_format is not None else None
    with tempfile.TemporaryDirectory(prefix="ift-final-") as tmp:
        save_model(model, tmp, method, model_state)
        if fmt is not None:
            write_prompt_format(tmp, fmt)
        if tokenizer is not None:
            if fmt is not None:
                tokenizer = copy.copy(tokenizer)
                tokenizer.chat_template = fmt.chat_template
            tokenizer.save_pretrained(tmp)
        if lineage is not None:
            record = {**lineage, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            storage.write_text(os.path.join(tmp, LINEAGE_FILE),
                               json.dumps(record, indent=2, ensure_ascii=False))
        storage.write_text(os.path.join(tmp, storage.COMPLETE_MARKER), method)
        publish_dir(tmp, dest)
    return dest


def publish_dir(local: str, dest: str) -> None:
    """Replace dest with a copy of local, never leaving a mix of old and new files.

    Local: copy next to dest, then swap by rename. s3: delete, then upload with the marker
    last (readers check the marker).
    """
    if storage.is_remote(dest):
        storage.rmtree(dest)
        storage.upload_dir(local, dest)
        return
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".stage-", dir=parent)
    shutil.copytree(local, stage, dirs_exist_ok=True)
    old = None
    if os.path.exists(dest):
        old = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.rmdir(old)
        os.replace(dest, old)
    os.replace(stage, dest)
    if old:
        shutil.rmtree(old, ignore_errors=True)
