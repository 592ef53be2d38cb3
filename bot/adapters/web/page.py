"""The drawing page (Gradio): prompt, seed (-1 = random), steps, size, Draw; queue position and step progress with
an ETA while waiting; the picture with its seed and a download of the PNG; new-seed / same-seed; cancel; My pictures.

Each handler knows its visitor from `gr.Request.username`, which the server's session layer fills (see server.py).
Pictures are shown through `/picture/<job id>.png` (owner-only), never through Gradio's shared file cache, except
the `/draw` API endpoint, whose result is a file by design: that copy goes to Gradio's cache and its URL only to the
caller.
"""

from __future__ import annotations

import html
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal, TypedDict

import gradio as gr

from bot import replies
from bot.adapters.web.drawing import SIZES, Update, WebDrawing, web_user
from bot.adapters.web.pictures import gallery_html, picture_html
from bot.chat import User
from bot.commands import SIZE_PRESETS
from bot.config import Config

CSS = """
.drawbot-picture img { width: 100%; max-width: 768px; height: auto; border-radius: 8px; image-rendering: auto; }
.drawbot-gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 10px; }
.drawbot-card img { width: 100%; height: auto; border-radius: 6px; }
.drawbot-card small { display: block; word-break: break-word; }
.drawbot-placeholder { aspect-ratio: 1; display: flex; align-items: center; justify-content: center;
  background: rgba(127,127,127,.15); border-radius: 6px; }
"""


class Hidden(TypedDict):
    api_visibility: Literal["private"]


HIDDEN: Hidden = {"api_visibility": "private"}
"""Keyword arguments of a page event that must not be an API endpoint (a TypedDict, so the type checker checks the
keyword and its value against Gradio's signature)."""

# What a page handler returns for (status, picture, last job); `gr.skip()` (a dict) leaves a component as it is.
Shown = tuple[str | dict[str, Any], str | dict[str, Any], str | dict[str, Any]]


def theme() -> gr.themes.Base:
    # System fonts: the default theme would fetch Google Fonts on every page load (privacy, offline PCs).
    return gr.themes.Default(font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def _user(request: gr.Request) -> User:
    user_id = getattr(request, "username", None)
    if not user_id:
        raise gr.Error(replies.WEB_SESSION_EXPIRED)
    return web_user(user_id)


def build_page(drawing: WebDrawing, config: Config, api_dir: Path) -> gr.Blocks:
    store = drawing.core.store
    engine = config.engine
    notice = replies.TEST_MODEL_NOTICE if drawing.core.is_test_model else None

    async def history_of(request: gr.Request) -> str:
        user = _user(request)
        jobs = await store.history("web", user.id, 24)
        notices = drawing.inbox.read(user.id)
        top = "".join(f'<p class="drawbot-notice">{html.escape(n)}</p>' for n in notices[-2:])
        return top + gallery_html(jobs, empty=replies.WEB_NO_PICTURES)

    def shown(update: Update) -> Shown:
        picture = picture_html(update.job, notice) if update.job is not None and update.final else gr.skip()
        text = update.text if update.text is not None else gr.skip()  # None: the page's Cancel answered for it
        return text, picture, (update.job.id if update.job is not None else gr.skip())

    async def draw_on_page(prompt: str, seed: float | None, steps: float | None, size: str,
                           request: gr.Request) -> AsyncIterator[Shown]:
        async for update in drawing.draw(_user(request), prompt, seed, steps, size, page=request.session_hash):
            yield shown(update)

    async def again(action: str, job_id: str | None, request: gr.Request) -> AsyncIterator[Shown]:
        async for update in drawing.button(_user(request), action, job_id, page=request.session_hash):
            yield shown(update)

    async def reroll(job_id: str | None, request: gr.Request) -> AsyncIterator[Shown]:
        async for out in again("reroll", job_id, request):
            yield out

    async def same_seed(job_id: str | None, request: gr.Request) -> AsyncIterator[Shown]:
        async for out in again("again", job_id, request):
            yield out

    async def cancel(request: gr.Request) -> str:
        return await drawing.cancel(_user(request), page=request.session_hash)

    async def api_draw(prompt: str, seed: float | None, steps: float | None, request: gr.Request) -> str:
        """For gradio_client: the same draw, answered with the PNG file (or the core's refusal as an error)."""
        last = None
        async for update in drawing.draw(_user(request), prompt, seed, steps, SIZES):
            last = update
        if last is None or last.job is None or last.job.status != "done" or last.job.image_path is None:
            raise gr.Error(replies.DID_NOT_WORK if last is None or last.text is None else last.text)
        folder = Path(tempfile.mkdtemp(dir=api_dir))
        target = folder / f"drawbot-{last.job.seed}-{last.job.id[:8]}.png"
        shutil.copyfile(last.job.image_path, target)  # Gradio copies it to its cache; this copy is then removed
        return str(target)

    with gr.Blocks(title="drawbot", analytics_enabled=False) as page:
        gr.Markdown("## drawbot\nDraw a picture with Flux on this bot's GPU. Same queue and limits as the chats.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                prompt = gr.Textbox(label="Prompt", placeholder="a red fox in the snow", lines=3, max_lines=8,
                                    elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, elem_id="seed",
                                     min_width=140)
                    steps = gr.Slider(engine.min_steps, engine.max_steps, value=engine.default_steps, step=1,
                                      label="Steps", elem_id="steps", min_width=160)
                size = gr.Radio([SIZES, *SIZE_PRESETS], value=SIZES, label="Size", elem_id="size")
                with gr.Row():
                    draw_button = gr.Button("Draw", variant="primary", elem_id="draw")
                    cancel_button = gr.Button("Cancel", elem_id="cancel")
                status = gr.Textbox(label="Status", interactive=False, elem_id="status", lines=2)
            with gr.Column(scale=1, min_width=300):
                picture = gr.HTML(elem_id="picture")
                with gr.Row():
                    reroll_button = gr.Button("New seed", elem_id="reroll")
                    again_button = gr.Button("Same seed", elem_id="again")
        gr.Markdown("### My pictures")
        history = gr.HTML(elem_id="history")
        last_job = gr.State(None)
        timer = gr.Timer(5)
        # The /draw API for gradio_client: prompt, seed, steps -> the PNG file. Hidden from the page.
        api_file = gr.File(visible=False)
        api_button = gr.Button(visible=False)

        draw_button.click(draw_on_page, [prompt, seed, steps, size], [status, picture, last_job], **HIDDEN).then(
            history_of, None, [history], **HIDDEN)
        prompt.submit(draw_on_page, [prompt, seed, steps, size], [status, picture, last_job], **HIDDEN).then(
            history_of, None, [history], **HIDDEN)
        reroll_button.click(reroll, [last_job], [status, picture, last_job], **HIDDEN).then(
            history_of, None, [history], **HIDDEN)
        again_button.click(same_seed, [last_job], [status, picture, last_job], **HIDDEN).then(
            history_of, None, [history], **HIDDEN)
        cancel_button.click(cancel, None, [status], **HIDDEN)
        page.load(history_of, None, [history], **HIDDEN)
        timer.tick(history_of, None, [history], **HIDDEN)
        api_button.click(api_draw, [prompt, seed, steps], [api_file], api_name="draw")
    page.queue(default_concurrency_limit=None)  # the core queues and limits; Gradio must not serialise users
    return page

