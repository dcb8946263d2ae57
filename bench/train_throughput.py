"""Training throughput: `ift train` against a bare PyTorch + PEFT loop and an HF Trainer.

Arms (same tiny llama, same LoRA config, same micro batch, same rows, AdamW, CPU):
  a         `ift train` with one Ray Train worker (ift.train.driver.train), unpacked data
  a_packed  the same with packed data (data.pack=true)
  b         a bare single-process PyTorch + PEFT loop over the same unpacked batches,
            padded to the longest row of each batch: the no-framework reference
  c         an HF Trainer with DataCollatorForSeq2Seq (padding, no packing), the way
            Alpaca-CoT trains
  a2        `ift train` with two Ray Train workers, each with --threads threads: data
            parallelism (a global step trains two micro-batches)
  a_bf16    arm a with bf16 weights (model.dtype=bf16) instead of fp32

All arms train on the same micro-batches in the same order: b and c rebuild the driver's
schedule (file order, a seeded permutation per epoch). Each arm runs in its own process; a
sampler records the peak RSS of that process tree (Ray's processes included for `a`).
Throughput is measured at steady state: the first --warmup optimizer steps are skipped and
the rate is tokens of the remaining steps over the wall time between the end of the last
warmup step and the end of the last step. "tokens" are real (non-pad) tokens; "trainable
tokens" are those whose shifted label is not -100 (the tokens the loss is taken over).
With --repeats N the arms run in N interleaved rounds and rates are medians.

Targets: a / b >= 0.9 (the framework costs at most 10%), a_packed / c >= 1.5 in trainable
tokens per second, a2 / a >= 1.6 in tokens per second (the limit is 2.0); a_bf16 / a is
reported against 1.0. Each arm also reports the min and max of tokens/s over the rounds. Results: bench/results/train_throughput.json and a printed table.

    python bench/train_throughput.py            # full run (--steps 40)
    python bench/train_throughput.py --quick    # smoke run, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO,
    SHARED_DATA,
    format_table,
    run_measured,
    write_result,
)

ALPACA = SHARED_DATA / "llama-factory" / "alpaca_en_demo.json"
ARMS = ("a", "a_packed", "b", "c", "a2", "a_bf16")
DESCRIPTIONS = {
    "a": "ift train, 1 Ray Train worker, unpacked",
    "a_packed": "ift train, 1 Ray Train worker, packed",
    "a2": "ift train, 2 Ray Train workers (same threads each), unpacked",
    "a_bf16": "ift train, 1 Ray Train worker, unpacked, bf16 weights",
    "b": "bare PyTorch + PEFT loop, unpacked",
    "c": "HF Trainer + DataCollatorForSeq2Seq, unpacked",
}
TARGETS = {"a_over_b": 0.9, "a_packed_over_c": 1.5, "a2_over_a": 1.6}
IGNORE = -100


# =======================================================================================
# Setup (parent process): data, tiny model, prepared datasets
# =======================================================================================


def synthetic_alpaca(n: int = 1000, seed: int = 0) -> list[dict]:
    """Alpaca rows with a long-tailed length mix, for machines without the shared data."""
    rng = random.Random(seed)
    words = ("the model data step answer explain because first then next list each value "
             "small large water light energy city river plan reason write short simple "
             "number result question example change people time world system").split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."

    rows = []
    for _ in range(n):
        out_len = min(int(rng.lognormvariate(4.0, 0.8)), 600)
        rows.append({"instruction": text(rng.randint(5, 25)),
                     "input": text(rng.randint(3, 40)) if rng.random() < 0.4 else "",
                     "output": text(max(out_len, 3))})
    return rows


def data_file(work: Path) -> tuple[Path, str]:
    if ALPACA.is_file():
        return ALPACA, "shared/data/llama-factory/alpaca_en_demo.json"
    path = work / "synthetic_alpaca.json"
    if not path.exists():
        path.write_text(json.dumps(synthetic_alpaca(), ensure_ascii=False), encoding="utf-8")
    return path, "synthetic alpaca rows (shared data absent)"


def build_model(work: Path, data: Path, a: argparse.Namespace) -> Path:
    from ift.models import init_tiny

    out = work / f"model-llama-h{a.hidden}-l{a.layers}-v{a.vocab}-s{a.seq_len}"
    if not (out / "ift_tiny.json").exists():
        init_tiny(str(out), arch="llama", data=[str(data)], vocab_size=a.vocab,
                  hidden_size=a.hidden, layers=a.layers, heads=a.heads, seed=0,
                  max_positions=a.seq_len)
    return out


def base_config(spec: dict, *, pack: bool) -> dict:
    """The raw config dict shared by data preparation and `ift train`."""
    return {
        "storage": {"root": spec["work"]},
        "model": {"name_or_path": spec["model"], "dtype": "fp32"},
        "data": {
            "sources": [{"path": spec["data"], "format": "alpaca", "name": "alpaca"}],
            "output": spec["prepared_packed" if pack else "prepared"],
            "max_seq_len": spec["seq_len"],
            "pack": pack,
            "val_ratio": 0.02,
            "seed": spec["seed"],
        },
        "peft": {"method": "lora", **spec["lora"]},
        "tracking": {"experiment": "bench-train-throughput"},
    }


# =======================================================================================
# Measurement helpers (child processes)
# =======================================================================================


def steady_rate(step_ends: list[float], tokens: list[int], trainable: list[int],
                warmup: int) -> dict[str, Any]:
    """Rates over steps [warmup, n): tokens of those steps over the time from the end of
    step warmup-1 to the end of step n-1. Also the per-step times of those steps, so that
    arms that trained on the same batches can be compared step by step."""
    n = len(step_ends)
    if n < 2:
        raise RuntimeError(f"need at least 2 steps to measure a rate, got {n}")
    warmup = max(1, min(warmup, n - 1))
    elapsed = step_ends[-1] - step_ends[warmup - 1]
    tok = sum(tokens[warmup:])
    trn = sum(trainable[warmup:])
    dts = [step_ends[i] - step_ends[i - 1] for i in range(warmup, n)]
    rates = sorted(t / max(d, 1e-9) for t, d in zip(tokens[warmup:], dts))
    return {
        "steps": n,
        "warmup_steps": warmup,
        "measured_steps": n - warmup,
        "measured_s": round(elapsed, 3),
        "mean_step_s": round(elapsed / (n - warmup), 4),
        "tokens_per_step": round(tok / (n - warmup), 1),
        "tokens_per_s": round(tok / elapsed, 2),
        "trainable_tokens_per_s": round(trn / elapsed, 2),
        "median_step_tokens_per_s": round(rates[len(rates) // 2], 2),
        "step_times_s": [round(d, 4) for d in dts],  # steps warmup+1 .. n (1-based)
    }


def read_rows(prepared: str, split: str = "train") -> list[dict]:
    """A split's rows in file order: the order `ift train` indexes them in."""
    import pyarrow.parquet as pq

    from ift.data.dataset import split_files

    rows: list[dict] = []
    for f in split_files(prepared, split):
        rows.extend(pq.read_table(f, columns=["input_ids", "labels"]).to_pylist())
    if not rows:
        raise RuntimeError(f"{prepared}/{split} holds no rows")
    return rows


def epoch_order(num_rows: int, seed: int, epoch: int):
    """The driver's row order for an epoch (the same formula when it is not importable)."""
    try:
        from ift.train.loop import epoch_order as driver_order
    except ImportError:
        import numpy as np

        return np.random.default_rng([seed, epoch]).permutation(num_rows)
    return driver_order(num_rows, seed, epoch)


def schedule(rows: list[dict], steps: int, micro_batch: int, seed: int) -> list[list[dict]]:
    """The micro-batch of each step for one worker without accumulation, as `ift train`
    draws them: a seeded permutation per epoch, consecutive slices of it."""
    per_epoch = len(rows) // micro_batch
    if per_epoch < 1:
        raise RuntimeError(f"{len(rows)} rows cannot fill a micro batch of {micro_batch}")
    out, order, order_epoch = [], None, -1
    for step in range(steps):
        epoch, b = divmod(step, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(rows), seed, epoch), epoch
        out.append([rows[int(i)] for i in order[b * micro_batch:(b + 1) * micro_batch]])
    return out


def counts(batch_rows: list[dict]) -> tuple[int, int]:
    """(real tokens, trainable tokens) of a micro-batch; trainable = labels after the causal
    shift that are not -100, the tokens the loss is taken over."""
    tokens = sum(len(r["input_ids"]) for r in batch_rows)
    trainable = sum(sum(1 for x in r["labels"][1:] if x != IGNORE) for r in batch_rows)
    return tokens, trainable


def lora_model(spec: dict):
    import torch
    from peft import LoraConfig, get_peft_model

    from ift.config import ModelConfig
    from ift.models import find_lora_targets, load_model

    torch.manual_seed(spec["seed"])
    model = load_model(ModelConfig(name_or_path=spec["model"], dtype="fp32"), device="cpu")
    lora = spec["lora"]
    targets = find_lora_targets(model, lora["target_modules"])
    peft_cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def pad_batch(rows: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest row: input_ids with pad_id, labels with -100."""
    import torch

    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def arm_bare(spec: dict) -> dict:
    """(b) The no-framework reference: a plain loop, AdamW, grad clipping."""
    import torch

    from ift.models import load_tokenizer

    torch.set_num_threads(spec["threads"])
    pad_id = load_tokenizer(spec["model"]).pad_token_id
    steps = schedule(read_rows(spec["prepared"]), spec["steps"], spec["micro_batch"],
                     spec["seed"])
    model = lora_model(spec)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    ends, toks, trn, cells = [], [], [], 0
    for chunk in steps:
        batch = pad_batch(chunk, pad_id)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
        tok, tr = counts(chunk)
        toks.append(tok)
        trn.append(tr)
        cells += batch["input_ids"].numel()
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at step {len(ends)}")
    out = steady_rate(ends, toks, trn, spec["warmup"])
    out["padding_fraction"] = round(1 - sum(toks) / cells, 4)
    out["final_loss"] = round(float(loss), 4)
    return out


def arm_hf_trainer(spec: dict) -> dict:
    """(c) HF Trainer + DataCollatorForSeq2Seq over the same micro-batches, in order."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from ift.models import load_tokenizer

    torch.set_num_threads(spec["threads"])
    tok = load_tokenizer(spec["model"])
    steps = schedule(read_rows(spec["prepared"]), spec["steps"], spec["micro_batch"],
                     spec["seed"])
    model = lora_model(spec)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)
    cells: list[int] = []  # padded batch sizes, in batch order

    def collate(features):
        batch = collator(features)
        cells.append(batch["input_ids"].numel())
        return batch

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=os.path.join(spec["work"], "hf-trainer"),
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1,
        max_steps=len(steps),
        learning_rate=spec["lr"],
        weight_decay=0.0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        max_grad_norm=spec["max_grad_norm"],
        train_sampling_strategy="sequential",  # the rows are laid out batch by batch
        dataloader_num_workers=0,
        logging_steps=len(steps) + 1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=spec["seed"],
    )
    flat = [r for chunk in steps for r in chunk]
    trainer = Trainer(model=model, args=args, data_collator=collate,
                      train_dataset=Dataset.from_list(flat), callbacks=[StepTimes()])
    result = trainer.train()
    if len(ends) != len(steps):
        raise RuntimeError(f"HF Trainer ran {len(ends)} steps, expected {len(steps)}")
    per_step = [counts(chunk) for chunk in steps]
    toks = [c[0] for c in per_step]
    out = steady_rate(ends, toks, [c[1] for c in per_step], spec["warmup"])
    out["padding_fraction"] = round(1 - sum(toks) / sum(cells[:len(steps)]), 4)
    out["final_loss"] = round(float(result.training_loss), 4)
    return out


def rate_from_metrics(path: str, warmup: int, steps: list[list[dict]],
                      limit: int | None = None) -> dict[str, Any]:
    """Steady-state rates of an `ift train` run from its metrics.jsonl.

    Wall time is the gap between the rows' `time` stamps (written by rank 0 after each
    step), so everything the framework does between steps counts. Token counts come from
    the same batch schedule (`steps`); the run's own per-step ratio tokens_per_s /
    trainable_tokens_per_s (same step time in both) must agree with them, which checks
    that the schedule is the one the run trained on. A final step that also evaluated is
    left out (its time includes the evaluation), and so is every step after `limit`.
    """
    from ift import storage

    rows = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    latest = {}
    for r in rows:
        if "step" in r and "time" in r:
            latest[int(r["step"])] = r  # a resumed run may repeat a step; keep the last
    got = [latest[k] for k in sorted(latest)]
    if [r["step"] for r in got] != list(range(1, len(got) + 1)):
        raise RuntimeError(f"{path}: steps are not 1..N: {[r['step'] for r in got][:10]}...")
    if got and got[-1].get("eval_loss") is not None:
        got = got[:-1]
    got = got[:limit]
    if len(got) > len(steps):
        raise RuntimeError(f"{path}: {len(got)} steps but a schedule of {len(steps)}")
    mismatches = 0
    toks, trn = [], []
    for r, chunk in zip(got, steps):
        tok, tr = counts(chunk)
        toks.append(tok)
        trn.append(tr)
        ratio_run = r["tokens_per_s"] / max(r["trainable_tokens_per_s"], 1e-9)
        if abs(ratio_run - tok / max(tr, 1)) > 1e-6 * max(ratio_run, 1.0):
            mismatches += 1
    if mismatches:
        raise RuntimeError(f"{path}: the token counts of {mismatches} of {len(got)} steps do "
                           "not match the batch schedule; cannot attribute tokens to steps")
    out = steady_rate([float(r["time"]) for r in got], toks, trn, warmup)
    out["final_loss"] = round(float(got[-1]["loss"]), 4)
    out["schedule_verified_steps"] = len(got)
    # The loop's own rate (collate + forward/backward/step only); the gap to tokens_per_s
    # is what the framework spends between steps.
    inner = sorted(r["tokens_per_s"] for r in got[warmup:])
    out["loop_tokens_per_s_median"] = round(inner[len(inner) // 2], 2)
    return out


def arm_ift(spec: dict, *, pack: bool, workers: int = 1, dtype: str = "fp32") -> dict:
    """(a) `ift train` through its driver: one worker (a2: two, each on a global step's
    consecutive slice of micro-batches), fp32 weights (a_bf16: bf16)."""
    from ift.config import build_config
    from ift.train.driver import train

    prepared = spec["prepared_packed" if pack else "prepared"]
    raw = base_config(spec, pack=pack)
    raw["model"]["dtype"] = dtype
    raw["train"] = {
        "data": prepared,
        "run_name": f"bench-{'packed' if pack else 'unpacked'}-w{workers}-{dtype}-"
                    f"{time.strftime('%Y%m%d-%H%M%S')}",
        "output": os.path.join(spec["work"], "runs"),
        "num_workers": workers,
        "cpus_per_worker": float(spec["threads"]),
        "micro_batch_size": spec["micro_batch"],
        "grad_accum": 1,
        # One step more than the other arms: the last step also evaluates (its time is left
        # out), so the measured steps are the same batches as in b and c.
        "max_steps": spec["steps"] + 1,
        "lr": spec["lr"],
        "scheduler": "constant",
        "warmup_steps": 0,
        "warmup_ratio": 0.0,
        "max_grad_norm": spec["max_grad_norm"],
        "eval_every": 0,
        "checkpoint_every": 0,
        "seed": spec["seed"],
    }
    cfg = build_config(raw)
    result = train(cfg)
    metrics_path = result.get("metrics_path") or os.path.join(result["run_dir"], "metrics.jsonl")
    # A global step trains `workers` consecutive micro-batches of the epoch order.
    steps = schedule(read_rows(prepared), spec["steps"], spec["micro_batch"] * workers,
                     cfg.train.seed)
    out = rate_from_metrics(metrics_path, spec["warmup"], steps, limit=spec["steps"])
    cells = sum(len(chunk) * max(len(r["input_ids"]) for r in chunk)
                for chunk in steps[:out["steps"]])
    out["padding_fraction"] = round(1 - sum(counts(c)[0] for c in steps[:out["steps"]]) / cells,
                                    4)
    out["run_dir"] = result.get("run_dir")
    return out


def child_main(arm: str, spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if arm in ("prepare", "prepare_packed"):
        from ift.config import build_config
        from ift.data.pipeline import prepare

        pack = arm == "prepare_packed"
        m = prepare(build_config(base_config(spec, pack=pack)))
        print(f"prepared pack={pack}: {m['splits']['train']}", flush=True)
        Path(out_path).write_text(json.dumps({"train": m["splits"]["train"],
                                              "padding_waste": m.get("padding_waste")}))
        return 0
    fns = {"a": lambda s: arm_ift(s, pack=False), "a_packed": lambda s: arm_ift(s, pack=True),
           "a2": lambda s: arm_ift(s, pack=False, workers=2),
           "a_bf16": lambda s: arm_ift(s, pack=False, dtype="bf16"),
           "b": arm_bare, "c": arm_hf_trainer}
    res = fns[arm](spec)
    Path(out_path).write_text(json.dumps(res))
    print(json.dumps(res), flush=True)
    return 0


# =======================================================================================
# Parent: run the arms, compare, report
# =======================================================================================


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": str(threads),  # Ray workers inherit it; b and c set torch's too
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    })
    env.pop("MLFLOW_TRACKING_URI", None)  # runs go to the bench's own sqlite store
    return env


def run_child(arm: str, spec: dict, spec_path: Path, work: Path, timeout: float) -> dict:
    out_path = work / f"result-{arm}.json"
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm,
           "--spec", str(spec_path), "--child-out", str(out_path)]
    load = round(os.getloadavg()[0], 2)
    m = run_measured(cmd, env=child_env(spec["threads"]), cwd=str(work), timeout=timeout,
                     log_path=work / f"log-{arm}.txt")
    res: dict[str, Any] = {"arm": arm, "description": DESCRIPTIONS.get(arm, arm),
                           "peak_rss_mb": m["peak_rss_mb"], "wall_s": m["wall_s"],
                           "load_avg_1m_before": load}
    if m["returncode"] == 0 and out_path.exists():
        res.update(json.loads(out_path.read_text()))
        res["status"] = "ok"
    else:
        res["status"] = "failed"
        res["reason"] = f"exit code {m['returncode']}; log {work / f'log-{arm}.txt'}"
        res["log_tail"] = m["log_tail"][-2000:]
    return res


def missing_driver() -> str | None:
    """Why arm a cannot run yet, or None."""
    try:
        from ift.train import driver  # noqa: F401
    except ImportError as e:
        return f"ift.train.driver is not importable ({e})"
    if not hasattr(driver, "train"):
        return "ift.train.driver has no train(cfg)"
    return None


def summarize(arm: str, runs: list[dict]) -> dict[str, Any]:
    """One arm over its repeats: medians of the rates, the highest peak RSS, every run."""
    base = {"arm": arm, "description": DESCRIPTIONS[arm], "repeats": len(runs), "runs": runs}
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        return {**base, "status": bad[0]["status"], "reason": bad[0].get("reason")}

    def med(key: str) -> float:
        vals = sorted(r[key] for r in runs)
        mid = len(vals) // 2
        return round(vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2, 2)

    out = {**base, "status": "ok"}
    for key in ("tokens_per_s", "trainable_tokens_per_s", "median_step_tokens_per_s",
                "mean_step_s", "tokens_per_step", "loop_tokens_per_s_median"):
        if all(key in r for r in runs):
            out[key] = med(key)
    # The spread over the rounds, and the load each round started under.
    out["tokens_per_s_min"] = min(r["tokens_per_s"] for r in runs)
    out["tokens_per_s_max"] = max(r["tokens_per_s"] for r in runs)
    out["load_avg_1m_before"] = [r["load_avg_1m_before"] for r in runs]
    for key in ("steps", "warmup_steps", "measured_steps", "padding_fraction"):
        out[key] = runs[0].get(key)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return out


def ratio(num: dict | None, den: dict | None, key: str, target: float) -> dict[str, Any]:
    """num[key] / den[key] against a target, over the arms' median rates."""
    if not (num and den and num.get("status") == "ok" and den.get("status") == "ok"):
        return {"value": None, "target": target, "pass": None, "metric": key,
                "note": "not measured: an arm is missing, blocked or failed"}
    value = num[key] / den[key]
    return {"value": round(value, 3), "target": target, "pass": bool(value >= target),
            "metric": key}


def paired_step_ratio(num: dict | None, den: dict | None) -> float | None:
    """Median over steps of den's step time / num's step time, pairing runs of the same
    repeat round and steps of the same number. Valid where both arms trained on the same
    batches; it discounts slow steps caused by other load on the machine."""
    if not (num and den and num.get("status") == "ok" and den.get("status") == "ok"):
        return None
    pairs = sorted(d / max(n, 1e-9) for rn, rd in zip(num["runs"], den["runs"])
                   for n, d in zip(rn["step_times_s"], rd["step_times_s"]))
    return round(pairs[len(pairs) // 2], 3) if pairs else None


def compare(results: dict[str, dict]) -> dict[str, Any]:
    """The ratios against their targets (and, for a, the time spent between steps)."""
    ratios = {
        "a_over_b": ratio(results.get("a"), results.get("b"), "tokens_per_s",
                          TARGETS["a_over_b"]),
        "a_over_b_trainable": ratio(results.get("a"), results.get("b"),
                                    "trainable_tokens_per_s", TARGETS["a_over_b"]),
        "a_packed_over_c": ratio(results.get("a_packed"), results.get("c"),
                                 "trainable_tokens_per_s", TARGETS["a_packed_over_c"]),
        # Data parallelism: 2 workers over 1, each with the same threads (the limit is 2.0).
        "a2_over_a": ratio(results.get("a2"), results.get("a"), "tokens_per_s",
                           TARGETS["a2_over_a"]),
        # bf16 weights over fp32 (information: faster only where the CPU has bf16 units).
        "a_bf16_over_a": ratio(results.get("a_bf16"), results.get("a"), "tokens_per_s", 1.0),
    }
    # a, b and c train on the same batches: a per-step comparison, robust to load spikes.
    # The a/b verdict needs both estimates on the same side of the target; when they
    # disagree (a loaded machine) it is reported as inconclusive rather than as a pass.
    paired = paired_step_ratio(results.get("a"), results.get("b"))
    for key in ("a_over_b", "a_over_b_trainable"):
        r = ratios[key]
        r["paired_step_median"] = paired
        if r["pass"] is not None and paired is not None and (paired >= r["target"]) != r["pass"]:
            r["pass"] = None
            r["note"] = ("inconclusive: the ratio of median rates and the per-step paired "
                         "median fall on different sides of the target; rerun on an idle "
                         "machine or with more --repeats")
    ratios["c_over_b_paired_step_median"] = paired_step_ratio(results.get("c"),
                                                              results.get("b"))
    for arm in ("a", "a_packed", "a2", "a_bf16"):
        r = results.get(arm) or {}
        if r.get("status") == "ok" and r.get("loop_tokens_per_s_median"):
            # Share of wall time outside the worker's own step: reporting, logging, waits.
            r["between_steps_fraction"] = round(
                1 - r["tokens_per_s"] / r["loop_tokens_per_s_median"], 3)
    return ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few steps")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (40)")
    p.add_argument("--warmup", type=int, default=None, help="steps skipped before timing (5)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved rounds over the arms; rates are medians (1, quick: 1)")
    p.add_argument("--model", help="model dir, or smollm2-135m-instruct (imported once per "
                                   "machine); default: a tiny llama of --hidden/--layers/...")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in every arm (and CPUs of the Ray Train worker)")
    p.add_argument("--work", default=str(REPO / "ift-work" / "bench" / "train_throughput"),
                   help="work dir (model, prepared data, runs; reused across runs)")
    p.add_argument("--results-dir", default=None, help="default: bench/results")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per arm")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps is None:
        a.steps = 8 if a.quick else 40
    if a.warmup is None:
        a.warmup = 2 if a.quick else 5
    if a.repeats is None:
        a.repeats = 1
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    if a.steps <= a.warmup:
        p.error(f"--steps ({a.steps}) must be greater than --warmup ({a.warmup})")
    bad = [x for x in a.arms.split(",") if x not in ARMS]
    if bad:
        p.error(f"--arms: unknown {bad} (allowed: {', '.join(ARMS)})")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        return child_main(a.child, a.spec, a.child_out)

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, data_desc = data_file(work)
    if a.model:
        from ift.model_import import model_path

        print(f"data: {data_desc}; model {a.model} ...", flush=True)
        model = Path(model_path(a.model))
    else:
        print(f"data: {data_desc}; building tiny model ...", flush=True)
        model = build_model(work, data, a)
    spec = {
        "work": str(work), "data": str(data), "model": str(model),
        "prepared": str(work / f"prepared-s{a.seq_len}"),
        "prepared_packed": str(work / f"prepared-s{a.seq_len}-packed"),
        "seq_len": a.seq_len, "micro_batch": a.micro_batch, "steps": a.steps,
        "warmup": a.warmup, "threads": a.threads, "seed": 42, "lr": 2e-4,
        "max_grad_norm": 1.0,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
    }
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))

    arms = a.arms.split(",")
    # Arm -> why it cannot run (missing code or data), checked before anything is timed.
    blocked: dict[str, str] = {}
    no_driver = missing_driver()
    if no_driver:
        blocked.update({x: no_driver for x in ("a", "a_packed", "a2", "a_bf16")})
    manifests: dict[str, Any] = {}
    for stage, key, needs in (("prepare", "prepared", ("a", "a2", "a_bf16", "b", "c")),
                              ("prepare_packed", "prepared_packed", ("a_packed",))):
        if not any(x in arms and x not in blocked for x in needs):
            continue
        print(f"{stage}: data preparation ...", flush=True)
        prep = run_child(stage, spec, spec_path, work, a.timeout)
        if prep["status"] == "ok":
            manifests[key] = {"train": prep["train"], "padding_waste": prep["padding_waste"]}
        else:
            why = f"data preparation ({stage}) failed: {prep['reason']}"
            print(why + "\n" + prep.get("log_tail", "")[-1500:], file=sys.stderr)
            blocked.update({x: why for x in needs})

    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for round_ in range(a.repeats):  # interleaved, so that every arm sees similar load
        for arm in arms:
            tag = f"[{arm} {round_ + 1}/{a.repeats}]"
            if arm in blocked:
                if round_ == 0:
                    runs[arm].append({"status": "not_measured", "reason": blocked[arm]})
                    print(f"{tag} not measured: {blocked[arm]}", flush=True)
                continue
            print(f"{tag} {DESCRIPTIONS[arm]} ...", flush=True)
            r = run_child(arm, spec, spec_path, work, a.timeout)
            runs[arm].append(r)
            print(f"{tag} {r['status']}: {r.get('tokens_per_s')} tok/s, "
                  f"{r.get('trainable_tokens_per_s')} trainable tok/s, "
                  f"peak RSS {r.get('peak_rss_mb')} MB, load {r['load_avg_1m_before']}",
                  flush=True)
            if r["status"] != "ok":
                print(r.get("log_tail", ""), file=sys.stderr)
                blocked[arm] = f"failed in round {round_ + 1}: {r.get('reason')}"
    results = {arm: summarize(arm, runs[arm]) for arm in arms}

    ratios = compare(results)
    setup = {k: v for k, v in spec.items() if k not in ("work",)}
    setup.update({"data_desc": data_desc, "quick": a.quick, "model_arch": "llama",
                  "hidden": a.hidden, "layers": a.layers, "heads": a.heads, "vocab": a.vocab,
                  "device": "cpu", "repeats": a.repeats})
    path = write_result("train_throughput", {
        "setup": setup,
        "prepared": manifests,
        "arms": results,
        "ratios": ratios,
        "targets": TARGETS,
    }, a.results_dir)

    cols = ["arm", "status", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max",
            "trainable_tokens_per_s", "mean_step_s",
            "padding_fraction", "measured_steps", "peak_rss_mb", "loop_tokens_per_s_median",
            "between_steps_fraction"]
    print()
    print(format_table([results[x] for x in arms], cols))
    print()
    for name, r in ratios.items():
        verdict = {True: "PASS", False: "FAIL"}.get(r.get("pass") if isinstance(r, dict)
                                                     else None)
        if verdict is None:
            verdict = "inconclusive" if isinstance(r, dict) and r.get("value") else "not measured"
        if not isinstance(r, dict):
            print(f"{name:28s} {r if r is not None else '-':>8}  (information)")
            continue
        paired = r.get("paired_step_median")
        print(f"{name:28s} {r['value'] if r['value'] is not None else '-':>8}  "
              f"target >= {r['target']}  {verdict}"
              + (f"  (per-step paired median {paired})" if paired is not None else ""))
    print(f"\nwrote {path}")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
