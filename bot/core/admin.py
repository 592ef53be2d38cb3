"""Who may do what: admins (named in config, or granted by a platform), bans (config, or by an admin from chat, kept
in the store), and the admin's tools (ban, unban, cancel anyone's job)."""

from __future__ import annotations

from bot.chat import User
from bot.core.feeding import Feeder
from bot.core.state import CoreState, log


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

    async def ban(self, admin: User, platform: str, user_id: str) -> str:
        """An admin bans someone from chat. Returns the outcome as a short sentence for the admin."""
        key = f"{platform}:{user_id}"
        if not self.is_admin(admin):
            return "Only the bot's admins can ban."
        if key in self.state.config.limits.admins:
            return f"{key} is an admin; remove them from [limits].admins in the config first."
        if not await self.state.store.ban(platform, user_id, by=admin.key):
            return f"{key} is already banned."
        log.info("admin %s banned %s", admin.key, key)
        return f"{key} is banned (until an admin unbans them)."

    async def unban(self, admin: User, platform: str, user_id: str) -> str:
        key = f"{platform}:{user_id}"
        if not self.is_admin(admin):
            return "Only the bot's admins can unban."
        lifted = await self.state.store.unban(platform, user_id)
        if key in self.state.config.limits.banned:
            return f"{key} is banned in the config file ([limits].banned); remove them there and reload."
        if not lifted:
            return f"{key} is not banned."
        log.info("admin %s unbanned %s", admin.key, key)
        return f"{key} may draw again."

    async def cancel_job(self, admin: User, job_id: str) -> str:
        """An admin cancels anyone's queued or running job (the owner dashboard). Returns the outcome as a sentence."""
        if not self.is_admin(admin):
            return "Only the bot's admins can cancel other people's pictures."
        live = self.state.live.get(job_id)
        if live is not None:
            if self.feeder.cancel_live(live):
                log.info("admin %s cancelled job=%s", admin.key, job_id)
                return f"Cancelled {job_id}."
        if await self.state.store.mark_cancelled(job_id):  # in the table but not followed here: never leave it stuck
            log.info("admin %s cancelled job=%s", admin.key, job_id)
            return f"Cancelled {job_id}."
        return f"{job_id} is not waiting or drawing."
