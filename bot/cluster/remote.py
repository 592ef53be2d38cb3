"""The bot's engine placement for `[cluster]`: the same `submit()` / job handle seam as engine.worker.Engine, with the
drawing done by `drawbot worker` processes through Redis (see bot/cluster/__init__.py for the layout).

    engine = RemoteEngine(redis, settings, expected_identity("majicflus"), url=url)
    await engine.start()                           # announces the bot, starts following events and workers
    job = engine.submit(request, listener, job_id=record_id)   # publishes (idempotently) in the background
    result = await job.wait()
    await engine.close()                           # jobs stay in Redis; the next start re-attaches to them

Submitting a job id that Redis already holds attaches to it (a restarted bot re-submits its unfinished jobs from the
store: nothing is drawn twice, and a result that came while the bot was down is delivered). A result is read from the
events stream and acknowledged only after it has been handed to the job, and the picture stays in the job's hash for
a while after, so a bot killed in between finds it again at its next start.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import math
import time
import uuid
from typing import Awaitable, Callable

from redis.exceptions import ResponseError

from bot.cluster import protocol
from bot.cluster.connection import describe, is_transient, log_unexpected, retrying, start_refused, trouble
from bot.cluster.protocol import BOT_CONSUMER, BOT_GROUP, Capability, Keys, ModelIdentity
from bot.cluster.settings import ClusterSettings, redacted
from engine.jobs import (
    EngineClosed,
    Failure,
    EngineError,
    EngineInfo,
    EngineJob,
    GenerationRequest,
    GenerationResult,
    JobEvent,
    JobState,
    Listener,
    RequestRefusal,
    RequestRefused,
)

log = logging.getLogger(__name__)

ORPHAN_GRACE = 60.0
"""Seconds a result for a job this bot does not follow is kept unacknowledged (a restarted bot re-submits its
unfinished jobs right after start); after that it is dropped (the job was finished or cancelled earlier)."""
KEEP_AFTER_DELIVERY = 300.0
"""Seconds the picture stays in Redis once handed to the core (covers a bot killed before it saved it)."""
KNOWN_WORKER_SECONDS = 86400.0


class RemoteJob(EngineJob):
    """A job as the bot follows it; the same surface as engine.worker.Job."""

    def __init__(self, engine: "RemoteEngine", job_id: str, request: GenerationRequest, listener: Listener | None):
        super().__init__(engine, job_id, request, listener)
        self.token = 0  # the newest attempt seen; older attempts' events are stale
        self.worker: str | None = None
        self.published = False  # Redis has held it (once published, a fresh publish means Redis lost it)


class RemoteEngine:
    def __init__(self, redis, settings: ClusterSettings, identity: ModelIdentity, *, url: str = "redis://",
                 model_name: str | None = None, on_close: list[Callable[[], Awaitable[None]]] | None = None):
        self._redis = redis
        self._settings = settings
        self._identity = identity
        self._url = url
        self._model_name = model_name or identity.model
        self._keys = Keys(settings.namespace)
        self._on_close = list(on_close or [])
        self._jobs: dict[str, RemoteJob] = {}
        self._waiting: collections.OrderedDict[str, RemoteJob] = collections.OrderedDict()  # not started, in order
        self._orphans: dict[str, tuple[float, list[tuple[bytes, dict]]]] = {}
        self._live: dict[str, Capability] = {}
        self._known: dict[str, Capability] = {}
        self._warned: set[str] = set()
        self._closed = False
        self._tasks: list[asyncio.Task] = []
        self._publishing: set[asyncio.Task] = set()
        self._outbox: asyncio.Queue[RemoteJob] = asyncio.Queue()
        self._scripts = {name: redis.register_script(getattr(protocol, name))
                         for name in ("PUBLISH", "CANCEL")}

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Announce the bot and what it wants drawn, then follow events and workers. With Redis unreachable it says
        so in one line and starts anyway: jobs are accepted into the store and published once Redis answers."""
        down_since: float | None = None
        try:
            await self._announce()
            await self._ensure_group()
            await self._refresh_workers()
            log.info("cluster: Redis at %s; %s; %d live worker(s)", redacted(self._url), self._identity.describe(),
                     len(self._live))
        except Exception as exc:
            refused = start_refused(self._url, exc)
            if refused is not None:
                raise ClusterSetupError(refused) from None
            if not is_transient(exc):
                raise
            down_since = time.monotonic()
            log.warning("cluster: Redis at %s %s; accepting jobs, they wait until it answers (retrying)",
                        redacted(self._url), trouble(exc))
        self._tasks = [asyncio.create_task(self._publisher(), name="cluster-publisher"),
                       asyncio.create_task(self._follow_events(down_since), name="cluster-events"),
                       asyncio.create_task(self._watch_workers(), name="cluster-workers")]

    async def close(self, timeout: float | None = None) -> None:
        """Stop following. Jobs stay in Redis (workers go on drawing); every handle ends as cancelled, which the core
        keeps for the next start, when submitting the same job id re-attaches to it."""
        self._closed = True
        for closer in self._on_close:
            try:
                await closer()
            except Exception:
                log.exception("cluster: stopping the local worker failed")
        for task in [*self._tasks, *self._publishing]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._publishing, return_exceptions=True)
        for job in list(self._jobs.values()):
            job._finish(JobState.CANCELLED)
        self._jobs.clear()
        self._waiting.clear()
        try:
            await self._redis.aclose()
        except Exception:
            pass

    @property
    def info(self) -> EngineInfo:
        running = next((j.id for j in self._jobs.values() if j.state is JobState.RUNNING), None)
        return EngineInfo(model_name=self._model_name, device=f"{len(self._live)} worker(s) via Redis",
                          is_test_model=self._identity.model == "tiny", queue_length=self.queue_length,
                          running_job=running)

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def parallelism(self) -> int:
        """How many jobs are drawn at once: the live workers that draw this bot's model (at least 1 for ETAs)."""
        return max(1, len(self._live))

    @property
    def live_workers(self) -> list[Capability]:
        return sorted(self._live.values(), key=lambda c: c.name)

    def stop_now(self) -> None:
        """A second Ctrl-C: nothing to stop here, the workers draw elsewhere (their jobs stay in Redis)."""

    # -- jobs --------------------------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, listener: Listener | None = None, *,
               job_id: str | None = None) -> RemoteJob:
        if self._closed:
            raise EngineClosed()
        refusal = self.check(request)
        if refusal is not None:
            raise RequestRefused(refusal)
        job = RemoteJob(self, job_id or uuid.uuid4().hex[:12], request, listener)
        self._jobs[job.id] = job
        self._waiting[job.id] = job
        job._emit(JobEvent(job.id, "queued", position=job.position))
        self._outbox.put_nowait(job)  # one publisher, in submit order: the workers take jobs in the core's order
        return job

    @property
    def capacity(self) -> int:
        """How many more jobs to hand over now: one waiting in Redis per live worker (so a worker that finishes takes
        the next at once) and the rest left in the bot's durable queue, where its fair order is decided."""
        if self._closed or not self._tasks:
            return 0
        return max(0, self.parallelism - len(self._waiting))

    def check(self, request: GenerationRequest) -> RequestRefusal | None:
        """Refuses a size that no live worker draws (or, with none live now, no recently known one)."""
        if request.steps < 1:
            return RequestRefusal("bad_steps", f"steps must be at least 1 (got {request.steps})",
                                  width=request.width, height=request.height, steps=request.steps)
        tier = protocol.tier_of(request.width * request.height)
        pool = self._live or self._known
        if not pool:
            return None  # no worker known yet: accept; it waits for the first worker (the log says there is none)
        largest = max(c.largest_tier for c in pool.values())
        if tier <= largest:
            return None
        side = int(math.isqrt(largest))
        which = "live" if self._live else "known"
        return RequestRefusal("too_large", f"{request.width}x{request.height} is larger than any {which} drawing "
                              f"worker draws (the largest draw about {side}x{side})", device="cluster",
                              largest=(side, side), largest_pixels=largest, width=request.width,
                              height=request.height, steps=request.steps)

    async def _publisher(self) -> None:
        while True:
            job = await self._outbox.get()
            if job.done():
                continue
            try:
                await self._publish(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log_unexpected(log, exc, "cluster: publishing job %s failed", job.id)
                self._waiting.pop(job.id, None)
                self._jobs.pop(job.id, None)
                job._finish(JobState.FAILED, error=Failure.UNREACHABLE)

    async def _publish(self, job: RemoteJob) -> None:
        request_json = protocol.encode_request(job.request)
        stream = self._keys.jobs(self._identity, protocol.tier_of(job.request.width * job.request.height))
        async for attempt in retrying(f"publishing job {job.id}", log, self._url):
            if job.done():
                return  # published by _republish_all when Redis came back, and finished meanwhile
            with attempt:
                fresh = await self._scripts["PUBLISH"](keys=[self._keys.job(job.id), stream],
                                                       args=[job.id, request_json, protocol.WORKERS_GROUP])
        job.published = True
        log.info("cluster: %s job=%s", "published" if fresh else "re-attached to", job.id)
        if not self._live:
            log.warning("cluster: job %s waits: no worker drawing %s is live (start `drawbot worker`)", job.id,
                        self._identity.describe())
        if not fresh:
            await self._sync_state(job)
        orphaned = self._orphans.pop(job.id, None)
        if orphaned is not None:
            for entry_id, fields in orphaned[1]:
                await self._dispatch(entry_id, fields)

    async def _sync_state(self, job: RemoteJob) -> None:
        """A job Redis already held: take over its state (a worker may be drawing it, or it may be finished)."""
        state, token, worker = await self._redis.hmget(self._keys.job(job.id), "state", "token", "worker")
        if protocol.text(state) == "running":
            job.token = int(protocol.text(token) or 0)
            job.worker = protocol.text(worker)
            self._started(job)

    def _position(self, job: RemoteJob) -> int:
        if job.id not in self._waiting:
            return 0
        for index, job_id in enumerate(self._waiting, start=1):
            if job_id == job.id:
                return index
        return 0

    def _started(self, job: RemoteJob) -> None:
        job.state = JobState.RUNNING
        if self._waiting.pop(job.id, None) is not None:
            for index, waiting in enumerate(self._waiting.values(), start=1):
                waiting._emit(JobEvent(waiting.id, "queued", position=index))
        job._emit(JobEvent(job.id, "started"))

    def _cancel(self, job: RemoteJob) -> bool:
        if job.done():
            return False
        self._waiting.pop(job.id, None)
        job._finish(JobState.CANCELLED)
        self._jobs.pop(job.id, None)

        async def tell_workers() -> None:
            async for attempt in retrying(f"cancelling job {job.id}", log, self._url):
                with attempt:
                    await self._scripts["CANCEL"](keys=[self._keys.job(job.id)],
                                                  args=[int(self._settings.result_keep_seconds * 1000)])

        task = asyncio.create_task(tell_workers(), name=f"cancel-{job.id}")
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)
        return True

    # -- events from the workers ---------------------------------------------------------------------------------
    async def _ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._keys.events, BOT_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _follow_events(self, down_since: float | None = None) -> None:
        backlog = True  # first read what was delivered before a restart and never acknowledged
        while True:
            try:
                response = await self._redis.xreadgroup(BOT_GROUP, BOT_CONSUMER, {self._keys.events: "0" if backlog
                                                        else ">"}, count=50, block=None if backlog else 1000)
                if down_since is not None:
                    log.info("cluster: Redis at %s is back after %.0f s", redacted(self._url),
                             time.monotonic() - down_since)
                    down_since = None
                    await self._announce()
                    await self._republish_all()
                entries = response[0][1] if response else []
                if backlog and not entries:
                    backlog = False
                for entry_id, fields in entries:
                    await self._dispatch(entry_id, {protocol.text(k): v for k, v in fields.items()})
                self._drop_old_orphans()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    # Redis lost its data (no persistence): start over from the store's jobs
                    log.warning("cluster: Redis has no events stream (a new or emptied Redis); publishing the "
                                "unfinished jobs (again)")
                    await self._guarded(self._ensure_group)
                    await self._guarded(self._republish_all)
                    continue
                if not is_transient(exc):
                    log_unexpected(log, exc, "cluster: handling an event failed")
                    await asyncio.sleep(1)
                    continue
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("cluster: Redis at %s %s; jobs wait, retrying", redacted(self._url), trouble(exc))
                backlog = True
                await asyncio.sleep(min(10.0, 0.5 + (time.monotonic() - down_since) / 4))

    async def _guarded(self, action: Callable[[], Awaitable[None]]) -> None:
        try:
            await action()
        except Exception as exc:
            if not is_transient(exc):
                raise

    async def _republish_all(self) -> None:
        """After Redis was away: publish every job still followed again (a no-op for those Redis kept)."""
        for job in list(self._jobs.values()):
            if not job.done():
                stream = self._keys.jobs(self._identity, protocol.tier_of(job.request.width * job.request.height))
                fresh = await self._scripts["PUBLISH"](keys=[self._keys.job(job.id), stream],
                                                       args=[job.id, protocol.encode_request(job.request),
                                                             protocol.WORKERS_GROUP])
                if fresh and not job.published:  # its own publisher was still waiting for Redis
                    log.info("cluster: published job=%s", job.id)
                elif fresh:
                    log.warning("cluster: Redis had lost job %s; published it again", job.id)
                job.published = True
                if fresh:
                    job.state = JobState.QUEUED
                    if job.id not in self._waiting:
                        self._waiting[job.id] = job

    async def _dispatch(self, entry_id: bytes, fields: dict) -> None:
        kind, job_id = protocol.text(fields.get("kind")), protocol.text(fields.get("job"))
        token = int(protocol.text(fields.get("token")) or 0)
        job = self._jobs.get(job_id)
        if job is None:
            if kind in ("done", "failed"):
                # Maybe a job a restarted bot is about to re-submit: keep it (unacknowledged) for a while.
                self._orphans.setdefault(job_id, (time.monotonic(), []))[1].append((entry_id, fields))
                return
            await self._ack(entry_id)
            return
        if token < job.token or job.done():
            await self._ack(entry_id)  # an older attempt's event, or one for a job already settled
            return
        job.token = token
        if kind == "started":
            job.worker = protocol.text(fields.get("worker"))
            log.info("cluster: job=%s drawn by %s (attempt token %d)", job_id, job.worker, token)
            self._started(job)
        elif kind == "progress":
            if job.state is not JobState.RUNNING:
                self._started(job)
            job._emit(JobEvent(job.id, "progress", step=int(fields["step"]), total=int(fields["total"]),
                               elapsed=float(fields["elapsed"]), eta=float(fields["eta"])))
        elif kind == "done":
            png = await self._redis.hget(self._keys.job(job_id), "png")
            if not png:
                log.warning("cluster: the picture of job %s is gone from Redis; drawing it again", job_id)
                await self._redis.delete(self._keys.job(job_id))
                await self._republish_all()
                await self._ack(entry_id)
                return
            self._waiting.pop(job_id, None)
            result = GenerationResult(
                request=job.request, png=bytes(png), seconds=float(fields["seconds"]),
                seconds_per_step=float(fields["seconds_per_step"]),
                peak_vram_bytes=int(fields["peak_vram"]) if protocol.text(fields.get("peak_vram")) else None,
                model_name=protocol.text(fields.get("model_name")) or self._model_name,
                test_model=bool(protocol.text(fields.get("test_model"))))
            log.info("cluster: job=%s finished by %s (token %d)", job_id, protocol.text(fields.get("worker")), token)
            self._jobs.pop(job_id, None)
            job._finish(JobState.DONE, result)
            await self._redis.pexpire(self._keys.job(job_id), int(KEEP_AFTER_DELIVERY * 1000))
        elif kind == "failed":
            self._waiting.pop(job_id, None)
            self._jobs.pop(job_id, None)
            job._finish(JobState.FAILED, error=Failure.parse(protocol.text(fields.get("error"))),
                        detail=protocol.text(fields.get("detail")) or "")
        await self._ack(entry_id)

    async def _ack(self, entry_id: bytes) -> None:
        await self._redis.xack(self._keys.events, BOT_GROUP, entry_id)
        await self._redis.xdel(self._keys.events, entry_id)

    def _drop_old_orphans(self) -> None:
        now = time.monotonic()
        for job_id, (since, entries) in list(self._orphans.items()):
            if now - since > ORPHAN_GRACE:
                del self._orphans[job_id]
                log.info("cluster: dropping the result of job %s, which this bot no longer follows", job_id)
                for entry_id, _ in entries:
                    task = asyncio.create_task(self._guarded(functools.partial(self._ack, entry_id)))
                    self._publishing.add(task)
                    task.add_done_callback(self._publishing.discard)

    # -- workers -----------------------------------------------------------------------------------------------------
    async def _announce(self) -> None:
        await self._redis.set(self._keys.bot, json.dumps({"model": self._identity.model,
                                                          "dit_hash": self._identity.dit_hash,
                                                          "protocol": self._identity.protocol}))

    async def _watch_workers(self) -> None:
        while True:
            await asyncio.sleep(self._settings.heartbeat_seconds)
            try:
                await self._announce()
                await self._refresh_workers()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_transient(exc):  # _follow_events says what is wrong with Redis, once
                    log_unexpected(log, exc, "cluster: reading the workers failed")

    async def _refresh_workers(self) -> None:
        live = await read_live_workers(self._redis, self._keys)
        now = time.time()
        known_raw = await self._redis.hgetall(self._keys.workers)
        known: dict[str, Capability] = {}
        for name, value in known_raw.items():
            try:
                cap = Capability.from_json(value)
            except (ValueError, TypeError, KeyError):
                continue
            if now - cap.seen > KNOWN_WORKER_SECONDS:
                await self._redis.hdel(self._keys.workers, name)
            elif cap.identity == self._identity:
                known[cap.name] = cap
        compatible: dict[str, Capability] = {}
        for cap in live:
            if cap.identity == self._identity:
                compatible[cap.name] = cap
            elif cap.name not in self._warned:
                self._warned.add(cap.name)
                log.warning("cluster: worker %s is refused: it draws %s, this bot wants %s (set [engine].model alike "
                            "and run the same drawbot version on both)", cap.name, cap.identity.describe(),
                            self._identity.describe())
        for name in compatible.keys() - self._live.keys():
            cap = compatible[name]
            log.info("cluster: worker %s is live (%s, %s, up to %s)", name, cap.device,
                     f"{cap.vram_budget_gb:g} GB", protocol.side(cap.largest_tier))
        for name in self._live.keys() - compatible.keys():
            log.warning("cluster: worker %s is gone (no heartbeat); its job, if any, goes to another worker after "
                        "the lease (%.0f s)", name, self._settings.lease_seconds)
        self._live = compatible
        self._known = known


async def read_live_workers(redis, keys: Keys) -> list[Capability]:
    """Every worker whose heartbeat key has not expired, whatever it draws."""
    names = [key async for key in redis.scan_iter(match=keys.worker_pattern, count=100)]
    if not names:
        return []
    values = await redis.mget(names)
    workers = []
    for value in values:
        if value:
            try:
                workers.append(Capability.from_json(value))
            except (ValueError, TypeError, KeyError):
                continue
    return sorted(workers, key=lambda c: c.name)


def wait_estimate(job_seconds: float | None, position: int, parallelism: int) -> float | None:
    """Seconds until a job at `position` starts when `parallelism` jobs are drawn at once."""
    if job_seconds is None or position <= 0:
        return None
    return job_seconds * math.ceil(position / max(1, parallelism))


class ClusterSetupError(Exception):
    """`[cluster]` cannot start (no Redis URL, the local worker's model does not load); worded for the owner."""


async def open_cluster_engine(config) -> RemoteEngine:
    """The engine `drawbot run` uses with `[cluster].enabled`: jobs go to Redis; with `local_worker`, a worker in this
    process draws too (it loads the model here)."""
    from bot.cluster.connection import client
    from bot.cluster.settings import RedisUrlError, read_redis_url

    cluster = config.cluster
    try:
        url = read_redis_url(cluster)
    except RedisUrlError as exc:
        raise ClusterSetupError(str(exc)) from None
    identity = protocol.expected_identity(config.engine.model)
    on_close: list[Callable[[], Awaitable[None]]] = []
    if cluster.local_worker:
        on_close.append(await _start_local_worker(config, url))
    engine = RemoteEngine(client(url), cluster, identity, url=url, on_close=on_close)
    try:
        await engine.start()
    except BaseException:
        for closer in on_close:
            await closer()
        raise
    return engine


async def _start_local_worker(config, url: str) -> Callable[[], Awaitable[None]]:
    from bot.cluster.connection import client
    from bot.cluster.worker import ClusterWorker, build_local_engine, default_name, load_capability

    settings = config.engine
    local = build_local_engine(settings, config.cluster.step_sleep)
    try:
        await local.start()
        capability = load_capability(config, settings, default_name(settings.device) + "-local", local)
    except Exception as exc:
        await local.close(timeout=0)
        raise ClusterSetupError(f"[cluster].local_worker: cannot load the model: {type(exc).__name__}: {exc}") from None
    redis = client(url)
    worker = ClusterWorker(redis, config.cluster, local, capability, url=url)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop), name="cluster-local-worker")

    async def close() -> None:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await local.close(timeout=0)
        await redis.aclose()

    return close


def doctor_lines(config, timeout: float = 3.0) -> tuple[bool, str, str]:
    """For `drawbot doctor`: (reachable, what was found, the fix). Imports redis only when called."""
    from bot.cluster.connection import client
    from bot.cluster.settings import RedisUrlError, read_redis_url

    try:
        url = read_redis_url(config.cluster)
    except RedisUrlError as exc:
        return False, "no Redis URL", str(exc)

    async def probe() -> tuple[bool, str, str]:
        redis = client(url)
        try:
            await asyncio.wait_for(redis.ping(), timeout)
            workers = await read_live_workers(redis, Keys(config.cluster.namespace))
        except Exception as exc:  # unreachable, wrong password, ...
            return False, f"Redis at {redacted(url)} does not answer: {describe(exc)}", \
                "start redis-server there, check the password in DRAWBOT_REDIS_URL and the LAN address (docs/deploy.md)"
        finally:
            await redis.aclose()
        wanted = protocol.expected_identity(config.engine.model)
        lines = [f"Redis at {redacted(url)} answers; {len(workers)} live worker(s)"]
        for cap in workers:
            verdict = "ok" if cap.identity == wanted else f"REFUSED (draws {cap.identity.describe()})"
            lines.append(f"  {cap.name}: {cap.device}, {cap.vram_budget_gb:g} GB, up to "
                         f"{protocol.side(cap.largest_tier)}, {cap.state}{' ' + cap.job if cap.job else ''} - {verdict}")
        return True, "\n".join(lines), "" if workers else "start `drawbot worker` on a PC with a GPU"

    return asyncio.run(probe())
