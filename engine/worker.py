"""The async single-GPU engine: one job at a time on the GPU, in a one-thread executor, so the event loop never blocks.

    engine = Engine(lambda: FluxPipeline.load(settings))
    await engine.start()                        # loads the models once, in the executor
    job = engine.submit(request, listener)      # returns at once; job.position is live
    result = await job.wait()                   # GenerationResult, or raises JobFailed / JobCancelled
    await engine.close()

Listeners get JobEvents on the loop thread (progress is forwarded with call_soon_threadsafe). A queued job can be
cancelled at once; a running one stops at its next step. An out-of-memory error fails only that job.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import threading
import time
import uuid
from typing import Callable, Protocol

from engine.jobs import (
    EngineClosed,
    EngineInfo,
    EngineJob,
    Failure,
    GenerationRequest,
    GenerationResult,
    JobCancelled,
    JobEvent,
    JobFailed,
    JobState,
    Listener,
    QueueFull,
    RequestRefusal,
    RequestRefused,
)
from engine.size_cost import SizeCost, largest_like

log = logging.getLogger(__name__)


class StepCallback(Protocol):
    def __call__(self, step: int, total: int) -> None: ...


class Pipeline(Protocol):
    """What the worker needs from engine.pipeline.FluxPipeline (the tests use the real one)."""

    model_name: str
    device: str
    is_test_model: bool

    def generate(self, request: GenerationRequest, on_step: StepCallback) -> GenerationResult: ...

    def recover_from_oom(self) -> None: ...

    # Optional: `size_cost: SizeCost | None`, what a size costs on the pipeline's device (read with getattr).


class _StopRequested(Exception):
    """Raised inside the executor at a step boundary when a running job was cancelled."""


class Job(EngineJob):
    """One request's life in the engine. Create through Engine.submit."""

    def __init__(self, engine: "Engine", job_id: str, request: GenerationRequest, listener: Listener | None):
        super().__init__(engine, job_id, request, listener)
        self._stop = threading.Event()  # set by a cancel or a stop; the GPU thread stops at the next step


class Engine:
    def __init__(self, load_pipeline: Callable[[], Pipeline], *, max_queue: int = 100):
        self._load_pipeline = load_pipeline
        self._max_queue = max_queue
        self._pipeline: Pipeline | None = None
        self._queue: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task | None = None
        # One thread: the GPU runs one job at a time and the models are only touched from this thread.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="drawbot-gpu")

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the models (in the executor: this can take minutes on real weights) and start the worker."""
        loop = asyncio.get_running_loop()
        self._pipeline = await loop.run_in_executor(self._executor, self._load_pipeline)
        self._task = asyncio.create_task(self._work(), name="drawbot-engine")

    async def close(self, timeout: float | None = None) -> None:
        """Stop accepting jobs, cancel the queued ones, let the running job finish within `timeout` s, else stop it."""
        self._closed = True
        while self._queue:
            self._queue.popleft()._finish(JobState.CANCELLED)
        running = self._running
        if running is not None:
            try:
                await asyncio.wait_for(running.wait(), timeout)
            except (asyncio.TimeoutError, JobFailed, JobCancelled):
                running._stop.set()
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=None if timeout is None else timeout + 30)
            except asyncio.TimeoutError:
                self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stop_now(self) -> None:
        """Stop the running job at its next step boundary (a second Ctrl-C during a graceful stop); the caller
        decides what becomes of it (the bot leaves it queued for the next start)."""
        running = self._running
        if running is not None:
            running._stop.set()

    @property
    def info(self) -> EngineInfo:
        pipe = self._pipeline
        cost = self.size_cost
        return EngineInfo(
            model_name=pipe.model_name if pipe else "(loading)",
            device=pipe.device if pipe else "?",
            is_test_model=bool(pipe and pipe.is_test_model),
            queue_length=len(self._queue),
            running_job=self._running.id if self._running else None,
            largest_pixels=cost.largest_pixels if cost is not None else None,
        )

    @property
    def size_cost(self) -> SizeCost | None:
        return getattr(self._pipeline, "size_cost", None)

    def startup_line(self) -> str | None:
        """Where the start-up time went ("ready in 26.4 s: load 9.8 s, ..."), once loaded; None if not known."""
        startup = getattr(self._pipeline, "startup", None)
        return startup.describe() if startup is not None else None

    @property
    def capacity(self) -> int:
        """How many more jobs `submit` takes now (0 while loading or closed). A feeder hands over no more than this."""
        if self._closed or self._task is None:
            return 0
        return max(self._max_queue - len(self._queue), 0)

    def check(self, request: GenerationRequest) -> RequestRefusal | None:
        """Why this engine can never draw `request` (its steps, its size, its size on this device), or None.

        Depends only on the request and the device, never on what is waiting: the chat side asks before it accepts
        a job, and `submit` refuses the same with RequestRefused."""
        asked = functools.partial(RequestRefusal, width=request.width, height=request.height, steps=request.steps)
        if request.steps < 1:
            return asked("bad_steps", f"steps must be at least 1 (got {request.steps})")
        for name, side in (("width", request.width), ("height", request.height)):
            if side < 16 or side % 16:
                return asked("bad_size", f"{name} must be a positive multiple of 16 (got {side})")
        cost = self.size_cost
        if cost is not None and not cost.affordable(request.width, request.height):
            largest = cost.largest_pixels
            w, h = largest_like(request.width, request.height, largest)
            return asked(
                "too_large",
                f"{request.width}x{request.height} needs more memory than this {cost.device.upper()} has for a "
                f"picture; the largest of that shape that fits is {w}x{h}",
                device=cost.device, largest=(w, h), largest_pixels=largest)
        return None

    # -- jobs --------------------------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, listener: Listener | None = None, *, job_id: str | None = None) -> Job:
        """Queue a request; returns at once. Raises EngineClosed, RequestRefused (see `check`) or QueueFull."""
        if self._closed:
            raise EngineClosed()
        refusal = self.check(request)
        if refusal is not None:
            raise RequestRefused(refusal)
        if len(self._queue) >= self._max_queue:
            raise QueueFull(self._max_queue)
        job = Job(self, job_id or uuid.uuid4().hex[:12], request, listener)
        self._queue.append(job)
        job._emit(JobEvent(job.id, "queued", position=job.position))
        self._wakeup.set()
        return job

    @property
    def queue_length(self) -> int:
        """Jobs waiting, not counting the running one."""
        return len(self._queue)

    def _position(self, job: Job) -> int:
        try:
            return self._queue.index(job) + 1
        except ValueError:
            return 0

    def _cancel(self, job: Job) -> bool:
        if job in self._queue:
            self._queue.remove(job)
            job._finish(JobState.CANCELLED)
            self._announce_positions()
            return True
        if job is self._running and not job.done():
            job._stop.set()  # the executor stops at the next step boundary
            return True
        return False

    def _announce_positions(self) -> None:
        for index, waiting in enumerate(self._queue, start=1):
            waiting._emit(JobEvent(waiting.id, "queued", position=index))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            job = self._queue.popleft()
            self._announce_positions()
            self._running = job
            job.state = JobState.RUNNING
            job._emit(JobEvent(job.id, "started"))
            try:
                result = await loop.run_in_executor(self._executor, self._run_blocking, job, loop)
            except _StopRequested:
                job._finish(JobState.CANCELLED)
            except JobFailed as exc:
                job._finish(JobState.FAILED, error=exc.failure, detail=exc.detail)
            except Exception as exc:  # any other bug fails this job, never the engine
                log.exception("job %s failed", job.id)
                job._finish(JobState.FAILED, error=Failure.CRASHED, detail=type(exc).__name__)
            else:
                job._finish(JobState.DONE, result)
            finally:
                self._running = None

    def _run_blocking(self, job: Job, loop: asyncio.AbstractEventLoop) -> GenerationResult:
        """Runs in the GPU thread."""
        assert self._pipeline is not None
        pipeline = self._pipeline
        if job._stop.is_set():
            raise _StopRequested()
        started = time.monotonic()

        def on_step(step: int, total: int) -> None:
            # Called by the pipeline with step=0 before the first step, then after each step (1..total).
            if job._stop.is_set():
                raise _StopRequested()
            if step == 0:
                return  # the call before the first step is only a chance to stop
            elapsed = time.monotonic() - started
            eta = elapsed / step * (total - step)
            event = JobEvent(job.id, "progress", step=step, total=total, elapsed=elapsed, eta=eta)
            loop.call_soon_threadsafe(job._emit, event)

        try:
            return pipeline.generate(job.request, on_step)
        except _StopRequested:
            raise
        except Exception as exc:
            if _is_out_of_memory(exc):
                log.warning("job %s: out of GPU memory (%s); freeing memory and going on", job.id, exc)
                pipeline.recover_from_oom()
                raise JobFailed(Failure.OUT_OF_MEMORY, str(exc).splitlines()[0] if str(exc) else "") from exc
            raise


def _is_out_of_memory(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a hard dependency of the engine
        pass
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
