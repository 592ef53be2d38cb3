"""Every sentence the bot says, in one place. User text always goes through `m.escape`; seeds through `m.code`
(tap-to-copy on Telegram, inline code on Discord), so a picture can be made again from the caption alone."""

from __future__ import annotations

import time

from bot.chat import Markup

EXAMPLES = ["/draw a red fox in the snow", "/draw a lighthouse at dusk --seed 42 --steps 20", '/draw "blade runner 2049"']


def short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def steps(n: int) -> str:
    """"1 step", "4 steps"."""
    return f"{n} step" if n == 1 else f"{n} steps"


QUEUED_TOAST = "Queued!"
"""A button's short answer when its picture was queued (the queue message itself follows in the chat)."""


def no_such_history_entry(n: int, count: int) -> str:
    if not count:
        return "You have no pictures yet, so there is nothing to draw again."
    return f"Your /history shows pictures 1 to {count}; /again {n} is not one of them."


def help_text(m: Markup, *, min_steps: int, max_steps: int, default_steps: int, is_test_model: bool,
              typed_options: bool = False) -> str:
    """`typed_options`: the platform has slash commands with typed options (Discord), not text flags."""
    if typed_options:
        usage = [
            m.escape("/draw prompt: [seed:] [steps:] [size:] [png:]") + m.escape(" - draw a picture, e.g. ")
            + m.code("/draw prompt: a red fox in the snow"),
        ]
    else:
        usage = [
            m.escape("/draw <prompt> [seed] [steps]") + m.escape(" - draw a picture. Examples:"),
            *(m.code(e) for e in EXAMPLES),
            m.escape("Options: --seed N, --steps N, --ar 16:9 or --size portrait/landscape/square, "
                     "--png for the lossless file."),
        ]
    lines = [
        m.bold("drawbot") + m.escape(" draws pictures with Flux on its owner's GPU."),
        "",
        *usage,
        m.escape(f"Seed: 0..4294967295 (random if left out). Steps: {min_steps}..{max_steps} (default {default_steps})."),
        "",
        m.escape("/history - your last pictures, to draw one again"),
        m.escape("/usage - how many pictures you may still ask for"),
        m.escape("/cancel - cancel your waiting or running pictures"),
        m.escape("/help - this message"),
    ]
    if is_test_model:
        lines += ["", m.escape("Note: this bot runs the built-in tiny test model - its pictures are random noise.")]
    return "\n".join(lines)


def queued(m: Markup, position: int, eta: float | None) -> str:
    if position <= 0:
        return m.escape("Starting your picture…")
    where = "next in line" if position == 1 else f"#{position} in the queue"
    wait = f" (about {duration(eta)})" if eta else ""
    return m.escape(f"Got it - you are {where}{wait}.")


def progress(m: Markup, step: int, total: int, eta: float | None) -> str:
    filled = round(10 * step / total) if total else 0
    bar = "▰" * filled + "▱" * (10 - filled)
    tail = f", about {duration(eta)} left" if eta is not None and step < total else ""
    return m.escape(f"Drawing… {bar} step {step}/{total}{tail}")


def caption(m: Markup, *, prompt: str, seed: int, steps: int, width: int, height: int, seconds: float,
            notice: str | None) -> str:
    text = (
        m.escape(short(prompt, 700)) + "\n"
        + m.escape("seed ") + m.code(str(seed))
        + m.escape(f" · {steps_(steps)} · {width}×{height} · {seconds:.1f} s")
    )
    if notice:
        text += "\n" + m.escape(notice)
    return text


def engine_refusal(m: Markup, refusal, *, prompt: str) -> str:
    """A picture the engine can never draw (engine.jobs.RequestRefusal), refused before it is accepted."""
    if refusal.reason == "too_large" and refusal.largest:
        width, height = refusal.largest
        where = "graphics card" if refusal.device.startswith("cuda") else "computer"
        return m.escape(f"Sorry, that size is too big for this bot's {where}: the largest picture of that shape it can "
                        f"draw is {width}x{height}. Try: /draw {short(prompt, 60)} --size {width}x{height}")
    return m.escape(f"Sorry, I can't draw that: {refusal.message}.")


def failed(m: Markup, error: str) -> str:
    return m.escape(f"Sorry, that picture failed: {error}")


def cancelled(m: Markup) -> str:
    return m.escape("Cancelled.")


def restarted_still_coming(m: Markup, prompt: str) -> str:
    return m.escape(f"The bot restarted, but your picture is still coming: “{short(prompt, 80)}”")


def restarting(m: Markup) -> str:
    return m.escape("The bot is restarting. Your picture is kept and will be drawn when it is back.")


def console_stopping(m: Markup) -> str:
    return m.escape("Stopping: the picture being drawn is finished first. Press Ctrl-C again to stop at once "
                    "(it stays queued and is drawn at the next start).")


def relative_time(then: float, now: float | None = None) -> str:
    now = time.time() if now is None else now
    return duration(now - then) + " ago"

steps_ = steps  # for functions whose parameter is called `steps`

TEST_MODEL_NOTICE = "drawn by the built-in tiny test model: its pictures are random noise."
