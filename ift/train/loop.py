"""The per-worker training loop, and the pure pieces it is made of.

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
each micro-batch's summed token loss is divided by the global count of trainable tokens
(all-reduced before the forward passes), times num_workers because DDP averages gradients.
So gradients do not depend on how tokens are spread over micro-batches and workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ift import storage
from ift.config import Config, ConfigError, TrainConfig, build_config
from ift.eval import during
from ift.train import checkpoint, fsdp, methods, preference
from ift.train.collate import (
    IGNORE_INDEX,
    collate,
    input_tokens,
    model_inputs,
    trainable_tokens,
)
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
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=train.lr)
    return torch.optim.AdamW(groups, lr=train.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, plan: Plan):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

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


def _all_reduce(values: list[float], world_size: int, device: torch.device) -> list[float]:
    if world_size <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _autocast(env: StepEnv):
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
    global_trainable, global_tokens = _all_reduce(local, env.world_size, env.device)
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
            with _autocast(env):
                if env.objective is not None:
                    loss, sums = env.objective.loss(model, inputs)
                    add_sums(pref_sums, sums)
                else:
                    loss = model(**inputs, num_items_in_batch=denom, use_cache=False).loss
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
    (loss_total,) = _all_reduce([float(loss_sum)], env.world_size, env.device)
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
    return dict(zip(keys, _all_reduce([sums[k] for k in keys], world_size, device)))


def _clip(model: nn.Module, optimizer: torch.optim.Optimizer, env: StepEnv) -> float:
    limit = env.max_grad_norm if env.max_grad_norm > 0 else float("inf")
    if env.strategy == "fsdp" and hasattr(model, "clip_grad_norm_"):
        norm = model.clip_grad_norm_(limit)
    else:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
    return float(norm)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed next-token cross entropy, trainable tokens) of one batch. Logits may carry
    extra leading positions (virtual tokens of prompt methods): the last T are used."""
    t = labels.shape[1]
    logits = logits[:, -t:, :].float()
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return float(loss), int((shift_labels != IGNORE_INDEX).sum())


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
        with _autocast(env):
            out = target(**inputs, use_cache=False)
        s, n = token_loss_sum(out.logits, labels)
        if batch.get("_weight", 1) == 0:
            continue  # a filler batch run only to keep FSDP ranks in step
        loss_sum += s
        count += n
    if was_training:
        target.train()
    loss_sum, count = _all_reduce([loss_sum, float(count)], env.world_size, env.device)
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


# ---------------------------------------------------------------------------------------
# Model setup on a worker
# ---------------------------------------------------------------------------------------


def load_dtype(cfg: Config) -> str:
    """Weights dtype: full and freeze keep fp32 master weights unless a dtype is forced
    (AdamW updates in bf16 lose most of their precision); autocast does the fast math."""
    if cfg.model.dtype == "auto" and cfg.peft.method in ("full", "freeze"):
        return "fp32"
    return cfg.model.dtype


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or train.mixed_precision == "no":
        return None
    if train.mixed_precision == "bf16":
        return torch.bfloat16
    if train.mixed_precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def wrap(model: nn.Module, train: TrainConfig, device: torch.device | None = None, *,
         adapter: bool = True) -> nn.Module:
    """DDP (replicated, through Ray's prepare_model) or FSDP (sharded, ift.train.fsdp: the
    same construction on GPU and on CPU with gloo)."""
    import ray.train.torch

    if train.strategy == "fsdp":
        device = device if device is not None else ray.train.torch.get_device()
        return fsdp.wrap(model, train, device, adapter=adapter,
                         amp=autocast_dtype(train, device))
    return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp",
                                         parallel_strategy_kwargs={"find_unused_parameters": False})


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def _log(rank: int, msg: str) -> None:
    # Straight to the process's stdout (Ray streams it to the driver): Ray Train patches
    # print() on workers to also log through the root logger, which shows lines twice.
    if rank == 0:
        out = sys.__stdout__ or sys.stdout
        out.write(f"[ift train] {msg}\n")
        out.flush()


def _quiet_ray_train_logs() -> None:
    # Ray Train logs every report at INFO from a logger named after its source file; the
    # progress line already says what it would.
    import logging

    suffix = os.path.join("train", "v2", "_internal", "execution", "context.py")
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(suffix):
            logging.getLogger(name).setLevel(logging.WARNING)


def _write_pid(run_dir: str, rank: int) -> None:
    # Lets an operator (or a fault-injection test) find a worker's process.
    if storage.is_remote(run_dir):
        return
    d = os.path.join(run_dir, PID_DIR)
    os.makedirs(d, exist_ok=True)
    storage.write_text(os.path.join(d, f"rank{rank}.pid"), str(os.getpid()))


def _batches_of(rows: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function. `config` carries the resolved job config ("cfg"), the
    plan ("plan"), the run directory ("run_dir"), the MLflow run id ("run_id") and the
    lineage record final/ gets ("lineage")."""
    import ray.train
    import ray.train.torch

    from ift.models import load_model, load_tokenizer, resolve_dtype

    cfg = build_config(config["cfg"])
    plan = Plan(**config["plan"])
    run_dir: str = config["run_dir"]
    run_id: str = config.get("run_id") or ""
    train = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != plan.world_size:
        raise RuntimeError(f"planned for {plan.world_size} workers, running on {world}")
    _write_pid(run_dir, rank)
    if run_id and config.get("tracking_uri"):
        # The store the driver resolved (config, environment or the sqlite default).
        os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))

    # --- model -------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.name_or_path,
                               trust_remote_code=cfg.model.trust_remote_code,
                               revision=cfg.model.revision)
    torch.manual_seed(train.seed)  # identical adapter init on every rank
    # The dtype the worker's device calls for, wherever the weights are loaded first.
    model = load_model(cfg.model, device=fsdp.load_device(cfg, device, rank, world),
                       quantization=methods.quantization(cfg),
                       dtype=resolve_dtype(load_dtype(cfg), str(device)))
    model = (methods.from_adapter(model, cfg) if cfg.model.adapter
             else methods.build(model, cfg, plan.total_steps))
    trainable, total = methods.parameter_counts(model)
    objective = preference.objective_for(cfg, model, plan, lambda: load_model(
        cfg.model, device=str(device), quantization=methods.quantization(cfg),
        dtype=load_dtype(cfg)))

    state: dict[str, Any] | None = None
    opt_state = sched_state = None
    found = _find_resume_point(run_dir, rank, world)
    if found is not None:
        with checkpoint.local_dir(found[1]) as d:
            state = checkpoint.load_state(d)
            check_resumable(state, plan, cfg, found[1])
            if not fsdp.on_meta(model):  # a meta rank receives rank 0's weights at wrap
                checkpoint.load_model_weights(d, model, cfg.peft.method, state)
            opt_state, sched_state = checkpoint.load_optimizer_states(d)
        _log(rank, f"resuming from step {state['step']} of {found[1]} (epoch "
                   f"{state['epoch']}, {state['rows_consumed_per_worker'][0]} rows per worker "
                   "already consumed in it)")

    decay = decay_names(model)
    model = wrap(model, train, device, adapter=methods.is_adapter(cfg.peft.method))
    optimizer = make_optimizer(model, train, decay)
    scheduler = make_scheduler(optimizer, train, plan)
    if state is not None:
        checkpoint.restore_optimizer(model, optimizer, opt_state, train.strategy)
        scheduler.load_state_dict(sched_state)
        rngs = state.get("rng") or []
        if len(rngs) == world:
            checkpoint.set_rng_state(rngs[rank])
    else:
        torch.manual_seed(train.seed + rank)  # dropout streams differ per rank

    amp = autocast_dtype(train, device)
    env = StepEnv(
        method=cfg.peft.method, device=device,
        attn_implementation=getattr(methods.unwrap(model).config, "_attn_implementation", None),
        dtype=next(p.dtype for p in model.parameters() if p.is_floating_point()),
        autocast_dtype=amp,
        scaler=fsdp.grad_scaler(train.strategy, amp),
        max_grad_norm=train.max_grad_norm, world_size=world, strategy=train.strategy,
        objective=objective,
    )
    make_batch = preference.collate_pairs if objective is not None else collate
    pad_id = tokenizer.pad_token_id
    _log(rank, f"{cfg.peft.method}: {trainable:,} trainable of {total:,} parameters "
               f"({100.0 * trainable / max(total, 1):.3f}%)")
    _log(rank, f"global batch = micro {plan.micro_batch_size} × workers {world} × accum "
               f"{plan.grad_accum} = {plan.global_batch_size} rows; {plan.steps_per_epoch} "
               f"steps per epoch, {plan.total_steps} steps")

    # --- data --------------------------------------------------------------------------
    import ray.data

    _quiet_ray_train_logs()
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_shard = ray.train.get_dataset_shard("train")
    val_batches: list[dict[str, torch.Tensor]] | None = None

    def eval_batches() -> list[dict[str, torch.Tensor]]:
        nonlocal val_batches
        if val_batches is None:
            val_batches = _val_batches(cfg, plan, rank, world, pad_id, make_batch)
        return val_batches

    probe = during.Probe.create(cfg, tokenizer, rank)  # eval.during_training (None: off)
    metrics_log = MetricsLog(run_dir) if rank == 0 else None
    resumed_from = state["step"] if state else 0
    step = resumed_from
    start = last_report = time.time()
    steps_done = 0
    while step < plan.total_steps:
        epoch = step // plan.steps_per_epoch
        epoch_end = min((epoch + 1) * plan.steps_per_epoch, plan.total_steps)
        order = epoch_order(plan.num_rows, train.seed, epoch)
        needed = epoch_rows_needed(plan, rank, order, step, epoch_end)
        t_load = time.time()
        rows, _n = collect_rows(
            train_shard.iter_batches(batch_size=1024, batch_format="numpy"),
            needed, expected_rows=plan.num_rows)
        _log(rank, f"epoch {epoch}: {len(rows)} rows for steps {step + 1}..{epoch_end} "
                   f"streamed in {time.time() - t_load:.1f}s")
        while step < epoch_end:
            t0 = time.time()
            micro = [make_batch([rows[int(i)] for i in order[pos]], pad_id, packed=plan.packed)
                     for pos in step_slots(plan, rank, step)]
            result = train_step(model, optimizer, scheduler, micro, env, step + 1)
            step += 1
            steps_done += 1
            dt = max(time.time() - t0, 1e-9)
            metrics: dict[str, Any] = {
                "step": step,
                "epoch": step / plan.steps_per_epoch,
                "loss": result["loss"],
                "lr": result["lr"],
                "grad_norm": result["grad_norm"],
                "tokens_per_s": result["tokens"] / dt,
                "trainable_tokens_per_s": result["trainable_tokens"] / dt,
                "global_batch_size": plan.global_batch_size,
                "resumed_from": resumed_from,
                **{k: result[k] for k in preference.METRIC_KEYS if k in result},
            }
            final = step == plan.total_steps
            if plan.num_val_rows and ((train.eval_every and step % train.eval_every == 0)
                                      or final):
                metrics.update(evaluate(model, eval_batches(), env) if objective is None
                               else preference.evaluate(model, eval_batches(), env))
            heldout_due = probe is not None and probe.due(step, plan.total_steps)
            if heldout_due:
                metrics.update(probe.run(methods.unwrap(model), device))
            if not math.isfinite(result["loss"]):
                raise FloatingPointError(f"loss is {result['loss']} at step {step}")
            want_ckpt = final or (train.checkpoint_every and step % train.checkpoint_every == 0)
            # Rank 0's clock decides for every rank (all must report the same times).
            due = _agree(rank == 0 and time.time() - last_report >= train.report_interval_s,
                         world, device)

            if rank == 0:
                metrics_log.append({**metrics, "time": time.time()})
                if run_id:
                    _track(run_id, metrics, step)
                if step % max(train.log_every, 1) == 0 or final:
                    _log(rank, progress_line(step, plan.total_steps, metrics,
                                             time.time() - start, steps_done))
            if want_ckpt:
                _report_checkpoint(model, optimizer, scheduler, cfg, plan, step, rank, world,
                                   metrics, metrics_log, run_dir, tokenizer, final,
                                   lineage=config.get("lineage"),
                                   prompt_format=config.get("prompt_format"))
                last_report = time.time()
            elif due or "eval_loss" in metrics or heldout_due:
                ray.train.report(metrics)
                last_report = time.time()


_TRACKING_WARNED = False


def _track(run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Log a step's metrics to MLflow; a tracking outage costs metrics, not the run."""
    global _TRACKING_WARNED
    from ift import tracking

    try:
        tracking.log_metrics(run_id, {k: v for k, v in metrics.items()
                                      if k not in ("step", "resumed_from")}, step)
    except Exception as e:  # noqa: BLE001 - any store error
        if not _TRACKING_WARNED:
            _log(0, f"warning: MLflow logging failed ({e}); training goes on, metrics.jsonl "
                    "keeps every step")
            _TRACKING_WARNED = True


def _agree(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when it is true on any."""
    if world <= 1:
        return flag
    return _all_reduce([1.0 if flag else 0.0], world, device)[0] > 0


def _find_resume_point(run_dir: str, rank: int, world: int) -> tuple[int, str] | None:
    """The newest complete checkpoint of the run, chosen by rank 0 for every rank.

    Ray's get_checkpoint() would miss a checkpoint that was uploaded but not yet recorded
    when a worker died (see ift.train.checkpoint); the run dir holds every complete one,
    including the one Ray restores.
    """
    import ray.train

    found = checkpoint.find_latest(run_dir) if rank == 0 else None
    if rank == 0:
        known = ray.train.get_checkpoint()
        if known is not None and found is None:
            raise RuntimeError(f"Ray restored checkpoint {known.path}, but no complete "
                               f"checkpoint is in {run_dir}")
    if world > 1:
        import torch.distributed as dist

        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    return found


def check_resumable(state: dict[str, Any], plan: Plan, cfg: Config, where: str) -> None:
    if state.get("method") != cfg.peft.method:
        raise ConfigError(
            f"cannot resume: checkpoint {where} was trained with peft.method="
            f"{state.get('method')}, this run asks for {cfg.peft.method}; use another "
            "train.run_name"
        )
    if state.get("objective", cfg.train.objective) != cfg.train.objective:
        raise ConfigError(
            f"cannot resume: checkpoint {where} was trained with train.objective="
            f"{state['objective']}, this run asks for {cfg.train.objective}; use "
            "another train.run_name"
        )
    if state.get("global_batch_size") != plan.global_batch_size:
        raise ConfigError(
            f"cannot resume: checkpoint {where} used a global batch of "
            f"{state.get('global_batch_size')} rows, this run has {plan.global_batch_size} "
            "(micro_batch_size × num_workers × grad_accum); keep it or use another run_name"
        )
    if plan.data_hash and state.get("data_hash") and state["data_hash"] != plan.data_hash:
        raise ConfigError(
            f"cannot resume: checkpoint {where} was trained on prepared data "
            f"{state['data_hash'][:12]}, train.data now holds {plan.data_hash[:12]}; "
            "use another train.run_name"
        )


def _report_checkpoint(model, optimizer, scheduler, cfg: Config, plan: Plan, step: int,
                       rank: int, world: int, metrics: dict[str, Any],
                       metrics_log: MetricsLog | None, run_dir: str, tokenizer,
                       final: bool, lineage: dict[str, Any] | None = None,
                       prompt_format: dict[str, Any] | None = None) -> None:
    import ray.train
    import torch.distributed as dist

    strategy = cfg.train.strategy
    # Collectives first (every rank): FSDP gathers, and rank 0 collects RNG states.
    model_state = checkpoint.full_state_dict(model, strategy, cfg.peft.method)
    opt_state = checkpoint.optimizer_state(model, optimizer, strategy)
    rngs = [checkpoint.rng_state()]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    epoch, in_epoch = divmod(step, plan.steps_per_epoch)
    rows_per_worker = in_epoch * plan.micro_batch_size * plan.grad_accum
    state = {
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": in_epoch,
        "rows_consumed_per_worker": [rows_per_worker] * world,
        "rows_consumed": in_epoch * plan.global_batch_size,
        "global_batch_size": plan.global_batch_size,
        "world_size": world,
        "total_steps": plan.total_steps,
        "seed": cfg.train.seed,
        "method": cfg.peft.method,
        "objective": cfg.train.objective,
        "data_hash": plan.data_hash,
        "rng": rngs,
    }
    if cfg.peft.method == "adalora":
        state["adalora"] = checkpoint.adalora_state(model)
    name = f"checkpoint_{step:07d}"
    if rank == 0:
        if metrics_log is not None:
            metrics_log.flush()
        if final:
            checkpoint.save_final(run_dir, model=model, method=cfg.peft.method,
                                  tokenizer=tokenizer, model_state=model_state,
                                  lineage=lineage, prompt_format=prompt_format)
        with tempfile.TemporaryDirectory(prefix="ift-ckpt-") as tmp:
            checkpoint.save(tmp, model=model, method=cfg.peft.method, state=state,
                            optimizer_state=opt_state, scheduler_state=scheduler.state_dict(),
                            model_state=model_state, prompt_format=prompt_format)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)
    else:
        ray.train.report(metrics, checkpoint_dir_name=name)


def _val_batches(cfg: Config, plan: Plan, rank: int, world: int, pad_id: int,
                 make_batch=collate) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the evaluation rows, collated.

    The evaluation set is the first eval_max_batches × micro_batch_size val rows, whatever
    the worker count (so runs on different cluster sizes report comparable eval losses);
    rank r scores rows i with i mod world == r. FSDP ranks get equal batch counts.
    """
    import ray.train

    shard = ray.train.get_dataset_shard("val")
    micro = plan.micro_batch_size
    limit = min(plan.num_val_rows, cfg.train.eval_max_batches * micro)
    rows, _ = collect_rows(shard.iter_batches(batch_size=1024, batch_format="numpy"),
                           None, limit=limit)
    mine = [rows[i] for i in sorted(rows) if i % world == rank]
    batches = [make_batch(chunk, pad_id, packed=plan.packed)
               for chunk in _batches_of(mine, micro)]
    if cfg.train.strategy == "fsdp":
        n_batches = math.ceil(math.ceil(limit / world) / micro)
        while len(batches) < n_batches:
            filler = dict(make_batch([next(iter(rows.values()))], pad_id, packed=plan.packed))
            filler["_weight"] = 0
            batches.append(filler)
    return batches
