"""The file-backed weight path's disk reads through the real streamer (engine.streaming: ModelStreamer, SlotPool,
the weight cache file), side by side: disk units read with O_DIRECT against the same units read through the page
cache (mapped, dropped after each read, kernel read-ahead asked for), on a toy model of Linear units whose compute
is negligible, so a pass takes as long as its disk reads. Runs on any machine (CPU here: the GPU path differs only in
the side stream after the staging buffer); for the disk of the machine it runs on, next to `read_rate.py`'s rates.
The disk units are out of the page cache in both ways (never read into it, or dropped after each read), so no
root is needed; the kept units are in it from the cache file's build.

    python -m bench.disk_stream --dir /var/tmp/ds [--units 24 --unit-mib 64 --kept 0.5 --passes 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

GIB = 1024**3


def stream_passes(folder: Path, *, direct: bool, units: int, unit_mib: int, kept: float, passes: int) -> dict:
    from safetensors.torch import save_file

    from engine.streaming import ModelStreamer, SlotPool, weight_cache
    from engine.streaming.weight_cache import WeightCache

    side = int((unit_mib * 2**20 / 4) ** 0.5)  # float32 square weights of about unit_mib
    source = folder / "toy.safetensors"
    if not source.exists():
        generator = torch.Generator().manual_seed(0)
        save_file({f"{i}.weight": torch.randn(side, side, generator=generator) for i in range(units)}, source)
    model = torch.nn.Sequential(*[torch.nn.Linear(side, side, bias=False) for _ in range(units)])
    from safetensors.torch import load_file

    model.load_state_dict(load_file(source))
    weight_cache.USE_DIRECT_IO = direct
    cache = WeightCache(folder / "cache", {"toy": [source]})
    streamer = ModelStreamer("toy", model, list(model), "cpu", compute_dtype=torch.float32, weight_cache=cache)
    streamer.attach(SlotPool("cpu", max(streamer.unit_bytes), 3))
    total = sum(streamer.unit_bytes)
    kept_bytes = streamer.keep_in_page_cache(int(total * kept))
    memory = streamer.host_memory
    x = torch.randn(1, side)

    def one_pass() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            y = x
            for layer in model:
                y = layer(y) / side**0.5
        return time.perf_counter() - started

    one_pass()  # warm-up: the ring, the staging buffers, the kept units mapped
    times = [one_pass() for _ in range(passes)]
    result = {"direct": getattr(memory, "direct_reads", False), "asked_direct": direct, "units": units,
              "unit_mib": round(streamer.unit_bytes[0] / 2**20, 1), "kept_gib": round(kept_bytes / GIB, 3),
              "disk_gib_per_pass": round(streamer.dropped_bytes / GIB, 3), "pass_s": [round(t, 3) for t in times],
              "disk_GBps": round(streamer.dropped_bytes / min(times) / 1e9, 3)}
    streamer.detach()
    memory.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/drawbot-disk-stream"))
    parser.add_argument("--units", type=int, default=24)
    parser.add_argument("--unit-mib", type=int, default=64)
    parser.add_argument("--kept", type=float, default=0.5, help="share of the units the page cache keeps")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for direct in (True, False):
            shutil.rmtree(args.dir / "cache", ignore_errors=True)  # each path builds its own file, the same bytes
            rows.append(stream_passes(args.dir, direct=direct, units=args.units, unit_mib=args.unit_mib,
                                      kept=args.kept, passes=args.passes))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print("\n| disk units read | GiB from the disk per pass | pass s (best) | disk GB/s |\n|---|---|---|---|")
    for row in rows:
        way = "O_DIRECT" if row["direct"] else "through the page cache"
        print(f"| {way} | {row['disk_gib_per_pass']} | {min(row['pass_s']):.3f} | {row['disk_GBps']} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
