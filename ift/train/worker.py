"""The Ray Train worker entry: `train_loop_per_worker` sets up the model on its device
(load, PEFT method, FSDP or DDP wrap), restores a checkpoint, and runs the steps of
ift.train.loop, reporting to metrics.jsonl, MLflow and Ray Train and checkpointing as it
goes. The data order, the loss and the reporting cadence are described in
ift.train.loop.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from ift import storage, tracking
from ift.config import ConfigError, ModelConfig, PeftConfig, TrainConfig, build_config
from ift.eval import during
from ift.models import load_model, load_tokenizer, resolve_dtype
from ift.train import checkpoint, fsdp, methods, preference
from ift.train.collate import (
    collate,
)
from ift.train.loop import (
    PID_DIR,
    MetricsLog,
    Plan,
    StepEnv,
    all_reduce,
    collect_rows,
    decay_names,
    epoch_order,
    epoch_rows_needed,
    evaluate,
    make_optimizer,
    make_scheduler,
    progress_line,
    step_slots,
    train_step,
)

# ---------------------------------------------------------------------------------------
# Model setup on a worker
# ---------------------------------------------------------------------------------------


def load_dtype(model: ModelConfig, peft: PeftConfig) -> str:
    """Weights dtype: full and freeze keep fp32 master weights unless a dtype is forced
    (AdamW updates in bf16 lose most of their precision); autocast does the fast math."""
    if model.dtype == "auto" and peft.method in ("full", "freeze"):
        return "fp32"
    return model.dtype


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
    model = load_model(cfg.model, device=fsdp.load_device(train, device, rank, world,
                                                          adapter=cfg.model.adapter),
                       quantization=methods.quantization(cfg.peft),
                       dtype=resolve_dtype(load_dtype(cfg.model, cfg.peft), str(device)))
    if cfg.model.adapter:
        model = methods.from_adapter(
            model, cfg.model.adapter, gradient_checkpointing=train.gradient_checkpointing,
            reference=train.objective == "dpo" and not train.precompute_ref_logps)
    else:
        model = methods.build(model, cfg.peft, plan.total_steps,
                              tokenizer=cfg.model.name_or_path,
                              trust_remote_code=cfg.model.trust_remote_code,
                              gradient_checkpointing=train.gradient_checkpointing)
    trainable, total = methods.parameter_counts(model)
    objective = preference.objective_for(
        train, model, plan, lambda: load_model(
            cfg.model, device=str(device), quantization=methods.quantization(cfg.peft),
            dtype=load_dtype(cfg.model, cfg.peft)),
        method=cfg.peft.method, adapter=cfg.model.adapter)

    state: dict[str, Any] | None = None
    opt_state = sched_state = None
    found = _find_resume_point(run_dir, rank, world)
    if found is not None:
        with checkpoint.local_dir(found[1]) as d:
            state = checkpoint.load_state(d)
            check_resumable(state, plan, cfg.peft, train, found[1])
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
    if objective is not None:
        make_batch = preference.collate_pairs
    else:  # sft; on preference pairs, on their chosen sides
        # Packed masks are built on the device, in model_inputs.
        make_batch = (preference.collate_chosen if plan.pairs
                      else functools.partial(collate, mask_4d=False))
    pad_id = tokenizer.pad_token_id
    _log(rank, f"{cfg.peft.method}: {trainable:,} trainable of {total:,} parameters "
               f"({100.0 * trainable / max(total, 1):.3f}%)")
    _log(rank, f"global batch = micro {plan.micro_batch_size} × workers {world} × accum "
               f"{plan.grad_accum} = {plan.global_batch_size} rows; {plan.steps_per_epoch} "
               f"steps per epoch, {plan.total_steps} steps")

    # --- data --------------------------------------------------------------------------
    _quiet_ray_train_logs()
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_shard = ray.train.get_dataset_shard("train")
    val_batches: list[dict[str, torch.Tensor]] | None = None

    def eval_batches() -> list[dict[str, torch.Tensor]]:
        nonlocal val_batches
        if val_batches is None:
            val_batches = _val_batches(train, plan, rank, world, pad_id, make_batch)
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
                _report_checkpoint(model, optimizer, scheduler, train, cfg.peft, plan, step,
                                   rank, world,
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
    return all_reduce([1.0 if flag else 0.0], world, device)[0] > 0


def _find_resume_point(run_dir: str, rank: int, world: int) -> tuple[int, str] | None:
    """The newest complete checkpoint of the run, chosen by rank 0 for every rank.

    Ray's get_checkpoint() would miss a checkpoint that was uploaded but not yet recorded
    when a worker died (see ift.train.checkpoint); the run dir holds every complete one,
    including the one Ray restores.
    """
    found = checkpoint.find_latest(run_dir) if rank == 0 else None
    if rank == 0:
        known = ray.train.get_checkpoint()
        if known is not None and found is None:
            raise RuntimeError(f"Ray restored checkpoint {known.path}, but no complete "
                               f"checkpoint is in {run_dir}")
    if world > 1:
        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    return found


def check_resumable(state: dict[str, Any], plan: Plan, peft: PeftConfig, train: TrainConfig,
                    where: str) -> None:
    """A ConfigError when a checkpoint's method, objective, global batch or data differ
    from this run's."""
    if state.get("method") != peft.method:
        raise ConfigError(
            f"cannot resume: checkpoint {where} was trained with peft.method="
            f"{state.get('method')}, this run asks for {peft.method}; use another "
            "train.run_name"
        )
    if state.get("objective", train.objective) != train.objective:
        raise ConfigError(
            f"cannot resume: checkpoint {where} was trained with train.objective="
            f"{state['objective']}, this run asks for {train.objective}; use "
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


def _report_checkpoint(model, optimizer, scheduler, train: TrainConfig, peft: PeftConfig,
                       plan: Plan, step: int,
                       rank: int, world: int, metrics: dict[str, Any],
                       metrics_log: MetricsLog | None, run_dir: str, tokenizer,
                       final: bool, lineage: dict[str, Any] | None = None,
                       prompt_format: dict[str, Any] | None = None) -> None:
    strategy = train.strategy
    # Collectives first (every rank): FSDP gathers, and rank 0 collects RNG states.
    model_state = checkpoint.full_state_dict(model, strategy, peft.method)
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
        "seed": train.seed,
        "method": peft.method,
        "objective": train.objective,
        "data_hash": plan.data_hash,
        "rng": rngs,
    }
    if peft.method == "adalora":
        state["adalora"] = checkpoint.adalora_state(model)
    name = f"checkpoint_{step:07d}"
    if rank == 0:
        if metrics_log is not None:
            metrics_log.flush()
        if final:
            checkpoint.save_final(run_dir, model=model, method=peft.method,
                                  tokenizer=tokenizer, model_state=model_state,
                                  lineage=lineage, prompt_format=prompt_format)
        with tempfile.TemporaryDirectory(prefix="ift-ckpt-") as tmp:
            checkpoint.save(tmp, model=model, method=peft.method, state=state,
                            optimizer_state=opt_state, scheduler_state=scheduler.state_dict(),
                            model_state=model_state, prompt_format=prompt_format)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)
    else:
        ray.train.report(metrics, checkpoint_dir_name=name)


def _val_batches(train: TrainConfig, plan: Plan, rank: int, world: int, pad_id: int,
                 make_batch=collate) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the evaluation rows, collated.

    The evaluation set is the first eval_max_batches × micro_batch_size val rows, whatever
    the worker count (so runs on different cluster sizes report comparable eval losses);
    rank r scores rows i with i mod world == r. FSDP ranks get equal batch counts.
    """
    shard = ray.train.get_dataset_shard("val")
    micro = plan.micro_batch_size
    limit = min(plan.num_val_rows, train.eval_max_batches * micro)
    rows, _ = collect_rows(shard.iter_batches(batch_size=1024, batch_format="numpy"),
                           None, limit=limit)
    mine = [rows[i] for i in sorted(rows) if i % world == rank]
    batches = [make_batch(chunk, pad_id, packed=plan.packed)
               for chunk in _batches_of(mine, micro)]
    if train.strategy == "fsdp":
        n_batches = math.ceil(math.ceil(limit / world) / micro)
        while len(batches) < n_batches:
            filler = dict(make_batch([next(iter(rows.values()))], pad_id, packed=plan.packed))
            filler["_weight"] = 0
            batches.append(filler)
    return batches
