"""Run a function on N CPU processes joined by gloo (torch.multiprocessing, no Ray): the
FSDP tests call ift's own wrap/state-dict/optimizer code there, as a Ray worker would."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, *args: Any, world: int = 2, out_dir: str) -> list[Any]:
    """fn(rank, world, *args) on `world` processes; returns each rank's result."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world, _free_port(), fn, args, out_dir), nprocs=world)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]
