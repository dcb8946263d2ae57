"""Greedy generation for evaluation, through the serving engine (ift.serve.engine).

`ift eval`, `ift eval --models` and the held-out metrics during training all decode here,
with the engine the server uses: one implementation of batching, stopping and decoding.
The engine wraps the model object it is given (a base model, a PeftModel with an active
LoRA adapter, a merged model), so nothing is loaded twice.
"""

from __future__ import annotations

from typing import Any

from ift.artifacts import PromptFormat
from ift.serve.engine import Engine, eos_ids
from ift.serve.sampling import SamplingParams

# PEFT methods whose adapters prepend virtual tokens: the engine's KV-cache decoding does
# not run them.
PROMPT_LEARNING = ("PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING")


def stop_ids(model, tokenizer, prompt_format: PromptFormat | None) -> set[int]:
    """Token ids that end a reply: the generation config's and tokenizer's eos, and the
    prompt format's end-of-turn tokens (none without a format)."""
    fmt_ids = prompt_format.stop_token_ids if prompt_format is not None else []
    return eos_ids(model, tokenizer) | {int(t) for t in fmt_ids}


def check_engine_can_run(model, where: str) -> None:
    """A ValueError naming the adapter type when the engine cannot decode with `model`."""
    cfg = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    if isinstance(cfg, dict) and isinstance(active, str) and active in cfg:
        ptype = str(getattr(cfg[active], "peft_type", "")).split(".")[-1].upper()
        if ptype in PROMPT_LEARNING:
            raise ValueError(
                f"{where}: a {ptype.lower()} adapter prepends virtual tokens, which the "
                "serving engine does not decode; set eval.max_samples=0 (loss and "
                "benchmarks only) or evaluate a LoRA-family adapter")


def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
             batch_size: int, device: str = "cpu",
             prompt_format: PromptFormat | None = None) -> list[dict[str, Any]]:
    """Greedy continuations of prompt token lists (rendered in `prompt_format`),
    `batch_size` decoded together, ending at eos or at one of the format's end-of-turn
    tokens (`stop_ids`).

    Results come back in input order, each {text, tokens, token_ids, finish_reason}
    (token_ids: the reply's tokens, without the stop token; text: their decoding, less a
    character cut at the end, as the server sends it). A prompt longer
    than the model's context minus `max_new_tokens` keeps its last tokens. The model is
    left in eval mode.
    """
    if not prompts:
        return []
    check_engine_can_run(model, "generation")
    engine = Engine("eval", model=model, tokenizer=tokenizer, device=device,
                    max_batch_size=batch_size, batch_wait_timeout_s=0.0)
    try:
        # The stops of the format the prompts were rendered in, not of the engine's own
        # default template.
        engine.eos_ids = stop_ids(model, tokenizer, prompt_format)
        if prompt_format is not None:
            engine.prompt_format = prompt_format
        keep = max(1, engine.max_context - max_new_tokens)
        greedy = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        # Similar lengths together: less left padding per batch.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        jobs = []
        for i in order:
            ids = list(prompts[i][-keep:]) or [engine.pad_id]
            jobs.append((ids, engine.check_length(ids, greedy), None))
        outs = engine.generate_many(jobs, deltas=False)  # each text decoded once, whole
    finally:
        engine.shutdown()
    results: list[dict[str, Any]] = [{} for _ in prompts]
    for i, out in zip(order, outs):
        results[i] = {"text": out["text"], "tokens": out["completion_tokens"],
                      "token_ids": out["token_ids"], "finish_reason": out["finish_reason"]}
    return results


def context_limit(model) -> int | None:
    """Longest sequence the model's position embeddings cover (None: not stated)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
