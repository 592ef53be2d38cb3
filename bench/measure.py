"""Measuring helpers for the benchmark: device-wide memory peaks (NVML), host RSS, card emulation, phase timing,
hardware ceilings. Every helper degrades to a no-op on a CPU-only machine so `--tiny` runs the same code."""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch

GIB = 1024**3


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / GIB


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------------
# Device-wide and host memory peaks


class _Nvml:
    """Device-wide used memory (the number nvidia-smi shows: CUDA context and every allocator included)."""

    def __init__(self):
        self.read = None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device() if cuda() else 0)
            self.read = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
            self.source = "nvml"
        except Exception:  # no pynvml: fall back to nvidia-smi (slower polling), or nothing on a CPU machine
            if cuda():
                def smi() -> int:
                    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                          "-i", str(torch.cuda.current_device())], capture_output=True, text=True)
                    return int(out.stdout.strip().splitlines()[0]) * 1024**2
                self.read = smi
                self.source = "nvidia-smi"
            else:
                self.source = "none"


class PeakPoller:
    """A thread sampling device-wide GPU memory (NVML, every `interval` s) and this process's RSS, keeping the peak
    of each per named phase. `phase(name)` switches the phase; `peaks()` returns {phase: (gpu_bytes, rss_bytes)}."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self._nvml = _Nvml()
        self._process = psutil.Process()
        self._phase = "idle"
        self._gpu: dict[str, int] = {}
        self._rss: dict[str, int] = {}
        self._outside: dict[str, int] = {}  # device-wide minus PyTorch's reserved: context, cuBLAS/cuDNN, ...
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-poller", daemon=True)
        self._lock = threading.Lock()

    @property
    def source(self) -> str:
        return self._nvml.source

    def __enter__(self) -> "PeakPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        gpu = self._nvml.read() if self._nvml.read else 0
        reserved = torch.cuda.memory_reserved() if cuda() else 0
        rss = self._process.memory_info().rss
        with self._lock:
            self._gpu[self._phase] = max(self._gpu.get(self._phase, 0), gpu)
            self._rss[self._phase] = max(self._rss.get(self._phase, 0), rss)
            self._outside[self._phase] = max(self._outside.get(self._phase, 0), gpu - reserved)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def phase(self, name: str) -> None:
        self._sample()  # close the previous phase with a fresh sample
        with self._lock:
            self._phase = name
        self._sample()

    def gpu_now(self) -> int:
        return self._nvml.read() if self._nvml.read else 0

    def phases(self) -> list[str]:
        """Every phase name seen so far."""
        with self._lock:
            return list(self._rss)

    def peaks(self, *phases: str) -> dict[str, float]:
        """Peak GiB over the named phases: {"gpu": .., "rss": .., "outside": ..} (outside = device-wide - reserved)."""
        with self._lock:
            return {"gpu": max((self._gpu.get(p, 0) for p in phases), default=0) / GIB,
                    "rss": max((self._rss.get(p, 0) for p in phases), default=0) / GIB,
                    "outside": max((self._outside.get(p, 0) for p in phases), default=0) / GIB}


# ---------------------------------------------------------------------------------------------------------------------
# Card emulation


def warm_up_kernels() -> None:
    """Load the kernel families the pipelines use (GEMM, attention, conv, norms, fp8 casts) so that the CUDA context
    measured afterwards is the steady one (it grows by ≈0.7 GiB as kernels load, shared notes performance.md §11)."""
    if not cuda():
        return
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    (x @ x).sum().item()
    q = torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
    image = torch.randn(1, 32, 32, 32, device="cuda", dtype=torch.bfloat16)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).to("cuda", torch.bfloat16)
    torch.nn.functional.group_norm(conv(image), 8)
    torch.nn.functional.layer_norm(x, (256,))
    x.to(torch.float8_e4m3fn).to(torch.bfloat16)
    torch.nn.functional.gelu(x, approximate="tanh")
    sync()
    del x, q, image, conv
    torch.cuda.empty_cache()


def context_bytes() -> int:
    """Device memory used outside PyTorch's caching allocator by this process (context, kernels, cuBLAS handles):
    device used - reserved. Assumes no other process uses the GPU (true on the bench machine)."""
    if not cuda():
        return 0
    sync()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def emulate_card(card_gb: float | None) -> dict:
    """Cap PyTorch's allocator so that allocator + context fit a `card_gb` card (performance.md §11 method):
    cap = card - non-allocator context measured now. None removes the cap."""
    if not cuda():
        return {"card_gb": card_gb, "context_gib": 0.0, "cap_gib": None}
    sync()
    torch.cuda.empty_cache()
    _, total = torch.cuda.mem_get_info()
    if card_gb is None:
        torch.cuda.set_per_process_memory_fraction(1.0)
        return {"card_gb": None, "context_gib": context_bytes() / GIB, "cap_gib": None}
    context = context_bytes()
    cap = card_gb * GIB - context
    torch.cuda.set_per_process_memory_fraction(max(cap, 0) / total)
    return {"card_gb": card_gb, "context_gib": context / GIB, "cap_gib": cap / GIB}


def reset_peaks() -> None:
    if cuda():
        sync()
        torch.cuda.reset_peak_memory_stats()


def allocator_peaks() -> dict[str, float]:
    if not cuda():
        return {"alloc": 0.0, "reserved": 0.0}
    return {"alloc": torch.cuda.max_memory_allocated() / GIB, "reserved": torch.cuda.max_memory_reserved() / GIB}


# ---------------------------------------------------------------------------------------------------------------------
# Phase timing of one generation


@dataclass
class PhaseClock:
    """Times one generation from the pipeline's per-step callback: text encoding (start -> before step 1), each DiT
    step (synchronised), decode (after the last step -> end). Switches the poller's phases on the way."""

    poller: PeakPoller | None = None
    prefix: str = ""
    started: float = 0.0
    marks: list[float] = field(default_factory=list)
    ended: float = 0.0
    alloc_peaks: dict = field(default_factory=dict)
    """Allocator peaks (GiB, allocated and reserved) per phase: text / denoise / decode."""

    def _close_phase(self, name: str) -> None:
        if cuda():
            self.alloc_peaks[name] = {"alloc": torch.cuda.max_memory_allocated() / GIB,
                                      "reserved": torch.cuda.max_memory_reserved() / GIB}
            torch.cuda.reset_peak_memory_stats()

    def start(self) -> None:
        sync()
        self.started = time.perf_counter()
        self.marks.clear()
        self.alloc_peaks.clear()
        if cuda():
            torch.cuda.reset_peak_memory_stats()
        if self.poller:
            self.poller.phase(self.prefix + "text")

    def on_step(self, done: int, total: int) -> None:
        sync()  # honest per-step times: wait for the GPU at every step boundary
        self.marks.append(time.perf_counter())
        if done == 0:
            self._close_phase("text")
        elif done == total:
            self._close_phase("denoise")
        if self.poller:
            self.poller.phase(self.prefix + ("denoise" if done < total else "decode"))

    def progress(self, timesteps):
        """A DiffSynth `progress_bar_cmd` calling on_step like engine.pipeline does."""
        total = len(timesteps)
        self.on_step(0, total)
        for done, timestep in enumerate(timesteps, start=1):
            yield timestep
            self.on_step(done, total)

    def stop(self) -> None:
        sync()
        self.ended = time.perf_counter()
        self._close_phase("decode")
        if self.poller:
            self.poller.phase("idle")

    def summary(self) -> dict:
        steps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return {
            "total_s": self.ended - self.started,
            "text_s": self.marks[0] - self.started if self.marks else None,
            "steps_s": steps,
            "first_step_s": steps[0] if steps else None,
            "step_median_s": statistics.median(steps[1:] if len(steps) > 2 else steps) if steps else None,
            "decode_s": self.ended - self.marks[-1] if self.marks else None,
            "alloc_phase_gib": dict(self.alloc_peaks),
        }


# ---------------------------------------------------------------------------------------------------------------------
# Ceilings


def _time_cuda(fn, repeat: int = 10, warmup: int = 3) -> float:
    """Median seconds of `fn` timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def ceilings() -> dict:
    """Pinned/pageable host-to-device bandwidth, bf16 and fp8 GEMM rates, GPU fp8->bf16 upcast rate."""
    if not cuda():
        return {}
    nbytes = GIB
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pinned.random_(0, 255)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pageable.copy_(pinned)
    target = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d_pinned = nbytes / _time_cuda(lambda: target.copy_(pinned, non_blocking=True), repeat=5) / 1e9
    h2d_pageable = nbytes / _time_cuda(lambda: target.copy_(pageable), repeat=3, warmup=1) / 1e9
    del pinned, pageable, target
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    gemm_bf16 = 2 * n**3 / _time_cuda(lambda: a @ b) / 1e12
    result = {"h2d_pinned_GBps": h2d_pinned, "h2d_pageable_GBps": h2d_pageable, "gemm_bf16_TFLOPs": gemm_bf16}
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device="cuda", dtype=torch.float32)
        result["gemm_fp8_TFLOPs"] = 2 * n**3 / _time_cuda(
            lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) / 1e12
    except Exception as exc:  # GPUs below compute capability 8.9
        result["gemm_fp8_TFLOPs"] = None
        result["gemm_fp8_error"] = f"{type(exc).__name__}: {exc}"[:200]
    weight = torch.randn(21504, 3072, device="cuda").to(torch.float8_e4m3fn)
    result["upcast_torch_Gparam_s"] = weight.numel() / _time_cuda(lambda: weight.to(torch.bfloat16)) / 1e9
    try:
        from engine.streaming import Upcaster

        upcast = Upcaster()
        fast = upcast(weight, torch.bfloat16, "cuda")
        result["upcast_triton_exact"] = bool(torch.equal(fast.view(torch.int16), weight.to(torch.bfloat16).view(torch.int16)))
        result["upcast_triton_Gparam_s"] = weight.numel() / _time_cuda(lambda: upcast(weight, torch.bfloat16, "cuda")) / 1e9
    except Exception as exc:
        result["upcast_triton_error"] = f"{type(exc).__name__}: {exc}"[:200]
    del a, b, weight
    torch.cuda.empty_cache()
    try:
        result.update(fp8_linear_rates())
    except Exception as exc:
        result["fp8_linear_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return result


def fp8_linear_rates() -> dict:
    """drawbot's float8 linear (engine.streaming.Float8Linears: per-row quantization + torch._scaled_mm) against a
    bf16 linear with a bf16 weight, at the two largest Flux 1024² shapes (4608 tokens), plus the quantization pass
    alone and the relative error against float32."""
    from engine.streaming import Float8Linears

    float8 = Float8Linears()
    if float8.check(torch.device("cuda")) is not None:
        return {"fp8_linear_error": float8.check(torch.device("cuda"))}
    out: dict = {}
    for name, (k, n) in {"qkv_mlp": (3072, 21504), "proj_out": (15360, 3072)}.items():
        x = torch.randn(4608, k, device="cuda", dtype=torch.bfloat16)
        weight = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.float8_e4m3fn)
        weight_bf16 = weight.to(torch.bfloat16)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.01
        flops = 2 * 4608 * k * n
        bf16_s = _time_cuda(lambda: torch.nn.functional.linear(x, weight_bf16, bias))
        fp8_s = _time_cuda(lambda: float8.linear(x, weight, bias))
        quantize_s = _time_cuda(lambda: float8.quantize(x))
        float8.fast_accumulation = False
        fp8_exact_s = _time_cuda(lambda: float8.linear(x, weight, bias))
        float8.fast_accumulation = True
        codes, scale = float8.quantize(x)
        unit, one = float8._unit_scale(x.device, n), torch.ones((), device="cuda")
        for label, (scale_a, scale_b) in {"rowwise": (scale, unit), "tensorwise": (one, one)}.items():
            try:  # the product alone, per scaling kind (row-wise: CUTLASS; tensor-wise: cuBLASLt)
                out[f"{name}_mm_{label}_ms"] = 1e3 * _time_cuda(lambda: torch._scaled_mm(
                    codes, weight.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=torch.bfloat16,
                    use_fast_accum=True))
            except Exception as exc:
                out[f"{name}_mm_{label}_error"] = f"{type(exc).__name__}: {exc}"[:200]
        del codes, scale
        exact = x.float() @ weight.float().t() + bias.float()
        error = float((float8.linear(x, weight, bias).float() - exact).norm() / exact.norm())
        out.update({f"{name}_bf16_ms": bf16_s * 1e3, f"{name}_fp8_ms": fp8_s * 1e3,
                    f"{name}_fp8_no_fast_accum_ms": fp8_exact_s * 1e3, f"{name}_quantize_ms": quantize_s * 1e3,
                    f"{name}_bf16_TFLOPs": flops / bf16_s / 1e12, f"{name}_fp8_TFLOPs": flops / fp8_s / 1e12,
                    f"{name}_fp8_rel_error": error})
        del x, weight, weight_bf16, bias, exact
    torch.cuda.empty_cache()
    return out


KERNEL_KINDS = (
    ("fp8 quantize", ("quantize_kernel",)),
    ("fp8 upcast", ("upcast_kernel",)),
    ("attention", ("flash", "fmha", "attention")),
    ("vae conv", ("conv", "cudnn", "implicit", "winograd")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "f8f8bf16", "matmul")),
    ("copy", ("memcpy", "memset")),
)


def kernel_time_by_kind(profiler) -> dict[str, float]:
    """Milliseconds of GPU time per kind of kernel, from a torch.profiler run (kernel names matched loosely; the rest
    is elementwise / norm / reduction work)."""
    totals: dict[str, float] = {}
    for event in profiler.key_averages():
        micros = getattr(event, "self_device_time_total", None)
        if micros is None:
            micros = getattr(event, "self_cuda_time_total", 0)
        if not micros or getattr(event, "device_type", None) is not None and "CUDA" not in str(event.device_type):
            continue
        name = event.key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "elementwise/other")
        totals[kind] = totals.get(kind, 0.0) + micros / 1e3
    return totals


def environment() -> dict:
    info = {"torch": torch.__version__, "cpus": os.cpu_count(), "host_ram_gib": psutil.virtual_memory().total / GIB}
    if cuda():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB, sms=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,pcie.link.gen.current,pcie.link.width.current",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            info["driver_pcie"] = out.stdout.strip()
        except Exception:
            pass
    return info
