"""Models and tokenizers: load any HF causal LM, build tiny offline ones, find LoRA targets.

Nothing here reaches a model hub unless asked to: `init_tiny` trains a byte-level BPE
tokenizer on local data and writes a randomly initialised model of a real Hugging Face
architecture beside it, so tests and laptops run the whole platform without downloads.
Any hub id or local directory works in `load_tokenizer` / `load_model`.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow.parquet as pq

from ift import storage
from ift.artifacts import IM_END, IM_START, SAMPLE_DATA_DIR, bundled_path
from ift.config import ConfigError, InputError, ModelConfig

# torch, transformers and tokenizers are imported where a model or tokenizer is made:
# `ift serve`'s driver (check_model_path) and ift.data.templates (CHATML_TEMPLATE) use this
# module without them, and `import ift.models` takes 0.6 s, not 3.6 s.

EOS = "<|endoftext|>"
PAD = "<pad>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END, PAD]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Used only when no data is given and the bundled sample folder is empty: enough English
# and Chinese for the BPE trainer to learn common merges. Unseen characters still encode,
# as raw bytes.
FALLBACK_TEXTS = [
    "Below is an instruction that describes a task. Write a response that completes it.",
    "Explain why the sky looks blue during the day and red at sunset.",
    "Light from the sun is scattered by the air; short blue waves scatter the most.",
    "Let's think step by step. There are 3 boxes with 4 apples each, so 3 * 4 = 12 apples.",
    "The answer is 12.",
    "Write a short poem about the sea, the wind and a small boat going home.",
    "Translate the sentence into French: The weather is nice today.",
    "Summarize the paragraph in one sentence and list two key points.",
    "What is the capital of France? The capital of France is Paris.",
    "You are a helpful assistant. Answer the question clearly and briefly.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "请解释为什么天空在白天是蓝色的。",
    "阳光穿过大气时，波长较短的蓝光被散射得最多，所以天空看起来是蓝色的。",
    "让我们一步一步地思考。每个盒子里有四个苹果，三个盒子一共有十二个苹果。",
    "答案是十二。",
    "请写一首关于大海和小船的短诗。",
    "把下面的句子翻译成英文：今天天气很好。",
    "你是一个乐于助人的助手，请简洁地回答问题。",
    "中国的首都是北京。北京是一座历史悠久的城市。",
    "总结这段话，并列出两个要点。",
]


# ---------------------------------------------------------------------------------------
# Text extraction for tokenizer training
# ---------------------------------------------------------------------------------------


def _strings(value: Any) -> Iterator[str]:
    """Every non-empty string inside a JSON-like value, depth first."""
    if isinstance(value, str):
        if value:
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _iter_file(path: str, skipped: list[str] | None = None) -> Iterator[str]:
    name = path.lower()
    if name.endswith(".parquet"):
        fs, inner = storage.arrow_fs(path)
        pf = pq.ParquetFile(fs.open_input_file(inner))
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield from _strings(row)
        return
    text = storage.read_bytes(path).decode("utf-8-sig", errors="replace")
    if name.endswith((".tsv", ".csv")):
        delim = "\t" if name.endswith(".tsv") else ","
        reader = csv.reader(io.StringIO(text), delimiter=delim)
        next(reader, None)  # header: column names, not data
        for row in reader:
            yield from (cell for cell in row if cell)
        return
    if name.endswith((".json", ".jsonl", ".ndjson")):
        stripped = text.lstrip()
        if name.endswith(".json") and stripped[:1] in ("[", "{"):
            try:
                yield from _strings(json.loads(text))
                return
            except json.JSONDecodeError:
                pass  # a .json file holding JSON lines: read it line by line below
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                reason = f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
                if skipped is None:
                    raise InputError(reason) from None
                skipped.append(reason)  # skipped and counted, as `ift data prepare` does
                continue
            yield from _strings(value)
        return
    # Anything else (txt, md, ...) is plain text.
    if text:
        yield text


def iter_texts(paths: list[str], skipped: list[str] | None = None) -> Iterator[str]:
    """Every string value in JSON/JSONL/TSV/CSV/parquet files (or plain text files).

    Paths may be files, folders or globs, local or s3://, or bundled data (`@sample/NAME`,
    `@quickstart/NAME`). The format is only used to find the strings; no schema is assumed,
    so any instruction data set trains a tokenizer. A JSON line that does not parse is
    appended to `skipped` as "FILE:LINE: reason" (or raises InputError when `skipped` is None).
    """
    for p in map(bundled_path, paths):
        files = storage.expand(p)
        if not files or (len(files) == 1 and not storage.exists(files[0])):
            raise FileNotFoundError(f"tokenizer data: {p} names no file")
        for f in files:
            yield from _iter_file(f, skipped)


def _capped(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    total = 0
    for t in texts:
        yield t
        total += len(t)
        if max_chars is not None and total >= max_chars:
            return


# ---------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on `texts`, with ChatML special tokens.

    Byte level means every string encodes (unseen characters fall back to byte tokens) and
    decode(encode(x)) == x, for Chinese as well as English. `<|endoftext|>` is eos (and
    bos, never added automatically); `<pad>` is a dedicated padding token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Words, single digits (numbers tokenize digit by digit, which helps arithmetic in
    # chain-of-thought data), punctuation runs and whitespace, then bytes. This is the
    # split Qwen2's tokenizer class rebuilds on load, so every architecture sees the same.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    min_vocab = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_vocab:
        raise ConfigError(f"vocab_size={vocab_size}: must be >= {min_vocab} (bytes + specials)")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=None,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_max_length=1024,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def check_model_path(name_or_path: str, what: str = "model") -> str:
    """`name_or_path` unchanged, or InputError when it is written as a local path (absolute,
    ./, ../ or ~) and no such directory exists; hub ids and s3:// paths pass as they are."""
    p = str(name_or_path)
    local = os.path.isabs(p) or p.startswith(("./", "../", "~"))
    if local and not storage.is_remote(p) and not os.path.isdir(os.path.expanduser(p)):
        state = "is a file, not a model directory" if os.path.exists(p) else "does not exist"
        raise InputError(f"{what} {p}: {state}")
    return name_or_path


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False,
                   revision: str | None = None):
    """AutoTokenizer with a pad token and right padding (what training expects).

    Pad falls back, in order, to a dedicated `<pad>` token in the vocabulary, unk, eos.
    """
    from transformers import AutoTokenizer

    check_model_path(name_or_path, "tokenizer")
    path = storage.local_copy(name_or_path) if storage.is_remote(name_or_path) else name_or_path
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                        revision=revision)
    if tok.pad_token is None:
        vocab = tok.get_vocab()
        if PAD in vocab:
            tok.pad_token = PAD
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        elif tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            raise ValueError(f"tokenizer {name_or_path}: no pad, unk or eos token to pad with")
    tok.padding_side = "right"
    return tok


def _special_tokens(tokenizer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        out[attr] = getattr(tokenizer, attr, None)
    extra = getattr(tokenizer, "all_special_tokens", None) or []
    out["all"] = sorted(str(t) for t in extra)
    return out


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """Who a tokenizer is: path, class, size and a content digest independent of the path.

    The digest covers the serialized backend (vocab, merges, normalizer, pre-tokenizer,
    added tokens), the special tokens and the chat template, so a prepared dataset can
    check that it is decoded with the tokenizer it was encoded with.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Canonical JSON: key order in the serialization is not part of the identity.
        h.update(json.dumps(json.loads(backend.to_str()), sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(b"\x1e" + json.dumps(_special_tokens(tokenizer), sort_keys=True).encode())
    template = getattr(tokenizer, "chat_template", None)
    h.update(b"\x1e" + json.dumps(template, sort_keys=True).encode())
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", "") or "",
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "sha256": h.hexdigest(),
    }


# ---------------------------------------------------------------------------------------
# Tiny configs
# ---------------------------------------------------------------------------------------


def _llama(vocab_size, hidden_size, layers, heads, max_positions, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 4,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=_kv_heads(heads), max_position_embeddings=max_positions,
        tie_word_embeddings=False, **kw,
    )


def _qwen2(vocab_size, hidden_size, layers, heads, max_positions, **kw):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 4,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=_kv_heads(heads), max_position_embeddings=max_positions,
        tie_word_embeddings=True, **kw,
    )


def _mistral(vocab_size, hidden_size, layers, heads, max_positions, **kw):
    from transformers import MistralConfig

    kw.setdefault("sliding_window", None)
    return MistralConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 4,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=_kv_heads(heads), max_position_embeddings=max_positions,
        head_dim=hidden_size // heads, tie_word_embeddings=False, **kw,
    )


def _bloom(vocab_size, hidden_size, layers, heads, max_positions, **kw):
    from transformers import BloomConfig

    # ALiBi positions: no position table, so max_positions only bounds the tokenizer.
    return BloomConfig(vocab_size=vocab_size, hidden_size=hidden_size, n_layer=layers,
                       n_head=heads, **kw)


def _gpt_neox(vocab_size, hidden_size, layers, heads, max_positions, **kw):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 4,
        num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False, **kw,
    )


def _gpt2(vocab_size, hidden_size, layers, heads, max_positions, **kw):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers, n_head=heads,
                      n_positions=max_positions, **kw)


def _kv_heads(heads: int) -> int:
    # Grouped-query attention where the head count allows it, as in current models.
    return heads // 2 if heads % 2 == 0 and heads > 1 else heads


ARCHS: dict[str, Callable[..., Any]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "bloom": _bloom,
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
}


def _check_shape(arch: str, hidden_size: int, heads: int) -> None:
    if arch not in ARCHS:
        close = difflib.get_close_matches(arch, list(ARCHS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"arch={arch!r} is not known{hint} (allowed: {', '.join(ARCHS)})")
    if hidden_size % heads:
        raise ConfigError(f"hidden_size={hidden_size} must be divisible by heads={heads}")
    if (hidden_size // heads) % 2 and arch in ("llama", "qwen2", "mistral", "gpt_neox"):
        raise ConfigError(
            f"hidden_size/heads={hidden_size // heads}: rotary embeddings need an even head size"
        )


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64, layers: int = 2,
                heads: int = 4, max_positions: int = 1024, **kw):
    """A small config of a real HF architecture (extra keywords go to the config class)."""
    _check_shape(arch, hidden_size, heads)
    return ARCHS[arch](vocab_size, hidden_size, layers, heads, max_positions, **kw)


# ---------------------------------------------------------------------------------------
# The tiny model factory
# ---------------------------------------------------------------------------------------


def _default_data() -> list[str]:
    if os.path.isdir(SAMPLE_DATA_DIR) and storage.expand(SAMPLE_DATA_DIR):
        # The folder's own files; its ie/ subfolder holds IE samples for the IE configs.
        return [os.path.join(SAMPLE_DATA_DIR, "*")]
    return []


def init_tiny(out_dir: str, arch: str = "llama", data: list[str] | None = None,
              vocab_size: int = 2048, hidden_size: int = 64, layers: int = 2, heads: int = 4,
              seed: int = 0, *, max_positions: int = 1024,
              max_chars: int | None = 50_000_000) -> str:
    """Train a tokenizer on `data` and save it with a random-init `arch` model to out_dir.

    `data` defaults to the bundled sample folder (a built-in English + Chinese text list
    when that is empty). The same data and seed give the same files. The directory loads
    with AutoTokenizer / AutoModelForCausalLM.from_pretrained and carries ift_tiny.json.
    Returns out_dir.
    """
    import torch
    from transformers import AutoModelForCausalLM

    _check_shape(arch, hidden_size, heads)  # before the (slower) tokenizer training

    paths = list(data) if data else _default_data()
    skipped: list[str] = []
    texts: Iterable[str] = (_capped(iter_texts(paths, skipped), max_chars) if paths
                            else FALLBACK_TEXTS)
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    tok.model_max_length = max_positions
    n_vocab = len(tok)

    config = tiny_config(
        arch, n_vocab, hidden_size, layers, heads, max_positions,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)]

    local = out_dir
    tmp = None
    if storage.is_remote(out_dir):
        tmp = tempfile.mkdtemp(prefix="ift-tiny-")
        local = tmp
    os.makedirs(local, exist_ok=True)
    tok.save_pretrained(local)
    model.save_pretrained(local, safe_serialization=True)
    meta = {
        "arch": arch,
        "model_type": config.model_type,
        "seed": seed,
        "vocab_size": n_vocab,
        "requested_vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "layers": layers,
        "heads": heads,
        "max_positions": max_positions,
        "data": paths if paths else "builtin",
        "skipped_lines": len(skipped),
        "skipped": skipped[:20],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        # As loaded back: some tokenizer classes rebuild parts of the pipeline on load.
        "tokenizer_sha256": tokenizer_identity(load_tokenizer(local))["sha256"],
    }
    with open(os.path.join(local, "ift_tiny.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
    if tmp is not None:
        storage.upload_dir(tmp, out_dir)
        storage.rmtree(tmp)
    return out_dir


def init_tiny_cmd(args) -> int:
    """`ift model init-tiny`."""
    out = init_tiny(
        args.out, arch=args.arch, data=list(args.data or []), vocab_size=args.vocab_size,
        hidden_size=args.hidden_size, layers=args.layers, heads=args.heads, seed=args.seed,
    )
    meta = json.loads(storage.read_text(storage.join(out, "ift_tiny.json")))
    print(
        f"wrote {meta['arch']} ({meta['num_parameters']:,} parameters, vocab "
        f"{meta['vocab_size']}, seed {meta['seed']}) to {out}"
    )
    if meta.get("skipped_lines"):
        print(f"skipped {meta['skipped_lines']} line(s) that are not valid JSON, e.g. "
              f"{meta['skipped'][0]} (the first 20 are listed in ift_tiny.json)")
    return 0


# ---------------------------------------------------------------------------------------
# Loading models
# ---------------------------------------------------------------------------------------

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_dtype(dtype: str, device: str):
    """The torch dtype for a config value: auto is bf16 on CUDA that supports it, fp16 on
    older CUDA, fp32 on CPU (half precision on CPU is slow and lossy for training)."""
    import torch

    if not isinstance(dtype, str):
        return dtype
    if dtype == "auto":
        if str(device).startswith("cuda") and torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not allowed (allowed: auto, bf16, fp16, fp32)")
    return getattr(torch, _DTYPES[dtype])


def quantization_config(quantization: dict[str, Any], compute_dtype):
    """A BitsAndBytesConfig: 4-bit NF4 with double quantization (QLoRA), or 8-bit."""
    from transformers import BitsAndBytesConfig

    bits = int(quantization.get("bits", 4))
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.get("quant_type", "nf4"),
            bnb_4bit_use_double_quant=bool(quantization.get("double_quant", True)),
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"quantization bits={bits} is not allowed (allowed: 4, 8)")


def load_model(model_cfg: ModelConfig, *, device: str = "cpu",
               quantization: dict[str, Any] | None = None, dtype=None):
    """An AutoModelForCausalLM from the model section's name_or_path (hub id, local dir or
    s3://) on `device`.

    `quantization={"bits": 4|8}` loads the frozen weights through bitsandbytes (QLoRA);
    that needs a backend bitsandbytes supports on `device` (CUDA on GPU clusters) and
    fails with a message saying so otherwise.

    `device="meta"` builds the architecture from the model's config without reading or
    allocating any weight (the FSDP ranks that receive rank 0's weights, ift.train.fsdp).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype if dtype is not None else model_cfg.dtype, device)
    path = model_cfg.name_or_path
    if not path:
        raise ConfigError("model.name_or_path is required")
    check_model_path(path)
    if storage.is_remote(path):
        path = storage.local_copy(path)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": model_cfg.trust_remote_code,
        "revision": model_cfg.revision,
    }
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if device == "meta":
        import torch

        if quantization:
            raise ConfigError("a quantized model cannot be built on the meta device")
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code,
                                            revision=model_cfg.revision)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, **{k: v for k, v in kwargs.items() if k != "revision"})
    if quantization:
        kwargs["quantization_config"] = quantization_config(quantization, torch_dtype)
        kwargs["device_map"] = {"": device}
        try:
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except (ImportError, RuntimeError, ValueError, NotImplementedError) as e:
            raise RuntimeError(
                f"bitsandbytes cannot quantize {model_cfg.name_or_path} to "
                f"{quantization.get('bits', 4)} bits on device {device!r}: {e}. "
                "QLoRA needs a GPU with bitsandbytes support; use peft.method=lora on CPU."
            ) from e
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device)


# ---------------------------------------------------------------------------------------
# LoRA targets
# ---------------------------------------------------------------------------------------


def _is_linear(module) -> bool:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (nn.Linear, Conv1D)):
        return True
    # bitsandbytes layers subclass nn.Linear; other quantized linears name themselves so.
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _in_block(name: str) -> bool:
    # Transformer blocks sit in a ModuleList, so their modules have a numeric path part
    # (model.layers.0.self_attn.q_proj, transformer.h.1.mlp.c_fc).
    return any(part.isdigit() for part in name.split("."))


def _output_names(model) -> set[str]:
    out = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            out.add(name)
    return out


def _linear_paths(model) -> list[str]:
    """Dotted names of every linear layer, adapter layers left out and peft wrappers
    named as the layer they wrap."""
    out = []
    for name, module in model.named_modules():
        if not name or not _is_linear(module):
            continue
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue  # the adapter's own layers in a model that already has LoRA
        if parts[-1] == "base_layer":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def linear_module_names(model) -> list[str]:
    """Sorted unique leaf names of the linear layers inside transformer blocks.

    nn.Linear and transformers' Conv1D (GPT-2) count; the LM head and embeddings do not.
    """
    skip = {n.removesuffix(".base_layer") for n in _output_names(model)}
    names = set()
    for path in _linear_paths(model):
        leaf = path.rsplit(".", 1)[-1]
        if path in skip or not _in_block(path) or leaf in ("lm_head", "embed_out"):
            continue
        names.add(leaf)
    return sorted(names)


def find_lora_targets(model, requested: str | list[str] = "all-linear") -> list[str]:
    """Module names to put LoRA on.

    "all-linear" gives every attention and MLP projection of the architecture (llama:
    q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; gpt2: c_attn c_proj c_fc; ...).
    A list is checked against the model: a name matching no linear module (by leaf name or
    dotted suffix, as peft matches) is a ConfigError listing the candidates.
    """
    if isinstance(requested, str):
        requested = [r.strip() for r in requested.split(",") if r.strip()]
    requested = list(requested)
    candidates = linear_module_names(model)
    if not requested or requested == ["all-linear"]:
        if not candidates:
            raise ConfigError(
                f"peft.target_modules=all-linear: no linear layers found in "
                f"{type(model).__name__}"
            )
        return candidates
    full_names = _linear_paths(model)
    out = []
    for want in requested:
        if want == "all-linear":
            raise ConfigError(
                "peft.target_modules: all-linear cannot be combined with other names"
            )
        if not any(n == want or n.endswith("." + want) for n in full_names):
            close = difflib.get_close_matches(want, candidates, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"peft.target_modules: {want!r} matches no linear module of "
                f"{type(model).__name__}{hint} (candidates: {', '.join(candidates)})"
            )
        if want not in out:
            out.append(want)
    return sorted(out)
