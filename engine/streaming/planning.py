"""Residency planning: which units stay on the GPU, from the device-wide peak of a calibration generation."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import torch

DEFAULT_MARGIN_GB = 0.9
"""Kept free under the budget: allocator fragmentation grows over a 20-step run beyond what the 1-step calibration
shows (0.74 GiB of a 0.75 margin was used on an H200 at 1024², 8 GB), and peaks shorter than the sampling interval."""
DECODE_TILES = (64, 32)
"""VAE decode tile and stride in latent pixels (512 / 256 image pixels) when the budget needs a tiled decode."""


def choose_resident(unit_bytes: Sequence[int], allowance: int) -> frozenset[int]:
    """Which units to keep on the GPU within `allowance` bytes. Residents are spread evenly through the execution
    order (by bytes), so that between two streamed units there is resident compute to hide the next copy behind;
    what the even spread leaves of the allowance is then filled with any units that still fit."""
    total = sum(unit_bytes)
    if allowance <= 0 or not unit_bytes:
        return frozenset()
    if allowance >= total:
        return frozenset(range(len(unit_bytes)))
    share = allowance / total
    chosen: set[int] = set()
    resident = seen = 0
    for index, nbytes in enumerate(unit_bytes):
        seen += nbytes
        if resident + nbytes / 2 <= share * seen and resident + nbytes <= allowance:
            chosen.add(index)
            resident += nbytes
    for index in sorted(set(range(len(unit_bytes))) - chosen, key=lambda i: -unit_bytes[i]):
        if resident + unit_bytes[index] <= allowance:
            chosen.add(index)
            resident += unit_bytes[index]
    return frozenset(chosen)


class DevicePeak:
    """Samples device-wide used memory (total - free, as nvidia-smi counts it) from a thread every `interval` s while
    in the `with` block; `peak` is the largest value seen."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-peak", daemon=True)

    def sample(self) -> None:
        free, total = torch.cuda.mem_get_info(self.device)
        self.peak = max(self.peak, total - free)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "DevicePeak":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@dataclass(frozen=True)
class MemoryReport:
    """What calibration measured and what the plan decided (bytes unless named otherwise)."""

    budget: int
    device_peak: int
    """Device-wide used memory at its peak with nothing resident, for the decode mode chosen: what the plan subtracts
    from the budget."""
    main_peak: int
    """Device-wide peak of the calibration generation (tiled decode)."""
    untiled_decode_peak: int
    """Device-wide peak of an untiled VAE decode alone."""
    decode_tiled: bool
    context: int
    """Device memory used outside PyTorch's allocator after calibration (CUDA context, kernels)."""
    persistent: int
    """Allocated by weights that never move (globals, CLIP, VAE decoder) and the slot buffers."""
    working: int
    """Peak allocated above `persistent` during the calibration generation."""
    margin: int
    allowance: int
    dit_resident: int
    dit_streamed: int
    t5_resident: int
    t5_streamed: int
    slots: int
    slot_bytes: int

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
