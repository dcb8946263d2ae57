"""Information extraction metrics as pure functions: a tolerant output parser, NER span,
RE triple and EE trigger/argument precision/recall/F1, per-type breakdowns, and scoring of
files in the datasets' own layouts (DuIE, DuEE, CLUENER / span lists).

* Parsing (`parse_output`): JSON, JSON inside a code fence, JSON embedded in prose (the
  outermost [...] or {...}), and `(head, relation, tail)` lines (RE) or `(entity, type)`
  lines (NER). An answer none of these read is unparseable: zero predictions, counted.
* RE, by the DuIE 2.0 official rules: subject and object values lowercased with a
  surrounding 《》 removed, duplicate triples removed per sentence, and a triple is correct
  when the predicate, the subject and every object slot are equal.
* NER: strict micro P/R/F1 on (type, entity string), duplicates per sentence removed.
* EE: trigger P/R/F1 on (event_type, trigger); argument P/R/F1 on (event_type, role,
  argument).
* Empty sets: with neither gold nor predictions P = R = F1 = 1; otherwise a side with
  nothing in it scores 0 (no predictions: P = 0; no gold: R = 0).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from ift import storage
from ift.config import ConfigError

# ---------------------------------------------------------------------------------------
# Parsing model output
# ---------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[A-Za-z]*\s*\n?(.*?)```", re.S)
_TUPLE = re.compile(r"^\s*[-*\d.]*\s*[(（](.+)[)）]\s*[,，;；]?\s*$")
_SEP = re.compile(r"\s*[,，]\s*")


def _json_candidates(text: str) -> Iterable[str]:
    for m in _FENCE.finditer(text):
        yield m.group(1).strip()
    yield text.strip()
    for open_, close in (("[", "]"), ("{", "}")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            yield text[i:j + 1]


def _as_items(obj: Any) -> list[Any] | None:
    if isinstance(obj, dict):
        return [obj]
    if isinstance(obj, list):
        return obj
    return None


def _tuple_lines(task: str, text: str) -> list[dict[str, Any]] | None:
    width = {"re": 3, "ner": 2}.get(task)
    if width is None:
        return None
    out = []
    for line in text.splitlines():
        m = _TUPLE.match(line)
        if not m:
            continue
        parts = [p.strip().strip("'\"“”") for p in _SEP.split(m.group(1).strip())]
        if len(parts) != width:
            continue
        if task == "re":
            out.append({"subject": parts[0], "predicate": parts[1], "object": parts[2]})
        else:
            out.append({"entity": parts[0], "type": parts[1]})
    return out or None


def _valid(task: str, item: Any) -> dict[str, Any] | None:
    """An item in the task's shape, or None."""
    if not isinstance(item, dict):
        return None
    s = lambda k: isinstance(item.get(k), str) and item[k].strip() != ""  # noqa: E731
    if task == "ner":
        return {"entity": item["entity"], "type": item["type"]} if s("entity") and s("type") \
            else None
    if task == "re":
        obj = item.get("object")
        if isinstance(obj, dict):
            if not isinstance(obj.get("@value"), str) or not all(
                    isinstance(v, str) for v in obj.values()):
                return None
        elif not isinstance(obj, str) or not obj.strip():
            return None
        return {"subject": item["subject"], "predicate": item["predicate"], "object": obj} \
            if s("subject") and s("predicate") else None
    if not (s("event_type") and s("trigger")):
        return None
    args = item.get("arguments") or []
    if not isinstance(args, list):
        return None
    return {"event_type": item["event_type"], "trigger": item["trigger"],
            "arguments": [{"role": a["role"], "argument": a["argument"]} for a in args
                          if isinstance(a, dict) and isinstance(a.get("role"), str)
                          and isinstance(a.get("argument"), str)]}


def parse_output(task: str, text: str) -> list[dict[str, Any]] | None:
    """The predictions a model's answer states, or None when it cannot be read at all.

    Items of the wrong shape inside readable JSON are skipped.
    """
    if text is None:
        return None
    for cand in _json_candidates(text):
        try:
            items = _as_items(json.loads(cand))
        except json.JSONDecodeError:
            continue
        if items is not None:
            return [v for v in (_valid(task, x) for x in items) if v is not None]
    return _tuple_lines(task, text)


# ---------------------------------------------------------------------------------------
# Normalisation and per-sentence tuples
# ---------------------------------------------------------------------------------------


def norm_duie(value: str) -> str:
    """DuIE 2.0 official value normalisation: lowercase, a surrounding 《》 removed."""
    v = value.strip().lower()
    if v.startswith("《") and v.endswith("》"):
        v = v[1:-1]
    return v


def re_triples(items: list[dict[str, Any]]) -> set[tuple]:
    """(predicate, subject, ((slot, value), ...)) per triple, normalised, deduplicated."""
    out = set()
    for it in items:
        obj = it["object"] if isinstance(it["object"], dict) else {"@value": it["object"]}
        slots = tuple(sorted((k, norm_duie(v)) for k, v in obj.items()))
        out.add((it["predicate"].strip(), norm_duie(it["subject"]), slots))
    return out


def ner_spans(items: list[dict[str, Any]]) -> set[tuple]:
    return {(it["type"].strip(), it["entity"].strip()) for it in items}


def ee_triggers(items: list[dict[str, Any]]) -> set[tuple]:
    return {(it["event_type"].strip(), it["trigger"].strip()) for it in items}


def ee_arguments(items: list[dict[str, Any]]) -> set[tuple]:
    return {(it["event_type"].strip(), a["role"].strip(), a["argument"].strip())
            for it in items for a in it.get("arguments") or []}


# kind -> (task, tuple function); the first tuple element is the per-type key
KINDS = {"ner": ("ner", ner_spans), "re": ("re", re_triples),
         "ee_trigger": ("ee", ee_triggers), "ee_argument": ("ee", ee_arguments)}
TASK_KINDS = {"ner": ("ner",), "re": ("re",), "ee": ("ee_trigger", "ee_argument")}


# ---------------------------------------------------------------------------------------
# Counting and P/R/F1
# ---------------------------------------------------------------------------------------


def prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    """Precision, recall and F1 (see the module docstring for empty sets)."""
    if n_pred == 0 and n_gold == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


class Scorer:
    """Accumulates one task's sentences: micro counts overall and per type."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.sentences = 0
        self.unparseable = 0
        self.counts: dict[str, Counter] = {k: Counter() for k in TASK_KINDS[task]}
        self.by_type: dict[str, dict[str, Counter]] = {k: defaultdict(Counter)
                                                      for k in TASK_KINDS[task]}

    def add(self, pred: list[dict[str, Any]] | None, gold: list[dict[str, Any]]) -> None:
        """One sentence: predictions (None: the answer was unparseable) and gold items."""
        self.sentences += 1
        if pred is None:
            self.unparseable += 1
            pred = []
        for kind in TASK_KINDS[self.task]:
            fn = KINDS[kind][1]
            p, g = fn(pred), fn(gold)
            tp = p & g
            for name, group in (("tp", tp), ("pred", p), ("gold", g)):
                self.counts[kind][name] += len(group)
                for t in group:
                    self.by_type[kind][t[0]][name] += 1

    def metrics(self) -> dict[str, Any]:
        """Flat metric names: ie_<kind>_{precision,recall,f1}, ie_<task>_unparseable, ..."""
        out: dict[str, Any] = {}
        for kind, c in self.counts.items():
            for k, v in prf(c["tp"], c["pred"], c["gold"]).items():
                out[f"ie_{kind}_{k}"] = v
        out[f"ie_{self.task}_sentences"] = self.sentences
        out[f"ie_{self.task}_unparseable"] = self.unparseable
        return out

    def rows(self) -> list[dict[str, Any]]:
        """Per-type rows (kind, type, tp, pred, gold, precision, recall, f1), overall first."""
        out = []
        for kind in TASK_KINDS[self.task]:
            c = self.counts[kind]
            out.append({"kind": kind, "type": "(all)", "tp": c["tp"], "pred": c["pred"],
                        "gold": c["gold"], **prf(c["tp"], c["pred"], c["gold"])})
            for t in sorted(self.by_type[kind]):
                tc = self.by_type[kind][t]
                out.append({"kind": kind, "type": t, "tp": tc["tp"], "pred": tc["pred"],
                            "gold": tc["gold"], **prf(tc["tp"], tc["pred"], tc["gold"])})
        return out


COLUMNS = ("kind", "type", "tp", "pred", "gold", "precision", "recall", "f1")


def table_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])
                                       for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: round(r[c], 6) if isinstance(r[c], float) else r[c] for c in COLUMNS})
    return buf.getvalue()


def score_samples(samples: Iterable[tuple[str, str, list[dict[str, Any]]]]
                  ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Scorer]]:
    """(task, model output, gold items) per sample -> (flat metrics, per-type rows, scorers).

    Schema chunks of one sentence are scored as separate samples (each has its own gold).
    """
    scorers: dict[str, Scorer] = {}
    for task, output, gold in samples:
        sc = scorers.setdefault(task, Scorer(task))
        sc.add(parse_output(task, output), gold)
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for task in sorted(scorers):
        metrics.update(scorers[task].metrics())
        rows.extend(scorers[task].rows())
    if scorers:
        metrics["ie_unparseable"] = sum(s.unparseable for s in scorers.values())
    return metrics, rows, scorers


# ---------------------------------------------------------------------------------------
# Files in the datasets' own layouts (`ift eval score`)
# ---------------------------------------------------------------------------------------


def items_of_row(task: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The extraction items a DuIE / DuEE / CLUENER / span-list row states (offsets are not
    checked: predictions need not carry them)."""
    out = []
    if task == "re":
        for spo in row.get("spo_list") or []:
            obj = spo.get("object") if isinstance(spo, dict) else None
            if isinstance(obj, dict) and len(obj) == 1 and "@value" in obj:
                obj = obj["@value"]
            v = _valid("re", {**spo, "object": obj}) if isinstance(spo, dict) else None
            if v:
                out.append(v)
    elif task == "ee":
        for ev in row.get("event_list") or []:
            v = _valid("ee", ev)
            if v:
                out.append(v)
    else:
        label = row.get("label")
        if isinstance(label, dict):
            for etype, ents in label.items():
                for ent in (ents or {}):
                    out.append({"entity": ent, "type": etype})
        for e in row.get("entity_list") or []:
            v = _valid("ner", e)
            if v:
                out.append(v)
    return out


def _read_jsonl(path: str, text: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON: {e.msg} at column {e.colno}") \
                from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object")
        rows.append(obj)
    return rows


def _row_key(row: dict[str, Any], by_id: bool) -> str:
    return str(row["id"]) if by_id else str(row.get("text", ""))


def score_files(task: str, pred_path: str, pred_text: str, gold_path: str,
                gold_text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score a predictions file against gold, both JSONL in the task's dataset layout.

    Rows are matched by `id` when every row of both files has one, else by `text` (as the
    DuIE scorer does); a gold row without a prediction counts as zero predictions, a
    prediction whose row is not in gold is an error naming its line.
    """
    if task not in TASK_KINDS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASK_KINDS)}")
    gold_rows = _read_jsonl(gold_path, gold_text)
    pred_rows = _read_jsonl(pred_path, pred_text)
    by_id = all("id" in r for r in gold_rows + pred_rows)
    preds: dict[str, list[dict[str, Any]]] = {}
    gold_keys = {_row_key(r, by_id) for r in gold_rows}
    for n, r in enumerate(pred_rows, start=1):
        k = _row_key(r, by_id)
        if k not in gold_keys:
            raise ValueError(f"{pred_path}: row {n} ({'id' if by_id else 'text'} {k[:40]!r}) "
                             f"is not in {gold_path}")
        preds.setdefault(k, []).extend(items_of_row(task, r))
    sc = Scorer(task)
    for r in gold_rows:
        sc.add(preds.get(_row_key(r, by_id), []), items_of_row(task, r))
    return sc.metrics(), sc.rows()


def score_cmd(args) -> int:
    """`ift eval score --task T --pred PRED --gold GOLD [--json] [--csv FILE]`."""
    texts = {}
    for flag, path in (("--pred", args.pred), ("--gold", args.gold)):
        if not storage.exists(path):
            raise ConfigError(f"{flag} {path}: no such file")
        texts[flag] = storage.read_text(path)
    try:
        values, rows = score_files(args.task, args.pred, texts["--pred"], args.gold,
                                   texts["--gold"])
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if args.csv:
        storage.write_text(args.csv, table_csv(rows))
    if args.json:
        print(json.dumps({"task": args.task, "metrics": values, "per_type": rows},
                         ensure_ascii=False, indent=2))
    else:
        print(table_markdown(rows), end="")
        print(f"{values[f'ie_{args.task}_sentences']} sentences")
    return 0
