"""Which weight path `stream` mode takes under the host-RAM budget (`engine.host_ram_budget_gb`). Torch-free: the
doctor uses it too.

- `pinned`: the DiT and T5 units the GPU does not hold stay in page-locked host RAM (the fastest copies).
- `file`: they live in the converted weight cache on disk (engine.streaming.weight_cache), read through the page
  cache, which the kernel can evict: the process itself holds no copy of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from engine.settings import EngineSettings

GIB = 1024**3

PINNED_PATH_GIB = {"majicflus": 17.7, "tiny": 1.0}
"""Host RAM the pinned path needs: the bot process's peak RSS with MajicFLUX (bench/startup.py, run 9: 17.67 GiB
at an 8 GB budget, loading included)."""

FILE_PATH_GIB = {"majicflus": 10.0, "tiny": 0.5}
"""Host RAM the file-backed path runs in, page cache included: a 1024² picture at an 8 GB VRAM budget inside a 10 GiB
memory cgroup (bench/lowram.sh); what the process itself holds (anonymous + pinned) is under 6 GiB of that, the
rest is the page cache that keeps the weight cache's reads fast."""

FILE_PATH_COMPILE_THREADS = 4
"""torch.compile worker processes on the file-backed path (each holds a few hundred MB of its own)."""

WeightPath = Literal["pinned", "file"]


PAGE_CACHE_MARGIN_GIB = 3.0
"""Of the budget, what the file-backed path leaves beside the process's own memory and the weights' page cache: the
torch and CUDA libraries' mapped pages and torch.compile's cache files (page cache too, charged like the weights:
about 2.9 GiB in a memory cgroup, bench/README.md), and growth while drawing."""


def available_gib() -> float:
    """What this process may still use: the machine's available memory, or less where a memory cgroup (systemd's
    MemoryMax=, a container's limit) caps it."""
    import psutil

    available = psutil.virtual_memory().available
    capped = cgroup_room_bytes()
    return (available if capped is None else min(available, capped)) / GIB


def cgroup_room_bytes(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The smallest room left under the memory limits of this process's cgroup and its parents (cgroup v2: memory.max
    minus what is charged there that the kernel cannot reclaim, i.e. memory.current less its page cache); None
    where no limit applies or it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    unified = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    if unified is None:
        return None
    rooms = []
    folder = root / unified.strip("/")
    while True:
        room = _room_in(folder)
        if room is not None:
            rooms.append(room)
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return min(rooms) if rooms else None


def _room_in(folder: Path) -> int | None:
    try:
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        current = int((folder / "memory.current").read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return max(0, int(limit) - (current - int(stat.get("file", 0))))


def held_bytes() -> int:
    """Memory this process holds that the kernel cannot reclaim: anonymous (heap, page-locked buffers) and shared
    memory (Linux /proc/self/status; elsewhere the resident set)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return sum(int(fields[name].split()[0]) * 1024 for name in ("RssAnon", "RssShmem"))
    except (OSError, KeyError, ValueError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def page_cache_room(budget: float, held: int | None = None) -> int:
    """Bytes of the file-backed weights the page cache can keep within a budget of `budget` GiB, beside what the
    process holds (`held`, measured now by default) and PAGE_CACHE_MARGIN_GIB."""
    held = held_bytes() if held is None else held
    return max(0, int((budget - PAGE_CACHE_MARGIN_GIB) * GIB) - held)


def budget_gib(settings: EngineSettings, available: float | None = None) -> float:
    """The host-RAM budget in GiB: the configured number, or for "auto" what the machine has available now."""
    if settings.host_ram_budget_gb == "auto":
        return available if available is not None else available_gib()
    return float(settings.host_ram_budget_gb)


def weight_path(settings: EngineSettings, available: float | None = None) -> WeightPath:
    """`pinned` when the budget holds the pinned path, else `file`."""
    return "pinned" if budget_gib(settings, available) >= PINNED_PATH_GIB[settings.model] else "file"


def weight_cache_dir(settings: EngineSettings) -> Path:
    return Path(settings.weight_cache_dir) if settings.weight_cache_dir else Path(settings.models_dir) / "weight-cache"


def need_gib(settings: EngineSettings, available: float | None = None) -> float:
    """Host RAM `stream` mode needs on the weight path it takes under this budget."""
    table = PINNED_PATH_GIB if weight_path(settings, available) == "pinned" else FILE_PATH_GIB
    return table[settings.model]
