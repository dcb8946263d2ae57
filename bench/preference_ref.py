"""DPO reference log-probs: run the reference on every step against precomputing them once
(`train.precompute_ref_logps`).

Arms (same model, same pairs, same micro-batches, AdamW, CPU, one process each):
  live         the training step runs the reference forward pass itself: the model with
               its adapter disabled (lora), or a frozen copy of the model (full)
  precomputed  the reference log-probs of every pair are scored once first
               (ift.train.ref_logps.reference_logps; that time is `precompute_s`), then the
               step takes them from the batch and runs no reference

Per arm: seconds per optimizer step (median over the steps after --warmup) and the peak
RSS of the process (the sampler of bench/common.py), the loss of the last step (both arms
must agree). With --repeats N the arms run in N interleaved rounds; the table gives the
median and the spread (min..max) over rounds. Results: bench/results/preference_ref.json.

    python bench/preference_ref.py                      # tiny llama, lora and full
    python bench/preference_ref.py --model DIR          # any HF model dir (e.g. SmolLM2)
    python bench/preference_ref.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, PeakRSS, format_table, run_measured, write_result  # noqa: E402

ARMS = ("live", "precomputed")


def make_pairs(n: int, prompt_len: int, reply_len: int, vocab: int, seed: int = 0
               ) -> list[dict[str, Any]]:
    """Token pairs: a shared prompt, a chosen and a rejected reply of varied lengths."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = [rng.randrange(5, vocab) for _ in range(prompt_len)]
        c = [rng.randrange(5, vocab) for _ in range(rng.randint(reply_len // 4, reply_len))]
        r = [rng.randrange(5, vocab) for _ in range(rng.randint(reply_len // 2, reply_len))]
        rows.append({"id": str(i), "input_ids": p + c, "labels": [-100] * len(p) + c,
                     "rejected_input_ids": p + r, "rejected_labels": [-100] * len(p) + r})
    return rows


def arm_main(a: argparse.Namespace) -> None:
    """One arm in this process: prints one JSON line."""
    import torch

    from ift.config import load_config
    from ift.models import load_model
    from ift.train import methods
    from ift.train.preference import (
        Objective,
        collate_pairs,
        disabled_adapter_reference,
        frozen_copy_reference,
    )
    from ift.train.ref_logps import REF_COLUMNS, reference_logps

    torch.set_num_threads(a.threads)
    cfg = load_config(None, [f"model.name_or_path={a.model}", f"peft.method={a.method}",
                             "peft.r=16", "peft.dropout=0", "model.dtype=fp32"])
    meter = PeakRSS().start()
    torch.manual_seed(0)
    model = methods.build(load_model(cfg.model, device="cpu", dtype="fp32"), cfg.peft, a.steps)
    vocab = model.config.vocab_size
    rows = make_pairs(a.steps * a.batch, a.prompt_len, a.reply_len, vocab)
    precompute_s = 0.0
    if a.arm == "live":
        ref = (disabled_adapter_reference(model) if a.method == "lora"
               else frozen_copy_reference(load_model(cfg.model, device="cpu", dtype="fp32")))
        obj = Objective("dpo", beta=0.1, pairs_per_rank=a.batch, reference=ref)
    else:
        t0 = time.perf_counter()
        base = load_model(cfg.model, device="cpu", dtype="fp32")
        scored = reference_logps(base, rows, pad_id=0, batch_size=a.batch)
        del base
        precompute_s = time.perf_counter() - t0
        rows = [{**r, REF_COLUMNS[0]: float(c), REF_COLUMNS[1]: float(x)}
                for r, (c, x) in zip(rows, scored)]
        obj = Objective("dpo", beta=0.1, pairs_per_rank=a.batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times, loss = [], 0.0
    keys = ("input_ids", "labels", "attention_mask", "ref_logps")
    for s in range(a.steps):
        batch = collate_pairs(rows[s * a.batch:(s + 1) * a.batch], pad_id=0)
        t0 = time.perf_counter()
        out, _ = obj.loss(model, {k: batch[k] for k in keys if k in batch})
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        loss = float(out)
    meter.stop()
    steady = times[a.warmup:] or times
    print(json.dumps({"arm": a.arm, "method": a.method, "step_s": statistics.median(steady),
                      "precompute_s": round(precompute_s, 3), "peak_rss_mb": meter.peak_mb,
                      "last_loss": loss}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model dir (default: a tiny llama made here)")
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--reply-len", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.arm:
        arm_main(a)
        return 0
    if a.quick:
        a.steps, a.warmup, a.repeats = 4, 1, 1
    work = Path(tempfile.mkdtemp(prefix="bench-pref-ref-"))
    if not a.model:
        from ift.models import init_tiny

        a.model = init_tiny(str(work / "model"), arch="llama", hidden_size=256, layers=4,
                            heads=4, seed=0)
    runs: list[dict[str, Any]] = []
    for rnd in range(a.repeats):
        for method in a.methods.split(","):
            for arm in ARMS:
                cmd = [sys.executable, __file__, "--arm", arm, "--method", method,
                       "--model", a.model, "--steps", str(a.steps), "--warmup", str(a.warmup),
                       "--batch", str(a.batch), "--prompt-len", str(a.prompt_len),
                       "--reply-len", str(a.reply_len), "--threads", str(a.threads)]
                res = run_measured(cmd, cwd=REPO, timeout=1800)
                if res["returncode"] != 0:
                    print(res["log_tail"], file=sys.stderr)
                    raise SystemExit(f"arm {arm}/{method} failed")
                line = json.loads(res["log_tail"].strip().splitlines()[-1])
                runs.append({**line, "round": rnd, "wall_s": res["wall_s"]})
                print(json.dumps(runs[-1]), flush=True)

    def spread(vals: list[float]) -> dict[str, float]:
        return {"median": round(statistics.median(vals), 4), "min": round(min(vals), 4),
                "max": round(max(vals), 4)}

    summary = []
    for method in a.methods.split(","):
        for arm in ARMS:
            mine = [r for r in runs if r["method"] == method and r["arm"] == arm]
            summary.append({"method": method, "arm": arm,
                            "step_s": spread([r["step_s"] for r in mine]),
                            "peak_rss_mb": spread([r["peak_rss_mb"] for r in mine]),
                            "precompute_s": spread([r["precompute_s"] for r in mine]),
                            "last_loss": mine[-1]["last_loss"]})
    for method in a.methods.split(","):
        live, pre = (next(s for s in summary if s["method"] == method and s["arm"] == arm)
                     for arm in ARMS)
        pre["step_s_over_live"] = round(pre["step_s"]["median"] / live["step_s"]["median"], 3)
        pre["peak_rss_over_live"] = round(
            pre["peak_rss_mb"]["median"] / live["peak_rss_mb"]["median"], 3)
    path = write_result("preference_ref", {
        "params": {k: v for k, v in vars(a).items() if k not in ("arm", "method")},
        "summary": summary, "runs": runs})
    table = [{"method": s["method"], "arm": s["arm"],
              "step_s": f"{s['step_s']['median']} ({s['step_s']['min']}..{s['step_s']['max']})",
              "peak_rss_mb": f"{s['peak_rss_mb']['median']} ({s['peak_rss_mb']['min']}.."
                             f"{s['peak_rss_mb']['max']})",
              "precompute_s": s["precompute_s"]["median"], "last_loss": round(s["last_loss"], 5)}
             for s in summary]
    print(format_table(table, ["method", "arm", "step_s", "peak_rss_mb", "precompute_s",
                               "last_loss"]))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
