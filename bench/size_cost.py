"""What a picture size costs in host RAM on the CPU (the tiny model, the CPU fallback): the basis of engine/size_cost.py.

    python -m bench.size_cost [--sides 128 256 384 512 640 768 1024] [--out bench/results/cpu-size-cost.json]

One process loads the tiny pipeline (resident, CPU) once; for each side it resets the process's peak resident set
(Linux /proc/self/clear_refs) and draws one 1-step square picture. Printed per size: the peak above the loaded
process, what engine.size_cost predicts, and the decode alone (the VAE decoder at that size), which shows where the
peak comes from. A 2048x2048 picture would need ≈37 GiB: do not ask this script for it on a small machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

MIB = 1024**2


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def _peak_over(run) -> int:
    before = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    run()
    return _status("VmHWM:") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[128, 256, 384, 512, 640, 768, 1024])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from engine.jobs import GenerationRequest
    from engine.pipeline import FluxPipeline
    from engine.settings import EngineSettings
    from engine.size_cost import cpu_size_cost

    models = Path(tempfile.mkdtemp(prefix="drawbot-size-cost-"))
    settings = EngineSettings(model="tiny", models_dir=models, device="cpu", mode="resident", width=64, height=64)
    pipeline = FluxPipeline.load(settings)
    pipeline.generate(GenerationRequest("warm-up", 1, 1, 64, 64), lambda done, total: None)
    model = cpu_size_cost(available_bytes=1 << 50)  # the cost terms only; the budget does not matter here
    rows = []
    for side in args.sides:
        request = GenerationRequest("a fox", seed=1, steps=1, width=side, height=side)
        started = time.monotonic()
        peak = _peak_over(lambda: pipeline.generate(request, lambda done, total: None))
        seconds = time.monotonic() - started
        latents = torch.randn(1, 16, side // 8, side // 8, dtype=torch.bfloat16)
        with torch.no_grad():
            decode = _peak_over(lambda: pipeline.pipe.vae_decoder(latents))
        rows.append(dict(side=side, pixels=side * side, peak_mib=round(peak / MIB), decode_mib=round(decode / MIB),
                         predicted_mib=round(model.bytes_for(side, side) / MIB), seconds=round(seconds, 1)))
        print(f"{side:>5}x{side:<5} peak {peak / MIB:>7.0f} MiB   decode alone {decode / MIB:>7.0f} MiB   "
              f"predicted {model.bytes_for(side, side) / MIB:>7.0f} MiB   {seconds:5.1f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(machine=platform.machine(), torch=torch.__version__, rows=rows),
                                       indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
