"""ift.models: tokenizer training, the tiny model factory, loading and LoRA target detection."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ift import models
from ift.config import ConfigError, ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS = [
    {"instruction": "Add the numbers 17 and 25.", "input": "", "output": "17 + 25 = 42. The answer is 42."},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
    {"instruction": "把这句话翻译成英文。", "input": "我喜欢读书。", "output": "I like reading books."},
    {"instruction": "解释光合作用。", "input": "", "output": "植物利用阳光把二氧化碳和水变成糖和氧气。"},
    {"instruction": "Write one sentence about rivers.", "input": "", "output": "Rivers carry water from the hills to the sea."},
] * 4

EXPECTED_TARGETS = {
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "qwen2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "mistral": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "bloom": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    "gpt_neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
}

TINY = {"vocab_size": 600, "hidden_size": 32, "layers": 2, "heads": 4}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return models.train_tokenizer(models.FALLBACK_TEXTS * 2, vocab_size=600)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, data_file) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in models.ARCHS:
        out[arch] = models.init_tiny(str(root / arch), arch=arch, data=[data_file], seed=3, **TINY)
    return out


# --- tokenizer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! It's 2024; 3.14 * 17 = 53.38.",
        "  leading spaces,\ttabs\nand new lines\n\n",
        "中国的首都是北京。光合作用需要阳光！",
        "混合 mixed 文本 text 123，标点。",
        "unseen: 龘 𠀀 é ü emoji 🙂",
    ],
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids, text
    assert tokenizer.decode(ids) == text


def test_trained_merges_shorten_text(tokenizer):
    # Trained merges: common words take fewer tokens than bytes.
    text = "Explain why the sky looks blue."
    assert len(tokenizer.encode(text, add_special_tokens=False)) < len(text.encode()) // 2


def test_special_tokens_are_single_ids(tokenizer):
    for tok in (models.EOS, models.IM_START, models.IM_END, models.PAD):
        ids = tokenizer.encode(tok, add_special_tokens=False)
        assert len(ids) == 1, tok
        assert tokenizer.convert_ids_to_tokens(ids[0]) == tok
    assert tokenizer.eos_token == models.EOS
    assert tokenizer.pad_token == models.PAD
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # No automatic bos/eos: templates add the tokens they want.
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hi!"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\nHi!<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids(models.IM_START)) == 3
    assert ids.count(tokenizer.convert_tokens_to_ids(models.IM_END)) == 3


def test_train_tokenizer_is_deterministic(tokenizer):
    again = models.train_tokenizer(models.FALLBACK_TEXTS * 2, vocab_size=600)
    assert models.tokenizer_identity(again)["sha256"] == models.tokenizer_identity(tokenizer)["sha256"]


def test_train_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ConfigError, match="vocab_size=100"):
        models.train_tokenizer(["abc"], vocab_size=100)


def test_tokenizer_identity_is_path_independent(tiny_dirs, tmp_path, data_file):
    src = tiny_dirs["llama"]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    a = models.tokenizer_identity(models.load_tokenizer(src))
    b = models.tokenizer_identity(models.load_tokenizer(str(copy)))
    assert a["name_or_path"] != b["name_or_path"]
    assert a["sha256"] == b["sha256"]
    assert a["vocab_size"] == b["vocab_size"] == len(AutoTokenizer.from_pretrained(src))
    assert a["class"] == b["class"]
    # The identity recorded at build time is the one seen on load.
    meta = json.loads((copy / "ift_tiny.json").read_text())
    assert meta["tokenizer_sha256"] == a["sha256"]

    other = models.train_tokenizer(models.FALLBACK_TEXTS, vocab_size=400)
    assert models.tokenizer_identity(other)["sha256"] != a["sha256"]
    changed = models.load_tokenizer(str(copy))
    changed.chat_template = "{{ messages[0]['content'] }}"
    assert models.tokenizer_identity(changed)["sha256"] != a["sha256"]


def _save_without_pad(tok, path, keep_unk: bool) -> str:
    tok.save_pretrained(path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    cfg = json.loads(open(cfg_path, encoding="utf-8").read())
    cfg.pop("pad_token", None)
    if keep_unk:
        cfg["unk_token"] = "<|im_end|>"
    open(cfg_path, "w", encoding="utf-8").write(json.dumps(cfg))
    return path


def test_load_tokenizer_sets_pad(tokenizer, tmp_path):
    # A dedicated <pad> in the vocabulary is preferred over unk and eos.
    path = _save_without_pad(tokenizer, str(tmp_path / "nopad"), keep_unk=True)
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    tok = models.load_tokenizer(path)
    assert tok.pad_token == models.PAD
    assert tok.padding_side == "right"

    # Without <pad>: unk, and without unk: eos.
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(tmodels.WordLevel({"</s>": 0, "<unk>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for name, unk, expected in (("unk", "<unk>", "<unk>"), ("eos", None, "</s>")):
        fast = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token=unk)
        fast.save_pretrained(tmp_path / name)
        tok = models.load_tokenizer(str(tmp_path / name))
        assert tok.pad_token == expected, name
        enc = tok(["a", "a b"], padding=True)
        assert enc["input_ids"][0] == [2, tok.pad_token_id]  # right padding


# --- tiny models ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_init_tiny_reloads_and_runs(tiny_dirs, arch):
    path = tiny_dirs[arch]
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    meta = json.loads(open(os.path.join(path, "ift_tiny.json"), encoding="utf-8").read())
    assert meta["arch"] == arch and meta["seed"] == 3

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok) == meta["vocab_size"]
    assert model.config.eos_token_id == tok.convert_tokens_to_ids(models.EOS)
    text = "17 + 25 = 42. 我喜欢读书。"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_init_tiny_is_deterministic_per_seed(tiny_dirs, data_file, tmp_path, arch):
    from safetensors.torch import load_file

    again = models.init_tiny(str(tmp_path / "same"), arch=arch, data=[data_file], seed=3, **TINY)
    other = models.init_tiny(str(tmp_path / "other"), arch=arch, data=[data_file], seed=4, **TINY)
    first = load_file(os.path.join(tiny_dirs[arch], "model.safetensors"))
    same = load_file(os.path.join(again, "model.safetensors"))
    diff = load_file(os.path.join(other, "model.safetensors"))
    assert first.keys() == same.keys()
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert any(not torch.equal(first[k], diff[k]) for k in first if first[k].dtype.is_floating_point)
    with open(os.path.join(tiny_dirs[arch], "tokenizer.json"), "rb") as a, \
            open(os.path.join(again, "tokenizer.json"), "rb") as b:
        assert a.read() == b.read()


def test_init_tiny_default_data(tmp_path):
    # Bundled sample data when present, else the built-in English + Chinese texts.
    out = models.init_tiny(str(tmp_path / "d"), arch="llama", **TINY)
    tok = models.load_tokenizer(out)
    assert tok.decode(tok.encode("天空是蓝色的 sky")) == "天空是蓝色的 sky"
    meta = json.loads((tmp_path / "d" / "ift_tiny.json").read_text())
    # the folder's own files, not its ie/ subfolder
    assert meta["data"] in ("builtin", [os.path.join(models.SAMPLE_DATA_DIR, "*")])


def test_init_tiny_rejects_bad_arch_and_shape(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'llama'"):
        models.init_tiny(str(tmp_path / "x"), arch="lama")
    with pytest.raises(ConfigError, match="divisible"):
        models.tiny_config("llama", 100, hidden_size=30, heads=4)
    assert not (tmp_path / "x").exists()


def test_init_tiny_cli(tmp_path, data_file):
    out = tmp_path / "cli-gpt2"
    proc = subprocess.run(
        [sys.executable, "-m", "ift", "model", "init-tiny", "--arch", "gpt2", "--out", str(out),
         "--data", data_file, "--vocab-size", "512", "--hidden-size", "32", "--seed", "7"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    meta = json.loads((out / "ift_tiny.json").read_text())
    assert meta["arch"] == "gpt2" and meta["seed"] == 7 and meta["data"] == [data_file]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.n_embd == 32
    assert model.config.vocab_size <= 512

    bad = subprocess.run(
        [sys.executable, "-m", "ift", "model", "init-tiny", "--arch", "gpt3", "--out",
         str(tmp_path / "bad")], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2
    assert "gpt3" in bad.stderr and "allowed" in bad.stderr


# --- text extraction -----------------------------------------------------------------------


def test_iter_texts_reads_every_format(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"x": ["alpha", {"y": "beta"}], "n": 3}))
    (tmp_path / "b.jsonl").write_text('{"q": "gamma"}\n\n{"q": "delta", "k": null}\n')
    (tmp_path / "lines.json").write_text('{"q": "epsilon"}\n{"q": "zeta"}\n')
    with open(tmp_path / "c.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["question", "answer"], ["eta", "theta"]])
    with open(tmp_path / "d.csv", "w", newline="") as f:
        csv.writer(f).writerows([["col"], ["iota, with comma"]])
    pq.write_table(pa.table({"m": [[{"role": "user", "content": "kappa"}]], "t": ["lambda"]}),
                   tmp_path / "e.parquet")
    texts = list(models.iter_texts([str(tmp_path)]))
    assert sorted(texts) == sorted([
        "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
        "iota, with comma", "user", "kappa", "lambda",
    ])


def test_iter_texts_names_bad_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ok": "yes"}\n{"broken": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        list(models.iter_texts([str(bad)]))
    with pytest.raises(FileNotFoundError, match="missing"):
        list(models.iter_texts([str(tmp_path / "missing.json")]))


# --- loading -------------------------------------------------------------------------------


def test_resolve_dtype_on_cpu():
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert models.resolve_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ConfigError, match="fp64"):
        models.resolve_dtype("fp64", "cpu")


def test_load_model_from_config(tiny_dirs):
    model = models.load_model(ModelConfig(name_or_path=tiny_dirs["qwen2"], dtype="bf16"))
    assert model.dtype == torch.bfloat16
    assert model.config.model_type == "qwen2"
    model = models.load_model(ModelConfig(name_or_path=tiny_dirs["qwen2"],
                                          attn_implementation="eager"))
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="name_or_path"):
        models.load_model(ModelConfig())


def test_load_model_quantized_4bit(tmp_path, data_file):
    # bitsandbytes quantizes on CPU too; where it cannot, the error says so. Its CPU 4-bit
    # kernels need layer widths of at least one quantization block (64).
    path = models.init_tiny(str(tmp_path / "q"), arch="llama", data=[data_file],
                            vocab_size=600, hidden_size=64)
    try:
        model = models.load_model(ModelConfig(name_or_path=path), quantization={"bits": 4})
    except RuntimeError as e:
        assert "bitsandbytes cannot quantize" in str(e)
        pytest.skip(f"bitsandbytes cannot quantize on this machine: {e}")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    assert models.find_lora_targets(model) == EXPECTED_TARGETS["llama"]
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_quantization_config_shape():
    cfg = models.quantization_config({"bits": 4}, torch.bfloat16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert models.quantization_config({"bits": 8}, torch.float32).load_in_8bit
    with pytest.raises(ConfigError, match="bits=3"):
        models.quantization_config({"bits": 3}, torch.float32)


# --- LoRA targets --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_find_lora_targets_all_linear(tiny_dirs, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch])
    assert models.find_lora_targets(model) == EXPECTED_TARGETS[arch]
    assert models.find_lora_targets(model, "all-linear") == EXPECTED_TARGETS[arch]
    # The config layer turns a plain string into a one-element list.
    assert models.find_lora_targets(model, ["all-linear"]) == EXPECTED_TARGETS[arch]
    assert models.linear_module_names(model) == EXPECTED_TARGETS[arch]


def test_find_lora_targets_validates_lists(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    assert models.find_lora_targets(model, ["v_proj", "q_proj"]) == ["q_proj", "v_proj"]
    assert models.find_lora_targets(model, "q_proj,v_proj") == ["q_proj", "v_proj"]
    assert models.find_lora_targets(model, ["self_attn.q_proj"]) == ["self_attn.q_proj"]
    with pytest.raises(ConfigError) as e:
        models.find_lora_targets(model, ["q_proj", "q_prj"])
    msg = str(e.value)
    assert "'q_prj'" in msg and "did you mean 'q_proj'" in msg
    for name in EXPECTED_TARGETS["llama"]:
        assert name in msg
    with pytest.raises(ConfigError, match="c_attn"):
        models.find_lora_targets(model, ["c_attn"])


def test_peft_accepts_detected_targets(tiny_dirs):
    # The names are what peft expects: every block projection gets an adapter.
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"])
    targets = models.find_lora_targets(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets,
                                                  fan_in_fan_out=True))
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(EXPECTED_TARGETS["gpt2"])
    n_layers = peft_model.config.n_layer
    assert sum(1 for _n, m in peft_model.named_modules() if hasattr(m, "lora_A")) == 4 * n_layers
    # Asking again on the adapted model names the same projections, not the adapter layers.
    assert models.find_lora_targets(peft_model) == EXPECTED_TARGETS["gpt2"]
    assert models.find_lora_targets(peft_model, ["c_fc"]) == ["c_fc"]


def test_init_tiny_skips_and_counts_malformed_lines(tmp_path, capsys):
    from ift.cli import main

    data = tmp_path / "data.jsonl"
    rows = [json.dumps({"instruction": f"say {w}", "output": w}) for w in ("a", "b", "c")]
    rows.insert(1, '{"instruction": "broken", "output": ')
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "tiny"
    assert main(["model", "init-tiny", "--data", str(data), "--out", str(out),
                 "--vocab-size", "300"]) == 0
    meta = json.loads((out / "ift_tiny.json").read_text())
    assert meta["skipped_lines"] == 1
    assert meta["skipped"][0].startswith(f"{data}:2: not valid JSON")
    assert "skipped 1 line(s)" in capsys.readouterr().out
