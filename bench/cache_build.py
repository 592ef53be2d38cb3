"""The first build of the file-backed weight cache from the downloaded files, as the engine does it at start-up
(engine.streaming.loading: DiT and T5 built without weights, read tensor by tensor, converted to float8, written in
execution order): time, bytes read and written, and the process's peak RSS (and the memory cgroup's peak, page
cache included, when run in one). Run it once with a float8 DiT file and once with a bf16 one. Prints one JSON line.

    python -m bench.cache_build --models-dir /tmp/fs --cache-dir /tmp/wc --label float8
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

GIB = 1024**3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True, help="emptied first: the build is measured")
    parser.add_argument("--label", default="")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: checks the script")
    args = parser.parse_args(argv)

    import torch

    from bench.startup import memory_breakdown
    from engine.pipeline import _load_for_streaming, locate_model, plan_memory
    from engine.settings import EngineSettings
    from engine.streaming import ModelStreamer
    from engine.streaming.pipeline import _dit_units, _t5_units
    from engine.streaming.weight_cache import WeightCache

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    settings = EngineSettings(models_dir=args.models_dir, mode="stream", **({"model": "tiny"} if args.tiny else {}))
    files, _ = locate_model(settings)
    shutil.rmtree(args.cache_dir, ignore_errors=True)
    cache = WeightCache(args.cache_dir, {"dit": [files.dit], "t5": list(files.t5)})
    before = memory_breakdown()
    started = time.perf_counter()
    pipe, sources = _load_for_streaming(files, plan_memory(settings, device), device)
    built = time.perf_counter()
    rows = {}
    for name, model, units in (("dit", pipe.dit, _dit_units(pipe.dit)),
                               ("t5", pipe.text_encoder_2, _t5_units(pipe.text_encoder_2))):
        t0 = time.perf_counter()
        streamer = ModelStreamer(name, model, units, device, weight_cache=cache, source=sources[name].read)
        rows[name] = {"seconds": round(time.perf_counter() - t0, 2),
                      "read_gib": round(sources[name].bytes_read / GIB, 3),
                      "source_gib": round(sum(Path(p).stat().st_size for p in sources[name].paths) / GIB, 3),
                      "written_gib": round(cache.path(name).stat().st_size / GIB, 3)}
        sources[name].close()
        del streamer
    after = memory_breakdown()
    print(json.dumps({"label": args.label, "device": device, "models_s": round(built - started, 2),
                      "total_s": round(time.perf_counter() - started, 2), **rows,
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3),
                      "before": before, "after": after}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
