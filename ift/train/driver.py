"""`ift train`: check everything that can be checked before a worker starts, then run Ray
Train's TorchTrainer and collect the results in the run directory.

The run directory <train.output>/<train.run_name>/ holds

    checkpoint_NNNNNNN/   Ray Train's checkpoints (CheckpointConfig.num_to_keep of them)
    final/                the final adapter (PEFT format) or HF model, with the tokenizer
                          and ift_lineage.json (data, run, MLflow run: see ift.lineage)
    metrics.jsonl         one line per optimizer step
    config.yaml           the resolved job config
    run.json              run name, MLflow run id, status, data hash, final path
    loss_curve.png        train (and eval) loss against step
    worker_pids/          the PID of each worker process (local run directories)

Re-running the same command resumes: Ray Train restores the run's checkpoint list from
the same storage_path/name, the workers load the latest checkpoint, and the data order
(a function of seed and epoch) puts them at the same rows. The MLflow run continues too.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import asdict
from functools import partial
from typing import Any

import ray
import ray.data
import ray.train
import torch
import yaml
from ray.data import ExecutionOptions
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from transformers import AutoConfig, AutoModelForCausalLM

from ift import lineage, storage, tracking
from ift.artifacts import ADAPTER_CONFIG, CONFIG_FILE, FINAL_DIR, RUN_FILE
from ift.config import (
    Config,
    ConfigError,
    ModelConfig,
    PeftConfig,
    TrainConfig,
    load_config,
)
from ift.data.dataset import PREFERENCE, PrepareError, read_manifest, split_files
from ift.data.templates import prompt_format
from ift.eval.during import check_config
from ift.lineage import parent_adapter_record
from ift.models import find_lora_targets, load_tokenizer, tokenizer_identity
from ift.raycluster import init_ray
from ift.train import fsdp, methods, multinode
from ift.train.checkpoint import STATE_FILE, find_latest
from ift.train.collate import block_causal_mask, model_inputs
from ift.train.loop import Plan, make_plan, read_metrics
from ift.train.preference import PAIR_COLUMNS
from ift.train.ref_logps import attach, lookup, precompute
from ift.train.worker import check_resumable, load_dtype, train_loop_per_worker

LOSS_PNG = "loss_curve.png"


class TrainError(RuntimeError):
    """Training started but did not finish (a worker failed more than max_failures times)."""


# ---------------------------------------------------------------------------------------
# Checks before any worker starts
# ---------------------------------------------------------------------------------------


def prepared_dir(cfg: Config) -> str:
    path = cfg.train.data or cfg.data.output
    if not path:
        raise ConfigError("train.data: no prepared dataset given (and data.output is empty)")
    return cfg.resolve(path)


def read_prepared(path: str) -> dict[str, Any]:
    """The manifest of a complete prepared dataset, or a ConfigError naming what is wrong."""
    try:
        manifest = read_manifest(path)
    except PrepareError as e:
        raise ConfigError(f"train.data={path}: {e}") from e
    for key in ("max_seq_len", "packed"):
        if key not in manifest:
            raise ConfigError(f"train.data={path}: manifest.json has no {key!r}")
    if not manifest["splits"].get("train", {}).get("rows"):
        raise ConfigError(f"train.data={path}: the train split is empty")
    return manifest


def _model_config(model: ModelConfig):
    path = model.name_or_path
    if not path:
        raise ConfigError("model.name_or_path is required")
    local = storage.local_copy(path) if storage.is_remote(path) else path
    try:
        return AutoConfig.from_pretrained(local, trust_remote_code=model.trust_remote_code,
                                          revision=model.revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path={path}: cannot read its config ({e})") from e


def max_positions(model_config) -> int | None:
    """Longest sequence the model's position embeddings cover (None: no limit, e.g. ALiBi)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def preflight(cfg: Config, manifest: dict[str, Any], prepared: str) -> Plan:
    """Every check that needs no worker: data, tokenizer, batch shape, method, targets."""
    method = cfg.peft.method  # a choice PeftConfig has checked
    # The tokenizer the data was encoded with must be the model's.
    tok_path = cfg.model.name_or_path
    tokenizer = load_tokenizer(storage.local_copy(tok_path) if storage.is_remote(tok_path)
                               else tok_path, trust_remote_code=cfg.model.trust_remote_code,
                               revision=cfg.model.revision)
    ours = tokenizer_identity(tokenizer)
    theirs = manifest.get("tokenizer") or {}
    if ours["sha256"] != theirs.get("sha256"):
        raise ConfigError(
            f"tokenizer mismatch: {prepared} was tokenized with "
            f"{theirs.get('name_or_path')!r} ({theirs.get('class')}, vocab "
            f"{theirs.get('vocab_size')}, sha256 {str(theirs.get('sha256'))[:12]}), but "
            f"model.name_or_path={cfg.model.name_or_path!r} has {ours['class']} with vocab "
            f"{ours['vocab_size']} (sha256 {ours['sha256'][:12]}); re-run `ift data prepare` "
            "with this model's tokenizer"
        )

    model_config = _model_config(cfg.model)
    limit = max_positions(model_config)
    seq_len = int(manifest["max_seq_len"])
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"{prepared}: manifest max_seq_len={seq_len} exceeds the model's "
            f"{limit} positions ({cfg.model.name_or_path}); prepare with "
            f"data.max_seq_len <= {limit}"
        )
    packed = bool(manifest["packed"])
    if packed and not methods.accepts_packed(method):
        raise ConfigError(
            f"peft.method={method} cannot train on packed data ({prepared} has packed=true): "
            "virtual-token methods need a plain padding mask, not the block mask that keeps "
            "packed samples apart; prepare with data.pack=false or use lora/dora/full"
        )

    splits = manifest["splits"]
    plan = make_plan(int(splits["train"]["rows"]), int(splits.get("val", {}).get("rows", 0)),
                     cfg.train, packed=packed, data_hash=str(manifest.get("hash", "")))
    plan.pairs = check_objective(cfg, manifest, prepared)

    # Method checks on a weightless copy of the architecture.
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model_config,
                                                trust_remote_code=cfg.model.trust_remote_code)
    if packed:
        _probe_packed(meta, cfg.model)
    if method in methods.LORA_METHODS:
        find_lora_targets(meta, cfg.peft.target_modules)
    if method == "freeze":
        n = len(methods.decoder_layers(meta))
        if not 1 <= cfg.peft.freeze_trainable_layers <= n:
            raise ConfigError(
                f"peft.freeze_trainable_layers={cfg.peft.freeze_trainable_layers}: the model "
                f"has {n} layers (allowed: 1..{n})"
            )
    if method == "adalora":
        methods.check_adalora_schedule(methods.AdaLoraOptions.of(cfg.peft), plan.total_steps)
    methods.check_quantizable(model_config, cfg.peft, cfg.train.use_gpu)
    fsdp.check(cfg.peft, cfg.train)
    if cfg.train.eval_every and not plan.num_val_rows:
        print(f"[ift train] note: {prepared} has no val rows; evaluation is skipped", flush=True)
    if cfg.eval.during_training.max_samples:
        check_config(cfg.peft, cfg.train)  # before any worker starts
    return plan


def _probe_packed(meta_model, model: ModelConfig) -> None:
    """Packed rows need a model whose attention takes a 4D mask (most current ones do;
    ALiBi models such as BLOOM build their biases from a 2D mask and cannot). A forward
    pass on the weightless model checks it without computing anything."""
    impl = model.attn_implementation or ""
    if impl.startswith("flash"):
        return  # flash kernels split packed samples by position ids, no mask involved
    seq = torch.tensor([[0, 0, 1, 1]])
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long),
             "attention_mask": block_causal_mask(seq),
             "position_ids": torch.tensor([[0, 1, 0, 1]])}
    inputs = model_inputs(batch, attn_implementation=meta_model.config._attn_implementation,
                          device="meta")
    try:
        meta_model(**inputs, use_cache=False)
    except Exception as e:  # noqa: BLE001 - any failure means the model cannot take it
        raise ConfigError(
            f"{model.name_or_path} ({type(meta_model).__name__}) cannot train on packed "
            f"data: its attention does not take the 4D block mask that keeps packed samples "
            f"apart ({type(e).__name__}: {e}); prepare with data.pack=false"
        ) from e


# ---------------------------------------------------------------------------------------
# Ray pieces
# ---------------------------------------------------------------------------------------


def _datasets(prepared: str, plan: Plan) -> dict[str, Any]:
    """Ray datasets over the train and val parquet shards, read in file order and
    materialized in the object store before the workers start.

    Every worker streams the whole split once per epoch (see ift.train.loop), so the
    files are read once here instead of once per worker and epoch; and reading needs CPUs
    that the training workers may hold all of on a small machine (Ray Data's file listing
    and read tasks each reserve one), so it happens before they take them.
    """
    cols = ["id", "input_ids", "labels"]
    if plan.pairs:  # a pair row is packed with the others of its micro-batch when batched
        cols += list(PAIR_COLUMNS)
    elif plan.packed:
        cols += ["position_ids", "seq_ids"]
    ctx = ray.data.DataContext.get_current()
    keep = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    out = {}
    try:
        for split in ("train", "val"):
            files = split_files(prepared, split)
            if not files:
                if split == "train":
                    raise ConfigError(f"train.data={prepared}: no parquet files under train/")
                continue
            fs, _ = storage.arrow_fs(files[0])
            paths = [storage.arrow_fs(f)[1] for f in files]
            ds = ray.data.read_parquet(paths, filesystem=fs, columns=cols)
            if plan.ref_logps:
                ds = ds.map_batches(partial(attach, table=lookup(plan.ref_logps, split)),
                                    batch_format="numpy")
            ds = ds.materialize()
            ds.context.enable_progress_bars = False
            rows = ds.count()
            expected = plan.num_rows if split == "train" else plan.num_val_rows
            if rows != expected:
                raise ConfigError(
                    f"train.data={prepared}: {split}/ holds {rows} rows but manifest.json "
                    f"says {expected}; the prepared dataset is inconsistent, prepare it again"
                )
            out[split] = ds
    finally:
        ctx.execution_options.preserve_order = keep
    return out


def check_objective(cfg: Config, manifest: dict[str, Any], prepared: str) -> bool:
    """Whether the prepared rows are preference pairs; a ConfigError when train.objective
    or model.adapter do not fit the data or the method."""
    pairs = manifest.get("kind") == PREFERENCE
    objective = cfg.train.objective
    if objective != "sft" and not pairs:
        raise ConfigError(
            f"train.objective={objective} needs preference pairs, but {prepared} holds "
            "conversations; prepare pair sources with data.kind=preference")
    if cfg.model.adapter:
        if cfg.peft.method not in ("lora", "dora"):
            raise ConfigError(f"model.adapter={cfg.model.adapter!r} continues a LoRA adapter: "
                              f"use peft.method=lora or dora, not {cfg.peft.method}")
        config = storage.join(cfg.model.adapter, ADAPTER_CONFIG)
        if not storage.exists(config):
            raise ConfigError(f"model.adapter={cfg.model.adapter!r}: no adapter_config.json "
                              "there (expected a run's final/ adapter directory)")
    return pairs


def _storage(output: str) -> tuple[str, Any]:
    """RunConfig storage_path and filesystem for a local or s3:// output directory."""
    if storage.is_remote(output):
        fs, inner = storage.arrow_fs(output)
        return inner, fs
    return os.path.abspath(output), None


def _check_resources(t: TrainConfig) -> None:
    have = ray.cluster_resources()
    need_cpu = t.num_workers * t.cpus_per_worker
    if need_cpu > have.get("CPU", 0):
        print(f"[ift train] warning: {t.num_workers} workers × {t.cpus_per_worker} CPUs = "
              f"{need_cpu} CPUs but the cluster has {have.get('CPU', 0)}; workers wait until "
              "the cluster grows", flush=True)
    if t.use_gpu and t.num_workers * t.gpus_per_worker > have.get("GPU", 0):
        print(f"[ift train] warning: {t.num_workers} GPU workers but the cluster has "
              f"{have.get('GPU', 0)} GPUs", flush=True)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def resume_point(cfg: Config, plan: Plan, run_dir: str) -> tuple[int, str] | None:
    """The checkpoint a re-run will resume from, checked against this run's shape (data,
    global batch, method) before any worker starts; None for a fresh run."""
    found = find_latest(run_dir)
    if found is None:
        return None
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(found[1], STATE_FILE))),
                       map_location="cpu", weights_only=True)
    check_resumable(state, plan, cfg.peft, cfg.train, found[1])
    return found


def lineage_record(cfg: Config, manifest: dict[str, Any], prepared: str, run_dir: str,
                   run_id: str, tracking_uri: str) -> dict[str, Any]:
    """What final/ift_lineage.json says (ift.lineage.training_record); a re-mixed dataset's
    parent manifest fills in source files the re-mix does not carry."""
    parent = None
    up = manifest.get("parent")
    if isinstance(up, dict) and up.get("path"):
        try:
            parent = read_manifest(up["path"])
        except PrepareError:
            parent = None  # the re-mix's own source entries still name the files
    return lineage.training_record(
        manifest=manifest, parent_manifest=parent, prepared=lineage.absolute(prepared),
        run_dir=lineage.absolute(run_dir), run_name=cfg.train.run_name,
        method=cfg.peft.method, base_model=cfg.model.name_or_path, mlflow_run_id=run_id,
        tracking_uri=tracking_uri,
        config_path=lineage.absolute(storage.join(run_dir, CONFIG_FILE)),
        artifact="adapter" if methods.is_adapter(cfg.peft.method) else "model")


def prompt_format_record(cfg: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """The prompt format every adapter and final model of the run records
    (ift.artifacts.PromptFormat): the template the prepared data was rendered with."""
    tok_path = cfg.model.name_or_path
    tokenizer = load_tokenizer(storage.local_copy(tok_path) if storage.is_remote(tok_path)
                               else tok_path, trust_remote_code=cfg.model.trust_remote_code,
                               revision=cfg.model.revision)
    return prompt_format(manifest.get("template") or cfg.data.template, tokenizer).to_dict()


def _storage_hint(run_dir: str) -> str:
    """For a run directory on S3: the endpoint it was written through, and how to go on."""
    if not storage.is_remote(run_dir):
        return ""
    return (f"\n  the run directory {run_dir} is on S3 at "
            f"{storage.endpoint_url() or 'the default AWS endpoint'}; if that store was "
            "unreachable, run the same command again once it answers: the run resumes from "
            "its last complete checkpoint")


def run_dir_of(cfg: Config) -> str:
    return storage.join(cfg.resolve(cfg.train.output), cfg.train.run_name)


def train(cfg: Config, *, address: str | None = None, callbacks: list | None = None,
          parent_run_id: str | None = None) -> dict[str, Any]:
    """Fine-tune as configured; resumes the run of the same name. Returns the summary.

    `callbacks` are Ray Train callbacks for the RunConfig (e.g. Tune's report callback
    when a sweep runs this inside a trial); `parent_run_id` nests the MLflow run.
    """
    prepared = prepared_dir(cfg)
    manifest = read_prepared(prepared)
    plan = preflight(cfg, manifest, prepared)

    output = cfg.resolve(cfg.train.output)
    run_dir = run_dir_of(cfg)
    resume = resume_point(cfg, plan, run_dir)
    done = finished_run(cfg, plan, run_dir, resume)
    if done is not None:
        print(f"[ift train] run {cfg.train.run_name} already finished "
              f"({done['steps']}/{plan.total_steps} steps): {done['final']}", flush=True)
        return done
    init_ray(address)
    tracking_uri = (tracking.resolve_uri(cfg.tracking, cfg.storage.root)
                    if cfg.tracking.enabled else "")
    multinode.check_shared_storage(
        cfg.storage, cfg.model.name_or_path, multinode.alive_nodes(), prepared=prepared,
        output=output, tracking_uri=tracking_uri)
    storage.makedirs(run_dir)
    run_file = storage.join(run_dir, RUN_FILE)
    previous = storage.read_json(run_file)
    storage.write_text(storage.join(run_dir, CONFIG_FILE),
                       yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))

    run_id = ""
    if cfg.tracking.enabled:
        run_id = tracking.start_run(cfg.tracking, cfg.storage.root, cfg.train.run_name,
                                    run_id=previous.get("mlflow_run_id") or None,
                                    parent_run_id=parent_run_id or None,
                                    tags={"ift.command": "train", "ift.method": cfg.peft.method,
                                          "ift.run_dir": run_dir,
                                          "ift.data_hash": plan.data_hash,
                                          "ift.objective": cfg.train.objective})
        tracking.log_params(run_id, {
            "model": asdict(cfg.model), "peft": asdict(cfg.peft), "train": asdict(cfg.train),
            "data": {"prepared": prepared, "hash": plan.data_hash,
                     "template": manifest.get("template"), "max_seq_len": manifest["max_seq_len"],
                     "packed": manifest["packed"],
                     "sources": {k: {"weight": v.get("weight"), "count": v.get("count"),
                                     "tags": v.get("tags")}
                                 for k, v in (manifest.get("sources") or {}).items()}},
            "plan": {**asdict(plan), "global_batch_size": plan.global_batch_size},
        })
    info = {
        **previous,
        "run_name": cfg.train.run_name,
        "run_dir": run_dir,
        "prepared": prepared,
        "data_hash": plan.data_hash,
        "method": cfg.peft.method,
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri,
        "status": "RUNNING",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "global_batch_size": plan.global_batch_size,
        "total_steps": plan.total_steps,
    }
    storage.write_text(run_file, json.dumps(info, indent=2))
    record = lineage_record(cfg, manifest, prepared, run_dir, run_id, tracking_uri)
    record["objective"] = cfg.train.objective
    if cfg.model.adapter:
        record["parent_adapter"] = parent_adapter_record(cfg.model.adapter)
    print(f"[ift train] run {cfg.train.run_name}: {plan.num_rows} train rows, global batch "
          f"{plan.micro_batch_size} × {plan.world_size} workers × {plan.grad_accum} accum = "
          f"{plan.global_batch_size}, {plan.total_steps} steps -> {run_dir}", flush=True)

    if resume is not None:
        print(f"[ift train] resuming {cfg.train.run_name} from step {resume[0]} ({resume[1]})",
              flush=True)
    init_ray(address)
    _check_resources(cfg.train)
    storage_path, filesystem = _storage(output)
    t = cfg.train
    if t.objective == "dpo" and t.precompute_ref_logps:
        plan.ref_logps = precompute(cfg.model, t, prepared, plan.data_hash,
                                    load_dtype(cfg.model, cfg.peft))
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "plan": asdict(plan), "run_dir": run_dir,
                           "run_id": run_id, "tracking_uri": tracking_uri,
                           "lineage": record,
                           "prompt_format": prompt_format_record(cfg, manifest)},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=t.placement_strategy),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep or None),
            failure_config=FailureConfig(max_failures=t.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks or []),
        ),
        datasets=_datasets(prepared, plan),
        # Every worker reads the whole (small, tokenized) split and keeps the rows of its
        # slots, in file order: that is what makes the data order independent of Ray's
        # block scheduling (see ift.train.loop).
        dataset_config=DataConfig(datasets_to_split=[],
                                  execution_options=ExecutionOptions(preserve_order=True)),
    )
    started = time.time()
    status = "FAILED"
    try:
        result = trainer.fit()
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C: Ray Train aborts the run from its SIGINT handler and exits the process.
        status = "KILLED"
        raise
    except ray.train.TrainingFailedError as e:
        raise TrainError(f"training run {t.run_name} failed: {e}{_storage_hint(run_dir)}") from e
    finally:
        # MLflow first: `finished` in run.json then means the run is closed (a sweep that
        # stopped this trial marks it KILLED after that, ift.tune.driver).
        if status != "FINISHED" and run_id:
            try:
                tracking.end_run(run_id, status=status)
            except Exception as e:  # noqa: BLE001 - keep the error that ended the run
                print(f"[ift train] warning: could not mark MLflow run {run_id} {status}: "
                      f"{e}", flush=True)
        info.update(status=status,
                    finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        try:
            storage.write_text(run_file, json.dumps(info, indent=2))
        except Exception as e:  # noqa: BLE001 - the store may be what failed; keep that error
            if status == "FINISHED":
                raise
            print(f"[ift train] warning: could not record status {status} in {run_file}: "
                  f"{e}", flush=True)

    summary = _finish(cfg, run_dir, run_id, plan, time.time() - started, result)
    info.update(final=summary["final"], steps=summary["steps"],
                final_loss=summary.get("final_loss"), eval_loss=summary.get("eval_loss"))
    storage.write_text(run_file, json.dumps(info, indent=2))
    return summary


def _finish(cfg: Config, run_dir: str, run_id: str, plan: Plan, seconds: float,
            result) -> dict[str, Any]:
    history = read_metrics(run_dir)
    final_dir = storage.join(run_dir, FINAL_DIR)
    if not storage.is_complete(final_dir):
        raise TrainError(f"training finished but {final_dir} is missing or incomplete")
    with tempfile.TemporaryDirectory(prefix="ift-plot-") as tmp:
        png = tracking.loss_curve_png(history, os.path.join(tmp, LOSS_PNG))
        with open(png, "rb") as f:
            storage.write_bytes(storage.join(run_dir, LOSS_PNG), f.read())
        if run_id:
            tracking.log_artifact(run_id, png)
    if run_id:
        tracking.log_artifact(run_id, final_dir, "final")
        for name in ("metrics.jsonl", CONFIG_FILE):
            path = storage.join(run_dir, name)
            if storage.exists(path):
                tracking.log_artifact(run_id, path)
        tracking.end_run(run_id, status="FINISHED")
    summary = run_summary(cfg.train, cfg.peft, run_dir, plan, history, run_id, seconds,
                          getattr(getattr(result, "checkpoint", None), "path", None))
    print(summary_text(summary), flush=True)
    return summary


def run_summary(train: TrainConfig, peft: PeftConfig, run_dir: str, plan: Plan,
                history: list[dict[str, Any]], run_id: str, seconds: float,
                checkpoint: str | None) -> dict[str, Any]:
    """What `train` returns, from the run's metrics history."""
    last = history[-1] if history else {}
    evals = [r for r in history if r.get("eval_loss") is not None]
    return {
        "run_name": train.run_name,
        "run_dir": run_dir,
        "final": storage.join(run_dir, FINAL_DIR),
        "method": peft.method,
        "steps": int(last.get("step", 0)),
        "total_steps": plan.total_steps,
        "global_batch_size": plan.global_batch_size,
        "final_loss": last.get("loss"),
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_ppl": evals[-1].get("eval_ppl") if evals else None,
        "mlflow_run_id": run_id,
        "checkpoint": checkpoint,
        "seconds": seconds,
    }


def finished_run(cfg: Config, plan: Plan, run_dir: str,
                 resume: tuple[int, str] | None) -> dict[str, Any] | None:
    """The summary of a run that already reached its last step with a complete final/
    (its checkpoint checked against this config by resume_point), else None: re-running a
    finished run starts no workers."""
    if resume is None or resume[0] < plan.total_steps:
        return None
    info = storage.read_json(storage.join(run_dir, RUN_FILE))
    if info.get("status") != "FINISHED" or not storage.is_complete(
            storage.join(run_dir, FINAL_DIR)):
        return None
    return run_summary(cfg.train, cfg.peft, run_dir, plan, read_metrics(run_dir),
                       info.get("mlflow_run_id") or "", 0.0, resume[1])


def summary_text(s: dict[str, Any]) -> str:
    def num(v, fmt=".4f"):
        return "-" if v is None else format(v, fmt)

    lines = [
        f"run {s['run_name']} ({s['method']}): {s['steps']}/{s['total_steps']} steps, global "
        f"batch {s['global_batch_size']}, {s['seconds']:.0f}s this session",
        f"  final train loss {num(s['final_loss'])}  eval loss {num(s['eval_loss'])}  "
        f"eval ppl {num(s['eval_ppl'], '.2f')}",
        f"  run dir:  {s['run_dir']}",
        f"  final:    {s['final']}",
    ]
    if s.get("mlflow_run_id"):
        lines.append(f"  mlflow:   run {s['mlflow_run_id']}")
    return "\n".join(lines)


def train_cmd(args) -> int:
    """`ift train -c CONFIG k=v ...`."""
    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg, address=getattr(args, "address", None))
    except TrainError as e:
        print(f"ift train: {e}", flush=True)
        return 1
    return 0
