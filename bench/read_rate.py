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

import torch

CHUNK = 64 << 20
DIRECT_UNIT = 320 << 20
"""About one DiT double block, the size of a unit the engine reads from the disk."""


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
        cuda = torch.cuda.is_available()
        staging = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        done = [torch.cuda.Event() for _ in staging] if cuda else []
        target = torch.empty(CHUNK, dtype=torch.uint8, device="cuda" if cuda else "cpu")
        stream = torch.cuda.Stream() if cuda else None
        started = time.perf_counter()
        for number, offset in enumerate(range(0, total, CHUNK)):
            index = number % 2
            if cuda:
                done[index].synchronize()
            staging[index].copy_(data[offset:offset + CHUNK])
            if cuda:
                with torch.cuda.stream(stream):
                    target.copy_(staging[index], non_blocking=True)
                    done[index].record(stream)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        del data
    print(json.dumps({"label": args.label, "path": args.path, "bytes": total, "seconds": round(seconds, 3),
                      "GBps": round(total / seconds / 1e9, 3)}), flush=True)
    return 0


def direct(args) -> int:
    """Units of DIRECT_UNIT bytes through `FileMemory.read_direct` into two page-locked buffers, each then copied to
    the GPU on a side stream (the reader thread's path for a disk unit)."""
    import os

    from engine.streaming.streamer import aligned_empty
    from engine.streaming.weight_cache import HEADER_ROOM, FileMemory

    unit = DIRECT_UNIT
    size = os.path.getsize(args.path)
    memory = FileMemory(args.path, size - HEADER_ROOM)
    if not memory.direct_reads:
        raise SystemExit(f"{args.path}: no O_DIRECT on this file system")
    total = min(size - HEADER_ROOM, int(args.gib * 2**30)) // unit * unit
    cuda = torch.cuda.is_available()
    staging = [aligned_empty(unit, pin=cuda) for _ in range(2)]
    done = [torch.cuda.Event() for _ in staging] if cuda else []
    target = torch.empty(unit, dtype=torch.uint8, device="cuda" if cuda else "cpu")
    stream = torch.cuda.Stream() if cuda else None
    started = time.perf_counter()
    for number, offset in enumerate(range(0, total, unit)):
        index = number % 2
        if cuda:
            done[index].synchronize()
        if not memory.read_direct(HEADER_ROOM + offset, unit, staging[index]):
            raise SystemExit("an O_DIRECT read failed")
        if cuda:
            with torch.cuda.stream(stream):
                target.copy_(staging[index], non_blocking=True)
                done[index].record(stream)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    memory.close()
    print(json.dumps({"label": args.label, "path": args.path, "bytes": total, "seconds": round(seconds, 3),
                      "GBps": round(total / seconds / 1e9, 3), "direct": True}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
