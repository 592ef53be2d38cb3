"""The web platform: one ASGI app served by uvicorn as a task in the bot's own event loop, so page handlers await the
chat core directly.

    /login, /logout          the session cookie (signed, survives restarts; see sessions.py)
    /picture/<job id>.png    a stored picture, to its owner and admins (pictures.py)
    /admin                   the owner dashboard (Gradio), admin sessions only; off without an admin password
    /                        the drawing page (Gradio), and its /draw API for gradio_client

Access control and CSRF are one ASGI layer (`SessionLayer`) in front of everything, Gradio included:
- who: the `drawbot_session` cookie (a login), else in local mode (no page password) the `drawbot_browser` cookie,
  made on the first request; with a page password and no login, pages redirect to /login and the rest answers 401;
- CSRF: both cookies are `SameSite=Lax` (a cross-site POST or fetch carries neither) and any non-GET request or
  websocket whose `Origin` is another site is refused (403); Gradio adds no CORS headers for other origins either;
- Gradio's file route serves only its own cache: the state dir is in `blocked_paths`, nothing is in `allowed_paths`,
  and URLs are not proxied.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import importlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection, Request, cookie_parser
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bot import replies
from bot.adapters.web.access import WebAccess
from bot.adapters.web.conversation import Inbox, WebConversation
from bot.adapters.web.sessions import COOKIE, LOGIN_NAME, MAX_AGE, Sessions, Visitor, load_key
from bot.core import ChatCore

if TYPE_CHECKING:
    import uvicorn  # imported when serving: it is not needed for the chats

log = logging.getLogger(__name__)

BROWSER_COOKIE = "drawbot_browser"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
PUBLIC_PATHS = ("/login", "/logout")


def _cookie_header(name: str, value: str, max_age: int) -> bytes:
    return f"{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax".encode()


def _same_origin(origin: str, host: str | None) -> bool:
    return bool(host) and urlsplit(origin).netloc.lower() == (host or "").lower()


class SessionLayer:
    """ASGI middleware: CSRF origin check, visitor from cookies, login/admin gates (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, sessions: Sessions, access: WebAccess, on_admin: Callable[[Visitor], None]):
        self.app = app
        self.sessions = sessions
        self.access = access
        self.on_admin = on_admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        method = scope.get("method", "GET")
        origin = headers.get("origin")
        if origin and (scope["type"] == "websocket" or method not in SAFE_METHODS) and not _same_origin(
                origin, headers.get("host")):
            await self._refuse(scope, receive, send, PlainTextResponse(replies.WEB_CROSS_SITE, 403))
            return
        path = scope.get("path", "/")
        if "/file=http" in path:  # Gradio would fetch a URL for the caller; the page never needs it
            await self._refuse(scope, receive, send, PlainTextResponse(replies.WEB_NOT_FOUND, 404))
            return
        cookies = cookie_parser(headers.get("cookie", ""))
        visitor = self.sessions.read(cookies.get(COOKIE))
        new_cookie: bytes | None = None
        if visitor is None and self.access.page_password is None:
            visitor = self.sessions.read(cookies.get(BROWSER_COOKIE))
            if visitor is None:
                value, visitor = self.sessions.new_browser()
                new_cookie = _cookie_header(BROWSER_COOKIE, value, 10 * 365 * 24 * 3600)
                # This very request (and Gradio's auth dependency) must see the id it is being given.
                cookie = (headers.get("cookie", "") + f"; {BROWSER_COOKIE}={value}").lstrip("; ")
                scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"cookie"]
                             + [(b"cookie", cookie.encode())])
        scope.setdefault("state", {})["drawbot_visitor"] = visitor
        wants_page = method == "GET" and "text/html" in headers.get("accept", "")
        if path not in PUBLIC_PATHS:
            if visitor is None:
                response = RedirectResponse(f"/login?next={path}", 303) if wants_page else PlainTextResponse(
                    replies.WEB_LOG_IN_FIRST, 401)
                await self._refuse(scope, receive, send, response)
                return
            if path == "/admin" or path.startswith("/admin/"):
                if self.access.admin_password is None:
                    await self._refuse(scope, receive, send, PlainTextResponse(
                        replies.WEB_DASHBOARD_OFF, 404))
                    return
                if not visitor.is_admin:
                    response = RedirectResponse("/login?next=/admin/", 303) if wants_page else PlainTextResponse(
                        replies.WEB_ADMINS_ONLY, 403)
                    await self._refuse(scope, receive, send, response)
                    return
        if visitor is not None and visitor.is_admin:
            self.on_admin(visitor)

        async def send_with_cookie(message: Message) -> None:
            if new_cookie is not None and message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"set-cookie", new_cookie)])
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await response(scope, receive, send)


def visitor_of(request: HTTPConnection) -> Visitor | None:
    return request.scope.get("state", {}).get("drawbot_visitor")


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>drawbot · log in</title>
<style>body{{font-family:system-ui,sans-serif;max-width:22rem;margin:3rem auto;padding:0 1rem}}
input,button{{display:block;width:100%;margin:.4rem 0 1rem;padding:.6rem;font-size:1rem;box-sizing:border-box}}
.error{{color:#b00}}</style></head><body><h1>drawbot</h1><p>{intro}</p><p class="error">{error}</p>
<form method="post" action="/login"><input type="hidden" name="next" value="{next}">
<label>Your name<input name="username" autocomplete="username" maxlength="32" pattern="[A-Za-z0-9_.\\-]+"></label>
<label>Password<input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button></form></body></html>"""


class WebPlatform:
    """The `web` chat platform. `run()` serves until `stop()`; `conversation(ref)` works before it (recovery)."""

    name = "web"

    def __init__(self, core: ChatCore, access: WebAccess, state_dir: Path, *, companion: bool = False,
                 say: Callable[[str], None] = print):
        self.core = core
        self.access = access
        self.state_dir = Path(state_dir)
        self.inbox = Inbox()
        self.outlives_others = not companion
        """False when the page only accompanies the console (`make run`): the bot ends with the console."""
        self._say = say
        self._server: uvicorn.Server | None = None
        self._stopped = asyncio.Event()
        self._api_dir: Path | None = None
        self.port: int | None = None

    def conversation(self, ref: dict) -> WebConversation:
        return WebConversation(str(ref.get("user", "")), self.inbox)

    # -- the HTTP side -----------------------------------------------------------------------------------------------
    def build_app(self) -> SessionLayer:
        """The ASGI app: our routes, the dashboard and the page mounted, all behind `SessionLayer`."""
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        import gradio as gr

        from bot.adapters.web.dashboard import build_dashboard
        from bot.adapters.web.drawing import WebDrawing
        from bot.adapters.web.page import CSS, build_page, theme
        from bot.adapters.web.pictures import serve_picture

        sessions = Sessions(load_key(self.state_dir))
        access = self.access
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        self._api_dir = Path(tempfile.mkdtemp(prefix="drawbot-api-"))

        def login_page(error: str = "", next_path: str = "/", status: int = 200) -> HTMLResponse:
            intro = replies.WEB_LOGIN_PAGE if access.page_password else replies.WEB_LOGIN_ADMIN
            return HTMLResponse(LOGIN_PAGE.format(intro=intro, error=html.escape(error), next=html.escape(next_path)),
                                status_code=status)

        def safe_next(value: str | None) -> str:
            value = value or "/"
            return value if value.startswith("/") and not value.startswith("//") else "/"

        @app.get("/login")
        async def login_form(request: Request) -> Response:
            return login_page(next_path=safe_next(request.query_params.get("next")))

        @app.post("/login")
        async def login(request: Request) -> Response:
            form = await request.form()
            name, password = str(form.get("username", "")).strip(), str(form.get("password", ""))
            next_path = safe_next(str(form.get("next", "/")))
            browser = "text/html" in request.headers.get("accept", "")
            user_id = None
            if access.admin_password and hmac.compare_digest(password.encode(), access.admin_password.encode()):
                user_id = "@" + (name or "owner")
            elif access.page_password and hmac.compare_digest(password.encode(), access.page_password.encode()):
                user_id = name
            if user_id is None or not LOGIN_NAME.fullmatch(user_id.lstrip("@")):
                await asyncio.sleep(0.5)  # slows guessing
                error = replies.WEB_WRONG_PASSWORD if user_id is None else replies.WEB_BAD_NAME
                return login_page(error, next_path, 401) if browser else JSONResponse({"error": error}, 401)
            value, visitor = sessions.issue(user_id)
            log.info("web login user=%s admin=%s", visitor.user_id, visitor.is_admin)
            response = RedirectResponse(next_path, 303) if browser else JSONResponse({"success": True})
            response.headers.append("set-cookie", _cookie_header(COOKIE, value, MAX_AGE).decode())
            return response

        @app.get("/logout")
        async def logout() -> Response:
            response = RedirectResponse("/", 303)
            response.headers.append("set-cookie", _cookie_header(COOKIE, "", 0).decode())
            return response

        @app.get("/admin")
        async def admin_slash() -> Response:
            return RedirectResponse("/admin/", 307)  # else the page mounted at / would answer (404)

        @app.get("/picture/{job_id}.png")
        async def picture(request: Request) -> Response:
            return await serve_picture(request, self.core.store, visitor_of(request))

        def user_of(request: Request) -> str | None:
            visitor = visitor_of(request)
            return None if visitor is None else visitor.user_id

        def mount(blocks: gr.Blocks, path: str) -> None:
            gr.mount_gradio_app(app, blocks, path=path, auth_dependency=user_of,
                                blocked_paths=[str(self.state_dir.resolve())], allowed_paths=[], theme=theme(),
                                css=CSS, footer_links=["api"])

        mount(build_dashboard(self.core), "/admin")
        mount(build_page(WebDrawing(self.core, self.inbox), self.core.config, self._api_dir), "/")
        return SessionLayer(app, sessions=sessions, access=access,
                            on_admin=lambda v: self.core.grant_admin(f"web:{v.user_id}"))

    async def run(self) -> None:
        try:
            sock = _listen(self.access.host, self.access.port)
        except OSError as exc:
            self._say(f"web page: cannot listen on {self.access.host}:{self.access.port} ({exc.strerror or exc}); "
                      "the bot runs without it (set [web].port to another port)")
            return
        await asyncio.to_thread(importlib.import_module, "gradio")  # seconds of imports, off the event loop
        import uvicorn

        self.port = sock.getsockname()[1]
        app = await asyncio.to_thread(self.build_app)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2, ws="none")
        self._server = _Server(config)
        shown = WebAccess(self.access.host, self.port).url
        self._say(f"web page on {shown}" + (" (password required)" if self.access.page_password else ""))
        try:
            await self._server.serve(sockets=[sock])
        finally:
            sock.close()
            if self._api_dir is not None:
                shutil.rmtree(self._api_dir, ignore_errors=True)
            self._stopped.set()

    async def stop(self) -> None:
        """Close connections (pages reconnect to the next start) and wait briefly for uvicorn to finish."""
        if self._server is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), timeout=5)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _server_class() -> type[uvicorn.Server]:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn inside the bot: the bot's runner owns SIGTERM/SIGINT, so uvicorn must not capture them."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


def _Server(config: uvicorn.Config) -> uvicorn.Server:
    return _server_class()(config)
