"""The file-backed weight path (engine.streaming.weight_cache), on the CPU: the tiny model through the real DiffSynth
pipeline draws the same pictures bit for bit as the pinned path and reuses its cache at a restart; a toy streamed
model checks when the cache is rebuilt (changed source, truncated, foreign) and that a full disk is one clear error
that leaves no partial file."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from engine.jobs import GenerationRequest


def _picture(pipeline, prompt: str) -> bytes:
    return pipeline.generate(GenerationRequest(prompt, 7, 3, 64, 64), lambda d, t: None).png


def _load(settings):
    from engine.pipeline import FluxPipeline

    return FluxPipeline.load(settings)


def test_file_backed_pipeline_draws_what_the_pinned_one_draws_and_reuses_its_cache(tiny_settings, tmp_path):
    from engine.streaming.weight_cache import FileMemory

    pinned = _load(tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 64}))
    file_settings = tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 0.5,
                                                     "weight_cache_dir": tmp_path / "cache"})
    filed = _load(file_settings)
    assert not pinned.streaming.dit.file_backed
    for streamer in (filed.streaming.dit, filed.streaming.t5):
        assert streamer.file_backed and isinstance(streamer.host_memory, FileMemory)
        assert streamer.host_memory.held_bytes == 0  # the process holds no copy: page cache only
    assert filed.streaming.dit.host_memory.path.parent == tmp_path / "cache"
    first = {p: _picture(filed, p) for p in ("a red fox, file-backed", "a heron, file-backed")}
    for prompt, png in first.items():
        assert png == _picture(pinned, prompt)  # bit for bit, PNG included
    dit_file = filed.streaming.dit.host_memory.path
    stat = dit_file.stat()
    del filed

    restarted = _load(file_settings)  # a restart: same files, nothing rebuilt
    assert restarted.streaming.weight_cache_built == []
    assert dit_file.stat().st_mtime_ns == stat.st_mtime_ns and dit_file.stat().st_ino == stat.st_ino
    assert _picture(restarted, "a red fox, file-backed") == first["a red fox, file-backed"]
    del restarted

    with open(dit_file, "r+b") as f:  # cut short (a crash, a copied-in file)
        f.truncate(stat.st_size // 2)
    rebuilt = _load(file_settings)
    assert rebuilt.streaming.weight_cache_built == ["dit"]
    assert dit_file.stat().st_size == stat.st_size
    assert _picture(rebuilt, "a heron, file-backed") == first["a heron, file-backed"]


class Toy:
    """Five Linear units, their weights read from a safetensors source file, streamed through two slots."""

    def __init__(self, folder):
        from safetensors.torch import save_file

        torch.manual_seed(0)
        self.source = folder / "toy.safetensors"
        if not self.source.exists():
            save_file({f"{i}.{k}": v for i, layer in enumerate(torch.nn.Sequential(
                *[torch.nn.Linear(16, 16) for _ in range(5)])) for k, v in layer.state_dict().items()}, self.source)

    def stream(self, cache):
        from safetensors.torch import load_file

        from engine.streaming import ModelStreamer, SlotPool

        model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(5)])
        model.load_state_dict(load_file(self.source))
        x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
        expected = [layer(x) for layer in model]
        streamer = ModelStreamer("toy", model, list(model), "cpu", compute_dtype=torch.float32, weight_cache=cache)
        streamer.attach(SlotPool("cpu", max(streamer.unit_bytes), 2))
        assert all(torch.equal(model[i](x), expected[i]) for i in (0, 1, 2, 3, 4, 0))
        return streamer


def _cache(folder, toy):
    from engine.streaming.weight_cache import WeightCache

    return WeightCache(folder, {"toy": [toy.source]})


def test_cache_is_rebuilt_when_its_source_changes_or_it_is_foreign(tmp_path):
    toy = Toy(tmp_path)
    cache = _cache(tmp_path / "cache", toy)
    toy.stream(cache)
    assert cache.built == ["toy"]
    again = _cache(tmp_path / "cache", toy)
    toy.stream(again)
    assert again.built is None  # reused

    stat = toy.source.stat()
    os.utime(toy.source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new download of the file
    changed = _cache(tmp_path / "cache", toy)
    toy.stream(changed)
    assert changed.built == ["toy"]

    path = changed.path("toy")
    size = path.stat().st_size
    path.write_bytes(os.urandom(size))  # same length, not ours
    foreign = _cache(tmp_path / "cache", toy)
    toy.stream(foreign)
    assert foreign.built == ["toy"] and path.read_bytes()[:16] == b"DRAWBOT-WEIGHTS\n"


def test_a_full_disk_while_writing_the_cache_is_one_clear_error_and_leaves_no_partial_file(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (a full disk)")
    from engine.streaming.weight_cache import WeightCacheError

    small = tmp_path / "small"
    small.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(small)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        toy = Toy(tmp_path)
        with pytest.raises(WeightCacheError, match="no room for the weight cache") as error:
            toy.stream(_cache(small, toy))
        assert "free disk space" in str(error.value) and "GiB are free" in str(error.value)
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


def _cached_fraction(path, offset: int, nbytes: int) -> float:
    """Share of the file's pages in [offset, offset + nbytes) that are in the page cache (mincore(2) on a mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            start = offset // page * page
            length = offset + nbytes - start
            pages = (length + page - 1) // page
            vector = (ctypes.c_ubyte * pages)()
            base = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(mapped)) + start)
            assert libc.mincore(base, ctypes.c_size_t(length), vector) == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vector) / pages
        finally:
            del base
            mapped.close()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise (Linux) to drop pages")
@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "page-cache"])
def test_streamed_units_beyond_the_page_cache_room_are_read_from_the_disk_and_draw_the_same(tiny_settings, tmp_path,
                                                                                           monkeypatch, direct):
    """Under a host-RAM budget too small for every streamed unit, the units beyond the room come from the disk at
    every pass without entering the page cache for good (read with O_DIRECT, or dropped after each read where there
    is none), so the ones kept are not evicted by the cyclic read, and the picture does not change."""
    from engine.streaming import streamer, weight_cache

    if direct and not _has_o_direct(tmp_path):
        pytest.skip(f"{tmp_path}'s file system has no O_DIRECT")
    monkeypatch.setattr(weight_cache, "USE_DIRECT_IO", direct)
    # The tiny model's units are far smaller than the disk read-ahead: without it, only the next unit is read ahead.
    monkeypatch.setattr(streamer, "DISK_READAHEAD_BYTES", 0)
    pinned = _load(tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 64}))
    filed = _load(tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 0.5,
                                                   "weight_cache_dir": tmp_path / "cache"}))
    dit = filed.streaming.dit
    units = [dit.units[i] for i in range(len(dit.units))]
    half = sum(u.nbytes for u in units) // 2
    kept = filed.streaming.keep_in_page_cache(half)
    assert 0 < kept <= half
    assert 0 < dit.dropped_bytes < sum(u.nbytes for u in units)
    expected = _picture(pinned, "a lynx in snow")
    before = dit.host_memory.direct_bytes
    assert _picture(filed, "a lynx in snow") == expected
    path = dit.host_memory.path
    dropped = [u for u in units if u.index in dit._dropped]
    held = [u for u in units if u.index not in dit._dropped]
    assert dropped and held
    assert dit.host_memory.direct_reads is direct
    if direct:  # every disk unit read from the disk once per step (3 steps), none through the page cache
        # (plus what the ring reads ahead into the next pass at the last step: at most its two slots)
        read = dit.host_memory.direct_bytes - before
        assert 3 * sum(u.nbytes for u in dropped) <= read <= 3 * sum(u.nbytes for u in dropped) + 2 * max(
            u.nbytes for u in units)
        assert all(_cached_fraction(path, u.host_offset, u.nbytes) == 0 for u in dropped), [(u.index, u.nbytes, _cached_fraction(path, u.host_offset, u.nbytes)) for u in units]
    else:  # out of the page cache after the picture: every dropped unit but the one read ahead for the next pass
        assert sum(_cached_fraction(path, u.host_offset, u.nbytes) == 0 for u in dropped) >= len(dropped) - 1
    assert all(_cached_fraction(path, u.host_offset, u.nbytes) == 1 for u in held)

    order = dit._order
    for position, index in enumerate(order):  # read ahead: the next disk units with O_DIRECT, none through the cache
        upcoming = [order[(position + step) % len(order)] for step in range(1, len(order))]
        coming = [i for i in upcoming if i in dit._dropped][:weight_cache.DIRECT_AHEAD_BUFFERS] if direct else []
        assert dit._disk_ahead[index] == coming
    filed.streaming.keep_in_page_cache(1 << 40)  # room for everything: nothing dropped, all read into the cache
    assert dit.dropped_bytes == 0
    assert _picture(filed, "a lynx in snow") == expected
    assert all(_cached_fraction(path, u.host_offset, u.nbytes) == 1 for u in units)


def test_a_unit_made_resident_leaves_the_page_cache_and_streams_again_unchanged(tiny_settings, tmp_path):
    """A file-backed unit that goes to the device for good is dropped from the page cache (its bytes stay in the
    file); streamed again later, it draws the same picture."""
    filed = _load(tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 0.5,
                                                   "weight_cache_dir": tmp_path / "cache"}))
    dit = filed.streaming.dit
    before = _picture(filed, "a moth at a lamp")
    last = dit.units[-1]
    dit.set_resident({last.index})  # the last unit: its range ends where the file ends
    assert dit.resident == {last.index}
    if hasattr(os, "posix_fadvise"):
        assert _cached_fraction(dit.host_memory.path, last.host_offset, last.nbytes) == 0
    assert _picture(filed, "a moth at a lamp") == before
    dit.set_resident(())
    assert _picture(filed, "a moth at a lamp") == before


def test_units_made_resident_after_a_pass_that_dropped_them_are_read_with_o_direct(tiny_settings, tmp_path):
    """At start-up the plan makes units resident right after a pass that read the disk units past the page cache:
    those come from the disk with O_DIRECT (not page fault by page fault through the mapping), the others from the
    page cache; the picture does not change."""
    if not _has_o_direct(tmp_path):
        pytest.skip(f"{tmp_path}'s file system has no O_DIRECT")
    filed = _load(tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 0.5,
                                                   "weight_cache_dir": tmp_path / "cache"}))
    dit = filed.streaming.dit
    filed.streaming.keep_in_page_cache(sum(u.nbytes for u in dit.units) // 2)
    before = _picture(filed, "a moth at a lamp")
    dropped = sorted(dit._dropped)
    kept = [u.index for u in dit.units if u.index not in dit._dropped]
    assert dropped and kept
    read = dit.host_memory.direct_bytes
    dit.set_resident({*dropped, kept[0]})
    assert dit.host_memory.direct_bytes - read == sum(dit.units[i].nbytes for i in dropped)
    assert _picture(filed, "a moth at a lamp") == before


def test_the_disk_is_asked_for_the_next_dropped_units_while_kept_ones_are_read(tiny_settings, tmp_path, monkeypatch):
    """Through the page cache (no O_DIRECT), every unit's read asks the kernel for the dropped units coming next in
    the pass (up to DISK_READAHEAD_BYTES), and room is left for them."""
    from engine.streaming import streamer, weight_cache

    monkeypatch.setattr(weight_cache, "USE_DIRECT_IO", False)

    filed = _load(tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 0.5,
                                                   "weight_cache_dir": tmp_path / "cache"}))
    dit = filed.streaming.dit
    unit = max(u.nbytes for u in dit.units)
    monkeypatch.setattr(streamer, "DISK_READAHEAD_BYTES", unit)  # about one unit ahead
    total = sum(streamer.page_align(u.nbytes) for u in dit.units)
    kept = dit.keep_in_page_cache(total - 1)  # one page short: read-ahead room is taken from the kept units
    assert kept <= total - 1 - unit
    order = dit._order
    for position, index in enumerate(order):
        ahead = dit._disk_ahead[index]
        upcoming = [order[(position + step) % len(order)] for step in range(1, len(order))]
        coming = [i for i in upcoming if i in dit._dropped]
        assert ahead == coming[:len(ahead)] and bool(ahead) == bool(coming)
        assert sum(dit.units[i].nbytes for i in ahead[:-1]) < unit
    before = _picture(filed, "a wren")
    assert dit.keep_in_page_cache(1 << 40) == total and not any(dit._disk_ahead.values())
    assert _picture(filed, "a wren") == before


def _has_o_direct(folder) -> bool:
    probe = folder / "o_direct_probe"
    probe.write_bytes(b"x" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except (OSError, AttributeError):
        return False
    finally:
        probe.unlink()


def test_disk_units_are_spread_through_the_pass_within_the_room():
    """The units read from the disk are spread evenly through a pass (each one's read overlaps the compute of the
    kept units before it), never more bytes kept than the room, all kept when they fit, none when no unit fits."""
    from engine.streaming.streamer import spread_kept

    assert spread_kept([4] * 10, 20) == {0, 2, 4, 6, 8}
    assert spread_kept([4] * 10, 40) == set(range(10))
    assert spread_kept([4] * 10, 3) == set()
    sizes = [2] * 19 + [1] * 38  # Flux's DiT: 19 double blocks, 38 single blocks of about half the bytes
    for share in (0.1, 0.25, 0.43, 0.6, 0.9):
        room = int(sum(sizes) * share)
        kept = spread_kept(sizes, room)
        kept_bytes = sum(sizes[i] for i in kept)
        assert room - 2 <= kept_bytes <= room
        dropped = [i for i in range(len(sizes)) if i not in kept]
        runs, run = [], 0
        for i in range(len(sizes)):  # the longest stretch of disk units in a row
            run = run + 1 if i in dropped else 0
            runs.append(run)
        assert max(runs) <= int(1 / share) + 2
        halves = sum(sizes[i] for i in kept if i < 19), sum(sizes[i] for i in kept if i >= 19)
        assert abs(halves[0] - halves[1]) <= 3  # both halves of the pass hold about the same bytes in RAM


def test_direct_reads_give_the_mapped_bytes_and_fall_back_where_they_cannot(tmp_path, monkeypatch):
    """`FileMemory.read_direct` reads exactly the file's bytes (a range ending at the file's end included); it
    declines an unaligned buffer, and on a file system without O_DIRECT the pipeline reads through the page cache."""
    from engine.streaming import weight_cache
    from engine.streaming.host_memory import PAGE
    from engine.streaming.host_memory import page_aligned_empty

    if not _has_o_direct(tmp_path):
        pytest.skip(f"{tmp_path}'s file system has no O_DIRECT")
    monkeypatch.setattr(weight_cache, "DIRECT_CHUNK", 2 * PAGE)  # several requests in flight for a small unit
    data = torch.randint(0, 256, (5 * PAGE + 123,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "w.weights"
    path.write_bytes(bytes(weight_cache.HEADER_ROOM) + data.numpy().tobytes())
    memory = weight_cache.FileMemory(path, data.numel())
    assert memory.direct_reads
    buffer = page_aligned_empty(6 * PAGE)
    start = weight_cache.HEADER_ROOM
    assert memory.read_direct(start + PAGE, 4 * PAGE + 123, buffer)  # to the file's end, not a whole page
    assert torch.equal(buffer[:4 * PAGE + 123], data[PAGE:])
    assert memory.read_direct(start, 3 * PAGE - 7, buffer)
    assert torch.equal(buffer[:3 * PAGE - 7], data[:3 * PAGE - 7])
    assert memory.direct_bytes == 7 * PAGE + 116
    assert not memory.read_direct(start, PAGE, buffer[1:])  # unaligned: the caller copies from the mapping
    assert not memory.read_direct(start + 1, PAGE, buffer)
    assert memory.direct_reads  # declining a request does not stop direct reads
    # Read ahead: started now, waited for and copied by the read of the same range; beyond the buffers a request
    # is skipped (that range is read when asked); a range read ahead at another length is read again.
    ranges = [(start + i * PAGE, PAGE + 11 * i) for i in range(weight_cache.DIRECT_AHEAD_BUFFERS + 1)]
    for offset, nbytes in ranges:
        memory.prefetch_direct(offset, nbytes)
    assert list(memory._ahead) == [offset for offset, _ in ranges[:-1]]
    for offset, nbytes in reversed(ranges):
        buffer.zero_()
        assert memory.read_direct(offset, nbytes, buffer)
        assert torch.equal(buffer[:nbytes], data[offset - start:offset - start + nbytes])
    memory.prefetch_direct(start, 2 * PAGE)
    assert memory.read_direct(start, PAGE + 5, buffer) and torch.equal(buffer[:PAGE + 5], data[:PAGE + 5])
    assert not memory._ahead
    memory.close()

    real_open = os.open

    def no_o_direct(file, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_o_direct)
    fallback = weight_cache.FileMemory(path, data.numel())
    assert not fallback.direct_reads and not fallback.read_direct(start, PAGE, buffer)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise (Linux) to drop pages")
def test_cached_fraction_sees_the_page_cache_and_warm_fills_it(tmp_path):
    """`FileMemory.cached_fraction` says how much of a range is in the page cache (as mincore(2) sees it through
    another mapping); `warm` reads a range into it, exactly once."""
    from engine.streaming import weight_cache
    from engine.streaming.host_memory import PAGE

    data = bytes(range(256)) * (64 * PAGE // 256)
    path = tmp_path / "w.weights"
    with open(path, "wb") as f:
        f.write(bytes(weight_cache.HEADER_ROOM) + data)
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be dropped
    memory = weight_cache.FileMemory(path, len(data))
    start = weight_cache.HEADER_ROOM
    memory.drop(start, len(data))
    assert memory.cached_fraction(start, len(data)) == 0 == _cached_fraction(path, start, len(data))
    assert memory.warm(start + 8 * PAGE, 16 * PAGE) == 16 * PAGE
    assert memory.cached_fraction(start + 8 * PAGE, 16 * PAGE) == 1 == _cached_fraction(path, start + 8 * PAGE,
                                                                                         16 * PAGE)
    assert memory.cached_fraction(start, 8 * PAGE) == 0
    assert 0.2 < memory.cached_fraction(start, len(data)) < 0.3
    assert memory.warm(start + 8 * PAGE, 16 * PAGE) == 0  # already there: nothing read
    memory.close()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise (Linux) to drop pages")
def test_resident_units_filled_later_from_another_thread_draw_the_same(tiny_settings, tmp_path):
    """`set_resident(fill=False)` makes the plan take effect with empty GPU buffers; `fill_resident`, run in another
    thread, reads their bytes (from the disk with O_DIRECT where they are not in the page cache, from it where they
    are) and only then hands the host copies back; the picture does not change. A unit made resident and streamed
    again before it was filled keeps its own bytes."""
    if not _has_o_direct(tmp_path):
        pytest.skip(f"{tmp_path}'s file system has no O_DIRECT")
    from concurrent.futures import ThreadPoolExecutor

    filed = _load(tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 0.5,
                                                   "weight_cache_dir": tmp_path / "cache"}))
    dit = filed.streaming.dit
    memory = dit.host_memory
    before = _picture(filed, "an owl at dusk")
    units = dit.units
    cold, warm, never = units[0], units[1], units[2]
    memory.drop(cold.host_offset, cold.nbytes)
    memory.warm(warm.host_offset, warm.nbytes)
    dit.set_resident({cold.index, warm.index, never.index}, fill=False)
    assert dit.resident == {cold.index, warm.index, never.index}
    assert not any(dit.units[cold.index].device.tolist())  # empty until filled
    dit.set_resident({cold.index, warm.index}, fill=False)  # `never` streams again, unfilled: its bytes are the file's
    direct = memory.direct_bytes
    with ThreadPoolExecutor(1) as thread:
        read = thread.submit(dit.fill_resident).result()
    assert read == cold.nbytes + warm.nbytes
    assert memory.direct_bytes - direct == cold.nbytes  # the cold one from the disk, the warm one from the cache
    assert _cached_fraction(memory.path, warm.host_offset, warm.nbytes) == 0  # handed back once on the GPU
    assert torch.equal(cold.device, cold.host) and torch.equal(warm.device, warm.host)
    assert dit.fill_resident() == 0
    assert _picture(filed, "an owl at dusk") == before
    dit.set_resident(())
    assert _picture(filed, "an owl at dusk") == before


def test_the_start_up_generations_read_no_weights_and_warm_the_page_cache(tiny_settings, tmp_path, monkeypatch):
    """The start-up generations (here the CPU's: compile, exact and shape-generic) run weightless: no streamed unit
    is copied while they run, and they compile what the pictures after them use (no graph compiled at the first
    picture). Meanwhile the streamed units the page cache keeps are read into it; the first picture is the
    pinned path's, bit for bit."""
    import torch._dynamo

    from engine import host_ram
    from engine import streaming as module
    from engine.streaming import compiled_graphs, streamer

    torch._dynamo.reset()
    pinned = _load(tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 64}))
    expected = _picture(pinned, "a stoat in ermine")
    copies: list[tuple] = []
    real_load = streamer.SlotPool.load
    monkeypatch.setattr(streamer.SlotPool, "load", lambda self, slot, source, tag, **kw: (
        copies.append(tag), real_load(self, slot, source, tag, **kw))[1])
    real = module.enable_streaming
    monkeypatch.setattr(module, "enable_streaming", lambda pipe, **kw: real(pipe, **{**kw, "compile_backend": "eager"}))
    settings = tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 0.5, "torch_compile": True,
                                                "weight_cache_dir": tmp_path / "cache"})
    dit_bytes = sum(u.nbytes for u in pinned.streaming.dit.units)
    monkeypatch.setattr(host_ram, "page_cache_room", lambda budget: dit_bytes // 2)  # room for half the DiT
    filed = _load(settings)
    try:
        streaming = filed.streaming
        assert streaming.torch_compiled and streaming.startup_seconds.warmup > 0  # both generations ran
        assert copies == []  # no unit copied to a slot at start-up
        dit = streaming.dit
        kept = [dit.units[i] for i in dit._order if i not in dit._dropped]
        assert kept and dit._dropped and all(_cached_fraction(dit.host_memory.path, u.host_offset, u.nbytes) == 1 for u in kept)
        graphs = compiled_graphs()
        assert _picture(filed, "a stoat in ermine") == expected
        assert compiled_graphs() == graphs and copies
    finally:
        filed.streaming.set_torch_compile(False)
        torch._dynamo.reset()
