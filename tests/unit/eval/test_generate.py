"""Evaluation's greedy generation: stop tokens, the adapters the engine refuses, the
context limit, and results in input order with over-long prompts cut from the left.
(Equality with plain transformers + PEFT is tested in test_compare.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ift.artifacts import PromptFormat
from ift.eval.generate import check_engine_can_run, context_limit, generate, stop_ids


@pytest.fixture(scope="module")
def model_and_tok(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), \
        AutoTokenizer.from_pretrained(tiny_model)


def test_stop_ids_add_the_formats_end_of_turn_tokens_to_eos(model_and_tok):
    model, tok = model_and_tok
    eos = set(model.generation_config.eos_token_id) | {tok.eos_token_id}
    assert stop_ids(model, tok, None) == eos
    fmt = PromptFormat(template="chatml", chat_template="", stop_tokens=["<x>", "<y>"],
                       stop_token_ids=[7, 9])
    assert stop_ids(model, tok, fmt) == eos | {7, 9}


def test_prompt_learning_adapters_are_refused_naming_where(model_and_tok):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, _tok = model_and_tok
    check_engine_can_run(model, "generation")  # a plain model
    base = AutoModelForCausalLM.from_config(model.config)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    check_engine_can_run(lora, "generation")
    prompt = get_peft_model(AutoModelForCausalLM.from_config(model.config),
                            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError) as e:
        check_engine_can_run(prompt, "eval during training")
    assert str(e.value).startswith("eval during training: a prompt_tuning adapter prepends "
                                   "virtual tokens")
    assert "eval.max_samples=0" in str(e.value)
    with pytest.raises(ValueError, match="prompt_tuning adapter"):
        generate(prompt, _tok, [[1, 2]], max_new_tokens=2, batch_size=1)


def test_context_limit_reads_the_first_position_key_a_config_states(model_and_tok):
    model, _ = model_and_tok
    assert context_limit(model) == model.config.max_position_embeddings == 1024
    gpt2 = SimpleNamespace(config=SimpleNamespace(n_positions=256, seq_length=99))
    assert context_limit(gpt2) == 256
    # 0, None and non-integers are not a limit; the next key is read.
    odd = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=0, n_positions=None,
                                                 max_sequence_length="4k", seq_length=2048))
    assert context_limit(odd) == 2048
    assert context_limit(SimpleNamespace(config=SimpleNamespace())) is None
    assert context_limit(object()) is None


def test_results_come_back_in_input_order_and_long_prompts_keep_their_end(model_and_tok):
    model, tok = model_and_tok
    texts = ["A long story about a river that runs to the sea and", "Hi", "Two plus two is"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert generate(model, tok, [], max_new_tokens=4, batch_size=2) == []
    together = generate(model, tok, prompts, max_new_tokens=5, batch_size=2)
    alone = [generate(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [r["token_ids"] for r in together] == [r["token_ids"] for r in alone]
    assert all(set(r) == {"text", "tokens", "token_ids", "finish_reason"} for r in together)
    # completion tokens count the stop token, which token_ids leave out
    assert all(1 <= r["tokens"] == len(r["token_ids"]) + (r["finish_reason"] == "stop") <= 5
               for r in together)
    assert not model.training
    # Longer than the context minus the new tokens: the prompt's last 1024 - 3 tokens.
    long = (prompts[0] * 200)[:1100]
    cut = generate(model, tok, [long], max_new_tokens=3, batch_size=1)
    assert cut == generate(model, tok, [long[-(1024 - 3):]], max_new_tokens=3, batch_size=1)
