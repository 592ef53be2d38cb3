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
        raise gr.Error("The dashboard is for admins: log in with the admin password.")
    return web_user(user_id)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


async def engine_state(core: ChatCore) -> str:
    info = core.engine.info if hasattr(core.engine, "info") else None
    settings = core.config.engine
    recent = [r for r in await core.store.recent_jobs(20) if r.seconds_per_step]
    vram = core.metrics.registry.get_sample_value("drawbot_peak_vram_bytes")
    rss = psutil.Process(os.getpid()).memory_info().rss
    host = psutil.virtual_memory()
    rows = [
        ("Model", f"{getattr(info, 'model_name', settings.model)}" + (" (tiny test model)" if core.is_test_model
                                                                     else "")),
        ("Mode", settings.mode),
        ("Device", getattr(info, "device", settings.device)),
        ("torch.compile (setting)", str(settings.torch_compile)),
        ("Drawing now", getattr(info, "running_job", None) or "nothing"),
        ("Waiting in the engine", str(getattr(info, "queue_length", "-"))),
        ("Last s/step", f"{recent[0].seconds_per_step:.3f} s" if recent else "-"),
        ("Peak VRAM of the last job", _gib(vram) if vram else "- (CPU, or no job yet)"),
        ("Host RAM of the bot", f"{_gib(rss)} (machine: {_gib(host.available)} free of {_gib(host.total)})"),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {html.escape(str(v))} |" for k, v in rows)])


def limits_text(core: ChatCore) -> str:
    lim = core.config.limits
    rows = [
        ("Cooldown", f"{lim.cooldown_seconds:g} s"),
        ("Per hour / per day", f"{lim.per_hour or 'no limit'} / {lim.per_day or 'no limit'}"),
        ("Waiting or drawing per user", str(lim.max_active_per_user)),
        ("Queue cap (everyone)", str(lim.queue_cap)),
        ("Prompt", f"{lim.max_prompt_chars} characters, {lim.max_prompt_tokens} tokens"),
        ("Steps", f"{core.config.engine.min_steps}..{core.config.engine.max_steps}"),
        ("Admins (config)", ", ".join(lim.admins) or "-"),
        ("Banned (config)", ", ".join(lim.banned) or "-"),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {html.escape(v)} |" for k, v in rows)])


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
        recent = gallery_html(await store.recent_jobs(12), empty="No pictures yet.", owner=True)
        return (await engine_state(core), queue or [["", "", "", "(the queue is empty)", "", "", ""]], users,
                recent, limits_text(core))

    async def cancel(job_id: str, request: gr.Request) -> str:
        job_id = (job_id or "").strip()
        if not job_id.isalnum():
            return "Paste a job id from the queue table."
        return replies.job_cancel(PlainMarkup(), await core.cancel_job(_admin(request), job_id), job_id)

    async def set_ban(target: str, request: gr.Request, lift: bool) -> str:
        platform, _, user_id = (target or "").strip().partition(":")
        if not platform or not user_id:
            return "Write the user as platform:id, as in the users table (e.g. telegram:12345)."
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
