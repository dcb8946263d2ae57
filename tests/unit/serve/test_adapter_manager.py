"""The adapters one engine holds: loading by key, reference-counted eviction, the refusals,
and which forward pass each mix of adapters in a batch takes (each equal to PEFT's own).
Driven directly, without the engine thread (test_engine.py drives it through the engine)."""

from __future__ import annotations

import json
import os

import pytest
from train_support import random_lora_adapter

from ift.serve.adapter_manager import AdapterManager
from ift.serve.protocol import RequestError


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("am")
    return {"a": random_lora_adapter(tiny_model, str(root / "a"), seed=11),
            "b": random_lora_adapter(tiny_model, str(root / "b"), seed=12, r=8)}


def _base(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def _manager(tiny_model) -> AdapterManager:
    # Formats of different lengths, so each adapter's stops are its own.
    formats = {"a": "fmt:a", "b": "fmt:bb"}
    return AdapterManager(_base(tiny_model),
                          choose_format=lambda path: formats[os.path.basename(path)],
                          stop_ids=lambda fmt: {len(fmt)})


def test_load_records_format_and_stops_and_loads_a_key_once(tiny_model, adapters):
    am = _manager(tiny_model)
    assert am.loaded() == [] and not am.has("a") and am.peft is None
    am.load("a", adapters["a"])
    am.load("runs/b", adapters["b"])
    assert am.loaded() == ["a", "runs/b"] and am.has("runs/b")
    assert am.formats == {"a": "fmt:a", "runs/b": "fmt:bb"}
    assert am.stops == {"a": {5}, "runs/b": {6}}
    assert set(am.names.values()) == set(am.peft.peft_config)  # PEFT-safe names, no "/"
    assert all("/" not in n and "." not in n for n in am.names.values())
    am.load("a", adapters["a"])
    assert am.loads == 2  # already loaded: not read again


def test_an_evicted_adapter_waits_for_its_requests_and_the_last_one_stays(tiny_model, adapters):
    am = _manager(tiny_model)
    am.load("a", adapters["a"])
    am.load("b", adapters["b"])
    assert am.acquire("nope") is False
    assert am.acquire("a") is True
    name_a = am.names["a"]
    am.evict("a")
    assert not am.has("a") and am.loaded() == ["b"]
    am.collect()
    assert "a" in am.names  # a request still uses it
    am.release_ref("a")  # the last request ends: deleted now
    assert "a" not in am.names and name_a not in am.peft.peft_config
    assert "a" not in am.formats and "a" not in am.stops
    # An evicted key that is loaded again before deletion comes back without a read.
    am.acquire("b")
    am.evict("b")
    am.load("b", adapters["b"])
    assert am.has("b") and am.loads == 2
    am.release_ref("b")
    # PEFT cannot drop its last adapter: evicted and idle, it stays resident, hidden.
    am.evict("b")
    am.collect()
    assert "b" in am.names and not am.has("b") and am.loaded() == []


def test_adapters_the_manager_cannot_serve_are_refused_with_a_status(tiny_model, tmp_path):
    am = _manager(tiny_model)
    with pytest.raises(RequestError) as e:
        am.load("x", str(tmp_path))
    assert (e.value.status, e.value.param) == (404, "model")
    assert e.value.message == f"adapter 'x': no adapter_config.json in {tmp_path}"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "prompt_tuning"}))
    with pytest.raises(RequestError) as e:
        am.load("p", str(tmp_path))
    assert e.value.status == 422
    assert e.value.message.startswith("adapter 'p' is a PROMPT_TUNING adapter; the server "
                                      "batches LoRA adapters")
    assert am.names == {} and am.loads == 0


def test_each_mix_of_adapters_in_a_batch_computes_what_peft_computes(tiny_model, adapters):
    import torch
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    am = _manager(tiny_model)
    ids = torch.randint(3, 200, (3, 6), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        plain = _base(tiny_model)(**kwargs).logits
        assert torch.equal(am.forward(kwargs, [None] * 3).logits, plain)  # nothing loaded
        am.load("a", adapters["a"])
        am.load("b", adapters["b"])
        ref = PeftModel.from_pretrained(_base(tiny_model), adapters["a"], adapter_name="x")
        ref.load_adapter(adapters["b"], adapter_name="y")
        ref.eval()

        def peft(names):
            return ref(**kwargs, adapter_names=names).logits

        base_rows = am.forward(kwargs, [None, None, None]).logits
        # Base rows only: the plain model, with the LoRA layers out of the tree.
        assert not any(isinstance(m, BaseTunerLayer) for m in am.model.modules())
        torch.testing.assert_close(base_rows, plain)
        one = am.forward(kwargs, ["b", "b", "b"]).logits
        torch.testing.assert_close(one, peft(["y", "y", "y"]))
        mixed = am.forward(kwargs, ["a", None, "a"]).logits  # one adapter and base rows
        torch.testing.assert_close(mixed, peft(["x", "__base__", "x"]))
        assert am.stacked is not None
        several = am.forward(kwargs, ["b", None, "a"]).logits  # stacked: gather and bmm
        torch.testing.assert_close(several, peft(["y", "__base__", "x"]), rtol=1e-4, atol=1e-4)
        assert (one[0] - plain[0]).abs().max() > 1e-2  # the adapters do change the output
        assert (several[0] - several[2]).abs().max() > 1e-2
