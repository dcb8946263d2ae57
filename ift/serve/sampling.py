"""How a token is chosen and turned into text, with no protocol and no Ray in it: the
sampling parameters of one request, the next-token choice (transformers' own logits
processors, in `generate`'s order), and incremental detokenization with stop strings.

The OpenAI request and response shapes that carry these are in protocol.py.
"""

from __future__ import annotations

import codecs
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

# torch and transformers are imported by TokenChooser, in the replicas: SamplingParams is
# part of request validation, which `ift serve`'s driver imports (1 s, 2 s with them).


@dataclass
class SamplingParams:
    """How one request is decoded. temperature 0 means greedy."""

    max_tokens: int = 16
    """Tokens to generate at most."""
    temperature: float = 1.0
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the text stops before them."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the prompt or output (CTRL-style penalty)."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this size (0: off)."""
    seed: int | None = None
    """Seed for sampling; the same seed and request give the same output."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        return cls(**d)



# ---------------------------------------------------------------------------------------
# Decoding one step
# ---------------------------------------------------------------------------------------


class TokenChooser:
    """Picks the next token of one sequence: penalties, then temperature, top-k, top-p.

    The processors are transformers' own, applied in the order `generate` applies them,
    so greedy decoding here equals `model.generate(do_sample=False)` token for token.
    """

    def __init__(self, params: SamplingParams):
        import torch
        from transformers import (
            NoRepeatNGramLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.params = params
        self.processors = []
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.no_repeat_ngram_size > 0:
            self.processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
        self.warpers = []
        if not params.greedy:
            if params.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                self.warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(params.top_p))
        self.plain_greedy = params.greedy and not self.processors
        """Greedy with nothing to apply: the batch-wide argmax is this row's choice."""
        self.needs_history = bool(self.processors)
        """Whether choose() reads the token history (penalties do, warpers do not)."""
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator()
            seed = params.seed if params.seed is not None else int.from_bytes(
                uuid.uuid4().bytes[:8], "little")
            self.generator.manual_seed(seed % (2**63))

    def choose(self, ids, scores) -> int:
        """ids: [1, L] long tensor of prompt + generated tokens; scores: [1, V] logits."""
        import torch

        for p in self.processors:
            scores = p(ids, scores)
        if self.params.greedy:
            return int(torch.argmax(scores, dim=-1)[0])
        processed = scores
        for w in self.warpers:
            scores = w(ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        if not bool(torch.isfinite(probs).all()):
            # A temperature or penalty so extreme that logits overflow: the distribution's
            # limit puts all mass on the highest logit.
            return int(torch.argmax(torch.nan_to_num(processed.float(), nan=float("-inf")),
                                    dim=-1)[0])
        return int(torch.multinomial(probs[0], 1, generator=self.generator)[0])


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's characters for bytes: printable Latin-1 bytes stand for themselves,
    the other bytes, in order, for the characters from U+0100 on."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in keep:
            out[chr(0x100 + extra)] = b
            extra += 1
    return out


_BYTE_ALPHABET = _byte_alphabet()


class TokenBytes:
    """The UTF-8 bytes each token stands for, as far as a character split across tokens
    needs: byte-level BPE tokens map through the byte alphabet, sentencepiece's byte
    fallback tokens (`<0xE4>`) are their byte, special tokens (skipped in decoding) are
    empty, any other token is its text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def __call__(self, ids: list[int]) -> bytes:
        out = bytearray()
        for i, tok in zip(ids, self.tokenizer.convert_ids_to_tokens(ids)):
            if i in self.special or tok is None:
                continue
            if self.byte_level and all(c in _BYTE_ALPHABET for c in tok):
                out.extend(_BYTE_ALPHABET[c] for c in tok)
            elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                out.append(int(tok[3:5], 16))
            else:
                out.extend(tok.replace("\u2581", " ").encode("utf-8"))
        return bytes(out)

    def incomplete_tail(self, ids: list[int]) -> bool:
        """Whether the tokens end inside a UTF-8 character that later bytes may complete
        (a character is at most 4 bytes and a token at least 1, so the last 4 tell)."""
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        dec.decode(self(ids[-4:]), final=False)
        return bool(dec.getstate()[0])


class TextStream:
    """Turns generated token ids into text deltas, holding back what a stop string may begin.

    `push(token)` returns the text that is now final; `stopped` says a stop string was seen
    (the text is cut before it). While the tokens end inside a character (its UTF-8 bytes
    split across tokens, decoded as U+FFFD), nothing is released: the character comes out
    whole once its last byte arrives. Bytes that can never form a character are released
    as U+FFFD.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, *, deltas: bool = True):
        self.tokenizer = tokenizer
        self.bytes = TokenBytes(tokenizer)
        self.stop = [s for s in (stop or []) if s]
        # Nobody reads the deltas and no stop string is watched: decode once, in flush()
        # (decoding the whole text at every token costs about 1 ms per 32 tokens).
        self.lazy = not deltas and not self.stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.stopped = False
        self.text = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        if self.lazy:
            return ""
        text = self._decode()
        if text.endswith("\ufffd") and self.bytes.incomplete_tail(self.ids):
            return ""
        self.text = text
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at != -1:
                self.stopped = True
                self.text = text[:at]
                out = self.text[self.sent:]
                self.sent = len(self.text)
                return out
        # Hold back a tail that is a prefix of some stop string.
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = max(self.sent, len(text) - hold)
        out = text[self.sent:end]
        self.sent = end
        return out

    def _whole_characters(self) -> str:
        """The decoded text without a character cut at the end (the tokens stop inside
        its UTF-8 bytes): the tokens up to the last character boundary, decoded, then the
        whole characters of the tokens after it."""
        text = self._decode()
        if not (text.endswith("\ufffd") and self.bytes.incomplete_tail(self.ids)):
            return text
        k = len(self.ids) - 1
        while k > 0 and self.bytes.incomplete_tail(self.ids[:k]):
            k -= 1
        tail = codecs.getincrementaldecoder("utf-8")("replace")
        return (self.tokenizer.decode(self.ids[:k], skip_special_tokens=True)
                + tail.decode(self.bytes(self.ids[k:]), final=False))

    def flush(self) -> str:
        """The held-back text at the end of generation; a character cut at the end is
        dropped, as push holds it back."""
        if self.stopped:
            return ""
        text = self._whole_characters()
        for s in self.stop:  # a stop string completed by the held-back tail
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at != -1:
                text = text[:at]
                self.stopped = True
        self.text = text
        out = text[self.sent:]
        self.sent = len(text)
        return out
