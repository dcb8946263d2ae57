"""The GPU smoke checks: one line per check, under 10 minutes on one GPU.

    python scripts/gpu_smoke.py            # on a GPU machine (bash scripts/gpu_smoke.sh)
    python scripts/gpu_smoke.py --cpu      # the checks that have a CPU form, on CPU
    python scripts/gpu_smoke.py --only packed-sdpa,fsdp-lora

Each check runs `ift train` (the real driver, Ray Train, checkpoints) on a tiny model and
tiny prepared data built here, or the serving / throughput path it names, and prints
`PASS|FAIL|SKIP <check> <seconds>s <detail>`. The exit status is 1 when any check failed.
Workers: one per GPU (FSDP and DDP with one GPU still run the same wrap, step and
checkpoint code); on CPU, 2 gloo workers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

H200_BF16_FLOPS = 989e12
"""Dense bf16 peak of one H100/H200 SXM (the MFU denominator; override with --peak-flops)."""


class Skip(Exception):
    """The check cannot run here (a missing package or device); not a failure."""


class Smoke:
    def __init__(self, workdir: str, cpu: bool, peak_flops: float) -> None:
        import torch

        self.workdir, self.cpu, self.peak = workdir, cpu, peak_flops
        self.gpus = 0 if cpu else torch.cuda.device_count()
        if not cpu and self.gpus == 0:
            raise SystemExit("no CUDA device: run with --cpu for the CPU forms")
        self.workers = 2 if cpu else self.gpus
        from train_support import build_prepared, make_tiny_model

        self.model = make_tiny_model(os.path.join(workdir, "model"), hidden_size=64)
        self.data = build_prepared(os.path.join(workdir, "data"), self.model, n_train=64)
        self.packed = build_prepared(os.path.join(workdir, "packed"), self.model,
                                     n_train=64, packed=True)

    def train(self, name: str, *extra: str, data: str | None = None, steps: int = 4,
              workers: int | None = None, model: str | None = None) -> str:
        from ift.config import load_config
        from ift.train import driver

        w = workers or self.workers
        cfg = load_config(None, [
            f"model.name_or_path={model or self.model}", f"train.data={data or self.data}",
            f"train.output={self.workdir}/runs", f"train.run_name={name}",
            f"storage.root={self.workdir}/work", "tracking.enabled=false",
            "peft.dropout=0.0", "train.micro_batch_size=2", f"train.num_workers={w}",
            f"train.grad_accum={4 // w if 4 % w == 0 else 1}", f"train.use_gpu={not self.cpu}",
            "train.cpus_per_worker=1", "train.lr=1e-2", "train.warmup_ratio=0",
            f"train.max_steps={steps}", "train.eval_every=0", "train.checkpoint_every=2",
            "train.num_to_keep=3", *extra,
        ])
        driver.train(cfg)
        return os.path.join(self.workdir, "runs", name)

    def losses(self, run_dir: str) -> list[float]:
        from ift.train.loop import read_metrics

        return [r["loss"] for r in read_metrics(run_dir)]

    def trained(self, run_dir: str) -> str:
        losses = self.losses(run_dir)
        if not losses or not losses[-1] < losses[0]:
            raise AssertionError(f"loss did not go down: {losses}")
        if not os.path.exists(os.path.join(run_dir, "final")):
            raise AssertionError("final/ missing")
        return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"

    # --- the checks --------------------------------------------------------------------

    def ddp_lora(self) -> str:
        return self.trained(self.train("ddp-lora"))

    def ddp_qlora(self) -> str:
        if self.cpu:
            raise Skip("bitsandbytes 4-bit needs CUDA")
        return self.trained(self.train("ddp-qlora", "peft.method=qlora"))

    def fsdp_lora(self) -> str:
        run = self.train("fsdp-lora", "train.strategy=fsdp",
                         *([] if self.cpu else ["model.dtype=bf16"]))
        from safetensors.torch import load_file

        n = len(load_file(os.path.join(run, "final", "adapter_model.safetensors")))
        if n == 0:
            raise AssertionError("the final adapter holds 0 tensors")
        # With one worker FSDP does not shard (and no rank loads on the meta device).
        shard = (f"{self.workers} ranks, ranks 1+ loaded on meta" if self.workers > 1
                 else "1 worker: not sharded")
        return f"{self.trained(run)}, adapter {n} tensors, {shard}"

    def fsdp_full(self) -> str:
        return self.trained(self.train("fsdp-full", "train.strategy=fsdp", "peft.method=full",
                                       "train.lr=1e-3"))

    def packed_sdpa(self) -> str:
        return self.trained(self.train("packed-sdpa", "model.attn_implementation=sdpa",
                                       data=self.packed))

    def packed_flash(self) -> str:
        if self.cpu:
            raise Skip("flash-attention kernels need CUDA (the CPU form is "
                       "tests/unit/train/test_collate.py with SDPA kernel stand-ins)")
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise Skip("flash_attn is not installed") from e
        sdpa = self.losses(os.path.join(self.workdir, "runs", "packed-sdpa"))
        run = self.train("packed-flash", "model.attn_implementation=flash_attention_2",
                         "model.dtype=bf16", data=self.packed)
        flash = self.losses(run)
        gap = max(abs(a - b) for a, b in zip(sdpa, flash)) if sdpa else float("nan")
        return f"{self.trained(run)}, max |flash - sdpa| loss {gap:.3f}"

    def checkpoint_resume(self) -> str:
        full = self.train("resume-full", "train.strategy=fsdp", steps=4)
        part = os.path.join(self.workdir, "runs", "resume-part")
        os.makedirs(part, exist_ok=True)
        shutil.copytree(os.path.join(full, "checkpoint_0000002"),
                        os.path.join(part, "checkpoint_0000002"))
        self.train("resume-part", "train.strategy=fsdp", steps=4)
        a, b = self.losses(full)[2:], self.losses(part)
        gap = max(abs(x - y) for x, y in zip(a, b))
        if len(b) != 2 or gap > 2e-3:
            raise AssertionError(f"resumed losses {b} differ from {a}")
        return f"steps 3-4 after resume match (max gap {gap:.1e})"

    def engine_adapters(self) -> str:
        """ift's own serving engine on the device: greedy replies of the base and of two
        adapters, alone and in one mixed batch, against plain transformers + PEFT there."""
        import torch
        from peft import PeftModel
        from train_support import random_lora_adapter
        from transformers import AutoModelForCausalLM

        from ift.serve.engine import Engine
        from ift.serve.sampling import SamplingParams

        device = "cpu" if self.cpu else "cuda"
        paths = {f"a{r}": random_lora_adapter(self.model, os.path.join(self.workdir, f"e{r}"),
                                              seed=r, r=r) for r in (8, 32)}
        greedy = SamplingParams(max_tokens=16, temperature=0.0)
        eng = Engine(self.model, dtype="fp32", device=device, max_batch_size=8,
                     batch_wait_timeout_s=0.05)
        try:
            for name, path in paths.items():
                eng.load_adapter(name, path).result()
            prompts = [eng.chat_prompt_ids([{"role": "user", "content": q}])
                       for q in ("Name three colors.", "Hi", "What is 2 plus 2?")]
            keys = [None, *paths]
            alone = {(k, i): eng.generate(p, greedy, k) for k in keys
                     for i, p in enumerate(prompts)}
            mixed = eng.generate_many([(p, greedy, k) for k in keys for p in prompts])
        finally:
            eng.shutdown()
        bad = []
        for k in keys:
            model = AutoModelForCausalLM.from_pretrained(self.model, dtype=torch.float32)
            if k:
                model = PeftModel.from_pretrained(model, paths[k])
            model.to(device).eval()
            for i, p in enumerate(prompts):
                out = model.generate(torch.tensor([p], device=device),
                                     attention_mask=torch.ones(1, len(p), dtype=torch.long,
                                                               device=device),
                                     max_new_tokens=greedy.max_tokens, do_sample=False,
                                     pad_token_id=model.config.pad_token_id)
                ref = []
                for t in out[0, len(p):].tolist():
                    if t in eng.eos_ids:
                        break
                    ref.append(t)
                want = eng.tokenizer.decode(ref, skip_special_tokens=True)
                if alone[(k, i)]["text"] != want:
                    bad.append(f"{k or 'base'}#{i} alone")
        order = [alone[(k, i)]["text"] for k in keys for i in range(len(prompts))]
        bad += [f"mixed #{j}" for j, (a, b) in enumerate(zip(order, (m["text"] for m in mixed)))
                if a != b]
        if bad:
            raise AssertionError(f"{len(bad)} of {2 * len(order)} replies differ: {bad}")
        return (f"{len(order)} greedy replies (base, r=8, r=32) equal transformers + PEFT on "
                f"{device}, alone and in one mixed batch")

    def vllm_two_adapters(self) -> str:
        if self.cpu:
            raise Skip("vLLM needs CUDA (the CPU form is tests/unit/serve/test_vllm.py)")
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise Skip("vllm is not installed (pip install 'ift[vllm]')") from e
        from train_support import random_lora_adapter
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        from ift.serve import vllm as ift_vllm

        paths = {f"a{r}": random_lora_adapter(self.model, os.path.join(self.workdir, f"a{r}"),
                                              seed=r, r=r) for r in (8, 32)}
        confs = ift_vllm.read_adapter_configs(paths)
        ranks = [ift_vllm.adapter_rank(n, c) for n, c in confs.items()]
        llm = LLM(self.model, enable_lora=True, max_lora_rank=ift_vllm.max_lora_rank(ranks),
                  max_loras=2, gpu_memory_utilization=0.3)
        params = SamplingParams(max_tokens=8, temperature=0)
        outs = [llm.generate(["Repeat: red cat"], params,
                             lora_request=LoRARequest(n, i + 1, p))[0].outputs[0].text
                for i, (n, p) in enumerate(paths.items())]
        return f"two adapters answered ({len(outs[0])} and {len(outs[1])} chars)"

    def qwen2_0_5b(self, seq: int) -> str:
        """A random-init model of Qwen2-0.5B's shape (494M parameters) with the tiny
        model's tokenizer, saved in bf16 (on CPU, with --cpu, a 2-layer cut of it)."""
        import torch
        from transformers import AutoModelForCausalLM, Qwen2Config

        out = os.path.join(self.workdir, "qwen2-0.5b")
        if os.path.exists(os.path.join(out, "config.json")):
            return out
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                          num_hidden_layers=2 if self.cpu else 24, num_attention_heads=14,
                          num_key_value_heads=2, max_position_embeddings=max(seq, 4096),
                          rope_theta=1e6, tie_word_embeddings=True, pad_token_id=0,
                          eos_token_id=1, bos_token_id=None)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(out)
        for name in os.listdir(self.model):
            if "token" in name or name.endswith((".jinja", "vocab.json", "merges.txt")):
                shutil.copy(os.path.join(self.model, name), out)
        return out

    def mfu_0_5b(self) -> str:
        """A bare bf16 loop (model, AdamW, no ift) on the Qwen2-0.5B shape, 4 x 2048 tokens
        a step: the ceiling `ift train` is compared with in mfu-ift-0.5b."""
        if self.cpu:
            raise Skip("MFU is measured against a GPU's peak")
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            self.qwen2_0_5b(2048), dtype=torch.bfloat16, attn_implementation="sdpa").to("cuda")
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        batch, seq = 4, 2048
        ids = torch.randint(0, 512, (batch, seq), device="cuda")
        for i in range(10):
            if i == 3:
                torch.cuda.synchronize()
                t0 = time.time()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        self.bare_tok_s = 7 * batch * seq / (time.time() - t0)
        mfu = 6 * params * self.bare_tok_s / self.peak
        del model, opt
        torch.cuda.empty_cache()
        return f"{params / 1e6:.0f}M params, {self.bare_tok_s:,.0f} tok/s, MFU {100 * mfu:.1f}%"

    def mfu_ift_0_5b(self) -> str:
        """`ift train` (Ray Train worker, packed 2048-token rows, bf16, full fine-tune) on
        the same model and tokens a step as mfu-0.5b: its tokens/s, MFU and ratio."""
        import statistics

        seq = 256 if self.cpu else 2048
        model = self.qwen2_0_5b(seq)
        data = build_prepared_for(os.path.join(self.workdir, f"packed-{seq}"), model,
                                  n_train=300 if self.cpu else 4000, max_seq_len=seq)
        run = self.train("mfu-ift", "peft.method=full", "model.dtype=bf16",
                         f"train.micro_batch_size={2 if self.cpu else 4}", "train.grad_accum=1",
                         "train.lr=1e-5",
                         "train.num_workers=1", "train.checkpoint_every=0",
                         "model.attn_implementation=sdpa", data=data,
                         steps=3 if self.cpu else 10, workers=1, model=model)
        from safetensors import safe_open

        from ift.train.loop import read_metrics

        with safe_open(os.path.join(model, "model.safetensors"), "pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        rates = [r["tokens_per_s"] for r in read_metrics(run)][2:]
        tok_s = statistics.median(rates)
        detail = f"{params / 1e6:.0f}M params, {tok_s:,.0f} tok/s (median of steps 3+)"
        if self.cpu:
            return detail
        bare = getattr(self, "bare_tok_s", None)
        ratio = f", {tok_s / bare:.2f}x the bare loop" if bare else ""
        return f"{detail}, MFU {100 * 6 * params * tok_s / self.peak:.1f}%{ratio}"

    def step_breakdown(self) -> str:
        """Where `ift train`'s step time goes, on mfu-ift-0.5b's model and rows, without Ray:
        the bare causal step, the bare step on a packed batch (its 4D mask), and ift's
        train_step on a causal and on a packed batch. tokens/s of each, medians of 7."""
        import statistics

        import torch
        from train_support import read_rows
        from transformers import AutoModelForCausalLM

        from ift.train.collate import collate, model_inputs
        from ift.train.loop import StepEnv, train_step

        device = torch.device("cpu" if self.cpu else "cuda")
        seq, batch = (256, 2) if self.cpu else (2048, 4)
        model_dir = self.qwen2_0_5b(seq)
        data = build_prepared_for(os.path.join(self.workdir, f"packed-{seq}"), model_dir,
                                  n_train=300 if self.cpu else 4000, max_seq_len=seq)
        rows = read_rows(data)[:batch]
        packed = collate(rows, 0, packed=True)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 512, (batch, seq), generator=g)
        causal = {"input_ids": ids, "labels": ids.clone(),
                  "attention_mask": torch.ones_like(ids)}
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
        env = StepEnv(method="full", device=device, attn_implementation="sdpa",
                      dtype=torch.bfloat16,
                      autocast_dtype=None if self.cpu else torch.bfloat16)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        def bare(b):
            loss = model(**model_inputs(b, attn_implementation="sdpa", device=device)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def timed(fn, b, n=3 if self.cpu else 7):
            for _ in range(2):
                fn(b)
            times = []
            for _ in range(n):
                sync()
                t0 = time.perf_counter()
                fn(b)
                sync()
                times.append(time.perf_counter() - t0)
            return batch * seq / statistics.median(times)

        step = iter(range(1, 1000))

        def ift(collated):
            return lambda _b: train_step(model, opt, sched, [collated()], env, next(step))

        arms = {
            "bare causal": timed(bare, causal),
            "bare packed": timed(bare, packed),
            "ift causal": timed(ift(lambda: causal), None),
            # The trainer's own collate inside the step: the 4D mask on the CPU, copied,
            # or built on the device from seq_ids (mask_4d=False, what the trainer does).
            "ift packed, CPU mask": timed(ift(lambda: collate(rows, 0, packed=True)), None),
            "ift packed, device mask": timed(
                ift(lambda: collate(rows, 0, packed=True, mask_4d=False)), None),
        }
        base = arms["bare causal"]
        return "; ".join(f"{k} {v:,.0f} tok/s ({v / base:.2f}x)" for k, v in arms.items())


def build_prepared_for(out: str, model: str, *, n_train: int, max_seq_len: int) -> str:
    """Packed prepared rows of `max_seq_len` tokens for `model` (toy chat rows, packed)."""
    from train_support import build_prepared

    return build_prepared(out, model, n_train=n_train, n_val=16, max_seq_len=max_seq_len,
                          packed=True)


CHECKS: dict[str, Callable[[Smoke], str]] = {
    "ddp-lora": Smoke.ddp_lora,
    "ddp-qlora": Smoke.ddp_qlora,
    "fsdp-lora": Smoke.fsdp_lora,
    "fsdp-full": Smoke.fsdp_full,
    "packed-sdpa": Smoke.packed_sdpa,
    "packed-flash": Smoke.packed_flash,
    "checkpoint-resume": Smoke.checkpoint_resume,
    "engine-adapters": Smoke.engine_adapters,
    "vllm-two-adapters": Smoke.vllm_two_adapters,
    "mfu-0.5b": Smoke.mfu_0_5b,
    "mfu-ift-0.5b": Smoke.mfu_ift_0_5b,
    "step-breakdown": Smoke.step_breakdown,
}


def environment(cpu: bool) -> str:
    """One line: the device and the versions the checks ran with."""
    import peft
    import ray
    import torch
    import transformers

    device = "cpu" if cpu else f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return (f"env {device}; torch {torch.__version__} (cuda {torch.version.cuda}), "
            f"transformers {transformers.__version__}, peft {peft.__version__}, "
            f"ray {ray.__version__}, python {sys.version.split()[0]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the CPU forms of the checks")
    ap.add_argument("--only", default="", help="comma-separated check names")
    ap.add_argument("--peak-flops", type=float, default=H200_BF16_FLOPS)
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise SystemExit(f"unknown checks {unknown} (known: {', '.join(CHECKS)})")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    env = environment(args.cpu)
    print(env, flush=True)
    results = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="ift-smoke-") as workdir:
        smoke = Smoke(workdir, args.cpu, args.peak_flops)
        for name in names:
            t0 = time.time()
            try:
                status, detail = "PASS", CHECKS[name](smoke)
            except Skip as e:
                status, detail = "SKIP", str(e)
            except Exception as e:  # noqa: BLE001 - every failure is one line, then go on
                status, detail = "FAIL", f"{type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
                failed = True
            seconds = time.time() - t0
            print(f"{status} {name} {seconds:.0f}s {detail}", flush=True)
            results.append({"check": name, "status": status, "seconds": round(seconds, 1),
                            "detail": detail})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "checks": results}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
