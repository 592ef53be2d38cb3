"""The weight cache's start-up read-ahead (engine.streaming.read_ahead), on the CPU with real files and the page
cache: it reads the files in order within its room and reads on as the streamers use what it read; a range a
streamer takes before it gets there is never read by it, one it has started is waited for; the engine starts it on
T5 before loading and stops it when ready; through it the tiny model draws the same picture, and no byte of the
start-up pass comes from the disk twice."""

from __future__ import annotations

import os
import time

import pytest

from engine.jobs import GenerationRequest
from tests.engine.test_weight_cache import _cached_fraction, _has_o_direct

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise (Linux) to drop pages")

KIB = 1024
CHUNK = 64 * KIB


def _files(tmp_path, *sizes):
    paths = []
    for number, size in enumerate(sizes):
        path = tmp_path / f"part{number}.weights"
        path.write_bytes(os.urandom(size))
        _drop(path)
        paths.append(path)
    return paths


def _drop(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _settled(read_ahead, *, seconds: float = 5.0) -> int:
    """Wait until the read-ahead has stopped reading (its bytes stay the same for a while); its bytes read."""
    deadline, last = time.monotonic() + seconds, -1
    while time.monotonic() < deadline:
        time.sleep(0.15)
        now = read_ahead.bytes_read
        if now == last:
            return now
        last = now
    raise AssertionError("the read-ahead kept reading")


def test_it_reads_in_order_within_its_room_and_reads_on_as_the_bytes_are_used(tmp_path):
    from engine.streaming.read_ahead import StartupReadAhead

    first, second = _files(tmp_path, 8 * CHUNK, 8 * CHUNK)
    room = {"bytes": 3 * CHUNK}
    read_ahead = StartupReadAhead([first, second], lambda: room["bytes"], chunk=CHUNK, readers=2)
    try:
        assert _settled(read_ahead) == 3 * CHUNK  # no further than the room
        assert _cached_fraction(first, 0, 3 * CHUNK) == 1 and _cached_fraction(first, 3 * CHUNK, 5 * CHUNK) == 0
        # Two chunks used and dropped: two more read. Then two used and kept: they still count against the room.
        read_ahead.done(str(first), 0, 2 * CHUNK, kept=False)
        assert _settled(read_ahead) == 5 * CHUNK
        read_ahead.done(str(first), 2 * CHUNK, 2 * CHUNK, kept=True)
        assert _settled(read_ahead) == 5 * CHUNK  # kept 2 + one read ahead = the room
        room["bytes"] = 1 << 30  # room for everything: on into the second file, to the end
        assert _settled(read_ahead) == 16 * CHUNK
        assert read_ahead.finished
        assert _cached_fraction(second, 0, 8 * CHUNK) == 1
    finally:
        read_ahead.stop()


def test_a_range_taken_before_it_is_reached_is_never_read_and_one_read_is_handed_over(tmp_path):
    """What a streamer reads itself (O_DIRECT disk units) must not come from the disk twice: taken before the
    read-ahead got there, it is skipped for good; what the read-ahead read is handed over (in the page cache)."""
    from engine.streaming.read_ahead import StartupReadAhead

    first, second = _files(tmp_path, 4 * CHUNK, 6 * CHUNK)
    room = {"bytes": 0}  # nothing read until the streamer has taken its range
    read_ahead = StartupReadAhead([first, second], lambda: room["bytes"], chunk=CHUNK, readers=2)
    try:
        assert not read_ahead.take(str(second), 2 * CHUNK, 2 * CHUNK)
        assert not read_ahead.take(str(second), 2 * CHUNK, 2 * CHUNK)  # asked again: still its own
        room["bytes"] = 1 << 30
        assert _settled(read_ahead) == 8 * CHUNK
        assert _cached_fraction(second, 2 * CHUNK, 2 * CHUNK) == 0
        assert _cached_fraction(second, 0, 2 * CHUNK) == 1 and _cached_fraction(second, 4 * CHUNK, 2 * CHUNK) == 1
        assert read_ahead.take(str(first), CHUNK, 2 * CHUNK)  # read already: handed over
        assert not read_ahead.take(str(tmp_path / "another.weights"), 0, CHUNK)  # not one of its files
    finally:
        read_ahead.stop()
    assert not read_ahead.take(str(first), 0, CHUNK)  # stopped: everything is the streamers' own


def test_a_file_being_rebuilt_is_not_read(tmp_path):
    from engine.streaming.read_ahead import StartupReadAhead

    first, second = _files(tmp_path, 4 * CHUNK, 4 * CHUNK)
    room = {"bytes": 0}
    read_ahead = StartupReadAhead([first, second], lambda: room["bytes"], chunk=CHUNK)
    try:
        read_ahead.forget(str(first))
        room["bytes"] = 1 << 30
        assert _settled(read_ahead) == 4 * CHUNK
        assert _cached_fraction(first, 0, 4 * CHUNK) == 0 and _cached_fraction(second, 0, 4 * CHUNK) == 1
    finally:
        read_ahead.stop()


def _load(settings):
    from engine.pipeline import FluxPipeline

    return FluxPipeline.load(settings)


def test_the_engine_reads_t5_ahead_while_it_loads_and_stops_when_ready(tiny_settings, tmp_path, caplog, monkeypatch):
    from engine import host_ram

    # Room in the page cache under a budget below the tiny model's pinned need (1 GiB): without MajicFLUX's margin
    # for the CUDA libraries' pages.
    monkeypatch.setattr(host_ram, "PAGE_CACHE_MARGIN_GIB", 0.0)
    settings = tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 0.95,
                                                "weight_cache_dir": tmp_path / "cache"})
    built = _load(settings)  # builds the cache: nothing to read ahead yet
    expected = built.generate(GenerationRequest("a heron", 5, 2, 64, 64), lambda d, t: None).png
    paths = [built.streaming.t5.host_memory.path, built.streaming.dit.host_memory.path]
    for path in paths:
        _drop(path)
    caplog.set_level("INFO", logger="engine.pipeline")
    from engine.streaming.weight_cache import HEADER_ROOM

    restarted = _load(settings)
    t5 = paths[0]
    data = os.path.getsize(t5) - HEADER_ROOM
    assert restarted.startup.read_ahead_bytes == data  # T5, all of it (the budget has room), and not the DiT
    assert any("start-up read-ahead" in r.getMessage() for r in caplog.records)
    assert _cached_fraction(t5, HEADER_ROOM, data) == 1
    assert all(s.host_memory.read_ahead is None for s in (restarted.streaming.dit, restarted.streaming.t5))
    assert restarted.generate(GenerationRequest("a heron", 5, 2, 64, 64), lambda d, t: None).png == expected


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "page-cache"])
def test_a_start_up_pass_through_the_read_ahead_draws_the_same_and_reads_no_byte_twice(tiny_settings, tmp_path,
                                                                                       monkeypatch, direct):
    """The start-up generation's pass with the read-ahead running beside it: the same picture; every byte of the
    weight cache comes from the disk once (read ahead, or by the streamer itself: O_DIRECT for the disk units);
    afterwards the units kept are in the page cache."""
    from engine.streaming import streamer, weight_cache
    from engine.streaming.read_ahead import StartupReadAhead

    if direct and not _has_o_direct(tmp_path):
        pytest.skip(f"{tmp_path}'s file system has no O_DIRECT")
    monkeypatch.setattr(weight_cache, "USE_DIRECT_IO", direct)
    monkeypatch.setattr(streamer, "DISK_READAHEAD_BYTES", 0)
    request = GenerationRequest("a heron", 5, 1, 64, 64)  # one step: one pass over the DiT, as the calibration
    pinned = _load(tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 64}))
    expected = pinned.generate(request, lambda d, t: None).png
    filed = _load(tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 0.5,
                                                   "weight_cache_dir": tmp_path / "cache"}))
    dit, t5 = filed.streaming.dit, filed.streaming.t5
    half = sum(u.nbytes for u in dit.units) // 2
    filed.streaming.keep_in_page_cache(half)
    assert dit._dropped and len(dit._dropped) < len(dit.units)
    memories = [t5.host_memory, dit.host_memory]
    for memory in memories:
        _drop(memory.path)
    # The tiny model's units are small: chunks of one page, so that ranges are read ahead and taken by turns.
    read_ahead = StartupReadAhead([m.path for m in memories], lambda: 1 << 30, start=weight_cache.HEADER_ROOM,
                                  chunk=os.sysconf("SC_PAGE_SIZE"), readers=2)
    before = [m.direct_bytes for m in memories]
    for memory in memories:
        memory.read_ahead = read_ahead
    try:
        assert filed.generate(request, lambda d, t: None).png == expected
    finally:
        read_ahead.stop()
        for memory in memories:
            memory.read_ahead = None
    direct_bytes = sum(m.direct_bytes - b for m, b in zip(memories, before))
    data = sum(os.path.getsize(m.path) - weight_cache.HEADER_ROOM for m in memories)
    assert read_ahead.bytes_read + direct_bytes <= data
    if not direct:
        assert direct_bytes == 0
    path = dit.host_memory.path
    assert all(_cached_fraction(path, u.host_offset, u.nbytes) == 1 for u in dit.units if u.index not in dit._dropped)


def test_what_was_read_ahead_stays_through_the_start_up_plan_and_the_pass_reads_nothing_itself(tiny_settings, tmp_path,
                                                                                             monkeypatch):
    """Read ahead before the start-up's page-cache plan (as while the models load): the plan does not drop the disk
    units the read-ahead read for the coming pass, and that pass takes every unit from the page cache: nothing read
    from the disk by the streamers (O_DIRECT), the same picture; the disk units are dropped once used."""
    from engine.streaming import weight_cache
    from engine.streaming.read_ahead import StartupReadAhead

    if not _has_o_direct(tmp_path):
        pytest.skip(f"{tmp_path}'s file system has no O_DIRECT")
    request = GenerationRequest("a heron", 5, 1, 64, 64)
    filed = _load(tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": 0.5,
                                                   "weight_cache_dir": tmp_path / "cache"}))
    filed.streaming.keep_in_page_cache(1 << 40)
    expected = filed.generate(request, lambda d, t: None).png
    dit, t5 = filed.streaming.dit, filed.streaming.t5
    memories = [t5.host_memory, dit.host_memory]
    for memory in memories:
        _drop(memory.path)
    read_ahead = StartupReadAhead([m.path for m in memories], lambda: 1 << 30, start=weight_cache.HEADER_ROOM)
    for memory in memories:
        memory.read_ahead = read_ahead
    try:
        data = sum(os.path.getsize(m.path) - weight_cache.HEADER_ROOM for m in memories)
        assert _settled(read_ahead) == data
        filed.streaming.keep_in_page_cache(sum(u.nbytes for u in dit.units) // 2)  # the start-up's plan
        dropped = [u for u in dit.units if u.index in dit._dropped]
        assert dropped and all(_cached_fraction(dit.host_memory.path, u.host_offset, u.nbytes) == 1 for u in dropped)
        before = [m.direct_bytes for m in memories]
        assert filed.generate(request, lambda d, t: None).png == expected
        assert [m.direct_bytes for m in memories] == before
    finally:
        read_ahead.stop()
        for memory in memories:
            memory.read_ahead = None
    assert all(_cached_fraction(dit.host_memory.path, u.host_offset, u.nbytes) == 0 for u in dropped)
