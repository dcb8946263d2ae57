"""Multiple-choice benchmarks scored by option log-likelihood (`eval.benchmarks`).

The lm-eval-harness `multiple_choice` way: each question becomes a k-shot prompt (a
subject header, the first k solved questions of the subject's dev split, then the
question and its options, ending "Answer:"), and every option's continuation (" A", or the
option's text with `choices: text`) is scored by the sum of its tokens' log-probabilities
after the prompt. The prediction is the option with the highest sum (accuracy) and the one
with the highest sum per character of the continuation (length-normalised accuracy,
lm-eval's acc_norm).

Readers, one per layout of the per-subject CSV files users have on disk:

* mmlu: no header; columns question, A, B, C, D, answer. Files `<split>/<subject>_<split>.csv`.
* ceval: header `id,question,A,B,C,D,answer,explanation`; splits dev, val and test (test
  answers are withheld: empty). Files `<split>/<subject>_<split>.csv`.
* cmmlu: header `Question,A,B,C,D,Answer` (often after an unnamed index column). Files
  `<split>/<subject>.csv`.

Headered files are read by column name (case-insensitive), so extra columns and their
order do not matter. A row with a wrong column count or an answer outside A-D is rejected
(counted, with file, line and reason); a file without a needed column is an error.

Work shared: prompts are built and tokenized once per tokenizer (`encode`), and the result
serves every model that shares the tokenizer (a base model and its adapters in
`ift eval --models`). Per model, each subject's header and k shots (the same for all its
questions) run through the model once; each question then extends that KV cache, and all
of its options are scored in one batched pass on top of it. Prompt-learning adapters
(which prepend virtual tokens) are scored on whole rows instead. A prompt longer than the
model's context loses tokens from its left (the shots first); results count them.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ift import storage
from ift.config import BenchmarkConfig, ConfigError
from ift.data.templates import render_prompt
from ift.eval.generate import context_limit

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Layout:
    """How one benchmark family lays out its files and words its prompts."""

    header: bool
    """The CSV files start with a header row."""
    split_suffix: bool
    """File names end with _<split> (MMLU, C-Eval), else they are the bare subject."""
    default_split: str
    """The split scored when `split` is empty."""
    intro: str
    """The subject header; {subject} is the subject with spaces for underscores."""
    answer_word: str
    """What ends a question, before the answer."""


LAYOUTS: dict[str, Layout] = {
    "mmlu": Layout(header=False, split_suffix=True, default_split="test",
                   intro="The following are multiple choice questions (with answers) about "
                         "{subject}.\n\n",
                   answer_word="Answer:"),
    "ceval": Layout(header=True, split_suffix=True, default_split="val",
                    intro="以下是关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
                    answer_word="答案："),
    "cmmlu": Layout(header=True, split_suffix=False, default_split="test",
                    intro="以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
                    answer_word="答案："),
}


@dataclass
class Question:
    """One multiple-choice question."""

    id: str
    """file:line where it was read."""
    subject: str
    question: str
    options: dict[str, str]
    """Letter -> option text, A to D."""
    answer: str | None
    """The correct letter (None where a split withholds answers)."""


@dataclass
class Reject:
    """A row that could not be read as a question."""

    file: str
    line: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "reason": self.reason}


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def subject_files(path: str, split: str, layout: str) -> dict[str, str]:
    """Subject -> CSV file of one split: `<path>/<split>/*.csv`, else the files in `path`
    named for the split. An error names the folder when there is none."""
    lay = LAYOUTS[layout]
    suffix = f"_{split}"
    found: dict[str, str] = {}
    for folder in (storage.join(path, split), path):
        for name in storage.listdir(folder):
            stem, ext = os.path.splitext(name)
            if ext.lower() != ".csv":
                continue
            if stem.endswith(suffix):
                found[stem[: -len(suffix)]] = storage.join(folder, name)
            elif folder != path and not lay.split_suffix:
                found[stem] = storage.join(folder, name)
        if found:
            return found
    raise ConfigError(f"{path}: no {split} split ({layout} layout: {split}/*.csv or "
                      f"*{suffix}.csv files)")


def parse_csv(text: str, file: str, layout: str, subject: str
              ) -> tuple[list[Question], list[Reject]]:
    """Questions of one CSV file in a layout; rows that are not questions are rejected."""
    lay = LAYOUTS[layout]
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    questions: list[Question] = []
    rejects: list[Reject] = []
    first = 1
    if lay.header:
        if not rows:
            return [], []
        names = [c.strip().lower() for c in rows[0]]
        cols = {}
        for want in ("question", "a", "b", "c", "d", "answer"):
            if want not in names:
                raise ConfigError(f"{file}:1: the header {rows[0]} has no {want!r} column "
                                  f"({layout} layout)")
            cols[want] = names.index(want)
        width = len(names)
        rows = rows[1:]
        first = 2
    else:
        cols = {k: i for i, k in enumerate(("question", "a", "b", "c", "d", "answer"))}
        width = 6
    for n, row in enumerate(rows, start=first):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != width:
            rejects.append(Reject(file, n, f"{len(row)} columns, expected {width}"))
            continue
        answer = row[cols["answer"]].strip().upper() or None
        if answer is not None and answer not in LETTERS:
            rejects.append(Reject(file, n, f"answer {row[cols['answer']]!r} is not one of "
                                           "A, B, C, D"))
            continue
        questions.append(Question(
            id=f"{file}:{n}", subject=subject, question=row[cols["question"]].strip(),
            options={k: row[cols[k.lower()]].strip() for k in LETTERS}, answer=answer))
    return questions, rejects


def read_split(path: str, split: str, layout: str, subjects: Sequence[str] = ()
               ) -> tuple[dict[str, list[Question]], list[Reject]]:
    """Subject -> questions of one split, and the rejected rows."""
    files = subject_files(path, split, layout)
    if subjects:
        missing = [s for s in subjects if s not in files]
        if missing:
            raise ConfigError(f"{path}: no {split} file for subject(s) {missing} (found: "
                              f"{', '.join(sorted(files))})")
        files = {s: files[s] for s in subjects}
    out: dict[str, list[Question]] = {}
    rejects: list[Reject] = []
    for subject, f in files.items():
        qs, bad = parse_csv(storage.read_text(f), f, layout, subject)
        out[subject] = qs
        rejects.extend(bad)
    return out, rejects


# ---------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------


def format_question(q: Question, layout: str) -> str:
    """The question, its options one per line, and the answer word."""
    opts = "".join(f"\n{k}. {q.options[k]}" for k in LETTERS)
    return f"{q.question}{opts}\n{LAYOUTS[layout].answer_word}"


def continuation(q: Question, letter: str, choices: str) -> str:
    """What is scored for one option (without the space that precedes it)."""
    return letter if choices == "letter" else q.options[letter]


def shots_text(subject: str, shots: Sequence[Question], layout: str, choices: str) -> str:
    """The subject header and the solved examples: the part every question of a subject
    shares."""
    text = LAYOUTS[layout].intro.format(subject=subject.replace("_", " "))
    for s in shots:
        if s.answer is None:
            continue
        text += f"{format_question(s, layout)} {continuation(s, s.answer, choices)}\n\n"
    return text


@dataclass
class Encoded:
    """One question's token ids: the subject's shared prefix, the question, the options."""

    question: Question
    prefix_ids: list[int]
    question_ids: list[int]
    option_ids: list[list[int]]
    option_chars: list[int]
    """Characters of each option's continuation (for length normalisation)."""


@dataclass
class EncodedBenchmark:
    """A benchmark's prompts tokenized for one tokenizer; reused by every model using it."""

    name: str
    layout: str
    split: str
    k_shot: int
    subjects: dict[str, list[Encoded]]
    rejects: list[Reject] = field(default_factory=list)


def _chat_pieces(prefix: str, question: str, tokenizer, template: str) -> tuple[str, str]:
    """(prefix, rest) of the prompt rendered as one user turn: the text before and after
    the end of the shared prefix in the rendered turn."""
    text = render_prompt([{"role": "user", "content": prefix + question}], tokenizer, template)
    at = text.find(prefix + question)
    if at < 0:
        raise ConfigError("eval.benchmarks: the chat template changes the question text; "
                          "set chat: false")
    cut = at + len(prefix)
    return text[:cut], text[cut:]


def encode(name: str, bench: BenchmarkConfig, tokenizer, template: str = "auto"
           ) -> EncodedBenchmark:
    """Read a benchmark and tokenize its prompts (see the module docstring)."""
    layout = bench.layout or name
    split = bench.split or LAYOUTS[layout].default_split
    questions, rejects = read_split(bench.path, split, layout, bench.subjects)
    shots: dict[str, list[Question]] = {}
    if bench.k_shot:
        dev, dev_rejects = read_split(bench.path, bench.dev_split, layout, list(questions))
        rejects += dev_rejects
        shots = {s: [q for q in qs if q.answer is not None][: bench.k_shot]
                 for s, qs in dev.items()}
    subjects: dict[str, list[Encoded]] = {}
    for subject, qs in questions.items():
        labelled = [q for q in qs if q.answer is not None]
        if qs and not labelled:
            raise ConfigError(f"eval.benchmarks.{name}: the {split} split of {subject} has no "
                              "answers (C-Eval withholds test answers: use split val)")
        if bench.max_per_subject:
            labelled = labelled[: bench.max_per_subject]
        prefix = shots_text(subject, shots.get(subject, []), layout, bench.choices)
        enc = []
        for q in labelled:
            body = format_question(q, layout)
            if bench.chat:
                pre, rest = _chat_pieces(prefix, body, tokenizer, template)
                pre_ids = tokenizer(pre, add_special_tokens=False)["input_ids"]
            else:
                pre, rest = prefix, body
                pre_ids = tokenizer(pre, add_special_tokens=True)["input_ids"]
            conts = [continuation(q, k, bench.choices) for k in LETTERS]
            enc.append(Encoded(
                question=q, prefix_ids=pre_ids,
                question_ids=tokenizer(rest, add_special_tokens=False)["input_ids"],
                option_ids=[tokenizer(" " + c, add_special_tokens=False)["input_ids"]
                            for c in conts],
                option_chars=[max(1, len(c)) for c in conts]))
        subjects[subject] = enc
    return EncodedBenchmark(name=name, layout=layout, split=split, k_shot=bench.k_shot,
                            subjects=subjects, rejects=rejects)


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


def _is_prompt_learning(model) -> bool:
    cfg = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    if not isinstance(cfg, dict) or not isinstance(active, str) or active not in cfg:
        return False
    return bool(getattr(cfg[active], "is_prompt_learning", False))


def option_logliks_full(model, context: list[int], options: list[list[int]],
                        device: str = "cpu") -> list[float]:
    """Sum of log p(option tokens | context) per option, each row run whole (right padded,
    one batch). The reference path, and the one for prompt-learning adapters."""
    rows = [context + o for o in options]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       use_cache=False).logits[:, -width:, :].float()
    logp = torch.log_softmax(logits, dim=-1).cpu()
    out = []
    for i, o in enumerate(options):
        start = len(context)
        out.append(sum(float(logp[i, start + j - 1, t]) for j, t in enumerate(o)))
    return out


class PrefixScorer:
    """Scores questions that share a prefix: the prefix runs through the model once (KV
    cache), each question extends it, and its options run as one batch on top."""

    def __init__(self, model, prefix: list[int], device: str = "cpu"):
        self.model, self.device, self.prefix = model, device, list(prefix)
        self.cache = DynamicCache()
        with torch.no_grad():
            out = model(input_ids=torch.tensor([self.prefix], device=device),
                        past_key_values=self.cache, use_cache=True)
        self.last = out.logits[0, -1].float()
        self.saved = [(layer.keys, layer.values) for layer in self.cache.layers]
        self.ok = all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def _restore(self) -> None:
        for layer, (k, v) in zip(self.cache.layers, self.saved):
            layer.keys, layer.values = k, v

    def score(self, question: list[int], options: list[list[int]]) -> list[float]:
        if not self.ok:
            return option_logliks_full(self.model, self.prefix + question, options,
                                       self.device)
        self._restore()
        p, q = len(self.prefix), len(question)
        with torch.no_grad():
            if q:
                out = self.model(input_ids=torch.tensor([question], device=self.device),
                                 position_ids=torch.arange(p, p + q, device=self.device)[None],
                                 past_key_values=self.cache, use_cache=True)
                last = out.logits[0, -1].float()
            else:
                last = self.last
            first = torch.log_softmax(last, dim=-1).cpu()
            n = len(options)
            width = max(len(o) for o in options)
            ids = torch.zeros((n, width), dtype=torch.long)
            mask = torch.ones((n, p + q + width), dtype=torch.long)
            for i, o in enumerate(options):
                ids[i, : len(o)] = torch.tensor(o)
                mask[i, p + q + len(o):] = 0
            self.cache.batch_repeat_interleave(n)
            pos = torch.arange(p + q, p + q + width)[None].expand(n, width)
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=pos.to(self.device), past_key_values=self.cache,
                             use_cache=True)
            logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()
        self._restore()
        return [float(first[o[0]]) + sum(float(logp[i, j - 1, t]) for j, t in
                                         enumerate(o) if j > 0)
                for i, o in enumerate(options)]


def score_benchmark(model, enc: EncodedBenchmark, device: str = "cpu"
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results, per-question samples) of one model on an encoded benchmark.

    results: {overall: {acc, acc_norm, n, macro_acc}, subjects: {subject: {acc, acc_norm,
    n}}, split, k_shot, rejected}.
    """
    whole_rows = _is_prompt_learning(model)
    limit = context_limit(model)
    samples: list[dict[str, Any]] = []
    subjects: dict[str, dict[str, Any]] = {}
    truncated = 0
    for subject, items in enc.subjects.items():
        scorer: PrefixScorer | None = None
        right = right_norm = 0
        # Longer than the model's context: every question of the subject loses the same
        # number of tokens from the left of its prompt (the shots first), as lm-eval-harness
        # truncates context, so questions still share one prefix.
        over = max((len(e.prefix_ids) + len(e.question_ids) + max(map(len, e.option_ids))
                    for e in items), default=0) - limit if limit else 0
        for e in items:
            prefix, question = e.prefix_ids, e.question_ids
            if over > 0:
                truncated += 1
                prefix, question = prefix[over:], question[max(0, over - len(prefix)):]
            if whole_rows or not prefix:
                ll = option_logliks_full(model, prefix + question, e.option_ids, device)
            else:
                if scorer is None or scorer.prefix != prefix:
                    scorer = PrefixScorer(model, prefix, device)
                ll = scorer.score(question, e.option_ids)
            norm = [v / c for v, c in zip(ll, e.option_chars)]
            pred = LETTERS[max(range(len(ll)), key=lambda i: ll[i])]
            pred_norm = LETTERS[max(range(len(norm)), key=lambda i: norm[i])]
            right += pred == e.question.answer
            right_norm += pred_norm == e.question.answer
            samples.append({"id": e.question.id, "benchmark": enc.name, "subject": subject,
                            "answer": e.question.answer, "predicted": pred,
                            "predicted_norm": pred_norm, "correct": pred == e.question.answer,
                            "loglik": dict(zip(LETTERS, [round(v, 5) for v in ll]))})
        if items:
            subjects[subject] = {"acc": right / len(items), "acc_norm": right_norm / len(items),
                                 "n": len(items)}
    n = sum(s["n"] for s in subjects.values())
    overall = {
        "acc": sum(s["acc"] * s["n"] for s in subjects.values()) / n if n else None,
        "acc_norm": sum(s["acc_norm"] * s["n"] for s in subjects.values()) / n if n else None,
        "macro_acc": sum(s["acc"] for s in subjects.values()) / len(subjects) if subjects
        else None,
        "n": n,
    }
    return ({"overall": overall, "subjects": subjects, "layout": enc.layout, "split": enc.split,
             "k_shot": enc.k_shot, "truncated": truncated, "rejected": len(enc.rejects),
             "rejects": [r.to_dict() for r in enc.rejects[:100]]}, samples)


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """MLflow-style keys: <name>/acc, <name>/acc_norm, <name>/<subject>/acc ..."""
    out: dict[str, float] = {}
    for name, r in results.items():
        for k in ("acc", "acc_norm", "macro_acc"):
            if r["overall"].get(k) is not None:
                out[f"{name}/{k}"] = r["overall"][k]
        for subject, s in r["subjects"].items():
            out[f"{name}/{subject}/acc"] = s["acc"]
            out[f"{name}/{subject}/acc_norm"] = s["acc_norm"]
    return out


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """Per subject and overall, one table per benchmark."""
    lines = []
    for name, r in results.items():
        lines += [f"### {name} ({r['layout']}, {r['split']} split, {r['k_shot']}-shot)", "",
                  "| subject | n | acc | acc_norm |", "|---|---|---|---|"]
        for subject, s in sorted(r["subjects"].items()):
            lines.append(f"| {subject} | {s['n']} | {s['acc']:.3f} | {s['acc_norm']:.3f} |")
        o = r["overall"]
        if o["n"]:
            lines.append(f"| **overall** | {o['n']} | {o['acc']:.3f} | {o['acc_norm']:.3f} |")
        if r["rejected"]:
            lines += ["", f"{r['rejected']} rows rejected (see eval.json)"]
        if r.get("truncated"):
            lines += ["", f"{r['truncated']} prompts cut from the left to fit the context"]
        lines.append("")
    return "\n".join(lines)
