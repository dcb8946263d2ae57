"""The loop's pure parts: the step plan, the data order, the loss normalization, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_support import make_tiny_model, toy_records

from ift.config import ConfigError, load_config
from ift.data.tokenize import tokenize_records
from ift.models import load_model, load_tokenizer
from ift.train import methods
from ift.train.collate import collate
from ift.train.loop import (
    MetricsLog,
    StepEnv,
    collect_rows,
    epoch_order,
    epoch_rows_needed,
    evaluate,
    make_optimizer,
    make_plan,
    make_scheduler,
    progress_line,
    read_metrics,
    step_slots,
    train_step,
)
from ift.train.loss import token_loss_sum


def _train_cfg(*overrides):
    return load_config(None, list(overrides)).train


def test_plan_counts_steps_from_epochs_and_max_steps():
    plan = make_plan(50, 5, _train_cfg("train.micro_batch_size=4", "train.num_workers=2",
                                       "train.grad_accum=2", "train.epochs=2.5"))
    assert plan.global_batch_size == 16
    assert plan.steps_per_epoch == 3  # 50 // 16; the 2 rows left over are skipped
    assert plan.total_steps == 8  # ceil(2.5 × 3)
    plan = make_plan(50, 5, _train_cfg("train.max_steps=7", "train.warmup_steps=2"))
    assert plan.total_steps == 7 and plan.warmup_steps == 2
    plan = make_plan(100, 0, _train_cfg("train.max_steps=40", "train.warmup_ratio=0.1"))
    assert plan.warmup_steps == 4


def test_plan_rejects_a_global_batch_larger_than_the_data():
    cfg = _train_cfg("train.micro_batch_size=8", "train.num_workers=2", "train.grad_accum=4")
    with pytest.raises(ConfigError, match=r"micro_batch_size=8 × train.num_workers=2 × "
                                          r"train.grad_accum=4 = 64 rows .* only 20 rows"):
        make_plan(20, 0, cfg)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_order(100, 42, 0)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_order(100, 42, 0))
    assert not np.array_equal(a, epoch_order(100, 42, 1))
    assert not np.array_equal(a, epoch_order(100, 7, 0))


def _global_rows(plan, step):
    order = epoch_order(plan.num_rows, 3, step // plan.steps_per_epoch)
    return [sorted(int(i) for pos in step_slots(plan, r, step) for i in order[pos])
            for r in range(plan.world_size)]


def test_same_global_batch_whatever_the_worker_count():
    one = make_plan(40, 0, _train_cfg("train.micro_batch_size=4", "train.grad_accum=2",
                                      "train.max_steps=10"))
    two = make_plan(40, 0, _train_cfg("train.micro_batch_size=4", "train.num_workers=2",
                                      "train.max_steps=10"))
    assert one.global_batch_size == two.global_batch_size == 8
    seen = []
    for step in range(10):
        a = _global_rows(one, step)[0]
        b = sorted(sum(_global_rows(two, step), []))
        assert a == b
        seen.append(a)
    # An epoch (5 steps) visits every row exactly once; the next epoch reorders them.
    assert sorted(sum(seen[:5], [])) == list(range(40))
    assert seen[:5] != seen[5:]


def test_rows_needed_after_a_resume_are_the_rest_of_the_epoch():
    plan = make_plan(40, 0, _train_cfg("train.micro_batch_size=2", "train.num_workers=2",
                                       "train.max_steps=10"))
    order = epoch_order(40, 0, 0)
    whole = epoch_rows_needed(plan, 1, order, 0, 10)
    rest = epoch_rows_needed(plan, 1, order, 4, 10)
    assert len(whole) == 20 and rest < whole and len(rest) == 12


def test_collect_rows_keeps_the_needed_rows_in_stream_order():
    batches = [{"id": np.array(["a", "b"]), "input_ids": np.array([[1], [2]], dtype=object),
                "labels": np.array([[1], [2]], dtype=object)},
               {"id": np.array(["c"]), "input_ids": np.array([[3]], dtype=object),
                "labels": np.array([[3]], dtype=object)}]
    rows, n = collect_rows(batches, {0, 2}, expected_rows=3)
    assert n == 3 and sorted(rows) == [0, 2]
    assert rows[2]["id"] == "c" and rows[2]["input_ids"].tolist() == [3]
    with pytest.raises(RuntimeError, match="streamed 3 rows but its manifest says 4"):
        collect_rows(batches, None, expected_rows=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_model(str(tmp_path_factory.mktemp("llama")))
    tok = load_tokenizer(d)
    rows, _ = tokenize_records(toy_records(8), tok, template="chatml", max_seq_len=64)
    return d, tok, rows


def _lora(model_dir, lr=1e-2):
    """A LoRA model with plain SGD (the update is the gradient itself, so two runs'
    weights after a step compare their gradients)."""
    cfg = load_config(None, [f"model.name_or_path={model_dir}", "peft.dropout=0.0",
                             "peft.target_modules=[q_proj,v_proj]", f"train.lr={lr}",
                             "train.max_steps=4", "train.warmup_ratio=0"])
    torch.manual_seed(0)
    model = methods.build(load_model(cfg.model, device="cpu"), cfg.peft, 4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    return cfg, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)


def test_step_loss_is_the_mean_over_trainable_tokens_and_split_invariant(tiny):
    d, tok, rows = tiny
    env = StepEnv(method="lora", attn_implementation="sdpa")
    whole = [collate(rows, tok.pad_token_id)]
    # Uneven split: 3 + 5 rows with different token counts.
    split = [collate(rows[:3], tok.pad_token_id), collate(rows[3:], tok.pad_token_id)]

    _, model, opt, sched = _lora(d, lr=1.0)
    with torch.no_grad():  # transformers' own loss: the mean over trainable next tokens
        reference = float(model(**whole[0]).loss)
    n = int((whole[0]["labels"][:, 1:] != -100).sum())
    r1 = train_step(model, opt, sched, whole, env, 1)
    assert r1["loss"] == pytest.approx(reference, rel=1e-5)
    assert r1["trainable_tokens"] == n
    w1 = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}

    _, model, opt, sched = _lora(d, lr=1.0)
    r2 = train_step(model, opt, sched, split, env, 1)
    assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
    assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.detach(), w1[k], atol=1e-6, rtol=1e-4), k


def test_evaluate_reports_mean_token_loss_and_perplexity(tiny):
    d, tok, rows = tiny
    _, model, _, _ = _lora(d)
    batches = [collate(rows[:4], tok.pad_token_id), collate(rows[4:], tok.pad_token_id)]
    out = evaluate(model, batches, StepEnv(method="lora", attn_implementation="sdpa"))
    with torch.no_grad():
        total = [token_loss_sum(model(input_ids=b["input_ids"],
                                      attention_mask=b["attention_mask"]).logits, b["labels"])
                 for b in batches]
    loss = sum(s for s, _ in total) / sum(n for _, n in total)
    assert out["eval_loss"] == pytest.approx(loss, rel=1e-6)
    assert out["eval_ppl"] == pytest.approx(np.exp(loss), rel=1e-6)
    assert model.training  # left as it was found


def test_warmup_then_cosine_schedule(tiny):
    d, _, _ = tiny
    cfg = load_config(None, [f"model.name_or_path={d}", "train.lr=1.0", "train.max_steps=10",
                             "train.warmup_steps=2"])
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = make_scheduler(opt, cfg.train, make_plan(100, 0, cfg.train))
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.1


def test_metrics_log_keeps_every_line_and_reads_the_latest_per_step(tmp_path):
    log = MetricsLog(str(tmp_path))
    for step, loss, resumed in [(1, 3.0, 0), (2, 2.5, 0), (3, 2.4, 0), (3, 2.45, 2), (4, 2.2, 2)]:
        log.append({"step": step, "loss": loss, "resumed_from": resumed})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[3])["resumed_from"] == 2
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["loss"] == 2.45
    assert len(read_metrics(str(tmp_path), latest_per_step=False)) == 5


def test_progress_line_shows_step_loss_throughput_and_eta():
    line = progress_line(5, 20, {"loss": 1.23456, "lr": 2e-4, "tokens_per_s": 1234.5},
                         elapsed=10.0, steps_done=5)
    assert line.startswith("step 5/20 | loss 1.2346 | lr 2.00e-04 | 1,234 tok/s")
    assert line.endswith("ETA 0:00:30")


def test_optimizer_decays_matrices_only(tiny):
    d, _, _ = tiny
    cfg = load_config(None, [f"model.name_or_path={d}", "peft.method=full",
                             "train.weight_decay=0.1"])
    model = load_model(cfg.model, device="cpu")
    opt = make_optimizer(model, cfg.train)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
