"""Pictures over HTTP: `/picture/<job id>.png`, the stored PNG byte for byte (A1111 `parameters` chunk included), to
its owner and to admins only. The path names a job, never a file: the file is the one the store recorded for it."""

from __future__ import annotations

import asyncio
import html
import re

from starlette.requests import Request
from starlette.responses import Response

from bot import replies
from bot.adapters.web.sessions import Visitor
from bot.store import JobRecord, Store

JOB_ID = re.compile(r"[0-9a-f]{6,64}")


def picture_url(job_id: str, *, download: bool = False) -> str:
    return f"/picture/{job_id}.png" + ("?download=1" if download else "")


def may_see(visitor: Visitor | None, job: JobRecord) -> bool:
    return visitor is not None and (visitor.is_admin or (job.platform == "web" and job.user_id == visitor.user_id))


async def serve_picture(request: Request, store: Store, visitor: Visitor | None) -> Response:
    job_id = request.path_params.get("job_id", "")
    not_found = Response(replies.WEB_NO_SUCH_PICTURE, status_code=404, media_type="text/plain")
    if not JOB_ID.fullmatch(job_id):
        return not_found
    job = await store.get_job(job_id)
    # Someone else's picture answers exactly like a missing one: ids are not confirmed to strangers.
    if job is None or not may_see(visitor, job) or job.image_path is None:
        return not_found
    try:
        png = await asyncio.to_thread(job.image_path.read_bytes)
    except OSError:
        return not_found
    disposition = "attachment" if request.query_params.get("download") else "inline"
    return Response(png, media_type="image/png", headers={
        "Content-Disposition": f'{disposition}; filename="drawbot-{job.seed}-{job.id[:8]}.png"',
        "Cache-Control": "private, max-age=86400",
        "X-Content-Type-Options": "nosniff",
    })


def caption_html(job: JobRecord) -> str:
    seconds = f" · {job.duration:.1f} s" if job.duration else ""
    return (f"{html.escape(replies.short(job.prompt, 300))}<br>seed <code class=\"seed\">{job.seed}</code> · "
            f"{job.steps} steps · {job.width}×{job.height}{seconds}")


def picture_html(job: JobRecord, notice: str | None = None) -> str:
    """The finished picture with its seed and parameters, and a link to the lossless PNG."""
    if job.status != "done" or job.image_path is None:
        return ""
    extra = f"<br><small>{html.escape(notice)}</small>" if notice else ""
    return (f'<figure class="drawbot-picture" data-job="{job.id}" data-seed="{job.seed}">'
            f'<img src="{picture_url(job.id)}" alt="{html.escape(replies.short(job.prompt, 120))}">'
            f"<figcaption>{caption_html(job)}{extra}<br>"
            f'<a href="{picture_url(job.id, download=True)}" download>Download PNG (with parameters)</a>'
            "</figcaption></figure>")


ICONS = {"done": "✅", "failed": "⚠️", "cancelled": "✖️", "queued": "⏳", "running": "🎨"}


def gallery_html(jobs: list[JobRecord], *, empty: str, owner: bool = False) -> str:
    if not jobs:
        return f'<p class="drawbot-empty">{html.escape(empty)}</p>'
    cards = []
    for job in jobs:
        who = f"{html.escape(job.platform)}:{html.escape(job.user_id)} · " if owner else ""
        image = (f'<a href="{picture_url(job.id)}" target="_blank"><img loading="lazy" src="{picture_url(job.id)}" '
                 f'alt=""></a>' if job.status == "done" and job.image_path is not None else
                 f'<div class="drawbot-placeholder">{ICONS.get(job.status, "")} {html.escape(job.status)}</div>')
        cards.append(f'<div class="drawbot-card" data-job="{job.id}" data-status="{job.status}">{image}'
                     f"<small>{who}{caption_html(job)}</small></div>")
    return '<div class="drawbot-gallery">' + "".join(cards) + "</div>"
