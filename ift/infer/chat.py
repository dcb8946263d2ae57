"""`ift chat`: a terminal conversation, streamed token by token.

Against a running server: `ift chat --url http://127.0.0.1:8000 --model base` (the
official OpenAI client, so any OpenAI-compatible endpoint works). Without a server:
`ift chat --model-path DIR [--adapter DIR]` loads the model in this process.

Lines starting with `/` are commands: /reset clears the history, /exit (or end of input)
quits.
"""

from __future__ import annotations

import os
import queue
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

from ift import storage
from ift.serve.sampling import SamplingParams

Messages = list[dict[str, str]]
ReplyFn = Callable[[Messages], Iterator[str]]


def chat_loop(lines: Iterable[str], reply: ReplyFn, out: TextIO, *, system: str = "",
              prompt: str = "you> ") -> Messages:
    """Read user lines, stream each reply to `out`, keep the history; returns it."""
    history: Messages = [{"role": "system", "content": system}] if system else []
    interactive = out.isatty() if hasattr(out, "isatty") else False
    it = iter(lines)
    while True:
        if interactive:
            out.write(prompt)
            out.flush()
        try:
            line = next(it)
        except StopIteration:
            break
        text = line.rstrip("\n").strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if system else []
            out.write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        out.write("assistant> ")
        parts = []
        try:
            for delta in reply(history):
                parts.append(delta)
                out.write(delta)
                out.flush()
        except Exception as e:  # noqa: BLE001 - report and keep the session
            out.write(f"\n[error: {e}]\n")
            history.pop()
            continue
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(parts)})
    return history


def remote_reply(url: str, model: str, api_key: str, temperature: float,
                 max_tokens: int) -> ReplyFn:
    from openai import OpenAI

    base = url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    client = OpenAI(base_url=base, api_key=api_key or "none")

    def reply(history: Messages) -> Iterator[str]:
        stream = client.chat.completions.create(model=model, messages=history, stream=True,
                                                temperature=temperature, max_tokens=max_tokens)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    return reply


def local_reply(model_path: str, adapter: str, temperature: float, max_tokens: int,
                template: str = "auto") -> ReplyFn:
    from ift.serve.engine import Engine  # torch, transformers, peft: --model-path only

    engine = Engine(model_path, template=template, batch_wait_timeout_s=0.0)
    name = None
    if adapter:
        engine.load_adapter("adapter", storage.local_copy(adapter)).result()
        name = "adapter"

    def reply(history: Messages) -> Iterator[str]:
        ids = engine.chat_prompt_ids(history, name)
        params = engine.check_length(ids, SamplingParams(max_tokens=max_tokens,
                                                         temperature=temperature))
        q: queue.Queue = queue.Queue()
        req = engine.submit(ids, params, name, q.put)
        try:
            while True:
                ev = q.get()
                if ev["type"] == "delta":
                    yield ev["text"]
                elif ev["type"] == "error":
                    raise RuntimeError(ev["message"])
                else:
                    return
        finally:
            req.cancelled = True

    return reply


def chat_cmd(args) -> int:
    """`ift chat --url URL --model M` or `ift chat --model-path DIR [--adapter DIR]`."""
    if args.model_path:
        reply = local_reply(args.model_path, args.adapter or "", args.temperature,
                            args.max_tokens)
    elif args.url:
        key = args.api_key or os.environ.get(args.api_key_env or "", "") or os.environ.get(
            "IFT_API_KEY", "")
        reply = remote_reply(args.url, args.model, key, args.temperature, args.max_tokens)
    else:
        print("ift chat: give --url (a running server) or --model-path (load in-process)",
              file=sys.stderr)
        return 2
    chat_loop(sys.stdin, reply, sys.stdout, system=args.system or "")
    return 0
