"""`drawbot worker`: one process per GPU, drawing the bot's jobs from Redis with the normal local engine.

    worker = ClusterWorker(redis, settings, engine, capability, url=url)
    code = await worker.run(stop)      # 0 after a stop, 2 when the bot on this Redis wants another model/protocol

The loop: take the oldest job whose lease lapsed (XAUTOCLAIM) or else the next new one (XREADGROUP) from the streams
of this worker's model and size tiers; take it (a new fencing token); draw it on engine.worker.Engine while a keeper
renews the lease every lease_seconds/4 and forwards progress; hand back the PNG (fenced: dropped if the lease was lost
meanwhile). A heartbeat key announces what the worker draws; a stop gives the running job back at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Protocol

from redis.exceptions import RedisError, ResponseError

from bot.cluster import protocol
from bot.cluster.connection import is_transient, log_unexpected, retrying, start_refused, trouble
from bot.cluster.protocol import WORKERS_GROUP, Capability, Keys, ModelIdentity
from bot.cluster.settings import ClusterSettings, RedisUrlError, read_redis_url, redacted
from engine.jobs import EngineError, GenerationRequest, GenerationResult, JobCancelled, JobEvent, JobFailed

log = logging.getLogger(__name__)


class LocalEngine(Protocol):
    def submit(self, request: GenerationRequest, listener=None, *, job_id: str | None = None): ...


class WorkerRefused(Exception):
    """The bot on this Redis wants another model or protocol version."""


class ClusterWorker:
    def __init__(self, redis, settings: ClusterSettings, engine: LocalEngine, capability: Capability, *,
                 url: str = "redis://"):
        self._redis = redis
        self._settings = settings
        self._engine = engine
        self._cap = capability
        self._url = url
        self._keys = Keys(settings.namespace)
        self._identity = capability.identity
        self._streams = [self._keys.jobs(self._identity, tier) for tier in protocol.tiers_up_to(capability.max_pixels)]
        self._scripts = {name: redis.register_script(getattr(protocol, name))
                         for name in ("TAKE", "RENEW", "FINISH", "RELEASE")}
        self._job: str | None = None
        self._refused: str | None = None
        self._stop = asyncio.Event()  # run()'s: a hand-back waiting for Redis gives up when it is set
        self._lease_ms = int(settings.lease_seconds * 1000)

    @property
    def name(self) -> str:
        return self._cap.name

    async def run(self, stop: asyncio.Event) -> int:
        self._stop = stop
        try:
            if not await _unless_stopped(self._start(), stop):
                return 0  # stopped while Redis was still unreachable
        except RedisError as exc:
            self._refused = start_refused(self._url, exc)
            if self._refused is None:
                raise
            log.error("worker %s: %s", self.name, self._refused)
            return 2
        if self._refused:
            return 2
        log.info("worker %s: ready on Redis %s (%s, up to %s, %s)", self.name, redacted(self._url),
                 self._identity.describe(), protocol.side(self._cap.largest_tier), self._cap.device)
        heartbeat = asyncio.create_task(self._heartbeat(stop), name="worker-heartbeat")
        outage_since: float | None = None  # Redis unreachable or refusing writes since then
        failing = False  # the last attempt failed otherwise (Redis said no, or a bug): said once per streak
        needs_groups = False
        try:
            while not stop.is_set() and not self._refused:
                try:
                    if needs_groups:
                        await self._ensure_groups()
                        needs_groups = False
                    entry = await self._next_entry()
                    if outage_since is not None:
                        log.info("worker %s: Redis at %s is back after %.0f s", self.name, redacted(self._url),
                                 time.monotonic() - outage_since)
                        outage_since = None
                    failing = False
                    if entry is not None:
                        await self._draw(*entry, stop=stop)
                except Exception as exc:
                    # Never ends the worker: a job it was drawing goes back to the queue when its lease lapses.
                    if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                        needs_groups = True  # Redis lost its data: the groups are made again
                        continue
                    if is_transient(exc):
                        if outage_since is None:  # one line per outage; the retries are quiet
                            outage_since = time.monotonic()
                            log.warning("worker %s: Redis at %s %s; retrying", self.name, redacted(self._url),
                                        trouble(exc))
                    elif not failing:
                        failing = True
                        log_unexpected(log, exc, "worker %s: taking or drawing a job failed (going on)", self.name)
                    await _sleep_or_stop(stop, 1.0)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            try:
                await self._redis.delete(self._keys.worker(self.name))  # else its heartbeat key expires by itself
            except Exception as exc:
                if not is_transient(exc):
                    log_unexpected(log, exc, "worker %s: removing its heartbeat key failed", self.name)
        return 2 if self._refused else 0

    async def _start(self) -> None:
        async for attempt in retrying(f"starting worker {self.name}", log, self._url,
                                      retry_if=lambda exc: is_transient(exc) and not start_refused("", exc)):
            with attempt:
                self._check_bot(await self._redis.get(self._keys.bot))
                await self._ensure_groups()
                await self._heartbeat_once()

    # -- announcing ----------------------------------------------------------------------------------------------
    def _check_bot(self, raw: bytes | None) -> None:
        if not raw:
            return  # no bot yet: serve this model's queue; the bot checks the worker when it comes
        try:
            data = json.loads(raw)
            wanted = ModelIdentity(str(data["model"]), str(data["dit_hash"]), int(data["protocol"]))
        except (ValueError, KeyError, TypeError):
            wanted = ModelIdentity("?", "?", -1)
        if wanted != self._identity and self._refused is None:
            self._refused = (f"worker {self.name} refused: the bot on this Redis wants {wanted.describe()}, this "
                             f"worker draws {self._identity.describe()}. Set [engine].model alike on both PCs and "
                             "run the same drawbot version.")
            log.error("%s", self._refused)

    async def _ensure_groups(self) -> None:
        for stream in self._streams:
            try:
                await self._redis.xgroup_create(stream, WORKERS_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _heartbeat_once(self) -> None:
        cap = Capability(**{**self._cap.__dict__, "state": "drawing" if self._job else "idle", "job": self._job,
                            "seen": time.time()})
        ttl_ms = int(self._settings.heartbeat_seconds * 3000)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._keys.worker(self.name), cap.to_json(), px=ttl_ms)
            pipe.hset(self._keys.workers, self.name, cap.to_json())
            pipe.get(self._keys.bot)
            *_, bot = await pipe.execute()
        self._check_bot(bot)

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        failing = False  # said once, with its traceback, until a heartbeat goes through again
        while True:
            await asyncio.sleep(self._settings.heartbeat_seconds)
            try:
                await self._heartbeat_once()
                failing = False
            except Exception as exc:
                if not is_transient(exc) and not failing:  # the main loop says what is wrong with Redis
                    failing = True
                    log_unexpected(log, exc, "worker %s: the heartbeat failed (going on)", self.name)
            if self._refused:
                stop.set()

    # -- taking jobs -------------------------------------------------------------------------------------------
    async def _next_entry(self) -> tuple[str, bytes, str] | None:
        """(stream, entry id, job id) of the next job to draw: first one whose lease lapsed, else a new one."""
        for stream in self._streams:
            _, claimed, _ = await self._redis.xautoclaim(stream, WORKERS_GROUP, self.name, self._lease_ms,
                                                         start_id="0-0", count=1)
            for entry_id, fields in claimed:
                if fields:
                    log.info("worker %s: took over job %s (its lease lapsed)", self.name,
                             protocol.text(fields.get(b"job")))
                    return stream, entry_id, protocol.text(fields.get(b"job"))
        block = max(100, min(1000, self._lease_ms // 4))
        response = await self._redis.xreadgroup(WORKERS_GROUP, self.name, {s: ">" for s in self._streams},
                                                count=1, block=block)
        entries = [(protocol.text(stream), entry_id, fields) for stream, items in response or []
                   for entry_id, fields in items]
        if not entries:
            return None
        entries.sort(key=lambda e: tuple(int(p) for p in protocol.text(e[1]).split("-")))
        for stream, entry_id, _ in entries[1:]:  # one job at a time: the others go back for anyone to take
            await self._scripts["RELEASE"](keys=[self._keys.job("-"), stream],
                                           args=[0, WORKERS_GROUP, self.name, entry_id])
        stream, entry_id, fields = entries[0]
        return stream, entry_id, protocol.text(fields.get(b"job"))

    async def _draw(self, stream: str, entry_id: bytes, job_id: str, *, stop: asyncio.Event) -> None:
        job_key = self._keys.job(job_id)
        token, payload = await self._scripts["TAKE"](keys=[job_key, self._keys.tokens, self._keys.events],
                                                      args=[self.name, job_id])
        token = int(token)
        if token == 0:  # finished, cancelled or forgotten meanwhile: nothing to draw
            await self._redis.xack(stream, WORKERS_GROUP, entry_id)
            await self._redis.xdel(stream, entry_id)
            log.info("worker %s: job %s is %s; dropped its entry", self.name, job_id, protocol.text(payload))
            return
        request = protocol.decode_request(payload)
        keys = [job_key, stream, self._keys.events]
        log.info("worker %s: drawing job %s (token %d, %dx%d, %d steps)", self.name, job_id, token, request.width,
                 request.height, request.steps)
        self._job = job_id
        lost = asyncio.Event()
        cancelled = asyncio.Event()
        progress: list[JobEvent] = []
        wake = asyncio.Event()

        def on_event(event: JobEvent) -> None:
            if event.kind == "progress":
                progress[:] = [event]
                wake.set()

        try:
            engine_job = self._engine.submit(request, on_event, job_id=job_id)
        except EngineError as exc:  # this device cannot draw it after all (its size): the user is told why
            self._job = None
            log.warning("worker %s: refused job %s: %s", self.name, job_id, exc)
            await self._finish(keys, token, entry_id, int(self._settings.result_keep_seconds * 1000), "failed", b"",
                               ["error", exc.failure, "worker", self.name])
            return

        async def keep_lease() -> None:
            interval = max(0.05, self._settings.lease_seconds / 4)
            while True:
                try:
                    await asyncio.wait_for(wake.wait(), interval)
                except asyncio.TimeoutError:
                    pass
                wake.clear()
                fields: list = []
                if progress:
                    e = progress.pop()
                    fields = ["kind", "progress", "job", job_id, "token", token, "step", e.step, "total", e.total,
                              "elapsed", f"{e.elapsed:.3f}", "eta", f"{e.eta or 0:.3f}"]
                try:
                    held = await self._scripts["RENEW"](keys=keys, args=[token, WORKERS_GROUP, self.name, entry_id,
                                                                         *fields])
                except Exception as exc:
                    if is_transient(exc):
                        continue  # keep drawing; the result is handed back when Redis is there again
                    log_unexpected(log, exc, "worker %s: renewing the lease of job %s failed (drawing on without it)",
                                   self.name, job_id)
                    return
                if held == 0:
                    log.warning("worker %s: lost the lease of job %s (another worker has it); stopping", self.name,
                                job_id)
                    lost.set()
                    engine_job.cancel()
                    return
                if held == -1:
                    log.info("worker %s: job %s was cancelled; stopping", self.name, job_id)
                    cancelled.set()
                    engine_job.cancel()
                    return

        async def stop_on_signal() -> None:
            await stop.wait()
            engine_job.cancel()

        keeper = asyncio.create_task(keep_lease(), name=f"lease-{job_id}")
        stopper = asyncio.create_task(stop_on_signal(), name=f"stop-{job_id}")
        keep_ms = int(self._settings.result_keep_seconds * 1000)
        try:
            try:
                result: GenerationResult = await engine_job.wait()
            except JobCancelled:
                if lost.is_set():
                    return
                if cancelled.is_set():
                    await self._finish(keys, token, entry_id, keep_ms, "cancelled", b"", [])
                    return
                # This worker is stopping: give the job back for another worker to take at once.
                await self._scripts["RELEASE"](keys=[job_key, stream], args=[token, WORKERS_GROUP, self.name,
                                                                              entry_id])
                log.info("worker %s: stopping; gave job %s back", self.name, job_id)
                return
            except JobFailed as exc:
                log.warning("worker %s: job %s failed: %s", self.name, job_id, exc)
                await self._finish(keys, token, entry_id, keep_ms, "failed", b"",
                                   ["error", exc.failure, "detail", exc.detail, "worker", self.name])
                return
            fields = ["seconds", f"{result.seconds:.3f}", "seconds_per_step", f"{result.seconds_per_step:.4f}",
                      "peak_vram", "" if result.peak_vram_bytes is None else result.peak_vram_bytes,
                      "model_name", result.model_name, "test_model", "1" if result.test_model else "", "worker", self.name]
            if await self._finish(keys, token, entry_id, keep_ms, "done", result.png, fields):
                log.info("worker %s: done job %s in %.2f s", self.name, job_id, result.seconds)
        finally:
            self._job = None
            keeper.cancel()
            stopper.cancel()
            await asyncio.gather(keeper, stopper, return_exceptions=True)

    async def _finish(self, keys: list[str], token: int, entry_id: bytes, keep_ms: int, kind: str, png: bytes,
                      fields: list) -> bool:
        """Hand the outcome back, fenced by the token; retried while Redis is unreachable, unless the worker is
        stopping (the job's lease then lapses and another worker draws it: a stop never waits for Redis)."""
        job_id = keys[0].rsplit(":", 1)[1]
        event = ["kind", kind, "job", job_id, "token", token, *fields]
        try:
            async for attempt in retrying(f"handing back job {job_id}", log, self._url, max_wait=10,
                                          attempts=lambda _: self._stop.is_set()):
                with attempt:
                    outcome = await self._scripts["FINISH"](keys=keys, args=[token, WORKERS_GROUP, entry_id,
                                                                             keep_ms, kind, png, *event])
        except Exception:
            if self._stop.is_set():
                log.warning("worker %s: stopping before Redis took job %s back; another worker draws it after its "
                            "lease", self.name, job_id)
            raise
        if outcome == 0:
            log.warning("worker %s: job %s was taken over by another worker while this one drew it; its result is "
                        "dropped (stale token %d)", self.name, job_id, token)
        return outcome == 1


async def _unless_stopped(work, stop: asyncio.Event) -> bool:
    """Run `work` until it ends (True; its exception raised) or `stop` is set first (False; `work` cancelled)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopped):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, stopped, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()
    return True


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


class PaddedPipeline:
    """A pipeline that sleeps `seconds` per step (benchmarks and tests: a slower GPU without using the CPU)."""

    def __init__(self, pipeline, seconds: float):
        self._pipeline = pipeline
        self._seconds = seconds
        self.model_name = pipeline.model_name
        self.device = pipeline.device
        self.is_test_model = pipeline.is_test_model
        self.size_cost = getattr(pipeline, "size_cost", None)

    def generate(self, request, on_step):
        def padded(step: int, total: int) -> None:
            if step:
                time.sleep(self._seconds)
            on_step(step, total)

        return self._pipeline.generate(request, padded)

    def recover_from_oom(self) -> None:
        self._pipeline.recover_from_oom()


def default_name(device: str) -> str:
    return f"{socket.gethostname()}-{device.replace(':', '')}-{os.getpid()}"


def load_capability(config, engine_settings, name: str, engine=None) -> Capability:
    """What this worker draws (needs the engine's files: the hash is the one the pipeline checked). The largest size
    is [cluster].max_pixels, or less where the engine measured that its device affords less (engine.size_cost)."""
    from engine.pipeline import locate_model

    files, _ = locate_model(engine_settings)
    max_pixels = config.cluster.max_pixels
    cost = getattr(engine, "size_cost", None)
    if cost is not None and getattr(cost, "largest_pixels", None):
        max_pixels = min(max_pixels, int(cost.largest_pixels))
    return Capability(name=name, model=engine_settings.model, dit_hash=files.hashes["dit"],
                      protocol=protocol.PROTOCOL, max_pixels=max_pixels,
                      vram_budget_gb=engine_settings.vram_budget_gb, device=engine_settings.device)


def build_local_engine(engine_settings, step_sleep: float):
    from engine.pipeline import FluxPipeline
    from engine.worker import Engine

    def load():
        pipeline = FluxPipeline.load(engine_settings)
        return PaddedPipeline(pipeline, step_sleep) if step_sleep else pipeline

    return Engine(load, max_queue=1)


def say(text: str) -> None:
    print(f"drawbot worker: {text}", file=sys.stderr, flush=True)


async def run_worker(config, *, device: str | None = None, name: str | None = None) -> int:
    """`drawbot worker`: exit 0 after SIGTERM/SIGINT, 2 on a set-up error or when refused by the bot."""
    from pydantic import ValidationError

    from bot.cluster.connection import client
    from engine.settings import EngineSettings

    try:
        url = read_redis_url(config.cluster)
    except RedisUrlError as exc:
        say(str(exc))
        return 2
    try:
        settings = EngineSettings.model_validate({**config.engine.model_dump(), **({"device": device} if device
                                                                                      else {})})
    except ValidationError:
        say(f"--device must be cpu, cuda or cuda:N (got {device!r})")
        return 2
    name = name or default_name(settings.device)
    engine = build_local_engine(settings, config.cluster.step_sleep)
    say(f"{name}: loading the {settings.model} model ({settings.mode} mode, device {settings.device})…")
    try:
        await engine.start()
        capability = load_capability(config, settings, name, engine)
    except Exception as exc:
        from engine.pipeline import DeviceUnavailable  # imported by build_local_engine already: torch is loaded

        await engine.close(timeout=0)
        if isinstance(exc, DeviceUnavailable):
            say(f"config error: {exc}")
            return 2
        say(f"cannot load the model: {type(exc).__name__}: {exc}\n  `drawbot doctor` checks what a worker needs.")
        return 1
    redis = client(url)
    worker = ClusterWorker(redis, config.cluster, engine, capability, url=url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        code = await worker.run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await engine.close(timeout=0)
        await redis.aclose()
    if code != 2:  # refused: the worker's log line said why
        say(f"{name}: stopped")
    return code
