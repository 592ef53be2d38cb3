"""Picture buttons that keep working after a restart: the action and the job id live in the button's custom_id
(`drawbot:reroll:<job id>`), parsed back by a `DynamicItem` registered on the client, so no view has to be kept.

The press itself is handled by whatever the client exposes as `job_buttons` (the adapter's handlers): the owner
check and what each action does are the core's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Protocol

import discord

from bot.chat import Button

log = logging.getLogger(__name__)

ACTIONS = ("reroll", "again", "delete")
_STYLES = {"reroll": discord.ButtonStyle.primary, "again": discord.ButtonStyle.secondary,
           "delete": discord.ButtonStyle.danger}
MAX_LABEL = 80  # Discord's limit for a button label


def custom_id(action: str, job_id: str) -> str:
    return f"drawbot:{action}:{job_id}"


class JobButtonHandler(Protocol):
    async def on_job_button(self, interaction: discord.Interaction, action: str, job_id: str) -> None: ...


class JobButton(discord.ui.DynamicItem[discord.ui.Button],
                template=r"drawbot:(?P<action>reroll|again|delete):(?P<job_id>[0-9A-Za-z]{1,64})"):
    """One button of a picture (or of /history): reroll, same seed again, or delete."""

    def __init__(self, action: str, job_id: str, *, label: str = "",
                 style: discord.ButtonStyle | None = None) -> None:
        super().__init__(discord.ui.Button(label=label[:MAX_LABEL] or action, custom_id=custom_id(action, job_id),
                                           style=style or _STYLES[action]))
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str]) -> JobButton:
        if not isinstance(item, discord.ui.Button):  # our custom ids are only ever on buttons
            return cls(match["action"], match["job_id"])
        return cls(match["action"], match["job_id"], label=item.label or "", style=item.style)

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        handler: JobButtonHandler | None = getattr(interaction.client, "job_buttons", None)
        if handler is None:
            log.error("a picture button was pressed but this client has no job_buttons handler")
            return
        await handler.on_job_button(interaction, self.action, self.job_id)


def job_view(buttons: Sequence[Button]) -> discord.ui.View | None:
    """The core's buttons as a persistent view (None when there are none Discord can show)."""
    items = [JobButton(b.action, b.job_id, label=b.label) for b in buttons
             if b.action in ACTIONS and b.job_id.isalnum() and len(b.job_id) <= 64]
    if not items:
        return None
    view = discord.ui.View(timeout=None)
    for item in items[:25]:  # Discord: 5 rows of 5
        view.add_item(item)
    # Only a layout: presses reach JobButton through the client's dynamic-item registry, so the view must not be
    # stored per message. A stopped view is sent as components and never stored (and never times out, which
    # discord.py would otherwise schedule for ephemeral messages).
    view.stop()
    return view
