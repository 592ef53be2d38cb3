"""What a picture's size costs in memory on the device the engine draws on, and the largest size that fits.

A size no user may afford must be refused before the job is accepted: on the CPU an oversized picture does not fail
politely, the kernel's OOM killer ends the whole bot (issue 11: 2048x2048 took more than 23 GiB). No library knows
DiffSynth's working memory, so this small model of it is our own; its figures are measured (bench/size_cost.py,
bench/README.md), not guessed.

- CPU: the working memory grows with the square of the pixel count. The VAE decoder's mid-block attention over
  (W/8)*(H/8) latent positions is computed whole (the attention matrix is materialised on the CPU): the decode alone
  has the same peak as the whole generation. Measured on the tiny model (the CPU fallback), 1 step: 140 MiB at 512²,
  730 MiB at 768², 2304 MiB at 1024² above the loaded process; `CPU_BYTES_PER_PIXEL_SQUARED` is that fit plus a
  quarter. The budget is the memory the system has available once the models are loaded (MemAvailable, or the
  cgroup's limit when that is lower), less `CPU_RESERVE_FRACTION` for everything else on the machine.
- GPU (`stream` mode): the start-up calibration generation (engine.streaming) measured the working memory above the
  weights at the default size, and the residency plan filled the VRAM budget up to a safety margin. Activations grow
  linearly with the pixel count on the GPU (memory-efficient attention kernels, a tiled or convolution-bound VAE
  decode), so a size fits while its extra working memory stays within the part of the budget the plan left unused.
- Other GPU modes (`offload`, `resident`) have no calibration: no size limit beyond the config's (a GPU out-of-memory
  error fails only that one job, it does not end the process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from engine.host_ram import cgroup_room_bytes

MIB = 1024**2
GIB = 1024**3
CPU_BYTES_PER_PIXEL_SQUARED = 2304 * MIB / (1024 * 1024) ** 2 * 1.25
"""Working bytes per (width*height)² on the CPU: 2304 MiB measured at 1024x1024 (tiny model), plus 25%."""
CPU_FIXED_BYTES = 64 * MIB
"""Working memory of any picture on the CPU, however small (15-22 MiB measured at 128²-256²), rounded up."""
CPU_RESERVE_FRACTION = 0.15
"""Of the memory available at start-up, kept for the rest of the system and the bot's own growth."""
SIDE_STEP = 16
"""Picture sides are multiples of this (DiffSynth's latent patches)."""


@dataclass(frozen=True)
class SizeCost:
    """Working memory of a picture as fixed + linear + quadratic terms of its pixel count, and the budget for it."""

    device: str
    """"cpu" or "cuda": what the owner's machine draws on (named in refusals)."""
    budget_bytes: float
    fixed_bytes: float = 0.0
    per_pixel: float = 0.0
    per_pixel_squared: float = 0.0

    def bytes_for(self, width: int, height: int) -> float:
        pixels = width * height
        return self.fixed_bytes + self.per_pixel * pixels + self.per_pixel_squared * pixels * pixels

    def affordable(self, width: int, height: int) -> bool:
        return self.bytes_for(width, height) <= self.budget_bytes

    @property
    def largest_pixels(self) -> int:
        """The largest width*height whose working memory fits the budget (0: not even a tiny picture fits)."""
        room = self.budget_bytes - self.fixed_bytes
        if room <= 0:
            return 0
        a, b = self.per_pixel_squared, self.per_pixel
        if a > 0:
            pixels = (-b + math.sqrt(b * b + 4 * a * room)) / (2 * a)
        elif b > 0:
            pixels = room / b
        else:
            return 2**62
        return int(pixels)


def largest_like(width: int, height: int, largest_pixels: int, *, min_side: int = SIDE_STEP) -> tuple[int, int]:
    """The largest size with about the shape of width x height, both sides multiples of 16, within largest_pixels."""
    scale = math.sqrt(largest_pixels / (width * height)) if width * height else 0.0
    w = max(min_side, int(width * scale) // SIDE_STEP * SIDE_STEP)
    h = max(min_side, int(height * scale) // SIDE_STEP * SIDE_STEP)
    while w * h > largest_pixels and max(w, h) > min_side:  # the floor at min_side may overshoot: shave
        if w >= h:
            w -= SIDE_STEP
        else:
            h -= SIDE_STEP
    return w, h


def available_host_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup"),
                          proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes the system can give this process now without swapping: MemAvailable, or the room left under the memory
    limits of this process's own cgroup and its parents (systemd's MemoryMax= on the unit, a container's limit) when
    that is less. None where neither can be read."""
    available: int | None = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    room = cgroup_room_bytes(cgroup, proc_cgroup)
    if room is not None:
        available = room if available is None else min(available, room)
    return available


def cpu_size_cost(available_bytes: int | None = None) -> SizeCost | None:
    """The CPU's cost model under the memory available now (None: unknown, so no size limit can be derived)."""
    available = available_host_memory() if available_bytes is None else available_bytes
    if available is None:
        return None
    return SizeCost("cpu", budget_bytes=available * (1 - CPU_RESERVE_FRACTION), fixed_bytes=CPU_FIXED_BYTES,
                    per_pixel_squared=CPU_BYTES_PER_PIXEL_SQUARED)


def gpu_size_cost(report, *, calibrated_pixels: int) -> SizeCost | None:
    """The GPU's cost model from engine.streaming's calibration report (a MemoryReport): the working memory measured
    at `calibrated_pixels`, scaled linearly, against the budget the residency plan left unused at that size."""
    # The larger of the allocator's working peak and the device-wide peak above context + weights: conservative.
    working = max(report.working, report.device_peak - report.context - report.persistent)
    if working <= 0 or calibrated_pixels <= 0:
        return None
    unused = report.allowance - report.dit_resident - report.t5_resident
    # At the calibrated size the working memory fits by construction; each extra pixel costs working/pixels more.
    per_pixel = working / calibrated_pixels
    return SizeCost("cuda", budget_bytes=working + max(unused, 0), per_pixel=per_pixel)
