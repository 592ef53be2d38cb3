"""What a picture size costs on the engine's device: the model, its measured basis on the real tiny pipeline, and the
engine refusing (before queueing) a size the device cannot afford."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from engine.jobs import GenerationRequest, RequestRefused
from engine.size_cost import (
    CPU_FIXED_BYTES,
    GIB,
    MIB,
    SizeCost,
    available_host_memory,
    cpu_size_cost,
    gpu_size_cost,
    largest_like,
)
from engine.worker import Engine


def test_largest_pixels_is_where_the_cost_meets_the_budget():
    cost = SizeCost("cpu", budget_bytes=10 * GIB, fixed_bytes=64 * MIB, per_pixel=100, per_pixel_squared=0.003)
    largest = cost.largest_pixels
    side = math.isqrt(largest)
    assert cost.affordable(side, side) and not cost.affordable(side + 16, side + 16)
    assert cost.bytes_for(1, largest) <= cost.budget_bytes < cost.bytes_for(1, largest + 2)
    assert SizeCost("cpu", budget_bytes=MIB, fixed_bytes=2 * MIB).largest_pixels == 0
    assert SizeCost("cuda", budget_bytes=8 * GIB, per_pixel=1000).largest_pixels == 8 * GIB // 1000


@pytest.mark.parametrize("width, height", [(2048, 2048), (2048, 1024), (1024, 2048), (2048, 512), (1360, 768)])
def test_largest_like_keeps_the_shape_in_multiples_of_16(width, height):
    largest = 1_500_000
    w, h = largest_like(width, height, largest)
    assert w % 16 == 0 and h % 16 == 0 and w * h <= largest
    assert abs(w / h - width / height) < 0.1 * width / height
    assert (w + 16) * (h + 16) > largest  # not needlessly small


def test_cpu_budget_is_available_memory_less_a_reserve_and_2048_squared_never_fits_in_23_gib():
    cost = cpu_size_cost(available_bytes=23 * GIB)
    assert 0.8 * 23 * GIB < cost.budget_bytes < 23 * GIB
    assert not cost.affordable(2048, 2048)  # issue 11: it took more than 23 GiB and was OOM-killed
    assert cost.affordable(1024, 1024)
    assert cpu_size_cost(available_bytes=2 * GIB).largest_pixels < 1024 * 1024  # a small machine, a smaller picture


def test_available_memory_reads_meminfo_and_a_lower_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"  # a container's view: its own cgroup is the root of the tree it sees
    cgroup.mkdir()
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("0::/\n")
    assert available_host_memory(meminfo, cgroup, proc) == 20000000 * 1024  # no cgroup files: MemAvailable
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("123\n")
    (cgroup / "memory.stat").write_text("anon 123\nfile 0\n")
    assert available_host_memory(meminfo, cgroup, proc) == 20000000 * 1024
    (cgroup / "memory.max").write_text(f"{4 * GIB}\n")
    (cgroup / "memory.current").write_text(f"{GIB}\n")
    assert available_host_memory(meminfo, cgroup, proc) == 3 * GIB
    missing = tmp_path / "missing"
    assert available_host_memory(missing, missing, missing) is None


def test_available_memory_honours_memorymax_on_the_bots_own_systemd_unit(tmp_path):
    """On a host the bot's cgroup is deep in the tree (/sys/fs/cgroup/system.slice/drawbot.service): its limit, and
    a parent slice's, count. Only the tree's root used to be read, so a unit's MemoryMax= was ignored and a size
    above it accepted, to be OOM-killed."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:   20000000 kB\n")
    root = tmp_path / "cgroup"
    service = root / "system.slice" / "drawbot.service"
    service.mkdir(parents=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("0::/system.slice/drawbot.service\n")
    (service / "memory.max").write_text(f"{4 * GIB}\n")  # MemoryMax=4G
    (service / "memory.current").write_text(f"{GIB}\n")  # 1 GiB charged, a quarter of it page cache
    (service / "memory.stat").write_text(f"anon {3 * GIB // 4}\nfile {GIB // 4}\n")
    assert available_host_memory(meminfo, root, proc) == 3 * GIB + GIB // 4
    assert not cpu_size_cost(available_host_memory(meminfo, root, proc)).affordable(2048, 2048)
    (service.parent / "memory.max").write_text(f"{2 * GIB}\n")  # a tighter limit on the slice
    (service.parent / "memory.current").write_text(f"{3 * GIB // 2}\n")
    (service.parent / "memory.stat").write_text("anon 1\nfile 0\n")
    assert available_host_memory(meminfo, root, proc) == GIB // 2


def test_gpu_cost_scales_the_calibrated_working_memory_into_the_unused_budget():
    # Numbers in the shape of engine.streaming.MemoryReport: calibrated at 1024², 1.5 GiB working memory.
    report = SimpleNamespace(working=int(1.5 * GIB), device_peak=3 * GIB, context=GIB, persistent=int(0.75 * GIB),
                             allowance=4 * GIB, dit_resident=int(3.5 * GIB), t5_resident=0)
    cost = gpu_size_cost(report, calibrated_pixels=1024 * 1024)
    assert cost.affordable(1024, 1024)  # the calibrated size always fits
    # 0.5 GiB of the allowance is unused: a third more pixels than calibrated, not double.
    assert cost.affordable(1168, 1168) and not cost.affordable(1280, 1280) and not cost.affordable(2048, 2048)
    everything_resident = SimpleNamespace(**{**vars(report), "allowance": 20 * GIB})
    assert gpu_size_cost(everything_resident, calibrated_pixels=1024 * 1024).affordable(2048, 2048)


def peak_rss_over(run) -> int:
    """Bytes the process's resident set grew to above where it was, while `run()` ran (Linux: VmHWM reset)."""

    def field(name: str) -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(name))

    before = field("VmRSS:")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak resident set size to the current one
    run()
    return field("VmHWM:") - before


@pytest.mark.slow
def test_cpu_model_is_conservative_for_the_measured_tiny_pipeline(tiny_pipeline):
    """The CPU model covers what the real tiny pipeline takes (2 sizes, measured here, on this machine)."""
    assert tiny_pipeline.size_cost is not None and tiny_pipeline.size_cost.device == "cpu"
    for side in (384, 512):
        request = GenerationRequest("a fox", seed=1, steps=1, width=side, height=side)
        measured = peak_rss_over(lambda: tiny_pipeline.generate(request, lambda done, total: None))
        predicted = tiny_pipeline.size_cost.bytes_for(side, side)
        assert measured <= predicted, f"{side}²: measured {measured / MIB:.0f} MiB > predicted {predicted / MIB:.0f}"
    assert predicted < 4 * (measured + CPU_FIXED_BYTES)  # conservative, not absurd


class OnASmallerMachine:
    """The real tiny pipeline, drawing as ever, on a machine with `budget` bytes for a picture's working memory."""

    def __init__(self, pipeline, budget: float):
        self._pipeline = pipeline
        cost = pipeline.size_cost
        self.size_cost = SizeCost(cost.device, budget, cost.fixed_bytes, cost.per_pixel, cost.per_pixel_squared)

    def __getattr__(self, name):
        return getattr(self._pipeline, name)


async def test_engine_refuses_an_unaffordable_size_before_queueing_and_names_the_largest(tiny_pipeline):
    small = OnASmallerMachine(tiny_pipeline, budget=200 * MIB)
    engine = Engine(lambda: small, max_queue=5)
    await engine.start()
    try:
        largest = engine.info.largest_pixels
        assert 256 * 256 < largest < 1024 * 1024
        refusal = engine.check(GenerationRequest("a fox", 1, 1, 2048, 2048))
        assert refusal is not None and refusal.reason == "too_large" and refusal.device == "cpu"
        w, h = refusal.largest
        assert w == h and w * h <= largest and small.size_cost.affordable(w, h)
        assert f"{w}x{h}" in refusal.message
        with pytest.raises(RequestRefused) as refused:
            engine.submit(GenerationRequest("a fox", 1, 1, 2048, 2048))
        assert refused.value.refusal == refusal and engine.queue_length == 0
        assert engine.check(GenerationRequest("a fox", 1, 0, 64, 64)).reason == "bad_steps"
        assert engine.check(GenerationRequest("a fox", 1, 1, 72, 64)).reason == "bad_size"
        assert engine.check(GenerationRequest("a fox", 1, 1, w, h)) is None
        result = await engine.submit(GenerationRequest("a fox", 1, 1, 64, 64)).wait()
        assert result.png.startswith(b"\x89PNG")
    finally:
        await engine.close(timeout=30)


async def test_capacity_says_how_many_more_jobs_the_engine_takes(tiny_pipeline):
    engine = Engine(lambda: tiny_pipeline, max_queue=2)
    assert engine.capacity == 0  # not started
    await engine.start()
    assert engine.capacity == 2
    jobs = [engine.submit(GenerationRequest("a fox", n, 2, 64, 64)) for n in range(2)]
    assert engine.capacity == (2 - engine.queue_length)
    await asyncio_wait_all(jobs)
    assert engine.capacity == 2
    await engine.close(timeout=30)
    assert engine.capacity == 0


async def asyncio_wait_all(jobs) -> None:
    for job in jobs:
        await job.wait()
