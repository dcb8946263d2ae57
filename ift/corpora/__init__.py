"""Corpora this project writes: the bundled sample data and quickstart data
(`synthetic`, `synthetic_pairs`, `distill`), the toy corpora of the CoT ablation
(`scratchpad`, and the word problems in `synthetic`) and the synthetic Chinese IE corpus
(`ie_synthetic`). Generators, not stages: no step of `ift data prepare`, training, eval
or serving imports them."""
