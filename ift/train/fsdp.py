"""FSDP: how a model is sharded, and how its weights and optimizer state come back whole.

One construction for every device. A GPU worker and a CPU worker (gloo, the correctness
path this repository's tests run) build the same `FullyShardedDataParallel`:

- Units. Each decoder layer (the classes the model names in `_no_split_modules`) is one
  unit. For adapter methods every leaf module holding trainable weights (LoRA A/B,
  prompt tables) is a unit of its own: FSDP flattens a unit's tensors into one buffer of
  one dtype, and the frozen base (bf16) and the adapters (fp32) differ.
- Original parameters are kept (`use_orig_params`), so frozen and trainable tensors can
  share a unit and the optimizer sees per-tensor parameters (as 1-D shard views: group
  them by name before wrapping, see `decay_names`).
- Loading. Rank 0 reads the weights on CPU; every other rank builds the same model on
  the meta device (shapes only, no memory) and adds the same adapters (`load_device`).
  On GPUs FSDP allocates each meta unit on the rank's GPU as it wraps it (`materializer`,
  FSDP's `param_init_fn`), moves rank 0's unit there (`device_id`) and broadcasts rank
  0's values (`sync_module_states`), so no rank but 0 ever holds a full copy and no GPU
  holds more than one unsharded unit. FSDP's broadcast refuses CPU tensors, so CPU
  workers (gloo) allocate the meta ranks' tensors with the same `materializer` and
  broadcast rank 0's parameters and buffers themselves before wrapping
  (`broadcast_from_rank0`). Tied weights (input and output embeddings) stay one tensor.
- Saving. `model_state_dict` gathers a full state dict with FSDP's wrapper prefixes
  removed; adapter methods gather only the trainable tensors, never the frozen base.

What FSDP does not support here is refused before any worker starts (`check`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.fsdp.wrap import (
    _or_policy,
    lambda_auto_wrap_policy,
    transformer_auto_wrap_policy,
)

from ift.config import ConfigError, PeftConfig, TrainConfig
from ift.train.methods import PROMPT_METHODS, unwrap

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def check(peft: PeftConfig, train: TrainConfig) -> None:
    """Combinations FSDP cannot train, as a ConfigError naming the keys."""
    if train.strategy != "fsdp":
        return
    if peft.method == "qlora":
        raise ConfigError(
            "peft.method=qlora with train.strategy=fsdp: bitsandbytes' packed 4/8-bit weights "
            "cannot be sharded by this trainer; use train.strategy=ddp for qlora, or "
            "peft.method=lora with fsdp"
        )
    if peft.method in PROMPT_METHODS:
        raise ConfigError(
            f"peft.method={peft.method} with train.strategy=fsdp: PEFT saves a prompt "
            "table from the module itself, which FSDP holds sharded; use train.strategy=ddp "
            "(the table is small) or lora"
        )
    if peft.method == "adalora":
        raise ConfigError(
            "peft.method=adalora with train.strategy=fsdp: AdaLoRA's rank allocator reads "
            "whole adapter matrices, which FSDP shards; use train.strategy=ddp or lora"
        )
    if train.optimizer == "adamw_8bit":
        raise ConfigError(
            "train.optimizer=adamw_8bit with train.strategy=fsdp: the 8-bit optimizer state "
            "cannot be gathered into a full checkpoint; use train.optimizer=adamw"
        )


def clean_name(name: str) -> str:
    """A parameter or state-dict key without the wrapper segments FSDP, activation
    checkpointing and torch.compile insert."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@contextlib.contextmanager
def clean_module_names(model: nn.Module) -> Iterator[nn.Module]:
    """The model with `named_modules` reporting unwrapped names while the block runs.

    PEFT picks a state dict's adapter entries by the module names of the model it saves
    (its tuner layers); inside FSDP those carry `_fsdp_wrapped_module.` while the gathered
    state dict does not, and PEFT would select nothing."""
    original = model.named_modules

    def named_modules(*args: Any, **kwargs: Any):
        for name, module in original(*args, **kwargs):
            yield clean_name(name + ".").rstrip("."), module

    model.named_modules = named_modules  # type: ignore[method-assign]
    try:
        yield model
    finally:
        del model.named_modules


def decoder_layer_classes(model: nn.Module) -> set[type]:
    """The module classes the model names as not-to-split (its decoder layers)."""
    inner = unwrap(model)
    names: set[str] = set()
    for m in inner.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return {type(m) for m in inner.modules() if type(m).__name__ in names}


def _has_own_trainable(module: nn.Module) -> bool:
    return (not any(True for _ in module.children())
            and any(p.requires_grad for p in module.parameters(recurse=False)))


def wrap_policy(model: nn.Module, *, adapter: bool) -> Callable[..., bool]:
    """Decoder layers as units; for adapters, also every leaf with trainable weights."""
    policies = [functools.partial(transformer_auto_wrap_policy,
                                  transformer_layer_cls=decoder_layer_classes(model))]
    if adapter:
        policies.append(functools.partial(lambda_auto_wrap_policy,
                                          lambda_fn=_has_own_trainable))
    return functools.partial(_or_policy, policies=policies)


def materializer(model: nn.Module, device: torch.device) -> Callable[[nn.Module], None]:
    """A function that gives a module's own meta-device parameters and buffers real,
    uninitialized storage on `device` (FSDP's `param_init_fn`; the values come from rank 0
    afterwards). A parameter several modules share (tied embeddings) becomes one tensor,
    wherever in `model` it is met first."""
    made: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}

    def materialize(module: nn.Module) -> None:
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:  # the meta original is kept: its id stays unique
                made[id(param)] = (param, nn.Parameter(torch.empty_like(param, device=device),
                                                       requires_grad=param.requires_grad))
            module._parameters[name] = made[id(param)][1]
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device=device)

    return materialize


def on_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of the model is still on the meta device."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def broadcast_from_rank0(model: nn.Module) -> None:
    """Every parameter and buffer takes rank 0's value (a collective; the models must have
    the same structure on every rank)."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            dist.broadcast(tensor.data, src=0)


def wrap(model: nn.Module, train: TrainConfig, device: torch.device, *, adapter: bool,
         amp: torch.dtype | None) -> nn.Module:
    """The FSDP model for a worker on `device` (cuda:N or cpu). The model may be on CPU,
    and on ranks other than 0 on the meta device (see the module docstring).

    One worker has nothing to shard: it trains the plain model (FSDP's NO_SHARD fallback
    cannot gather a state dict with frozen tensors). Its checkpoints have the same format,
    so runs move between 1 and N workers."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model.to(device)

    on_cpu = device.type == "cpu"
    if on_cpu:
        materialize = materializer(model, device)
        for module in model.modules():
            materialize(module)
        broadcast_from_rank0(model)
    kwargs: dict[str, Any] = {
        "auto_wrap_policy": wrap_policy(model, adapter=adapter),
        "use_orig_params": True,
        "device_id": device,
        "sync_module_states": not on_cpu,
        "limit_all_gathers": True,
    }
    if not on_cpu:
        kwargs["param_init_fn"] = materializer(model, device)
    if amp is not None:
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=amp, reduce_dtype=amp,
                                                   buffer_dtype=amp)
    return FullyShardedDataParallel(model, **kwargs)


def load_device(train: TrainConfig, device: torch.device, rank: int, world: int, *,
                adapter: str = "") -> str:
    """Where a worker loads the weights before wrapping. Under FSDP with several workers:
    CPU on rank 0 (FSDP shards them onto the GPUs) and the meta device on the other ranks,
    which receive rank 0's values; a run that starts from an adapter (`adapter`, the
    config's model.adapter) reads it on every rank, on CPU. The worker's device otherwise."""
    if train.strategy != "fsdp":
        return str(device)
    if world > 1 and rank != 0 and not adapter:
        return "meta"
    return "cpu"


def grad_scaler(strategy: str, amp: torch.dtype | None) -> Any:
    """The fp16 loss scaler (None for bf16/fp32): FSDP's sharded one under FSDP, whose
    inf checks cover every shard."""
    if amp != torch.float16:
        return None
    if strategy == "fsdp":
        return ShardedGradScaler()
    return torch.amp.GradScaler("cuda")


def _options(model: nn.Module, *, ignore_frozen: bool = False):
    # Offloading to CPU from a CPU model frees the tensors it returns (a crash in clone).
    on_cpu = next(model.parameters()).device.type == "cpu"
    return StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu,
                            ignore_frozen_params=ignore_frozen)


def model_state_dict(model: nn.Module, *, adapter: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict, keys as the unwrapped model names them. A
    collective: every rank calls it; rank 0 holds the result (GPU: only rank 0). Adapter
    methods gather only trainable tensors."""
    sd = get_model_state_dict(model, options=_options(model, ignore_frozen=adapter))
    return {clean_name(k): v for k, v in sd.items()}


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name (a collective)."""
    return get_optimizer_state_dict(model, optimizer, options=_options(model))


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """Shard a full optimizer state (from any number of ranks) into this rank's optimizer."""
    set_optimizer_state_dict(model, optimizer, state, options=_options(model))
