"""Many LoRA adapters in one forward pass, at the cost of one.

PEFT's mixed-adapter batches (`adapter_names=`) run each LoRA layer once per distinct
adapter in the batch: with 8 adapters that is 8 small sub-batch computations per layer
and step. Here every LoRA layer keeps its adapters' weights stacked,
A: [slots, in, r_max] and B * scaling: [slots, r_max, out] (slot 0 is all zeros: the base
model, ranks padded with zeros), and a step gathers each row's slot and runs two batched
matmuls, whatever the number of adapters (the gather-and-bmm idea of multi-tenant LoRA
serving systems such as Punica and S-LoRA).

Only plain LoRA on linear layers qualifies (no DoRA or other variants, no LoRA bias); the
engine falls back to PEFT's own mixed batches otherwise, and uses PEFT's path for batches
with a single adapter, where it is exactly PeftModel's computation.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear


class _State:
    idx = None  # LongTensor [batch] of slots while a stacked forward runs, else None


def _lora_linears(peft_model) -> list[Any]:
    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


def supported(peft_model) -> bool:
    """Whether every LoRA layer is a plain linear LoRA the stacked path computes exactly."""
    for m in _lora_linears(peft_model):
        if type(m) is not Linear:
            return False
        if getattr(m, "lora_variant", None) or any(getattr(m, "use_dora", {}).values()):
            return False
        if any(getattr(m, "lora_bias", {}).values()):
            return False
    return True


def _stacked_forward(self, x, *args, **kwargs):
    st = self._ift_state
    idx = st.idx
    if idx is None or x.dim() != 3 or x.shape[0] != idx.shape[0]:
        return type(self).forward(self, x, *args, **kwargs)

    result = self.base_layer(x, *args, **kwargs)
    a = self._ift_A.index_select(0, idx)
    b = self._ift_B.index_select(0, idx)
    lora = torch.bmm(torch.bmm(x.to(a.dtype), a), b)
    return result + lora.to(result.dtype)


class StackedLoRA:
    """Stacked adapter weights on every LoRA layer of a PeftModel."""

    def __init__(self, peft_model):
        self.model = peft_model
        self.state = _State()
        self.slots: dict[str, int] = {}
        self.layers = _lora_linears(peft_model)

    def rebuild(self, names: list[str]) -> dict[str, int]:
        """Restack for the PEFT adapter `names` (in this order); returns name -> slot."""
        self.layers = _lora_linears(self.model)
        self.slots = {n: i + 1 for i, n in enumerate(names)}
        for m in self.layers:
            w = m.base_layer.weight
            d_in, d_out = m.in_features, m.out_features
            ranks = [m.lora_A[n].weight.shape[0] for n in names if n in m.lora_A]
            r = max(ranks, default=1)
            dtype = m.lora_A[names[0]].weight.dtype if names and names[0] in m.lora_A else w.dtype
            a = torch.zeros((len(names) + 1, d_in, r), dtype=dtype, device=w.device)
            b = torch.zeros((len(names) + 1, r, d_out), dtype=dtype, device=w.device)
            for n, slot in self.slots.items():
                if n not in m.lora_A:
                    continue  # this adapter leaves this layer alone
                la = m.lora_A[n].weight.detach()  # [r_n, in]
                lb = m.lora_B[n].weight.detach()  # [out, r_n]
                k = la.shape[0]
                a[slot, :, :k] = la.t()
                b[slot, :k, :] = (lb * m.scaling[n]).t()
            m._ift_A, m._ift_B, m._ift_state = a, b, self.state
            if "forward" not in m.__dict__:
                m.forward = types.MethodType(_stacked_forward, m)
        return self.slots

    @contextmanager
    def rows(self, slots):
        """Run forwards inside with row i using adapter slot slots[i] (0: the base model)."""
        self.state.idx = slots
        try:
            yield
        finally:
            self.state.idx = None
