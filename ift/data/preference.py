"""Preference pairs: source layouts -> one pair record -> tokenized chosen and rejected rows.

The pair record is the unified record with its last assistant turn split in two:

    {id, source, lang, task, system, prompt: [{role, content}], chosen, rejected, meta}

`prompt` is the conversation before the reply (it ends with a user turn); `chosen` and
`rejected` are the two replies to it. Layouts, detected from a row's keys:

    alpaca_pairs       {instruction, input?, chosen, rejected, system?, history?}
    sharegpt_pairs     {conversations, chosen: {from, value}, rejected: {from, value}}
    hh_rlhf            {chosen: "\\n\\nHuman: ...\\n\\nAssistant: ...", rejected: "..."}
    messages_pairs     {prompt | messages, chosen: [messages], rejected: [messages]}
    openai_preference  {input: {messages}, preferred_output: [...], non_preferred_output: [...]}

A pair is rejected (ConvertError with the reason) when a reply is empty, both replies are
the same, the prompt has no user turn, or hh-rlhf transcripts do not share a prompt.

Tokenization renders prompt + chosen and prompt + rejected with the same template through
ift.data.tokenize, then keeps labels on the final reply only. Sequences longer than
max_seq_len keep the prompt's end and the replies' starts; a pair whose reply keeps no
trainable token is dropped with its reason.
"""

from __future__ import annotations

from typing import Any

from ift.artifacts import IGNORE_INDEX
from ift.config import PAIR_FORMATS
from ift.data import formats
from ift.data.quality import record_lang, validate
from ift.data.record import ConvertError, conversation_hash, make_record
from ift.data.tokenize import tokenize_records

_NO_LIMIT = 1 << 30


# ---------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------


def pair_format_of(rec: dict[str, Any]) -> str | None:
    """The preference layout of a raw row, or None when it holds no pair."""
    if "preferred_output" in rec and "non_preferred_output" in rec:
        return "openai_preference"
    if "chosen" not in rec or "rejected" not in rec:
        return None
    if "conversations" in rec:
        return "sharegpt_pairs"
    if "instruction" in rec:
        return "alpaca_pairs"
    if "prompt" in rec or "messages" in rec or isinstance(rec.get("chosen"), list):
        return "messages_pairs"
    if isinstance(rec.get("chosen"), str):
        return "hh_rlhf"
    return None


# ---------------------------------------------------------------------------------------
# Converters: raw row -> pair record
# ---------------------------------------------------------------------------------------


def _reply_text(v: Any, fld: str) -> str:
    """A reply given as text, a {from, value} / {role, content} turn or a list of turns
    (the last assistant turn's text)."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list) and v:
        messages, _ = formats._turn_list(v, fld, {})
        last = messages[-1]
        if last["role"] != "assistant":
            raise ConvertError(f"field {fld!r}: last turn is {last['role']}, expected assistant")
        return last["content"]
    raise ConvertError(f"field {fld!r} is a {formats._type(v)}, expected a reply")


def _alpaca_pairs(r: dict[str, Any]) -> tuple[str, list[dict], str, str]:
    instruction = formats._text(r, "instruction", {}, required=True)
    inp = formats._text(r, "input", {})
    user = "\n".join(x for x in (instruction, inp) if x.strip())
    prompt = [*formats._history_turns(r, {}, False), {"role": "user", "content": user}]
    return (formats._text(r, "system", {}), prompt, _reply_text(r["chosen"], "chosen"),
            _reply_text(r["rejected"], "rejected"))


def _split_system(messages: list[dict], system: str) -> tuple[str, list[dict]]:
    if messages and messages[0]["role"] == "system":
        first = messages[0]["content"]
        return (f"{system}\n\n{first}" if system.strip() else first), messages[1:]
    return system, messages


def _sharegpt_pairs(r: dict[str, Any]) -> tuple[str, list[dict], str, str]:
    prompt, _ = formats._turn_list(r["conversations"], "conversations", {})
    system, prompt = _split_system(prompt, formats._text(r, "system", {}))
    return system, prompt, _reply_text(r["chosen"], "chosen"), _reply_text(r["rejected"],
                                                                           "rejected")


def _common_prompt(chosen: list[dict], rejected: list[dict]) -> list[dict]:
    """The turns both conversations share before their final replies."""
    if chosen[:-1] != rejected[:-1]:
        raise ConvertError("chosen and rejected conversations differ before their final replies")
    return chosen[:-1]


def _messages_pairs(r: dict[str, Any]) -> tuple[str, list[dict], str, str]:
    prompt_v = r.get("prompt", r.get("messages"))
    chosen_v, rejected_v = r["chosen"], r["rejected"]
    if isinstance(prompt_v, str):
        prompt = [{"role": "user", "content": prompt_v}]
    elif isinstance(prompt_v, list):
        prompt, _ = formats._turn_list(prompt_v, "prompt" if "prompt" in r else "messages", {})
    elif prompt_v is None:
        prompt = []
    else:
        raise ConvertError(f"field 'prompt' is a {formats._type(prompt_v)}, expected text or "
                           "a list of turns")
    if isinstance(chosen_v, list) and isinstance(rejected_v, list):
        c_msgs, _ = formats._turn_list(chosen_v, "chosen", {})
        r_msgs, _ = formats._turn_list(rejected_v, "rejected", {})
        if not c_msgs or not r_msgs:
            raise ConvertError("empty reply: chosen or rejected holds no turn")
        for msgs, fld in ((c_msgs, "chosen"), (r_msgs, "rejected")):
            if msgs[-1]["role"] != "assistant":
                raise ConvertError(f"field {fld!r}: last turn is {msgs[-1]['role']}, "
                                   "expected assistant")
        shared = _common_prompt(c_msgs, r_msgs)
        # UltraFeedback repeats the prompt inside chosen/rejected; take it once.
        if shared and shared != prompt[-len(shared):]:
            prompt = prompt + shared if prompt else shared
        chosen, rejected = c_msgs[-1]["content"], r_msgs[-1]["content"]
    else:
        chosen, rejected = _reply_text(chosen_v, "chosen"), _reply_text(rejected_v, "rejected")
    system, prompt = _split_system(prompt, formats._text(r, "system", {}))
    return system, prompt, chosen, rejected


_HH_REPLY = "\n\nAssistant:"


def _hh_rlhf(r: dict[str, Any]) -> tuple[str, list[dict], str, str]:
    c = formats._text(r, "chosen", {}, required=True)
    rj = formats._text(r, "rejected", {}, required=True)
    cut = c.rfind(_HH_REPLY)
    if cut < 0:
        raise ConvertError("hh-rlhf: chosen has no '\\n\\nAssistant:' turn")
    head = c[: cut + len(_HH_REPLY)]
    if not rj.startswith(head):
        raise ConvertError("hh-rlhf: chosen and rejected do not share a prompt (the rejected "
                           "transcript does not start with the chosen one up to its last "
                           "Assistant: turn)")
    try:
        preamble, turns = formats.split_human_assistant(c[:cut])
    except ValueError:
        raise ConvertError("hh-rlhf: no Human: turn before the final reply") from None
    prompt = [{"role": role, "content": text} for role, text in turns]
    return preamble, prompt, c[len(head):].strip(), rj[len(head):].strip()


def _openai_preference(r: dict[str, Any]) -> tuple[str, list[dict], str, str]:
    inp = r.get("input")
    if not isinstance(inp, dict) or "messages" not in inp:
        raise ConvertError("field 'input' is not an object with messages")
    prompt, _ = formats._turn_list(inp["messages"], "input.messages", {})
    system, prompt = _split_system(prompt, "")
    return (system, prompt, _reply_text(r["preferred_output"], "preferred_output"),
            _reply_text(r["non_preferred_output"], "non_preferred_output"))


_CONVERTERS = {
    "alpaca_pairs": _alpaca_pairs,
    "sharegpt_pairs": _sharegpt_pairs,
    "hh_rlhf": _hh_rlhf,
    "messages_pairs": _messages_pairs,
    "openai_preference": _openai_preference,
}


def convert_pair(fmt: str, raw: Any, *, id: str, source: str, task: str = "",
                 system: str | None = None) -> dict[str, Any]:
    """One raw row -> a pair record; ConvertError(reason) when it is not a usable pair."""
    fn = _CONVERTERS.get(fmt)
    if fn is None:
        raise ValueError(f"unknown preference format {fmt!r}; expected one of "
                         f"{', '.join(PAIR_FORMATS)}")
    if not isinstance(raw, dict):
        raise ConvertError(f"row is a {formats._type(raw)}, expected an object")
    for fld in {"openai_preference": ("preferred_output", "non_preferred_output")}.get(
            fmt, ("chosen", "rejected")):
        if raw.get(fld) is None:
            raise ConvertError(f"missing field {fld!r}")
    row_system, prompt, chosen, rejected = fn(raw)
    sys_prompt = row_system if row_system.strip() else (system or "")
    pair = {
        **make_record(id=id, source=source, messages=prompt, system=sys_prompt,
                      task=task or "preference"),
        "chosen": chosen,
        "rejected": rejected,
    }
    pair["prompt"] = pair.pop("messages")
    reason = check_pair(pair)
    if reason is not None:
        raise ConvertError(reason)
    pair["lang"] = record_lang(sys_prompt, [*prompt, {"role": "assistant", "content": chosen}])
    return pair


def check_pair(pair: dict[str, Any]) -> str | None:
    """The first reason a pair is unfit for preference training, or None."""
    if not pair["chosen"].strip() or not pair["rejected"].strip():
        return f"empty reply: {'chosen' if not pair['chosen'].strip() else 'rejected'} is empty"
    if not any(m["role"] == "user" for m in pair["prompt"]):
        return "the prompt has no user turn"
    if pair["chosen"].strip() == pair["rejected"].strip():
        return "chosen equals rejected"
    for side in ("chosen", "rejected"):
        reason = validate(side_record(pair, side))
        if reason is not None:
            return f"{side}: {reason}"
    return None


def side_record(pair: dict[str, Any], side: str) -> dict[str, Any]:
    """The conversation record of one side: prompt + that reply."""
    return make_record(id=pair["id"], source=pair["source"], system=pair.get("system", ""),
                       messages=[*pair["prompt"], {"role": "assistant", "content": pair[side]}],
                       task=pair.get("task", ""), lang=pair.get("lang", ""),
                       meta=pair.get("meta"))


def pair_hash(pair: dict[str, Any]) -> str:
    """Exact-duplicate key: the normalized system prompt, prompt turns and both replies."""
    return conversation_hash({"system": pair.get("system", ""), "messages": [
        *pair["prompt"], {"role": "chosen", "content": pair["chosen"]},
        {"role": "rejected", "content": pair["rejected"]}]})


# ---------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------


def tokenize_pairs(pairs: list[dict[str, Any]], tokenizer, *, template: str, max_seq_len: int
                   ) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Rows {id, source, input_ids, labels, rejected_input_ids, rejected_labels,
    prompt_tokens, num_tokens, rejected_num_tokens, num_trainable, rejected_num_trainable}
    and the dropped pairs as (position, reason).

    Both sides are rendered with the same template; labels cover the final reply only.
    """
    sides = []
    for i, p in enumerate(pairs):
        for side in ("chosen", "rejected"):
            sides.append({**side_record(p, side), "id": f"{i}:{side}"})
    rows, dropped = tokenize_records(sides, tokenizer, template=template,
                                     max_seq_len=_NO_LIMIT, truncation="right")
    got = {row["id"]: row for row in rows}
    why = {d["id"]: d["reason"] for d in dropped}
    out: list[dict[str, Any]] = []
    lost: list[tuple[int, str]] = []
    for i, p in enumerate(pairs):
        c, r = got.get(f"{i}:chosen"), got.get(f"{i}:rejected")
        if c is None or r is None:
            side = "chosen" if c is None else "rejected"
            lost.append((i, f"{side}: {why.get(f'{i}:{side}', 'not tokenized')}"))
            continue
        row, reason = _pair_row(p, c, r, max_seq_len)
        if row is None:
            lost.append((i, reason))
        else:
            out.append(row)
    return out, lost


def _reply_start(labels: list[int]) -> int:
    """Where the final reply starts: the first token of the last run of labelled tokens."""
    end = max(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def _pair_row(pair: dict, c: dict, r: dict, max_seq_len: int
              ) -> tuple[dict[str, Any] | None, str]:
    cs, rs = _reply_start(c["labels"]), _reply_start(r["labels"])
    prompt = list(c["input_ids"][:cs])
    if list(r["input_ids"][:rs]) != prompt:
        return None, "chosen and rejected render different prompts"
    c_reply, c_lab = list(c["input_ids"][cs:]), list(c["labels"][cs:])
    r_reply, r_lab = list(r["input_ids"][rs:]), list(r["labels"][rs:])
    longest = max(len(c_reply), len(r_reply))
    n_prompt = len(prompt)
    if n_prompt + longest > max_seq_len:
        # Keep the prompt's end (at least half the budget when the replies want more),
        # then the replies' starts.
        # At least one prompt token: a reply's first token is trained from the one before.
        keep = max(min(n_prompt, max_seq_len // 2), max_seq_len - longest, min(n_prompt, 1))
        prompt = prompt[len(prompt) - keep:] if keep else []
        room = max(max_seq_len - len(prompt), 0)
        c_reply, c_lab = c_reply[:room], c_lab[:room]
        r_reply, r_lab = r_reply[:room], r_lab[:room]
    # Trainable: labelled tokens with a token before them (the causal shift).
    n_c = sum(1 for lab in ([IGNORE_INDEX] * len(prompt) + c_lab)[1:] if lab != IGNORE_INDEX)
    n_r = sum(1 for lab in ([IGNORE_INDEX] * len(prompt) + r_lab)[1:] if lab != IGNORE_INDEX)
    if n_c == 0 or n_r == 0:
        return None, (f"no trainable token left in the {'chosen' if n_c == 0 else 'rejected'} "
                      f"reply after truncating the pair to max_seq_len={max_seq_len} "
                      f"(prompt {n_prompt} tokens)")
    masked = [IGNORE_INDEX] * len(prompt)
    return {
        "id": pair["id"],
        "source": pair["source"],
        "input_ids": prompt + c_reply,
        "labels": masked + c_lab,
        "rejected_input_ids": prompt + r_reply,
        "rejected_labels": masked + r_lab,
        "prompt_tokens": len(prompt),
        "num_tokens": len(prompt) + len(c_reply),
        "rejected_num_tokens": len(prompt) + len(r_reply),
        "num_trainable": n_c,
        "rejected_num_trainable": n_r,
    }, ""
