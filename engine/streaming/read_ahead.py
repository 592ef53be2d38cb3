"""The start-up read-ahead of the weight cache: while the engine loads (DiffSynth builds the models, mostly on the
CPU), a background thread reads the first file-backed model the start-up generation uses (T5) into the page cache,
so the calibration finds it there instead of reading it then. Without it the disk sat nearly idle through the load
(bench/README.md, issue 13's start-up).

Rules, so that it never makes the start-up read more or slower:
- It reads in file order, one request at a time: the loading's own small reads (CLIP, the VAE, the files' headers)
  wait behind at most one (with four in flight, the load took 7.8 s instead of 4.2 on the H100 machine).
- A range a streamer is about to read itself (`take`) is waited for when the read-ahead has started it (then it is
  in the page cache: copy it from the mapping), and skipped for good when not (the streamer reads it from the disk).
- What it has read and the streamers have not yet used, plus what they used and keep in the page cache, stays
  within `room()` (the page cache's room under the host-RAM budget, measured before each read): it waits for room
  instead of evicting what it read before.
- It stops at the end of its files, or when the engine is ready (`stop`).

The DiT is not read ahead: during the calibration the streamers read it at the disk's rate themselves (O_DIRECT for
the units beyond the page cache's room), faster than buffered reads ahead of them (1.3 against 1.7 GB/s measured).
Written here, not taken from a library: it is part of the weight streaming (the product's edge), and it has to know
which ranges the streamers read themselves."""

from __future__ import annotations

import bisect
import collections
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

CHUNK = 8 << 20
"""Bytes per read: large enough for the disk's sequential rate, small enough to stop near the room's edge."""
READERS = 1
"""Reads in flight at once (see above: the loading's reads share the disk)."""
ROOM_POLL_S = 0.1
"""How often a read-ahead waiting for room looks again (the process's own memory can shrink without a call here)."""


class StartupReadAhead:
    """Reads `files` (each from byte `start` to its end) into the page cache, in order, within `room()` bytes of the
    page cache. The streamers tell it what they read (`take`) and what they are done with (`done`)."""

    def __init__(self, files: Sequence[Path], room: Callable[[], int], *, start: int = 0, chunk: int = CHUNK,
                 readers: int = READERS):
        self._room = room
        self._chunk = chunk
        self._segments: list[tuple[str, int, int, int]] = []  # (path, first byte, end, linear position of first)
        self._fds: dict[str, int] = {}
        linear = 0
        for path in files:
            name = str(Path(path).resolve())
            try:
                fd = os.open(name, os.O_RDONLY)
                end = os.fstat(fd).st_size
                if hasattr(os, "posix_fadvise"):  # exactly the bytes asked for: the kernel's own read-ahead off
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            except OSError:
                continue
            if end <= start:
                os.close(fd)
                continue
            self._fds[name] = fd
            self._segments.append((name, start, end, linear))
            linear += end - start
        self._end = linear
        self._lock = threading.Condition()
        self._cursor = 0
        """The next linear byte to read."""
        self._used = 0
        """Linear position up to which the streamers are done with the bytes."""
        self._taken: list[tuple[int, int]] = []  # sorted linear ranges the streamers read themselves: skipped
        self._taken_set: set[tuple[int, int]] = set()
        self._reads: collections.deque[tuple[int, int, Future]] = collections.deque()  # read, not yet used
        self._ahead = 0
        """Bytes read (or being read) beyond `_used`: in the page cache for the streamers to come."""
        self._kept = 0
        """Bytes the streamers used and keep in the page cache (counted against the room like the read-ahead's)."""
        self._stopped = False
        self._bytes_read = 0
        self._pool = ThreadPoolExecutor(readers, thread_name_prefix="weight-read-ahead")
        self._in_flight = threading.Semaphore(readers)
        self._scratch = threading.local()
        self._thread = threading.Thread(target=self._run, name="startup-read-ahead", daemon=True)
        if self._segments:
            self._thread.start()

    # -- the streamers' side -------------------------------------------------------------------------------------------
    def _linear(self, path: str, offset: int, nbytes: int) -> tuple[int, int] | None:
        for name, first, end, base in self._segments:
            if name == path and first <= offset < end:
                return base + offset - first, base + min(offset + nbytes, end) - first
        return None

    def take(self, path: str, offset: int, nbytes: int, *, wait: bool = True) -> bool:
        """A streamer is about to read these bytes of `path`. True: the read-ahead has read them, or is reading them
        (with `wait`, it has now finished: they are in the page cache, copy them from the mapping). False: it has not
        started them and never will (read them from the disk yourself)."""
        span = self._linear(path, offset, nbytes)
        if span is None:
            return False
        start, end = span
        with self._lock:
            if self._stopped or (start, end) in self._taken_set or start >= self._cursor:
                if (start, end) not in self._taken_set:
                    self._taken_set.add((start, end))
                    bisect.insort(self._taken, (start, end))
                self._lock.notify_all()
                return False
            self._cursor = max(self._cursor, end)  # the rest of the range, if any, comes through the mapping
            waits = [read for first, last, read in self._reads if first < end and last > start]
        for read in waits if wait else ():
            read.result()
        return True

    def holds(self, path: str, offset: int, nbytes: int) -> bool:
        """Whether some of these bytes were read ahead for a streamer that has not used them yet."""
        span = self._linear(path, offset, nbytes)
        with self._lock:
            return span is not None and not self._stopped and span[0] < self._cursor and span[1] > self._used

    def done(self, path: str, offset: int, nbytes: int, *, kept: bool) -> None:
        """A streamer has used these bytes; `kept`: they stay in the page cache (a unit the plan keeps there), else
        it dropped them."""
        span = self._linear(path, offset, nbytes)
        if span is None:
            return
        with self._lock:
            if kept:
                self._kept += span[1] - span[0]
            self._used = max(self._used, span[1])
            while self._reads and self._reads[0][0] < self._used:
                first, last, _ = self._reads.popleft()
                self._ahead -= last - first
            self._lock.notify_all()

    def forget(self, path: str) -> None:
        """`path` is being rebuilt: read none of it (what was read belongs to the replaced file)."""
        for name, first, end, base in self._segments:
            if name == str(Path(path).resolve()):
                with self._lock:
                    self._taken_set.add((base, base + end - first))
                    bisect.insort(self._taken, (base, base + end - first))
                    self._lock.notify_all()

    def stop(self) -> None:
        """Read no more (reads in flight finish) and close the files."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    @property
    def bytes_read(self) -> int:
        """Bytes this read-ahead has read (the log, tests)."""
        with self._lock:
            return self._bytes_read

    @property
    def finished(self) -> bool:
        """Whether it has nothing left to read (the end of the files, or stopped)."""
        with self._lock:
            return self._stopped or self._cursor >= self._end

    # -- the reading thread --------------------------------------------------------------------------------------------
    def _next_span(self) -> tuple[int, int] | None:
        """The next range to read (under the lock), past the taken ranges; None at the end."""
        while self._cursor < self._end:
            index = bisect.bisect_right(self._taken, (self._cursor, self._end + 1)) - 1
            if index >= 0 and self._taken[index][1] > self._cursor:  # inside a taken range: skip it
                self._cursor = self._taken[index][1]
                continue
            later = self._taken[index + 1][0] if index + 1 < len(self._taken) else self._end
            segment_end = next(base + end - first for _, first, end, base in self._segments
                               if base <= self._cursor < base + end - first)
            return self._cursor, min(self._cursor + self._chunk, later, segment_end)
        return None

    def _run(self) -> None:
        try:
            while True:
                self._in_flight.acquire()
                with self._lock:
                    span = None
                    while not self._stopped:
                        span = self._next_span()
                        if span is None or self._kept + self._ahead + (span[1] - span[0]) <= self._room():
                            break
                        self._lock.wait(ROOM_POLL_S)
                    if self._stopped or span is None:
                        self._in_flight.release()
                        return
                    start, end = span
                    self._cursor = end
                    self._ahead += end - start
                    read = self._pool.submit(self._read, start, end)
                    self._reads.append((start, end, read))
        except Exception:  # a read-ahead is an optimisation: the streamers read everything themselves without it
            log.exception("the start-up read-ahead stopped")

    def _read(self, start: int, end: int) -> None:
        try:
            name, first, _, base = next(s for s in self._segments if s[3] <= start < s[3] + s[2] - s[1])
            scratch = getattr(self._scratch, "buffer", None)
            if scratch is None:
                scratch = self._scratch.buffer = bytearray(self._chunk)
            view = memoryview(scratch)[:end - start]
            position, done = first + start - base, 0
            while done < end - start:  # buffered reads: the bytes land in the page cache, where the mapping finds them
                got = os.preadv(self._fds[name], [view[done:]], position + done)
                if got <= 0:
                    break
                done += got
            with self._lock:
                self._bytes_read += done
        except OSError as exc:
            log.info("start-up read-ahead: %s", exc)
        finally:
            self._in_flight.release()
