"""Building the engine, for `drawbot run` and `drawbot draw` alike (bot/cli.py stays the one composition root; this
is the engine's part of it).

    settings, missing = choose_model(config.engine, explicit=bool(args.model))   # the tiny fallback
    engine = await start_engine(config, settings, say=say)                       # loaded here, or the cluster's

`choose_model` falls back to the built-in tiny model (pictures are noise, a small default size) when the MajicFLUX
files are not ready and nobody asked for a model; the caller decides whether that is acceptable (the bot with chat
tokens refuses: real users must not get noise) and words it for its owner. `start_engine` loads the local engine, or
with `[cluster].enabled` opens the remote engine that publishes jobs to the workers; a condition the owner can meet
is an `EngineSetupError` with one line to print and an exit code, never a traceback. Torch is imported only here,
when an engine is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.config import Config
from engine.settings import EngineSettings

if TYPE_CHECKING:
    from bot.cluster.remote import RemoteEngine
    from engine.worker import Engine

log = logging.getLogger(__name__)

TINY_FALLBACK = {"model": "tiny", "mode": "resident"}
"""What "no weights" falls back to. The tiny model is 1.4 MB: keeping it resident is fastest on a CPU or a GPU
(streaming only pays off for weights that do not fit)."""
TINY_FALLBACK_SIDE = 256
"""The fallback's largest default side: noise needs no detail, and a small picture keeps the demo quick on a CPU."""


class EngineSetupError(Exception):
    """The engine cannot start, for a reason the owner can fix: `str(error)` says what and how; `exit_code` is 2
    for a set-up (config) error, 1 when the model could not be loaded."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class ModelChoice:
    settings: EngineSettings
    """The settings to load: the configured ones, or the tiny fallback."""
    missing: list[str]
    """What is not ready of the MajicFLUX files (one line each, with its fix) when it fell back; else empty."""

    @property
    def fell_back(self) -> bool:
        return bool(self.missing)


def choose_model(settings: EngineSettings, *, explicit: bool) -> ModelChoice:
    """The configured model, or the tiny one when the MajicFLUX files are not ready and no model was asked for
    (`explicit`: `--model` on the command line)."""
    if settings.model != "majicflus" or explicit:
        return ModelChoice(settings, [])
    from engine import weights

    missing = weights.check(weights.real_model_files(settings.models_dir), fix="drawbot download")
    if not missing:
        return ModelChoice(settings, [])
    tiny = settings.model_copy(update={**TINY_FALLBACK, "width": min(settings.width, TINY_FALLBACK_SIDE),
                                       "height": min(settings.height, TINY_FALLBACK_SIDE)})
    return ModelChoice(tiny, missing)


async def start_engine(config: Config, settings: EngineSettings, *, say: Callable[[str], object],
                       cluster: bool = True) -> Engine | RemoteEngine:
    """A started engine for `settings`: the cluster's remote engine when `cluster` and `[cluster].enabled` (jobs go
    to the workers through Redis), else the local one, loaded here. Raises EngineSetupError."""
    if cluster and config.cluster.enabled:
        return await _open_cluster(config.model_copy(update={"engine": settings}), say)
    return await _load_local(settings, say)


async def _open_cluster(config: Config, say: Callable[[str], object]) -> RemoteEngine:
    from bot.cluster.remote import ClusterSetupError, open_cluster_engine

    say("[cluster]: publishing jobs to the drawing workers through Redis"
        + (" (and drawing here too)" if config.cluster.local_worker else ""))
    try:
        return await open_cluster_engine(config)
    except ClusterSetupError as exc:
        raise EngineSetupError(f"config error: {exc}", exit_code=2) from None


async def _load_local(settings: EngineSettings, say: Callable[[str], object]) -> Engine:
    from engine.pipeline import DeviceUnavailable, FluxPipeline
    from engine.weights import WeightsError
    from engine.worker import Engine

    engine = Engine(lambda: FluxPipeline.load(settings), max_queue=settings.max_queue)
    say(f"loading the {settings.model} model ({settings.mode} mode, device {settings.device})…")
    try:
        await engine.start()
    except WeightsError as exc:
        raise EngineSetupError(str(exc)) from None
    except DeviceUnavailable as exc:
        await engine.close(timeout=0)
        raise EngineSetupError(f"config error: {exc}", exit_code=2) from None
    except Exception as exc:  # no CUDA, out of memory while loading, ...: say it plainly, point at the doctor
        await engine.close(timeout=0)
        raise EngineSetupError(f"cannot load the model: {type(exc).__name__}: {exc}\n"
                               "  `drawbot doctor` checks what the bot needs.") from None
    startup = engine.startup_line()
    if startup:
        say(f"model {startup}")
    return engine
