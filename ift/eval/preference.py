"""Held-out preference accuracy and margin for `ift eval`.

Held-out pairs come from a prepared preference dataset (its val split) or raw pair files
(any layout of ift.data.preference, rendered with the training template). For each pair:

    pref_accuracy     share of pairs whose chosen reply has the higher mean per-token
                      log-prob under the model (reference-free: base models score too)
    pref_margin       mean of (mean log-prob of chosen - mean log-prob of rejected)
    reward_accuracy   adapters only: share of pairs whose DPO implicit reward
                      β·(log π(y) - log π_ref(y)) is higher for the chosen reply, with the
                      base model (adapter disabled) as π_ref
    reward_margin     adapters only: mean chosen minus rejected implicit reward

The chosen side is also what the loss/perplexity and generation metrics of `ift eval` see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ift import storage
from ift.config import ConfigError, DataConfig
from ift.data import dataset
from ift.data.preference import PAIR_FORMATS, convert_pair, tokenize_pairs
from ift.data.readers import iter_raw, plan_reads
from ift.data.record import ConvertError
from ift.train.preference import collate_pairs, sequence_logps


@dataclass
class HeldOutPairs:
    """Tokenized held-out pairs, and the raw pairs left out."""

    rows: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)
    """"file:line: reason" of each raw pair the converter rejected (equal replies, an
    empty side); a prepared dataset's rejects are in its rejects/ folder instead."""


def held_out_pairs(data_cfg: DataConfig, data: str, tokenizer, template: str | None
                   ) -> HeldOutPairs | None:
    """Tokenized pairs of `data` when it holds preference pairs; None for conversations.
    Raw pairs are cut to data_cfg.max_seq_len. A raw row that cannot be read is an error
    naming its file and line (a held-out set must be whole); a pair the converter rejects
    is left out and named in `skipped`."""
    if dataset.is_prepared(data):
        if dataset.read_manifest(data).get("kind") != dataset.PREFERENCE:
            return None
        return HeldOutPairs(list(dataset.iter_split_rows(data, "val")))
    return _raw_pairs(data_cfg, data, tokenizer, template)


def _raw_pairs(data_cfg: DataConfig, data: str, tokenizer, template: str | None
               ) -> HeldOutPairs | None:
    paths = [p for part in data.split(",") if part for p in storage.expand(part)]
    try:
        tasks, infos = plan_reads("heldout", 0, paths, "auto", 0, 0, hash_files=False)
    except (ValueError, OSError):  # unreadable or missing: the conversation reader says why
        return None
    if not infos or any(i["format"] not in PAIR_FORMATS for i in infos):
        return None
    pairs, skipped = [], []
    for task in tasks:
        for line, raw, error, _ in iter_raw(task):
            where = f"{task.file}:{line}"
            if error is not None:
                raise ConfigError(f"eval.data: {where}: cannot read row: {error}")
            try:
                pairs.append(convert_pair(task.format, raw, id=where, source="heldout"))
            except ConvertError as e:
                skipped.append(f"{where}: {e}")
    rows, _ = tokenize_pairs(pairs, tokenizer, template=template or "auto",
                             max_seq_len=max(data_cfg.max_seq_len, 8))
    return HeldOutPairs(rows, skipped)


def pair_metrics(model, rows: list[dict[str, Any]], pad_id: int, batch_size: int,
                 device: str, beta: float) -> dict[str, Any]:
    """pref_accuracy, pref_margin and, for a PEFT model, reward_accuracy and reward_margin."""
    def logps(batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device), use_cache=False)
        return sequence_logps(out.logits, batch["labels"])

    adapter = hasattr(model, "disable_adapter")
    wins = margin = r_wins = r_margin = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate_pairs(rows[i:i + batch_size], pad_id)
            b = batch["input_ids"].shape[0] // 2
            s, n = logps(batch)
            avg = s / n.clamp(min=1)
            wins += float((avg[:b] > avg[b:]).sum())
            margin += float((avg[:b] - avg[b:]).sum())
            if adapter:
                with model.disable_adapter():
                    ref, _ = logps(batch)
                h = (s[:b] - ref[:b]) - (s[b:] - ref[b:])
                r_wins += float((h > 0).sum())
                r_margin += float(beta * h.sum())
    n_pairs = max(len(rows), 1)
    out: dict[str, Any] = {"pref_pairs": len(rows), "pref_accuracy": wins / n_pairs,
                           "pref_margin": margin / n_pairs}
    if adapter:
        out.update(reward_accuracy=r_wins / n_pairs, reward_margin=r_margin / n_pairs)
    return out
