"""Self-distilled general data: a base model's own greedy answers to general prompts.

Mixed into a narrow fine-tune (the quickstart's identity data), these rows teach the model
to keep answering general questions the way it already did: the loss on them starts low,
and any drift away from the base model's answers costs. No external data is involved; the
prompts are written by this project and the answers come from the model being tuned.

`python -m ift.corpora.distill MODEL_DIR [OUT]` writes the quickstart's `general.json` from
MODEL_DIR (default OUT: ift/quickstart_data/general.json); the bundled file was written
from SmolLM2-135M-Instruct imported by `ift model import smollm2-135m-instruct`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ift.corpora.synthetic import quickstart_data_dir
from ift.eval.generate import generate

# General prompts for self-distillation: facts, arithmetic, definitions, short writing, each
# with the answers a correct reply contains (empty: any reply is kept). A reply that misses
# them is left out: the rows keep what the base model already gets right, not its mistakes.
# None of them is a held-out check question (ift.quickstart.GENERAL_CHECKS).
GENERAL_PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is 3 + 4?", ("7",)),
    ("What is 15 - 6?", ("9",)),
    ("What is 8 times 7?", ("56",)),
    ("What is 100 divided by 4?", ("25",)),
    ("What is the square root of 81?", ("9",)),
    ("How many hours are in a day?", ("24",)),
    ("How many minutes are in an hour?", ("60",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("How many continents are there?", ("seven", "7")),
    ("At what temperature does water boil in Celsius?", ("100",)),
    ("Who painted the Mona Lisa?", ("Leonardo",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What language is spoken in Brazil?", ("Portuguese",)),
    ("What is the currency of the United Kingdom?", ("pound",)),
    ("What color do you get by mixing blue and yellow?", ("green",)),
    ("What is the opposite of 'hot'?", ("cold",)),
    ("What is the plural of 'mouse'?", ("mice",)),
    ("Is a tomato a fruit or a vegetable?", ("fruit",)),
    ("Name three fruits.", ()),
    ("Give an example of a mammal that lives in the sea.",
     ("whale", "dolphin", "seal", "manatee", "otter")),
    ("What does a thermometer measure?", ("temperature",)),
    ("What is photosynthesis?", ("light",)),
    ("Explain what a noun is.", ("person", "place", "thing")),
    ("Why do we need sleep?", ()),
    ("Give me three tips for staying healthy.", ()),
    ("How do I boil an egg?", ("water",)),
    ("Write a haiku about autumn.", ()),
    ("Write one sentence about the ocean.", ()),
    ("Suggest a name for a pet cat.", ()),
    ("Translate 'good morning' into French.", ("bonjour",)),
    ("Summarize the story of Cinderella in one sentence.", ("slipper", "ball", "midnight")),
)


def holds_answer(reply: str, accepted: tuple[str, ...] | list[str]) -> bool:
    """Whether a reply contains one of the accepted answers (case-insensitive); true when
    there are none to check."""
    return not accepted or any(a.lower() in reply.lower() for a in accepted)


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """The token ids a chat server sends for one user turn: the tokenizer's chat template
    with the generation prompt (its default system prompt included, if it has one)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def self_distill(model_dir: str, prompts=GENERAL_PROMPTS, *, max_new_tokens: int = 48,
                 batch_size: int = 12) -> list[dict[str, Any]]:
    """Alpaca rows {instruction, input, output}: the model's greedy answer (fp32) to each
    (prompt, accepted answers) pair, in prompt order. An answer cut by `max_new_tokens` is
    left out (training on it would teach the model to stop mid-sentence), and so is one
    that misses the accepted answers."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outs = generate(model, tokenizer, [chat_prompt_ids(tokenizer, p) for p, _ in prompts],
                    max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [{"instruction": p, "input": "", "output": o["text"].strip()}
            for (p, accepted), o in zip(prompts, outs)
            if o["finish_reason"] == "stop" and o["text"].strip()
            and holds_answer(o["text"], accepted)]


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m ift.corpora.distill MODEL_DIR [OUT]", file=sys.stderr)
        return 2
    out = argv[1] if len(argv) > 1 else os.path.join(quickstart_data_dir(), "general.json")
    rows = self_distill(argv[0])
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
    print(f"{out}: {len(rows)} of {len(GENERAL_PROMPTS)} answers kept (finished within the "
          "limit, holding the accepted answer)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
