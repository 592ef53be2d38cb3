"""Host memory for streamed weights: one anonymous memory map per model, page-locked unit by unit, whose pages go back
to the OS once a unit lives on the GPU; and loading DiffSynth's files without holding much more than one copy."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import threading
import weakref
from typing import Iterator

import torch

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE


def return_freed_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks under its mmap threshold, ≈32 MB: most of the
    weight tensors DiffSynth loaded). Without this the host would hold the packed copy and the freed originals."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to do
        pass


LOAD_MAPPED_PARAMS = 100_000_000
"""While DiffSynth loads, its DiskMap re-opens (and so unmaps) a safetensors file after this many parameters; its
default, 10^9, keeps up to 2 GB of a bf16 file mapped, which counts in the process's RSS on top of the weights."""


LOAD_TRIM_INTERVAL_S = 0.25


@contextlib.contextmanager
def frugal_loading() -> Iterator[None]:
    """Around DiffSynth's `from_pretrained`: keep little of the weight files mapped at a time (DiskMap's buffer, read
    from the environment when each DiskMap is made, restored afterwards), and hand freed heap memory back every
    0.25 s (DiffSynth's converters concatenate q/k/v pieces and cast T5 to float8: the freed pieces stay in glibc's
    heap otherwise). Measured on the full-size files (CPU load, 3 runs): load peak RSS 19.7 -> 16.9 GiB, with
    16.5 GiB once packed."""
    name = "DIFFSYNTH_DISK_MAP_BUFFER_SIZE"
    previous = os.environ.get(name)
    os.environ[name] = str(LOAD_MAPPED_PARAMS)
    done = threading.Event()

    def trim() -> None:
        while not done.wait(LOAD_TRIM_INTERVAL_S):
            return_freed_host_memory()

    trimmer = threading.Thread(target=trim, name="load-trim", daemon=True)
    trimmer.start()
    try:
        yield
    finally:
        done.set()
        trimmer.join()
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
        return_freed_host_memory()


def page_align(nbytes: int) -> int:
    return (nbytes + PAGE - 1) // PAGE * PAGE


def page_aligned_empty(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A uint8 buffer of `nbytes` starting on a page boundary (O_DIRECT reads need one); page-locked when `pin`."""
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=pin)
    start = (-raw.data_ptr()) % PAGE
    return raw[start:start + nbytes]


def _unregister_all(base: int, pinned: dict[int, int]) -> None:
    for offset in list(pinned):
        try:
            torch.cuda.cudart().cudaHostUnregister(base + offset)
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass
    pinned.clear()


class HostMemory:
    """One flat uint8 host allocation holding a model's units, each starting on a page. It is an anonymous private
    memory map, so the pages of one unit can be handed back to the OS (`release`) once that unit lives on the GPU for
    good, and the bytes come back (`restore`) if it is ever streamed again. Units are page-locked one by one
    (cudaHostRegister of exactly their range; torch's `pin_memory()` would round every block up to a power of two,
    up to 1.5x the host RAM for these sizes)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        self._map = mmap.mmap(-1, max(nbytes, PAGE), **({"flags": flags} if flags else {}))
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)[:nbytes]
        self._pinned: dict[int, int] = {}  # offset -> registered bytes
        self._released: dict[int, int] = {}  # offset -> bytes handed back to the OS
        self._pin_failed = False
        weakref.finalize(self, _unregister_all, self.tensor.data_ptr(), self._pinned)

    @property
    def pinned_bytes(self) -> int:
        return sum(self._pinned.values())

    @property
    def held_bytes(self) -> int:
        """Bytes of the allocation backed by memory (not handed back)."""
        return self.nbytes - sum(self._released.values())

    def pin(self, offset: int, nbytes: int) -> None:
        """Page-lock one unit's range, once filled: registering touches every page, so pinning first would hold the
        buffer and the weights it is filled from at the same time."""
        if not nbytes or offset in self._pinned or self._pin_failed:
            return
        error = int(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr() + offset, nbytes, 0))
        if error == 0:
            self._pinned[offset] = nbytes
        else:  # e.g. a locked-memory limit (WSL): still correct, only slower copies
            self._pin_failed = True
            log.warning("could not page-lock host memory for the weights (cudaError %d); copies will be slower", error)

    def release(self, offset: int, nbytes: int) -> bool:
        """Hand a unit's pages back to the OS (its bytes read as zeros afterwards). False where the OS cannot (no
        madvise): the bytes stay."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None or not hasattr(self._map, "madvise") or offset in self._released or not nbytes:
            return False
        if offset in self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr() + offset)
            del self._pinned[offset]
        self._map.madvise(advice, offset, page_align(nbytes))
        self._released[offset] = nbytes
        return True

    def restore(self, offset: int, source: torch.Tensor, *, pin: bool) -> None:
        """Fill a released range again (from the unit's GPU copy) and page-lock it."""
        if offset not in self._released:
            return  # never handed back: the bytes are still there
        self.tensor[offset:offset + source.numel()].copy_(source)
        del self._released[offset]
        if pin:
            self.pin(offset, source.numel())


