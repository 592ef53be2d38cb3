"""The slot ring and the streamer: a model cut into units that run one after another, each unit's weights packed
into one byte range of host memory; resident units copied to the GPU once, streamed ones copied ahead into a ring of
GPU slots on a side stream, ordered against compute by events (see engine.streaming for the whole picture)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from engine import compat
from engine.streaming.host_memory import HostMemory, page_align, page_aligned_empty, return_freed_host_memory
from engine.streaming.kernels import Upcaster
from engine.streaming.patches import Patches
from engine.streaming.weight_cache import DIRECT_AHEAD_BUFFERS, FileMemory, WeightCache

compat.apply()  # before the first diffsynth import

from diffsynth.core.vram.layers import AutoTorchModule, AutoWrappedLinear  # noqa: E402

log = logging.getLogger(__name__)

ALIGNMENT = 256
"""Bytes. Every parameter view starts on this boundary (vectorised kernels and cuBLAS want aligned pointers)."""
SMALL_WRAPPER_NUMEL = 1 << 16
"""A wrapped non-Linear layer with fewer parameters than this (a norm scale) is kept in the compute dtype."""
DEFAULT_SLOTS = 3
"""Ring depth: with 3, a double block's copy (≈6 ms on PCIe 5) has two blocks of compute to hide behind."""


DISK_READAHEAD_BYTES = 768 << 20
"""File-backed units read from the disk at every pass: how much of them the kernel is asked to read ahead (about
three DiT double blocks), so the disk keeps reading while page-cache units are copied and the GPU computes."""
STAGING_BUFFERS = 2
"""Page-locked buffers that file-backed units pass through on their way to a slot (one filling, one copying)."""


@dataclass
class FileRead:
    """What the reader thread does around one file-backed unit's copy: `ahead` before it (ask the kernel to read the
    next unit from the disk meanwhile), `done` after it (drop the unit from the page cache when it is beyond the
    room the page cache has for this model)."""

    ahead: Callable[[], None]
    done: Callable[[], None]
    direct: Callable[[torch.Tensor], bool] | None = None
    """Reads the unit from the disk straight into a page-aligned staging buffer (O_DIRECT, past the page cache);
    False when it cannot, and the unit is copied from the mapping instead. None: a unit kept in the page cache."""


def _align(nbytes: int) -> int:
    return (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass
class _Entry:
    """One parameter's place in its unit's flat byte range."""

    param: torch.nn.Parameter
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


@dataclass
class _Unit:
    index: int
    module: torch.nn.Module
    entries: list[_Entry]
    nbytes: int
    host: torch.Tensor = None  # type: ignore[assignment]  # uint8 view into the model's HostMemory, set when packed
    host_views: list[torch.Tensor] = field(default_factory=list)
    device: torch.Tensor | None = None  # uint8 buffer on the GPU while resident
    device_views: list[torch.Tensor] = field(default_factory=list)

    @property
    def host_offset(self) -> int:
        """Where `host` starts in the model's HostMemory (a page boundary)."""
        return int(self.host.storage_offset())

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]

    def point(self, views: list[torch.Tensor]) -> None:
        for entry, view in zip(self.entries, views):
            set_data(entry.param, view)


def set_data(param: torch.Tensor, value: torch.Tensor) -> None:
    """`param.data = value`; a parameter built on `meta` (engine.streaming.loading) cannot take data of another
    device type that way, so the first time its tensor is swapped in place: the same Python object (DiffSynth's
    wrappers and our entries keep it) now holds `value`."""
    if param.is_meta and not value.is_meta:
        torch.utils.swap_tensors(param, torch.nn.Parameter(value, requires_grad=param.requires_grad))
    else:
        param.data = value


def _wrapper_of(model: torch.nn.Module) -> dict[int, AutoTorchModule]:
    """id(parameter) -> the DiffSynth VRAM wrapper that owns it (its forward casts what it needs)."""
    owners: dict[int, AutoTorchModule] = {}
    for module in model.modules():
        if isinstance(module, AutoTorchModule):
            for param in module.parameters():
                owners.setdefault(id(param), module)
    return owners


def _device_dtype(wrapper: AutoTorchModule | None, param: torch.Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter has on the GPU. Linear weights keep their storage dtype (DiffSynth casts them per call);
    a tiny wrapped layer, or a parameter no wrapper casts, is stored in the compute dtype."""
    if wrapper is None:
        return compute_dtype
    if isinstance(wrapper, AutoWrappedLinear):
        return param.dtype if param is wrapper.weight else compute_dtype  # a bias is tiny: no cast per call
    if sum(p.numel() for p in wrapper.parameters()) < SMALL_WRAPPER_NUMEL:
        return compute_dtype
    return param.dtype


class SlotPool:
    """A few GPU buffers that streamed units take turns in, shared by every streamed model (their phases never
    overlap), plus the side stream and the events that order copies against compute."""

    def __init__(self, device: torch.device | str, slot_bytes: int, count: int):
        self.device = torch.device(device)
        self.slot_bytes = slot_bytes
        self.cuda = self.device.type == "cuda"
        self.buffers = [torch.empty(max(slot_bytes, 1), dtype=torch.uint8, device=self.device) for _ in range(count)]
        self.tags: list[tuple | None] = [None] * count
        # On a CPU there is no side stream: copies are plain and ordered by program order (Any: None there).
        self.copy_stream: Any = torch.cuda.Stream(self.device) if self.cuda else None
        self.ready: list[Any] = [torch.cuda.Event() if self.cuda else None for _ in range(count)]
        self.free: list[Any] = [torch.cuda.Event() if self.cuda else None for _ in range(count)]
        self.staging: list[torch.Tensor] = []  # page-locked, made at the first staged copy (file-backed weights)
        self._staging_memory: HostMemory | None = None
        self.staged: list[Any] = []
        self._next_stage = 0
        self.pending: list[Future | None] = [None] * count  # a staged copy into the slot the reader has not queued yet
        self._read_thread: ThreadPoolExecutor | None = None

    @property
    def count(self) -> int:
        return len(self.buffers)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def load(self, slot: int, source: torch.Tensor, tag: tuple, *, synchronous: bool,
             staged: FileRead | None = None) -> None:
        """Copy `source` (host bytes) into `slot`. Async: on the side stream, after the slot's last user finished.
        `staged`: `source` is a mapped weight-cache file (pageable, maybe not even in RAM): unless synchronous, the
        reader thread copies it through a page-locked staging buffer, and `acquire` waits for that."""
        target = self.buffers[slot][:source.numel()]
        if staged is not None and not synchronous:
            self.pending[slot] = self._reader().submit(self._read_into_slot, slot, source, target, staged)
            self.tags[slot] = tag
            return
        self._wait_reads()  # the reader's copies go first: one order on the side stream
        if self.cuda and not synchronous:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[slot])
                target.copy_(source, non_blocking=True)
                self.ready[slot].record(self.copy_stream)
        else:
            if self.cuda:  # an earlier async copy may still be writing: order after it, then copy blocking
                torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            target.copy_(source)
            if self.cuda:
                self.ready[slot].record(torch.cuda.current_stream(self.device))
        if staged is not None:
            staged.done()
        self.tags[slot] = tag

    def claim(self, slot: int, tag: tuple) -> None:
        """A weightless pass (see `ModelStreamer.weightless`): `slot` now stands for the unit tagged `tag`, with
        whatever bytes it holds; nothing is read or copied."""
        self._wait_reads()
        self.tags[slot] = tag

    def blank(self) -> None:
        """Zero every slot and forget what they held: a weightless pass computes on zeros (finite values, no NaN),
        and the next real pass copies every unit again."""
        self._wait_reads()
        for buffer in self.buffers:
            buffer.zero_()
        self.tags = [None] * self.count

    def _reader(self) -> ThreadPoolExecutor:
        if self._read_thread is None:
            self._read_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-reader")
        return self._read_thread

    def _read_into_slot(self, slot: int, source: torch.Tensor, target: torch.Tensor, read: FileRead) -> None:
        """In the reader thread, in submission order: the unit's bytes into the next staging buffer (once the GPU
        copy that last read that buffer has finished), from the disk directly or from the mapping, then its copy
        into the slot queued on the side stream. The compute thread meanwhile queues kernels; it waits only in
        `acquire`, if the weights are late."""
        read.ahead()
        with torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext():
            if not self.staging:
                self._make_staging()
            index = self._next_stage
            self._next_stage = (index + 1) % len(self.staging)
            if self.cuda:
                self.staged[index].synchronize()
            staging = self.staging[index]
            buffer = staging[:source.numel()]
            if read.direct is None or not read.direct(staging):
                buffer.copy_(source)
            read.done()
            if not self.cuda:  # no side stream: the slot's last user has finished (CPU compute is synchronous)
                target.copy_(buffer)
                return
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[slot])
                target.copy_(buffer, non_blocking=True)
                self.ready[slot].record(self.copy_stream)
                self.staged[index].record(self.copy_stream)

    def _make_staging(self) -> None:
        """STAGING_BUFFERS page-aligned buffers of a slot's size (O_DIRECT reads land in them): on a GPU in one
        anonymous map page-locked as exactly that (torch's pinned allocator would round each up to a power of two:
        512 MiB for a 320 MiB slot)."""
        size = page_align(self.slot_bytes)
        if self.cuda:
            self._staging_memory = HostMemory(size * STAGING_BUFFERS)
            self._staging_memory.pin(0, size * STAGING_BUFFERS)
            self.staging = [self._staging_memory.tensor[i * size:(i + 1) * size] for i in range(STAGING_BUFFERS)]
        else:
            self.staging = [page_aligned_empty(size) for _ in range(STAGING_BUFFERS)]
        self.staged = [torch.cuda.Event() if self.cuda else None for _ in range(STAGING_BUFFERS)]

    def _wait_reads(self) -> None:
        for slot, pending in enumerate(self.pending):
            if pending is not None:
                self.pending[slot] = None
                pending.result()

    def close(self) -> None:
        """Finish the reader's queued copies and end its thread."""
        self._wait_reads()
        if self._read_thread is not None:
            self._read_thread.shutdown()
            self._read_thread = None

    def acquire(self, slot: int) -> None:
        """The compute stream waits (on the GPU) until the slot's copy has landed (for a staged copy, first until the
        reader thread has queued it)."""
        pending = self.pending[slot]
        if pending is not None:
            self.pending[slot] = None
            pending.result()
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def release(self, slot: int) -> None:
        """Mark the point after the work queued so far on the compute stream: the slot may be overwritten after it."""
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))


def spread_kept(sizes: Sequence[int], room: int) -> set[int]:
    """Positions (in pass order) of the units the page cache keeps: as many bytes as fit `room`, spread evenly
    through the pass (a unit is kept while the bytes kept so far stay within room's share of the bytes passed)."""
    total = sum(sizes)
    if total <= room:
        return set(range(len(sizes)))
    kept: set[int] = set()
    kept_bytes = passed = 0
    for position, size in enumerate(sizes):
        passed += size
        if kept_bytes + size <= min(room, room * passed / total + size / 2):
            kept.add(position)
            kept_bytes += size
    return kept


class ModelStreamer:
    """Owns where one DiffSynth model's weights live. Units are streamed or resident; everything else in the model
    (embedders, final layers: small) is resident. DiffSynth's own VRAM management is switched off for this model."""

    _ids = itertools.count(1)

    def __init__(self, name: str, model: torch.nn.Module, units: Sequence[torch.nn.Module], device: str | torch.device,
                 *, compute_dtype: torch.dtype = torch.bfloat16, pin: bool | None = None,
                 patches: Patches | None = None, weight_cache: WeightCache | None = None,
                 source: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """`source(param)` gives a parameter's value (in its dtype, on the CPU) when the model was built without
        weights (engine.streaming.loading: parameters on `meta`); by default the parameters hold their values."""
        self.name = name
        self.patches = patches if patches is not None else Patches()
        self.model = model
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self._id = next(self._ids)
        self._serial = itertools.count()
        self.pool: SlotPool | None = None
        self.synchronous = False
        self.weightless = False
        """Streamed units run on whatever their slot holds, nothing is read (`PipelineStreaming.weightless`)."""
        self._unfilled: list[int] = []  # resident units whose GPU bytes `fill_resident` has still to read
        self._hooks: list = []
        self._order: list[int] = []
        self._position: dict[int, int] = {}
        self._cursor = 0
        self._loaded: dict[int, tuple[int, tuple]] = {}
        self._active: tuple[int, int] | None = None
        self._view_cache: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._dropped: frozenset[int] = frozenset()  # file-backed units dropped from the page cache after each read
        self._disk_ahead: dict[int, list[int]] = {}  # unit -> the dropped units asked of the disk while it is read
        pin = self.device.type == "cuda" if pin is None else pin
        read: Callable[[torch.Tensor], torch.Tensor] = source if source is not None else (lambda param: param.data)

        owners = _wrapper_of(model)
        seen: set[int] = set()
        self.units: list[_Unit] = []
        for index, module in enumerate(units):
            entries, offset = [], 0
            for param in module.parameters():
                if id(param) in seen:
                    continue
                seen.add(id(param))
                dtype = _device_dtype(owners.get(id(param)), param, compute_dtype)
                nbytes = param.numel() * dtype.itemsize
                entries.append(_Entry(param, offset, nbytes, dtype, param.shape))
                offset = _align(offset + nbytes)
            self.units.append(_Unit(index, module, entries, offset))

        # Pack all units into one host allocation, unit by unit (each on its own pages), reading or dropping each
        # original tensor once copied, so the host holds little more than one copy at any time. With a weight cache,
        # the allocation is the mapped cache file instead (built once, one tensor at a time), and nothing is
        # page-locked.
        total = sum(page_align(u.nbytes) for u in self.units)
        self.file_backed = weight_cache is not None and bool(self.units)
        if self.file_backed:
            assert weight_cache is not None
            layout = [(u.nbytes, [(str(e.dtype), e.offset, e.nbytes) for e in u.entries]) for u in self.units]

            def write_unit(index: int, buffer: torch.Tensor) -> None:
                unit = self.units[index]
                for entry, view in zip(unit.entries, unit.views(buffer)):
                    view.copy_(read(entry.param))

            self.host_memory: HostMemory | FileMemory = weight_cache.memory(name, layout, total, write_unit)
            pin = False
        else:
            self.host_memory = HostMemory(total)
        self.pin = pin
        start = 0
        for unit in self.units:
            unit.host = self.host_memory.tensor[start:start + unit.nbytes]
            unit.host_views = unit.views(unit.host)
            if not self.file_backed:
                for entry, view in zip(unit.entries, unit.host_views):
                    view.copy_(read(entry.param))  # same dtype, or an exact upcast of a small norm scale
            unit.point(unit.host_views)
            start += page_align(unit.nbytes)
            return_freed_host_memory()  # unit by unit: the host never holds much more than one copy
        if pin:
            for unit in self.units:
                self.host_memory.pin(unit.host_offset, unit.nbytes)

        # Everything outside the units stays on the GPU for good.
        self.global_bytes = 0
        for param in model.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            dtype = _device_dtype(owners.get(id(param)), param, compute_dtype)
            set_data(param, read(param).to(device=self.device, dtype=dtype))
            self.global_bytes += param.numel() * dtype.itemsize
        for name_, buffer in model.named_buffers():
            if buffer.device != self.device:
                module_name, _, attr = name_.rpartition(".")
                owner = model.get_submodule(module_name) if module_name else model
                owner._buffers[attr] = buffer.to(self.device)

        # DiffSynth's wrappers: "prepared" for good, with the dtype their weights have on the GPU, and the model out of
        # the pipeline's load_models_to_device() (which would move these weights back to the CPU after each stage).
        upcaster = self.upcaster = Upcaster()
        patch = functools.partial(self.patches.set, group=f"streamer:{name}")
        for module in model.modules():
            if isinstance(module, AutoTorchModule):
                params = list(module.parameters())
                patch(module, "state", 2)
                patch(module, "preparing_device", module.computation_device)
                patch(module, "preparing_dtype", params[0].dtype if params else module.computation_dtype)
                if isinstance(module, AutoWrappedLinear):
                    patch(module, "cast_to", upcaster)  # DiffSynth's computation() calls self.cast_to
        patch(model, "vram_management_enabled", False)

    # -- state ---------------------------------------------------------------------------------------------------------
    @property
    def unit_bytes(self) -> list[int]:
        return [u.nbytes for u in self.units]

    @property
    def resident(self) -> frozenset[int]:
        return frozenset(u.index for u in self.units if u.device is not None)

    @property
    def resident_bytes(self) -> int:
        return sum(u.nbytes for u in self.units if u.device is not None)

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied to the GPU per forward pass."""
        return sum(u.nbytes for u in self.units if u.device is None)

    @property
    def max_streamed_unit_bytes(self) -> int:
        return max((u.nbytes for u in self.units if u.device is None), default=0)

    def attach(self, pool: SlotPool) -> None:
        """Start streaming through `pool` (hooks on every unit)."""
        if self.pool is not None:
            raise RuntimeError(f"{self.name}: already attached")
        if self.units and pool.slot_bytes < max(self.unit_bytes):
            raise ValueError(f"{self.name}: slot of {pool.slot_bytes} B is smaller than its largest unit")
        self.pool = pool
        for unit in self.units:
            self._hooks.append(unit.module.register_forward_pre_hook(self._make_pre_hook(unit.index)))
            self._hooks.append(unit.module.register_forward_hook(self._make_post_hook(unit.index)))
        self._replan()

    def set_resident(self, indices: Sequence[int] | frozenset[int], *, fill: bool = True) -> None:
        """Keep exactly these units on the GPU (copied once, blocking); the others are streamed. A resident unit's
        host copy is handed back to the OS (at 12 GB that is 7.7 GiB of host RAM for MajicFLUX's DiT); if the unit
        is streamed again later, its bytes are copied back from the GPU first. `fill=False`: the new resident units
        get their GPU buffers (zeroed) and the plan takes effect, but their bytes are read by `fill_resident` later,
        which may run in another thread while a weightless pass computes (start-up: the reads overlap compiling)."""
        wanted = set(indices)
        if not wanted <= set(range(len(self.units))):
            raise ValueError(f"{self.name}: no such units {sorted(wanted - set(range(len(self.units))))}")
        self.reset()
        unfilled = set(self._unfilled)
        self._unfilled = [i for i in self._unfilled if i in wanted]
        for unit in self.units:
            if unit.index in wanted and unit.device is None:
                # Zeroed only when a weightless pass may run on it before it is filled.
                unit.device = (torch.empty if fill else torch.zeros)(unit.nbytes, dtype=torch.uint8,
                                                                     device=self.device)
                unit.device_views = unit.views(unit.device)
                unit.point(unit.device_views)
                self._unfilled.append(unit.index)
            elif unit.index not in wanted and unit.device is not None:
                if unit.index not in unfilled:  # its host bytes were handed back: they come from the GPU copy
                    self.host_memory.restore(unit.host_offset, unit.device, pin=self.pin)
                unit.point(unit.host_views)
                unit.device, unit.device_views = None, []
        self._replan()
        if fill:
            self.fill_resident()

    def fill_resident(self) -> int:
        """Read the bytes of the resident units `set_resident(fill=False)` left empty onto the GPU, then hand their
        host copies back (pinned: page-locked RAM; file-backed: the page cache). Units of a file-backed model that
        are not in the page cache come from the disk with O_DIRECT, the next ones read ahead meanwhile (copied
        from the mapping they would come in page fault by page fault). Safe in a thread of its own while the model
        runs a weightless pass. Returns the bytes read."""
        pending, self._unfilled = list(self._unfilled), []
        if not pending:
            return 0
        from_disk = self._resident_from_disk(pending)
        buffer = page_aligned_empty(page_align(max(self.units[i].nbytes for i in from_disk))) if from_disk else None
        for index in pending:
            unit = self.units[index]
            assert unit.device is not None
            if buffer is not None and index in from_disk:
                position = from_disk.index(index)
                self._read_from_disk(unit, from_disk[position + 1:position + 1 + DIRECT_AHEAD_BUFFERS], buffer)
            else:
                unit.device.copy_(unit.host)  # blocking: done before the host pages go
            self.host_memory.release(unit.host_offset, unit.nbytes)
        return sum(self.units[i].nbytes for i in pending)

    def _resident_from_disk(self, loading: list[int]) -> list[int]:
        """Of the units about to become resident, those a file-backed model reads from the disk with O_DIRECT: the
        ones not (wholly) in the page cache."""
        memory = self.host_memory
        if not isinstance(memory, FileMemory) or not memory.direct_reads:
            return []
        return [index for index in loading
                if memory.cached_fraction(self.units[index].host_offset, self.units[index].nbytes) < 1]

    def warm_page_cache(self) -> int:
        """File-backed: read the streamed units the page cache keeps (`keep_in_page_cache`) into it now, so the first
        picture after a start finds them there. Returns the bytes read."""
        memory = self.host_memory
        if not isinstance(memory, FileMemory):
            return 0
        kept = [self.units[i] for i in self._order if i not in self._dropped]
        return sum(memory.warm(unit.host_offset, unit.nbytes) for unit in kept)

    def _read_from_disk(self, unit: _Unit, following: list[int], buffer: torch.Tensor) -> None:
        """`unit`'s bytes onto its GPU buffer through `buffer` with O_DIRECT, the `following` disk units read ahead
        meanwhile (from the mapping where O_DIRECT fails)."""
        memory, device = self.host_memory, unit.device
        assert isinstance(memory, FileMemory) and device is not None
        for index in following:
            memory.prefetch_direct(self.units[index].host_offset, self.units[index].nbytes)
        if memory.read_direct(unit.host_offset, unit.nbytes, buffer):
            device.copy_(buffer[:unit.nbytes])
        else:
            device.copy_(unit.host)

    def reset(self) -> None:
        """Forget what is in the slots and point streamed weights back to host memory (after an error mid-forward)."""
        if self._active is not None:
            index, slot = self._active
            self.units[index].point(self.units[index].host_views)
            if self.pool is not None:
                self.pool.release(slot)
            self._active = None
        self._loaded.clear()

    def _replan(self) -> None:
        self._order = [u.index for u in self.units if u.device is None]
        self._dropped &= frozenset(self._order)
        self._disk_ahead = {}  # planned again by keep_in_page_cache
        self._position = {index: position for position, index in enumerate(self._order)}
        self._cursor = 0
        self._loaded.clear()
        if self.pool is not None and self.max_streamed_unit_bytes > self.pool.slot_bytes:
            raise ValueError(f"{self.name}: a streamed unit does not fit the pool's slots")

    # -- the schedule --------------------------------------------------------------------------------------------------
    @property
    def _ring(self) -> SlotPool:
        if self.pool is None:
            raise RuntimeError(f"{self.name}: not attached to a slot pool")
        return self.pool

    def _ring_size(self) -> int:
        return 1 if self.synchronous else min(self._ring.count, len(self._order))

    def _fill(self, slot: int) -> None:
        """Copy the next streamed unit in execution order into `slot` (unless it is still intact there)."""
        index = self._order[self._cursor]
        self._cursor = (self._cursor + 1) % len(self._order)
        known = self._loaded.get(index)
        if known is not None and known[0] == slot and self._ring.tags[slot] == known[1]:
            return
        tag = (self._id, index, next(self._serial))
        if self.weightless:
            self._ring.claim(slot, tag)
        else:
            self._ring.load(slot, self.units[index].host, tag, synchronous=self.synchronous,
                            staged=self._file_read(index, self._order[self._cursor]) if self.file_backed else None)
        self._loaded[index] = (slot, tag)

    def _file_read(self, index: int, following: int) -> FileRead:
        memory = self.host_memory
        assert isinstance(memory, FileMemory)
        unit = self.units[index]
        by_direct_io = memory.direct_reads
        # The next unit through the page cache (a disk unit read with O_DIRECT would only be read twice).
        next_in_cache = following not in self._dropped or not by_direct_io
        ahead = [self.units[i] for i in ((following,) if next_in_cache else ()) + tuple(self._disk_ahead.get(index, ()))]

        def read_ahead() -> None:
            for later in ahead:
                if by_direct_io and later.index in self._dropped:
                    memory.prefetch_direct(later.host_offset, later.nbytes)
                else:
                    memory.prefetch(later.host_offset, later.nbytes)

        if index in self._dropped:
            # The drop also covers a direct read that fell back to the mapping (for a direct one it finds nothing).
            read_direct = functools.partial(memory.read_direct, unit.host_offset, unit.nbytes) if by_direct_io \
                else None
            return FileRead(read_ahead, functools.partial(memory.drop, unit.host_offset, unit.nbytes), read_direct)
        return FileRead(read_ahead, lambda: None)

    def keep_in_page_cache(self, room: int) -> int:
        """File-backed: which streamed units stay in the page cache within `room` bytes; the others are read from
        the disk at every pass, so a pass finds the kept ones in RAM (left to itself, the kernel's LRU would evict
        each unit just before it is needed again once a pass is larger than the page cache: every byte from the
        disk). The disk units are spread evenly through the pass, so each one's read overlaps the compute of the
        kept units before it instead of all of them waiting at the end. They are read with O_DIRECT where the file
        system allows it (past the page cache); otherwise through it, dropped after each read, and while a unit is
        read the next DISK_READAHEAD_BYTES of disk units are asked for (room is left for them). Returns the bytes
        kept."""
        if not self.file_backed:
            self._dropped, self._disk_ahead = frozenset(), {}
            return 0
        memory = self.host_memory
        assert isinstance(memory, FileMemory)
        sizes = [page_align(self.units[i].nbytes) for i in self._order]
        memory.forget_read_ahead()
        through_page_cache = not memory.direct_reads
        if sum(sizes) > room and through_page_cache:
            room -= DISK_READAHEAD_BYTES
        kept_indices = spread_kept(sizes, max(room, 0))
        dropped = {index for position, index in enumerate(self._order) if position not in kept_indices}
        self._dropped = frozenset(dropped)
        for index in dropped:  # what a build or an earlier plan left in the page cache would only crowd the kept
            memory.drop(self.units[index].host_offset, self.units[index].nbytes)
        self._disk_ahead = {}
        for position, index in enumerate(self._order):
            ahead, queued = [], 0
            for step in range(1, len(self._order)):
                later = self._order[(position + step) % len(self._order)]
                if later not in dropped:
                    continue
                if through_page_cache and queued < DISK_READAHEAD_BYTES:
                    ahead.append(later)
                    queued += self.units[later].nbytes
                elif not through_page_cache and len(ahead) < DIRECT_AHEAD_BUFFERS:
                    ahead.append(later)  # read with O_DIRECT into a spare buffer while this unit is copied
            self._disk_ahead[index] = ahead
        return sum(sizes[i] for i in kept_indices)

    @property
    def dropped_bytes(self) -> int:
        """Bytes of streamed units read from the disk at every pass (see `keep_in_page_cache`)."""
        return sum(self.units[index].nbytes for index in self._dropped)

    def _resync(self, index: int) -> None:
        """The unit about to run is not in a slot (first forward, another model used the slots, or an unexpected
        order): restart the ring at it."""
        self._cursor = self._position[index]
        for slot in range(self._ring_size()):
            self._fill(slot)

    def _make_pre_hook(self, index: int):
        def pre_hook(module, args):
            if self._active is not None:  # the previous unit never finished (an exception): clean up first
                self.reset()
            unit = self.units[index]
            if unit.device is not None:
                return None
            known = self._loaded.get(index)
            if known is None or self._ring.tags[known[0]] != known[1]:
                self._resync(index)
                known = self._loaded[index]
            slot = known[0]
            self._ring.acquire(slot)
            unit.point(self._slot_views(unit, slot))
            self._active = (index, slot)
            return None

        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(module, args, output):
            unit = self.units[index]
            if unit.device is not None or self._active is None:
                return None
            _, slot = self._active
            self._active = None
            self._ring.release(slot)
            unit.point(unit.host_views)
            if not self.synchronous:
                self._fill(slot)  # prefetch: the next streamed unit goes where this one was
            return None

        return post_hook

    def _slot_views(self, unit: _Unit, slot: int) -> list[torch.Tensor]:
        key = (unit.index, slot)
        if key not in self._view_cache:
            self._view_cache[key] = unit.views(self._ring.buffers[slot])
        return self._view_cache[key]

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.reset()
