"""Preference losses against formulas written here, on hand-made log-probs and on a tiny
model: DPO (sigmoid, label smoothing, IPO), SimPO, ORPO, their gradients, masked reply
log-prob sums, the concatenated chosen/rejected batch, and policy = reference."""

from __future__ import annotations

import math

import pytest
import torch
from train_support import make_tiny_model

from ift.config import load_config
from ift.models import load_model
from ift.train import methods
from ift.train.collate import IGNORE_INDEX, collate
from ift.train.preference import (
    Objective,
    collate_chosen,
    collate_pairs,
    disabled_adapter_reference,
    dpo_loss,
    means,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _leaf(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


# ---------------------------------------------------------------------------------------
# Losses and gradients on hand-made log-probs
# ---------------------------------------------------------------------------------------

POL_C, POL_R, REF_C, REF_R = (-3.0, -7.5), (-5.0, -4.0), (-4.0, -6.0), (-4.5, -5.0)


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_dpo_sigmoid_loss_rewards_and_gradients_match_the_formula(ls):
    beta = 0.3
    pc, pr, rc, rr = _leaf(*POL_C), _leaf(*POL_R), _leaf(*REF_C), _leaf(*REF_R)
    loss, rew_c, rew_r = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls)
    loss.sum().backward()
    for i in range(2):
        h = (POL_C[i] - REF_C[i]) - (POL_R[i] - REF_R[i])
        want = -(1 - ls) * math.log(_sig(beta * h)) - ls * math.log(_sig(-beta * h))
        assert loss[i].item() == pytest.approx(want, rel=1e-12)
        # d/dh = -beta (1-ls) σ(-βh) + beta ls σ(βh); dh/dpc = 1, dh/dpr = -1
        dh = -beta * (1 - ls) * _sig(-beta * h) + beta * ls * _sig(beta * h)
        assert pc.grad[i].item() == pytest.approx(dh, rel=1e-12)
        assert pr.grad[i].item() == pytest.approx(-dh, rel=1e-12)
        assert rew_c[i].item() == pytest.approx(beta * (POL_C[i] - REF_C[i]))
        assert rew_r[i].item() == pytest.approx(beta * (POL_R[i] - REF_R[i]))


def test_ipo_loss_and_gradient_match_the_formula():
    beta = 0.5
    pc, pr = _leaf(*POL_C), _leaf(*POL_R)
    loss, _, _ = dpo_loss(pc, pr, torch.tensor(REF_C, dtype=torch.float64),
                          torch.tensor(REF_R, dtype=torch.float64), beta=beta, kind="ipo")
    loss.sum().backward()
    for i in range(2):
        h = (POL_C[i] - REF_C[i]) - (POL_R[i] - REF_R[i])
        assert loss[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2)
        assert pc.grad[i].item() == pytest.approx(2 * (h - 1 / (2 * beta)))
        assert pr.grad[i].item() == pytest.approx(-2 * (h - 1 / (2 * beta)))


def test_simpo_loss_and_gradient_match_the_formula():
    beta, gamma = 2.0, 0.4
    ac, ar = _leaf(-0.5, -1.2), _leaf(-0.9, -0.3)
    loss, rew_c, rew_r = simpo_loss(ac, ar, beta=beta, gamma=gamma)
    loss.sum().backward()
    for i, (c, r) in enumerate([(-0.5, -0.9), (-1.2, -0.3)]):
        z = beta * (c - r) - gamma
        assert loss[i].item() == pytest.approx(-math.log(_sig(z)))
        assert ac.grad[i].item() == pytest.approx(-beta * _sig(-z))
        assert ar.grad[i].item() == pytest.approx(beta * _sig(-z))
        assert rew_c[i].item() == pytest.approx(beta * c)
        assert rew_r[i].item() == pytest.approx(beta * r)


def test_orpo_loss_and_gradient_match_the_formula():
    lam = 0.25
    ac, ar = _leaf(-0.5, -2.0), _leaf(-1.5, -0.05)
    loss, _, _ = orpo_loss(ac, ar, lam=lam)
    loss.sum().backward()
    for i, (c, r) in enumerate([(-0.5, -1.5), (-2.0, -0.05)]):
        odds = lambda a: a - math.log(1 - math.exp(a))  # noqa: E731
        z = odds(c) - odds(r)
        assert loss[i].item() == pytest.approx(-c - lam * math.log(_sig(z)), rel=1e-10)
        # d odds(a)/da = 1 + e^a / (1 - e^a) = 1 / (1 - e^a)
        dz_dc = 1 / (1 - math.exp(c))
        dz_dr = -1 / (1 - math.exp(r))
        assert ac.grad[i].item() == pytest.approx(-1 - lam * _sig(-z) * dz_dc, rel=1e-8)
        assert ar.grad[i].item() == pytest.approx(-lam * _sig(-z) * dz_dr, rel=1e-8)


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    lp = _leaf(-3.0, -8.0, -1.0)
    loss, rc, rr = dpo_loss(lp, lp * 0.5, lp.detach(), lp.detach() * 0.5, beta=0.1)
    assert torch.allclose(loss, torch.full((3,), math.log(2), dtype=torch.float64))
    assert torch.count_nonzero(rc) == 0 and torch.count_nonzero(rr) == 0


# ---------------------------------------------------------------------------------------
# Masked log-prob sums
# ---------------------------------------------------------------------------------------


def test_sequence_logps_sum_exactly_the_labelled_reply_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6, IGNORE_INDEX],
                           [IGNORE_INDEX, 3, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    sums, counts = sequence_logps(logits, labels)
    logp = torch.log_softmax(logits, -1)
    # Token t is predicted at position t - 1.
    want0 = logp[0, 1, 4] + logp[0, 2, 5] + logp[0, 3, 6]
    want1 = logp[1, 0, 3] + logp[1, 1, 2]
    assert sums[0].item() == pytest.approx(want0.item(), rel=1e-6)  # float32 math
    assert sums[1].item() == pytest.approx(want1.item(), rel=1e-6)
    assert counts.tolist() == [3, 2]


def test_collate_pairs_puts_chosen_first_then_rejected():
    rows = [{"id": "a", "input_ids": [1, 2, 3], "labels": [-100, 2, 3],
             "rejected_input_ids": [1, 2, 4, 5], "rejected_labels": [-100, 2, 4, 5]},
            {"id": "b", "input_ids": [6, 7], "labels": [-100, 7],
             "rejected_input_ids": [6, 8], "rejected_labels": [-100, 8]}]
    b = collate_pairs(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0], [6, 7, 0, 0], [1, 2, 4, 5], [6, 8, 0, 0]]
    assert b["labels"][2].tolist() == [-100, 2, 4, 5]
    assert b["attention_mask"].tolist()[1] == [1, 1, 0, 0]


def test_packed_pairs_are_one_row_without_padding_chosen_first():
    rows = [{"id": "a", "input_ids": [1, 2, 3], "labels": [-100, 2, 3],
             "rejected_input_ids": [1, 2, 4, 5], "rejected_labels": [-100, 2, 4, 5]},
            {"id": "b", "input_ids": [6, 7], "labels": [-100, 7],
             "rejected_input_ids": [6, 8], "rejected_labels": [-100, 8]}]
    b = collate_pairs(rows, pad_id=0, packed=True)
    assert b["input_ids"].tolist() == [[1, 2, 3, 6, 7, 1, 2, 4, 5, 6, 8]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1]]
    assert b["seq_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]]
    mask = b["attention_mask"][0, 0]
    assert mask.shape == (11, 11) and bool(mask[4, 3]) and not bool(mask[5, 4])
    sft = collate_chosen(rows, pad_id=0, packed=True)
    assert sft["input_ids"].tolist() == [[1, 2, 3, 6, 7]]
    assert collate_chosen(rows, pad_id=0)["input_ids"].tolist() == [[1, 2, 3], [6, 7, 0]]


def test_packed_sequence_logps_sum_per_sequence_and_never_across_a_start():
    torch.manual_seed(0)
    logits = torch.randn(1, 7, 11, dtype=torch.float64)
    # Two sequences [0..3] and [4..6]; the second's first token carries a label, which a
    # packed row must not score (it would be predicted from the first sequence's end).
    labels = torch.tensor([[IGNORE_INDEX, 4, 5, 6, 7, 8, 9]])
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    sums, counts = sequence_logps(logits, labels, position_ids)
    logp = torch.log_softmax(logits, -1)[0]
    want0 = logp[0, 4] + logp[1, 5] + logp[2, 6]
    want1 = logp[4, 8] + logp[5, 9]
    assert sums.tolist() == pytest.approx([want0.item(), want1.item()], rel=1e-6)
    assert counts.tolist() == [3, 2]
    with pytest.raises(ValueError, match="one row"):
        sequence_logps(logits.expand(2, -1, -1), labels.expand(2, -1), position_ids)


# ---------------------------------------------------------------------------------------
# On a tiny model
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("llama")))


def _pairs(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        p = torch.randint(5, 200, (3 + i % 3,), generator=g).tolist()
        c = torch.randint(5, 200, (2 + i % 4,), generator=g).tolist()
        r = torch.randint(5, 200, (4 + i % 2,), generator=g).tolist()
        rows.append({"id": str(i), "input_ids": p + c, "labels": [-100] * len(p) + c,
                     "rejected_input_ids": p + r, "rejected_labels": [-100] * len(p) + r})
    return rows


def _lora(tiny, nonzero_seed: int | None = None):
    """A LoRA model of the tiny llama; with `nonzero_seed`, its B matrices drawn non-zero."""
    cfg = load_config(None, [f"model.name_or_path={tiny}", "peft.r=4", "peft.dropout=0"])
    torch.manual_seed(0)
    model = methods.build(load_model(cfg.model, device="cpu", dtype="fp32"), cfg.peft, 10)
    if nonzero_seed is not None:
        torch.manual_seed(nonzero_seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return model


def test_concatenated_batch_gives_the_loss_of_two_separate_passes(tiny):
    model = _lora(tiny)
    rows = _pairs(4)
    obj = Objective("simpo", beta=2.0, gamma=0.3, pairs_per_rank=4)
    batch = collate_pairs(rows, pad_id=0)
    loss, sums = obj.loss(model, {k: batch[k] for k in ("input_ids", "labels", "attention_mask")})
    # Two passes: chosen alone, rejected alone, each with its own padding.
    sides = []
    for key in ("", "rejected_"):
        b = collate([{"input_ids": r[f"{key}input_ids"], "labels": r[f"{key}labels"]}
                     for r in rows], pad_id=0)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        s, n = sequence_logps(out.logits, b["labels"])
        sides.append(s / n)
    want, _, _ = simpo_loss(sides[0], sides[1], beta=2.0, gamma=0.3)
    assert loss.item() == pytest.approx(want.mean().item(), abs=1e-5)
    assert sums["pairs"] == 4


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flash"])
@pytest.mark.parametrize("name", ["dpo", "simpo", "orpo"])
def test_packed_pairs_give_the_padded_loss_metrics_and_gradient(tiny, name, attn):
    """One packed row per micro-batch (no padding, block mask; on the flash path one row
    whose positions restart, through transformers' own varlen code with exact SDPA kernel
    stand-ins) gives the loss, metrics and adapter gradient of the padded batch, with the
    reference (adapter disabled) run on the packed row too."""
    from flash_standin import IMPL, sdpa_flash_kernels

    from ift.train.collate import model_inputs

    model = _lora(tiny, nonzero_seed=4)  # policy and reference differ
    rows = _pairs(5)  # prompts and replies of several lengths: the padded batch has pads
    inner = methods.unwrap(model)
    impl = {"flash": IMPL}.get(attn, attn)

    def run(packed):
        model.zero_grad()
        obj = Objective(name, beta=0.5, gamma=0.2, lam=0.3, pairs_per_rank=5,
                        reference=disabled_adapter_reference(model))
        batch = collate_pairs(rows, pad_id=0, packed=packed)
        kernel = impl if packed else "sdpa"
        inputs = model_inputs(batch, attn_implementation=kernel)
        inner.config._attn_implementation = kernel
        with sdpa_flash_kernels():
            loss, sums = obj.loss(model, inputs)
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return loss.item(), sums, grads, inputs

    try:
        padded = run(False)
        packed = run(True)
    finally:
        inner.config._attn_implementation = "sdpa"
    assert packed[3]["input_ids"].shape[0] == 1
    assert packed[3]["input_ids"].numel() == sum(
        len(r["input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    assert padded[3]["input_ids"].numel() > packed[3]["input_ids"].numel()
    assert packed[0] == pytest.approx(padded[0], abs=1e-5)
    if name == "dpo":
        assert abs(packed[0] - math.log(2)) > 1e-3
    for key in ("rewards/chosen", "rewards/margin", "rewards/accuracy", "logps/rejected",
                "pairs"):
        assert packed[1][key] == pytest.approx(padded[1][key], abs=1e-4), key
    for a, b in zip(packed[2], padded[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dpo_with_adapter_disabled_reference_starts_at_ln2(tiny):
    model = _lora(tiny)  # LoRA B starts at zero: the policy is the base model
    obj = Objective("dpo", beta=0.1, pairs_per_rank=5,
                    reference=disabled_adapter_reference(model))
    batch = collate_pairs(_pairs(5), pad_id=0)
    loss, sums = obj.loss(model, {k: batch[k] for k in ("input_ids", "labels", "attention_mask")})
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    m = means(sums)
    assert m["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    loss.backward()  # the adapter gets a gradient through the policy pass only
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_precomputed_reference_logps_give_the_on_the_fly_loss_and_gradient(tiny):
    """Reference log-probs scored once by the base model (ift.train.ref_logps, other batch
    sizes and padding) and carried by the rows give the loss and gradient of running the
    reference (the adapter disabled) on every batch."""
    from ift.train.ref_logps import REF_COLUMNS, reference_logps

    model = _lora(tiny, nonzero_seed=3)  # policy and reference differ
    rows = _pairs(6)
    cfg = load_config(None, [f"model.name_or_path={tiny}"])
    base = load_model(cfg.model, device="cpu", dtype="fp32")
    scored = reference_logps(base, rows, pad_id=0, batch_size=4)
    cached = [{**r, REF_COLUMNS[0]: float(c), REF_COLUMNS[1]: float(x)}
              for r, (c, x) in zip(rows, scored)]
    keys = ("input_ids", "labels", "attention_mask")

    def run(obj, batch_rows, extra=()):
        model.zero_grad()
        batch = collate_pairs(batch_rows, pad_id=0)
        loss, sums = obj.loss(model, {k: batch[k] for k in (*keys, *extra)})
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return loss.item(), sums, grads

    live = run(Objective("dpo", beta=0.1, pairs_per_rank=6,
                         reference=disabled_adapter_reference(model)), rows)
    pre = run(Objective("dpo", beta=0.1, pairs_per_rank=6), cached, extra=("ref_logps",))
    assert abs(live[0] - math.log(2)) > 1e-3
    assert pre[0] == pytest.approx(live[0], abs=1e-6)
    for key in ("rewards/chosen", "rewards/margin", "logps/rejected"):
        assert pre[1][key] == pytest.approx(live[1][key], abs=1e-5)
    for a, b in zip(pre[2], live[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_held_out_pair_metrics_of_an_untrained_adapter(tiny):
    from ift.eval.preference import pair_metrics

    model = _lora(tiny)
    rows = _pairs(6)
    m = pair_metrics(model, rows, pad_id=0, batch_size=4, device="cpu", beta=0.1)
    batch = collate_pairs(rows, pad_id=0)
    s, n = sequence_logps(model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits, batch["labels"])
    avg = (s / n).detach()
    assert m["pref_pairs"] == 6
    assert m["pref_accuracy"] == pytest.approx(float((avg[:6] > avg[6:]).float().mean()))
    assert m["pref_margin"] == pytest.approx(float((avg[:6] - avg[6:]).mean()), abs=1e-5)
    # The adapter is zero: the policy is its reference, no pair has a positive reward.
    assert m["reward_accuracy"] == 0.0 and m["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_preference_objectives_need_pair_data_and_adapters_need_lora(tmp_path):
    from ift.config import ConfigError
    from ift.train.driver import check_objective

    sft = {"kind": None}
    pref = {"kind": "preference"}
    cfg = load_config(None, ["train.objective=dpo"])
    with pytest.raises(ConfigError, match="train.objective=dpo needs preference pairs"):
        check_objective(cfg, sft, "d")
    assert check_objective(cfg, pref, "d") is True
    assert check_objective(load_config(None, []), pref, "d") is True  # sft on the chosen side
    cfg = load_config(None, ["train.objective=dpo", f"model.adapter={tmp_path}"])
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        check_objective(cfg, pref, "d")
    cfg = load_config(None, ["peft.method=full", f"model.adapter={tmp_path}"])
    with pytest.raises(ConfigError, match="use peft.method=lora or dora"):
        check_objective(cfg, pref, "d")
    with pytest.raises(ConfigError, match="train.objective='kto' is not allowed"):
        load_config(None, ["train.objective=kto"])


def test_a_run_resumes_only_with_the_objective_it_was_trained_with():
    from ift.config import ConfigError
    from ift.train.loop import make_plan
    from ift.train.worker import check_resumable

    cfg = load_config(None, ["train.objective=simpo"])
    plan = make_plan(40, 0, cfg.train)
    state = {"method": "lora", "global_batch_size": plan.global_batch_size,
             "objective": "dpo"}
    with pytest.raises(ConfigError, match="train.objective=dpo, this run asks for simpo"):
        check_resumable(state, plan, cfg.peft, cfg.train, "ckpt")
    check_resumable({**state, "objective": "simpo"}, plan, cfg.peft, cfg.train, "ckpt")


def test_objective_for_binds_the_reference_the_run_calls_for():
    from types import SimpleNamespace

    from ift.train.preference import objective_for

    plan = SimpleNamespace(ref_logps="", global_batch_size=8, world_size=2)
    model = torch.nn.Linear(2, 2)
    copies = []

    def load_copy():
        copies.append(torch.nn.Linear(2, 2))
        return copies[-1]

    def kind(train_overrides, **kw):
        t = load_config(None, train_overrides).train
        o = objective_for(t, model, kw.pop("plan", plan), load_copy, **kw)
        return o if o is None else (o, (o.reference.__qualname__.split(".")[0]
                                        if o.reference else None))

    assert kind([], method="lora") is None  # sft
    o, ref = kind(["train.objective=dpo", "train.beta=0.3"], method="lora")
    assert ref == "disabled_adapter_reference" and o.beta == 0.3 and o.pairs_per_rank == 4
    assert kind(["train.objective=dpo"], method="lora", adapter="/runs/a/final")[1] == \
        "frozen_adapter_reference"
    assert kind(["train.objective=dpo"], method="full")[1] == "frozen_copy_reference"
    assert len(copies) == 1 and not any(p.requires_grad for p in copies[0].parameters())
    precomputed = SimpleNamespace(ref_logps="/p/ref_logps/k", global_batch_size=8, world_size=1)
    assert kind(["train.objective=dpo"], method="full", plan=precomputed)[1] is None
    o, ref = kind(["train.objective=simpo", "train.simpo_gamma=0.7"], method="lora")
    assert ref is None and o.name == "simpo" and o.gamma == 0.7
    assert len(copies) == 1  # only full/freeze dpo without precomputed log-probs loads one
