"""Batch prepared rows into model inputs.

Rows are not padded on disk. `collate` pads a list of rows to the longest one: input_ids
with the tokenizer's pad id, labels with -100, seq_ids with -1. Unpacked rows get a 2D
padding mask. Packed rows (several samples per row, `position_ids` restarting at 0 and
`seq_ids` numbering the samples) get per-sample position ids and a 4D block-diagonal
causal mask [B, 1, T, T], so no token attends across a sample boundary.

This module is the one place that decides how packed samples are kept apart. Transformers
passes a 4D mask to the attention kernel as-is, and kernels read it differently: SDPA
takes a boolean mask (True = attend), eager attention adds the mask to the scores (0 =
attend, a large negative number = blocked). Flash-attention kernels take no mask: they
get the whole micro-batch flattened into one row of real tokens (`flatten_packed`), whose
position_ids restart at every sample; transformers derives the varlen boundaries from
those restarts, which it does only for a batch of one row (with several rows it would
attend across the samples of a row). `model_inputs` turns a collated batch into what the
model's kernel needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ift.artifacts import IGNORE_INDEX


def collate(
    rows: Sequence[dict[str, Any]],
    pad_id: int,
    *,
    packed: bool | None = None,
    pad_to_multiple_of: int | None = None,
    mask_4d: bool = True,
) -> dict[str, torch.Tensor]:
    """Pad rows to the longest; packed rows also get position ids and a 4D mask.

    `packed` defaults to whether the rows carry seq_ids. Returns input_ids, labels,
    attention_mask (2D long, or 4D bool when packed), and position_ids and seq_ids when
    packed. mask_4d=False leaves a packed batch's 4D mask out: `model_inputs` then builds
    it from seq_ids on the model's device. The trainer does that: the mask is [B, 1, T, T],
    T times the batch, and built here on the CPU and copied it cost a 0.5B model a third
    of its step time on a GPU.
    """
    if not rows:
        raise ValueError("collate: empty batch")
    if packed is None:
        packed = rows[0].get("seq_ids") is not None
    lengths = [len(r["input_ids"]) for r in rows]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(rows)

    input_ids = np.full((batch, width), pad_id, dtype=np.int64)
    labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if len(row["labels"]) != n:
            raise ValueError(
                f"collate: row {row.get('id', i)!r} has {n} input_ids but "
                f"{len(row['labels'])} labels"
            )
        input_ids[i, :n] = row["input_ids"]
        labels[i, :n] = row["labels"]
    out = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}

    if not packed:
        mask = np.zeros((batch, width), dtype=np.int64)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        out["attention_mask"] = torch.from_numpy(mask)
        return out

    seq_ids = np.full((batch, width), -1, dtype=np.int64)
    # Padding gets positions of its own run (0, 1, ...): flash kernels then see it as one
    # more sample, which carries no labels.
    position_ids = np.tile(np.arange(width, dtype=np.int64), (batch, 1))
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if row.get("seq_ids") is None or row.get("position_ids") is None:
            raise ValueError(
                f"collate: packed batch but row {row.get('id', i)!r} has no "
                "seq_ids/position_ids"
            )
        seq_ids[i, :n] = row["seq_ids"]
        position_ids[i, :n] = row["position_ids"]
        position_ids[i, n:] = np.arange(width - n)
    seq = torch.from_numpy(seq_ids)
    out["position_ids"] = torch.from_numpy(position_ids)
    out["seq_ids"] = seq
    if mask_4d:
        out["attention_mask"] = block_causal_mask(seq)
    return out


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] sample ids -> [B, 1, T, T] bool, True where query i may attend to key j.

    Keys must be at or before the query and in the same sample. Padding (seq id -1)
    attends only to itself, so no row of the mask is empty (an empty row gives NaN in
    some kernels).
    """
    mask = attention_mask_from_seq_ids(seq_ids).to(torch.bool)
    width = seq_ids.shape[-1]
    eye = torch.eye(width, dtype=torch.bool, device=mask.device)
    return mask | eye.view(1, 1, width, width)


def model_inputs(
    batch: dict[str, torch.Tensor],
    *,
    attn_implementation: str | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The keyword arguments for model(...) from a collated batch, for the given kernel.

    A packed batch collated without its 4D mask (mask_4d=False) gets it here, built from
    seq_ids on `device`."""
    out = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids",
                                 "ref_logps") if k in batch}
    mask = out.get("attention_mask")
    seq_ids = batch.get("seq_ids")
    if (mask is not None and mask.dim() == 4) or (mask is None and seq_ids is not None):
        impl = attn_implementation or "sdpa"
        if impl.startswith("flash") or impl.startswith("paged"):
            # Flash kernels split packed samples by position_ids restarts, in one row.
            out = flatten_packed(batch)
        else:
            if mask is None:
                mask = block_causal_mask(seq_ids if device is None else seq_ids.to(device))
            out["attention_mask"] = (additive_mask(mask, dtype) if impl == "eager"
                                     else mask.to(torch.bool))
    if device is not None:
        out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
    return out


def flatten_packed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed micro-batch as one row [1, real tokens]: rows concatenated without their
    padding, position_ids restarting at every sample, no mask.

    Each row's first label becomes -100, so the last token of a row does not learn to
    predict the first token of the next (the causal shift never scored that position
    anyway, so the trainable-token count is unchanged)."""
    keep = batch["seq_ids"] >= 0
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    return {"input_ids": batch["input_ids"][keep][None],
            "labels": labels[keep][None],
            "position_ids": batch["position_ids"][keep][None]}


def attention_mask_from_seq_ids(seq_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] sequence ids (pads = -1) -> [B, 1, T, T] boolean mask, True = may attend.

    Block-diagonal and causal: a token attends to earlier tokens of its own sample only.
    Pads attend to earlier pads (never to a sample, and no sample attends to them), so no
    row of the mask is empty and softmax stays finite.
    """
    if seq_ids.dim() != 2:
        raise ValueError(f"seq_ids must be [batch, seq_len], got shape {tuple(seq_ids.shape)}")
    t = seq_ids.shape[1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq_ids.device).tril()
    return (same & causal)[:, None, :, :]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True = attend) -> additive float mask (0 or the dtype's minimum)."""
    zero = torch.zeros((), dtype=dtype)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(mask.to(torch.bool), zero, blocked)


def trainable_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss: labels after the causal shift that are not -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a collated batch."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    seq = batch.get("seq_ids")
    if seq is not None:
        return int((seq >= 0).sum())
    return int(batch["input_ids"].numel())
