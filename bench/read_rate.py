"""Read rate of a file into the GPU the way the file-backed weight path reads it: mapped file -> page-locked staging
buffer (torch copy) -> GPU, 64 MiB at a time; run once with a warm page cache and once after dropping it to get the
two transfer floors. Prints one JSON line.

    python -m bench.read_rate FILE [--gib 8]
"""

from __future__ import annotations

import argparse
import json
import mmap
import time

import torch

CHUNK = 64 << 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--gib", type=float, default=8.0, help="read at most this much")
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
