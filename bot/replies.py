"""Every sentence the bot says, in one place. User text always goes through `m.escape`; seeds through `m.code`
(tap-to-copy on Telegram, inline code on Discord), so a picture can be made again from the caption alone."""

from __future__ import annotations

import math
import time

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, assert_never

from bot import commands
from bot.chat import Markup
from engine.jobs import Failure

if TYPE_CHECKING:
    from bot.config import LimitSettings
    from bot.core.admin import BanOutcome
    from bot.limits import Decision
    from bot.store import JobRecord, Refused, Usage
    from engine.jobs import RequestRefusal

EXAMPLES: list[str] = [
    "/draw a red fox in the snow",
    "/draw a lighthouse at dusk, oil painting 42 --ar 16:9",
    '/draw "blade runner 2049" --png',
]
"""The one list of example commands (help, hints). Each is valid under any configured rules: none names a step
count, which `max_steps` could forbid (tests/bot/test_commands.py checks them against odd ranges and the help)."""


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
BUTTON_INVALID = "That button is no longer valid."
BUTTON_BROKE = "Sorry, something went wrong with that button."
PICTURE_GONE = "I can't find that picture any more."
NOT_YOUR_PICTURE = "Only the person who asked for this picture can use its buttons - send your own /draw!"
DRAW_FIRST = "Draw a picture first."
DID_NOT_WORK = "Sorry, that did not work."


# -- command menus: Telegram's setMyCommands, Discord's slash commands ------------------------------------------------

MENU: dict[str, str] = {
    "draw": "Draw a picture",
    "help": "How to use this bot, with examples",
    "history": "Your last pictures, to draw one again",
    "usage": "How many pictures you may still ask for",
    "cancel": "Cancel your waiting or running pictures",
}
"""Each menu command's description, in menu order. /start, /again and /reroll work too but need no menu entry."""


def menu(*, typed_options: bool) -> list[tuple[str, str]]:
    """(command, description) for a platform's menu. Text commands (Telegram) show an example of /draw's form."""
    return [(command, f"{text}: {EXAMPLES[0]}" if command == "draw" and not typed_options else text)
            for command, text in MENU.items()]


def draw_option_descriptions(*, min_steps: int, max_steps: int, default_steps: int) -> dict[str, str]:
    """Discord's /draw options."""
    return {
        "prompt": "What to draw, in words",
        "seed": "Same seed + same prompt = same picture (random if left out)",
        "steps": f"More steps: more detail, slower ({min_steps}-{max_steps}, default {default_steps})",
        "size": "Picture shape (default: square)",
        "png": "Attach the picture as a plain file instead of showing it in the embed",
    }


ADMIN_MENU = "Tools for the bot's admins"
ADMIN_MENU_COMMANDS: dict[str, str] = {
    "queue": "Every picture waiting or being drawn",
    "ban": "Stop someone from drawing (until an admin unbans them)",
    "unban": "Let a banned user draw again",
}
ADMIN_MENU_USER: dict[str, str] = {"ban": "Who to ban", "unban": "Who to unban"}


def no_such_history_entry(n: int, count: int) -> str:
    if not count:
        return "You have no pictures yet, so there is nothing to draw again."
    return f"Your /history shows pictures 1 to {count}; /again {n} is not one of them."


def draw_hint(m: Markup) -> str:
    """Plain text in a private chat: how to ask for a picture."""
    return m.escape("Send /draw followed by what to draw, e.g. ") + m.code(EXAMPLES[0]) + m.escape(" - /help for more.")


def unknown_command(m: Markup, command: str) -> str:
    return m.escape(f"I don't know /{command}. Try /help.")


def ban_usage(m: Markup, verb: str) -> str:
    return m.escape(f"Usage: /{verb} <user id>, e.g. /{verb} 123456789")


def again_usage(m: Markup, action: str) -> str:
    """/again or /reroll typed without a picture to draw again."""
    return m.escape(f"Send /{action} with the number /history shows next to the picture, e.g. /{action} 1 for your "
                    "newest.")


# -- /draw that could not be understood (bot.commands decides what is wrong) -----------------------------------------

KNOWN_OPTIONS = "--seed N, --steps N, --size WxH or a preset, --ar W:H, --png"
_EXAMPLE_PROMPT = "a red fox"
_QUOTE_HINT = 'If that number is part of your prompt, put the prompt in quotes: /draw "blade runner 2049"'


def usage_problem(m: Markup, problem: commands.UsageProblem) -> str:
    """What is wrong with a /draw (`UsageError.problem`), in one line with an example of the right form; each example
    is itself a valid /draw under the rules the problem was found with (tests/bot/test_commands.py parses them)."""
    return m.escape(_usage_sentence(problem))


def _usage_sentence(problem: commands.UsageProblem) -> str:
    draw = f"/draw {_EXAMPLE_PROMPT}"
    match problem:
        case commands.UnknownOption():
            return (f"I don't know the option --{_show(problem.name)}. Known options: {KNOWN_OPTIONS}. "
                    f"Example: {draw} --seed 42 --ar 16:9 (to draw it as text, put the prompt in quotes).")
        case commands.MissingValue():
            return f"--{problem.option} needs a value, for example: {draw} {_option_example(problem)}"
        case commands.UnexpectedValue():
            return f"--{problem.option} takes no value. Example: {draw} --{problem.option}"
        case commands.RepeatedOption():
            return f"--{problem.option} was given twice; give it once, for example: {draw} {_option_example(problem)}"
        case commands.ConflictingOptions():
            return f"Use --size or --ar, not both. Example: {draw} --ar 16:9"
        case commands.BadSeed():
            hint = f" {_QUOTE_HINT}" if problem.from_end else ""
            if problem.out_of_range:
                return (f"The seed {_show(problem.typed)} is out of range: use a whole number from 0 to "
                        f"{commands.SEED_MAX}, or -1 for a random one. Example: {draw} 42.{hint}")
            return (f"The seed must be a whole number from 0 to {commands.SEED_MAX}, or -1 for a random one; "
                    f"“{_show(problem.typed)}” is not. Example: {draw} 42.{hint}")
        case commands.BadSteps():
            hint = f" {_QUOTE_HINT}" if problem.from_end else ""
            default = problem.default_steps
            return (f"Steps must be a whole number from {problem.min_steps} to {problem.max_steps}; "
                    f"“{_show(problem.typed)}” is not. Example: {draw} 42 {default} (seed 42, {default} steps) "
                    f"or {draw} --steps {default}.{hint}")
        case commands.BadRatio():
            return (f"The aspect ratio must be between 1:4 and 4:1; {_show(problem.typed)} is not. "
                    f"Example: {draw} --ar 16:9")
        case commands.UnknownSize():
            return (f"I don't know the size “{_show(problem.typed)}”. Use a preset "
                    f"({', '.join(commands.SIZE_PRESETS)}), a ratio like 16:9, or WIDTHxHEIGHT like "
                    f"{_size(problem.portrait)}. Example: {draw} {_option_example(problem)}")
        case commands.SizeOutOfRange():
            return (f"Width and height must each be from {problem.low} to {problem.high}; "
                    f"{problem.width}x{problem.height} is not. Example: {draw} --size {_size(problem.portrait)}")
        case commands.SizeNotMultipleOf16():
            return (f"Width and height must be multiples of 16; {problem.width}x{problem.height} is not. "
                    f"Example: {draw} --size {_size(problem.nearest)}")
        case commands.TooManyPixels():
            return (f"{problem.width}x{problem.height} is too many pixels (at most {problem.max_pixels:,}). "
                    f"Example: {draw} --size {_size(problem.portrait)}")
        case commands.EmptyPrompt():
            hint = (' Numbers at the end are read as seed and steps; to draw a number, quote it: /draw "1984".'
                    if problem.numbers_taken else "")
            return f"Tell me what to draw, for example: /draw a red fox in the snow.{hint}"
        case commands.PromptTooLong():
            return (f"Your prompt is {problem.length} characters long; the limit is {problem.limit}. "
                    "Please shorten it, for example: /draw a red fox in the snow")
        case commands.PromptTooManyTokens():
            about = "" if problem.exact else "about "
            return (f"Your prompt is {about}{problem.tokens} tokens long; the model reads at most {problem.limit}. "
                    "Please shorten it, for example: /draw a red fox in the snow")
    assert_never(problem)


def _option_example(problem: commands.MissingValue | commands.RepeatedOption | commands.UnknownSize) -> str:
    """A valid `--option value` for the option the problem is about (steps: the rules' default count)."""
    if isinstance(problem, commands.UnknownSize):
        value = "16:9" if problem.option == "ar" else "portrait"
    else:
        value = {"seed": "42", "steps": str(problem.default_steps), "size": "portrait", "ar": "16:9"}[problem.option]
    return f"--{problem.option} {value}"


def _size(width_height: tuple[int, int]) -> str:
    return "x".join(map(str, width_height))


def _show(typed: str, limit: int = 24) -> str:
    """What the user typed, quoted in a sentence: one line, cut short."""
    flat = " ".join(typed.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def restarting_refusal(m: Markup) -> str:
    return m.escape("The bot is restarting; please try again in a minute.")


@dataclass(frozen=True)
class PolicyRefusal:
    """Why the owner's policy refuses a picture (the core decides; this module words it)."""

    reason: Literal["user_not_allowed", "chat_not_allowed", "blocked_word"]
    matched: str = ""
    """The blocked word as it appeared in the prompt."""


def policy_refusal(m: Markup, refusal: PolicyRefusal) -> str:
    if refusal.reason == "user_not_allowed":
        return m.escape("Sorry, this bot only draws for the people its owner allowed.")
    if refusal.reason == "chat_not_allowed":
        return m.escape("Sorry, this bot does not draw in this chat.")
    return m.escape(f"Sorry, that prompt contains something this bot does not draw (“{short(refusal.matched, 40)}”).")


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
            test_model: bool) -> str:
    text = (
        m.escape(short(prompt, 700)) + "\n"
        + m.escape("seed ") + m.code(str(seed))
        + m.escape(f" · {steps_(steps)} · {width}×{height} · {seconds:.1f} s")
    )
    if test_model:
        text += "\n" + m.escape(TEST_MODEL_NOTICE)
    return text


def describe_wait(seconds: float) -> str:
    """'7 seconds', '12 minutes', '5 hours 3 minutes': rounded up, so users are never told to come back too early."""
    whole = max(1, math.ceil(seconds - 1e-9))
    if whole < 60:
        return _plural(whole, "second")
    minutes = math.ceil(whole / 60)
    if minutes < 60:
        return _plural(minutes, "minute")
    hours, minutes = divmod(minutes, 60)
    return _plural(hours, "hour") + (f" {_plural(minutes, 'minute')}" if minutes else "")


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


BANNED = "Sorry, you can't draw with this bot: its owner has blocked your account. You won't hear from it again."


def admission_refusal(m: Markup, refused: Refused | Decision) -> str:
    """A limit turned the picture down (bot.limits decides which, with its numbers; bot.store.Refused carries them)."""
    limit, wait = int(refused.limit), describe_wait(refused.wait)
    text = {
        "banned": BANNED,
        "cooldown": f"Please wait {wait} before your next picture "
                    f"(there is a {describe_wait(refused.limit)} pause between pictures).",
        "hourly": f"You've drawn your {limit} pictures for this hour. You can draw again in {wait}.",
        "daily": f"You've drawn your {limit} pictures for today (the last 24 hours). You can draw again in {wait}.",
        "too_many_active": f"You already have {_plural(refused.active, 'picture')} waiting or drawing "
                           f"(at most {limit} at once). Try again when one is finished, in about {wait}.",
        "queue_full": f"The queue is full ({limit} pictures waiting or drawing). Please try again in about {wait}.",
    }[refused.reason]
    return m.escape(text)


def engine_refusal(m: Markup, refusal: RequestRefusal, *, prompt: str) -> str:
    """A picture the engine can never draw (engine.jobs.RequestRefusal), refused before it is accepted."""
    if refusal.reason == "too_large":
        where = "graphics card" if refusal.device.startswith("cuda") else "computer"
        if not refusal.largest:
            return m.escape(f"Sorry, {refusal.width}x{refusal.height} is too big for this bot's {where}.")
        width, height = refusal.largest
        return m.escape(f"Sorry, that size is too big for this bot's {where}: the largest picture of that shape it can "
                        f"draw is {width}x{height}. Try: /draw {short(prompt, 60)} --size {width}x{height}")
    if refusal.reason == "bad_steps":
        return m.escape(f"Sorry, I can't draw that: steps must be at least 1 (got {refusal.steps}).")
    return m.escape(f"Sorry, I can't draw that: width and height must be positive multiples of 16 "
                    f"(got {refusal.width}x{refusal.height}).")


def done(m: Markup) -> str:
    return m.escape("Done.")


NEW_SEED_LABEL = "🎲 New seed"
SAME_SEED_LABEL = "🔁 Same seed"
DELETE_LABEL = "🗑️ Delete"
"""Discord's own button under a picture: its requester (or an admin) deletes the message."""


def here_is_your_picture(who: str) -> str:
    """Above a picture delivered as a new channel message (its interaction had expired). `who`: the requester, already
    in the platform's markup (a Discord mention)."""
    return f"{who} here is your picture:"


def again_label(n: int) -> str:
    """/history's button for picture number `n`."""
    return f"🔁 {n}"


_STATUS_ICONS = {"done": "✅", "failed": "⚠️", "cancelled": "✖️", "queued": "⏳", "running": "🎨"}


def history(m: Markup, records: list[JobRecord], now: float) -> str:
    if not records:
        return m.escape("You have no pictures yet. Try ") + m.code(EXAMPLES[0])
    lines = [m.bold("Your last pictures:")]
    for n, r in enumerate(records, start=1):
        lines.append(
            m.escape(f"{n}. {_STATUS_ICONS.get(r.status, '')} “{short(r.prompt, 60)}” · seed ") + m.code(str(r.seed))
            + m.escape(f" · {steps(r.steps)} · {r.width}×{r.height} · {relative_time(r.created_at, now)}")
            + m.escape(f" · again: /again {r.id}")
        )
    return "\n".join(lines)


def usage_of_admin(m: Markup) -> str:
    return m.escape("You are an admin: no limits apply to you.")


def usage(m: Markup, u: Usage, now: float) -> str:
    def window(used: int, limit: int, retry_at: float | None, frees_at: float | None, name: str) -> str:
        if not limit:
            return f"{name}: {used} (no limit)"
        text = f"{name}: {used} of {limit}"
        if retry_at:
            text += f" - next picture in {duration(retry_at - now)}"
        elif frees_at and used:
            text += f" (a slot frees in {duration(frees_at - now)})"
        return text

    lines = [
        window(u.used_this_hour, u.per_hour, u.hour_retry_at, u.hour_frees_at, "This hour"),
        window(u.used_today, u.per_day, u.day_retry_at, u.day_frees_at, "Last 24 hours"),
        f"Waiting or drawing now: {u.active} of {u.max_active}",
    ]
    if u.cooldown_ends_at and u.cooldown_ends_at > now:
        lines.append(f"Cooldown: {duration(u.cooldown_ends_at - now)} left")
    return m.escape("\n".join(lines))


def cancelled_count(m: Markup, total: int) -> str:
    return m.escape(f"Cancelled {total} picture{'s' if total != 1 else ''}." if total else
                    "You have nothing waiting or drawing.")


_FAILURES: dict[str, str] = {
    Failure.OUT_OF_MEMORY: "the GPU ran out of memory while drawing this one; try a smaller size or again in a moment",
    Failure.CRASHED: "something went wrong while drawing it; please try again",
    Failure.REFUSED: "this bot can no longer draw a picture of that size or with that many steps; try a smaller one",
    Failure.ENGINE_CLOSED: "the bot is restarting; please try again in a minute",
    Failure.QUEUE_FULL: "the queue is full; please try again in a few minutes",
    Failure.RESTARTED: "the bot stopped unexpectedly twice while drawing this picture, so it gave up on it; "
                       "please try again, perhaps smaller",
    Failure.UNREACHABLE: "the job could not be handed to the drawing machines; please try again",
    Failure.PICTURE_LOST: "its file was lost before it could be sent; please draw it again",
}


def failed(m: Markup, failure: str) -> str:
    """A picture that failed; `failure` is an engine.jobs.Failure value (as kept in the store). A value this version
    does not know (a row from an older bot) gets the general sentence."""
    return m.escape(f"Sorry, that picture failed: {_FAILURES.get(failure, _FAILURES[Failure.CRASHED])}")


def cancelled(m: Markup) -> str:
    return m.escape("Cancelled.")


def restarted_still_coming(m: Markup, prompt: str) -> str:
    return m.escape(f"The bot restarted, but your picture is still coming: “{short(prompt, 80)}”")


def restarting(m: Markup) -> str:
    return m.escape("The bot is restarting. Your picture is kept and will be drawn when it is back.")


CONSOLE_GREETING = "Type /draw <prompt> [seed] [steps], /help, or Ctrl-D to quit."


def console_line_failed(error: str) -> str:
    """A console line whose handling raised (`error`: the exception's type); the console goes on."""
    return f"Sorry, something went wrong with that line ({error})."


def console_picture_saved(path: str | None) -> str:
    return f"🖼  picture saved: {path}"


def console_buttons(buttons: list[tuple[str, str, str]]) -> str:
    """The console's stand-in for buttons: each (label, action, job id) as the command that does the same."""
    return "  " + "  ".join(f"[{label}: /{action} {job_id}]" for label, action, job_id in buttons)


def console_stopping(m: Markup) -> str:
    return m.escape("Stopping: the picture being drawn is finished first; pictures still waiting stay queued for the "
                    "next start. Press Ctrl-C again to stop at once (the one being drawn stays queued too).")


def disk_full_not_saved(m: Markup) -> str:
    return m.escape("Sorry, your picture could not be saved: the bot's disk is full. It stays in the queue and is "
                    "drawn again as soon as there is room.")


def disk_full_refused(m: Markup) -> str:
    return m.escape("Sorry, the bot's disk is full, so it cannot take new pictures right now. Please try again later.")


def disk_full_busy(m: Markup) -> str:
    return m.escape("Sorry, the bot's disk is full, so it cannot do that right now. Please try again later.")


def ban_outcome(m: Markup, outcome: BanOutcome, *, who: str | None = None) -> str:
    """An admin's ban/unban. `who`: the user as the platform shows them, already in its markup (a Discord mention);
    by default their `platform:id`."""
    name = who if who is not None else m.escape(outcome.key)
    sentence = {
        "not_admin": f"Only the bot's admins can {outcome.action}.",
        "target_is_admin": "{who} is an admin; remove them from [limits].admins in the config first.",
        "already_banned": "{who} is already banned.",
        "banned": "{who} is banned (until an admin unbans them).",
        "banned_in_config": "{who} is banned in the config file ([limits].banned); remove them there and reload.",
        "not_banned": "{who} is not banned.",
        "unbanned": "{who} may draw again.",
    }[outcome.result]
    before, _, after = sentence.partition("{who}")
    return m.escape(before) + (name if _ else "") + m.escape(after)


def job_cancel(m: Markup, outcome: str, job_id: str) -> str:
    """An admin's cancel of anyone's job (bot.core.admin.CancelOutcome)."""
    return m.escape({"not_admin": "Only the bot's admins can cancel other people's pictures.",
                     "cancelled": f"Cancelled {job_id}."}.get(outcome, f"{job_id} is not waiting or drawing."))


NOT_IN_DMS = "I only draw in servers, not in direct messages."
NOT_IN_THIS_SERVER = "This bot is not enabled in this server."
NOT_IN_THIS_CHANNEL = "I only draw in the channels the server's owner picked for me - try another channel."
ADMINS_ONLY = "Only the bot's admins can use this."
SOMETHING_WENT_WRONG = "Sorry, something went wrong with that command. Please try again."
QUEUE_SHOWN = 20
"""Jobs the admin's queue listing shows; the rest are counted."""


def admin_queue(m: Markup, jobs: list[JobRecord], now: float, *, who: Callable[[str, str], str]) -> str:
    """Every job waiting or being drawn, for an admin. `who(platform, user_id)`: the user in the platform's markup."""
    if not jobs:
        return m.escape("Nothing is waiting or being drawn.")
    lines = [m.bold(f"{len(jobs)} picture{'s' if len(jobs) != 1 else ''} waiting or being drawn:")]
    for n, r in enumerate(jobs[:QUEUE_SHOWN], start=1):
        lines.append(m.escape(f"{n}. {_STATUS_ICONS[r.status]} ") + who(r.platform, r.user_id)
                     + m.escape(f" · {r.steps} steps · {r.width}×{r.height} · "
                                f"{relative_time(r.created_at, now)} · “{short(r.prompt, 60)}”"))
    if len(jobs) > QUEUE_SHOWN:
        lines.append(m.escape(f"… and {len(jobs) - QUEUE_SHOWN} more."))
    return "\n".join(lines)


# -- the web page and the owner dashboard (bot/adapters/web/) -----------------------------------------------------------

QUEUED = "Queued."
"""The page's status while a picture waits before the core said more."""
WEB_NO_PICTURES = "You have no pictures yet: describe one above and press Draw."
WEB_SESSION_EXPIRED = "Your session has expired; reload the page."
WEB_LOGIN_PAGE = "Log in with your name and the page's password."
WEB_LOGIN_ADMIN = "The owner dashboard needs the admin password."
WEB_WRONG_PASSWORD = "Wrong password."
WEB_BAD_NAME = "Names are 1-32 letters, digits, dots, dashes or underscores."
WEB_LOG_IN_FIRST = "Log in first."
WEB_ADMINS_ONLY = "Admins only."
WEB_DASHBOARD_OFF = "The owner dashboard is off: set DRAWBOT_WEB_ADMIN_PASSWORD or [web].admin_password_file."
WEB_CROSS_SITE = "Cross-site request refused."
WEB_NOT_FOUND = "Not found."
WEB_NO_SUCH_PICTURE = "No such picture."
DASHBOARD_ADMINS_ONLY = "The dashboard is for admins: log in with the admin password."
DASHBOARD_NO_PICTURES = "No pictures yet."
DASHBOARD_QUEUE_EMPTY = "(the queue is empty)"
DASHBOARD_WHICH_JOB = "Paste a job id from the queue table."
DASHBOARD_WHICH_USER = "Write the user as platform:id, as in the users table (e.g. telegram:12345)."


def web_picture_ready(caption: str) -> str:
    """A note on the page for a picture finished while no page followed it (picked up after a restart)."""
    return f"Your picture “{caption.splitlines()[0][:80] if caption else ''}” is ready (see My pictures)."


@dataclass(frozen=True)
class EngineState:
    """What the owner dashboard shows of the engine (bot/adapters/web/dashboard.py gathers it)."""

    model: str
    test_model: bool
    mode: str
    device: str
    torch_compile: str
    running_job: str | None
    waiting: str
    seconds_per_step: float | None
    peak_vram_bytes: float | None
    bot_rss_bytes: float
    host_available_bytes: float
    host_total_bytes: float


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def dashboard_engine(state: EngineState) -> list[tuple[str, str]]:
    return [
        ("Model", state.model + (" (tiny test model)" if state.test_model else "")),
        ("Mode", state.mode),
        ("Device", state.device),
        ("torch.compile (setting)", state.torch_compile),
        ("Drawing now", state.running_job or "nothing"),
        ("Waiting in the engine", state.waiting),
        ("Last s/step", f"{state.seconds_per_step:.3f} s" if state.seconds_per_step else "-"),
        ("Peak VRAM of the last job", gib(state.peak_vram_bytes) if state.peak_vram_bytes else "- (CPU, or no job yet)"),
        ("Host RAM of the bot", f"{gib(state.bot_rss_bytes)} (machine: {gib(state.host_available_bytes)} free of "
                                f"{gib(state.host_total_bytes)})"),
    ]


def dashboard_limits(limits: LimitSettings, *, min_steps: int, max_steps: int) -> list[tuple[str, str]]:
    return [
        ("Cooldown", f"{limits.cooldown_seconds:g} s"),
        ("Per hour / per day", f"{limits.per_hour or 'no limit'} / {limits.per_day or 'no limit'}"),
        ("Waiting or drawing per user", str(limits.max_active_per_user)),
        ("Queue cap (everyone)", str(limits.queue_cap)),
        ("Prompt", f"{limits.max_prompt_chars} characters, {limits.max_prompt_tokens} tokens"),
        ("Steps", f"{min_steps}..{max_steps}"),
        ("Admins (config)", ", ".join(limits.admins) or "-"),
        ("Banned (config)", ", ".join(limits.banned) or "-"),
    ]


def relative_time(then: float, now: float | None = None) -> str:
    now = time.time() if now is None else now
    return duration(now - then) + " ago"

steps_ = steps  # for functions whose parameter is called `steps`

TEST_MODEL_NOTICE = "drawn by the built-in tiny test model: its pictures are random noise."
