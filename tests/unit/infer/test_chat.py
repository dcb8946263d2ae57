"""`ift chat` in-process: streamed replies and a history that grows turn by turn."""

from __future__ import annotations

import io

from ift.infer.chat import chat_loop


def test_chat_loop_keeps_history_and_handles_commands():
    seen = []

    def reply(history):
        seen.append([dict(m) for m in history])
        yield "you said "
        yield history[-1]["content"]

    out = io.StringIO()
    history = chat_loop(["hello\n", "\n", "again\n", "/reset\n", "fresh\n", "/exit\n", "never\n"],
                        reply, out, system="be kind")
    assert [len(h) for h in seen] == [2, 4, 2]  # system+user, +assistant+user, after reset
    assert seen[1][2] == {"role": "assistant", "content": "you said hello"}
    assert history == [{"role": "system", "content": "be kind"},
                       {"role": "user", "content": "fresh"},
                       {"role": "assistant", "content": "you said fresh"}]
    assert "assistant> you said again" in out.getvalue()
    assert "(history cleared)" in out.getvalue()


def test_chat_loop_reports_errors_and_drops_the_failed_turn():
    def reply(history):
        raise RuntimeError("boom")
        yield ""  # pragma: no cover

    out = io.StringIO()
    assert chat_loop(["hi\n"], reply, out) == []
    assert "[error: boom]" in out.getvalue()


def test_in_process_model_streams_a_multi_turn_chat(tiny_model):
    from ift.infer.chat import local_reply

    reply = local_reply(tiny_model, "", temperature=0.0, max_tokens=8)
    first = "".join(reply([{"role": "user", "content": "hi"}]))
    again = "".join(reply([{"role": "user", "content": "hi"}]))
    assert first == again  # greedy
    out = io.StringIO()
    history = chat_loop(["hi\n", "tell me more\n"], reply, out)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["content"] == first
