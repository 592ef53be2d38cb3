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
def test_streamed_units_beyond_the_page_cache_room_are_read_from_the_disk_and_draw_the_same(tiny_settings, tmp_path,
                                                                                           monkeypatch):
    """Under a host-RAM budget too small for every streamed unit, the units beyond the room are dropped from the page
    cache after each read (so the ones kept are not evicted by the cyclic read), and the picture does not change."""
    from engine.streaming import streamer

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
    assert _picture(filed, "a lynx in snow") == expected
    path = dit.host_memory.path
    dropped = [u for u in units if u.index in dit._dropped]
    held = [u for u in units if u.index not in dit._dropped]
    assert dropped and held
    # Out of the page cache after the picture: every dropped unit but the one read ahead for the next pass.
    assert sum(_cached_fraction(path, u.host_offset, u.nbytes) == 0 for u in dropped) >= len(dropped) - 1
    assert all(_cached_fraction(path, u.host_offset, u.nbytes) == 1 for u in held)

    assert all(not ahead for ahead in dit._disk_ahead.values())
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


def test_the_disk_is_asked_for_the_next_dropped_units_while_kept_ones_are_read(tiny_settings, tmp_path, monkeypatch):
    """With read-ahead, every unit's read asks the kernel for the dropped units coming next in the pass (up to
    DISK_READAHEAD_BYTES), and room is left for them."""
    from engine.streaming import streamer

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
