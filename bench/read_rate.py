"""Read rate of a file into the GPU the way the file-backed weight path reads it: mapped file -> page-locked staging
buffer (torch copy) -> GPU, 64 MiB at a time; run once with a warm page cache and once after dropping it to get the
two transfer floors. `--direct`: the way units read from the disk at every pass go (engine.streaming.weight_cache:
O_DIRECT, parallel requests, straight into the staging buffer), for the disk's rate past the page cache. Prints one
JSON line.

    python -m bench.read_rate FILE [--gib 8] [--direct]
"""

from __future__ import annotations

import argparse
import json
import mmap
import time
from typing import Callable

import torch

from engine.streaming.host_memory import page_aligned_empty

CHUNK = 64 << 20
DIRECT_UNIT = 320 << 20
"""About one DiT double block, the size of a unit the engine reads from the disk."""


def to_gpu(total: int, unit: int, fill: Callable[[torch.Tensor, int], None]) -> float:
    """`total` bytes, `unit` at a time: `fill(buffer, offset)` writes each into one of two page-aligned, page-locked
    staging buffers, which is then copied to the GPU on a side stream (the reader thread's path). Seconds taken."""
    cuda = torch.cuda.is_available()
    staging = [page_aligned_empty(unit, pin=cuda) for _ in range(2)]
    done = [torch.cuda.Event() for _ in staging] if cuda else []
    target = torch.empty(unit, dtype=torch.uint8, device="cuda" if cuda else "cpu")
    stream = torch.cuda.Stream() if cuda else None
    started = time.perf_counter()
    for number, offset in enumerate(range(0, total, unit)):
        index = number % 2
        if cuda:
            done[index].synchronize()
        fill(staging[index], offset)
        if cuda:
            with torch.cuda.stream(stream):
                target.copy_(staging[index], non_blocking=True)
                done[index].record(stream)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def report(args, total: int, seconds: float, **extra) -> int:
    print(json.dumps({"label": args.label, "path": args.path, "bytes": total, "seconds": round(seconds, 3),
                      "GBps": round(total / seconds / 1e9, 3), **extra}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--gib", type=float, default=8.0, help="read at most this much")
    parser.add_argument("--label", default="")
    parser.add_argument("--direct", action="store_true", help="O_DIRECT, as the engine reads its disk units")
    args = parser.parse_args(argv)
    if args.direct:
        return direct(args)
    with open(args.path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        data = torch.frombuffer(mapped, dtype=torch.uint8)
        total = min(data.numel(), int(args.gib * 2**30)) // CHUNK * CHUNK
        seconds = to_gpu(total, CHUNK, lambda buffer, offset: buffer.copy_(data[offset:offset + CHUNK]))
        del data
    return report(args, total, seconds)


def direct(args) -> int:
    """Units of DIRECT_UNIT bytes through `FileMemory.read_direct` (the engine's way for a disk unit)."""
    import os

    from engine.streaming.weight_cache import HEADER_ROOM, FileMemory

    size = os.path.getsize(args.path)
    memory = FileMemory(args.path, size - HEADER_ROOM)
    if not memory.direct_reads:
        raise SystemExit(f"{args.path}: no O_DIRECT on this file system")
    total = min(size - HEADER_ROOM, int(args.gib * 2**30)) // DIRECT_UNIT * DIRECT_UNIT

    def fill(buffer: torch.Tensor, offset: int) -> None:
        if not memory.read_direct(HEADER_ROOM + offset, DIRECT_UNIT, buffer):
            raise SystemExit("an O_DIRECT read failed")

    seconds = to_gpu(total, DIRECT_UNIT, fill)
    memory.close()
    return report(args, total, seconds, direct=True)


if __name__ == "__main__":
    raise SystemExit(main())
