"""Who may do what: admins (named in config, or granted by a platform), bans (config, or by an admin from chat, kept
in the store), and the admin's tools (ban, unban, cancel anyone's job)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bot.chat import User
from bot.core.feeding import Feeder
from bot.core.state import CoreState, log


CancelOutcome = Literal["not_admin", "cancelled", "not_active"]
BanResult = Literal["not_admin", "target_is_admin", "already_banned", "banned", "banned_in_config", "not_banned",
                    "unbanned"]


@dataclass(frozen=True)
class BanOutcome:
    """What a ban or unban did, for `bot.replies.ban_outcome` to word (each platform names the user its own way)."""

    action: Literal["ban", "unban"]
    result: BanResult
    key: str
    """`platform:id` of the user it was about."""


class Admin:
    def __init__(self, state: CoreState, feeder: Feeder):
        self.state = state
        self.feeder = feeder

    def is_admin(self, user: User) -> bool:
        """Exempt from limits, may ban and cancel anyone's job: named in [limits].admins, or granted by a platform."""
        return self.state.is_admin(user.key)

    def grant_admin(self, key: str) -> None:
        """`platform:id` proved it is an owner another way (the web page's admin password); lasts until restart."""
        self.state.granted_admins.add(key)

    async def is_banned(self, platform: str, user_id: str) -> bool:
        """Banned in the config file, or by an admin from chat (kept in the store across restarts)."""
        state = self.state
        return f"{platform}:{user_id}" in state.config.limits.banned or await state.store.is_banned(platform, user_id)

    async def ban(self, admin: User, platform: str, user_id: str) -> BanOutcome:
        """An admin bans someone from chat (bot/replies.py words the outcome)."""
        key = f"{platform}:{user_id}"
        if not self.is_admin(admin):
            return BanOutcome("ban", "not_admin", key)
        if key in self.state.config.limits.admins:
            return BanOutcome("ban", "target_is_admin", key)
        if not await self.state.store.ban(platform, user_id, by=admin.key):
            return BanOutcome("ban", "already_banned", key)
        log.info("admin %s banned %s", admin.key, key)
        return BanOutcome("ban", "banned", key)

    async def unban(self, admin: User, platform: str, user_id: str) -> BanOutcome:
        key = f"{platform}:{user_id}"
        if not self.is_admin(admin):
            return BanOutcome("unban", "not_admin", key)
        lifted = await self.state.store.unban(platform, user_id)
        if key in self.state.config.limits.banned:
            return BanOutcome("unban", "banned_in_config", key)
        if not lifted:
            return BanOutcome("unban", "not_banned", key)
        log.info("admin %s unbanned %s", admin.key, key)
        return BanOutcome("unban", "unbanned", key)

    async def cancel_job(self, admin: User, job_id: str) -> CancelOutcome:
        """An admin cancels anyone's queued or running job (the owner dashboard; bot/replies.py words it)."""
        if not self.is_admin(admin):
            return "not_admin"
        live = self.state.live.get(job_id)
        if live is not None:
            if self.feeder.cancel_live(live):
                log.info("admin %s cancelled job=%s", admin.key, job_id)
                return "cancelled"
        if await self.state.store.mark_cancelled(job_id):  # in the table but not followed here: never leave it stuck
            log.info("admin %s cancelled job=%s", admin.key, job_id)
            return "cancelled"
        return "not_active"
