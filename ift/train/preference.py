"""Preference objectives: DPO (sigmoid or IPO), SimPO and ORPO on pairwise data.

A preference row holds one pair: the chosen reply in `input_ids`/`labels` and the rejected
reply in `rejected_input_ids`/`rejected_labels`, both after the same prompt, with labels
only on the reply (ift.data.preference). `collate_pairs` stacks a micro-batch of B pairs
into one batch of 2B sequences, chosen first, so chosen and rejected run in one forward pass.

Every loss here is a mean over pairs: a micro-batch's summed pair losses are divided by
the pairs a worker sees per step (global batch / workers), so DDP's gradient mean gives
the mean over the global batch whatever the split over workers and micro-batches.

    logp(y)   sum of log-probs of the reply tokens of y (masked by labels)
    avg(y)    logp(y) / reply tokens of y
    dpo       h = (logp_pol(c) - logp_ref(c)) - (logp_pol(r) - logp_ref(r))
              sigmoid: -(1 - ls) log σ(β h) - ls log σ(-β h)
              ipo:     (h - 1 / (2β))²
              rewards: β (logp_pol - logp_ref) of each side
    simpo     -log σ(β (avg(c) - avg(r)) - γ);  rewards: β avg of each side
    orpo      -avg(c) + λ · -log σ(log odds(c) - log odds(r)),
              log odds(y) = avg(y) - log(1 - exp(avg(y)));  rewards: β avg of each side

Metrics (means over the pairs of a step): rewards/chosen, rewards/rejected, rewards/margin,
rewards/accuracy (chosen reward above rejected), logps/chosen, logps/rejected (summed
reply log-probs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from ift.config import TrainConfig
from ift.train.collate import IGNORE_INDEX, collate, model_inputs
from ift.train.methods import is_adapter, unwrap
from ift.train.ref_logps import REF_COLUMNS

OBJECTIVES = ("sft", "dpo", "simpo", "orpo")
DPO_LOSSES = ("sigmoid", "ipo")
PAIR_COLUMNS = ("rejected_input_ids", "rejected_labels")
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
               "logps/chosen", "logps/rejected")


# ---------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------


def collate_pairs(rows: Sequence[dict[str, Any]], pad_id: int, *,
                  packed: bool | None = None) -> dict[str, torch.Tensor]:
    """B pair rows -> one batch of 2B sequences, chosen first: sequences 0..B-1 chosen,
    B..2B-1 rejected.

    Unpacked: 2B rows, each padded to the longest. Packed (`data.pack` on preference
    data): one row holding the 2B sequences back to back with no padding, position ids
    restarting at 0 for each and a block-diagonal causal mask (ift.train.collate), so a
    micro-batch costs its real tokens only; `sequence_logps` then sums per sequence by the
    position restarts. Rows carrying precomputed reference log-probs also give `ref_logps`
    (2B, same order)."""
    chosen, rejected = _side(rows, ""), _side(rows, "rejected_")
    if packed:
        batch = collate([_one_row(chosen + rejected)], pad_id, packed=True)
    else:
        batch = collate(chosen + rejected, pad_id, packed=False)
    if rows and REF_COLUMNS[0] in rows[0]:  # precomputed DPO reference (ift.train.ref_logps)
        batch["ref_logps"] = torch.tensor([float(r[c]) for c in REF_COLUMNS for r in rows],
                                          dtype=torch.float32)
    return batch


def collate_chosen(rows: Sequence[dict[str, Any]], pad_id: int, *,
                   packed: bool | None = None) -> dict[str, torch.Tensor]:
    """SFT on preference pairs trains on the chosen sides: B padded rows, or (packed) one
    row of the B chosen sequences back to back."""
    chosen = _side(rows, "")
    if packed:
        return collate([_one_row(chosen)], pad_id, packed=True)
    return collate(chosen, pad_id, packed=False)


def _side(rows: Sequence[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """One side of each pair row as a plain sequence: "" the chosen, "rejected_" the other."""
    return [{"id": r.get("id"), "input_ids": r[f"{prefix}input_ids"],
             "labels": r[f"{prefix}labels"]} for r in rows]


def _one_row(seqs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sequences back to back in one packed row (ift.data.pack's layout: position ids
    restart at 0 and seq_ids number the sequences, in the given order)."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [],
                                 "seq_ids": []}
    for i, s in enumerate(seqs):
        n = len(s["input_ids"])
        if n == 0 or len(s["labels"]) != n:
            raise ValueError(f"collate_pairs: pair {s.get('id')!r} has {n} input_ids and "
                             f"{len(s['labels'])} labels")
        row["input_ids"].extend(s["input_ids"])
        row["labels"].extend(s["labels"])
        row["position_ids"].extend(range(n))
        row["seq_ids"].extend([i] * n)
    return row


# ---------------------------------------------------------------------------------------
# Pure pieces: log-probs and losses
# ---------------------------------------------------------------------------------------


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor,
                   position_ids: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of the labelled tokens, their count), one per sequence.

    Position t predicts token t + 1; labels of -100 (prompt, padding) contribute nothing.
    Logits may carry extra leading positions (virtual tokens): the last T are used.
    With `position_ids` the batch is one packed row (`collate_pairs(packed=True)`): a
    sequence starts wherever the position is 0, the sums are per sequence in row order,
    and a sequence's first token is never scored from the one before it.
    """
    t = labels.shape[1]
    logits = logits[:, -t:, :].float()
    target = labels[:, 1:].to(logits.device)
    mask = target != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1, :], dim=-1)
    picked = torch.gather(logp, 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if position_ids is None:
        return (picked * mask).sum(-1), mask.sum(-1)
    if labels.shape[0] != 1:
        raise ValueError(f"sequence_logps: a packed batch is one row, got {labels.shape[0]}")
    starts = position_ids[0].to(logits.device) == 0
    seq = starts.long().cumsum(0) - 1  # sequence index of every token
    keep = mask[0] & ~starts[1:]
    n = int(starts.sum())
    sums = torch.zeros(n, dtype=picked.dtype, device=picked.device)
    sums = sums.index_add(0, seq[1:], picked[0] * keep)
    counts = torch.zeros(n, dtype=torch.long, device=picked.device)
    counts = counts.index_add(0, seq[1:], keep.long())
    return sums, counts


def dpo_loss(pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor,
             ref_r: torch.Tensor, *, beta: float, label_smoothing: float = 0.0,
             kind: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the rewards of both sides, from summed reply log-probs."""
    h = (pol_c - ref_c) - (pol_r - ref_r)
    if kind == "sigmoid":
        loss = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
                - label_smoothing * F.logsigmoid(-beta * h))
    elif kind == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo loss {kind!r} (allowed: {', '.join(DPO_LOSSES)})")
    return loss, beta * (pol_c - ref_c).detach(), beta * (pol_r - ref_r).detach()


def simpo_loss(avg_c: torch.Tensor, avg_r: torch.Tensor, *, beta: float, gamma: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses from length-normalised reply log-probs; rewards β·avg."""
    loss = -F.logsigmoid(beta * (avg_c - avg_r) - gamma)
    return loss, beta * avg_c.detach(), beta * avg_r.detach()


def orpo_loss(avg_c: torch.Tensor, avg_r: torch.Tensor, *, lam: float, beta: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ORPO losses: chosen NLL (token mean) plus λ times the odds-ratio term."""
    log_odds = (avg_c - avg_r) - (_log1m_exp(avg_c) - _log1m_exp(avg_r))
    loss = -avg_c - lam * F.logsigmoid(log_odds)
    return loss, beta * avg_c.detach(), beta * avg_r.detach()


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable near 0."""
    x = torch.clamp(x, max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def metric_sums(rew_c: torch.Tensor, rew_r: torch.Tensor, pol_c: torch.Tensor,
                pol_r: torch.Tensor) -> dict[str, float]:
    """Sums over a micro-batch's pairs (divided by the step's pairs after all-reduce)."""
    return {
        "rewards/chosen": float(rew_c.sum()),
        "rewards/rejected": float(rew_r.sum()),
        "rewards/margin": float((rew_c - rew_r).sum()),
        "rewards/accuracy": float((rew_c > rew_r).float().sum()),
        "logps/chosen": float(pol_c.detach().sum()),
        "logps/rejected": float(pol_r.detach().sum()),
        "pairs": float(len(rew_c)),
    }


# ---------------------------------------------------------------------------------------
# The objective on a model
# ---------------------------------------------------------------------------------------


@dataclass
class Objective:
    """A preference loss bound to its reference model; called by the training step."""

    name: str
    """dpo, simpo or orpo."""
    beta: float = 0.1
    label_smoothing: float = 0.0
    dpo_loss: str = "sigmoid"
    gamma: float = 0.5
    lam: float = 0.1
    pairs_per_rank: float = 1.0
    """Global batch pairs / workers: a micro-batch's summed pair loss is divided by it."""
    reference: Callable[..., torch.Tensor] | None = None
    """DPO: (model inputs, labels, the model being trained as the step holds it: wrapped
    or not) -> summed reply log-probs of the reference model (no grad)."""

    def pair_losses(self, logits: torch.Tensor, labels: torch.Tensor,
                    ref: torch.Tensor | None, position_ids: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-pair losses of a concatenated batch (chosen first) and metric sums;
        `position_ids` for a packed batch (see `sequence_logps`)."""
        logps, counts = sequence_logps(logits, labels, position_ids)
        b = logps.shape[0] // 2
        pol_c, pol_r = logps[:b], logps[b:]
        if self.name == "dpo":
            if ref is None:
                raise ValueError("dpo needs reference log-probs")
            ref = ref.to(logps.device, logps.dtype)
            loss, rc, rr = dpo_loss(pol_c, pol_r, ref[:b], ref[b:], beta=self.beta,
                                    label_smoothing=self.label_smoothing, kind=self.dpo_loss)
        else:
            avg = logps / counts.clamp(min=1)
            if self.name == "simpo":
                loss, rc, rr = simpo_loss(avg[:b], avg[b:], beta=self.beta, gamma=self.gamma)
            elif self.name == "orpo":
                loss, rc, rr = orpo_loss(avg[:b], avg[b:], lam=self.lam, beta=self.beta)
            else:
                raise ValueError(f"objective {self.name!r} (allowed: dpo, simpo, orpo)")
        return loss, metric_sums(rc, rr, pol_c, pol_r)

    def _split(self, model: nn.Module, inputs: dict[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """(model inputs, DPO reference log-probs): the batch's precomputed `ref_logps`,
        else the reference model run on the batch; None for reference-free objectives."""
        fwd = {k: v for k, v in inputs.items() if k not in ("labels", "ref_logps")}
        if self.name != "dpo":
            return fwd, None
        if "ref_logps" in inputs:
            return fwd, inputs["ref_logps"]
        if self.reference is None:
            raise ValueError("dpo needs a reference model or precomputed ref_logps")
        return fwd, self.reference(fwd, inputs["labels"], model)

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's share of the step loss (one forward pass over both sides)."""
        labels = inputs["labels"]
        fwd, ref = self._split(model, inputs)
        out = model(**fwd, use_cache=False)
        losses, sums = self.pair_losses(out.logits, labels, ref, fwd.get("position_ids"))
        sums["loss"] = float(losses.detach().sum())
        return losses.sum() / self.pairs_per_rank, sums

    @torch.no_grad()
    def batch_sums(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metric sums (and the summed pair loss) of one collated pair batch, no grad."""
        fwd, ref = self._split(model, inputs)
        out = model(**fwd, use_cache=False)
        losses, sums = self.pair_losses(out.logits, inputs["labels"], ref,
                                        fwd.get("position_ids"))
        sums["loss"] = float(losses.sum())
        return sums


SUM_KEYS = (*METRIC_KEYS, "loss", "pairs")


def add_sums(total: dict[str, float], sums: dict[str, float]) -> None:
    for k, v in sums.items():
        total[k] = total.get(k, 0.0) + v


def means(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Metric means over pairs from all-reduced sums (`loss` excepted unless prefixed)."""
    n = max(sums.get("pairs", 0.0), 1.0)
    out = {f"{prefix}{k}": sums[k] / n for k in METRIC_KEYS if k in sums}
    if prefix and "loss" in sums:
        out[f"{prefix}loss"] = sums["loss"] / n
    return out


# ---------------------------------------------------------------------------------------
# Reference models
# ---------------------------------------------------------------------------------------


def _through(inner: nn.Module, wrapped: nn.Module | None) -> nn.Module:
    """What to call for a reference pass: an FSDP wrapper itself (it gathers the sharded
    weights around its forward), else the bare model (no DDP bookkeeping)."""
    return wrapped if isinstance(wrapped, FullyShardedDataParallel) else inner


def disabled_adapter_reference(model: nn.Module) -> Callable[..., torch.Tensor]:
    """The same PEFT model with its adapter disabled: the base model, no second copy."""
    def ref(inputs: dict[str, torch.Tensor], labels: torch.Tensor,
            wrapped: nn.Module | None = None) -> torch.Tensor:
        inner = unwrap(model)
        with inner.disable_adapter():
            return _forward_logps(_through(inner, wrapped), inputs, labels)
    return ref


def frozen_copy_reference(copy: nn.Module) -> Callable[..., torch.Tensor]:
    """A frozen copy of the starting model (full and freeze fine-tuning)."""
    copy.eval()
    for p in copy.parameters():
        p.requires_grad_(False)

    def ref(inputs: dict[str, torch.Tensor], labels: torch.Tensor,
            wrapped: nn.Module | None = None) -> torch.Tensor:
        return _forward_logps(copy, inputs, labels)
    return ref


REFERENCE_ADAPTER = "reference"


def frozen_adapter_reference(model: nn.Module, name: str = REFERENCE_ADAPTER
                             ) -> Callable[..., torch.Tensor]:
    """A second, frozen adapter of the same PEFT model (the parent adapter the policy
    started from): made active for the reference pass, then the policy's again."""
    def ref(inputs: dict[str, torch.Tensor], labels: torch.Tensor,
            wrapped: nn.Module | None = None) -> torch.Tensor:
        inner = unwrap(model)
        active = inner.active_adapter
        flags = {n: p.requires_grad for n, p in inner.named_parameters()}
        try:
            inner.base_model.set_adapter(name, inference_mode=True)
            return _forward_logps(_through(inner, wrapped), inputs, labels)
        finally:
            inner.base_model.set_adapter(active)
            for n, p in inner.named_parameters():
                p.requires_grad_(flags[n])
    return ref


def _forward_logps(model: nn.Module, inputs: dict[str, torch.Tensor],
                   labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
    return sequence_logps(out.logits, labels, inputs.get("position_ids"))[0].detach()


# ---------------------------------------------------------------------------------------
# On a training worker
# ---------------------------------------------------------------------------------------


def objective_for(t: TrainConfig, model: nn.Module, plan: Any,
                  load_copy: Callable[[], nn.Module], *, method: str,
                  adapter: str = "") -> Objective | None:
    """The configured preference objective (train section) bound to its reference, or
    None for sft.

    DPO's reference: the parent adapter frozen when the policy starts from `adapter`
    (model.adapter); else the same model with its adapter disabled (peft `method` an
    adapter); a frozen copy for full and freeze. `model` is the built (not yet
    DDP-wrapped) model.
    """
    if t.objective == "sft":
        return None
    reference = None
    if t.objective == "dpo" and not plan.ref_logps:  # precomputed: the rows carry them
        if adapter:
            reference = frozen_adapter_reference(model)
        elif is_adapter(method):
            reference = disabled_adapter_reference(model)
        else:
            reference = frozen_copy_reference(load_copy())
    return Objective(t.objective, beta=t.beta, label_smoothing=t.label_smoothing,
                     dpo_loss=t.dpo_loss, gamma=t.simpo_gamma, lam=t.orpo_lambda,
                     pairs_per_rank=plan.global_batch_size / plan.world_size,
                     reference=reference)


def evaluate(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], env: Any
             ) -> dict[str, float]:
    """Held-out preference metrics over every worker's pair batches: eval_loss (the
    objective's), eval_rewards/accuracy, eval_rewards/margin, ... (means over pairs)."""
    from ift.train.loop import reduce_sums, step_autocast  # cycle: loop imports preference

    target = model if env.strategy == "fsdp" else unwrap(model)
    was_training = target.training
    target.eval()
    total = dict.fromkeys(SUM_KEYS, 0.0)
    for batch in batches:
        inputs = model_inputs(batch, attn_implementation=env.attn_implementation,
                              dtype=env.dtype, device=env.device)
        with step_autocast(env):
            sums = env.objective.batch_sums(target, inputs)
        if batch.get("_weight", 1) != 0:  # filler batches keep FSDP ranks in step
            add_sums(total, sums)
    if was_training:
        target.train()
    total = reduce_sums(total, env.world_size, env.device)
    return means(total, prefix="eval_") if total["pairs"] else {}
