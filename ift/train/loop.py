"""The pure pieces of a training run: the plan, the data order, the optimizer and
schedule, one step, one evaluation and the metrics file (no Ray; the per-worker loop
that runs them is ift.train.worker).

Data order. An optimizer step consumes one *global batch* of G = micro_batch_size ×
num_workers × grad_accum rows. Epoch e visits the train rows in the order
`epoch_order(num_rows, seed, e)` (a permutation that depends only on seed and epoch);
global batch b of the epoch is positions [b·G, (b+1)·G) of that order, cut into
micro-batch slots of micro_batch_size rows; slot j goes to worker j mod num_workers as its
accumulation micro-batch j div num_workers. So the rows of a step do not depend on how
they are spread over workers (1 worker × accum 2 trains on the same rows as 2 workers ×
accum 1), and a step number alone fixes the data position: resuming at step s skips
exactly the rows of steps < s. The last G-incomplete part of each epoch is left out so
every worker takes the same number of steps.

The driver reads the train split into Ray's object store once, in file order; every
epoch, each worker iterates it whole with `get_dataset_shard("train")` (the dataset is not
split among workers) and keeps the rows its slots name, buffering its share of the epoch:
rows / num_workers token lists.

Reporting. metrics.jsonl and MLflow get every step (from rank 0); `ray.train.report` is
called at evaluations, checkpoints and at most every train.report_interval_s otherwise,
because each report waits for Ray's controller to collect the previous one.

Loss. The loss of a step is the mean over every trainable token of the global batch:
each micro-batch's summed token loss (ift.train.loss, which evaluation uses too) is divided
by the global count of trainable tokens (all-reduced before the forward passes), times
num_workers because DDP averages gradients.
So gradients do not depend on how tokens are spread over micro-batches and workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from ift import storage
from ift.config import ConfigError, TrainConfig
from ift.eval import during
from ift.train import fsdp, methods
from ift.train.collate import (
    input_tokens,
    model_inputs,
    trainable_tokens,
)
from ift.train.loss import next_token_loss, token_loss_sum
from ift.train.preference import PAIR_COLUMNS, add_sums, means
from ift.train.ref_logps import REF_COLUMNS

METRICS_FILE = "metrics.jsonl"
PID_DIR = "worker_pids"


# ---------------------------------------------------------------------------------------
# The plan: how many steps, which rows
# ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything about the run's shape that the driver works out before workers start."""

    num_rows: int
    """Rows in the train split."""
    num_val_rows: int
    """Rows in the val split."""
    world_size: int
    """Workers."""
    micro_batch_size: int
    """Rows per worker per forward pass."""
    grad_accum: int
    """Micro-batches per worker per optimizer step."""
    steps_per_epoch: int
    """Optimizer steps in one pass over the train rows."""
    total_steps: int
    """Optimizer steps of the whole run."""
    warmup_steps: int
    """Linear warmup steps of the LR schedule."""
    packed: bool = False
    """Rows are packed bins (position_ids, seq_ids)."""
    data_hash: str = ""
    """The prepared dataset's manifest hash (a resumed run must train on the same data)."""
    pairs: bool = False
    """Rows are preference pairs (the rejected side in rejected_input_ids/rejected_labels)."""
    ref_logps: str = ""
    """DPO: the folder of precomputed reference log-probs (ift.train.ref_logps) the rows
    carry; empty: the reference model runs on the worker."""

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size * self.grad_accum


def make_plan(num_rows: int, num_val_rows: int, train: TrainConfig, *, packed: bool = False,
              data_hash: str = "") -> Plan:
    """Steps per epoch and in total; a ConfigError when one step needs more rows than exist."""
    g = train.global_batch_size
    if num_rows < g:
        raise ConfigError(
            f"train.micro_batch_size={train.micro_batch_size} × train.num_workers="
            f"{train.num_workers} × train.grad_accum={train.grad_accum} = {g} rows per "
            f"optimizer step, but the train split has only {num_rows} rows; lower them"
        )
    steps_per_epoch = num_rows // g
    if train.max_steps > 0:
        total = train.max_steps
    else:
        total = max(1, math.ceil(train.epochs * steps_per_epoch - 1e-9))
    warmup = train.warmup_steps if train.warmup_steps > 0 else math.ceil(train.warmup_ratio * total)
    return Plan(
        num_rows=num_rows, num_val_rows=num_val_rows, world_size=train.num_workers,
        micro_batch_size=train.micro_batch_size, grad_accum=train.grad_accum,
        steps_per_epoch=steps_per_epoch, total_steps=total, warmup_steps=min(warmup, total),
        packed=packed, data_hash=data_hash,
    )


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of an epoch: a permutation determined by (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def step_slots(plan: Plan, rank: int, step: int) -> list[np.ndarray]:
    """Epoch positions of this worker's micro-batches at a global step (one array per
    accumulation micro-batch)."""
    b = step % plan.steps_per_epoch
    base = b * plan.global_batch_size
    out = []
    for a in range(plan.grad_accum):
        slot = a * plan.world_size + rank
        start = base + slot * plan.micro_batch_size
        out.append(np.arange(start, start + plan.micro_batch_size))
    return out


def epoch_rows_needed(plan: Plan, rank: int, order: np.ndarray, first_step: int,
                      last_step: int) -> set[int]:
    """Row indices this worker reads for global steps [first_step, last_step) of one epoch."""
    needed: set[int] = set()
    for s in range(first_step, last_step):
        for positions in step_slots(plan, rank, s):
            needed.update(int(i) for i in order[positions])
    return needed


ROW_COLUMNS = ("id", "input_ids", "labels", "position_ids", "seq_ids", *PAIR_COLUMNS,
               *REF_COLUMNS)


def collect_rows(batches: Iterable[dict[str, Any]], needed: set[int] | None,
                 expected_rows: int | None = None, limit: int | None = None
                 ) -> tuple[dict[int, dict[str, Any]], int]:
    """Keep the rows whose running index is in `needed` (all when None) from a stream of
    columnar batches; returns (rows by index, rows seen). Stops early after `limit` rows."""
    rows: dict[int, dict[str, Any]] = {}
    index = 0
    for batch in batches:
        cols = [c for c in ROW_COLUMNS if c in batch]
        n = len(batch["input_ids"])
        for j in range(n):
            i = index + j
            if limit is not None and i >= limit:
                return rows, i
            if needed is None or i in needed:
                rows[i] = {c: batch[c][j] if c == "id" or c in REF_COLUMNS else _ints(batch[c][j])
                           for c in cols}
        index += n
    if expected_rows is not None and index != expected_rows:
        raise RuntimeError(
            f"the train split streamed {index} rows but its manifest says {expected_rows}; "
            "the prepared dataset changed under the run"
        )
    return rows, index


def _ints(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.int64)


# ---------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------


def decay_names(model: nn.Module) -> set[str]:
    """Names of the trainable tensors that get weight decay: matrices, not biases and norms
    (1-D). Taken before FSDP wraps the model, whose parameters are then 1-D shard views."""
    return {fsdp.clean_name(name) for name, param in methods.unwrap(model).named_parameters()
            if param.requires_grad and param.dim() >= 2}


def make_optimizer(model: nn.Module, train: TrainConfig,
                   decay_by_name: set[str] | None = None) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norms (1-D tensors).
    `decay_by_name` is `decay_names` of the model before wrapping (default: now)."""
    names = decay_names(model) if decay_by_name is None else decay_by_name
    decay, no_decay = [], []
    for name, param in methods.unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        (decay if fsdp.clean_name(name) in names else no_decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters")
    groups = [g for g in (
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ) if g["params"]]
    if train.optimizer == "adamw_8bit":
        import bitsandbytes as bnb  # optional: only the 8-bit optimizer needs it

        return bnb.optim.AdamW8bit(groups, lr=train.lr)
    return torch.optim.AdamW(groups, lr=train.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, plan: Plan):
    if train.scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)
    if train.scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)
    return get_constant_schedule_with_warmup(optimizer, plan.warmup_steps)


# ---------------------------------------------------------------------------------------
# One step, one evaluation
# ---------------------------------------------------------------------------------------


@dataclass
class StepEnv:
    """What a training step needs besides the model and the data."""

    method: str = "lora"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    attn_implementation: str | None = "sdpa"
    dtype: torch.dtype = torch.float32
    """Dtype of the model's weights (masks for eager attention are built in it)."""
    autocast_dtype: torch.dtype | None = None
    """bf16/fp16 autocast on GPU; None: no autocast."""
    scaler: Any = None
    """torch.amp.GradScaler for fp16."""
    max_grad_norm: float = 1.0
    world_size: int = 1
    strategy: str = "ddp"
    objective: Any = None
    """A preference objective (ift.train.preference.Objective); None: the model's own
    next-token loss."""


def all_reduce(values: list[float], world_size: int, device: torch.device) -> list[float]:
    if world_size <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def step_autocast(env: StepEnv):
    if env.autocast_dtype is None or env.device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=env.autocast_dtype)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               micro_batches: Sequence[dict[str, torch.Tensor]], env: StepEnv,
               step: int) -> dict[str, float]:
    """Forward/backward over this worker's micro-batches, clip, one optimizer step.

    `step` is the 1-based number of the step being taken (AdaLoRA's budget schedule reads
    it). Returns loss (mean over the global batch's trainable tokens), grad_norm, lr and
    global token counts.
    """
    model.train()
    local = [float(sum(trainable_tokens(b["labels"]) for b in micro_batches)),
             float(sum(input_tokens(b) for b in micro_batches))]
    global_trainable, global_tokens = all_reduce(local, env.world_size, env.device)
    # Sum of token losses / global token count × world: DDP's gradient mean then gives
    # the exact mean over every trainable token of the global batch.
    denom = max(global_trainable, 1.0) / env.world_size
    lr = optimizer.param_groups[0]["lr"]
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    ddp = hasattr(model, "no_sync") and env.world_size > 1 and env.strategy == "ddp"
    pref_sums: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if (last or not ddp) else model.no_sync()
        inputs = model_inputs(batch, attn_implementation=env.attn_implementation,
                              dtype=env.dtype, device=env.device)
        with sync:
            with step_autocast(env):
                if env.objective is not None:
                    loss, sums = env.objective.loss(model, inputs)
                    add_sums(pref_sums, sums)
                else:
                    labels = inputs.pop("labels")
                    logits = model(**inputs, use_cache=False).logits
                    loss = next_token_loss(logits, labels)[0] / denom
                    del logits
            if env.scaler is not None:
                env.scaler.scale(loss).backward()
            else:
                loss.backward()
        loss_sum += loss.detach().double()
    if env.scaler is not None:
        env.scaler.unscale_(optimizer)
    grad_norm = _clip(model, optimizer, env)
    if env.scaler is not None:
        env.scaler.step(optimizer)
        env.scaler.update()
    else:
        optimizer.step()
    methods.after_optimizer_step(model, env.method, step)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    (loss_total,) = all_reduce([float(loss_sum)], env.world_size, env.device)
    result = {
        "loss": loss_total / env.world_size,
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens": global_tokens,
        "trainable_tokens": global_trainable,
    }
    if env.objective is not None:
        result.update(means(reduce_sums(pref_sums, env.world_size, env.device)))
    return result


def reduce_sums(sums: dict[str, float], world_size: int, device: torch.device
                ) -> dict[str, float]:
    """A dict of per-rank sums summed over every rank (same keys on every rank)."""
    keys = sorted(sums)
    return dict(zip(keys, all_reduce([sums[k] for k in keys], world_size, device)))


def _clip(model: nn.Module, optimizer: torch.optim.Optimizer, env: StepEnv) -> float:
    limit = env.max_grad_norm if env.max_grad_norm > 0 else float("inf")
    if env.strategy == "fsdp" and hasattr(model, "clip_grad_norm_"):
        norm = model.clip_grad_norm_(limit)
    else:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
    return float(norm)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], env: StepEnv
             ) -> dict[str, float]:
    """Mean token loss and perplexity over the batches of every worker.

    DDP: each rank scores its batches on the unwrapped model (no collectives), then sums
    are all-reduced. FSDP: forward passes are collectives, so every rank must run the
    same number of them; the caller gives each rank the same count.
    """
    target = model if env.strategy == "fsdp" else methods.unwrap(model)
    was_training = target.training
    target.eval()
    loss_sum, count = 0.0, 0
    for batch in batches:
        inputs = model_inputs(batch, attn_implementation=env.attn_implementation,
                              dtype=env.dtype, device=env.device)
        labels = inputs.pop("labels")
        with step_autocast(env):
            out = target(**inputs, use_cache=False)
        s, n = token_loss_sum(out.logits, labels)
        if batch.get("_weight", 1) == 0:
            continue  # a filler batch run only to keep FSDP ranks in step
        loss_sum += s
        count += n
    if was_training:
        target.train()
    loss_sum, count = all_reduce([loss_sum, float(count)], env.world_size, env.device)
    if count == 0:
        return {}
    loss = loss_sum / count
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
            "eval_tokens": count}


# ---------------------------------------------------------------------------------------
# Metrics file (rank 0)
# ---------------------------------------------------------------------------------------


class MetricsLog:
    """<run dir>/metrics.jsonl: one JSON line per step, appended as steps finish (local),
    or rewritten whole at flush points (s3, which cannot append).

    Lines are never rewritten locally: after a restart the steps since the last checkpoint
    run again and appear again, each line carrying the step it resumed from.
    `read_metrics` keeps the latest line per step.
    """

    def __init__(self, run_dir: str) -> None:
        self.path = storage.join(run_dir, METRICS_FILE)
        self.remote = storage.is_remote(self.path)
        self.lines: list[str] = []
        if self.remote and storage.exists(self.path):
            self.lines = storage.read_text(self.path).splitlines()

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, sort_keys=True)
        if self.remote:
            self.lines.append(line)
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def flush(self) -> None:
        if self.remote:
            storage.write_text(self.path, "\n".join(self.lines) + "\n")


def read_metrics(run_dir: str, *, latest_per_step: bool = True) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl; by default the latest row of each step, in order."""
    path = storage.join(run_dir, METRICS_FILE)
    if not storage.exists(path):
        return []
    rows = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    if not latest_per_step:
        return rows
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def progress_line(step: int, total: int, metrics: dict[str, float], elapsed: float,
                  steps_done: int) -> str:
    rate = elapsed / max(steps_done, 1)
    eta = rate * (total - step)
    parts = [f"step {step}/{total}", f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}",
             f"{metrics.get('tokens_per_s', 0):,.0f} tok/s"]
    if "rewards/accuracy" in metrics:
        parts.append(f"acc {metrics['rewards/accuracy']:.2f} margin "
                     f"{metrics['rewards/margin']:.3f}")
    if "eval_loss" in metrics:
        parts.append(f"eval_loss {metrics['eval_loss']:.4f}")
    if "eval_rewards/accuracy" in metrics:
        parts.append(f"eval_acc {metrics['eval_rewards/accuracy']:.2f}")
    if during.progress_text(metrics):
        parts.append(during.progress_text(metrics))
    parts.append(f"ETA {_hms(eta)}")
    return " | ".join(parts)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
