"""The owner dashboard (Gradio, `/admin`, admin sessions only): the queue of every platform with cancel, recent
pictures, users with their usage, ban / unban, the engine's state and the limits in force. Every action goes through
the core (`cancel_job`, `ban`, `unban`), which checks that the caller is an admin."""

from __future__ import annotations

import html
import os
import time

import gradio as gr
import psutil

from bot import replies
from bot.adapters.web.drawing import web_user
from bot.adapters.web.page import HIDDEN
from bot.adapters.web.pictures import gallery_html
from bot.chat import PlainMarkup, User
from bot.core import ChatCore


def _admin(request: gr.Request) -> User:
    user_id = getattr(request, "username", None) or ""
    if not user_id.startswith("@"):
        raise gr.Error(replies.DASHBOARD_ADMINS_ONLY)
    return web_user(user_id)


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {html.escape(v)} |" for k, v in rows)])


async def engine_state(core: ChatCore) -> str:
    info = core.engine.info if hasattr(core.engine, "info") else None
    settings = core.config.engine
    recent = [r for r in await core.store.recent_jobs(20) if r.seconds_per_step]
    host = psutil.virtual_memory()
    return _table(replies.dashboard_engine(replies.EngineState(
        model=str(getattr(info, "model_name", settings.model)), test_model=core.is_test_model, mode=settings.mode,
        device=str(getattr(info, "device", settings.device)), torch_compile=str(settings.torch_compile),
        running_job=getattr(info, "running_job", None), waiting=str(getattr(info, "queue_length", "-")),
        seconds_per_step=recent[0].seconds_per_step if recent else None,
        peak_vram_bytes=core.metrics.registry.get_sample_value("drawbot_peak_vram_bytes"),
        bot_rss_bytes=psutil.Process(os.getpid()).memory_info().rss, host_available_bytes=host.available,
        host_total_bytes=host.total)))


def limits_text(core: ChatCore) -> str:
    engine = core.config.engine
    return _table(replies.dashboard_limits(core.config.limits, min_steps=engine.min_steps, max_steps=engine.max_steps))


Rows = list[list[object]]
"""A table's rows for `gr.Dataframe`."""


def build_dashboard(core: ChatCore) -> gr.Blocks:
    store = core.store

    async def refresh(request: gr.Request) -> tuple[str, Rows, Rows, str, str]:
        _admin(request)
        now = time.time()
        queue: Rows = [[r.id, f"{r.platform}:{r.user_id}", r.status, replies.short(r.prompt, 60), r.steps,
                  f"{r.width}×{r.height}", replies.relative_time(r.created_at, now)]
                 for r in await store.active_jobs()]
        users: Rows = [[f"{u.platform}:{u.user_id}", u.last_day, u.total, u.active, "banned" if u.banned else "",
                  replies.relative_time(u.last_at, now)] for u in await store.user_overview()]
        recent = gallery_html(await store.recent_jobs(12), empty=replies.DASHBOARD_NO_PICTURES, owner=True)
        return (await engine_state(core), queue or [["", "", "", replies.DASHBOARD_QUEUE_EMPTY, "", "", ""]], users,
                recent, limits_text(core))

    async def cancel(job_id: str, request: gr.Request) -> str:
        job_id = (job_id or "").strip()
        if not job_id.isalnum():
            return replies.DASHBOARD_WHICH_JOB
        return replies.job_cancel(PlainMarkup(), await core.cancel_job(_admin(request), job_id), job_id)

    async def set_ban(target: str, request: gr.Request, lift: bool) -> str:
        platform, _, user_id = (target or "").strip().partition(":")
        if not platform or not user_id:
            return replies.DASHBOARD_WHICH_USER
        admin = _admin(request)
        return replies.ban_outcome(PlainMarkup(), await (core.unban if lift else core.ban)(admin, platform, user_id))

    async def ban(target: str, request: gr.Request) -> str:
        return await set_ban(target, request, False)

    async def unban(target: str, request: gr.Request) -> str:
        return await set_ban(target, request, True)

    with gr.Blocks(title="drawbot · owner", analytics_enabled=False) as dashboard:
        gr.Markdown("## drawbot · owner dashboard  \n[drawing page](/) · [log out](/logout)")
        with gr.Row():
            engine = gr.Markdown(elem_id="engine")
            limits = gr.Markdown(elem_id="limits")
        gr.Markdown("### Queue (every platform)")
        queue = gr.Dataframe(headers=["job", "user", "status", "prompt", "steps", "size", "asked"],
                             interactive=False, elem_id="queue", wrap=True)
        with gr.Row():
            job_id = gr.Textbox(label="Job id to cancel", elem_id="cancel-id", scale=3)
            cancel_button = gr.Button("Cancel job", elem_id="cancel-job", scale=1)
        gr.Markdown("### Users")
        users = gr.Dataframe(headers=["user", "last 24 h", "all", "waiting", "ban", "last seen"], interactive=False,
                             elem_id="users", wrap=True)
        with gr.Row():
            target = gr.Textbox(label="User (platform:id)", elem_id="ban-target", scale=3)
            ban_button = gr.Button("Ban", variant="stop", elem_id="ban", scale=1)
            unban_button = gr.Button("Unban", elem_id="unban", scale=1)
        outcome = gr.Textbox(label="Result", interactive=False, elem_id="outcome")
        gr.Markdown("### Recent pictures")
        recent = gr.HTML(elem_id="recent")
        refresh_button = gr.Button("Refresh")
        timer = gr.Timer(5)

        views = [engine, queue, users, recent, limits]
        dashboard.load(refresh, None, views, **HIDDEN)
        refresh_button.click(refresh, None, views, **HIDDEN)
        timer.tick(refresh, None, views, **HIDDEN)
        cancel_button.click(cancel, [job_id], [outcome], **HIDDEN).then(refresh, None, views, **HIDDEN)
        ban_button.click(ban, [target], [outcome], **HIDDEN).then(refresh, None, views, **HIDDEN)
        unban_button.click(unban, [target], [outcome], **HIDDEN).then(refresh, None, views, **HIDDEN)
    dashboard.queue(default_concurrency_limit=None)
    return dashboard
