"""Fine-tuning methods: a loaded base model in, the model to train out.

One function per method, all with the same signature `(model, options, build)`: the
method's own small options dataclass (taken from the flat `peft` config section, which
keeps every method's knobs) and what the run adds (`Build`: steps, tokenizer). A dict maps
each method name to its options and its builder. Adapter methods return a `peft.PeftModel` (saved in
PEFT's own adapter format); `full` and `freeze` return the HF model itself with
`requires_grad` set on what trains.

qlora differs from lora only in how the base is loaded: `quantization` gives the
bitsandbytes settings the loader needs, and the builder prepares the quantized model for
training (`prepare_model_for_kbit_training`) before adding LoRA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel

from ift import storage
from ift.config import ConfigError, PeftConfig
from ift.models import find_lora_targets

# peft is imported where a method is built or an adapter loaded, in the Ray Train workers:
# the driver imports this module for its checks, and peft (with bitsandbytes' kernel
# warning) would add 1.8 s to its start.

ADAPTER_METHODS = ("lora", "qlora", "dora", "adalora", "prefix", "p_tuning", "prompt_tuning")
"""Methods whose checkpoints hold only adapter weights (PEFT format)."""

PROMPT_METHODS = ("prefix", "p_tuning", "prompt_tuning")
"""Methods that add virtual tokens: they need a 2D padding mask, so packed rows (whose
samples are kept apart by a 4D block mask) cannot be trained with them."""

LORA_METHODS = ("lora", "qlora", "dora", "adalora")
"""Methods that need target modules."""

QUANT_BLOCK = 64
"""bitsandbytes 4-bit block size; on CPU every quantized input dimension must be a multiple."""


def is_adapter(method: str) -> bool:
    return method in ADAPTER_METHODS


def accepts_packed(method: str) -> bool:
    return method not in PROMPT_METHODS


# ---------------------------------------------------------------------------------------
# Quantization (qlora)
# ---------------------------------------------------------------------------------------


def quantization(peft: PeftConfig) -> dict[str, Any] | None:
    """What `ift.models.load_model(quantization=...)` needs for this method: qlora loads the
    frozen base in 4-bit NF4 with double quantization (the QLoRA recipe) or 8-bit."""
    if peft.method != "qlora":
        return None
    return {"bits": peft.bits, "quant_type": "nf4", "double_quant": True}


def check_quantizable(model_config: Any, peft: PeftConfig, use_gpu: bool) -> None:
    """4-bit on CPU (bitsandbytes' CPU kernels) needs input dims divisible by the block size."""
    if peft.method != "qlora" or peft.bits != 4 or use_gpu:
        return
    dims = {
        name: getattr(model_config, name, None)
        for name in ("hidden_size", "intermediate_size", "n_embd")
    }
    bad = {k: v for k, v in dims.items() if isinstance(v, int) and v % QUANT_BLOCK}
    if bad:
        raise ConfigError(
            f"peft.method=qlora with peft.bits=4 on CPU: bitsandbytes' CPU 4-bit kernels need "
            f"every quantized input size to be a multiple of {QUANT_BLOCK}, but the model has "
            f"{bad}; use peft.bits=8, train on GPU (train.use_gpu=true) or use lora"
        )


# ---------------------------------------------------------------------------------------
# Each method's options: only what its builder reads, taken from the flat `peft` section
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraOptions:
    """lora and dora (and the LoRA half of qlora)."""

    r: int
    alpha: int
    dropout: float
    target_modules: list[str] | str
    """all-linear or module names (resolved against the model by the builder)."""

    @classmethod
    def of(cls, p: PeftConfig) -> LoraOptions:
        return cls(p.r, p.alpha, p.dropout, p.target_modules)


@dataclass(frozen=True)
class AdaLoraOptions:
    """adalora: LoRA whose rank budget is pruned from `r` to `target_r`."""

    r: int
    target_r: int
    tinit: int
    tfinal: int
    delta_t: int
    alpha: int
    dropout: float
    target_modules: list[str] | str

    @classmethod
    def of(cls, p: PeftConfig) -> AdaLoraOptions:
        return cls(p.r, p.adalora_target_r, p.adalora_tinit, p.adalora_tfinal,
                   p.adalora_delta_t, p.alpha, p.dropout, p.target_modules)


@dataclass(frozen=True)
class VirtualTokenOptions:
    """prefix, p_tuning and prompt_tuning."""

    num_virtual_tokens: int
    encoder_hidden_size: int
    """p_tuning: the prompt encoder's hidden size."""
    init_text: str | None
    """prompt_tuning: initialise the soft prompt from this text."""

    @classmethod
    def of(cls, p: PeftConfig) -> VirtualTokenOptions:
        return cls(p.num_virtual_tokens, p.encoder_hidden_size, p.prompt_init_text)


@dataclass(frozen=True)
class FreezeOptions:
    """freeze: train the last `trainable_layers` layers (and the final norm)."""

    trainable_layers: int
    train_embeddings: bool

    @classmethod
    def of(cls, p: PeftConfig) -> FreezeOptions:
        return cls(p.freeze_trainable_layers, p.freeze_train_embeddings)


@dataclass(frozen=True)
class NoOptions:
    """full: nothing to set."""

    @classmethod
    def of(cls, p: PeftConfig) -> NoOptions:
        return cls()


# ---------------------------------------------------------------------------------------
# Builders: (base model, the method's options, a Build) -> the model to train
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    """What a builder may need besides its options."""

    total_steps: int
    """Optimizer steps of the run (adalora's schedule)."""
    tokenizer: str = ""
    """The base model's tokenizer path (prompt_tuning's text init)."""
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    """qlora: prepare the quantized model for checkpointed training."""


def _lora_config(model: nn.Module, o: LoraOptions, **extra):
    from peft import LoraConfig

    return LoraConfig(
        r=o.r,
        lora_alpha=o.alpha,
        lora_dropout=o.dropout,
        target_modules=list(find_lora_targets(model, o.target_modules)),
        bias="none",
        task_type="CAUSAL_LM",
        **extra,
    )


def _wrap(model: nn.Module, peft_config) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


def lora(model: nn.Module, o: LoraOptions, b: Build) -> nn.Module:
    """Low-rank adapters on the target projections; the base stays frozen."""
    return _wrap(model, _lora_config(model, o))


def qlora(model: nn.Module, o: LoraOptions, b: Build) -> nn.Module:
    """LoRA on a base loaded in 4-bit NF4 (or 8-bit); see `quantization`."""
    from peft import prepare_model_for_kbit_training

    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(
        model, "is_loaded_in_8bit", False
    ):
        raise ConfigError(
            "peft.method=qlora: the base model was not loaded quantized; load it with "
            "ift.models.load_model(..., quantization=methods.quantization(cfg.peft))"
        )
    # Casts norms to fp32 and makes inputs require grad; checkpointing is handled here too
    # because the order (before LoRA wraps the layers) matters.
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=b.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return _wrap(model, _lora_config(model, o))


def dora(model: nn.Module, o: LoraOptions, b: Build) -> nn.Module:
    """Weight-decomposed LoRA: LoRA on the direction plus a trained magnitude vector."""
    return _wrap(model, _lora_config(model, o, use_dora=True))


def adalora(model: nn.Module, o: AdaLoraOptions, b: Build) -> nn.Module:
    """LoRA whose rank budget is pruned from r to target_r during training.

    The loop must call `after_optimizer_step` every step (it runs `update_and_allocate`).
    """
    from peft import AdaLoraConfig

    check_adalora_schedule(o, b.total_steps)
    config = AdaLoraConfig(
        init_r=o.r,
        target_r=o.target_r,
        tinit=o.tinit,
        tfinal=o.tfinal,
        deltaT=o.delta_t,
        total_step=b.total_steps,
        lora_alpha=o.alpha,
        lora_dropout=o.dropout,
        target_modules=list(find_lora_targets(model, o.target_modules)),
        task_type="CAUSAL_LM",
    )
    return _wrap(model, config)


def check_adalora_schedule(o: AdaLoraOptions, total_steps: int) -> None:
    if o.tinit >= total_steps - o.tfinal:
        raise ConfigError(
            f"peft.method=adalora: peft.adalora_tinit={o.tinit} + "
            f"peft.adalora_tfinal={o.tfinal} leave no budgeting phase in "
            f"{total_steps} training steps; lower them or train longer"
        )


def prefix(model: nn.Module, o: VirtualTokenOptions, b: Build) -> nn.Module:
    """Prefix tuning: trained key/value prefixes in every attention layer."""
    from peft import PrefixTuningConfig

    return _wrap(model, PrefixTuningConfig(
        num_virtual_tokens=o.num_virtual_tokens, task_type="CAUSAL_LM"))


def p_tuning(model: nn.Module, o: VirtualTokenOptions, b: Build) -> nn.Module:
    """P-tuning: virtual token embeddings produced by a small trained prompt encoder."""
    from peft import PromptEncoderConfig

    return _wrap(model, PromptEncoderConfig(
        num_virtual_tokens=o.num_virtual_tokens,
        encoder_hidden_size=o.encoder_hidden_size,
        task_type="CAUSAL_LM",
    ))


def prompt_tuning(model: nn.Module, o: VirtualTokenOptions, b: Build) -> nn.Module:
    """Prompt tuning: trained soft-prompt embeddings, optionally initialised from text."""
    from peft import PromptTuningConfig

    kwargs: dict[str, Any] = {}
    if o.init_text:
        kwargs = {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": o.init_text,
            "tokenizer_name_or_path": b.tokenizer,
            "tokenizer_kwargs": {"trust_remote_code": b.trust_remote_code},
        }
    return _wrap(model, PromptTuningConfig(
        num_virtual_tokens=o.num_virtual_tokens, task_type="CAUSAL_LM", **kwargs))


def full(model: nn.Module, o: NoOptions, b: Build) -> nn.Module:
    """Every parameter trains."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def freeze(model: nn.Module, o: FreezeOptions, b: Build) -> nn.Module:
    """Only the last k transformer layers and the final norm train (plus, optionally, the
    input embeddings and the LM head)."""
    k = o.trainable_layers
    layers = decoder_layers(model)
    if not 1 <= k <= len(layers):
        raise ConfigError(
            f"peft.freeze_trainable_layers={k}: the model has {len(layers)} layers "
            f"(allowed: 1..{len(layers)})"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    trained: list[nn.Module] = list(layers[-k:])
    norm = final_norm(model)
    if norm is not None:
        trained.append(norm)
    if o.train_embeddings:
        trained.append(model.get_input_embeddings())
        out = model.get_output_embeddings()
        if out is not None:
            trained.append(out)
    for module in trained:
        for param in module.parameters():
            param.requires_grad_(True)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer block list: the ModuleList with num_hidden_layers entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    best = None
    for _name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (n is None or len(module) == n):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ConfigError(
            f"peft.method=freeze: cannot find the transformer layers of "
            f"{type(model).__name__} (no ModuleList with {n} entries)"
        )
    return best


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm after the last layer: the last norm module directly under the backbone."""
    backbone = getattr(model, "base_model", model)
    norms = [m for _n, m in backbone.named_children() if "norm" in type(m).__name__.lower()]
    return norms[-1] if norms else None


METHODS: dict[str, tuple[Callable[[PeftConfig], Any], Callable[..., nn.Module]]] = {
    "lora": (LoraOptions.of, lora),
    "qlora": (LoraOptions.of, qlora),
    "dora": (LoraOptions.of, dora),
    "adalora": (AdaLoraOptions.of, adalora),
    "prefix": (VirtualTokenOptions.of, prefix),
    "p_tuning": (VirtualTokenOptions.of, p_tuning),
    "prompt_tuning": (VirtualTokenOptions.of, prompt_tuning),
    "full": (NoOptions.of, full),
    "freeze": (FreezeOptions.of, freeze),
}
"""Method name -> (its options from the peft section, its builder). The names are the
config's `peft.method` choices, which `PeftConfig` checks when a config is made."""


def build(model: nn.Module, peft: PeftConfig, total_steps: int, *, tokenizer: str = "",
          trust_remote_code: bool = False, gradient_checkpointing: bool = False) -> nn.Module:
    """Apply peft.method to a loaded base model: the builder gets only its method's options.

    total_steps: optimizer steps of the run (adalora's schedule). tokenizer: the base
    model's path (prompt_tuning's text init). gradient_checkpointing: train.gradient_
    checkpointing (qlora prepares its quantized model for it)."""
    options, builder = METHODS[peft.method]
    if gradient_checkpointing and peft.method != "qlora":
        enable_gradient_checkpointing(model)
    return builder(model, options(peft),
                   Build(total_steps, tokenizer, trust_remote_code, gradient_checkpointing))


def from_adapter(model: nn.Module, adapter: str, *, gradient_checkpointing: bool = False,
                 reference: bool = False) -> nn.Module:
    """The base model with the existing adapter at `adapter` (model.adapter) on it,
    trainable: a new run continuing that adapter. With `reference` (train.objective=dpo
    without precomputed reference log-probs) the same adapter is loaded a second time,
    frozen, as the reference (ift.train.preference.REFERENCE_ADAPTER)."""
    from peft import PeftModel

    from ift.train.preference import REFERENCE_ADAPTER  # cycle: preference imports methods

    path = storage.local_copy(adapter)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    peft_model = PeftModel.from_pretrained(model, path, is_trainable=True)
    if reference:
        peft_model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    return peft_model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing works with frozen inputs (adapters) and with DDP.
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias).
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False


def after_optimizer_step(model: nn.Module, method: str, step: int) -> None:
    """Per-step hook after optimizer.step() and before zero_grad(): AdaLoRA's budget update."""
    if method == "adalora":
        unwrap(model).base_model.update_and_allocate(step)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP wrappers."""
    while isinstance(model, (DistributedDataParallel, FullyShardedDataParallel)):
        model = model.module
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as stored elements × 2."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
