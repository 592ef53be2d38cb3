"""What goes into the engine and what comes out: plain data, no torch, so the chat side can import it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Callable, Literal, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    seed: int
    steps: int
    width: int = 1024
    height: int = 1024


@dataclass(frozen=True)
class GenerationResult:
    request: GenerationRequest
    png: bytes
    """Lossless PNG with the parameters in an AUTOMATIC1111-style `parameters` text chunk."""
    seconds: float
    seconds_per_step: float
    peak_vram_bytes: int | None
    model_name: str
    test_model: bool = False
    """Drawn by the built-in tiny test model (noise): the chat side tells the user so (bot/replies.py words it)."""


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
"""The values of `JobState`, as the store keeps them."""

EventKind = Literal["queued", "started", "progress", "done", "failed", "cancelled", "kept"]
"""`kept`: never sent by an engine; the chat core tells a job not yet handed to the engine that a stop keeps it queued."""
"""queued (position changed; 1 = next), started, progress (step/total/eta), then one of done, failed, cancelled."""


@dataclass(frozen=True)
class JobEvent:
    """Sent to a job's listener on the event loop thread."""

    job_id: str
    kind: EventKind
    position: int = 0
    step: int = 0
    total: int = 0
    elapsed: float = 0.0
    eta: float | None = None
    error: Failure | None = None
    """Why a `failed` job failed."""


class JobHandle(Protocol):
    """What submitting a request returns (engine.worker.Job, or a job run by another placement of the engine)."""

    @property
    def id(self) -> str: ...

    @property
    def state(self) -> JobState: ...

    @property
    def position(self) -> int:
        """0 while running or finished; 1 = next in line."""

    def cancel(self) -> bool:
        """Cancel the job; True if it was still queued or running."""

    async def wait(self) -> GenerationResult:
        """The result; raises JobFailed or JobCancelled."""


class Failure(StrEnum):
    """Why a job failed, as data: the chat side words it for its user (bot.replies.failed); the store and the cluster
    keep and pass on the value. The engine writes no chat sentences."""

    OUT_OF_MEMORY = "out_of_memory"
    """The device ran out of memory while drawing it (the engine freed memory and goes on)."""
    CRASHED = "crashed"
    """Any other error while drawing it (the owner's log has the traceback)."""
    REFUSED = "refused"
    """The engine can never draw it (RequestRefusal): accepted earlier, under another config or device."""
    ENGINE_CLOSED = "engine_closed"
    """The engine was shutting down when the job was handed to it."""
    QUEUE_FULL = "queue_full"
    """The engine's own queue was full when the job was handed to it."""
    RESTARTED = "restarted"
    """The bot stopped unexpectedly twice while drawing it, so it gave up (bot.store)."""
    UNREACHABLE = "unreachable"
    """The job could not be handed to the drawing machines (bot.cluster)."""
    PICTURE_LOST = "picture_lost"
    """Drawn, but its file was gone before it could be delivered (bot.core.delivery)."""

    @classmethod
    def parse(cls, text: str | None) -> Failure:
        """A value as stored or sent; anything else (an older bot's or worker's prose) counts as CRASHED."""
        try:
            return cls(text or "")
        except ValueError:
            return cls.CRASHED


_FAILURE_LOG_TEXT = {
    Failure.OUT_OF_MEMORY: "the device ran out of memory while drawing; try a smaller size or again in a moment",
    Failure.CRASHED: "generation failed",
    Failure.REFUSED: "this engine cannot draw that request",
    Failure.ENGINE_CLOSED: "the engine is shutting down",
    Failure.QUEUE_FULL: "the engine's queue is full",
    Failure.RESTARTED: "the bot stopped twice while drawing it",
    Failure.UNREACHABLE: "the job could not be handed to the drawing machines",
    Failure.PICTURE_LOST: "the picture file was lost before it was delivered",
}


class EngineError(Exception):
    """Base of the engine's own errors. `failure` says why, as data (bot.replies words it for a chat user);
    `str(exc)` is one plain line for the owner's log and `drawbot draw`."""

    failure = Failure.CRASHED


class JobFailed(EngineError):
    """The generation failed (out of GPU memory, a broken model file, ...)."""

    def __init__(self, failure: Failure, detail: str = ""):
        super().__init__(_FAILURE_LOG_TEXT[failure] + (f" ({detail})" if detail else ""))
        self.failure = failure
        self.detail = detail
        """For the log: the error behind it (its type, the device's message)."""


class JobCancelled(EngineError):
    """The job was cancelled before or while it ran."""


class EngineClosed(EngineError):
    """The engine is shutting down and accepts no new jobs."""

    failure = Failure.ENGINE_CLOSED

    def __init__(self) -> None:
        super().__init__(_FAILURE_LOG_TEXT[Failure.ENGINE_CLOSED])


class QueueFull(EngineError):
    """More jobs are waiting than the engine accepts."""

    failure = Failure.QUEUE_FULL

    def __init__(self, max_queue: int):
        super().__init__(f"{_FAILURE_LOG_TEXT[Failure.QUEUE_FULL]} ({max_queue} waiting)")
        self.max_queue = max_queue


@dataclass(frozen=True)
class RequestRefusal:
    """Why this engine can never draw a request, whatever else is waiting (see Engine.check): known before the job
    is accepted, so the chat side refuses it up front instead of promising a picture that then fails.

    reason: "too_large" (its working memory does not fit this device; `largest` is the largest size of about the same
    shape that does), "bad_size" (a side that is not a positive multiple of 16) or "bad_steps" (fewer than 1).
    """

    reason: Literal["too_large", "bad_size", "bad_steps"]
    message: str
    """The same in plain words, for logs and the command line (bot.replies words the chat's line from the data)."""
    device: str = ""
    largest: tuple[int, int] | None = None
    largest_pixels: int | None = None
    width: int = 0
    height: int = 0
    steps: int = 0
    """The refused request's size and steps."""


class RequestRefused(EngineError):
    """Engine.submit was given a request that Engine.check refuses; `refusal` says why."""

    failure = Failure.REFUSED

    def __init__(self, refusal: RequestRefusal):
        super().__init__(refusal.message)
        self.refusal = refusal


Listener = Callable[[JobEvent], None]


class _JobQueue(Protocol):
    """What a job asks of the engine that holds it (engine.worker.Engine, bot.cluster.remote.RemoteEngine)."""

    # `Any`: each engine takes its own job subclass.
    def _position(self, job: Any) -> int: ...

    def _cancel(self, job: Any) -> bool: ...


class EngineJob:
    """One request's life in an engine, local or remote: its state, its listener and the future `wait()` returns.

    The engine decides positions and cancelling; this class only reports them and finishes once.
    """

    def __init__(self, engine: _JobQueue, job_id: str, request: GenerationRequest, listener: Listener | None):
        self.id = job_id
        self.request = request
        self.state = JobState.QUEUED
        self.error: Failure | None = None
        self._engine = engine
        self._listener = listener
        self._future: asyncio.Future[GenerationResult] = asyncio.get_running_loop().create_future()
        # Nobody need await a job (fire-and-forget submit): never warn "exception was never retrieved".
        self._future.add_done_callback(lambda f: f.cancelled() or f.exception())

    @property
    def position(self) -> int:
        """0 while running or finished; 1 = next in line."""
        return self._engine._position(self)

    def cancel(self) -> bool:
        """Cancel this job. True if it was still queued or running."""
        return self._engine._cancel(self)

    async def wait(self) -> GenerationResult:
        return await asyncio.shield(self._future)

    def done(self) -> bool:
        return self._future.done()

    def _emit(self, event: JobEvent) -> None:
        if self._listener is None:
            return
        try:
            self._listener(event)
        except Exception:  # a broken listener must not take the engine down
            log.exception("job listener failed job=%s event=%s", self.id, event.kind)

    def _finish(self, state: JobState, result: GenerationResult | None = None, error: Failure | None = None,
                detail: str = "") -> None:
        if self._future.done():
            return
        self.state = state
        self.error = error
        if state is JobState.DONE:
            self._future.set_result(result)  # type: ignore[arg-type]  # DONE always comes with its result
            self._emit(JobEvent(self.id, "done"))
        elif state is JobState.CANCELLED:
            self._future.set_exception(JobCancelled("cancelled"))
            self._emit(JobEvent(self.id, "cancelled"))
        else:
            self._future.set_exception(JobFailed(error or Failure.CRASHED, detail))
            self._emit(JobEvent(self.id, "failed", error=error))


@dataclass
class EngineInfo:
    model_name: str
    device: str
    is_test_model: bool
    queue_length: int = 0
    running_job: str | None = None
    largest_pixels: int | None = None
    """The largest width*height this device can afford (engine.size_cost); None = no limit known."""
