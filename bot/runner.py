"""`drawbot run`: build the engine, the store, the core and the chat adapters; run until stopped; stop gracefully.

SIGTERM / SIGINT: stop accepting, tell users with waiting jobs that theirs is kept, let the running job finish within
the stop timeout (else it is retried at the next start), persist everything, exit 0. SIGHUP: re-read the config parts
that can change live (limits, allowlists, blocked words).

Worst case from SIGTERM to exit: stop timeout + ENGINE_GRACE (a job stops only at a step boundary) + DRAIN_TIMEOUT
(deliveries in flight). The systemd unit's TimeoutStopSec is larger than that sum.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from bot import replies
from bot.adapters.web.access import WebAccess
from bot.chat import PlainMarkup, ServedPlatform, TokenRefused
from bot.config import Config, ConfigError, load_config, read_token
from bot.core import ChatCore
from bot.engine_setup import EngineSetupError, choose_model, start_engine
from bot.diskspace import SPACE_MARGIN
from bot.metrics import Metrics, MetricsServer, serve
from bot.statelock import StateDirBusy, StateDirUnusable, StateLock
from bot.store import Store, StoreError, remove_all_temporaries

if TYPE_CHECKING:
    from bot.adapters.console import ConsolePlatform

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 300.0  # seconds between delivery retries / retention sweeps
STOP_TIMEOUT = 60.0  # seconds a running picture may take to finish on SIGTERM (the unit's TimeoutStopSec is larger)
ENGINE_GRACE = 30.0  # engine.worker.Engine.close waits this long past the timeout for the job to reach a step boundary
DRAIN_TIMEOUT = 15.0  # seconds for deliveries still in flight at stop; an undelivered picture is sent at the next start


def say(text: str) -> None:
    print(f"drawbot: {text}", file=sys.stderr, flush=True)


def choose_platforms(config: Config) -> tuple[str | None, str | None, bool]:
    """(telegram token, discord token, console on). Tokens are read here and never logged."""
    telegram = read_token("telegram", config.telegram.token_file) if config.telegram.enabled is not False else None
    discord = read_token("discord", config.discord.token_file) if config.discord.enabled is not False else None
    if config.telegram.enabled and not telegram:
        raise ConfigError("[telegram].enabled = true but no token: set DRAWBOT_TELEGRAM_TOKEN or [telegram].token_file")
    if config.discord.enabled and not discord:
        raise ConfigError("[discord].enabled = true but no token: set DRAWBOT_DISCORD_TOKEN or [discord].token_file")
    console = config.console.enabled if config.console.enabled is not None else not (telegram or discord)
    return telegram, discord, console


def choose_web(config: Config, console_on: bool, stdin: TextIO) -> tuple[WebAccess | None, bool]:
    """(who may reach the page, or None when it is off; whether it only accompanies the console).

    Unset `[web].enabled` = on alongside an interactive console (`make run` in a terminal), ending with it. Raises
    ConfigError for a non-loopback address without a password, before anything loads."""
    enabled = config.web.enabled
    if enabled is None:
        try:
            interactive = console_on and stdin.isatty()
        except (AttributeError, OSError, ValueError):
            interactive = False
        if not interactive:
            return None, False
    elif not enabled:
        return None, False
    return WebAccess.from_settings(config.web), enabled is None


def token_counter(tokenizer_dir: Path):
    """Counts T5 tokens the way the pipeline will (tokenizers only: the chat side stays free of torch)."""
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    except Exception:
        return None
    return lambda text: len(tokenizer.encode(text).ids)


class InterruptibleLines:
    """A line source for the console that a stop can interrupt.

    The console adapter calls `readline()` in an executor thread. A thread blocked reading a real stdin (a terminal, a
    pipe nobody closes) would keep the process alive after SIGTERM, since asyncio and the interpreter both wait for
    executor threads. Here a daemon thread reads the stream (raw fd reads: no buffer lock held at interpreter exit)
    and `readline()` takes lines from a queue, which `close()` ends at once with end-of-input.
    """

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._lines: queue.Queue[str] = queue.Queue()
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.StringIO and friends: plain readline, nothing blocks
            fd = None
        target = self._pump_fd if fd is not None else self._pump_readline
        threading.Thread(target=target, args=(fd,) if fd is not None else (), name="drawbot-stdin",
                         daemon=True).start()

    def _pump_fd(self, fd: int) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._lines.put(line.decode("utf-8", errors="replace") + "\n")
        if pending:
            self._lines.put(pending.decode("utf-8", errors="replace"))
        self._lines.put("")

    def _pump_readline(self) -> None:
        for line in iter(self._stream.readline, ""):
            self._lines.put(line)
        self._lines.put("")

    def readline(self) -> str:
        line = self._lines.get()
        if not line:
            self._lines.put("")  # stay at end of input for every later read
        return line

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (AttributeError, OSError, ValueError):
            return False

    def close(self) -> None:
        """End of input now, whatever the stream does."""
        self._lines.put("")


async def run(config: Config, *, model_override: str | None = None, config_path: Path | None = None,
              stdin: TextIO | None = None, stdout: TextIO | None = None, stop_timeout: float = STOP_TIMEOUT,
              stop: asyncio.Event | None = None, metrics: Metrics | None = None) -> int:
    """Run the bot until SIGTERM/SIGINT, `stop` being set, or every platform ending (the console at end of input).

    Returns the exit code: 0 after a clean stop, 1 when the bot cannot start or a platform crashed, 2 on bad config.
    """
    try:
        _, _, console_on = choose_platforms(config)
        choose_web(config, console_on, stdin if stdin is not None else sys.stdin)  # a bad [web] exits 2 here
    except ConfigError as exc:
        say(f"config error: {exc}")
        return 2
    # Exactly one process owns a state dir (a second one would redraw the first one's running job).
    lock = StateLock(config.storage.state_dir)
    try:
        lock.acquire()
    except (StateDirBusy, StateDirUnusable) as exc:
        say(str(exc))
        return 2
    try:
        return await _run_owning_state_dir(config, model_override=model_override, config_path=config_path,
                                           stdin=stdin, stdout=stdout, stop_timeout=stop_timeout, stop=stop,
                                           metrics=metrics)
    finally:
        lock.release()


async def _run_owning_state_dir(config: Config, *, model_override: str | None, config_path: Path | None,
                                stdin: TextIO | None, stdout: TextIO | None, stop_timeout: float,
                                stop: asyncio.Event | None, metrics: Metrics | None) -> int:
    from engine import weights

    telegram_token, discord_token, console_on = choose_platforms(config)
    if console_on and not (telegram_token or discord_token) and config.logging.level == "INFO" and \
            _is_terminal(stdin if stdin is not None else sys.stdin):
        # A person is chatting in this terminal: INFO lines (start-up ones included) would interleave with the
        # conversation. Set before loading, so none come first.
        logging.getLogger().setLevel(logging.WARNING)
    web_access, web_companion = choose_web(config, console_on, stdin if stdin is not None else sys.stdin)
    settings = config.engine.model_copy(update={"model": model_override}) if model_override else config.engine
    remote_only = config.cluster.enabled and not config.cluster.local_worker  # workers elsewhere hold the weights
    choice = choose_model(settings, explicit=bool(model_override) or remote_only)
    if choice.fell_back and (telegram_token or discord_token):
        say("model files are not ready, so the bot cannot serve real users:\n  - " + "\n  - ".join(choice.missing))
        return 1
    if choice.fell_back:
        say(f"no MajicFLUX weights under {settings.models_dir}/ and no chat tokens: starting the local console "
            "chat with the built-in tiny test model, whose pictures are noise. Run `drawbot download` for the "
            "real model and set DRAWBOT_TELEGRAM_TOKEN / DRAWBOT_DISCORD_TOKEN to go online.")
    settings = choice.settings
    config = config.model_copy(update={"engine": settings})

    storage = config.storage
    try:
        store = await Store.open(storage.database_path, storage.images_dir)
    except StoreError as exc:
        say(str(exc))
        return 2
    swept = remove_all_temporaries(storage.images_dir)  # we own the state dir: nobody else is mid-write
    if swept:
        log.info("removed %d half-written picture(s) left by an earlier stop", swept)
    try:
        engine = await start_engine(config, settings, say=say)
    except EngineSetupError as exc:
        say(str(exc))
        await store.close()
        return exc.exit_code
    if config.cluster.enabled:
        tokenizer_dir = weights.real_model_files(settings.models_dir).tokenizer_2
    else:
        from engine.pipeline import locate_model

        tokenizer_dir = locate_model(settings)[0].tokenizer_2
    metrics = metrics if metrics is not None else Metrics()
    metrics.track_queue(lambda: engine.queue_length)
    core = ChatCore(config, store, engine, is_test_model=engine.info.is_test_model,
                    count_tokens=token_counter(tokenizer_dir), metrics=metrics)
    free = core.disk.free()
    if store.exclusive or (free is not None and free < SPACE_MARGIN):
        say(f"warning: the disk holding {storage.state_dir} is full ({0 if free is None else free // 1024} KiB "
            "free): the bot starts, but draws nothing and takes no new pictures until there is room; accepted "
            "pictures are kept and drawn then")
        core.disk_full("at start", told=True)

    platforms: list[ServedPlatform] = []
    console_input: InterruptibleLines | None = None
    console: ConsolePlatform | None = None
    if console_on:
        from bot.adapters.console import ConsolePlatform

        source = stdin if stdin is not None else sys.stdin
        console_input = InterruptibleLines(source)
        console = ConsolePlatform(core, user=config.console.user, stdin=console_input, stdout=stdout)
        platforms.append(console)
    if telegram_token:
        from bot.adapters.telegram import TelegramPlatform

        platforms.append(TelegramPlatform(core, config.telegram, telegram_token))
    if discord_token:
        from bot.adapters.discord import DiscordPlatform

        platforms.append(DiscordPlatform(core, config.discord, discord_token))
    if web_access is not None:
        from bot.adapters.web.server import WebPlatform

        platforms.append(WebPlatform(core, web_access, config.storage.state_dir, companion=web_companion, say=say))
    for platform in platforms:
        core.add_platform(platform)

    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()


    told: set[str] = set()  # platforms whose people already heard what the stop means

    def on_stop_signal(sig: signal.Signals) -> None:
        if stop.is_set():  # pressed again while the picture is being finished: stop it now, it stays queued
            log.info("%s received again: stopping the running picture now", sig.name)
            engine.stop_now()
            return
        log.info("%s received: stopping", sig.name)
        if console is not None and sig is signal.SIGINT:
            console.say(replies.console_stopping(PlainMarkup()))
            told.add(console.name)  # the person quitting: not also "the bot is restarting" for a waiting picture
        stop.set()

    def reload() -> None:
        if config_path is None:
            log.warning("SIGHUP received, but the bot was started without a config file: nothing to reload")
            return
        try:
            core.reload(load_config(config_path))
        except ConfigError as exc:
            log.error("config reload refused, keeping the old one: %s", exc)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        return await _serve(config, core, engine, store, platforms, stop, stop_timeout=stop_timeout,
                            metrics=metrics, console_input=console_input, told=told)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


async def _housekeeping(core: ChatCore) -> None:
    """Retry given-up deliveries and apply picture retention, at start and then every few minutes."""
    while True:
        try:
            await core.housekeeping()
        except Exception:
            log.exception("housekeeping failed; trying again later")
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)


async def _serve(config: Config, core: ChatCore, engine, store: Store, platforms: list[ServedPlatform], stop: asyncio.Event, *,
                 stop_timeout: float, metrics: Metrics, console_input: InterruptibleLines | None,
                 told: set[str] | None = None) -> int:
    """From recovery to a stopped, fully persisted bot."""
    metrics_server: MetricsServer | None = None
    if config.metrics.enabled:
        try:
            metrics_server = serve(metrics, config.metrics.host, config.metrics.port)
            log.info("metrics on http://%s:%d/metrics", config.metrics.host, metrics_server.port)
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%d (%s); running without them", config.metrics.host,
                      config.metrics.port, exc.strerror or exc)

    tasks: list[asyncio.Task] = []
    housekeeper: asyncio.Task | None = None
    stopper = asyncio.create_task(stop.wait())
    exit_code = 0
    try:
        recovered = await core.recover()
        if recovered:
            log.info("picked up %d job(s) from before the restart", recovered)
        say("ready: " + ", ".join(p.name for p in platforms))
        housekeeper = asyncio.create_task(_housekeeping(core), name="housekeeping")
        tasks = [asyncio.create_task(p.run(), name=f"platform-{p.name}") for p in platforms]
        pending = set(tasks)
        # A companion platform (the web page next to `make run`'s console) does not keep the bot alive alone.
        primary = {t for t, p in zip(tasks, platforms) if getattr(p, "outlives_others", True)} or set(tasks)
        # Run until a signal, or until every platform has ended (the console at end of input), or one crashes.
        while pending & primary and not stop.is_set():
            done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(stopper)
            for task in done - {stopper}:
                if not task.cancelled() and isinstance(task.exception(), TokenRefused):
                    say(str(task.exception()))  # the owner's to fix: one line, no traceback
                    exit_code = 2
                    stop.set()
                elif not task.cancelled() and task.exception() is not None:
                    log.error("%s stopped with an error", task.get_name(), exc_info=task.exception())
                    exit_code = 1
                    stop.set()
    except Exception:  # whatever broke, still stop cleanly below: the queue must be left consistent
        log.exception("the bot failed; stopping")
        exit_code = 1

    log.info("stopping: no new jobs; the running one may finish within %.0f s", stop_timeout)
    if housekeeper is not None:
        housekeeper.cancel()
    await core.stop_accepting(told=told or set())
    if console_input is not None:
        console_input.close()
    # Queued jobs stay queued in the store; the running one finishes, or is stopped and retried at the next start.
    # Platforms stay connected meanwhile, so a picture that finishes in the stop window is still delivered.
    await engine.close(timeout=stop_timeout)
    try:
        await asyncio.wait_for(core.drain(), timeout=DRAIN_TIMEOUT)
    except asyncio.TimeoutError:
        log.warning("some pictures were not delivered before the stop; they are sent at the next start")
    for platform in platforms:
        try:
            await platform.stop()
        except Exception:
            log.exception("stopping %s failed", platform.name)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    stopper.cancel()
    unsaved = await core.save_kept()
    if unsaved:
        log.error("%d change(s) to jobs could not be saved for lack of room; the next start finds those jobs as they "
                  "were saved before (a picture being drawn then is drawn again)", unsaved)
    await store.close()
    if metrics_server is not None:
        metrics_server.close()
    say("stopped")
    return exit_code
