"""Cluster throughput: pictures per minute with 1..N `drawbot worker` processes through a real redis-server.

    python -m bench.cluster                                  # CPU, tiny model padded by 1 s per step, 1/2/3 workers
    python -m bench.cluster --device cuda:0 --device cuda:1 --model majicflus --models-dir models \\
        --size 1024 --steps 20 --jobs 20 --step-sleep 0      # issue 16: one worker per GPU, full-size weights

The tiny model's own compute is negligible next to `--step-sleep` (the worker's [cluster].step_sleep hook), so two
CPU cores do not limit the measurement: the numbers show the scale-out of the queue, leases and result path. Jobs go
through the bot's own path (ChatCore with its SQLite store and feeder, RemoteEngine), from four users, and are timed
from the first submit to the last delivery. Prints a table; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


async def measure(url: str, config_path: Path, devices: list[str], workers: int, jobs: int, size: int, steps: int,
                  folder: Path) -> dict:
    """Start `workers` worker processes, wait until they are live, then submit `jobs` pictures from four users through
    the bot's own path (ChatCore, its SQLite store and feeder, RemoteEngine) and time them until all are delivered."""
    from bot.chat import User
    from bot.cluster import protocol
    from bot.cluster.connection import client
    from bot.cluster.remote import RemoteEngine, read_live_workers
    from bot.commands import parse_draw
    from bot.config import load_config
    from bot.core import ChatCore
    from bot.store import Store
    from tests.bot.conversation import RecordingConversation

    config = load_config(config_path)
    state = folder / f"state-{workers}"
    config = config.model_copy(update={"storage": config.storage.model_copy(update={"state_dir": state})})
    procs = []
    for n in range(workers):
        device = devices[n % len(devices)]
        log = open(folder / f"worker{workers}-{n}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "bot.cli", "--config", str(config_path), "worker",
                                       "--device", device, "--name", f"bench{n}"],
                                      env={**os.environ, "DRAWBOT_REDIS_URL": url, "PYTHONPATH": str(REPO),
                                           "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT))
    redis = client(url)
    store = await Store.open(config.storage.database_path, config.storage.images_dir)
    engine = RemoteEngine(client(url), config.cluster, protocol.expected_identity(config.engine.model), url=url)
    try:
        while len(await read_live_workers(redis, protocol.Keys(config.cluster.namespace))) < workers:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a worker exited; see {folder}/worker{workers}-*.log")
            await asyncio.sleep(0.2)
        await engine.start()
        core = ChatCore(config, store, engine, is_test_model=True)
        users = [User("console", f"user{n}", f"User {n}", chat_id=f"c{n}") for n in range(4)]
        convs = [RecordingConversation(user.chat_id) for user in users]
        started = time.monotonic()
        for n in range(jobs):
            command = parse_draw(f"bench {n} --steps {steps} --seed {n}", core.rules)  # [engine] size
            assert await core.submit(users[n % 4], convs[n % 4], command), "a bench job was refused"
        await core.drain()
        seconds = time.monotonic() - started
        records = [r for user in users for r in await store.history("console", user.id, jobs)]
        pictures = sum(len(conv.pictures) for conv in convs)
        assert pictures == jobs and all(r.status == "done" for r in records), (pictures, [r.status for r in records])
        await core.stop_accepting()
    finally:
        await engine.close()
        await store.close()
        await redis.aclose()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
    drawing = sum(r.duration or 0 for r in records)  # seconds the workers spent drawing, as they measured it
    return {"workers": workers, "jobs": jobs, "seconds": round(seconds, 2),
            "pictures_per_minute": round(jobs * 60 / seconds, 2),
            "mean_job_seconds": round(drawing / len(records), 3),
            "workers_busy": round(drawing / (workers * seconds), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--device", action="append", default=None, help="repeat for several GPUs (default cpu)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--step-sleep", type=float, default=1.0)
    parser.add_argument("--vram-budget-gb", type=float, default=8.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from tests.cluster.conftest import RedisServer

    folder = Path(tempfile.mkdtemp(prefix="drawbot-bench-cluster-"))
    devices = args.device or ["cpu"]
    models_dir = Path(args.models_dir).resolve() if args.models_dir else folder / "models"
    config_path = folder / "config.toml"
    config_path.write_text(f"""
[engine]
model = "{args.model}"
models_dir = "{models_dir}"
device = "{devices[0]}"
vram_budget_gb = {args.vram_budget_gb}
width = {args.size}
height = {args.size}
max_steps = {max(50, args.steps)}
{'mode = "resident"' if args.model == "tiny" else ''}
[limits]
cooldown_seconds = 0
max_active_per_user = {args.jobs}
per_hour = 0
per_day = 0
queue_cap = {max(50, args.jobs)}

[cluster]
enabled = true
lease_seconds = 30
heartbeat_seconds = 1
step_sleep = {args.step_sleep}
""")
    server = RedisServer(folder / "redis")
    server.start()
    rows = []
    try:
        for count in args.workers:
            rows.append(asyncio.run(measure(server.url, config_path, devices, count, args.jobs, args.size, args.steps,
                                            folder)))
            print(f"{count} worker(s): {rows[-1]['pictures_per_minute']:.1f} pictures/min "
                  f"({rows[-1]['seconds']:.1f} s for {args.jobs})", flush=True)
    finally:
        server.stop()
    base = rows[0]["pictures_per_minute"] / rows[0]["workers"]
    # "job s": a job's own time as its worker measured it (grows when the CPU is contended); "busy": the share of the
    # run the workers spent drawing (what the queue, leases and result path cost shows as the rest).
    print(f"\n{'workers':>7} {'pictures/min':>13} {'speed-up':>9} {'vs linear':>10} {'job s':>6} {'busy':>5}")
    for row in rows:
        ppm = row["pictures_per_minute"]
        print(f"{row['workers']:>7} {ppm:>13.1f} {ppm / rows[0]['pictures_per_minute']:>8.2f}x "
              f"{ppm / (base * row['workers']):>9.0%} {row['mean_job_seconds']:>6.2f} {row['workers_busy']:>5.0%}")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"cluster-{args.model}-{devices[0].replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
