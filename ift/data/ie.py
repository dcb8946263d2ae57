"""Information extraction (NER, RE, EE) sources -> schema-driven instruction records.

Formats (one pure parser each, raw row -> (text, gold); ConvertError names the reason):

* ``duie``      DuIE 2.0 relation extraction: ``{text, spo_list: [{predicate, subject,
                subject_type, object: {"@value", inWork, onDate, ...}, object_type}]}``;
                schema file: one JSON per line ``{predicate, subject_type, object_type: {...}}``.
* ``duee``      DuEE event extraction: ``{text, id, event_list: [{event_type, trigger,
                trigger_start_index, arguments: [{role, argument, argument_start_index}]}]}``;
                schema file: one JSON per line ``{event_type, role_list: [{role}, ...]}``.
* ``cluener``   CLUENER NER: ``{text, label: {type: {entity: [[start, end], ...]}}}``, end
                inclusive.
* ``ner_spans`` span lists: ``{text, entity_list: [{type, entity, start_idx, end_idx}]}``;
                end_idx may be exclusive or inclusive (whichever the text confirms).
* ``ner_bio``   character-per-line files (``char<space>tag``, a blank line between sentences),
                BIO, BIOES or BMES tags; the reader turns each sentence into
                ``{chars: [...], tags: [...]}``.
                NER schema file (any NER format): a JSON list of types, or one type per line.

Gold structures (kept in ``meta["ie"]["gold"]``; the assistant turn is their sorted JSON):

* ner: ``{"entity", "type"}``
* re:  ``{"subject", "predicate", "object"}``; ``object`` is the ``@value`` text, or a dict of
  every slot (``{"@value", "inWork", ...}``) when the object has several
* ee:  ``{"event_type", "trigger", "arguments": [{"role", "argument"}]}``

The instruction names the task and the candidate labels: the whole schema, or when
``max_labels`` is set and the schema is larger, the row's gold labels plus negatives sampled
deterministically by seed and row id; with ``split`` the schema is cut into chunks of
``max_labels`` labels instead, one record per chunk (gold restricted to the chunk). Phrasings
(8 Chinese, 4 English per task) are chosen per row by seed; English text gets English.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from ift.data.quality import detect_lang
from ift.data.record import ConvertError, make_record

FORMATS = ("duie", "duee", "cluener", "ner_spans", "ner_bio")
TASK_OF = {"duie": "re", "duee": "ee", "cluener": "ner", "ner_spans": "ner", "ner_bio": "ner"}
TASKS = ("ner", "re", "ee")


@dataclass(frozen=True)
class LabelOptions:
    """How candidate labels are put into instructions."""

    max_labels: int = 0
    """Most labels one instruction lists; 0 lists the whole schema."""
    split: bool = False
    """Cut a schema larger than max_labels into chunks, one record per chunk, instead of
    listing gold labels plus sampled negatives."""


# ---------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------


def parse_schema(fmt: str, text: str, path: str = "schema") -> dict[str, Any]:
    """A schema file's content -> {label: detail}; errors name the file and line.

    duie: predicate -> {"subject_type", "object_type": {slot: type}}; duee: event type ->
    [roles]; NER formats: type -> None (a JSON list of types or one type per line).
    """
    task = TASK_OF.get(fmt)
    if task is None:
        raise ValueError(f"{path}: format {fmt!r} takes no schema "
                         f"(IE formats: {', '.join(FORMATS)})")
    stripped = text.lstrip("\ufeff").strip()
    if task == "ner":
        if stripped.startswith("["):
            try:
                labels = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}") from None
            if not all(isinstance(x, str) and x.strip() for x in labels):
                raise ValueError(f"{path}: expected a JSON list of entity type names")
        else:
            labels = [ln.strip() for ln in stripped.splitlines() if ln.strip()]
        if not labels:
            raise ValueError(f"{path}: no entity types")
        return {x.strip(): None for x in labels}
    out: dict[str, Any] = {}
    for n, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object")
        if task == "re":
            pred, otype = obj.get("predicate"), obj.get("object_type")
            if not isinstance(pred, str) or not pred:
                raise ValueError(f"{path}:{n}: no 'predicate'")
            if isinstance(otype, str):
                otype = {"@value": otype}
            if not isinstance(otype, dict) or "@value" not in otype:
                raise ValueError(f"{path}:{n}: 'object_type' must be an object with '@value'")
            out[pred] = {"subject_type": obj.get("subject_type", ""), "object_type": otype}
        else:
            etype, roles = obj.get("event_type"), obj.get("role_list")
            if not isinstance(etype, str) or not etype:
                raise ValueError(f"{path}:{n}: no 'event_type'")
            if not isinstance(roles, list):
                raise ValueError(f"{path}:{n}: 'role_list' must be a list")
            out[etype] = [r["role"] if isinstance(r, dict) else str(r) for r in roles]
    if not out:
        raise ValueError(f"{path}: empty schema")
    return out


# ---------------------------------------------------------------------------------------
# Parsers: raw row -> (text, gold)
# ---------------------------------------------------------------------------------------


def _row_text(raw: dict[str, Any]) -> str:
    text = raw.get("text")
    if text is None:
        raise ConvertError("missing field 'text'")
    if not isinstance(text, str):
        raise ConvertError("field 'text' is not text")
    if not text.strip():
        raise ConvertError("empty text")
    return text


def _check_span(text: str, start: Any, value: str, what: str) -> None:
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ConvertError(f"{what}: start index {start!r} is not a non-negative integer")
    if text[start:start + len(value)] != value:
        raise ConvertError(f"{what}: offset {start} does not match the text "
                           f"(text has {text[start:start + len(value)]!r}, expected {value!r})")


def parse_duie(raw: dict[str, Any], schema: dict | None = None) -> tuple[str, list[dict]]:
    text = _row_text(raw)
    spos = raw.get("spo_list", [])
    if not isinstance(spos, list):
        raise ConvertError("field 'spo_list' is not a list")
    gold = []
    for i, spo in enumerate(spos, start=1):
        if not isinstance(spo, dict):
            raise ConvertError(f"spo_list item {i} is not an object")
        pred, subj, obj = spo.get("predicate"), spo.get("subject"), spo.get("object")
        if not isinstance(pred, str) or not pred:
            raise ConvertError(f"spo_list item {i}: no predicate")
        if schema is not None and pred not in schema:
            raise ConvertError(f"spo_list item {i}: predicate {pred!r} is not in the schema")
        if not isinstance(subj, str) or not subj:
            raise ConvertError(f"spo_list item {i}: no subject")
        if isinstance(obj, str):
            obj = {"@value": obj}
        if not isinstance(obj, dict) or not isinstance(obj.get("@value"), str) \
                or not obj["@value"]:
            raise ConvertError(f"spo_list item {i}: object has no '@value'")
        for slot, v in obj.items():
            if not isinstance(v, str):
                raise ConvertError(f"spo_list item {i}: object slot {slot!r} is not text")
        if schema is not None:
            slots = set(schema[pred]["object_type"])
            extra = sorted(set(obj) - slots)
            if extra:
                raise ConvertError(f"spo_list item {i}: object slot {extra[0]!r} is not in the "
                                   f"schema of {pred!r} (slots: {', '.join(sorted(slots))})")
        gold.append({"subject": subj, "predicate": pred,
                     "object": obj["@value"] if len(obj) == 1 else dict(sorted(obj.items()))})
    return text, gold


def parse_duee(raw: dict[str, Any], schema: dict | None = None) -> tuple[str, list[dict]]:
    text = _row_text(raw)
    events = raw.get("event_list", [])
    if not isinstance(events, list):
        raise ConvertError("field 'event_list' is not a list")
    gold = []
    for i, ev in enumerate(events, start=1):
        if not isinstance(ev, dict):
            raise ConvertError(f"event_list item {i} is not an object")
        etype, trigger = ev.get("event_type"), ev.get("trigger")
        if not isinstance(etype, str) or not etype:
            raise ConvertError(f"event_list item {i}: no event_type")
        if schema is not None and etype not in schema:
            raise ConvertError(f"event_list item {i}: event type {etype!r} is not in the schema")
        if not isinstance(trigger, str) or not trigger:
            raise ConvertError(f"event_list item {i}: no trigger")
        if "trigger_start_index" in ev:
            _check_span(text, ev["trigger_start_index"], trigger, f"event_list item {i} trigger")
        args = []
        for j, a in enumerate(ev.get("arguments") or [], start=1):
            where = f"event_list item {i} argument {j}"
            if not isinstance(a, dict) or not isinstance(a.get("role"), str) \
                    or not isinstance(a.get("argument"), str) or not a["argument"]:
                raise ConvertError(f"{where}: needs role and argument text")
            if schema is not None and a["role"] not in schema[etype]:
                raise ConvertError(f"{where}: role {a['role']!r} is not a role of {etype!r}")
            if "argument_start_index" in a:
                _check_span(text, a["argument_start_index"], a["argument"], where)
            args.append({"role": a["role"], "argument": a["argument"]})
        gold.append({"event_type": etype, "trigger": trigger,
                     "arguments": sorted(args, key=lambda a: (a["role"], a["argument"]))})
    return text, gold


def _check_type(etype: Any, schema: dict | None, where: str) -> str:
    if not isinstance(etype, str) or not etype:
        raise ConvertError(f"{where}: no entity type")
    if schema is not None and etype not in schema:
        raise ConvertError(f"{where}: entity type {etype!r} is not in the schema")
    return etype


def parse_cluener(raw: dict[str, Any], schema: dict | None = None) -> tuple[str, list[dict]]:
    text = _row_text(raw)
    label = raw.get("label", {})
    if not isinstance(label, dict):
        raise ConvertError("field 'label' is not an object of type -> {entity: [[start, end]]}")
    gold = []
    for etype, ents in label.items():
        _check_type(etype, schema, f"label {etype!r}")
        if not isinstance(ents, dict):
            raise ConvertError(f"label {etype!r} is not an object of entity -> spans")
        for ent, spans in ents.items():
            if not isinstance(spans, list) or not spans:
                raise ConvertError(f"label {etype!r} entity {ent!r}: no [start, end] spans")
            for span in spans:
                ok = isinstance(span, list) and len(span) == 2 and all(
                    isinstance(x, int) and not isinstance(x, bool) for x in span)
                if not ok:
                    raise ConvertError(f"label {etype!r} entity {ent!r}: span {span!r} is not "
                                       "[start, end]")
                if span[1] - span[0] + 1 != len(ent):
                    raise ConvertError(f"label {etype!r} entity {ent!r}: span {span} does not "
                                       "match the text (end is inclusive)")
                _check_span(text, span[0], ent, f"label {etype!r} entity {ent!r}")
                gold.append({"entity": ent, "type": etype, "start": span[0]})
    return text, gold


def parse_ner_spans(raw: dict[str, Any], schema: dict | None = None) -> tuple[str, list[dict]]:
    text = _row_text(raw)
    ents = raw.get("entity_list", [])
    if not isinstance(ents, list):
        raise ConvertError("field 'entity_list' is not a list")
    gold = []
    for i, e in enumerate(ents, start=1):
        where = f"entity_list item {i}"
        if not isinstance(e, dict):
            raise ConvertError(f"{where} is not an object")
        etype = _check_type(e.get("type"), schema, where)
        ent, start, end = e.get("entity"), e.get("start_idx"), e.get("end_idx")
        if not isinstance(ent, str) or not ent:
            raise ConvertError(f"{where}: no entity text")
        if start is not None:
            if not isinstance(end, int) or end - start not in (len(ent), len(ent) - 1):
                raise ConvertError(f"{where}: start_idx {start!r}, end_idx {end!r} do not span "
                                   f"{ent!r}")
            _check_span(text, start, ent, where)
        elif ent not in text:
            raise ConvertError(f"{where}: entity {ent!r} is not in the text")
        gold.append({"entity": ent, "type": etype,
                     "start": start if start is not None else text.index(ent)})
    return text, gold


def bio_spans(tags: list[str]) -> list[tuple[int, int, str]]:
    """(start, end exclusive, type) spans of a BIO / BIOES / BMES tag sequence.

    Raises ConvertError naming the position of a broken sequence: I-/M-/E- that continues
    no open entity of its type, or an entity left open before an S-/B- in BIOES.
    """
    spans: list[tuple[int, int, str]] = []
    open_start, open_type = None, None

    def close(end: int) -> None:
        nonlocal open_start, open_type
        if open_start is not None:
            spans.append((open_start, end, open_type))
        open_start, open_type = None, None

    for i, tag in enumerate(tags):
        if tag == "O":
            close(i)
            continue
        if len(tag) < 3 or tag[1] not in "-_" or tag[0] not in "BIMES":
            raise ConvertError(f"char {i + 1}: tag {tag!r} is not O, B-X, I-X, M-X, E-X or S-X")
        kind, etype = tag[0], tag[2:]
        if kind in "BS":
            close(i)
            if kind == "S":
                spans.append((i, i + 1, etype))
            else:
                open_start, open_type = i, etype
        else:  # I, M, E continue an open entity of the same type
            if open_start is None or open_type != etype:
                raise ConvertError(f"char {i + 1}: {tag} without a preceding B-{etype}")
            if kind == "E":
                close(i + 1)
    close(len(tags))
    return spans


def parse_ner_bio(raw: dict[str, Any], schema: dict | None = None) -> tuple[str, list[dict]]:
    chars, tags = raw.get("chars"), raw.get("tags")
    if not isinstance(chars, list) or not isinstance(tags, list) or len(chars) != len(tags):
        raise ConvertError("a BIO sentence needs as many tags as characters")
    text = "".join(chars)
    if not text.strip():
        raise ConvertError("empty text")
    gold = []
    for start, end, etype in bio_spans(tags):
        _check_type(etype, schema, f"char {start + 1}")
        gold.append({"entity": "".join(chars[start:end]), "type": etype,
                     "start": len("".join(chars[:start]))})
    return text, gold


PARSERS = {"duie": parse_duie, "duee": parse_duee, "cluener": parse_cluener,
           "ner_spans": parse_ner_spans, "ner_bio": parse_ner_bio}


# ---------------------------------------------------------------------------------------
# Gold -> answer text; labels
# ---------------------------------------------------------------------------------------


LABEL_KEY = {"ner": "type", "re": "predicate", "ee": "event_type"}
"""The field of a gold item that holds its schema label."""


def _sort_key(task: str, item: dict[str, Any]) -> tuple:
    if task == "ner":
        return (item.get("start", 0), item["type"], item["entity"])
    if task == "re":
        return (item["subject"], item["predicate"], json.dumps(item["object"], ensure_ascii=False))
    return (item["event_type"], item["trigger"], json.dumps(item["arguments"], ensure_ascii=False))


def answer_items(task: str, gold: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gold as the model should write it: fixed key order, sorted, duplicates dropped."""
    out, seen = [], set()
    for item in sorted(gold, key=lambda x: _sort_key(task, x)):
        if task == "ner":
            a = {"entity": item["entity"], "type": item["type"]}
        elif task == "re":
            a = {"subject": item["subject"], "predicate": item["predicate"],
                 "object": item["object"]}
        else:
            a = {"event_type": item["event_type"], "trigger": item["trigger"],
                 "arguments": item["arguments"]}
        k = json.dumps(a, ensure_ascii=False, sort_keys=True)
        if k not in seen:
            seen.add(k)
            out.append(a)
    return out


def _rng(seed: int, row_id: str, what: str) -> random.Random:
    h = hashlib.blake2b(f"{seed}\x1f{row_id}\x1f{what}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "big"))


def label_groups(labels: list[str], gold_labels: set[str], opts: LabelOptions, seed: int,
                 row_id: str) -> list[list[str]]:
    """The candidate label lists of a row: one list, or one per schema chunk."""
    if opts.max_labels <= 0 or len(labels) <= opts.max_labels:
        return [list(labels)]
    if opts.split:
        return [labels[i:i + opts.max_labels] for i in range(0, len(labels), opts.max_labels)]
    gold = [x for x in labels if x in gold_labels]
    rest = [x for x in labels if x not in gold_labels]
    picked = set(gold) | set(_rng(seed, row_id, "neg").sample(rest, max(0, opts.max_labels
                                                                          - len(gold))))
    return [[x for x in labels if x in picked]]  # schema order: the list does not leak gold


# ---------------------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------------------

# {labels}: the candidate list; {text}: the input. Output format lines follow per language.
PHRASINGS: dict[str, dict[str, list[str]]] = {
    "ner": {
        "zh": [
            "请从下面的文本中找出所有命名实体。实体类型：{labels}。\n文本：{text}",
            "命名实体识别：识别句子中属于以下类型的实体：{labels}。\n句子：{text}",
            "阅读这段文字，抽取其中的{labels}等实体。\n{text}",
            "找出下文中提到的实体，并标注类型（可选类型：{labels}）。\n输入：{text}",
            "任务：实体抽取。候选类型为{labels}。\n待抽取文本：{text}",
            "以下句子中有哪些实体？只考虑这些类型：{labels}。\n{text}",
            "给定实体类型列表【{labels}】，请标出文本里出现的所有实体。\n文本：{text}",
            "请完成命名实体识别任务，类型范围：{labels}。\n原文：{text}",
        ],
        "en": [
            "Find all named entities in the text below. Entity types: {labels}.\nText: {text}",
            "Named entity recognition: extract entities of these types: {labels}.\n"
            "Sentence: {text}",
            "Read the passage and list every entity of type {labels}.\n{text}",
            "Which entities does this text mention? Consider only: {labels}.\nInput: {text}",
        ],
    },
    "re": {
        "zh": [
            "请从下面的句子中抽取关系三元组。候选关系：{labels}。\n句子：{text}",
            "关系抽取：找出文本中符合以下关系的（主体，关系，客体）：{labels}。\n文本：{text}",
            "阅读这段话，抽取其中的实体关系，关系类型限于：{labels}。\n{text}",
            "任务：SPO 三元组抽取。可选关系为{labels}。\n输入：{text}",
            "给定关系列表【{labels}】，请列出句子中表达的所有关系。\n句子：{text}",
            "下面的文本描述了哪些事实？请用三元组表示，只考虑关系：{labels}。\n{text}",
            "请识别文本里的主体和客体，并判断它们之间的关系（候选：{labels}）。\n原文：{text}",
            "从给定文本中抽取知识三元组，关系集合：{labels}。\n待抽取文本：{text}",
        ],
        "en": [
            "Extract relation triples from the sentence below. Candidate relations: {labels}.\n"
            "Sentence: {text}",
            "Relation extraction: find (subject, relation, object) facts for these relations: "
            "{labels}.\nText: {text}",
            "Which facts does this text state? Use only the relations {labels}.\n{text}",
            "List every subject-predicate-object triple in the input (relations: {labels}).\n"
            "Input: {text}",
        ],
    },
    "ee": {
        "zh": [
            "请从下面的文本中抽取事件。候选事件类型及其论元角色：{labels}。\n文本：{text}",
            "事件抽取：识别句子中的事件、触发词和论元，事件类型：{labels}。\n句子：{text}",
            "阅读这段新闻，找出其中发生的事件（可选：{labels}），并给出触发词和各个角色。\n{text}",
            "任务：事件抽取。事件类型与角色如下：{labels}。\n输入：{text}",
            "给定事件结构【{labels}】，请抽取文本中的所有事件。\n原文：{text}",
            "下文描述了哪些事件？请按以下类型抽取：{labels}。\n{text}",
            "请找出句子里的事件触发词，判断事件类型（{labels}），并抽取论元。\n句子：{text}",
            "从文本中抽取结构化事件信息，事件类型范围：{labels}。\n待抽取文本：{text}",
        ],
        "en": [
            "Extract the events in the text below. Event types and their roles: {labels}.\n"
            "Text: {text}",
            "Event extraction: find each event's type, trigger and arguments. Types: {labels}.\n"
            "Sentence: {text}",
            "Which events does this passage report? Consider only {labels}.\n{text}",
            "List every event in the input with its trigger and arguments (types: {labels}).\n"
            "Input: {text}",
        ],
    },
}

OUTPUT_SPEC = {
    "ner": {"zh": '以 JSON 列表输出，每项为 {"entity": 实体, "type": 类型}；没有则输出 []。',
            "en": 'Answer with a JSON list of {"entity": ..., "type": ...}; [] if there is none.'},
    "re": {"zh": '以 JSON 列表输出，每项为 {"subject": 主体, "predicate": 关系, "object": 客体}；'
                 '没有则输出 []。',
           "en": 'Answer with a JSON list of {"subject": ..., "predicate": ..., "object": ...}; '
                 '[] if there is none.'},
    "ee": {"zh": '以 JSON 列表输出，每项为 {"event_type": 类型, "trigger": 触发词, "arguments": '
                 '[{"role": 角色, "argument": 论元}]}；没有则输出 []。',
           "en": 'Answer with a JSON list of {"event_type": ..., "trigger": ..., "arguments": '
                 '[{"role": ..., "argument": ...}]}; [] if there is none.'},
}


def _labels_text(task: str, labels: list[str], schema: dict | None, lang: str) -> str:
    if task == "ee" and schema:  # event types with their roles
        if lang == "zh":
            return "；".join(f"{t}（{'、'.join(schema[t])}）" for t in labels)
        return "; ".join(f"{t} ({'/'.join(schema[t])})" for t in labels)
    return ("、" if lang == "zh" else ", ").join(labels)


def template_index(task: str, lang: str, seed: int, row_id: str) -> int:
    return _rng(seed, row_id, "phrasing").randrange(len(PHRASINGS[task][lang]))


def instruction(task: str, lang: str, text: str, labels: list[str], schema: dict | None,
                idx: int) -> str:
    body = PHRASINGS[task][lang][idx].format(labels=_labels_text(task, labels, schema, lang),
                                            text=text)
    return f"{body}\n{OUTPUT_SPEC[task][lang]}"


def to_records(fmt: str, raw: dict[str, Any], *, id: str, source: str, seed: int = 42,
               schema: dict | None = None, labels: LabelOptions = LabelOptions(),
               task: str = "", system: str | None = None) -> list[dict[str, Any]]:
    """One raw IE row -> its instruction records (one, or one per schema chunk)."""
    ie_task = TASK_OF[fmt]
    text, gold = PARSERS[fmt](raw, schema)
    lang = "en" if detect_lang(text) == "en" else "zh"
    key = LABEL_KEY[ie_task]
    gold_labels = {g[key] for g in gold}
    names = list(schema) if schema else sorted(gold_labels)
    if not names:
        raise ConvertError("no candidate labels: the row has no gold and the source no schema")
    groups = label_groups(names, gold_labels, labels, seed, id)
    idx = template_index(ie_task, lang, seed, id)
    out = []
    for k, group in enumerate(groups):
        in_group = set(group)
        g = [x for x in gold if x[key] in in_group]
        ans = answer_items(ie_task, g)
        messages = [{"role": "user", "content": instruction(ie_task, lang, text, group,
                                                            schema, idx)},
                    {"role": "assistant", "content": json.dumps(ans, ensure_ascii=False)}]
        meta = {"ie": {"task": ie_task, "format": fmt, "text": text, "labels": group,
                       "gold": ans, "chunk": k, "chunks": len(groups)}, "ie_template": idx}
        if raw.get("id") is not None:
            meta["ie"]["source_id"] = str(raw["id"])
        out.append(make_record(id=id if k == 0 else f"{id}#{k}", source=source,
                               messages=messages, system=system or "",
                               task=task or ie_task, lang=lang, meta=meta))
    return out
