"""Task metrics during training (`eval.during_training`).

Every `train.eval_every` steps (and at the last step), rank 0 generates greedily on a fixed
held-out sample, the first `max_samples` rows of:

* `eval.during_training.data`, else `eval.data` (a prepared dir's val split or raw files,
  read as `ift eval` reads them), else
* the val split of the training data.

It reports exact match, multiple-choice accuracy, ROUGE-L, the share of outputs that state
an answer, the metrics of metrics.TASK_METRICS for the tasks present, and on IE rows the IE
scores of `ift eval` (ift.eval.ie: `ie_re_f1`, `ie_ner_f1`, `ie_ee_trigger_f1`,
`ie_ee_argument_f1`, their precision and recall, `ie_unparseable`; raw IE files are read
with the schemas of data.sources, as training read them), as `heldout/<metric>` next to the
loss: to the progress line, metrics.jsonl, MLflow and Ray Train (so Tune's ASHA can stop
trials on them: `tune.metric: heldout/exact_match` or `heldout/ie_re_f1`, `tune.mode:
max`). Generation goes through the serving engine (ift.eval.generate) on the model being
trained, switched to eval mode for the pass and back after. Prompts are rendered in, and
replies end at the end-of-turn tokens of, the prompt format the run records beside its
models (`ift.eval.run.training_prompt_format`), as `ift eval` does with the recorded one.

The loop calls two things: `Probe.create(cfg, tokenizer, rank)` once (None when off) and
`probe.run(model, device)` when `probe.due(step, total)`.
"""

from __future__ import annotations

import time
from typing import Any

from ift import storage
from ift.artifacts import PromptFormat
from ift.config import (
    Config,
    ConfigError,
    DataConfig,
    DuringTrainingConfig,
    PeftConfig,
    TrainConfig,
)
from ift.data import dataset, ingest
from ift.eval import heldout, metrics

# ift.eval.run, and with it torch, transformers and peft, is imported where a probe runs:
# `ift tune report` imports this module for its metrics only (0.8 s instead of 8 s).

PREFIX = "heldout/"
# What the progress line shows, in order.
SHOWN = ("exact_match", "mc_accuracy", "rouge_l")
PROMPT_METHODS = ("prefix", "p_tuning", "prompt_tuning")


class Probe:
    """The fixed held-out sample and how to score a model on it."""

    def __init__(self, cfg: Config, items: list[heldout.Item], data: str, rank: int,
                 tokenizer, prompt_format: PromptFormat):
        self.cfg = cfg
        self.items = items
        self.prompt_format = prompt_format
        self.tokenizer = tokenizer
        self.data = data
        self.rank = rank
        self.every = cfg.train.eval_every

    @classmethod
    def create(cls, cfg: Config, tokenizer, rank: int) -> Probe | None:
        """The probe of a run (None when eval.during_training.max_samples is 0). Every rank
        creates it (so all agree on when it runs); only rank 0 reads the data."""
        dt = cfg.eval.during_training
        if dt.max_samples <= 0:
            return None
        check_config(cfg.peft, cfg.train)
        from ift.eval.run import training_prompt_format

        data = held_out_path(cfg)
        fmt = training_prompt_format(cfg.data, _prepared(cfg), tokenizer)
        items = load_items(cfg.data, dt, data, tokenizer, fmt) if rank == 0 else []
        return cls(cfg, items, data, rank, tokenizer, fmt)

    def due(self, step: int, total: int) -> bool:
        """Whether this step reports the held-out metrics (the same on every rank)."""
        return step == total or bool(self.every and step % self.every == 0)

    def samples(self, model, device: Any = "cpu") -> list[dict[str, Any]]:
        """The scored generations of `model` (the unwrapped model) on the sample; the
        model's train/eval mode is restored afterwards."""
        from ift.eval.run import generate_samples

        dt = self.cfg.eval.during_training
        was_training = model.training
        try:
            return generate_samples(model, self.tokenizer, self.items,
                                    max_new_tokens=dt.max_new_tokens,
                                    batch_size=dt.batch_size, device=str(device),
                                    prompt_format=self.prompt_format)
        finally:
            model.train(was_training)

    def run(self, model, device: Any = "cpu") -> dict[str, Any]:
        """`heldout/*` metrics of `model` on the sample; {} on ranks other than 0."""
        if self.rank != 0:
            return {}
        from ift.eval.run import ie_scores

        t0 = time.time()
        samples = self.samples(model, device)
        agg = {**metrics.aggregate(samples), **metrics.task_metrics(samples),
               **ie_scores(self.items, samples)[0]}
        out = {PREFIX + k: float(v) for k, v in agg.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)
               and not k.endswith("_n") and k != "samples"}
        out[PREFIX + "seconds"] = time.time() - t0
        return out


def check_config(peft_cfg: PeftConfig, train_cfg: TrainConfig) -> None:
    """Configurations the probe cannot run in, as errors naming the key."""
    if train_cfg.strategy == "fsdp":
        raise ConfigError("eval.during_training runs on rank 0 alone, which FSDP's sharded "
                          "forward passes cannot do: set train.strategy=ddp or "
                          "eval.during_training.max_samples=0")
    if peft_cfg.method in PROMPT_METHODS:
        raise ConfigError(f"eval.during_training: peft.method={peft_cfg.method} prepends "
                          "virtual tokens, which the serving engine does not decode; set "
                          "eval.during_training.max_samples=0")


def held_out_path(cfg: Config) -> str:
    """during_training.data, else eval.data, else the training data (its val split)."""
    from ift.eval.run import data_path

    for given in (cfg.eval.during_training.data, cfg.eval.data):
        if given:
            return data_path(cfg, given)
    prepared = _prepared(cfg)
    if not prepared:
        raise ConfigError("eval.during_training: no held-out data: set "
                          "eval.during_training.data, eval.data or train.data")
    return prepared


def _prepared(cfg: Config) -> str | None:
    """The run's prepared training data (None when the config names none)."""
    path = cfg.train.data or cfg.data.output
    return cfg.resolve(path) if path else None


def load_items(data_cfg: DataConfig, during_cfg: DuringTrainingConfig, data: str, tokenizer,
               prompt_format: PromptFormat) -> list[heldout.Item]:
    """The first during_cfg.max_samples held-out items of `data`, read as `ift eval` reads
    them (raw records with the data section's seed, sources and placeholders); raw records
    are rendered in `prompt_format`."""
    n = during_cfg.max_samples
    if dataset.is_prepared(data):
        rows = []
        for row in dataset.iter_samples(data, "val",
                                              key="eval.during_training.data"):
            rows.append(row)
            if len(rows) >= n:
                break
        items = heldout.items_from_rows(rows, tokenizer)
    else:
        records = []
        for _where, rec in ingest.iter_raw_records(data, seed=data_cfg.seed,
                                                    key="eval.during_training.data",
                                                    sources=data_cfg.sources,
                                                    placeholders=data_cfg.placeholders):
            records.append(rec)
            if len(records) >= n:
                break
        items = heldout.items_from_records(records, tokenizer, prompt_format.template)
    if not items:
        raise ConfigError(f"eval.during_training: {data} has no held-out rows")
    return items


def progress_text(values: dict[str, Any]) -> str:
    """The held-out part of the progress line ("" when the step has none)."""
    parts = [f"{k} {values[PREFIX + k]:.3f}" for k in SHOWN if PREFIX + k in values]
    return ("heldout " + " ".join(parts)) if parts else ""


def latest(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The held-out metrics of the last metrics.jsonl row that has them."""
    for row in reversed(history):
        found = {k: v for k, v in row.items() if k.startswith(PREFIX)}
        if found:
            return found
    return {}


def last_metrics(run_dir: str) -> dict[str, Any]:
    """The held-out metrics of a run's last step that has them (for Tune's final report)."""
    from ift.train.loop import read_metrics  # cycle: ift.train.loop imports this module

    return latest(read_metrics(run_dir)) if storage.exists(run_dir) else {}
