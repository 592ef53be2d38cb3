"""The converted weight cache: when host RAM is short (below `engine.host_ram_budget_gb`), a streamed model's units
live in a file on disk instead of page-locked memory, packed in execution order in their storage dtype (float8 DiT
and T5), each unit on its own page. The file is mapped read-only: its pages are page cache, which the kernel evicts
under pressure instead of swapping, so the process holds no anonymous copy of the weights.

File: magic, a JSON header (format version, the source files' sizes and mtimes, the packed layout, the data
length), then the data from the first page boundary after the header. It is written once (to a temporary name,
then renamed, so a crash or a full disk leaves no partial cache), reused at every start while the header matches,
and rebuilt when a source file changed or the file is truncated or foreign.

Units read from the disk at every pass (those beyond the page cache's room) are read with O_DIRECT, in parallel
chunks, into the page-locked staging buffer, or ahead of time into a spare buffer while earlier units are copied:
the page cache is not churned (no reclaim in a full memory cgroup, nothing to drop afterwards) and the disk sees
several large requests at once, which is what reaches its sequential rate. Where the file system refuses O_DIRECT,
they are copied from the mapping instead."""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import logging
import mmap
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from engine.streaming.host_memory import PAGE, page_align, page_aligned_empty

log = logging.getLogger(__name__)

MAGIC = b"DRAWBOT-WEIGHTS\n"
VERSION = 1
HEADER_ROOM = 1 << 20
"""Bytes reserved for magic + header length + JSON header; data starts here (a page boundary)."""


USE_DIRECT_IO = True
"""Read the units that come from the disk at every pass with O_DIRECT where the file system allows it (see above);
False: always through the page cache (tests of that path)."""
DIRECT_CHUNK = 8 << 20
"""Bytes per O_DIRECT request: large enough for the disk's sequential rate, small enough for several in flight."""
DIRECT_READERS = 4
"""O_DIRECT requests in flight at once (the queue depth an NVMe or a virtual disk needs for its full rate)."""


DIRECT_AHEAD_BUFFERS = 2
"""Disk units read ahead with O_DIRECT while earlier units are copied (each buffer a unit's size: 2 x 320 MiB of
anonymous memory for the DiT, counted in what the process holds)."""


WARM_CHUNK = 8 << 20
"""Bytes per buffered read when the page cache is warmed (`FileMemory.warm`)."""
WARM_READERS = 4
"""Buffered reads in flight while warming: as for O_DIRECT, what a disk needs for its sequential rate."""

@functools.cache
def _mincore() -> Callable[..., int] | None:
    """libc's mincore(2), or None (not Linux, no libc)."""
    try:
        return ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None


class WeightCacheError(Exception):
    """The weight cache cannot be written (full disk, read-only folder): one line with the fix."""


def source_fingerprint(paths: Sequence[Path]) -> list[dict]:
    return [{"path": str(Path(p).resolve()), "size": os.stat(p).st_size, "mtime_ns": os.stat(p).st_mtime_ns}
            for p in paths]


def layout_digest(layout: Sequence[tuple[int, Sequence[tuple[str, int, int]]]]) -> str:
    """md5 of the packed layout: per unit (bytes, [(dtype, offset, nbytes)])."""
    return hashlib.md5(json.dumps(layout).encode()).hexdigest()


def _read_header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= HEADER_ROOM - len(MAGIC) - 8:
                return None
            header = json.loads(f.read(length))
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        return None
    if size != HEADER_ROOM + int(header.get("data_bytes", -1)):  # truncated, or grown by something else
        return None
    return header


class FileMemory:
    """The HostMemory interface over a mapped cache file: `tensor` views the data (read-only use), nothing is
    page-locked, `release` drops a resident unit's mapped pages (the bytes stay in the file), `restore` has nothing
    to do. Offsets are positions in the file, i.e. the storage offsets of views of `tensor` (the data starts at
    HEADER_ROOM)."""

    pinned_bytes = 0

    def __init__(self, path: Path, nbytes: int):
        self.path = path
        self.nbytes = nbytes
        self._file = open(path, "rb")
        self._map = mmap.mmap(self._file.fileno(), HEADER_ROOM + max(nbytes, PAGE), access=mmap.ACCESS_COPY)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)[HEADER_ROOM:HEADER_ROOM + nbytes]
        self._released: dict[int, int] = {}
        self._direct_fd: int | None = None
        self._direct_pool: ThreadPoolExecutor | None = None  # made with the descriptor; threads start on first use
        self._ahead: dict[int, tuple[torch.Tensor, list[Future], int]] = {}  # offset -> (buffer, reads, nbytes)
        self._spare: list[torch.Tensor] = []  # read-ahead buffers not in use
        self._ahead_lock = threading.Lock()  # the reader thread reads ahead; a new plan (another thread) forgets
        self.direct_reads = USE_DIRECT_IO and hasattr(os, "O_DIRECT") and self._open_direct()
        """Whether `read_direct` can read this file past the page cache."""
        self.direct_bytes = 0
        """Bytes read with O_DIRECT so far (the log, tests)."""
        self._warm_pool: ThreadPoolExecutor | None = None
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))  # for mincore; the export ends here

    def _open_direct(self) -> bool:
        try:
            self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            self._direct_pool = ThreadPoolExecutor(DIRECT_READERS, thread_name_prefix="weight-disk")
        except OSError as exc:  # tmpfs on older kernels, some network and FUSE file systems
            log.info("the disk reads of %s go through the page cache (no O_DIRECT there: %s)", self.path,
                     exc.strerror or exc)
            return False
        return True

    @property
    def held_bytes(self) -> int:
        return 0  # page cache, reclaimable: nothing the process holds

    def pin(self, offset: int, nbytes: int) -> None:
        return None

    def release(self, offset: int, nbytes: int) -> bool:
        """A unit now resident on the GPU: its bytes leave the process and the page cache (read once, at start)."""
        self.drop(offset, nbytes)
        self._released[offset] = nbytes
        return True

    def restore(self, offset: int, source: torch.Tensor, *, pin: bool) -> None:
        self._released.pop(offset, None)

    def prefetch(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to start reading these bytes from the disk now (a no-op for pages already cached): the
        next unit's read overlaps this one's copy."""
        self._advise(getattr(mmap, "MADV_WILLNEED", None), offset, nbytes)

    def cached_fraction(self, offset: int, nbytes: int) -> float:
        """Share of these bytes' pages in the page cache now (mincore(2) on the mapping); 0.0 where that cannot be
        asked (no mincore), so the caller reads them from the disk."""
        if nbytes <= 0:
            return 1.0
        mincore = _mincore()
        if mincore is None:
            return 0.0
        start = offset // PAGE * PAGE
        length = offset + nbytes - start
        pages = (length + PAGE - 1) // PAGE
        vector = (ctypes.c_ubyte * pages)()
        if mincore(ctypes.c_void_p(self._address + start), ctypes.c_size_t(length), vector) != 0:
            return 0.0
        return sum(v & 1 for v in vector) / pages

    def warm(self, offset: int, nbytes: int) -> int:
        """Read these bytes into the page cache (large buffered reads, WARM_READERS at a time) unless they are there
        already; returns the bytes read."""
        if nbytes <= 0 or self.cached_fraction(offset, nbytes) == 1:
            return 0
        fd = self._file.fileno()

        def read(start: int) -> None:
            scratch = bytearray(WARM_CHUNK)  # dropped after the read: the page cache keeps the bytes
            length = min(WARM_CHUNK, offset + nbytes - start)
            done = 0
            while done < length:
                got = os.preadv(fd, [memoryview(scratch)[done:length]], start + done)
                if got <= 0:
                    raise OSError(errno.EIO, f"short read at byte {start + done}")
                done += got

        with self._ahead_lock:
            if self._warm_pool is None:
                self._warm_pool = ThreadPoolExecutor(WARM_READERS, thread_name_prefix="weight-warm")
            pool = self._warm_pool
        for future in [pool.submit(read, start) for start in range(offset, offset + nbytes, WARM_CHUNK)]:
            future.result()
        return nbytes

    def read_direct(self, offset: int, nbytes: int, into: torch.Tensor) -> bool:
        """Read these bytes from the disk into `into` (a CPU uint8 tensor, page-aligned, at least `nbytes` rounded
        up to a page) with O_DIRECT, DIRECT_READERS requests at a time; they do not enter the page cache. Bytes
        `prefetch_direct` asked for are waited for and copied instead. False when that cannot be done here (no
        O_DIRECT, an unaligned buffer or offset, the file system refused the read: then it stops trying for this
        file), and the caller copies from the mapping."""
        length = page_align(nbytes)
        if (not self.direct_reads or offset % PAGE or into.data_ptr() % PAGE or into.numel() < length
                or into.device.type != "cpu" or into.dtype != torch.uint8):
            return False
        with self._ahead_lock:
            ahead = self._ahead.pop(offset, None)
        try:
            if ahead is not None and ahead[2] == nbytes:
                buffer, reads, _ = ahead
                for read in reads:
                    read.result()
                into[:nbytes].copy_(buffer[:nbytes])
                with self._ahead_lock:
                    self._spare.append(buffer)
            else:
                if ahead is not None:
                    spare = self._finish(ahead)
                    with self._ahead_lock:
                        self._spare.append(spare)
                for read in self._submit(offset, nbytes, into):
                    read.result()
        except OSError as exc:
            self._give_up(exc)
            return False
        self.direct_bytes += nbytes
        return True

    def prefetch_direct(self, offset: int, nbytes: int) -> None:
        """Start reading these bytes with O_DIRECT into a spare buffer now, so the disk keeps reading while the
        reader copies units from the page cache; `read_direct` of the same range then only waits for what is still
        coming and copies. At most DIRECT_AHEAD_BUFFERS ranges are under way: beyond that the request is skipped
        (evicting one would throw away the read of a unit that is about to be used)."""
        with self._ahead_lock:
            self._prefetch_direct(offset, nbytes)

    def _prefetch_direct(self, offset: int, nbytes: int) -> None:
        if not self.direct_reads or offset % PAGE or offset in self._ahead or len(self._ahead) >= DIRECT_AHEAD_BUFFERS:
            return
        length = page_align(nbytes)
        try:
            buffer = next((b for b in self._spare if b.numel() >= length), None)
            if buffer is None:
                buffer = page_aligned_empty(length)
                if self._spare:  # too small for this unit: replaced
                    self._spare.pop(0)
            else:
                self._spare.remove(buffer)
            self._ahead[offset] = (buffer, self._submit(offset, nbytes, buffer), nbytes)
        except OSError as exc:
            self._give_up(exc)

    def forget_read_ahead(self) -> None:
        """A new plan: wait for the reads ahead and let their buffers go (the next ones are made to size)."""
        with self._ahead_lock:
            aheads = list(self._ahead.values())
            self._ahead.clear()
            self._spare.clear()
        for ahead in aheads:
            self._finish(ahead)

    def _submit(self, offset: int, nbytes: int, into: torch.Tensor) -> list[Future]:
        pool = self._direct_pool
        if pool is None:
            raise OSError(errno.EBADF, "closed")
        view = into.numpy().data.cast("B")[:page_align(nbytes)]
        return [pool.submit(self._pread, view[start:start + DIRECT_CHUNK], offset + start,
                            min(DIRECT_CHUNK, nbytes - start)) for start in range(0, nbytes, DIRECT_CHUNK)]

    @staticmethod
    def _finish(ahead: tuple[torch.Tensor, list[Future], int]) -> torch.Tensor:
        """Wait for a read-ahead nobody will use (its buffer is about to be written again); its buffer."""
        buffer, reads, _ = ahead
        for read in reads:
            try:
                read.result()
            except OSError:
                pass
        return buffer

    def _give_up(self, exc: OSError) -> None:
        self.direct_reads = False
        log.warning("O_DIRECT reads of %s failed (%s): reading through the page cache from now on", self.path,
                    exc.strerror or exc)

    def _pread(self, view: memoryview, position: int, needed: int) -> None:
        """Fill `view` from `position`; at least `needed` bytes must come (the rest may lie past the file's end)."""
        done = 0
        fd = self._direct_fd
        assert fd is not None
        while done < needed:
            got = os.preadv(fd, [view[done:]], position + done)
            if got <= 0:
                raise OSError(errno.EIO, f"short read at byte {position + done}")
            done += got

    def close(self) -> None:
        """Stop the O_DIRECT readers and close the file's descriptors (the mapping stays until collected)."""
        self.forget_read_ahead()
        if self._warm_pool is not None:
            self._warm_pool.shutdown()
            self._warm_pool = None
        if self._direct_pool is not None:
            self._direct_pool.shutdown()
            self._direct_pool = None
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        self.direct_reads = False

    def drop(self, offset: int, nbytes: int) -> None:
        """Unmap these bytes and drop them from the page cache (they are read again from the disk next time), so
        that a cyclic read of more than the page cache can hold does not evict the units it can hold (LRU's worst
        case: every byte from the disk)."""
        self._advise(getattr(mmap, "MADV_DONTNEED", None), offset, nbytes)
        if hasattr(os, "posix_fadvise") and nbytes:
            os.posix_fadvise(self._file.fileno(), offset, page_align(nbytes), os.POSIX_FADV_DONTNEED)

    def _advise(self, advice: int | None, offset: int, nbytes: int) -> None:
        if advice is not None and hasattr(self._map, "madvise") and nbytes:
            self._map.madvise(advice, offset, page_align(nbytes))


@dataclass
class WeightCache:
    """Where the cache files live, and the source files each model's file is converted from."""

    folder: Path
    sources: dict[str, list[Path]]
    """model name ("dit", "t5") -> the downloaded files it comes from."""
    built: list[str] | None = None
    """Names of the files built (not reused) by this process: for tests and the log."""

    def path(self, name: str) -> Path:
        return Path(self.folder) / f"{name}.weights"

    def memory(self, name: str, layout: Sequence[tuple[int, Sequence[tuple[str, int, int]]]], nbytes: int,
               write_unit: Callable[[int, torch.Tensor], None]) -> FileMemory:
        """The mapped cache file for model `name`, built first when missing or stale: `write_unit(i, buffer)` fills
        unit i's packed bytes into `buffer` (one unit in RAM at a time)."""
        path = self.path(name)
        expected = {"version": VERSION, "sources": source_fingerprint(self.sources.get(name, [])),
                    "layout": layout_digest(layout), "data_bytes": nbytes}
        header = _read_header(path)
        if header != expected:
            why = "missing" if not path.exists() else "stale, truncated or foreign" if header is None or \
                header.get("sources") == expected["sources"] else "a source file changed"
            log.info("building the weight cache %s (%s): %.2f GiB", path, why, nbytes / 2**30)
            self._build(path, expected, layout, write_unit)
            self.built = [*(self.built or []), name]
        else:
            log.info("reusing the weight cache %s", path)
        return FileMemory(path, nbytes)

    def _build(self, path: Path, header: dict, layout, write_unit) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        encoded = json.dumps(header).encode()
        try:
            with open(partial, "wb") as f:
                f.write(MAGIC + len(encoded).to_bytes(8, "little") + encoded)
                offset = 0
                for index, (unit_bytes, _) in enumerate(layout):
                    buffer = torch.zeros(page_align(unit_bytes), dtype=torch.uint8)
                    write_unit(index, buffer[:unit_bytes])
                    f.seek(HEADER_ROOM + offset)
                    f.write(buffer.numpy().data)
                    offset += page_align(unit_bytes)
                f.truncate(HEADER_ROOM + header["data_bytes"])
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(path.parent).free
                raise WeightCacheError(
                    f"no room for the weight cache {path}: it needs {(HEADER_ROOM + header['data_bytes']) / 2**30:.2f}"
                    f" GiB, {free / 2**30:.2f} GiB are free (fix: free disk space there, or raise "
                    f"engine.host_ram_budget_gb if this PC has the RAM)") from exc
            raise WeightCacheError(f"cannot write the weight cache {path}: {exc.strerror or exc}") from exc
