"""Per-replica admission: how many requests run, how many wait, who is refused."""

from __future__ import annotations

import asyncio

import pytest

from ift.serve.admission import Admission, Overloaded


async def _hold(adm: Admission, started: list, release: asyncio.Event, name: str):
    async with adm.slot():
        started.append(name)
        await release.wait()
    return name


def test_ongoing_run_queued_wait_and_the_next_is_refused_with_503():
    async def main():
        adm = Admission(ongoing=2, queued=1)
        started: list[str] = []
        release = asyncio.Event()
        tasks = [asyncio.create_task(_hold(adm, started, release, n)) for n in "abc"]
        await asyncio.sleep(0.01)
        assert started == ["a", "b"] and (adm.running, adm.waiting) == (2, 1)
        with pytest.raises(Overloaded) as e:
            async with adm.slot():
                pass
        assert e.value.status == 503 and "overloaded" in e.value.message
        release.set()
        assert await asyncio.gather(*tasks) == ["a", "b", "c"]
        assert started == ["a", "b", "c"] and (adm.running, adm.waiting) == (0, 0)
        async with adm.slot():  # free again
            assert adm.running == 1

    asyncio.run(main())


def test_a_waiter_cancelled_after_a_release_does_not_strand_the_next_one():
    async def main():
        adm = Admission(ongoing=1, queued=-1)  # -1: no bound on waiters
        started: list[str] = []
        first_release = asyncio.Event()
        never = asyncio.Event()
        first = asyncio.create_task(_hold(adm, started, first_release, "first"))
        await asyncio.sleep(0.01)
        doomed = asyncio.create_task(_hold(adm, started, never, "doomed"))
        last = asyncio.create_task(_hold(adm, started, first_release, "last"))
        await asyncio.sleep(0.01)
        assert adm.waiting == 2
        first_release.set()
        await asyncio.sleep(0)  # "first" leaves its slot and wakes the first waiter ...
        doomed.cancel()  # ... which is cancelled before it runs
        assert await asyncio.wait_for(last, 5) == "last"
        assert await first == "first"
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert "doomed" not in started and (adm.running, adm.waiting) == (0, 0)

    asyncio.run(main())


def test_an_error_inside_the_slot_frees_it():
    async def main():
        adm = Admission(ongoing=1, queued=0)
        with pytest.raises(ValueError):
            async with adm.slot():
                raise ValueError("boom")
        assert adm.running == 0
        async with adm.slot():
            with pytest.raises(Overloaded):  # queue of zero: the second is refused at once
                async with adm.slot():
                    pass

    asyncio.run(main())


def test_ongoing_must_be_positive():
    with pytest.raises(ValueError, match="ongoing=0"):
        Admission(ongoing=0, queued=1)
