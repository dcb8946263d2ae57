"""Typed job configuration: one dataclass per section, YAML files plus dotted overrides.

A job reads one YAML file whose top-level keys are the sections below. Every field has a
docstring (the string literal after it), which `ift config` prints. Overrides on the
command line use dotted keys: `train.lr=1e-4 data.sources.0.weight=0.5`; values are parsed
as YAML scalars. Unknown keys and bad values raise ConfigError before any work starts,
naming the key, the value and what is allowed (with the closest valid key for typos).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ift.artifacts import bundled_path
from ift.data.templates import TEMPLATES

# ift.storage (pyarrow.fs) is imported where a path is resolved or read: the CLI imports
# this module, and at the top it would double `ift --help` (0.11 s -> 0.22 s).


class ConfigError(ValueError):
    """A configuration key or value is invalid. The message names the key."""


def _yaml_problem(e: Exception) -> str:
    """A YAML error on one line: what is wrong and where (line and column, 1-based)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


class InputError(ValueError):
    """An input file, directory or argument cannot be used. The message names the file
    (with the line, row or field where there is one) and what is wrong with it; the CLI
    prints it as one line, without a traceback."""


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


@dataclass
class SourceConfig:
    """One data source: a file, glob or folder, local or s3://."""

    path: str = ""
    """File, glob or folder, local or s3://bucket/key."""
    name: str = ""
    """Name used in the manifest and per-source shards; defaults to the file stem."""
    format: str = "auto"
    """One of auto, alpaca, alpaca_cot_multiturn, sharegpt, openai, moss, flan_cot_tsv, table;
    for data.kind=preference alpaca_pairs, sharegpt_pairs, hh_rlhf, messages_pairs,
    openai_preference. `auto` detects the format per file from its extension and first record."""
    weight: float | None = None
    """Sampling ratio over this source's kept rows: 1.0 keeps all, 0.5 samples half,
    2.5 repeats each row twice and samples half again (deterministic by seed)."""
    count: int | None = None
    """Fixed number of rows to draw from this source instead of a weight (up- or down-sampled)."""
    tags: list[str] = field(default_factory=list)
    """Free tags such as cot, zh, multiturn; sweeps include or exclude sources by tag."""
    columns: dict[str, str] = field(default_factory=dict)
    """For format=table (parquet/csv): maps record fields to column names, e.g.
    {instruction: question, output: answer} or {messages: dialog}. Also renames fields of
    JSON formats whose keys differ from the usual ones."""
    task: str = ""
    """Task label stored on each row (e.g. qa, cot, chat); defaults to the format's own."""
    system: str | None = None
    """A system prompt applied to rows of this source that carry none."""
    schema: str = ""
    """The IE formats (also values of `format`: duie, duee, cluener, ner_spans, ner_bio; see
    docs/ie.md) take a schema file, local, s3:// or @sample/: duie_schema.json, a DuEE event
    schema, or a JSON list / one-per-line file of entity types. Its labels are the instruction's candidates; rows with a predicate, event
    type, role or entity type outside it are rejected. Without it a row's own labels are used."""
    max_labels: int = 0
    """IE formats: most candidate labels one instruction lists (0: the whole schema). A larger
    schema lists the row's gold labels plus negatives sampled by seed, or is cut into chunks
    when schema_split is set."""
    schema_split: bool = False
    """IE formats: one record per chunk of max_labels schema labels instead of sampling
    (counted as rows_schema_chunks in the manifest)."""
    kind: Literal["auto", "sft", "preference"] = "auto"
    """What the source holds: sft conversations or preference pairs; auto reads it from
    the format (the pair layouts are preference). A source whose files are of the other
    kind is an error, and so is a preparation whose sources differ in kind."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("data.sources[].path is required")
        self.path = bundled_path(self.path)
        self.schema = bundled_path(self.schema)
        _check_literals(self, f"data.sources[{self.path}]")
        if self.max_labels < 0:
            raise ConfigError(f"data.sources[{self.path}].max_labels={self.max_labels}: "
                              "must be >= 0")
        if self.schema_split and self.max_labels == 0:
            raise ConfigError(f"data.sources[{self.path}].schema_split needs max_labels > 0 "
                              "(the chunk size)")
        if self.weight is not None and self.count is not None:
            raise ConfigError(
                f"data.sources[{self.path}]: give weight or count, not both "
                f"(weight={self.weight}, count={self.count})"
            )
        if self.weight is not None and self.weight < 0:
            raise ConfigError(f"data.sources[{self.path}].weight={self.weight}: must be >= 0")
        if self.count is not None and self.count < 0:
            raise ConfigError(f"data.sources[{self.path}].count={self.count}: must be >= 0")


FORMATS = (
    "auto",
    "alpaca",
    "alpaca_cot_multiturn",
    "sharegpt",
    "openai",
    "moss",
    "flan_cot_tsv",
    "table",
    # information extraction (ift.data.ie)
    "duie",
    "duee",
    "cluener",
    "ner_spans",
    "ner_bio",
)

PAIR_FORMATS = (
    "alpaca_pairs",
    "sharegpt_pairs",
    "hh_rlhf",
    "messages_pairs",
    "openai_preference",
)
"""Preference-pair layouts (data.kind=preference), converted by ift.data.preference."""
DATA_KINDS = ("auto", "sft", "preference")
"""What a source or a preparation holds (data.kind, data.sources[].kind)."""


@dataclass
class DataConfig:
    """`ift data prepare`: sources in, one tokenized, sharded collection out."""

    sources: list[SourceConfig] = field(default_factory=list)
    """The sources to read, each with path, format, weight or count, and tags."""
    output: str = "runs/data"
    """Prepared dataset directory (local or s3://). Relative paths sit under storage.root."""
    tokenizer: str = ""
    """HF tokenizer id or path; defaults to model.name_or_path."""
    template: str = "auto"
    """Chat template: auto (the tokenizer's own if it has one, else chatml), tokenizer,
    chatml, alpaca, human_assistant."""
    max_seq_len: int = 512
    """Samples are truncated to this many tokens; also the packing bin size."""
    truncation: Literal["right", "left"] = "right"
    """Which end to cut when a sample is too long (left keeps the latest turns)."""
    train_on_prompt: bool = False
    """Also train on system/user tokens (labels are -100 there by default)."""
    pack: bool = False
    """Pack samples into max_seq_len bins with per-sample position ids and sequence ids.
    Preference pairs stay one pair per row on disk; training packs each micro-batch's
    chosen and rejected sequences into one row without padding."""
    val_ratio: float = 0.05
    """Share of each source held out for validation, chosen by a hash of the row."""
    val_max_rows: int = 2000
    """Cap on validation rows per source."""
    dedupe: bool = True
    """Drop exact duplicates across all sources by a hash of the normalized conversation."""
    placeholders: dict[str, str] = field(default_factory=dict)
    """Values for {{name}} placeholders in the data (e.g. {name: ift, author: you})."""
    seed: int = 42
    """Seed for sampling, the train/val split and CoT template choice."""
    shard_rows: int = 20000
    """Most rows per output parquet shard (a cap, not a target: every read task writes its
    own shards, so that tasks never wait to be bundled into one)."""
    read_chunk_mb: int = 16
    """Line-based files (JSONL, TSV, CSV) are read in byte ranges of this size, in parallel."""
    num_cpus_per_task: float = 1.0
    """CPUs reserved by each Ray Data task."""
    batch_size: int = 1024
    """Rows per Ray Data batch during conversion and tokenization."""
    keep_reasoning: bool = True
    """Keep assistant reasoning (LLaMA-Factory `reasoning` parts) as a `<think>...</think>`
    block before the reply, trained with it; false drops the reasoning and keeps the reply."""
    kind: Literal["auto", "sft", "preference"] = "auto"
    """sft: conversations; preference: pairs of a prompt, a chosen and a rejected reply
    (formats alpaca_pairs, sharegpt_pairs, hh_rlhf, messages_pairs, openai_preference);
    auto: the kind of the sources (each source's `kind`, or its detected format), which
    must all be one kind."""

    def __post_init__(self) -> None:
        self.sources = [
            s if isinstance(s, SourceConfig) else _build(SourceConfig, s, f"data.sources.{i}")
            for i, s in enumerate(self.sources)
        ]
        for i, s in enumerate(self.sources):
            if s.format not in FORMATS + PAIR_FORMATS:
                raise ConfigError(_bad_choice(f"data.sources.{i}.format", s.format,
                                              FORMATS + PAIR_FORMATS))
        _check_choice("data.template", self.template, TEMPLATES)
        _check_literals(self, "data")
        if self.max_seq_len < 8:
            raise ConfigError(f"data.max_seq_len={self.max_seq_len}: must be >= 8")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ConfigError(f"data.val_ratio={self.val_ratio}: must be in [0, 1)")
        names = [s.name for s in self.sources if s.name]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"data.sources: duplicate source names {sorted(dup)}")


@dataclass
class ModelConfig:
    """The base model."""

    name_or_path: str = ""
    """HF hub id or local directory of a causal LM (e.g. from `ift model init-tiny`)."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Weights dtype: auto picks bf16 on GPUs that support it, else fp32."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off unless you trust the repository."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    attn_implementation: str | None = None
    """Attention kernel (eager, sdpa, flash_attention_2); None lets transformers choose."""
    adapter: str = ""
    """An existing LoRA adapter directory (local or s3://, e.g. an SFT run's final/) the
    policy starts from instead of a new adapter: a new run whose lineage names it. For
    train.objective=dpo the reference model is that adapter, frozen."""

    def __post_init__(self) -> None:
        _check_literals(self, "model")


PEFT_METHODS = (
    "lora",
    "qlora",
    "dora",
    "adalora",
    "prefix",
    "p_tuning",
    "prompt_tuning",
    "full",
    "freeze",
)


@dataclass
class PeftConfig:
    """The fine-tuning method and its knobs."""

    method: str = "lora"
    """One of lora, qlora, dora, adalora, prefix, p_tuning, prompt_tuning, full, freeze."""
    r: int = 8
    """LoRA rank (lora, qlora, dora; initial rank for adalora)."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Modules to adapt: all-linear (every attention and MLP projection, detected per
    architecture) or a list of module names such as [q_proj, v_proj]."""
    bits: Literal[4, 8] = 4
    """qlora: quantize the frozen base to 4-bit NF4 (double quantization) or 8-bit."""
    adalora_target_r: int = 4
    """adalora: average rank the budget is pruned down to."""
    adalora_tinit: int = 0
    """adalora: steps of warmup before rank pruning starts."""
    adalora_tfinal: int = 0
    """adalora: steps of final fine-tuning after pruning stops."""
    adalora_delta_t: int = 1
    """adalora: steps between budget allocations."""
    num_virtual_tokens: int = 16
    """prefix, p_tuning, prompt_tuning: number of virtual tokens."""
    encoder_hidden_size: int = 128
    """p_tuning: hidden size of the prompt encoder MLP."""
    prompt_init_text: str | None = None
    """prompt_tuning: initialize the soft prompt from this text instead of randomly."""
    freeze_trainable_layers: int = 2
    """freeze: train only the last k transformer layers (and the final norm)."""
    freeze_train_embeddings: bool = False
    """freeze: also train the input embeddings and LM head."""

    def __post_init__(self) -> None:
        _check_choice("peft.method", self.method, PEFT_METHODS)
        _check_literals(self, "peft")
        if self.r < 1:
            raise ConfigError(f"peft.r={self.r}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout={self.dropout}: must be in [0, 1)")
        if self.method == "adalora" and self.adalora_target_r > self.r:
            raise ConfigError(
                f"peft.adalora_target_r={self.adalora_target_r}: must be <= peft.r={self.r}"
            )


@dataclass
class TrainConfig:
    """`ift train`: Ray Train workers, optimization, checkpoints."""

    data: str = ""
    """Prepared dataset directory from `ift data prepare`; defaults to data.output."""
    run_name: str = "ift-run"
    """Run name: the run directory is <output>/<run_name>; re-running resumes it."""
    output: str = "runs/train"
    """Parent directory of run directories (local or s3://)."""
    num_workers: int = 1
    """Ray Train workers (one process each; one GPU each when use_gpu)."""
    use_gpu: bool = False
    """Put each worker on a GPU."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    gpus_per_worker: float = 1.0
    """GPUs per worker when use_gpu."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism: ddp (replicated model) or fsdp (sharded; on CPU it runs with gloo,
    a correctness path, not a fast one)."""
    micro_batch_size: int = 4
    """Sequences per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    epochs: float = 1.0
    """Passes over the training split (fractions allowed)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: derive from epochs)."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """adamw (torch) or adamw_8bit (bitsandbytes, GPU)."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = 0.03
    """Share of steps spent warming up linearly from 0."""
    warmup_steps: int = 0
    """Warmup steps; wins over warmup_ratio when > 0."""
    max_grad_norm: float = 1.0
    """Clip gradients to this global norm (0 disables)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast on GPU: auto picks bf16 where supported, else fp16; always off on CPU."""
    eval_every: int = 50
    """Evaluate on the val split every N optimizer steps (0: only at the end)."""
    eval_max_batches: int = 50
    """Evaluate on the first eval_max_batches × micro_batch_size val rows (spread over the
    workers, so the set does not depend on their number)."""
    checkpoint_every: int = 50
    """Save a checkpoint every N optimizer steps (0: only at the end)."""
    num_to_keep: int = 2
    """Checkpoints kept (oldest deleted first)."""
    max_failures: int = 0
    """Restarts of the worker group after a worker dies (-1: unlimited)."""
    log_every: int = 1
    """Print a progress line every N optimizer steps."""
    report_interval_s: float = 5.0
    """Send metrics to Ray Train at most this often, and at every evaluation, checkpoint and
    the last step (metrics.jsonl and MLflow get every step). Each report waits until Ray's
    controller has collected the previous one, which it polls for every 2 s, so reporting
    every step would hold training to one step per poll."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers on nodes (STRICT_SPREAD: one worker per node)."""
    seed: int = 42
    """Seed for init, dropout and data order. Each epoch visits the train rows in a full
    permutation drawn from (seed, epoch), which is what lets a resumed run find its data
    position."""
    objective: Literal["sft", "dpo", "simpo", "orpo"] = "sft"
    """sft (next-token loss on the replies), or a preference objective on a preference
    dataset (data.kind=preference): dpo, simpo (reference-free, length-normalised) or orpo
    (SFT loss on the chosen reply plus an odds-ratio term)."""
    beta: float = 0.1
    """dpo: inverse temperature of the implicit reward; simpo: reward scale; also the scale
    of the reported rewards of simpo and orpo."""
    label_smoothing: float = 0.0
    """dpo (sigmoid): assumed probability that a pair's preference label is flipped."""
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """dpo: the sigmoid (DPO) loss or the squared IPO loss."""
    simpo_gamma: float = 0.5
    """simpo: target reward margin gamma."""
    orpo_lambda: float = 0.1
    """orpo: weight lambda of the odds-ratio term beside the SFT loss."""
    precompute_ref_logps: bool = False
    """dpo (the other objectives have no reference): compute the reference model's
    log-probs of every pair once, in a Ray task before training, and keep them beside the
    prepared data (keyed by dataset hash, base model and reference adapter; reused by
    later runs): the workers then run no reference forward pass and hold no reference
    model."""

    def __post_init__(self) -> None:
        _check_literals(self, "train")
        for key in ("num_workers", "micro_batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)}: must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr}: must be > 0")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("train.epochs or train.max_steps must be > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        if self.optimizer == "adamw_8bit" and not self.use_gpu:
            raise ConfigError("train.optimizer=adamw_8bit needs train.use_gpu=true")
        if self.beta <= 0:
            raise ConfigError(f"train.beta={self.beta}: must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"train.label_smoothing={self.label_smoothing}: must be in [0, 0.5)")
        if self.orpo_lambda < 0:
            raise ConfigError(f"train.orpo_lambda={self.orpo_lambda}: must be >= 0")

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step across all workers."""
        return self.micro_batch_size * self.num_workers * self.grad_accum


@dataclass
class TuneConfig:
    """`ift tune`: the sweep over mixtures and hyperparameters."""

    name: str = "ift-sweep"
    """Sweep name: its directory is <output>/<name>; --resume continues it."""
    output: str = "runs/tune"
    """Parent directory of sweeps."""
    search: Literal["grid", "random"] = "grid"
    """grid expands every combination; random draws num_samples points."""
    num_samples: int = 1
    """Random search: points drawn; grid: repeats of the whole grid."""
    seeds: list[int] = field(default_factory=lambda: [42])
    """Each configuration is trained once per seed."""
    space: dict[str, Any] = field(default_factory=dict)
    """Search space: dotted config key -> list of values (grid) or {min, max, log} (random).
    Mixture axes: `mix.<source>` weights, or `exclude_tags` lists such as [[], [cot], [zh]]."""
    metric: str = "eval_loss"
    """Metric trials are compared on."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher `metric` is better."""
    scheduler: Literal["none", "asha"] = "asha"
    """asha stops poor trials early on eval loss."""
    grace_period: int = 1
    """ASHA: evaluations before a trial may be stopped."""
    reduction_factor: int = 2
    """ASHA: keep 1/reduction_factor of trials at each rung."""
    max_concurrent_trials: int = 1
    """Trials running at once (each takes train.num_workers workers)."""
    eval_after: bool = True
    """Run `ift eval` on the held-out set at the end of each trial."""

    def __post_init__(self) -> None:
        _check_literals(self, "tune")


@dataclass
class BenchmarkConfig:
    """One multiple-choice benchmark under `eval.benchmarks.<name>`, scored by option
    log-likelihood (see ift.eval.benchmarks)."""

    path: str = ""
    """Folder holding the benchmark's per-subject CSV files (split folders such as dev/ and
    test/, or files named <subject>_<split>.csv); local or s3://."""
    layout: Literal["", "mmlu", "ceval", "cmmlu"] = ""
    """CSV layout: mmlu (no header: question, A-D, answer), ceval (header id, question,
    A-D, answer, explanation) or cmmlu (header Question, A-D, Answer); empty: the name."""
    split: str = ""
    """Split scored; empty: test for mmlu and cmmlu, val for ceval (its test answers are
    withheld)."""
    dev_split: str = "dev"
    """Split the k-shot examples come from (the first k rows of the same subject)."""
    k_shot: int = 5
    """Solved examples before each question."""
    subjects: list[str] = field(default_factory=list)
    """Subjects to score (file stems without the split suffix); empty: all."""
    max_per_subject: int = 0
    """Questions scored per subject; 0: all."""
    choices: Literal["letter", "text"] = "letter"
    """Continuation scored per option: letter (" A", lm-eval-harness's MMLU) or text (the
    option's own text, where length normalisation matters)."""
    chat: bool = False
    """Wrap the prompt in the model's chat template as one user turn (instruction-tuned
    models); false: plain text, as for base models."""

    def __post_init__(self) -> None:
        _check_literals(self, "eval.benchmarks.<name>")
        if self.k_shot < 0 or self.max_per_subject < 0:
            raise ValueError(f"k_shot={self.k_shot} and max_per_subject="
                              f"{self.max_per_subject} must be >= 0")


@dataclass
class DuringTrainingConfig:
    """Generation metrics on a fixed held-out sample every train.eval_every steps."""

    max_samples: int = 0
    """Held-out rows generated on at each evaluation; 0: off."""
    max_new_tokens: int = 32
    """Generation budget per sample."""
    batch_size: int = 8
    """Prompts decoded together."""
    data: str = ""
    """Held-out data (prepared dir or raw files); empty: eval.data, else the val split of
    the training data."""

    def __post_init__(self) -> None:
        if self.max_samples < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                f"max_samples={self.max_samples} must be >= 0, "
                f"max_new_tokens={self.max_new_tokens} and batch_size={self.batch_size} >= 1")


@dataclass
class EvalConfig:
    """`ift eval`: loss, perplexity and generation metrics on a held-out set."""

    data: str = ""
    """Held-out data: a prepared directory (its val split) or raw source files."""
    max_samples: int = 200
    """Rows scored by generation (loss uses the whole split, or max_loss_rows)."""
    max_loss_rows: int = 0
    """Rows the loss and perplexity are computed on, the first of the split (0: all)."""
    max_new_tokens: int = 128
    """Generation budget per sample."""
    batch_size: int = 8
    """Prompts per generation batch."""
    output: str = ""
    """Where eval.json and samples.jsonl go; defaults to the run directory."""
    benchmarks: dict[str, Any] = field(default_factory=dict)
    """Multiple-choice benchmarks by option log-likelihood: name -> {path, layout, split,
    dev_split, k_shot, subjects, max_per_subject, choices, chat} (BenchmarkConfig); the
    names mmlu, ceval and cmmlu give their layout."""
    during_training: DuringTrainingConfig = field(default_factory=DuringTrainingConfig)
    """Exact match, MC accuracy and ROUGE-L on a held-out sample during training."""

    def __post_init__(self) -> None:
        if self.max_loss_rows < 0:
            raise ConfigError(f"eval.max_loss_rows={self.max_loss_rows} must be >= 0 (0: all)")
        built = {}
        for name, value in (self.benchmarks or {}).items():
            key = f"eval.benchmarks.{name}"
            bench = value if isinstance(value, BenchmarkConfig) else _build(
                BenchmarkConfig, value, key)
            if not bench.layout:
                if name not in ("mmlu", "ceval", "cmmlu"):
                    raise ConfigError(f"{key}.layout: set mmlu, ceval or cmmlu (the name "
                                      f"{name!r} is none of them)")
                bench.layout = name
            if not bench.path:
                raise ConfigError(f"{key}.path: the folder of the benchmark's CSV files")
            built[str(name)] = bench
        self.benchmarks = built


@dataclass
class ServeConfig:
    """`ift serve`: the OpenAI-compatible Ray Serve application."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds."""
    port: int = 8000
    """HTTP port."""
    base_model: str = ""
    """Base model path or id; defaults to model.name_or_path."""
    base_model_id: str = "base"
    """Model id under which the base model is served."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Adapter id -> adapter directory (local or s3://), loaded on demand."""
    adapter_root: str = ""
    """A folder whose sub-folders are adapters, loaded on demand by name."""
    merged_models: dict[str, str] = field(default_factory=dict)
    """Model id -> merged HF model directory, each served by its own deployment."""
    max_adapters_per_replica: int = 4
    """LRU cache size of adapters held by one replica."""
    num_replicas: int = 1
    """Replicas of each deployment (ignored when autoscaling is set)."""
    autoscaling: dict[str, Any] = field(default_factory=dict)
    """Ray Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests)."""
    cpus_per_replica: float = 1.0
    """CPUs reserved by each replica."""
    gpus_per_replica: float = 0.0
    """GPUs reserved by each replica."""
    max_ongoing_requests: int = 32
    """Generation requests a replica runs at once (its engine batches up to
    max_batch_size of them per step)."""
    max_queued_requests: int = 64
    """Generation requests a replica queues beyond those before new ones get a 503 with a
    JSON body; -1: no bound."""
    request_timeout_s: float = 120.0
    """Per-request timeout."""
    max_tokens_limit: int = 512
    """Cap on max_tokens a request may ask for."""
    max_batch_size: int = 8
    """Dynamic batching: requests generated together."""
    batch_wait_timeout_s: float = 0.01
    """Dynamic batching: how long to wait to fill a batch. Models whose requests join a
    running batch between decode steps (continuous batching) start at once instead."""
    api_key_env: str = ""
    """Name of an environment variable holding a bearer token; empty disables auth."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """transformers (CPU or GPU) or vllm (GPU clusters, through ray.serve.llm)."""
    accelerator_type: str = ""
    """vllm backend: GPU type each replica needs (e.g. A10G, L4, H100); empty: any GPU."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """vllm backend: extra vLLM engine arguments (tensor_parallel_size, max_model_len, ...)."""
    show_model_paths: bool = False
    """GET /v1/models: show every caller each model's server paths (`root`, `metadata.path`
    and the paths of its lineage record). Off: only callers holding the bearer key of
    `api_key_env` see them; anonymous callers get ids, method, base, hashes and run ids."""

    def __post_init__(self) -> None:
        _check_literals(self, "serve")
        if self.max_adapters_per_replica < 1:
            raise ConfigError("serve.max_adapters_per_replica must be >= 1")
        for key in ("num_replicas", "max_ongoing_requests", "max_tokens_limit", "max_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"serve.{key}={getattr(self, key)}: must be >= 1")
        if self.max_queued_requests < -1:
            raise ConfigError(f"serve.max_queued_requests={self.max_queued_requests}: "
                              "must be >= 0 (or -1: unbounded)")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"serve.request_timeout_s={self.request_timeout_s}: must be > 0")
        if not 0 < self.port < 65536:
            raise ConfigError(f"serve.port={self.port}: must be in 1..65535")


@dataclass
class PredictConfig:
    """`ift predict`: batch generation over a dataset with Ray Data."""

    data: str = ""
    """A prepared dataset directory (its `split` is used) or raw source files/globs
    (json, jsonl, tsv, parquet; format detected per file)."""
    split: str = "val"
    """Split of a prepared dataset to predict on."""
    output: str = "runs/predict"
    """Output directory: predictions.jsonl, per-shard files (for resuming), summary.json."""
    model: str = ""
    """Model directory or id: a base or merged model; defaults to serve.base_model, then
    model.name_or_path."""
    adapter: str = ""
    """Optional LoRA adapter directory (local or s3://) applied on top of `model`."""
    max_tokens: int = 128
    """Tokens generated per row at most."""
    temperature: float = 0.0
    """0 is greedy; above 0 samples (with `seed`)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    seed: int = 0
    """Sampling seed (each row is seeded with seed + its position)."""
    batch_size: int = 8
    """Rows generated together by one actor."""
    shard_rows: int = 256
    """Rows per output shard; a re-run skips shards already written."""
    num_actors: int = 0
    """Generation actors; 0 uses every CPU but one (left for reading)."""
    cpus_per_actor: float = 1.0
    """CPUs reserved by each generation actor."""
    max_rows: int = 0
    """Predict on the first N rows only (0: all)."""

    def __post_init__(self) -> None:
        for key in ("max_tokens", "batch_size", "shard_rows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"predict.{key}={getattr(self, key)}: must be >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"predict.temperature={self.temperature}: must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"predict.top_p={self.top_p}: must be in (0, 1]")


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    uri: str = ""
    """Tracking URI; empty means MLFLOW_TRACKING_URI, else sqlite:///<storage.root>/mlflow.db."""
    experiment: str = "ift"
    """MLflow experiment name."""
    artifact_location: str = ""
    """Where a new experiment keeps its run artifacts (adapters, metrics, plots): an
    s3://bucket/prefix (reached through AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL), a
    local folder or any MLflow artifact URI. Empty: <storage.root>/mlartifacts for the
    sqlite default, the server's own choice for a tracking server. MLflow fixes it when
    the experiment is created; an existing experiment keeps its own (with a warning)."""
    enabled: bool = True
    """Turn tracking off entirely."""


@dataclass
class StorageConfig:
    """Where relative paths live."""

    root: str = "./ift-work"
    """Working directory for relative outputs (local path or s3://bucket/prefix)."""
    shared_paths: list[str] = field(default_factory=list)
    """Local path prefixes mounted at the same place on every node (NFS and the like): a
    run on several nodes accepts data, outputs and models under them as well as s3://."""


@dataclass
class Config:
    """A whole job configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data preparation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Fine-tuning method."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Sweeps."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Serving."""
    predict: PredictConfig = field(default_factory=PredictConfig)
    """Batch prediction."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Storage root."""

    def resolve(self, path: str) -> str:
        """A config path made absolute under storage.root when relative."""
        from ift.storage import is_remote, join

        if not path or is_remote(path) or os.path.isabs(path):
            return path
        return join(self.storage.root, path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (optional), apply dotted `key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path:
        from ift.storage import read_text

        try:
            raw = yaml.safe_load(read_text(path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        raw = expand_env(raw, path)
    for item in overrides or []:
        apply_override(raw, item)
    return absolute_paths(build_config(raw))


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with its local relative paths made absolute against the current directory, the
    one they were written for (in place; returned for chaining).

    Ray Train workers start in a folder of their session and Tune trials and Serve replicas
    may too, so a relative path read there names nothing (or is taken for a hub id):
    `model.name_or_path: ift-work/model` would fail in the workers of a run started from
    the folder that holds ift-work. storage.root is made absolute, and with it every output
    under it (`cfg.resolve`). A model, adapter, tokenizer or data path is made absolute when
    it exists here (else it stays as written: a hub id, or a name under storage.root);
    globs too. s3:// paths, hub ids and `@sample/` paths are left as they are."""
    from ift.storage import is_remote

    def local(p: str) -> bool:
        return bool(p) and not is_remote(p) and not os.path.isabs(p) and not p.startswith("@")

    def here(p: str) -> str:
        return os.path.abspath(p) if local(p) and os.path.exists(p) else p

    def data(p: str) -> str:  # comma-separated files, dirs or globs
        def one(x: str) -> str:
            glob = any(c in x for c in "*?[")
            return os.path.abspath(x) if local(x) and (glob or os.path.exists(x)) else x

        return ",".join(one(x.strip()) for x in p.split(",")) if p else p

    if local(cfg.storage.root):
        cfg.storage.root = os.path.abspath(cfg.storage.root)
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        cfg.tracking.uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    m = cfg.model
    m.name_or_path, m.adapter = here(m.name_or_path), here(m.adapter)
    cfg.data.tokenizer = here(cfg.data.tokenizer)
    for src in cfg.data.sources:
        src.path, src.schema = data(src.path), here(src.schema)
    e = cfg.eval
    e.data, e.during_training.data = data(e.data), data(e.during_training.data)
    for bench in e.benchmarks.values():
        bench.path = here(bench.path)
    s = cfg.serve
    s.base_model, s.adapter_root = here(s.base_model), here(s.adapter_root)
    s.adapters = {k: here(v) for k, v in s.adapters.items()}
    s.merged_models = {k: here(v) for k, v in s.merged_models.items()}
    pr = cfg.predict
    pr.data, pr.model, pr.adapter = data(pr.data), here(pr.model), here(pr.adapter)
    return cfg


_ENV_REF = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")


def expand_env(node: Any, path: str, key: str = "") -> Any:
    """A YAML tree with `${NAME}` in string values replaced by environment variables (so
    one file names a bucket per deployment); an unset variable is an error naming it."""
    if isinstance(node, dict):
        return {k: expand_env(v, path, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, path, f"{key}.{i}") for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise ConfigError(f"{path}: {key}={node!r} uses ${{{name}}}, which is not set")
        return os.environ[name]

    return _ENV_REF.sub(sub, node)


# Keys earlier versions wrote into run dirs' config.yaml that no longer mean anything; they
# are dropped on load so old runs stay readable (`ift eval --run`, `ift tune --resume`).
RETIRED_KEYS = {("train", "shuffle_buffer")}


def build_config(raw: dict[str, Any]) -> Config:
    for section, key in RETIRED_KEYS:
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raw = {**raw, section: {k: v for k, v in raw[section].items() if k != key}}
    return _build(Config, raw, "")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, _, text = item.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = _index(part, key)
            while len(node) <= idx:
                node.append({})
            node = node[idx]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = _index(last, key)
        while len(node) <= idx:
            node.append({})
        node[idx] = value
    else:
        node[last] = value


def _index(part: str, key: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"override {key!r}: {part!r} must be a list index")
    return int(part)


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring (the string literal after each field)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    tree = ast.parse(src.lstrip() if src.startswith(" ") else src)
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for a, b in zip(body, body[1:]):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(a.target, ast.Name)
            and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)
        ):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ConfigError(
                f"unknown key {full!r}{hint} (allowed: {', '.join(names)})"
            )
        kwargs[key] = _coerce(hints[key], value, full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and value not in args:
            value = _yaml_bool_word(value, args)
        if value not in args:
            raise ConfigError(_bad_choice(key, value, args))
        return value
    if origin is list:
        if isinstance(value, (str, int, float)) and args and args[0] is str and value != "":
            value = [value] if not isinstance(value, str) else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected a list")
        (inner,) = args or (Any,)
        return [_coerce(inner, v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    return value


def _yaml_bool_word(value: bool, allowed: tuple) -> Any:
    """YAML 1.1 reads no/off/yes/on as booleans; give a choice its word back."""
    words = ("no", "off", "false") if not value else ("yes", "on", "true")
    return next((w for w in words if w in allowed), value)


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args)


def _bad_choice(key: str, value: Any, allowed: tuple) -> str:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{key}={value!r} is not allowed{hint} (allowed: {', '.join(map(str, allowed))})"


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(_bad_choice(key, value, allowed))


def literal_choices(cls: type) -> dict[str, tuple]:
    """{field: allowed values} of a config section's `Literal` fields: the annotation is
    the one list of a field's choices."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is Literal}


def _check_literals(obj: Any, section: str) -> None:
    """Every `Literal` field of a section holds one of its values (a section built in code
    skips the loader's coercion, so it is checked here too)."""
    for name, allowed in literal_choices(type(obj)).items():
        _check_choice(f"{section}.{name}", getattr(obj, name), allowed)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every field, recursively."""
    rows = []
    docs = field_docs(cls)
    defaults = cls() if cls is not SourceConfig else None
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()  # type: ignore[misc]
        rows.append((key, repr(default), docs.get(f.name, "")))
        if f.name == "sources":
            rows.extend(describe(SourceConfig, key + "[]."))
        if f.name == "benchmarks":
            rows.extend(describe(BenchmarkConfig, key + ".<name>."))
    return rows
