"""`drawbot run`: build the engine, the store, the core and the chat adapters; run until stopped; stop gracefully.

SIGTERM / SIGINT: stop accepting, tell users with waiting jobs that theirs is kept, let the running job finish within
the stop timeout (else it is retried at the next start), persist everything, exit 0. SIGHUP: re-read the config parts
that can change live (limits, allowlists, blocked words).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

from bot.config import Config, ConfigError, load_config, read_token
from bot.core import ChatCore
from bot.store import Store

log = logging.getLogger(__name__)

STOP_TIMEOUT = 60.0  # seconds a running picture may take to finish on SIGTERM (the unit's TimeoutStopSec is larger)


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


def token_counter(tokenizer_dir: Path):
    """Counts T5 tokens the way the pipeline will (tokenizers only: the chat side stays free of torch)."""
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    except Exception:
        return None
    return lambda text: len(tokenizer.encode(text).ids)


async def run(config: Config, *, model_override: str | None = None, config_path: Path | None = None,
              stdin=None, stdout=None) -> int:
    from engine import weights

    try:
        telegram_token, discord_token, console_on = choose_platforms(config)
    except ConfigError as exc:
        say(f"config error: {exc}")
        return 2
    settings = config.engine.model_copy(update={"model": model_override}) if model_override else config.engine
    if settings.model == "majicflus" and not model_override:
        problems = weights.check(weights.real_model_files(settings.models_dir), fix="drawbot download")
        if problems and (telegram_token or discord_token):
            say("model files are not ready, so the bot cannot serve real users:\n  - " + "\n  - ".join(problems))
            return 1
        if problems:
            say(f"no MajicFLUX weights under {settings.models_dir}/ and no chat tokens: starting the local console "
                "chat with the built-in tiny test model, whose pictures are noise. Run `drawbot download` for the "
                "real model and set DRAWBOT_TELEGRAM_TOKEN / DRAWBOT_DISCORD_TOKEN to go online.")
            # Noise needs no detail: a small default size keeps the demo quick on a CPU.
            settings = settings.model_copy(update={"model": "tiny", "width": min(settings.width, 256),
                                                   "height": min(settings.height, 256)})
    config = config.model_copy(update={"engine": settings})

    from engine.pipeline import FluxPipeline, locate_model
    from engine.worker import Engine

    storage = config.storage
    store = await Store.open(storage.database_path, storage.images_dir)
    engine = Engine(lambda: FluxPipeline.load(settings), max_queue=settings.max_queue)
    say(f"loading the {settings.model} model ({settings.mode} mode, device {settings.device})…")
    try:
        await engine.start()
    except weights.WeightsError as exc:
        say(str(exc))
        await store.close()
        return 1
    files, _ = locate_model(settings)
    core = ChatCore(config, store, engine, is_test_model=engine.info.is_test_model,
                    count_tokens=token_counter(files.tokenizer_2))

    platforms = []
    if console_on:
        from bot.adapters.console import ConsolePlatform

        platforms.append(ConsolePlatform(core, user=config.console.user, stdin=stdin, stdout=stdout))
    if telegram_token:
        from bot.adapters.telegram import TelegramPlatform

        platforms.append(TelegramPlatform(core, config.telegram, telegram_token))
    if discord_token:
        from bot.adapters.discord import DiscordPlatform

        platforms.append(DiscordPlatform(core, config.discord, discord_token))
    for platform in platforms:
        core.add_platform(platform)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        try:
            core.reload(load_config(config_path))
        except ConfigError as exc:
            log.error("config reload refused, keeping the old one: %s", exc)

    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)

    recovered = await core.recover()
    if recovered:
        log.info("picked up %d job(s) from before the restart", recovered)
    say("ready: " + ", ".join(p.name for p in platforms))

    tasks = [asyncio.create_task(p.run(), name=f"platform-{p.name}") for p in platforms]
    stopper = asyncio.create_task(stop.wait())
    exit_code = 0
    pending = set(tasks)
    # Run until a signal, or until every platform has ended (the console at end of input), or one crashes.
    while pending and not stop.is_set():
        done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
        pending.discard(stopper)
        for task in done - {stopper}:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s stopped with an error", task.get_name(), exc_info=task.exception())
                exit_code = 1
                stop.set()

    log.info("stopping: no new jobs; the running one may finish within %.0f s", STOP_TIMEOUT)
    await core.stop_accepting()
    for platform in platforms:
        stop_platform = getattr(platform, "stop", None)
        if stop_platform is not None:
            await stop_platform()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await engine.close(timeout=STOP_TIMEOUT)
    await asyncio.wait_for(core.drain(), timeout=30)
    await store.close()
    stopper.cancel()
    say("stopped")
    return exit_code
