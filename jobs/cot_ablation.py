"""The CoT ablation at toy scale: write the corpus and a tiny model, then run the sweep.

    python jobs/cot_ablation.py [--resume] [--task TASK] [--size N] [key=value ...]

Steps (each skipped when its output already exists):

1. Both arms' corpora, in the Alpaca layout under one fixed prompt (the question):
   <work>/corpus/cot/{train,test}.json (the rationale, then "So the answer is X.") and
   <work>/corpus/answers/{train,test}.json (the same questions, the answer sentence
   alone); held-out problems never occur in training. The default task,
   `parity_aligned` (10 bits, 900 training strings), is ift.corpora.scratchpad's parity
   with one digit of running parity per bit; `add`, `parity`, `parity_indexed` and
   `parity_cased` are the other scratchpad tasks, `word_problems` the synthetic
   arithmetic word problems of ift.corpora.synthetic.
2. `ift.models.init_tiny` trains a byte-level BPE tokenizer on the CoT training file and
   writes a random-init llama (4 layers, hidden 128) to <work>/model.
3. `ift tune -c configs/cot-ablation.yaml` (the ordinary command): prepare both sources,
   then 2 arms × 3 seeds of training and held-out evaluation, then the report.

<work> is ift-work/cot-ablation under the current directory (the config's paths are
relative to the repository root, so run this from there). Extra `key=value` arguments
are config overrides passed to `ift tune`.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ift.corpora.scratchpad import TASKS  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "cot-ablation.yaml")
WORK = os.path.join("ift-work", "cot-ablation")
# corpus/<arm>/: with rationales or answers only (the config's sources tag them so).
ARMS = {"cot": True, "answers": False}
DEFAULT_TASK = "parity_aligned"
DEFAULT_SIZE = {"parity_indexed": 10, "parity_cased": 10, "parity_aligned": 10}
# else ift.corpora.scratchpad's own default


def write_corpus(task: str, n_train: int, n_test: int, seed: int, size: int | None = None
                 ) -> str:
    """Both arms' corpora under <work>/corpus (each skipped when written already), in the
    Alpaca layout under one fixed prompt (the question); returns the corpus dir. A corpus
    of another task there is an error."""
    from ift.corpora.scratchpad import write_alpaca_splits, write_scratchpad_corpus
    from ift.corpora.synthetic import arithmetic_split

    corpus = os.path.join(WORK, "corpus")
    marker = os.path.join(corpus, "task.txt")
    if os.path.exists(marker) and open(marker).read().strip() != task:
        raise SystemExit(f"{corpus} holds the {open(marker).read().strip()} corpus; move "
                         f"{WORK} away to run --task {task}")
    for arm, rationale in ARMS.items():
        out = os.path.join(corpus, arm)
        if os.path.exists(os.path.join(out, "test.json")):
            continue
        if task == "word_problems":
            train, test = arithmetic_split(n_train, n_test, seed)
            write_alpaca_splits(out, {"train": train, "test": test}, rationale)
            info = {"n_train": len(train), "n_test": len(test)}
        else:
            info = write_scratchpad_corpus(out, task, n_train, n_test, seed,
                                           with_rationale=rationale, size=size,
                                           layout="alpaca")
        with open(marker, "w") as f:
            f.write(task + "\n")
        print(f"[cot-ablation] wrote {info['n_train']} train and {info['n_test']} held-out "
              f"problems to {out} (rationales: {rationale})", flush=True)
    return corpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=900, help="training problems")
    p.add_argument("--n-test", type=int, default=100, help="held-out problems")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (numbers split, problems)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--task", default=DEFAULT_TASK, choices=("word_problems", *TASKS),
                   help="corpus: the synthetic word problems, or a positive control from "
                        "ift.corpora.scratchpad (multi-digit addition, parity)")
    p.add_argument("--size", type=int, default=None,
                   help="add: digits per operand (3); parity: bits (12); parity_indexed: "
                        "bits (10)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("overrides", nargs="*", help="config overrides for `ift tune`")
    args = p.parse_args(argv)

    from ift.cli import main as ift_main
    from ift.models import init_tiny

    corpus = write_corpus(args.task, args.n_train, args.n_test, args.seed,
                          args.size or DEFAULT_SIZE.get(args.task))
    model = os.path.join(WORK, "model")
    if not os.path.exists(os.path.join(model, "config.json")):
        init_tiny(model, arch="llama", data=[os.path.join(corpus, "cot", "train.json")],
                  vocab_size=args.vocab_size, hidden_size=args.hidden_size, layers=args.layers,
                  heads=4, seed=args.seed, max_positions=512)
        print(f"[cot-ablation] wrote a random-init llama to {model}", flush=True)
    cmd = ["tune", "-c", CONFIG, *args.overrides] + (["--resume"] if args.resume else [])
    print(f"[cot-ablation] ift {' '.join(cmd)}", flush=True)
    return ift_main(cmd)


if __name__ == "__main__":
    sys.exit(main())
