"""The draw path: policy (allowlists, blocked words) -> what the engine can never draw -> limits + durable write
(`Store.admit`) -> acknowledgement with the queue position -> followed and fed to the engine in its turn."""

from __future__ import annotations

import secrets
from typing import Callable

from bot import replies
from bot.chat import Conversation, User
from bot.commands import SEED_MAX, DrawCommand
from bot.core.admin import Admin
from bot.core.feeding import Feeder
from bot.core.following import Follower
from bot.core.room import Room
from bot.core.state import CoreState, log, safe_send
from bot.store import DiskFull, NewJob, Refused
from engine.jobs import GenerationRequest


class Submitter:
    def __init__(self, state: CoreState, admin: Admin, feeder: Feeder, follower: Follower, room: Room, *,
                 random_seed: Callable[[], int] = lambda: secrets.randbelow(SEED_MAX + 1)):
        self.state = state
        self.room = room
        self.admin = admin
        self.feeder = feeder
        self.follower = follower
        self.random_seed = random_seed

    def refusal_by_policy(self, user: User, prompt: str) -> replies.PolicyRefusal | None:
        policy = self.state.config.policy
        if policy.allowed_users and user.key not in policy.allowed_users and not self.admin.is_admin(user):
            return replies.PolicyRefusal("user_not_allowed")
        chat_key = f"{user.platform}:{user.chat_id}"
        if policy.allowed_chats and chat_key not in policy.allowed_chats and not self.admin.is_admin(user):
            return replies.PolicyRefusal("chat_not_allowed")
        for pattern in self.state.blocked:
            match = pattern.search(prompt)
            if match:
                return replies.PolicyRefusal("blocked_word", match.group(0))
        return None

    async def submit(self, user: User, conv: Conversation, command: DrawCommand) -> str | None:
        """Admit, persist, acknowledge and queue one picture. Returns the job id, or None when refused."""
        state = self.state
        m = conv.markup
        if not state.accepting:
            state.metrics.refused("restarting")
            await conv.send_text(replies.restarting_refusal(m))
            return None
        if self.room.full:  # it could not be saved either: said now rather than left waiting unseen
            await self.room.refuse(user, conv)
            return None
        refusal = self.refusal_by_policy(user, command.prompt)
        if refusal:
            state.metrics.refused("policy")
            log.info("refused platform=%s user=%s reason=policy", user.platform, user.id)
            await conv.send_text(replies.policy_refusal(m, refusal))
            return None
        seed = self.random_seed() if command.seed is None else command.seed
        request = GenerationRequest(command.prompt, seed, command.steps, command.width, command.height)
        cannot = self.feeder.engine_refusal(request)
        if cannot is not None:  # known now: refused before anyone hears "accepted"
            state.metrics.refused(cannot.reason)
            log.info("refused platform=%s user=%s reason=%s", user.platform, user.id, cannot.reason)
            await conv.send_text(replies.engine_refusal(m, cannot, prompt=command.prompt))
            return None
        try:
            admission = await state.store.admit(
                NewJob(platform=user.platform, user_id=user.id, chat_id=user.chat_id, prompt=command.prompt,
                       seed=seed, steps=command.steps, width=command.width, height=command.height,
                       reply_ref={"conv": conv.ref(), "as_file": command.as_file, "user_name": user.name}),
                state.config.limits,
                is_admin=self.admin.is_admin(user),
                is_banned=await self.admin.is_banned(user.platform, user.id),
            )
        except DiskFull as exc:
            self.room.noticed(exc)
            await self.room.refuse(user, conv)
            return None
        if isinstance(admission, Refused):
            log.info("refused platform=%s user=%s reason=%s", user.platform, user.id, admission.reason)
            state.metrics.refused(admission.reason)
            if admission.notify:
                await conv.send_text(replies.admission_refusal(m, admission))
            return None
        job_id = admission.job_id
        state.metrics.accepted(user.platform)
        log.info("accepted job=%s platform=%s user=%s steps=%d size=%dx%d", job_id, user.platform, user.id,
                 command.steps, command.width, command.height)
        live = self.follower.start(job_id, request, conv, user.id)
        queue = await state.store.queue()
        live.position = queue.index(job_id) + 1 if job_id in queue else 0
        live.shown = replies.queued(m, live.position, self.feeder.wait_estimate(live.position))
        live.ack_id = await safe_send(conv, live.shown)
        reply_ref = {"conv": conv.ref(), "ack_id": live.ack_id, "as_file": command.as_file, "user_name": user.name}
        await self.room.save(f"reply data of job {job_id}", lambda: state.store.set_reply_ref(job_id, reply_ref))
        await self.feeder.feed()
        return job_id
