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


def available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / GIB


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
