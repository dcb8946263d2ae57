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

from ift.train.collate import IGNORE_INDEX, collate
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
    """B pair rows -> one padded batch of 2B sequences: rows 0..B-1 chosen, B..2B-1 rejected.
    Rows carrying precomputed reference log-probs also give `ref_logps` (2B, same order)."""
    if packed:
        raise ValueError("collate_pairs: preference rows are never packed")
    chosen = [{"id": r.get("id"), "input_ids": r["input_ids"], "labels": r["labels"]}
              for r in rows]
    rejected = [{"id": r.get("id"), "input_ids": r["rejected_input_ids"],
                 "labels": r["rejected_labels"]} for r in rows]
    batch = collate(chosen + rejected, pad_id, packed=False)
    if rows and REF_COLUMNS[0] in rows[0]:  # precomputed DPO reference (ift.train.ref_logps)
        batch["ref_logps"] = torch.tensor([float(r[c]) for c in REF_COLUMNS for r in rows],
                                          dtype=torch.float32)
    return batch


# ---------------------------------------------------------------------------------------
# Pure pieces: log-probs and losses
# ---------------------------------------------------------------------------------------


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of the labelled tokens, their count), one per sequence.

    Position t predicts token t + 1; labels of -100 (prompt, padding) contribute nothing.
    Logits may carry extra leading positions (virtual tokens): the last T are used.
    """
    t = labels.shape[1]
    logits = logits[:, -t:, :].float()
    target = labels[:, 1:].to(logits.device)
    mask = target != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1, :], dim=-1)
    picked = torch.gather(logp, 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


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
                    ref: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-pair losses of a concatenated batch (chosen first) and metric sums."""
        logps, counts = sequence_logps(logits, labels)
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
        losses, sums = self.pair_losses(out.logits, labels, ref)
        sums["loss"] = float(losses.detach().sum())
        return losses.sum() / self.pairs_per_rank, sums

    @torch.no_grad()
    def batch_sums(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metric sums (and the summed pair loss) of one collated pair batch, no grad."""
        fwd, ref = self._split(model, inputs)
        out = model(**fwd, use_cache=False)
        losses, sums = self.pair_losses(out.logits, inputs["labels"], ref)
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
    from torch.distributed.fsdp import FullyShardedDataParallel

    return wrapped if isinstance(wrapped, FullyShardedDataParallel) else inner


def disabled_adapter_reference(model: nn.Module) -> Callable[..., torch.Tensor]:
    """The same PEFT model with its adapter disabled: the base model, no second copy."""
    from ift.train.methods import unwrap

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
    from ift.train.methods import unwrap

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
    return sequence_logps(out.logits, labels)[0].detach()


# ---------------------------------------------------------------------------------------
# On a training worker
# ---------------------------------------------------------------------------------------


def objective_for(cfg: Any, model: nn.Module, plan: Any,
                  load_copy: Callable[[], nn.Module]) -> Objective | None:
    """The configured preference objective bound to its reference, or None for sft.

    DPO's reference: the parent adapter frozen when the policy starts from model.adapter;
    else the same model with its adapter disabled; a frozen copy for full and freeze.
    `model` is the built (not yet DDP-wrapped) model.
    """
    from ift.train.methods import is_adapter

    t = cfg.train
    if t.objective == "sft":
        return None
    reference = None
    if t.objective == "dpo" and not plan.ref_logps:  # precomputed: the rows carry them
        if cfg.model.adapter:
            reference = frozen_adapter_reference(model)
        elif is_adapter(cfg.peft.method):
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
    from ift.train.collate import model_inputs
    from ift.train.loop import reduce_sums, step_autocast
    from ift.train.methods import unwrap

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
