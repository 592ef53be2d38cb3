"""The chat core on the real engine (tiny model) and a real SQLite store; only the chat is a recording stand-in."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bot import replies
from bot.chat import User
from bot.config import PolicySettings
from bot.core import ChatCore
from engine.jobs import Failure
from engine.png import read_parameters
from engine.worker import Engine
from tests.bot.conftest import core_for, make_config
from tests.bot.conversation import RecordingConversation, RecordingPlatform

ALICE = User("console", "alice", "Alice", chat_id="c1")
BOB = User("console", "bob", "Bob", chat_id="c1")


async def test_draw_acks_progresses_and_delivers_with_the_seed(tiny_settings, store, engine):
    core = core_for(make_config(tiny_settings), store, engine, random_seed=lambda: 1234)
    conv = RecordingConversation()
    await core.on_text(ALICE, conv, "/draw a red fox --steps 3")
    await core.drain()
    assert conv.texts()[0].startswith("Got it")
    progress = [t for _, t in conv.edits if "step" in t]
    assert progress and "step 3/3" in progress[-1]
    [picture] = conv.pictures
    assert "seed 1234" in picture.caption and "3 steps" in picture.caption and "noise" in picture.caption
    assert [b.action for b in picture.buttons] == ["reroll", "again"]
    assert "Seed: 1234," in read_parameters(picture.png)
    [record] = await store.history("console", "alice")
    assert record.status == "done" and record.delivered_at is not None and record.seed == 1234
    assert record.image_path.read_bytes() == picture.png


@pytest.mark.parametrize(
    "text, expected",
    [
        ("/draw", "what to draw"),
        ("/draw    ", "what to draw"),
        ("/draw a fox --steps 0", "steps"),
        ("/draw a fox --steps 1000000000", "steps"),
        ("/draw a fox --seed -5", "seed"),
        (f"/draw a fox --seed {2**40}", "seed"),
        ("/draw a fox --wat 3", "--wat"),
        ("/draw " + "x" * 5000, "long"),
    ],
)
async def test_bad_input_gets_an_explanation_and_nothing_is_queued(tiny_settings, store, engine, text, expected):
    core = core_for(make_config(tiny_settings), store, engine)
    conv = RecordingConversation()
    await core.on_text(ALICE, conv, text)
    await core.drain()
    assert len(conv.sent) == 1 and not conv.pictures
    reply = conv.texts()[0]
    assert expected.lower() in reply.lower() and "/draw" in reply  # says what is wrong, shows the right form
    assert await store.history("console", "alice") == []


async def test_reroll_by_owner_and_refusal_for_a_stranger(tiny_settings, store, engine):
    seeds = iter([11, 22])
    core = core_for(make_config(tiny_settings), store, engine, random_seed=lambda: next(seeds))
    conv = RecordingConversation()
    await core.on_text(ALICE, conv, "/draw a lighthouse")
    await core.drain()
    job_id = conv.pictures[0].job_id
    answer = await core.on_button(BOB, conv, "reroll", job_id)
    assert "Only the person who asked" in answer
    assert await core.on_button(ALICE, conv, "reroll", job_id) == "Queued!"
    assert await core.on_button(ALICE, conv, "again", job_id) == "Queued!"
    await core.drain()
    seeds_delivered = sorted(int(p.caption.split("seed ")[1].split(" ")[0]) for p in conv.pictures)
    assert seeds_delivered == [11, 11, 22]  # the original, the same seed again, and one new seed
    assert await core.on_button(ALICE, conv, "reroll", "nosuchjob") == "I can't find that picture any more."
    await core.on_text(ALICE, conv, "/again bogus!")  # typed, not pressed: the core checks what it parses
    assert conv.texts()[-1].startswith("Send /again with the number /history shows")


async def test_policy_blocked_words_and_allowlist(tiny_settings, store, engine):
    config = make_config(tiny_settings).model_copy(update={
        "policy": PolicySettings(blocked_words=[r"\bgore\b"], allowed_users=["console:alice"])})
    core = core_for(config, store, engine)
    conv = RecordingConversation()
    await core.on_text(ALICE, conv, "/draw lots of GORE please")
    await core.on_text(BOB, conv, "/draw a cat")
    assert "does not draw" in conv.texts()[0] and "GORE" in conv.texts()[0]
    assert "only draws for" in conv.texts()[1]
    assert await store.history("console", "alice") == [] and await store.history("console", "bob") == []


async def test_flood_from_one_user_every_message_answered_limits_applied(tiny_settings, store, engine):
    core = core_for(make_config(tiny_settings, max_active_per_user=2), store, engine)
    conv = RecordingConversation()
    await asyncio.gather(*(core.on_text(ALICE, conv, f"/draw flood {i}") for i in range(20)))
    await core.drain()
    acks = [t for t in conv.texts() if t.startswith("Got it")]
    refusals = [t for t in conv.texts() if not t.startswith("Got it")]
    assert len(acks) + len(refusals) == 20
    assert len(acks) == 2 and len(conv.pictures) == 2
    assert all("at a time" in r or "waiting" in r or "active" in r.lower() for r in refusals), refusals[:3]
    rows = await store.history("console", "alice", limit=50)
    assert len(rows) == 2 and all(r.status == "done" for r in rows)


async def test_cancel_only_touches_own_jobs(tiny_settings, store, engine):
    core = core_for(make_config(tiny_settings), store, engine)
    alice, bob = RecordingConversation("a"), RecordingConversation("b")
    await core.on_text(BOB, bob, "/draw bob's picture --steps 30")
    await core.on_text(ALICE, alice, "/draw alice one --steps 30")
    await core.on_text(ALICE, alice, "/draw alice two --steps 30")
    await core.on_text(ALICE, alice, "/cancel")
    await core.drain()
    assert "Cancelled 2 pictures." in alice.texts()
    assert not alice.pictures and len(bob.pictures) == 1
    statuses = {r.prompt: r.status for r in await store.history("console", "alice")}
    assert statuses == {"alice one": "cancelled", "alice two": "cancelled"}


async def test_history_and_usage(tiny_settings, store, engine):
    core = core_for(make_config(tiny_settings, per_hour=5, per_day=9), store, engine)
    conv = RecordingConversation()
    await core.on_text(ALICE, conv, "/history")
    assert "no pictures yet" in conv.texts()[-1]
    await core.on_text(ALICE, conv, "/draw <b>html</b> & @everyone 🦊 --seed 5")
    await core.drain()
    await core.on_text(ALICE, conv, "/history")
    history = conv.sent[-1]
    assert "<b>html</b> & @everyone 🦊" in history[1] and "seed 5" in history[1]
    assert [b.action for b in history[2]] == ["again"]
    await core.on_text(ALICE, conv, "/usage")
    assert "This hour: 1 of 5" in conv.texts()[-1] and "Last 24 hours: 1 of 9" in conv.texts()[-1]


async def test_delivery_is_retried_and_recorded_exactly_once(tiny_settings, store, engine):
    core = core_for(make_config(tiny_settings), store, engine)
    conv = RecordingConversation(fail_pictures=2)
    await core.on_text(ALICE, conv, "/draw flaky network")
    await core.drain()
    assert len(conv.pictures) == 1
    [record] = await store.history("console", "alice")
    assert record.delivery_attempts == 2 and record.delivered_at is not None


async def test_restart_picks_up_queued_jobs_in_order(tiny_settings, store, tiny_pipeline):
    config = make_config(tiny_settings)
    # First life: jobs accepted, then the bot stops before drawing them.
    engine1 = Engine(lambda: tiny_pipeline)
    await engine1.start()
    core1 = core_for(config, store, engine1)
    conv = RecordingConversation()
    for n in range(3):
        await core1.on_text(ALICE, conv, f"/draw job {n} --steps 40")
    while (await store.history("console", "alice"))[-1].status != "running":
        await asyncio.sleep(0.01)  # job 0 is being drawn when the stop comes
    await core1.stop_accepting()
    await engine1.close(timeout=0)
    await core1.drain()
    left = await store.unfinished_jobs()
    assert [r.prompt for r in left] == ["job 0", "job 1", "job 2"]
    # The job the stop interrupted is queued again without using up its crash retry.
    assert [(r.status, r.attempts) for r in left] == [("queued", 0)] * 3
    # Second life on the same database: all three are drawn and delivered once, in order.
    engine2 = Engine(lambda: tiny_pipeline)
    await engine2.start()
    core2 = core_for(config, store, engine2)
    platform = RecordingPlatform()
    core2.add_platform(platform)
    assert await core2.recover() == 3
    await core2.drain()
    await engine2.close()
    new_conv = platform.conversations["c1"]
    assert [p.caption.split("\n")[0] for p in new_conv.pictures] == ["job 0", "job 1", "job 2"]
    assert any("still coming" in t for t in new_conv.texts())
    rows = await store.history("console", "alice")
    assert all(r.status == "done" and r.delivered_at for r in rows)


async def test_throttled_queue_position_is_shown_once_the_interval_passes(tiny_settings, store, tiny_pipeline):
    """Positions that change faster than the edit interval must not leave a stale "#3" on screen."""
    held = HeldPipeline(tiny_pipeline)  # alice's picture draws until cancelled, however fast or busy the CPU
    engine = Engine(lambda: held)
    await engine.start()
    try:
        core = core_for(make_config(tiny_settings), store, engine)
        carol = User("console", "carol", "Carol", chat_id="c3")
        first, second, third = RecordingConversation("a"), RecordingConversation("b"), RecordingConversation("c")
        watched = RecordingConversation("d", progress_interval=0.4)
        await core.on_text(ALICE, first, "/draw long one")
        await core.on_text(BOB, second, "/draw b --steps 2")
        await core.on_text(carol, third, "/draw c --steps 2")
        await core.on_text(User("console", "dave", chat_id="c4"), watched, "/draw d --steps 2")
        await core.cancel(BOB, second)
        await core.cancel(carol, third)  # two position changes for dave within one interval

        def dave_sees() -> str:
            return watched.edits[-1][1] if watched.edits else watched.texts()[0]

        await wait_for(lambda: "next in line" in dave_sees(), f"dave to see 'next in line' ({watched.edits})")
        assert all("Starting" not in text for _, text in watched.edits)  # alice's picture still holds the engine
        await core.cancel(ALICE, first)
        held.release.set()
        await core.drain()
    finally:
        held.release.set()
        await engine.close(timeout=30)


async def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    """Until `condition()` holds (a condition, not a guessed sleep: a busy CI machine only makes it later)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_housekeeping_redelivers_what_gave_up_and_applies_retention(tiny_settings, store, engine):
    config = make_config(tiny_settings)
    config = config.model_copy(update={"storage": config.storage.model_copy(update={"keep_images_count": 1})})
    core = ChatCore(config, store, engine, delivery_attempts=2, delivery_backoff=0.01)
    platform = RecordingPlatform()
    core.add_platform(platform)
    conv = platform.conversation({"chat": "c1"})
    conv.fail_pictures = 2  # the network is down for both attempts
    await core.on_text(ALICE, conv, "/draw first")
    await core.drain()
    assert conv.pictures == []
    [record] = await store.unfinished_jobs()
    assert record.status == "done" and record.delivered_at is None
    await core.housekeeping()  # the network is back
    assert len(conv.pictures) == 1 and (await store.get_job(record.id)).delivered_at is not None
    await core.on_text(ALICE, conv, "/draw second")
    await core.drain()
    await core.housekeeping()
    await core.housekeeping()  # nothing is delivered twice
    assert len(conv.pictures) == 2
    first, second = await store.get_job(record.id), (await store.history("console", "alice"))[0]
    assert first.image_path is None and second.image_path.is_file()  # only the newest picture is kept


async def test_a_fresh_and_a_redelivered_test_model_picture_carry_the_same_notice(tiny_settings, store, engine):
    """The engine only flags a test-model result; the one sentence about it is bot/replies.py's."""
    core = ChatCore(make_config(tiny_settings), store, engine, is_test_model=True, delivery_attempts=1)
    platform = RecordingPlatform()
    core.add_platform(platform)
    conv = platform.conversation({"chat": "c1"})
    conv.fail_pictures = 1  # the first picture's delivery gives up: re-delivered later
    await core.on_text(ALICE, conv, "/draw first")
    await core.drain()
    await core.housekeeping()  # delivered from the store, as after a restart
    await core.on_text(ALICE, conv, "/draw second")
    await core.drain()
    redelivered, fresh = conv.pictures
    assert redelivered.caption.splitlines()[0] == "first" and fresh.caption.splitlines()[0] == "second"
    assert redelivered.caption.splitlines()[-1] == fresh.caption.splitlines()[-1] == replies.TEST_MODEL_NOTICE


async def test_admin_bans_and_unbans_from_chat_and_others_cannot(tiny_settings, store, engine):
    config = make_config(tiny_settings)
    config = config.model_copy(update={"limits": config.limits.model_copy(update={"admins": ["console:alice"]})})
    core = core_for(config, store, engine)
    admin, bob = RecordingConversation("a"), RecordingConversation("b")
    await core.on_text(BOB, bob, "/ban alice")
    assert bob.texts()[-1] == "Only the bot's admins can ban."
    await core.on_text(ALICE, admin, "/ban")
    assert "Usage: /ban <user id>" in admin.texts()[-1]
    await core.on_text(ALICE, admin, "/ban bob")
    assert admin.texts()[-1] == "console:bob is banned (until an admin unbans them)."
    await core.on_text(BOB, bob, "/draw a cat")
    await core.on_text(BOB, bob, "/draw a cat")  # a banned user is told once, then ignored
    assert len([t for t in bob.texts() if "blocked" in t]) == 1 and not bob.pictures
    await core.on_text(ALICE, admin, "/ban alice")
    assert "is an admin" in admin.texts()[-1]
    await core.on_text(ALICE, admin, "/unban bob")
    assert admin.texts()[-1] == "console:bob may draw again."
    await core.on_text(BOB, bob, "/draw a cat")
    await core.drain()
    assert len(bob.pictures) == 1


# -- the engine fed from the store's queue (issue 17) -----------------------------------------------------------------


class HeldPipeline:
    """The real tiny pipeline, whose pictures wait (in the engine's thread) until the test releases them. While
    held, a picture still stops when asked: `on_step(0, total)` is the engine's stop check before the first step."""

    def __init__(self, pipeline) -> None:
        self._pipeline = pipeline
        self.release = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self._pipeline, name)

    def generate(self, request, on_step):
        while not self.release.wait(0.01):
            on_step(0, request.steps)
        return self._pipeline.generate(request, on_step)


async def test_every_acknowledged_picture_is_delivered_with_a_small_engine_queue(tiny_settings, store, tiny_pipeline):
    """engine.max_queue 2, limits.queue_cap 50: all 12 accepted pictures are drawn, in order, none refused later."""
    held = HeldPipeline(tiny_pipeline)  # nothing finishes before all 12 are acknowledged, however busy the CPU
    small = Engine(lambda: held, max_queue=2)
    await small.start()
    try:
        core = core_for(make_config(tiny_settings, max_active_per_user=50), store, small)
        conv = RecordingConversation()
        for n in range(12):
            await core.on_text(ALICE, conv, f"/draw picture {n} --steps 1")
        acks = [t for t in conv.texts() if t.startswith("Got it")]
        assert len(acks) == 12
        # Places in the store's queue, beyond the engine's 2: the last one heard it has (at least) 9 ahead.
        assert any(f"#{n} in the queue" in acks[-1] for n in range(10, 13)), acks[-1]
        held.release.set()
        await core.drain()
        assert not [t for t in conv.texts() if "failed" in t]
        assert len(conv.pictures) == 12
        assert [p.caption.split("\n")[0] for p in conv.pictures] == [f"picture {n}" for n in range(12)]
        assert [r.status for r in await store.history("console", "alice", 20)] == ["done"] * 12
    finally:
        held.release.set()
        await small.close(timeout=30)


async def test_cancel_reaches_jobs_that_are_only_in_the_store(tiny_settings, store, engine):
    core = core_for(make_config(tiny_settings), store, engine)
    first, mine = RecordingConversation("a"), RecordingConversation("b")
    await core.on_text(ALICE, first, "/draw long one --steps 50 --size 512x512")
    for n in range(3):
        await core.on_text(BOB, mine, f"/draw waiting {n}")
    assert sum(1 for live in core.state.live.values() if live.engine_job is None) >= 2  # not all handed to the engine
    await core.cancel(BOB, mine)
    assert mine.texts()[-1] == "Cancelled 3 pictures."
    await core.cancel(ALICE, first)
    await core.drain()
    assert not mine.pictures
    assert [r.status for r in await store.history("console", "bob")] == ["cancelled"] * 3
    assert await store.queue() == []


class OnASmallerMachine:
    """The real tiny pipeline, drawing as ever, with `budget` bytes for a picture's working memory."""

    def __init__(self, pipeline, budget: float):
        from engine.size_cost import SizeCost

        self._pipeline = pipeline
        cost = pipeline.size_cost
        self.size_cost = SizeCost(cost.device, budget, cost.fixed_bytes, cost.per_pixel, cost.per_pixel_squared)

    def __getattr__(self, name):
        return getattr(self._pipeline, name)


async def test_a_size_the_device_cannot_afford_is_refused_before_it_is_accepted(tiny_settings, store, tiny_pipeline):
    engine = Engine(lambda: OnASmallerMachine(tiny_pipeline, budget=200 * 2**20))
    await engine.start()
    try:
        core = core_for(make_config(tiny_settings), store, engine)
        conv = RecordingConversation()
        await core.on_text(ALICE, conv, "/draw a fox --size 1024x1024 --steps 1")
        [reply] = conv.texts()
        assert reply.startswith("Sorry, that size is too big for this bot's computer: the largest picture of that "
                                "shape it can draw is ")
        size = reply.split("--size ")[1]
        assert await store.history("console", "alice") == []  # never accepted, never stored
        await core.on_text(ALICE, conv, f"/draw a fox --size {size} --steps 1")  # the size it named works
        await core.drain()
        assert conv.texts()[1].startswith("Got it") and len(conv.pictures) == 1
    finally:
        await engine.close(timeout=30)


async def test_a_graceful_stop_keeps_jobs_not_yet_handed_to_the_engine_queued(tiny_settings, store, engine):
    core = core_for(make_config(tiny_settings), store, engine)
    conv = RecordingConversation()
    await core.on_text(ALICE, conv, "/draw long one --steps 50 --size 512x512")
    for n in range(3):
        await core.on_text(BOB, conv, f"/draw waiting {n}")
    await core.stop_accepting()
    await engine.close(timeout=0)
    await asyncio.wait_for(core.drain(), 30)
    assert conv.texts().count("The bot is restarting. Your picture is kept and will be drawn when it is back.") == 3
    assert [r.status for r in await store.history("console", "bob")] == ["queued"] * 3
    assert len(await store.queue()) == 4  # the stopped running one back in line first


class OutOfMemoryOncePipeline(HeldPipeline):
    """The real tiny pipeline, whose first picture runs out of memory (the worker's own out-of-memory path)."""

    def generate(self, request, on_step):
        if not self.release.is_set():
            self.release.set()
            raise MemoryError("out of memory (injected)")
        return self._pipeline.generate(request, on_step)


async def test_a_failed_picture_is_worded_by_replies_from_the_engines_failure(tiny_settings, store, tiny_pipeline):
    """The engine says why as data (engine.jobs.Failure); the store keeps the value; the user reads replies' sentence,
    and the next picture is drawn."""
    oom = Engine(lambda: OutOfMemoryOncePipeline(tiny_pipeline))
    await oom.start()
    try:
        core = core_for(make_config(tiny_settings), store, oom)
        conv = RecordingConversation()
        await core.on_text(ALICE, conv, "/draw a heavy fox --steps 1")
        await core.drain()
        await core.on_text(ALICE, conv, "/draw a light fox --steps 1")
        await core.drain()
        told = replies.failed(conv.markup, Failure.OUT_OF_MEMORY)
        assert told.startswith("Sorry, that picture failed") and "memory" in told
        assert told in [t for _, t in conv.edits]  # the acknowledgement ends with it
        light, heavy = await store.history("console", "alice")
        assert (heavy.status, heavy.error) == ("failed", "out_of_memory") and light.status == "done"
        assert [p.caption.split("\n")[0] for p in conv.pictures] == ["a light fox"]
    finally:
        await oom.close(timeout=30)
