"""Admin powers the owner dashboard uses: cancelling anyone's job, and admins granted by a platform (the web
page's admin password). Real tiny engine, real SQLite store; only the chat is a recording stand-in."""

from __future__ import annotations

from bot import replies
from bot.chat import PlainMarkup, User
from bot.core.admin import BanOutcome
from tests.bot.conftest import core_for, make_config
from tests.bot.conversation import RecordingConversation

ALICE = User("console", "alice", "Alice", chat_id="c1")
OWNER = User("web", "@owner", "owner")


async def test_only_an_admin_cancels_someone_elses_job(tiny_settings, store, engine):
    core = core_for(make_config(tiny_settings), store, engine)
    conv = RecordingConversation()
    await core.on_text(ALICE, conv, "/draw a red fox --steps 20")
    await core.on_text(ALICE, conv, "/draw a blue fox --steps 2")
    first, second = sorted(await store.history("console", "alice"), key=lambda r: r.created_at)
    assert await core.cancel_job(OWNER, second.id) == "not_admin"
    core.grant_admin(OWNER.key)
    assert core.is_admin(OWNER) and not core.is_admin(ALICE)
    assert await core.cancel_job(OWNER, second.id) == "cancelled"
    await core.drain()
    assert (await store.get_job(second.id)).status == "cancelled"
    assert (await store.get_job(first.id)).status == "done"
    assert await core.cancel_job(OWNER, second.id) == "not_active"
    assert replies.job_cancel(PlainMarkup(), "not_active", second.id) == f"{second.id} is not waiting or drawing."


async def test_a_granted_admin_may_ban_and_has_no_limits(tiny_settings, store, engine):
    core = core_for(make_config(tiny_settings), store, engine)
    assert said(await core.ban(OWNER, "console", "alice")) == "Only the bot's admins can ban."
    core.grant_admin(OWNER.key)
    assert await core.ban(OWNER, "console", "alice") == BanOutcome("ban", "banned", "console:alice")  # data
    assert said(await core.ban(OWNER, "console", "alice")) == "console:alice is already banned."
    assert said(await core.unban(OWNER, "console", "alice")) == "console:alice may draw again."


def said(outcome: BanOutcome) -> str:
    return replies.ban_outcome(PlainMarkup(), outcome)
