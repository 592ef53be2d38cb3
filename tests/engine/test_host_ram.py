"""engine.host_ram: the "auto" host-RAM budget sees a memory cgroup's limit (systemd's MemoryMax=, a container), and the
page cache's room for file-backed weights is what the budget leaves beside the process's own memory."""

from __future__ import annotations

from pathlib import Path

from engine import host_ram

GIB = host_ram.GIB


def _cgroup(folder: Path, *, limit: str, current: int, file: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.max").write_text(limit + "\n")
    (folder / "memory.current").write_text(f"{current}\n")
    (folder / "memory.stat").write_text(f"anon {current - file}\nfile {file}\nshmem 0\n")


def test_the_tightest_cgroup_limit_on_the_way_up_caps_the_room_page_cache_not_counted(tmp_path):
    root = tmp_path / "cgroup"
    _cgroup(root / "user.slice", limit="max", current=5 * GIB, file=GIB)
    _cgroup(root / "user.slice" / "drawbot.service", limit=str(10 * GIB), current=3 * GIB, file=2 * GIB)
    proc = tmp_path / "cgroup-of-self"
    proc.write_text("0::/user.slice/drawbot.service\n")
    assert host_ram.cgroup_room_bytes(root, proc) == 9 * GIB  # 10 GiB less 1 GiB that cannot be reclaimed

    _cgroup(root / "user.slice", limit=str(8 * GIB), current=5 * GIB, file=GIB)  # the slice is tighter
    assert host_ram.cgroup_room_bytes(root, proc) == 4 * GIB


def test_no_limit_or_no_cgroup_v2_means_no_cap(tmp_path):
    root = tmp_path / "cgroup"
    _cgroup(root / "a", limit="max", current=GIB, file=0)
    proc = tmp_path / "self"
    proc.write_text("0::/a\n")
    assert host_ram.cgroup_room_bytes(root, proc) is None
    proc.write_text("4:memory:/process_api/x\n")  # cgroup v1 only
    assert host_ram.cgroup_room_bytes(root, proc) is None
    assert host_ram.cgroup_room_bytes(root, tmp_path / "missing") is None


def test_page_cache_room_is_the_budget_less_what_the_process_holds_and_the_margin():
    held = 3 * GIB
    room = host_ram.page_cache_room(10.0, held=held)
    assert room == int((10.0 - host_ram.PAGE_CACHE_MARGIN_GIB) * GIB) - held
    assert host_ram.page_cache_room(2.0, held=held) == 0  # never negative
    assert host_ram.held_bytes() > 0  # this process, measured
