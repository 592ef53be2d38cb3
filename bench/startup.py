"""The engine as `drawbot run` starts it, on the full-size random-weight files (write them first with
`python -m bench.weights --models-dir DIR`): the default config (mode "stream", torch_compile "auto") on an emulated
card, then the pictures a bot meets in turn: the default size, the same again, two new aspect ratios, a small one.

Prints one line per event: load (DiffSynth + packing + calibration, which compiles), each picture's time and
s/step, whether the DiT blocks are compiled, the process's RSS now and at its peak, pinned host memory and the
device-wide NVML peak. Everything runs through `engine.worker.Engine`, in its GPU thread, as in the bot. Not a test and not side by side: `bench.full_size` is the comparison.

    python -m bench.startup --models-dir /tmp/fs --budget 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import time
from pathlib import Path

from bench import measure
from bench.measure import GIB

SIZES = ((1024, 1024), (1024, 1024), (1344, 768), (832, 1216), (512, 512))


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=8.0, help="emulated card, GiB (engine.vram_budget_gb)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--host-ram-budget", default="auto",
                        help="engine.host_ram_budget_gb: 'auto' or GiB (below ~17.7 the weights are file-backed)")
    parser.add_argument("--weight-cache-dir", type=Path, default=None)
    parser.add_argument("--pictures", type=int, default=len(SIZES), help="how many of the sizes to draw, in order")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: checks the script, not speed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from engine.jobs import GenerationRequest
    from engine.pipeline import FluxPipeline
    from engine.settings import EngineSettings
    from engine.worker import Engine

    events: list[dict] = []

    def report(event: str, **values) -> None:
        values = {"event": event, **values, "rss_gib": measure.rss_gib(), "peak_rss_gib": peak_rss_gib(),
                  **memory_breakdown(),
                  "nvml_peak_gib": poller.peaks(*poller.phases())["gpu"]}
        events.append(values)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}), flush=True)

    async def serve() -> None:
        # The bot's path: the async engine loads and draws in its one GPU thread (torch.compile runs there too).
        pipelines: list = []
        tiny = dict(model="tiny", device="cpu", width=64, height=64) if args.tiny else {}
        budget = args.host_ram_budget if args.host_ram_budget == "auto" else float(args.host_ram_budget)
        settings = EngineSettings(models_dir=args.models_dir, vram_budget_gb=args.budget, host_ram_budget_gb=budget,
                                  weight_cache_dir=args.weight_cache_dir, **tiny)

        def load():
            pipelines.append(FluxPipeline.load(settings))
            return pipelines[0]

        engine = Engine(load)
        started = time.perf_counter()
        await engine.start()
        streaming = pipelines[0].streaming
        report("loaded", seconds=time.perf_counter() - started, compiled=streaming.torch_compiled,
               pinned_gib=(streaming.pinned_bytes + sum(b.numel() for b in streaming.pool.staging)) / GIB,
               host_weights_gib=streaming.host_bytes / GIB, resident_units=len(streaming.dit.resident),
               file_backed=streaming.dit.file_backed, cache_built=streaming.weight_cache_built,
               dit_streamed_gib=streaming.dit.streamed_bytes / GIB,
               dit_from_disk_gib=streaming.dit.dropped_bytes / GIB)
        try:
            for number, (width, height) in enumerate(SIZES[:args.pictures] if not args.tiny else [(64, 64), (96, 64)]):
                request = GenerationRequest(f"a lighthouse at dusk, picture {number}", 7, args.steps, width, height)
                started = time.perf_counter()
                result = await engine.submit(request).wait()
                report("picture", size=f"{width}x{height}", seconds=time.perf_counter() - started,
                       s_per_step=result.seconds_per_step, compiled=streaming.torch_compiled,
                       pinned_gib=(streaming.pinned_bytes + sum(b.numel() for b in streaming.pool.staging)) / GIB)
        finally:
            await engine.close()

    with measure.PeakPoller() as poller:
        card = measure.emulate_card(args.budget)
        report("start", card=card)
        asyncio.run(serve())
    if args.out:
        Path(args.out).write_text(json.dumps(events, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
