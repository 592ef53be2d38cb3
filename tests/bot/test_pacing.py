"""The core's one pacer for progress edits (bot/core/pacing.py), against a recording edit function."""

from __future__ import annotations

import asyncio
import time

from bot.chat import Flooded
from bot.core.pacing import EditPacer


class Edits:
    """A message's edits with their times; `flood_first` of them are refused with a retry-after."""

    def __init__(self, *, flood_first: int = 0, retry_after: float = 0.3):
        self.shown: list[tuple[float, str]] = []
        self.refused: list[float] = []
        self._floods = flood_first
        self._retry_after = retry_after

    async def __call__(self, text: str) -> None:
        if self._floods:
            self._floods -= 1
            self.refused.append(time.monotonic())
            raise Flooded(self._retry_after)
        self.shown.append((time.monotonic(), text))

    def texts(self) -> list[str]:
        return [t for _, t in self.shown]


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_edits_within_the_interval_wait_and_only_the_newest_is_shown():
    edits = Edits()
    pacer = EditPacer(edits, 0.3)
    for n in range(1, 6):
        await pacer.show(f"step {n}/5")
    assert edits.texts() == ["step 1/5"]  # the rest came within the interval
    await until(lambda: len(edits.shown) == 2)
    assert edits.texts() == ["step 1/5", "step 5/5"]  # the newest, once the interval passed; nothing stale
    assert edits.shown[1][0] - edits.shown[0][0] >= 0.3 - 0.01
    pacer.close()


async def test_a_milestone_skips_the_interval_and_the_last_text_is_always_shown():
    edits = Edits()
    pacer = EditPacer(edits, 5.0)
    await pacer.show("#2 in the queue")
    await pacer.show("Starting your picture…", now=True)
    await pacer.show("step 1/4")  # held: the interval has not passed
    await pacer.finish("Done.")
    assert edits.texts() == ["#2 in the queue", "Starting your picture…", "Done."]


async def test_a_flood_holds_edits_for_its_retry_after_and_widens_the_interval():
    edits = Edits(flood_first=1, retry_after=0.3)
    pacer = EditPacer(edits, 0.05)
    await pacer.show("step 1/9")  # refused: flood control
    assert pacer.interval >= 0.3
    await pacer.show("step 2/9")
    await pacer.show("step 3/9")
    assert edits.shown == []  # nothing is tried inside the flood window
    await pacer.finish("Done.")
    assert edits.texts() == ["Done."] and len(edits.refused) == 1
    assert edits.shown[0][0] - edits.refused[0] >= 0.3 - 0.01  # waited out the retry-after


async def test_the_interval_calms_down_after_edits_go_through_again():
    edits = Edits(flood_first=1, retry_after=0.2)
    pacer = EditPacer(edits, 0.05)
    await pacer.show("a")
    widened = pacer.interval
    await until(lambda: edits.texts() == ["a"])  # the held text, once the window ended
    assert 0.05 <= pacer.interval < widened
    pacer.close()
