"""The LoRA adapters one engine holds on its base model, and the forward pass that applies
them.

- A reference-counted cache: adapters are loaded by a public key (the served model id);
  one that is released (Serve's LRU evicted it) while requests still use it is deleted
  only after they finish. Each adapter brings the prompt format and stop tokens it was
  trained with.
- One forward pass for any mix of adapters in a batch: the plain model for base-only
  batches (LoRA layers swapped out of the tree), PEFT's own LoRA forward for a batch of
  one adapter, a gather-and-bmm per layer for several (multilora.py), PEFT's mixed batch
  for one adapter plus base rows.

Only the engine thread calls the methods that touch the model (everything except
`has`/`loaded`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from ift.artifacts import ADAPTER_CONFIG, PromptFormat
from ift.serve import multilora
from ift.serve.protocol import RequestError

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
SUPPORTED_PEFT_TYPES = ("LORA",)


class AdapterManager:
    """LoRA adapters on one base model, by public key."""

    def __init__(self, model, choose_format: Callable[[str], PromptFormat],
                 stop_ids: Callable[[PromptFormat], set[int]]):
        """`choose_format(path)` is the prompt format an adapter at path was trained with;
        `stop_ids(format)` the tokens that end its replies."""
        self.model = model
        self._choose_format = choose_format
        self._stop_ids = stop_ids
        self.peft = None  # the PeftModel wrapping self.model once an adapter is loaded
        self.stacked = None  # StackedLoRA over self.peft when its adapters qualify
        self._lora_slots: list | None = None  # (parent, name, LoRA layer) in the model tree
        self._detached = False  # LoRA layers swapped out for their base layers
        self._active: str | None = None  # PEFT's active adapter, when this manager set it
        self.names: dict[str, str] = {}
        """Loaded adapters: public key -> PEFT adapter name."""
        self.formats: dict[str, PromptFormat] = {}
        self.stops: dict[str, set[int]] = {}
        self._evicted: set[str] = set()
        self._refs: dict[str, int] = {}
        self._counter = 0
        self.loads = 0  # adapters read from disk (an LRU that thrashes shows here)

    # ------------------------------------------------------------------ any thread

    def has(self, key: str) -> bool:
        """Whether `key` is loaded and not evicted."""
        return key in self.names and key not in self._evicted

    def loaded(self) -> list[str]:
        return sorted(k for k in list(self.names) if k not in self._evicted)

    # ------------------------------------------------------------------ engine thread

    def load(self, key: str, path: str) -> None:
        """Load the PEFT adapter directory at `path` under `key` (again live if evicted)."""
        self._attach_lora()
        if key in self.names:
            self._evicted.discard(key)
            return
        acfg_path = os.path.join(path, ADAPTER_CONFIG)
        if not os.path.exists(acfg_path):
            raise RequestError(f"adapter {key!r}: no adapter_config.json in {path}", "model", 404)
        with open(acfg_path, encoding="utf-8") as f:
            acfg = json.load(f)
        ptype = str(acfg.get("peft_type", "")).upper()
        if ptype not in SUPPORTED_PEFT_TYPES:
            raise RequestError(
                f"adapter {key!r} is a {ptype or 'unknown'} adapter; the server batches LoRA "
                "adapters (lora, qlora, dora). Serve other methods as a merged model or "
                "with `ift predict`.", "model", 422)

        self._counter += 1
        name = f"adapter_{self._counter}"  # PEFT names cannot hold '.' or '/'
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=name,
                                                  is_trainable=False)
            self.peft.eval()
        else:
            self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
        self.names[key] = name
        fmt = self._choose_format(path)
        self.formats[key] = fmt
        self.stops[key] = self._stop_ids(fmt)
        self.loads += 1
        self.collect()
        self._restack()

    def acquire(self, key: str) -> bool:
        """A request will use `key`; False when it is not loaded."""
        if key not in self.names:
            return False
        self._refs[key] = self._refs.get(key, 0) + 1
        return True

    def release_ref(self, key: str) -> None:
        """A request that used `key` has finished."""
        self._refs[key] = self._refs.get(key, 1) - 1
        if key in self._evicted:
            self.collect()

    def evict(self, key: str) -> None:
        """`key` may be deleted once no request uses it."""
        if key in self.names:
            self._evicted.add(key)

    def collect(self) -> None:
        """Delete evicted adapters no request uses. PEFT cannot drop its last adapter, so
        one stays resident (its memory is small) until another replaces it."""
        for key in sorted(self._evicted):
            if self._refs.get(key, 0) > 0 or len(self.names) <= 1:
                continue
            name = self.names.pop(key)
            self.formats.pop(key, None)
            self.stops.pop(key, None)
            self._evicted.discard(key)
            self._refs.pop(key, None)
            self._attach_lora()
            self.peft.delete_adapter(name)
            self._restack()

    def forward(self, kwargs: dict, adapters: list[str | None]):
        """The model's output on a batch whose row i uses adapters[i] (None: the base)."""
        if self.peft is None:
            return self.model(**kwargs)
        if all(a is None for a in adapters):
            # Base rows only: the plain model, LoRA layers out of the tree. Cheaper than
            # PEFT's disable_adapter(), a mixed batch of `__base__` rows, or LoRA layers
            # told to skip their adapters (all measured on the tiny llama).
            self._detach_lora()
            return self.model(**kwargs)
        self._attach_lora()  # PEFT's layers back in the tree for any adapter row
        if self.stacked is not None and len(set(adapters) - {None}) >= 2:
            # Several adapters in the batch: one gather-and-bmm per LoRA layer.
            slots = torch.tensor([0 if a is None else self.stacked.slots[self.names[a]]
                                  for a in adapters],
                                 dtype=torch.long, device=kwargs["input_ids"].device)
            with self.stacked.rows(slots):
                return self.peft(**kwargs)
        if len(set(adapters)) == 1:
            # Every row wants the same adapter: make it PEFT's active one (only this thread
            # runs the model) and run PEFT's plain LoRA forward, exactly PeftModel's output
            # and much cheaper than a mixed batch (64 -> 26 ms for 32 tokens, tiny llama).
            name = self.names[adapters[0]]
            if self._active != name:
                self.peft.base_model.set_adapter(name, inference_mode=True)
                self._active = name
            return self.peft.base_model.model(**kwargs)
        # One adapter and base rows: PEFT's mixed batch, exactly PeftModel's output.
        names = [self.names[a] if a is not None else BASE for a in adapters]
        return self.peft(**kwargs, adapter_names=names)

    # ------------------------------------------------------------------ LoRA layers

    def _detach_lora(self) -> None:
        """Put each LoRA layer's base layer in its place in the model tree, so base-only
        batches run the plain transformers model, with no PEFT wrapper around every linear
        layer (32 base tokens on the tiny llama with two adapters loaded: 19.1 -> 16.4 ms,
        the same as with none). Stays so until a batch needs an adapter or PEFT changes
        adapters."""
        if self._detached:
            return
        if self._lora_slots is None:
            self._lora_slots = []
            for name, module in self.model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    parent, _, attr = name.rpartition(".")
                    self._lora_slots.append((self.model.get_submodule(parent), attr, module))
            # Nested tuner layers: only the outermost is swapped (for the innermost base).
            inner = {id(m.base_layer) for _, _, m in self._lora_slots}
            self._lora_slots = [s for s in self._lora_slots if id(s[2]) not in inner]
        for parent, attr, layer in self._lora_slots:
            setattr(parent, attr, layer.get_base_layer())
        self._detached = True

    def _attach_lora(self) -> None:
        """Put the LoRA layers back: before any adapter runs and before PEFT loads, deletes
        or stacks adapters (it finds its layers by walking the model tree)."""
        if not self._detached:
            return
        for parent, attr, layer in self._lora_slots:
            setattr(parent, attr, layer)
        self._detached = False

    def _restack(self) -> None:
        self._attach_lora()
        self._lora_slots = None
        self._active = None  # loading or deleting may change PEFT's active adapter
        if self.peft is None or not multilora.supported(self.peft):
            self.stacked = None
            return
        if self.stacked is None:
            self.stacked = multilora.StackedLoRA(self.peft)
        self.stacked.rebuild(list(self.names.values()))
