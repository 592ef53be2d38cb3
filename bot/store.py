"""The bot's memory in one SQLite file (aiosqlite): jobs, history, the per-user limit ledger and the durable queue.

- WAL mode, synchronous=FULL (a job is on disk before the user hears "accepted"), a busy timeout so several
  connections to one file wait for each other instead of failing, foreign keys on, every query parameterised.
- Schema migrations are numbered by `PRAGMA user_version`; a file written by a newer drawbot is refused with a clear
  `StoreError` instead of being misread.
- Admission (`admit`) checks every limit and inserts the job in one `BEGIN IMMEDIATE` transaction, so concurrent
  submissions, even from several connections or processes, can never overshoot a limit. The rules and their wording
  live in `bot.limits` (pure functions); the ledger they read is the jobs table itself.
- Images are files under `images_dir`, named `<job id>.png` from ids this module generates (uuid4 hex), written to a
  temporary file, fsynced, then renamed into place, so a crash never leaves half a picture under the real name.

One `Store` serialises its own operations with an asyncio lock (one sqlite connection cannot hold two transactions);
several `Store`s (or processes) on one file are serialised by SQLite's locking.

A full disk is one error type, `DiskFull`, whether SQLite said it (SQLITE_FULL) or the file system (ENOSPC, EDQUOT
while saving a picture): the core keeps what it could not write in memory until there is room again. A database in WAL
mode cannot even be read when its shared-memory file cannot be made (the disk is full at start): it is then opened in
SQLite's exclusive locking mode, which keeps that index in the process's memory, so the bot starts and reads; other
processes cannot read the file until the next start (`Store.exclusive`). A small reserve file beside the database
(RESERVE_BYTES) is the room its writes get when the disk fills: `release_reserve()`, `make_reserve()` once there is
room again.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import aiosqlite

from bot.config import LimitSettings
from bot.limits import (
    DAY,
    DEFAULT_JOB_SECONDS,
    HOUR,
    Refusal,
    Snapshot,
    cooldown_retry_at,
    decide,
    estimate_wait,
    jobs_in_window,
    window_retry_at,
)
from engine.jobs import Failure, JobStatus

log = logging.getLogger(__name__)

BUSY_TIMEOUT_SECONDS = 10.0
MAX_PROMPT_CHARS = 20_000
"""Hard ceiling, the largest `limits.max_prompt_chars` the config allows; the chat core applies the configured one."""
MAX_ERROR_CHARS = 2_000
RESTART_RETRIES = 1
"""A job found running at start-up (the process died while drawing it) is queued again this many times, behind the
jobs that were waiting then, and failed if the process dies with it running again: a picture that kills the bot must
not be drawn into the same crash at every start, nor hold up everyone else's while it is tried again."""
AVERAGE_OVER_LAST = 20
"""Finished jobs averaged for "try again in about ..." estimates."""
STALE_TEMP_SECONDS = 3600.0
RESERVE_BYTES = 256 * 1024
"""Room set aside beside the database (`<database>.reserve`) and given up when the disk is full, so that the few job
changes the bot must make then (a picture that could not be saved going back to the queue) still fit."""

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ACTIVE = ("queued", "running")
_QUEUE_ORDER = "COALESCE(queue_order, seq), seq"
"""ORDER BY for the queue: admission order, except for crash retries (see RESTART_RETRIES)."""
_COUNTED = ("queued", "running", "done")  # statuses that use up quota (see bot.limits)

# Each migration is a list of statements run in one transaction; migration N leaves user_version = N.
# Append new migrations; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submit order, used for queue order and history
            id TEXT NOT NULL UNIQUE,
            platform TEXT NOT NULL,
            user_id TEXT NOT NULL,
            chat_id TEXT NOT NULL,
            prompt TEXT NOT NULL,
            seed INTEGER NOT NULL,
            steps INTEGER NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            duration REAL,
            seconds_per_step REAL,
            error TEXT,
            image_file TEXT,
            delivered_at REAL,
            delivery_attempts INTEGER NOT NULL DEFAULT 0,
            delivery_error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            reply_ref TEXT NOT NULL DEFAULT '{}'
        ) STRICT
        """,
        "CREATE INDEX jobs_by_user ON jobs (platform, user_id, created_at)",
        "CREATE INDEX jobs_by_status ON jobs (status, seq)",
        """
        CREATE TABLE ban_notices (
            platform TEXT NOT NULL,
            user_id TEXT NOT NULL,
            notified_at REAL NOT NULL,
            PRIMARY KEY (platform, user_id)
        ) STRICT
        """,
    ),
    (
        # 2: bans made by admins from chat (config bans stay in the config file).
        """
        CREATE TABLE bans (
            platform TEXT NOT NULL,
            user_id TEXT NOT NULL,
            banned_at REAL NOT NULL,
            banned_by TEXT NOT NULL,
            PRIMARY KEY (platform, user_id)
        ) STRICT
        """,
    ),
    (
        # 3: the queue's order. NULL = admission order (seq); a job retried after a crash is moved behind the jobs
        # that were waiting then (see RESTART_RETRIES).
        "ALTER TABLE jobs ADD COLUMN queue_order REAL",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
APPLICATION_ID = 0x64726177  # "draw": SQLite's header field that tells whose file this is (PRAGMA application_id)


class StoreError(Exception):
    """A storage problem, worded for the bot's owner."""


class DiskFull(StoreError):
    """The disk holding the database or the pictures is full: nothing was written (the change can be tried again)."""


class InvalidJob(StoreError):
    """The job's data cannot be stored (bad type, out of range, not valid text). The message says which field."""


class UnknownJob(StoreError):
    """No job has this id."""


class JobStateError(StoreError):
    """The job is not in a state that allows this change (e.g. marking a cancelled job done)."""


@dataclass(frozen=True)
class NewJob:
    platform: str
    user_id: str
    chat_id: str
    prompt: str
    seed: int
    steps: int
    width: int
    height: int
    reply_ref: Mapping[str, Any] = field(default_factory=dict)
    """Whatever the platform needs to answer later (guild/channel/message ids, interaction token); must be JSON."""


@dataclass(frozen=True)
class JobRecord:
    id: str
    platform: str
    user_id: str
    chat_id: str
    prompt: str
    seed: int
    steps: int
    width: int
    height: int
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    duration: float | None
    seconds_per_step: float | None
    error: str | None
    """Why it failed: an engine.jobs.Failure value (a sentence in rows older than that; bot.replies copes)."""
    image_path: Path | None
    delivered_at: float | None
    delivery_attempts: int
    delivery_error: str | None
    attempts: int
    """Times the job was interrupted by a restart while running."""
    reply_ref: dict[str, Any]


@dataclass(frozen=True)
class Accepted:
    """A submission the store took: the job is queued under `job_id`."""

    job_id: str
    jobs_ahead: int = 0
    """Jobs queued or running before this one when it was accepted."""
    accepted: ClassVar[Literal[True]] = True


@dataclass(frozen=True)
class Refused:
    """A submission a limit turned down: which one, and until when."""

    reason: Refusal
    retry_at: float | None = None
    """Epoch seconds when a new submission would be accepted; None for banned users."""
    retry_is_estimate: bool = False
    """True for queue_full/too_many_active: the time depends on how fast pictures finish ("in about ...")."""
    wait: float = 0.0
    """Seconds from the refusal until `retry_at` (what the user is told; bot.replies.admission_refusal words it)."""
    limit: float = 0
    """The limit in force (bot.limits.Decision.limit)."""
    active: int = 0
    """The user's pictures waiting or drawing (too_many_active)."""
    notify: bool = True
    """False when the user must not be told again (a banned user hears the refusal once)."""
    accepted: ClassVar[Literal[False]] = False


Admission = Accepted | Refused
"""The answer to a submission."""


@dataclass(frozen=True)
class Usage:
    """A user's quota use for `/usage`; `*_frees_at` say when the oldest counted job leaves each window."""

    used_this_hour: int
    used_today: int
    active: int
    per_hour: int
    """0 = no hourly limit."""
    per_day: int
    """0 = no daily limit."""
    max_active: int
    cooldown_seconds: float
    hour_frees_at: float | None
    """When one hourly slot comes back (None: none used)."""
    day_frees_at: float | None
    hour_retry_at: float | None
    """When the hourly quota allows another picture (None: it does now)."""
    day_retry_at: float | None
    cooldown_ends_at: float | None
    """None: not cooling down."""


@dataclass(frozen=True)
class UserSummary:
    """One user's line on the owner dashboard."""

    platform: str
    user_id: str
    total: int
    last_day: int
    active: int
    """Queued or running now."""
    last_at: float
    banned: bool
    """Banned by an admin (the store's bans; [limits].banned in config is separate)."""


class Store:
    """Open with `await Store.open(...)`, close with `await store.close()` (or `async with`)."""

    def __init__(self, db: aiosqlite.Connection, path: Path, images_dir: Path, clock: Callable[[], float]):
        self._db = db
        self._path = path
        self._images_dir = images_dir
        self._clock = clock
        self._lock = asyncio.Lock()
        self.exclusive = False
        """Opened in exclusive locking mode (the disk was full at start): no other process can read the file."""

    # ---- lifecycle -------------------------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, images_dir: Path, *, clock: Callable[[], float] = time.time) -> Store:
        """Open (creating if needed) the database at `path`, bring its schema up to date, and make `images_dir`."""
        path = Path(path)
        images_dir = Path(images_dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            images_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the storage folders for {path} / {images_dir}: {exc.strerror}") from None
        if path.is_dir():
            raise StoreError(f"the database {path} is a folder, not a file: move it away (the bot then creates a "
                             "new database) or point [storage] database at a file")
        # SQLite silently opens a file it cannot write read-only, and the first accepted job would then fail.
        for needed in (path, path.parent):
            if needed.exists() and not os.access(needed, os.W_OK):
                raise StoreError(_unreadable(path, sqlite3.OperationalError("attempt to write a readonly database")))
        try:
            store = await cls._connect(path, images_dir, clock, exclusive=False)
            await asyncio.to_thread(store.make_reserve)
            return store
        except DiskFull:
            if not path.is_file():
                raise  # a new database needs room for itself
            # No room for the WAL index file: keep it in memory instead (see the module docstring).
            store = await cls._connect(path, images_dir, clock, exclusive=True)
            log.warning("%s: the disk is full, so the database is open for this process only until the next start",
                        path)
            return store

    @classmethod
    async def _connect(cls, path: Path, images_dir: Path, clock: Callable[[], float], *, exclusive: bool) -> Store:
        # isolation_level=None: no implicit transactions; every write below says BEGIN IMMEDIATE itself.
        connection = aiosqlite.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            db = await connection
        except sqlite3.Error as exc:
            # aiosqlite stops its worker thread without waiting for it: wait here, or the thread reports to an event
            # loop that `drawbot run` has closed by then (a traceback after the owner's one line).
            await asyncio.to_thread(connection._thread.join, 5)
            raise _store_error(_unreadable(path, exc), exc) from None
        db.row_factory = sqlite3.Row
        store = cls(db, path, images_dir, clock)
        try:
            if exclusive:
                await db.execute("PRAGMA locking_mode = EXCLUSIVE")  # before the first read: no shared memory
                store.exclusive = True
            await store._configure()
            await store._migrate()
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _check_identity(self) -> None:
        """Refuse, before changing anything in it, a file that is not SQLite or is another program's database.

        Ours carry APPLICATION_ID in their header; files from drawbots older than that are known by their `jobs`
        table and get the id at the next migration."""
        try:
            app_id = int(await self._scalar("PRAGMA application_id"))
            version = int(await self._scalar("PRAGMA user_version"))
            tables = {row[0] for row in await self._rows(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
        except sqlite3.DatabaseError as exc:
            raise _store_error(_unreadable(self._path, exc), exc) from None
        problem = foreign_database(self._path, app_id, version, tables)
        if problem:
            raise StoreError(problem)

    async def _configure(self) -> None:
        await self._check_identity()
        try:
            mode = await self._scalar("PRAGMA journal_mode = WAL")
            await self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            await self._db.execute("PRAGMA synchronous = FULL")
            await self._db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            raise _store_error(_unreadable(self._path, exc), exc) from None
        if str(mode).lower() != "wal":
            log.warning("%s: SQLite would not switch to WAL mode (got %r); concurrent access will be slower",
                        self._path, mode)

    async def _migrate(self) -> None:
        async with self._write():
            version = int(await self._scalar("PRAGMA user_version"))
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self._path} was written by a newer drawbot (database schema version {version}; this drawbot "
                    f"knows up to {SCHEMA_VERSION}). Upgrade drawbot, or point [storage] database at another file."
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[number - 1]:
                    try:
                        await self._db.execute(statement)
                    except sqlite3.Error as exc:
                        raise StoreError(
                            f"{self._path}: cannot bring the database to schema version {number} ({exc}); "
                            "is it another program's database?"
                        ) from None
                # PRAGMA takes no parameters; `number` is our own int.
                await self._db.execute(f"PRAGMA user_version = {int(number)}")
                log.info("%s: database schema migrated to version %d", self._path, number)
            if int(await self._scalar("PRAGMA application_id")) != APPLICATION_ID:
                await self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    # ---- room on the disk ------------------------------------------------------------------------------------

    @property
    def _reserve(self) -> Path:
        return self._path.with_name(self._path.name + ".reserve")

    def spare_space(self) -> int:
        """Bytes free for the bot on the fuller of the disks holding the database and the pictures, less what the
        database's reserve needs to be made again (see RESERVE_BYTES)."""
        free = min(shutil.disk_usage(folder).free for folder in (self._path.parent, self._images_dir))
        return free - (0 if self._has_reserve() else RESERVE_BYTES)

    def _has_reserve(self) -> bool:
        try:
            return self._reserve.stat().st_size >= RESERVE_BYTES
        except OSError:
            return False

    def make_reserve(self) -> bool:
        """Set the reserve aside when there is room for it (blocking: call in a thread). True when it is in place."""
        if self._has_reserve():
            return True
        temporary = self._reserve.with_name(self._reserve.name + ".tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
            os.replace(temporary, self._reserve)
        except OSError:
            temporary.unlink(missing_ok=True)
            return False
        return True

    def release_reserve(self) -> bool:
        """Give the reserve's room to the database's writes. True if there was one to give."""
        try:
            self._reserve.unlink()
        except OSError:
            return False
        return True

    # ---- transactions ----------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        """One write transaction, taken up front (BEGIN IMMEDIATE) so read-then-write decisions are atomic."""
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _store_error(f"database {self._path} is busy or unavailable: {exc}", exc) from None
            try:
                yield
            except sqlite3.Error as exc:
                await self._db.rollback()
                raise _store_error(f"database error in {self._path}: {exc}", exc) from exc
            except BaseException:
                await self._db.rollback()
                raise
            try:
                await self._db.commit()
            except sqlite3.Error as exc:
                await self._db.rollback()
                raise _store_error(f"could not save to the database {self._path}: {exc}", exc) from None

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[None]:
        """A consistent read snapshot (other connections may keep writing)."""
        async with self._lock:
            await self._db.execute("BEGIN")
            try:
                yield
            except sqlite3.Error as exc:
                raise _store_error(f"database error in {self._path}: {exc}", exc) from exc
            finally:
                await self._db.rollback()

    async def _scalar(self, sql: str, params: tuple = ()) -> Any:
        async with self._db.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        return None if row is None else row[0]

    async def _rows(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        return list(await self._db.execute_fetchall(sql, params))

    async def _update(self, sql: str, params: tuple) -> int:
        async with self._db.execute(sql, params) as cursor:
            return cursor.rowcount

    async def _job_row(self, job_id: str) -> sqlite3.Row | None:
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
            return None
        rows = await self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def _record(self, row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=row["id"], platform=row["platform"], user_id=row["user_id"], chat_id=row["chat_id"],
            prompt=row["prompt"], seed=row["seed"], steps=row["steps"], width=row["width"], height=row["height"],
            status=row["status"], created_at=row["created_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], duration=row["duration"], seconds_per_step=row["seconds_per_step"],
            error=row["error"],
            image_path=self._images_dir / row["image_file"] if row["image_file"] else None,
            delivered_at=row["delivered_at"], delivery_attempts=row["delivery_attempts"],
            delivery_error=row["delivery_error"], attempts=row["attempts"], reply_ref=json.loads(row["reply_ref"]),
        )

    # ---- admission -------------------------------------------------------------------------------------------

    async def admit(self, job: NewJob, limits: LimitSettings, *, is_admin: bool, is_banned: bool) -> Admission:
        """Check every limit and, if none refuses, store the job as queued, all in one transaction.

        Raises InvalidJob for data that cannot be stored; limits never raise, they refuse.
        """
        reply_ref = _validate(job)
        async with self._write():
            now = self._clock()
            if not is_banned:
                # Forget an old ban notice so a user banned again later is told again.
                await self._update("DELETE FROM ban_notices WHERE platform = ? AND user_id = ?",
                                   (job.platform, job.user_id))
            snapshot = await self._snapshot(job.platform, job.user_id, now)
            decision = decide(snapshot, limits, is_admin=is_admin, is_banned=is_banned)
            if decision is not None:
                notify = True
                if decision.reason is Refusal.BANNED:
                    inserted = await self._update(
                        "INSERT OR IGNORE INTO ban_notices (platform, user_id, notified_at) VALUES (?, ?, ?)",
                        (job.platform, job.user_id, now),
                    )
                    notify = inserted == 1
                return Refused(decision.reason, decision.retry_at, decision.retry_is_estimate, decision.wait,
                               decision.limit, decision.active, notify)
            job_id = uuid.uuid4().hex
            await self._db.execute(
                "INSERT INTO jobs (id, platform, user_id, chat_id, prompt, seed, steps, width, height, status, "
                "created_at, reply_ref) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
                (job_id, job.platform, job.user_id, job.chat_id, job.prompt, job.seed, job.steps, job.width,
                 job.height, now, reply_ref),
            )
            return Accepted(job_id, jobs_ahead=snapshot.queue_total)

    async def _snapshot(self, platform: str, user_id: str, now: float) -> Snapshot:
        # A little slack below the day boundary; jobs_in_window() does the exact edge in Python.
        since = now - DAY - 1.0
        recent = await self._rows(
            "SELECT created_at FROM jobs WHERE platform = ? AND user_id = ? AND created_at > ? "
            "AND status IN (?, ?, ?)",
            (platform, user_id, since, *_COUNTED),
        )
        last_created = await self._scalar(
            "SELECT MAX(created_at) FROM jobs WHERE platform = ? AND user_id = ?", (platform, user_id))
        active = await self._rows(
            f"SELECT seq, platform, user_id, status, started_at FROM jobs WHERE status IN (?, ?) "
            f"ORDER BY status = 'queued', {_QUEUE_ORDER}",
            _ACTIVE,
        )
        average = await self._average_job_seconds()
        running = [row for row in active if row["status"] == "running" and row["started_at"] is not None]
        running_elapsed = max(now - running[0]["started_at"], 0.0) if running else None
        mine = [i for i, row in enumerate(active) if row["platform"] == platform and row["user_id"] == user_id]
        # The user's first active job frees their slot; everything ahead of it in the queue finishes first.
        user_wait = estimate_wait(mine[0] + 1, running_elapsed, average) if mine else 0.0
        return Snapshot(
            now=now,
            recent_created=[row["created_at"] for row in recent],
            last_created=last_created,
            user_active=len(mine),
            user_active_wait=user_wait,
            queue_total=len(active),
            queue_wait=estimate_wait(1, running_elapsed, average) if active else 0.0,
        )

    async def _average_job_seconds(self) -> float:
        average = await self._scalar(
            "SELECT AVG(duration) FROM (SELECT duration FROM jobs WHERE status = 'done' AND duration IS NOT NULL "
            "ORDER BY seq DESC LIMIT ?)",
            (AVERAGE_OVER_LAST,),
        )
        return float(average) if average else DEFAULT_JOB_SECONDS

    async def usage(self, platform: str, user_id: str, limits: LimitSettings) -> Usage:
        """The user's quota use right now (admins see their use too; they are just not held to it)."""
        async with self._read():
            now = self._clock()
            snapshot = await self._snapshot(platform, user_id, now)
        hour = jobs_in_window(snapshot.recent_created, now, HOUR)
        day = jobs_in_window(snapshot.recent_created, now, DAY)
        return Usage(
            used_this_hour=len(hour),
            used_today=len(day),
            active=snapshot.user_active,
            per_hour=limits.per_hour,
            per_day=limits.per_day,
            max_active=limits.max_active_per_user,
            cooldown_seconds=limits.cooldown_seconds,
            hour_frees_at=hour[0] + HOUR if hour else None,
            day_frees_at=day[0] + DAY if day else None,
            hour_retry_at=window_retry_at(snapshot.recent_created, now, HOUR, limits.per_hour),
            day_retry_at=window_retry_at(snapshot.recent_created, now, DAY, limits.per_day),
            cooldown_ends_at=cooldown_retry_at(snapshot.last_created, now, limits.cooldown_seconds),
        )

    # ---- job lifecycle ---------------------------------------------------------------------------------------

    async def mark_running(self, job_id: str) -> bool:
        """queued -> running. False (and no change) if the job is unknown or no longer queued."""
        async with self._write():
            return await self._update(
                "UPDATE jobs SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued'",
                (self._clock(), job_id),
            ) == 1

    async def ban(self, platform: str, user_id: str, *, by: str) -> bool:
        """Ban a user from drawing (kept across restarts). False if they were already banned."""
        async with self._write():
            return await self._update(
                "INSERT OR IGNORE INTO bans (platform, user_id, banned_at, banned_by) VALUES (?, ?, ?, ?)",
                (platform, user_id, self._clock(), by),
            ) == 1

    async def unban(self, platform: str, user_id: str) -> bool:
        """Lift a ban made with `ban`. False if there was none."""
        async with self._write():
            return await self._update("DELETE FROM bans WHERE platform = ? AND user_id = ?", (platform, user_id)) == 1

    async def is_banned(self, platform: str, user_id: str) -> bool:
        async with self._read():
            return await self._scalar("SELECT COUNT(*) FROM bans WHERE platform = ? AND user_id = ?",
                                      (platform, user_id)) > 0

    async def return_to_queue(self, job_id: str) -> bool:
        """running -> queued without counting a restart attempt: the bot stopped it on purpose (graceful stop).
        False (and no change) if the job is unknown or not running."""
        async with self._write():
            return await self._update(
                "UPDATE jobs SET status = 'queued', started_at = NULL WHERE id = ? AND status = 'running'",
                (job_id,),
            ) == 1

    async def mark_done(self, job_id: str, png: bytes, *, duration: float, seconds_per_step: float | None) -> Path:
        """Store the picture as `<images_dir>/<job id>.png` and mark the job done; returns the file's path.

        Raises UnknownJob, JobStateError (job already finished or cancelled; the picture is not kept) or StoreError.
        """
        if not isinstance(png, (bytes, bytearray)) or not bytes(png[:8]) == _PNG_SIGNATURE:
            raise StoreError(f"job {job_id}: the picture is not PNG data")
        async with self._lock:
            row = await self._job_row(job_id)
        if row is None:
            raise UnknownJob(f"no job {job_id!r}")
        final = self._images_dir / f"{row['id']}.png"
        temporary = self._images_dir / f".{row['id']}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            await asyncio.to_thread(_write_synced, temporary, bytes(png))
        except OSError as exc:
            temporary.unlink(missing_ok=True)  # no half picture left behind (a full disk stops mid-file)
            kind = DiskFull if exc.errno in _NO_SPACE else StoreError
            raise kind(f"cannot save the picture of job {job_id} under {self._images_dir}: {exc}") from None
        try:
            async with self._write():
                changed = await self._update(
                    "UPDATE jobs SET status = 'done', finished_at = ?, duration = ?, seconds_per_step = ?, "
                    "image_file = ?, error = NULL WHERE id = ? AND status IN (?, ?)",
                    (self._clock(), float(duration),
                     None if seconds_per_step is None else float(seconds_per_step), final.name, row["id"], *_ACTIVE),
                )
                if changed != 1:
                    raise JobStateError(f"job {job_id} is no longer queued or running; its picture was not kept")
                # Renamed inside the transaction: if the rename fails, the job is not marked done.
                os.replace(temporary, final)
        finally:
            temporary.unlink(missing_ok=True)
        await asyncio.to_thread(_fsync_directory, self._images_dir)
        return final

    async def mark_failed(self, job_id: str, failure: Failure) -> bool:
        """queued/running -> failed, keeping why (bot.replies words it for the user). False if unknown or already
        finished.

        A done job not yet delivered may be failed too (its picture file was lost); its picture is then forgotten.
        """
        async with self._write():
            row = await self._job_row(job_id)
            changed = await self._update(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ?, image_file = NULL WHERE id = ? "
                "AND (status IN (?, ?) OR (status = 'done' AND delivered_at IS NULL))",
                (self._clock(), failure.value, job_id, *_ACTIVE),
            ) == 1
        if changed and row is not None and row["image_file"]:
            await asyncio.to_thread(_remove_files, [self._images_dir / row["image_file"]])
        return changed

    async def mark_cancelled(self, job_id: str) -> bool:
        """queued/running -> cancelled. False if unknown or already finished."""
        async with self._write():
            return await self._update(
                "UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ? AND status IN (?, ?)",
                (self._clock(), job_id, *_ACTIVE),
            ) == 1

    async def cancel_user_jobs(self, platform: str, user_id: str) -> list[JobRecord]:
        """Cancel the user's queued jobs (not a running one: the engine must stop that first, then `mark_cancelled`).

        Returns the cancelled jobs in submit order, so the caller can drop them from the engine's queue too.
        """
        async with self._write():
            rows = await self._rows(
                "SELECT id FROM jobs WHERE platform = ? AND user_id = ? AND status = 'queued' ORDER BY seq",
                (platform, user_id),
            )
            await self._update(
                "UPDATE jobs SET status = 'cancelled', finished_at = ? "
                "WHERE platform = ? AND user_id = ? AND status = 'queued'",
                (self._clock(), platform, user_id),
            )
            ids = [row["id"] for row in rows]
            cancelled = [await self._job_row(job_id) for job_id in ids]
        return [self._record(row) for row in cancelled if row is not None]

    # ---- delivery --------------------------------------------------------------------------------------------

    async def mark_delivered(self, job_id: str) -> bool:
        """Record that the outcome reached the user. True only the first time, so a reply is sent exactly once.

        Works for done jobs (the picture) and failed ones (the failure notice); False if unknown or not finished.
        """
        async with self._write():
            return await self._update(
                "UPDATE jobs SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL "
                "AND status IN ('done', 'failed')",
                (self._clock(), job_id),
            ) == 1

    async def record_delivery_failure(self, job_id: str, error: str) -> int:
        """Count a failed attempt to deliver (network down, ...); returns the attempts so far."""
        async with self._write():
            changed = await self._update(
                "UPDATE jobs SET delivery_attempts = delivery_attempts + 1, delivery_error = ? WHERE id = ?",
                (_clip(error), job_id),
            )
            if changed != 1:
                raise UnknownJob(f"no job {job_id!r}")
            return int(await self._scalar("SELECT delivery_attempts FROM jobs WHERE id = ?", (job_id,)))

    async def set_reply_ref(self, job_id: str, reply_ref: Mapping[str, Any]) -> None:
        """Replace the platform data used to answer later (must be JSON-serialisable)."""
        encoded = _encode_reply_ref(reply_ref)
        async with self._write():
            if await self._update("UPDATE jobs SET reply_ref = ? WHERE id = ?", (encoded, job_id)) != 1:
                raise UnknownJob(f"no job {job_id!r}")

    # ---- reading ---------------------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobRecord | None:
        async with self._lock:
            row = await self._job_row(job_id)
        return None if row is None else self._record(row)

    async def unfinished_jobs(self, *, max_delivery_attempts: int | None = None) -> list[JobRecord]:
        """Jobs to pick up at start-up, in queue order: queued, running, and done but not yet delivered.

        With `max_delivery_attempts`, done jobs whose delivery already failed that often are left out (given up).
        """
        limit = -1 if max_delivery_attempts is None else int(max_delivery_attempts)
        async with self._read():
            rows = await self._rows(
                "SELECT * FROM jobs WHERE status IN ('queued', 'running') OR (status = 'done' AND delivered_at IS NULL "
                f"AND (? < 0 OR delivery_attempts < ?)) ORDER BY {_QUEUE_ORDER}",
                (limit, limit),
            )
        return [self._record(row) for row in rows]

    async def queue(self) -> list[str]:
        """The ids of the queued jobs (not the running ones), first in line first: the order the engine is fed in
        (admission order; a crash retry behind the jobs that were waiting then). A job's place in the queue, as users
        are told it, is its index here + 1."""
        async with self._read():
            rows = await self._rows(f"SELECT id FROM jobs WHERE status = 'queued' ORDER BY {_QUEUE_ORDER}")
        return [row["id"] for row in rows]

    async def requeue_after_restart(self, job_id: str) -> JobRecord:
        """For a job found running at start-up: queue it again (behind the jobs waiting now) the first time, fail it
        the next.

        A job in any other state is returned unchanged (so recovery may safely run twice).
        """
        async with self._write():
            row = await self._job_row(job_id)
            if row is None:
                raise UnknownJob(f"no job {job_id!r}")
            if row["status"] == "running":
                if row["attempts"] < RESTART_RETRIES:
                    # Behind every job admitted so far, ahead of any admitted later.
                    await self._update(
                        "UPDATE jobs SET status = 'queued', started_at = NULL, attempts = attempts + 1, "
                        "queue_order = (SELECT MAX(seq) FROM jobs) + 0.5 WHERE id = ?",
                        (job_id,),
                    )
                else:
                    await self._update(
                        "UPDATE jobs SET status = 'failed', finished_at = ?, error = ?, attempts = attempts + 1 "
                        "WHERE id = ?",
                        (self._clock(), Failure.RESTARTED.value, job_id),
                    )
                row = await self._job_row(job_id)
        assert row is not None
        return self._record(row)

    async def history(self, platform: str, user_id: str, limit: int = 10) -> list[JobRecord]:
        """The user's last `limit` jobs (1..100), newest first."""
        limit = min(max(int(limit), 1), 100)
        async with self._read():
            rows = await self._rows(
                "SELECT * FROM jobs WHERE platform = ? AND user_id = ? ORDER BY seq DESC LIMIT ?",
                (platform, user_id, limit),
            )
        return [self._record(row) for row in rows]

    # ---- the owner's view (web dashboard) -----------------------------------------------------------------------

    async def active_jobs(self, limit: int = 100) -> list[JobRecord]:
        """Queued and running jobs of every platform, in queue order (the running one first)."""
        async with self._read():
            rows = await self._rows(
                "SELECT * FROM jobs WHERE status IN ('queued', 'running') "
                "ORDER BY status = 'running' DESC, seq LIMIT ?",
                (min(max(int(limit), 1), 1000),),
            )
        return [self._record(row) for row in rows]

    async def recent_jobs(self, limit: int = 20) -> list[JobRecord]:
        """The newest jobs of every platform and user, newest first."""
        async with self._read():
            rows = await self._rows("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (min(max(int(limit), 1), 1000),))
        return [self._record(row) for row in rows]

    async def user_overview(self, limit: int = 50) -> list[UserSummary]:
        """Every user who asked for a picture, most recently active first: jobs in the last day and in all, and
        whether an admin banned them from chat."""
        since = self._clock() - DAY
        async with self._read():
            rows = await self._rows(
                "SELECT j.platform, j.user_id, COUNT(*) AS total, SUM(j.created_at > ?) AS last_day, "
                "SUM(j.status IN ('queued', 'running')) AS active, MAX(j.created_at) AS last_at, "
                "EXISTS (SELECT 1 FROM bans b WHERE b.platform = j.platform AND b.user_id = j.user_id) AS banned "
                "FROM jobs j GROUP BY j.platform, j.user_id ORDER BY last_at DESC LIMIT ?",
                (since, min(max(int(limit), 1), 1000)),
            )
        return [UserSummary(platform=row["platform"], user_id=row["user_id"], total=int(row["total"]),
                            last_day=int(row["last_day"] or 0), active=int(row["active"] or 0),
                            last_at=float(row["last_at"]), banned=bool(row["banned"])) for row in rows]

    async def banned_users(self) -> list[tuple[str, str, float]]:
        """(platform, user_id, banned_at) of every ban made from chat or the dashboard, newest first."""
        async with self._read():
            rows = await self._rows("SELECT platform, user_id, banned_at FROM bans ORDER BY banned_at DESC")
        return [(row["platform"], row["user_id"], float(row["banned_at"])) for row in rows]

    # ---- retention -------------------------------------------------------------------------------------------

    async def prune_images(self, *, keep_days: int, keep_count: int) -> int:
        """Delete stored pictures older than `keep_days` or beyond the newest `keep_count` (0 = no such limit).

        The job records stay (their image_path becomes None). Pictures not yet delivered are never deleted.
        Returns how many pictures were removed.
        """
        async with self._write():
            now = self._clock()
            rows = await self._rows(
                "SELECT id, image_file, finished_at, status, delivered_at FROM jobs WHERE image_file IS NOT NULL "
                "ORDER BY finished_at DESC, seq DESC"
            )
            doomed = []
            for rank, row in enumerate(rows):
                too_many = keep_count > 0 and rank >= keep_count
                too_old = keep_days > 0 and (row["finished_at"] or 0.0) + keep_days * DAY <= now
                undelivered = row["status"] == "done" and row["delivered_at"] is None
                if (too_many or too_old) and not undelivered:
                    doomed.append(row)
            await asyncio.to_thread(_remove_files, [self._images_dir / row["image_file"] for row in doomed])
            for row in doomed:
                await self._update("UPDATE jobs SET image_file = NULL WHERE id = ?", (row["id"],))
        await asyncio.to_thread(_remove_stale_temporaries, self._images_dir)
        return len(doomed)


# ---- helpers -------------------------------------------------------------------------------------------------


def _validate(job: NewJob) -> str:
    """Check the job can be stored verbatim; returns the encoded reply_ref."""
    for name in ("platform", "user_id", "chat_id", "prompt"):
        value = getattr(job, name)
        if not isinstance(value, str):
            raise InvalidJob(f"{name} must be text, got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidJob(f"the {name} holds characters that are not valid text") from None
    if not job.platform or not job.user_id:
        raise InvalidJob("platform and user_id must not be empty")
    if len(job.prompt) > MAX_PROMPT_CHARS:
        raise InvalidJob(f"the prompt is {len(job.prompt)} characters long; at most {MAX_PROMPT_CHARS} can be stored")
    for name in ("seed", "steps", "width", "height"):
        value = getattr(job, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidJob(f"{name} must be a whole number, got {value!r}")
    if not 0 <= job.seed < 2**63:
        raise InvalidJob(f"seed must be between 0 and {2**63 - 1}, got {job.seed}")
    for name in ("steps", "width", "height"):
        if not 1 <= getattr(job, name) <= 100_000:
            raise InvalidJob(f"{name} must be between 1 and 100000, got {getattr(job, name)}")
    return _encode_reply_ref(job.reply_ref)


def _encode_reply_ref(reply_ref: Mapping[str, Any]) -> str:
    if not isinstance(reply_ref, Mapping):
        raise InvalidJob(f"reply_ref must be a dict, got {type(reply_ref).__name__}")
    try:
        # ensure_ascii: lone surrogates and the like become escapes instead of failing in sqlite's UTF-8 encoder.
        return json.dumps(dict(reply_ref), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"reply_ref must hold only JSON data: {exc}") from None


def foreign_database(path: Path, app_id: int, version: int, tables: set[str]) -> str | None:
    """Why the SQLite file at `path` is not drawbot's (None: it is ours, an older drawbot's, or empty)."""
    move_away = "move it away (the bot then creates a new database) or point [storage] database at another file"
    if app_id not in (0, APPLICATION_ID):
        return f"{path} is another program's SQLite database (application_id {app_id:#x}), not drawbot's: {move_away}"
    if app_id == 0 and tables and not (version >= 1 and "jobs" in tables):
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        return f"{path} is another program's SQLite database (tables: {shown}), not drawbot's: {move_away}"
    return None


def _unreadable(path: Path, exc: sqlite3.Error) -> str:
    """One line for an owner about a database file SQLite cannot use, by SQLite's own error code."""
    code = getattr(exc, "sqlite_errorname", "")
    if code == "SQLITE_READONLY" or "readonly" in str(exc):
        return (f"the database {path} is read-only (a read-only mount, or not writable by the bot's user): point "
                "[storage] state_dir / database at a writable place, or make it writable")
    if code == "SQLITE_NOTADB":
        return (f"{path} is not a SQLite database (its content is something else): move it away (the bot then "
                "creates a new database) or point [storage] database at another file")
    if code == "SQLITE_CANTOPEN":
        return (f"cannot open the database {path}: make it and its folder writable by the bot's user, or point "
                "[storage] database elsewhere")
    if _no_room(exc):
        return f"the disk holding the database {path} is full: free some space there"
    return (f"the database {path} is damaged ({exc}): move it away (the bot then creates a new one), or restore "
            "a backup")


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _store_error(message: str, exc: sqlite3.Error) -> StoreError:
    """StoreError for `exc`, DiskFull when SQLite could not write for lack of room."""
    return DiskFull(message) if _no_room(exc) else StoreError(message)


def _no_room(exc: sqlite3.Error) -> bool:
    """SQLite could not write for lack of room: SQLITE_FULL, or the WAL index file it could not size (an I/O error
    for SQLite, which the file system gives for a full disk)."""
    return getattr(exc, "sqlite_errorname", "") in ("SQLITE_FULL", "SQLITE_IOERR_SHMSIZE")


def _clip(text: str) -> str:
    text = str(text).encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself survive a power cut (best effort: not every OS lets a folder be fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_files(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not delete old picture %s: %s", path, exc)


def remove_all_temporaries(images_dir: Path) -> int:
    """Every half-written picture, whatever its age: only for a process that owns the state dir (bot.statelock),
    so no other writer can be mid-write. Returns how many were removed."""
    removed = 0
    for path in Path(images_dir).glob(".*.tmp"):
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _remove_stale_temporaries(images_dir: Path) -> None:
    """Half-written pictures left by a crash; by file age on the real clock, as the file system keeps it."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for path in images_dir.glob(".*.tmp"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass
