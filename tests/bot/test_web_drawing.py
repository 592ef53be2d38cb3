"""The page's actions (bot.adapters.web.drawing) on the real core, engine and store: what a page's status box ends on
when its Cancel meets a Draw that is waiting in the queue or still on its way there.

The page's status box has two writers, the Draw's stream of updates and the Cancel's answer, and Gradio delivers the
two in no fixed order; so after a Cancel on that page only the Cancel's answer may write it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bot.adapters.web.conversation import Inbox
from bot.adapters.web.drawing import Update, WebDrawing, web_user
from bot.chat import User
from bot.core import ChatCore
from engine.worker import Engine
from tests.bot.conftest import core_for, make_config
from tests.bot.conversation import RecordingConversation
from tests.bot.test_core import HeldPipeline, wait_for

ALICE = web_user("b-alice")
BOB = User("console", "bob", "Bob", chat_id="c1")


@pytest.fixture
async def core(tiny_settings, store, tiny_pipeline) -> AsyncIterator[ChatCore]:
    """A core whose engine is held by Bob's picture until the end, so Alice's pictures wait in the queue."""
    held = HeldPipeline(tiny_pipeline)
    engine = Engine(lambda: held)
    await engine.start()
    bob = RecordingConversation()
    try:
        core = core_for(make_config(tiny_settings), store, engine)
        await core.on_text(BOB, bob, "/draw bob's long one")
        yield core
        await core.cancel(BOB, bob)
        await core.cancel(ALICE, RecordingConversation())
    finally:
        held.release.set()
        await engine.close(timeout=30)


def status_box(*writes: str | None) -> str:
    """What the page's status shows after these writes, in this order (None leaves it as it is)."""
    shown = ""
    for text in writes:
        if text is not None:
            shown = text
    return shown


class Page:
    """One browser page: its Draw's updates, collected as Gradio would stream them."""

    def __init__(self, drawing: WebDrawing, name: str):
        self.drawing = drawing
        self.name = name
        self.updates: list[Update] = []
        self.following: asyncio.Task | None = None

    def draw(self, prompt: str) -> None:
        async def follow() -> None:
            async for update in self.drawing.draw(ALICE, prompt, None, 4, None, page=self.name):
                self.updates.append(update)

        self.following = asyncio.create_task(follow())

    async def cancel(self) -> str:
        return await self.drawing.cancel(ALICE, page=self.name)

    async def finished(self) -> list[str | None]:
        assert self.following is not None
        await asyncio.wait_for(self.following, 30)
        assert self.updates[-1].final
        return [update.text for update in self.updates]


async def test_cancel_of_a_waiting_picture_is_the_pages_last_word_in_either_order(core, store):
    page = Page(WebDrawing(core, Inbox(), poll=0.05), "tab-1")
    page.draw("a fox")
    await wait_for(lambda: any(u.job is not None for u in page.updates), "the page to show the queued picture")
    before = len(page.updates)
    answer = await page.cancel()
    texts = await page.finished()
    assert answer == "Cancelled 1 picture."
    [job] = await store.history("web", ALICE.id)
    assert job.status == "cancelled" and page.updates[-1].job.status == "cancelled"
    # The Draw's own last line ("Cancelled.") used to land before or after the answer, at random.
    later = texts[before:]
    assert status_box(answer, *later) == status_box(*later, answer) == answer, later


async def test_cancel_pressed_while_the_draw_is_on_its_way_into_the_queue_cancels_it(core, store):
    page = Page(WebDrawing(core, Inbox(), poll=0.05), "tab-1")
    page.draw("a fox")
    await asyncio.sleep(0)  # the Draw is in the page's handler, not in the queue yet: both are handled at once
    answer = await page.cancel()
    [job] = await store.history("web", ALICE.id)
    assert (answer, job.status) == ("Cancelled 1 picture.", "cancelled")  # was: "You have nothing waiting or
    # drawing.", and the picture went on waiting, its "Got it" soon replacing that answer on the page
    texts = await page.finished()
    assert status_box(answer, *texts) == status_box(*texts, answer) == answer, texts


async def test_a_picture_cancelled_from_another_page_says_so_on_its_own(core, store):
    drawing = WebDrawing(core, Inbox(), poll=0.05)
    page, other = Page(drawing, "tab-1"), Page(drawing, "tab-2")
    page.draw("a fox")
    await wait_for(lambda: any(u.job is not None for u in page.updates), "the page to show the queued picture")
    assert await other.cancel() == "Cancelled 1 picture."
    texts = await page.finished()
    assert texts[-1] == "Cancelled."
