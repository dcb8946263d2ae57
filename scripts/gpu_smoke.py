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
              workers: int | None = None) -> str:
        from ift.config import load_config
        from ift.train import driver

        w = workers or self.workers
        cfg = load_config(None, [
            f"model.name_or_path={self.model}", f"train.data={data or self.data}",
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

    def mfu_0_5b(self) -> str:
        if self.cpu:
            raise Skip("MFU is measured against a GPU's peak")
        import torch
        from transformers import AutoModelForCausalLM

        from ift.models import tiny_config

        cfg = tiny_config("qwen2", vocab_size=32000, hidden_size=896, layers=24, heads=14,
                          max_positions=2048)
        model = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        batch, seq = 8, 1024
        ids = torch.randint(0, 32000, (batch, seq), device="cuda")
        for i in range(8):
            if i == 3:
                torch.cuda.synchronize()
                t0 = time.time()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        tok_s = 5 * batch * seq / (time.time() - t0)
        mfu = 6 * params * tok_s / self.peak
        return f"{params / 1e6:.0f}M params, {tok_s:,.0f} tok/s, MFU {100 * mfu:.1f}%"


CHECKS: dict[str, Callable[[Smoke], str]] = {
    "ddp-lora": Smoke.ddp_lora,
    "ddp-qlora": Smoke.ddp_qlora,
    "fsdp-lora": Smoke.fsdp_lora,
    "fsdp-full": Smoke.fsdp_full,
    "packed-sdpa": Smoke.packed_sdpa,
    "packed-flash": Smoke.packed_flash,
    "checkpoint-resume": Smoke.checkpoint_resume,
    "vllm-two-adapters": Smoke.vllm_two_adapters,
    "mfu-0.5b": Smoke.mfu_0_5b,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the CPU forms of the checks")
    ap.add_argument("--only", default="", help="comma-separated check names")
    ap.add_argument("--peak-flops", type=float, default=H200_BF16_FLOPS)
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise SystemExit(f"unknown checks {unknown} (known: {', '.join(CHECKS)})")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
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
            print(f"{status} {name} {time.time() - t0:.0f}s {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
