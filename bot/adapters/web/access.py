"""Who may reach the web page, decided before anything listens: loopback without a password, any other address only
with one. Passwords come from the environment or a file named in config (`bot.config.read_secret`), never the TOML.
Imports no web library, so `drawbot run` checks this before loading the model."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from bot.config import ConfigError, WebSettings, read_secret


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


@dataclass(frozen=True)
class WebAccess:
    host: str
    port: int
    page_password: str | None = field(default=None, repr=False)
    """None: open page, each browser its own user (loopback only)."""
    admin_password: str | None = field(default=None, repr=False)
    """None: no owner dashboard."""

    @classmethod
    def from_settings(cls, settings: WebSettings) -> WebAccess:
        """Raises ConfigError (the runner exits 2 with it) for a non-loopback address without a page password."""
        page = read_secret("DRAWBOT_WEB_PASSWORD", settings.password_file, "[web].password_file")
        admin = read_secret("DRAWBOT_WEB_ADMIN_PASSWORD", settings.admin_password_file, "[web].admin_password_file")
        if not is_loopback(settings.host) and not page:
            raise ConfigError(
                f"[web].host = {settings.host!r} is reachable from other machines, so the page needs a password: set "
                "DRAWBOT_WEB_PASSWORD or [web].password_file (or keep host = \"127.0.0.1\" and use an SSH tunnel)")
        return cls(host=settings.host, port=settings.port, page_password=page, admin_password=admin)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"
