"""The engine as `drawbot run` starts it, on the full-size random-weight files (write them first with
`python -m bench.weights --models-dir DIR`): the default config (mode "stream", torch_compile "auto") on an emulated
card, then two pictures at each of several sizes (the default first, then other aspect ratios, a small one and the
largest the card affords): the first picture of a size against the second (steady) one shows whether a user waits
for a compile after the bot is ready (issue 13: first <= 1.2 x steady).

Prints one JSON line per event: start-up with its parts (load, packing, calibration + compile), each picture's time,
s/step and the graphs torch.compile made during it, the process's RSS now and at its peak, pinned host memory and
the device-wide NVML peak; then a table per size. Everything runs through `engine.worker.Engine`, in its GPU
thread, as in the bot. Not a test and not side by side: `bench.full_size` is the comparison.

    python -m bench.startup --models-dir /tmp/fs --budget 8
    python -m bench.startup --tiny --compile aot_eager    # the CPU: checks the script (and Dynamo), not speed
"""

from __future__ import annotations

import argparse
import hashlib
import asyncio
import json
import logging
import resource
import tempfile
import threading
import time
from pathlib import Path

from bench import measure
from bench.measure import GIB

SIZES = ((1024, 1024), (1344, 768), (832, 1216), (512, 512), (2048, 512), (768, 1344))
"""Each drawn twice (first, steady), in this order, then the largest square the card affords (at most 2048²)."""
TINY_SIZES = ((64, 64), (96, 64), (64, 256), (512, 64))
RATIO_TARGET = 1.2
TIMELINE_S = 0.25


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def memory_breakdown() -> dict:
    """Anonymous and file-backed resident memory of this process (/proc/self/status), and the memory cgroup's
    current and peak use when the process runs in one (the page cache counts there)."""
    values: dict = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM", "VmLck", "VmPin"):
                values[key.lower() + "_gib"] = int(rest.split()[0]) * 1024 / GIB
        group = Path("/sys/fs/cgroup") / Path("/proc/self/cgroup").read_text().strip().split("::")[-1].lstrip("/")
        for name in ("memory.current", "memory.peak"):
            if (group / name).is_file() and group != Path("/sys/fs/cgroup"):
                values[name.replace(".", "_") + "_gib"] = int((group / name).read_text()) / GIB
    except OSError:
        pass
    return values


def disk_read_gib() -> float | None:
    """Bytes this process has had read from storage so far (/proc/self/io read_bytes: file reads, page faults on
    mapped files and the read-ahead they start; page-cache hits do not count)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1]) / GIB
    except OSError:
        pass
    return None


class DiskTimeline:
    """`disk_read_gib()` every TIMELINE_S seconds while the engine starts, as (seconds since `started`, GiB): where
    the start-up read and where the disk sat idle."""

    def __init__(self, started: float):
        self.samples: list[tuple[float, float]] = []
        self._started = started
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            read = disk_read_gib()
            if read is not None:
                self.samples.append((round(time.perf_counter() - self._started, 2), round(read, 3)))
            if self._done.wait(TIMELINE_S):
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def sequence(sizes, largest: tuple[int, int] | None, pictures: int) -> list[tuple[int, int]]:
    """Every size twice in a row (first, steady), the largest affordable square last; the first `pictures`."""
    order = [*sizes, *([largest] if largest is not None and largest not in sizes else [])]
    return [size for size in order for _ in range(2)][:pictures]


def size_table(pictures: list[dict]) -> str:
    """Per size: the first picture's time, the steady (second) one's, their ratio, and graphs compiled at the first."""
    rows = ["| size | first s | steady s | first / steady | graphs compiled at the first |",
            "|---|---|---|---|---|"]
    for size in dict.fromkeys(p["size"] for p in pictures):
        first, *rest = [p for p in pictures if p["size"] == size]
        steady = rest[0]["seconds"] if rest else None
        ratio = f"{first['seconds'] / steady:.2f}" if steady else "-"
        if steady and first["seconds"] / steady > RATIO_TARGET:
            ratio += f" (> {RATIO_TARGET})"
        rows.append(f"| {size} | {first['seconds']:.2f} | {'-' if steady is None else f'{steady:.2f}'} | {ratio} | "
                    f"{first['new_graphs']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=None, help="required unless --tiny")
    parser.add_argument("--budget", type=float, default=8.0, help="emulated card, GiB (engine.vram_budget_gb)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--host-ram-budget", default="auto",
                        help="engine.host_ram_budget_gb: 'auto' or GiB (below ~17.7 the weights are file-backed)")
    parser.add_argument("--weight-cache-dir", type=Path, default=None)
    parser.add_argument("--pictures", type=int, default=5,
                        help="how many pictures of the sequence to draw (every size twice: 14 for all)")
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="force torch.compile with this backend (eager, aot_eager, inductor) instead of the "
                             "config's 'auto' (which stays eager on a CPU)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: checks the script, not speed")
    parser.add_argument("--refill-check", action="store_true",
                        help="after the pictures, read the resident units again synchronously and draw the first "
                             "picture again: its bytes must not change")
    parser.add_argument("--device", default=None,
                        help="with --tiny: the device (cuda: a quick check of the GPU path before a full-size run)")
    args = parser.parse_args(argv)
    if args.models_dir is None and not args.tiny:
        parser.error("--models-dir is required (or --tiny)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from engine import streaming as streaming_module
    from engine.jobs import GenerationRequest
    from engine.pipeline import FluxPipeline
    from engine.settings import EngineSettings
    from engine.size_cost import largest_like
    from engine.streaming import compiled_graphs
    from engine.worker import Engine

    if args.compile:
        enable = streaming_module.enable_streaming

        def forced(pipe, **kwargs):
            return enable(pipe, **{**kwargs, "torch_compile": True, "compile_backend": args.compile})

        streaming_module.enable_streaming = forced  # FluxPipeline.load looks it up at each call
    # The tiny model is written on first use (engine.pipeline.locate_model).
    models_dir = args.models_dir or Path(tempfile.mkdtemp(prefix="drawbot-bench-"))

    events: list[dict] = []

    def report(event: str, **values) -> None:
        values = {"event": event, **values, "rss_gib": measure.rss_gib(), "peak_rss_gib": peak_rss_gib(),
                  "disk_read_gib": disk_read_gib(),
                  **memory_breakdown(),
                  "nvml_peak_gib": poller.peaks(*poller.phases())["gpu"]}
        events.append(values)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}), flush=True)

    async def serve() -> None:
        # The bot's path: the async engine loads and draws in its one GPU thread (torch.compile runs there too).
        pipelines: list = []
        tiny = dict(model="tiny", device=args.device or "cpu", width=64, height=64) if args.tiny else {}
        budget = args.host_ram_budget if args.host_ram_budget == "auto" else float(args.host_ram_budget)
        settings = EngineSettings(models_dir=models_dir, vram_budget_gb=args.budget, host_ram_budget_gb=budget,
                                  weight_cache_dir=args.weight_cache_dir, **tiny)

        def load():
            pipelines.append(FluxPipeline.load(settings))
            return pipelines[0]

        engine = Engine(load)
        started = time.perf_counter()
        timeline = DiskTimeline(started)
        try:
            await engine.start()
        finally:
            timeline.stop()
        pipeline = pipelines[0]
        streaming = pipeline.streaming
        startup = pipeline.startup
        report("loaded", seconds=time.perf_counter() - started, compiled=streaming.torch_compiled,
               startup=engine.startup_line(), load_s=startup.load, packing_s=startup.packing,
               calibration_s=startup.calibration, warmup_s=startup.warmup, reading_s=startup.reading, graphs=compiled_graphs(),
               pinned_gib=(streaming.pinned_bytes + sum(b.numel() for b in streaming.pool.staging)) / GIB,
               host_weights_gib=streaming.host_bytes / GIB, resident_units=len(streaming.dit.resident),
               file_backed=streaming.dit.file_backed, cache_built=streaming.weight_cache_built,
               dit_streamed_gib=streaming.dit.streamed_bytes / GIB,
               dit_from_disk_gib=streaming.dit.dropped_bytes / GIB,
               disk_timeline=timeline.samples)
        cost = engine.size_cost
        side = 512 if args.tiny else 2048
        affordable = cost is None or cost.largest_pixels >= side * side
        largest = (side, side) if affordable else largest_like(side, side, cost.largest_pixels)
        seen: set[tuple[int, int]] = set()
        drawn: list[tuple[GenerationRequest, bytes]] = []
        try:
            for number, (width, height) in enumerate(sequence(TINY_SIZES if args.tiny else SIZES, largest,
                                                              args.pictures)):
                request = GenerationRequest(f"a lighthouse at dusk, picture {number}", 7, args.steps, width, height)
                refusal = engine.check(request)
                if refusal is not None:
                    report("refused", size=f"{width}x{height}", why=refusal.message)
                    continue
                graphs = compiled_graphs()
                started = time.perf_counter()
                result = await engine.submit(request).wait()
                report("picture", size=f"{width}x{height}", first=(width, height) not in seen,
                       seconds=time.perf_counter() - started, s_per_step=result.seconds_per_step,
                       new_graphs=compiled_graphs() - graphs, compiled=streaming.torch_compiled,
                       png_md5=hashlib.md5(result.png).hexdigest(),
                       pinned_gib=(streaming.pinned_bytes + sum(b.numel() for b in streaming.pool.staging)) / GIB)
                seen.add((width, height))
                drawn.append((request, result.png))
        finally:
            await engine.close()
        if args.refill_check and drawn:
            # The resident units read again, synchronously in this thread, then the first picture again: the same
            # bytes say the start-up's background fill (engine.streaming.enable_streaming) put the right weights there.
            request, png = drawn[0]
            for streamer in (streaming.dit, streaming.t5):
                resident = streamer.resident
                streamer.set_resident(())
                streamer.set_resident(resident)
            again = pipeline.generate(request, lambda done, total: None)
            report("refill_check", same=again.png == png, png_md5=hashlib.md5(again.png).hexdigest())

    with measure.PeakPoller() as poller:
        card = measure.emulate_card(args.budget)
        report("start", card=card)
        asyncio.run(serve())
    loaded = next(e for e in events if e["event"] == "loaded")
    print(f"\nstart-up {loaded['startup']} (compiled: {loaded['compiled']}, {loaded['graphs']} graphs)")
    print(size_table([e for e in events if e["event"] == "picture"]))
    if args.out:
        Path(args.out).write_text(json.dumps(events, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
