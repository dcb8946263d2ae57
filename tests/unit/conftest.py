"""Tokenizers for the template and tokenization tests, trained here in seconds (no hub).

Each is trained on `tokenizer_corpus`: ift's fallback texts plus every text of the test
module's RECORDS, so the module's own conversations tokenize compactly. The fixtures are
module-scoped: each module gets tokenizers trained on its own records.
"""

from __future__ import annotations

import pytest

from ift.models import FALLBACK_TEXTS, train_tokenizer

# A llama-2-like template: bos first, [INST] user turns, replies closed by eos.
LLAMA_STYLE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>\n{{ m['content'] }}\n<</SYS>>\n\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'tool' %}[TOOL] {{ m['content'] }} [/TOOL]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)
# Replies end with a newline only: no end-of-turn marker.
NO_MARKER = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_corpus(request) -> list[str]:
    """ift's fallback texts and the system prompt and turns of the module's RECORDS."""
    texts = list(FALLBACK_TEXTS)
    for rec in request.module.RECORDS:
        texts += [rec["system"]] + [m["content"] for m in rec["messages"]]
    return texts * 3


@pytest.fixture(scope="module")
def make_llama_tokenizer(tokenizer_corpus):
    """make(template=LLAMA_STYLE): a byte-level BPE tokenizer that adds <s> by itself, as
    llama tokenizers do, with the given chat template (None: no template)."""

    def make(template: str | None = LLAMA_STYLE):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(tokenizer_corpus, trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B",
            special_tokens=[("<s>", tok.token_to_id("<s>"))],
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            clean_up_tokenization_spaces=False,
        )
        fast.chat_template = template
        fast.name_or_path = "llama-style"
        return fast

    return make


@pytest.fixture(scope="module")
def chatml_tok(tokenizer_corpus):
    """ift's own tokenizer: ChatML template, <|im_end|> a token, <|endoftext|> as eos."""
    return train_tokenizer(tokenizer_corpus, vocab_size=700)


@pytest.fixture(scope="module")
def plain_tok(tokenizer_corpus):
    """ift's tokenizer without a chat template."""
    tok = train_tokenizer(tokenizer_corpus, vocab_size=700)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module")
def no_marker_tok(tokenizer_corpus):
    """ift's tokenizer with a template that ends replies with a newline only."""
    tok = train_tokenizer(tokenizer_corpus, vocab_size=700)
    tok.chat_template = NO_MARKER
    return tok


@pytest.fixture(scope="module")
def llama_tok(make_llama_tokenizer):
    """The llama-style tokenizer with its llama-2-like template."""
    return make_llama_tokenizer()
