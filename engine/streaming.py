"""Weight streaming: how drawbot moves DiffSynth's weights between host memory and the GPU (engine mode `stream`).

DiffSynth keeps its model classes, converters and pipeline steps; only the way weights move changes. DiffSynth's own
low-VRAM path casts every streamed layer fp8->bf16 on the CPU and copies it as bf16 from pageable memory, blocking,
and evicts everything after each request (shared notes, performance.md §4). Here instead:

- A model is cut into *units* that run one after another (the DiT's 19 double + 38 single blocks; T5's embedding
  and 24 blocks). Each unit's weights are packed into one flat byte range of a single host allocation, kept in their
  storage dtype (float8_e4m3fn for the DiT), page-locked once (`cudaHostRegister`, exact size).
- As many units as the VRAM budget allows stay *resident* on the GPU, for good (never evicted between requests); their
  host copies are handed back to the OS. They are chosen spread out through the execution order, so that each
  streamed unit's copy overlaps the compute of the resident units around it. The plan comes from measured sizes:
  unit bytes, and the device-wide peak of one calibration generation (below); the VAE decodes in tiles when an
  untiled decode would be the peak.
- Every other unit is *streamed*: a ring of a few GPU slot buffers, filled on a side CUDA stream in execution order;
  unit k's forward waits (on the GPU, not the host) for its copy, and the slot is refilled with the next streamed
  unit as soon as unit k's kernels are queued, ordered after them by an event. The ring runs on across denoising
  steps, so the next step's first units arrive while the current step finishes.
- Upcasting stays where DiffSynth does it: its `AutoWrappedLinear` casts the weight to bf16 right before the matmul;
  since the weight already sits on the GPU, that cast runs on the GPU, through `Upcaster` (a Triton kernel, 2.3-2.6x
  torch's fp8->bf16 copy on an H200, checked against torch before first use; torch's copy where Triton is missing).
  Biases and tiny wrapped layers (norm scales) are kept in the compute dtype, which skips a cast kernel per bias and
  DiffSynth's per-call deep copy of norm modules (same values: fp8->bf16 is exact).
- The plan is made from the device-wide peak (what nvidia-smi shows: CUDA context, cuBLAS/cuDNN workspaces and the
  allocator's cache included) sampled during the calibration generation, so the budget holds for the whole card.
- Compute modes: `torch.compile` of the DiT blocks (one graph per block class; the hooks above stay outside it; on
  by default where it can run, see `enable_streaming`) and, opt-in, float8 compute (`Float8Linears`: the blocks'
  linears multiply the float8 weights as stored with `torch._scaled_mm`, activations quantized per token on the
  GPU). Measured on an H200 at 12 GB, 1024² (run 9): 0.203 s/step eager bf16, 0.146 compiled (the default), 0.112
  compiled with float8 compute (bench/README.md).

`synchronous=True` runs the same code with blocking copies on the compute stream and no prefetch: the reference
that the streamed path must match bit for bit (a race would show as a difference).

This module also holds the prompt-embedding cache (a repeated prompt skips the text encoders), because it only pays
off together with streaming: without it every request streams T5 again.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import itertools
import logging
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import torch

from engine import compat
from engine.compat import compile_unsupported_reason

compat.apply()  # before the first diffsynth import

from diffsynth.core.vram.layers import AutoTorchModule, AutoWrappedLinear  # noqa: E402

log = logging.getLogger(__name__)

GIB = 1024**3
ALIGNMENT = 256
"""Bytes. Every parameter view starts on this boundary (vectorised kernels and cuBLAS want aligned pointers)."""
SMALL_WRAPPER_NUMEL = 1 << 16
"""A wrapped non-Linear layer with fewer parameters than this (a norm scale) is kept in the compute dtype."""
DEFAULT_SLOTS = 3
"""Ring depth: with 3, a double block's copy (≈6 ms on PCIe 5) has two blocks of compute to hide behind."""
DEFAULT_MARGIN_GB = 0.9
"""Kept free under the budget: allocator fragmentation grows over a 20-step run beyond what the 1-step calibration
shows (0.74 GiB of a 0.75 margin was used on an H200 at 1024², 8 GB), and peaks shorter than the sampling interval."""
DECODE_TILES = (64, 32)
"""VAE decode tile and stride in latent pixels (512 / 256 image pixels) when the budget needs a tiled decode."""


def _align(nbytes: int) -> int:
    return (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


# ---------------------------------------------------------------------------------------------------------------------
# Host memory


def _return_freed_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks under its mmap threshold, ≈32 MB: most of the
    weight tensors DiffSynth loaded). Without this the host would hold the packed copy and the freed originals."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to do
        pass


LOAD_MAPPED_PARAMS = 100_000_000
"""While DiffSynth loads, its DiskMap re-opens (and so unmaps) a safetensors file after this many parameters; its
default, 10^9, keeps up to 2 GB of a bf16 file mapped, which counts in the process's RSS on top of the weights."""


LOAD_TRIM_INTERVAL_S = 0.25


@contextlib.contextmanager
def frugal_loading() -> Iterator[None]:
    """Around DiffSynth's `from_pretrained`: keep little of the weight files mapped at a time (DiskMap's buffer, read
    from the environment when each DiskMap is made, restored afterwards), and hand freed heap memory back every
    0.25 s (DiffSynth's converters concatenate q/k/v pieces and cast T5 to float8: the freed pieces stay in glibc's
    heap otherwise). Measured on the full-size files (CPU load, 3 runs): load peak RSS 19.7 -> 16.9 GiB, with
    16.5 GiB once packed."""
    name = "DIFFSYNTH_DISK_MAP_BUFFER_SIZE"
    previous = os.environ.get(name)
    os.environ[name] = str(LOAD_MAPPED_PARAMS)
    done = threading.Event()

    def trim() -> None:
        while not done.wait(LOAD_TRIM_INTERVAL_S):
            _return_freed_host_memory()

    trimmer = threading.Thread(target=trim, name="load-trim", daemon=True)
    trimmer.start()
    try:
        yield
    finally:
        done.set()
        trimmer.join()
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
        _return_freed_host_memory()


PAGE = mmap.PAGESIZE


def _page_align(nbytes: int) -> int:
    return (nbytes + PAGE - 1) // PAGE * PAGE


def _unregister_all(base: int, pinned: dict[int, int]) -> None:
    for offset in list(pinned):
        try:
            torch.cuda.cudart().cudaHostUnregister(base + offset)
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass
    pinned.clear()


class HostMemory:
    """One flat uint8 host allocation holding a model's units, each starting on a page. It is an anonymous private
    memory map, so the pages of one unit can be handed back to the OS (`release`) once that unit lives on the GPU for
    good, and the bytes come back (`restore`) if it is ever streamed again. Units are page-locked one by one
    (cudaHostRegister of exactly their range; torch's `pin_memory()` would round every block up to a power of two,
    up to 1.5x the host RAM for these sizes)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        self._map = mmap.mmap(-1, max(nbytes, PAGE), **({"flags": flags} if flags else {}))
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)[:nbytes]
        self._pinned: dict[int, int] = {}  # offset -> registered bytes
        self._released: dict[int, int] = {}  # offset -> bytes handed back to the OS
        self._pin_failed = False
        weakref.finalize(self, _unregister_all, self.tensor.data_ptr(), self._pinned)

    @property
    def pinned_bytes(self) -> int:
        return sum(self._pinned.values())

    @property
    def held_bytes(self) -> int:
        """Bytes of the allocation backed by memory (not handed back)."""
        return self.nbytes - sum(self._released.values())

    def pin(self, offset: int, nbytes: int) -> None:
        """Page-lock one unit's range, once filled: registering touches every page, so pinning first would hold the
        buffer and the weights it is filled from at the same time."""
        if not nbytes or offset in self._pinned or self._pin_failed:
            return
        error = int(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr() + offset, nbytes, 0))
        if error == 0:
            self._pinned[offset] = nbytes
        else:  # e.g. a locked-memory limit (WSL): still correct, only slower copies
            self._pin_failed = True
            log.warning("could not page-lock host memory for the weights (cudaError %d); copies will be slower", error)

    def release(self, offset: int, nbytes: int) -> bool:
        """Hand a unit's pages back to the OS (its bytes read as zeros afterwards). False where the OS cannot (no
        madvise): the bytes stay."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None or not hasattr(self._map, "madvise") or offset in self._released or not nbytes:
            return False
        if offset in self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr() + offset)
            del self._pinned[offset]
        self._map.madvise(advice, offset, _page_align(nbytes))
        self._released[offset] = nbytes
        return True

    def restore(self, offset: int, source: torch.Tensor, *, pin: bool) -> None:
        """Fill a released range again (from the unit's GPU copy) and page-lock it."""
        if offset not in self._released:
            return  # never handed back: the bytes are still there
        self.tensor[offset:offset + source.numel()].copy_(source)
        del self._released[offset]
        if pin:
            self.pin(offset, source.numel())


# ---------------------------------------------------------------------------------------------------------------------
# Layout of one model's weights


@dataclass
class _Entry:
    """One parameter's place in its unit's flat byte range."""

    param: torch.nn.Parameter
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


@dataclass
class _Unit:
    index: int
    module: torch.nn.Module
    entries: list[_Entry]
    nbytes: int
    host: torch.Tensor | None = None  # uint8 view into the model's HostMemory
    host_views: list[torch.Tensor] = field(default_factory=list)
    device: torch.Tensor | None = None  # uint8 buffer on the GPU while resident
    device_views: list[torch.Tensor] = field(default_factory=list)

    @property
    def host_offset(self) -> int:
        """Where `host` starts in the model's HostMemory (a page boundary)."""
        return self.host.storage_offset()

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]

    def point(self, views: list[torch.Tensor]) -> None:
        for entry, view in zip(self.entries, views):
            entry.param.data = view


def _wrapper_of(model: torch.nn.Module) -> dict[int, AutoTorchModule]:
    """id(parameter) -> the DiffSynth VRAM wrapper that owns it (its forward casts what it needs)."""
    owners: dict[int, AutoTorchModule] = {}
    for module in model.modules():
        if isinstance(module, AutoTorchModule):
            for param in module.parameters():
                owners.setdefault(id(param), module)
    return owners


def _device_dtype(wrapper: AutoTorchModule | None, param: torch.Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter has on the GPU. Linear weights keep their storage dtype (DiffSynth casts them per call);
    a tiny wrapped layer, or a parameter no wrapper casts, is stored in the compute dtype."""
    if wrapper is None:
        return compute_dtype
    if isinstance(wrapper, AutoWrappedLinear):
        return param.dtype if param is wrapper.weight else compute_dtype  # a bias is tiny: no cast per call
    if sum(p.numel() for p in wrapper.parameters()) < SMALL_WRAPPER_NUMEL:
        return compute_dtype
    return param.dtype


# ---------------------------------------------------------------------------------------------------------------------
# GPU upcast


def fp8_codes_to_bf16_bits(codes: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes (int32 0..255) -> bfloat16 bit patterns (int32), exact: the formula the Triton kernel
    uses, kept here in torch so that it is tested everywhere. Normal numbers re-bias the exponent (7 -> 127) and
    widen the mantissa (3 -> 7 bits); subnormals are m * 2^-9; 0x7F/0xFF are NaN (written as torch writes it, 0x7FC0)."""
    sign = (codes & 0x80) << 8
    exponent = (codes >> 3) & 0xF
    mantissa = codes & 0x7
    normal = ((exponent + 120) << 7) | (mantissa << 4)
    subnormal = (mantissa.to(torch.float32) * (1.0 / 512)).view(torch.int32) >> 16
    bits = torch.where(exponent == 0, subnormal, normal) | sign
    return torch.where((codes & 0x7F) == 0x7F, torch.full_like(codes, 0x7FC0), bits)  # NaN: torch drops the sign


def _build_triton_upcast(*, autotune: bool = True):
    """A Triton kernel writing bf16 bits from fp8 codes (runs on any CUDA GPU Triton supports, also those without
    fp8 hardware), or None when Triton is unavailable. Two variants, picked per tensor size by Triton's autotuner:
    the integer formula above, or a 256-entry lookup table (fewer instructions, gathers from L1)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def upcast_kernel(src, dst, table, n, BLOCK: tl.constexpr, USE_TABLE: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        codes = tl.load(src + offsets, mask=mask, other=0).to(tl.int32)
        if USE_TABLE:
            bits = tl.load(table + codes)
        else:
            sign = (codes & 0x80) << 8
            exponent = (codes >> 3) & 0xF
            mantissa = codes & 0x7
            normal = ((exponent + 120) << 7) | (mantissa << 4)
            subnormal = (mantissa.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True) >> 16
            bits = tl.where(exponent == 0, subnormal, normal) | sign
            bits = tl.where((codes & 0x7F) == 0x7F, 0x7FC0, bits).to(tl.int16)
        tl.store(dst + offsets, bits, mask=mask)

    configs = [triton.Config({"BLOCK": block, "USE_TABLE": table}, num_warps=warps)
               for block, warps in ((2048, 4), (4096, 4), (8192, 8), (16384, 8)) for table in (False, True)]
    if autotune:
        try:  # short tuning runs: one per distinct weight size (about a dozen), at the first generation
            kernel = triton.autotune(configs=configs, key=["n"], warmup=5, rep=20)(upcast_kernel)
        except TypeError:  # a Triton without these arguments
            kernel = triton.autotune(configs=configs, key=["n"])(upcast_kernel)
    else:
        kernel = upcast_kernel
    tables: dict[torch.device, torch.Tensor] = {}

    def upcast(source: torch.Tensor, out: torch.Tensor, **meta) -> None:
        table = tables.get(source.device)
        if table is None:
            codes = torch.arange(256, dtype=torch.int32)
            table = tables[source.device] = fp8_codes_to_bf16_bits(codes).to(torch.int16).to(source.device)
        n = source.numel()
        kernel[lambda m: (triton.cdiv(n, m["BLOCK"]),)](source.view(torch.uint8), out.view(torch.int16), table, n,
                                                        **meta)

    return upcast


class Upcaster:
    """Replaces DiffSynth's `AutoWrappedLinear.cast_to(weight, dtype, device)` for the streamed models: returns the
    tensor itself when it already has the dtype and device (the bf16 biases), uses the Triton kernel for contiguous
    fp8 -> bf16 on a GPU, and torch's copy otherwise (identical results: the kernel is checked on all 256 codes)."""

    def __init__(self):
        self._kernel = None
        self._checked = False
        self.triton = True
        """Use the Triton kernel; False: torch's copy (inside torch.compile'd code, where Inductor fuses it)."""

    def _fast_kernel(self):
        if not self._checked:
            self._checked = True
            try:
                kernel = _build_triton_upcast()
                if kernel is not None:
                    codes = torch.arange(256, dtype=torch.int32, device="cuda").to(torch.uint8)
                    fp8 = codes.view(torch.float8_e4m3fn)
                    out = torch.empty(256, dtype=torch.bfloat16, device="cuda")
                    kernel(fp8, out)
                    expected = fp8.to(torch.bfloat16)
                    # NaN codes (0x7F, 0xFF) may carry either sign depending on the torch build: compare them as NaN
                    same = (out.view(torch.int16) == expected.view(torch.int16)) | (out.isnan() & expected.isnan())
                    if bool(same.all()):
                        self._kernel = kernel
                    else:
                        log.warning("Triton fp8 upcast disagrees with torch; using torch's copy")
            except Exception as exc:  # no compiler, unsupported GPU, ...: the torch copy is always right
                log.info("Triton fp8 upcast unavailable (%s); using torch's copy", exc)
        return self._kernel

    def __call__(self, weight: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
        target = torch.device(device)
        if weight.dtype == dtype and weight.device.type == target.type:
            return weight
        if (weight.dtype == torch.float8_e4m3fn and dtype == torch.bfloat16 and weight.is_cuda
                and target.type == "cuda" and weight.is_contiguous() and self.triton
                and self._fast_kernel() is not None):
            out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
            self._kernel(weight, out)
            return out
        out = torch.empty_like(weight, dtype=dtype, device=device)
        out.copy_(weight)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Opt-in float8 compute


FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value: each activation row's largest magnitude is scaled onto it."""
FP8_SCALE_FLOOR = 1e-12
"""Smallest activation scale (an all-zero row would otherwise divide by zero)."""
FP8_MIN_ROWS = 16
"""Inputs with fewer rows keep the bf16 path: the modulation layers see one row per image, where a float8 product
gains nothing and every output (scale, shift, gate) steers a whole block."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) float8 quantization of a [M, K] tensor: (codes float8_e4m3fn [M, K], scale float32 [M, 1])
    with x ≈ codes * scale, each row's largest magnitude mapped to 448. The reference the GPU kernel is checked
    against, and the CPU path."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=FP8_SCALE_FLOOR)
    codes = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale


def _build_triton_quantize():
    """One Triton pass per row: read bf16, find the row's largest magnitude, write float8 codes and the float32 scale
    (torch needs five passes over the tensor for the same). None when Triton is unavailable."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def quantize_kernel(x, codes, scales, K, x_row_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < K
        values = tl.load(x + row * x_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(values), axis=0) / 448.0, 1e-12)
        tl.store(scales + row, scale)
        scaled = tl.clamp(values / scale, -448.0, 448.0)
        tl.store(codes + row * K + offsets, scaled.to(codes.dtype.element_ty), mask=mask)

    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = x.shape
        codes = torch.empty((rows, width), dtype=torch.float8_e4m3fn, device=x.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(width)
        warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
        quantize_kernel[(rows,)](x, codes, scale, width, x.stride(0), BLOCK=block, num_warps=warps)
        return codes, scale

    return quantize


def is_compile_failure(exc: BaseException) -> bool:
    """Whether an exception from a generation came from torch.compile failing (Dynamo or Inductor, e.g. no C
    compiler, a Triton bug) rather than from running the model (out of memory, a cancelled job)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # a torch without Dynamo cannot have compiled anything
        return False
    return isinstance(exc, TorchDynamoException)


def fp8_unsupported_reason(device: torch.device, capability: tuple[int, int] | None = None) -> str | None:
    """Why float8 compute cannot run on `device`, or None. CUDA needs compute capability 8.9 (Ada) or 9.0+ (Hopper):
    torch._scaled_mm has no float8 kernels below. Other devices are probed with a tiny product."""
    if device.type == "cuda":
        capability = capability or torch.cuda.get_device_capability(device)
        if tuple(capability) < (8, 9):
            return (f"float8 compute needs a GPU of compute capability 8.9 or newer (RTX 40xx, H100); this one is "
                    f"{capability[0]}.{capability[1]}")
        return None
    try:
        codes = torch.zeros(16, 16, dtype=torch.float8_e4m3fn, device=device)
        one = torch.ones(16, 1, dtype=torch.float32, device=device)
        torch._scaled_mm(codes, codes.t(), scale_a=one, scale_b=one.t(), out_dtype=torch.bfloat16)
    except Exception as exc:  # a torch build without float8 matmul on this device
        return f"torch._scaled_mm does not run on {device} ({type(exc).__name__}: {str(exc)[:120]})"
    return None


class Float8Linears:
    """Opt-in float8 compute for DiffSynth `AutoWrappedLinear`s whose weight is float8_e4m3fn where it computes
    (resident, or in a streaming slot): activations are quantized per row on the GPU (one Triton pass, no host sync)
    and multiplied by the float8 weight as it is, with `torch._scaled_mm` (bf16 out, bias fused). The weight is
    stored without a scale, so its scale is 1. No bf16 copy of the weight is made at all.

    Installed as an instance `forward` on each layer and removed again by `uninstall`; a call it cannot take (few
    rows, a weight not in float8, another input dtype) goes to DiffSynth's own forward."""

    def __init__(self, *, fast_accumulation: bool = True, triton: bool = True):
        self.fast_accumulation = fast_accumulation
        self.triton = triton
        """Quantize with the Triton pass on a GPU; False: with torch ops (which torch.compile fuses into the kernel
        that produced the activations)."""
        self._kernel = None
        self._kernel_checked = False
        self._unit_scales: dict[tuple[torch.device, int], torch.Tensor] = {}
        self._installed: list[torch.nn.Module] = []
        self.calls = 0
        """float8 products computed (for tests and the benchmark)."""

    @staticmethod
    def eligible(module: torch.nn.Module) -> bool:
        """A layer the float8 product can take: float8 weight, both widths multiples of 16 (cuBLASLt/CUTLASS)."""
        return (isinstance(module, AutoWrappedLinear) and module.weight.dtype == torch.float8_e4m3fn
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    @property
    def installed(self) -> int:
        return len(self._installed)

    def install(self, modules) -> int:
        for module in modules:
            if self.eligible(module) and "forward" not in module.__dict__:
                module.forward = self._make_forward(module)
                self._installed.append(module)
        return len(self._installed)

    def uninstall(self) -> None:
        for module in self._installed:
            module.__dict__.pop("forward", None)  # DiffSynth's class forward shows through again
        self._installed.clear()

    def _make_forward(self, module: AutoWrappedLinear):
        original = type(module).forward

        def forward(x, *args, **kwargs):
            weight = module.weight
            if (weight.dtype != torch.float8_e4m3fn or x.dtype != torch.bfloat16 or x.dim() < 2
                    or x.numel() < FP8_MIN_ROWS * x.shape[-1] or x.device != weight.device):
                return original(module, x, *args, **kwargs)
            bias = module.bias
            if bias is not None and bias.dtype != torch.bfloat16:
                bias = bias.to(torch.bfloat16)
            out = self.linear(x, weight, bias)
            if module.lora_A_weights:
                out = module.lora_forward(x, out)
            return out

        return forward

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row float8 codes and scales of a contiguous [M, K] tensor: the Triton pass on a GPU (checked against
        `quantize_rows` at first use), `quantize_rows` elsewhere."""
        if x.is_cuda and self.triton:
            kernel = self._triton_kernel(x.device)
            if kernel is not None:
                return kernel(x)
        return quantize_rows(x)

    def _triton_kernel(self, device: torch.device):
        if not self._kernel_checked:
            self._kernel_checked = True
            try:
                kernel = _build_triton_quantize()
                if kernel is not None:
                    generator = torch.Generator(device=device).manual_seed(0)
                    x = torch.randn(64, 3072, device=device, generator=generator).to(torch.bfloat16)
                    x[1] = 0  # an all-zero row
                    x[2] *= 1000
                    codes, scale = kernel(x)
                    expected_codes, expected_scale = quantize_rows(x)
                    # Division rounding may differ in the last bit: compare values, within a float8 rounding step.
                    close = torch.allclose(scale, expected_scale, rtol=1e-6, atol=0)
                    step = (dequantize_rows(codes, scale) - dequantize_rows(expected_codes, expected_scale)).abs()
                    if close and bool((step <= expected_scale / 8 + x.float().abs() / 8).all()):
                        self._kernel = kernel
                    else:
                        log.warning("Triton float8 quantization disagrees with torch; using torch's (slower)")
            except Exception as exc:  # no compiler, unsupported GPU, ...
                log.info("Triton float8 quantization unavailable (%s); using torch's (slower)", exc)
        return self._kernel

    def _unit_scale(self, device: torch.device, columns: int) -> torch.Tensor:
        key = (device, columns)
        scale = self._unit_scales.get(key)
        if scale is None:  # made once per width: no host-to-device copy per call
            scale = self._unit_scales[key] = torch.ones((1, columns), dtype=torch.float32, device=device)
        return scale

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., K] bf16 @ weight [N, K] float8_e4m3fn (scale 1) + bias [N] bf16 -> [..., N] bf16."""
        leading = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        if not rows.is_contiguous():
            rows = rows.contiguous()
        codes, scale = self.quantize(rows)
        # mat2 must be column-major: the transpose of the row-major [N, K] weight is, without a copy.
        unit_scale = self._unit_scale(weight.device, weight.shape[0])
        out = torch._scaled_mm(codes, weight.t(), scale_a=scale, scale_b=unit_scale, bias=bias,
                               out_dtype=torch.bfloat16, use_fast_accum=self.fast_accumulation)
        if not torch.compiler.is_compiling():  # a changing Python int would make torch.compile re-trace every call
            self.calls += 1
        return out.reshape(*leading, out.shape[-1])

    def check(self, device: torch.device) -> str | None:
        """Run one product on `device` against a float32 reference; a problem description, or None when right."""
        try:
            generator = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(2, 64, 256, device=device, generator=generator).to(torch.bfloat16)
            weight = (torch.randn(384, 256, device=device, generator=generator) / 16).to(torch.float8_e4m3fn)
            bias = torch.randn(384, device=device, generator=generator).to(torch.bfloat16)
            out = self.linear(x, weight, bias).float()
            expected = x.float() @ weight.float().t() + bias.float()
            error = float((out - expected).norm() / expected.norm())
        except Exception as exc:
            return f"{type(exc).__name__}: {str(exc)[:200]}"
        return None if error < 0.1 else f"relative error {error:.3f} against float32"


class SlotPool:
    """A few GPU buffers that streamed units take turns in, shared by every streamed model (their phases never
    overlap), plus the side stream and the events that order copies against compute."""

    def __init__(self, device: torch.device | str, slot_bytes: int, count: int):
        self.device = torch.device(device)
        self.slot_bytes = slot_bytes
        self.cuda = self.device.type == "cuda"
        self.buffers = [torch.empty(max(slot_bytes, 1), dtype=torch.uint8, device=self.device) for _ in range(count)]
        self.tags: list[tuple | None] = [None] * count
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.ready = [torch.cuda.Event() if self.cuda else None for _ in range(count)]
        self.free = [torch.cuda.Event() if self.cuda else None for _ in range(count)]

    @property
    def count(self) -> int:
        return len(self.buffers)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def load(self, slot: int, source: torch.Tensor, tag: tuple, *, synchronous: bool) -> None:
        """Copy `source` (host bytes) into `slot`. Async: on the side stream, after the slot's last user finished."""
        target = self.buffers[slot][:source.numel()]
        if self.cuda and not synchronous:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[slot])
                target.copy_(source, non_blocking=True)
                self.ready[slot].record(self.copy_stream)
        else:
            if self.cuda:  # an earlier async copy may still be writing: order after it, then copy blocking
                torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            target.copy_(source)
            if self.cuda:
                self.ready[slot].record(torch.cuda.current_stream(self.device))
        self.tags[slot] = tag

    def acquire(self, slot: int) -> None:
        """The compute stream waits (on the GPU) until the slot's copy has landed."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def release(self, slot: int) -> None:
        """Mark the point after the work queued so far on the compute stream: the slot may be overwritten after it."""
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))


class ModelStreamer:
    """Owns where one DiffSynth model's weights live. Units are streamed or resident; everything else in the model
    (embedders, final layers: small) is resident. DiffSynth's own VRAM management is switched off for this model."""

    _ids = itertools.count(1)

    def __init__(self, name: str, model: torch.nn.Module, units: Sequence[torch.nn.Module], device: str | torch.device,
                 *, compute_dtype: torch.dtype = torch.bfloat16, pin: bool | None = None):
        self.name = name
        self.model = model
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self._id = next(self._ids)
        self._serial = itertools.count()
        self.pool: SlotPool | None = None
        self.synchronous = False
        self._hooks: list = []
        self._order: list[int] = []
        self._position: dict[int, int] = {}
        self._cursor = 0
        self._loaded: dict[int, tuple[int, tuple]] = {}
        self._active: tuple[int, int] | None = None
        self._view_cache: dict[tuple[int, int], list[torch.Tensor]] = {}
        pin = self.device.type == "cuda" if pin is None else pin

        owners = _wrapper_of(model)
        seen: set[int] = set()
        self.units: list[_Unit] = []
        for index, module in enumerate(units):
            entries, offset = [], 0
            for param in module.parameters():
                if id(param) in seen:
                    continue
                seen.add(id(param))
                dtype = _device_dtype(owners.get(id(param)), param, compute_dtype)
                nbytes = param.numel() * dtype.itemsize
                entries.append(_Entry(param, offset, nbytes, dtype, param.shape))
                offset = _align(offset + nbytes)
            self.units.append(_Unit(index, module, entries, offset))

        # Pack all units into one host allocation, unit by unit (each on its own pages), dropping each original tensor
        # once copied, so the host holds little more than one copy at any time.
        self.pin = pin
        self.host_memory = HostMemory(sum(_page_align(u.nbytes) for u in self.units))
        start = 0
        for unit in self.units:
            unit.host = self.host_memory.tensor[start:start + unit.nbytes]
            unit.host_views = unit.views(unit.host)
            for entry, view in zip(unit.entries, unit.host_views):
                view.copy_(entry.param.data)  # same dtype, or an exact upcast of a small norm scale
            unit.point(unit.host_views)
            start += _page_align(unit.nbytes)
            _return_freed_host_memory()  # unit by unit: the host never holds much more than one copy
        if pin:
            for unit in self.units:
                self.host_memory.pin(unit.host_offset, unit.nbytes)

        # Everything outside the units stays on the GPU for good.
        self.global_bytes = 0
        for param in model.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            dtype = _device_dtype(owners.get(id(param)), param, compute_dtype)
            param.data = param.data.to(device=self.device, dtype=dtype)
            self.global_bytes += param.numel() * dtype.itemsize
        for name_, buffer in model.named_buffers():
            if buffer.device != self.device:
                module_name, _, attr = name_.rpartition(".")
                owner = model.get_submodule(module_name) if module_name else model
                owner._buffers[attr] = buffer.to(self.device)

        # DiffSynth's wrappers: "prepared" for good, with the dtype their weights have on the GPU, and the model out of
        # the pipeline's load_models_to_device() (which would move these weights back to the CPU after each stage).
        upcaster = self.upcaster = Upcaster()
        for module in model.modules():
            if isinstance(module, AutoTorchModule):
                params = list(module.parameters())
                module.state = 2
                module.preparing_device = module.computation_device
                module.preparing_dtype = params[0].dtype if params else module.computation_dtype
                if isinstance(module, AutoWrappedLinear):
                    module.cast_to = upcaster  # instance attribute: DiffSynth's computation() calls self.cast_to
        model.vram_management_enabled = False

    # -- state ---------------------------------------------------------------------------------------------------------
    @property
    def unit_bytes(self) -> list[int]:
        return [u.nbytes for u in self.units]

    @property
    def resident(self) -> frozenset[int]:
        return frozenset(u.index for u in self.units if u.device is not None)

    @property
    def resident_bytes(self) -> int:
        return sum(u.nbytes for u in self.units if u.device is not None)

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied to the GPU per forward pass."""
        return sum(u.nbytes for u in self.units if u.device is None)

    @property
    def max_streamed_unit_bytes(self) -> int:
        return max((u.nbytes for u in self.units if u.device is None), default=0)

    def attach(self, pool: SlotPool) -> None:
        """Start streaming through `pool` (hooks on every unit)."""
        if self.pool is not None:
            raise RuntimeError(f"{self.name}: already attached")
        if self.units and pool.slot_bytes < max(self.unit_bytes):
            raise ValueError(f"{self.name}: slot of {pool.slot_bytes} B is smaller than its largest unit")
        self.pool = pool
        for unit in self.units:
            self._hooks.append(unit.module.register_forward_pre_hook(self._make_pre_hook(unit.index)))
            self._hooks.append(unit.module.register_forward_hook(self._make_post_hook(unit.index)))
        self._replan()

    def set_resident(self, indices: Sequence[int] | frozenset[int]) -> None:
        """Keep exactly these units on the GPU (copied once, blocking); the others are streamed. A resident unit's
        host copy is handed back to the OS (at 12 GB that is 7.7 GiB of host RAM for MajicFLUX's DiT); if the unit
        is streamed again later, its bytes are copied back from the GPU first."""
        wanted = set(indices)
        if not wanted <= set(range(len(self.units))):
            raise ValueError(f"{self.name}: no such units {sorted(wanted - set(range(len(self.units))))}")
        self.reset()
        for unit in self.units:
            if unit.index in wanted and unit.device is None:
                unit.device = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
                unit.device.copy_(unit.host)  # blocking: done before the host pages go
                unit.device_views = unit.views(unit.device)
                unit.point(unit.device_views)
                self.host_memory.release(unit.host_offset, unit.nbytes)
            elif unit.index not in wanted and unit.device is not None:
                self.host_memory.restore(unit.host_offset, unit.device, pin=self.pin)
                unit.point(unit.host_views)
                unit.device, unit.device_views = None, []
        self._replan()

    def reset(self) -> None:
        """Forget what is in the slots and point streamed weights back to host memory (after an error mid-forward)."""
        if self._active is not None:
            index, slot = self._active
            self.units[index].point(self.units[index].host_views)
            if self.pool is not None:
                self.pool.release(slot)
            self._active = None
        self._loaded.clear()

    def _replan(self) -> None:
        self._order = [u.index for u in self.units if u.device is None]
        self._position = {index: position for position, index in enumerate(self._order)}
        self._cursor = 0
        self._loaded.clear()
        if self.pool is not None and self.max_streamed_unit_bytes > self.pool.slot_bytes:
            raise ValueError(f"{self.name}: a streamed unit does not fit the pool's slots")

    # -- the schedule --------------------------------------------------------------------------------------------------
    def _ring_size(self) -> int:
        return 1 if self.synchronous else min(self.pool.count, len(self._order))

    def _fill(self, slot: int) -> None:
        """Copy the next streamed unit in execution order into `slot` (unless it is still intact there)."""
        index = self._order[self._cursor]
        self._cursor = (self._cursor + 1) % len(self._order)
        known = self._loaded.get(index)
        if known is not None and known[0] == slot and self.pool.tags[slot] == known[1]:
            return
        tag = (self._id, index, next(self._serial))
        self.pool.load(slot, self.units[index].host, tag, synchronous=self.synchronous)
        self._loaded[index] = (slot, tag)

    def _resync(self, index: int) -> None:
        """The unit about to run is not in a slot (first forward, another model used the slots, or an unexpected
        order): restart the ring at it."""
        self._cursor = self._position[index]
        for slot in range(self._ring_size()):
            self._fill(slot)

    def _make_pre_hook(self, index: int):
        def pre_hook(module, args):
            if self._active is not None:  # the previous unit never finished (an exception): clean up first
                self.reset()
            unit = self.units[index]
            if unit.device is not None:
                return None
            known = self._loaded.get(index)
            if known is None or self.pool.tags[known[0]] != known[1]:
                self._resync(index)
                known = self._loaded[index]
            slot = known[0]
            self.pool.acquire(slot)
            unit.point(self._slot_views(unit, slot))
            self._active = (index, slot)
            return None

        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(module, args, output):
            unit = self.units[index]
            if unit.device is not None or self._active is None:
                return None
            _, slot = self._active
            self._active = None
            self.pool.release(slot)
            unit.point(unit.host_views)
            if not self.synchronous:
                self._fill(slot)  # prefetch: the next streamed unit goes where this one was
            return None

        return post_hook

    def _slot_views(self, unit: _Unit, slot: int) -> list[torch.Tensor]:
        key = (unit.index, slot)
        if key not in self._view_cache:
            self._view_cache[key] = unit.views(self.pool.buffers[slot])
        return self._view_cache[key]

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.reset()


# ---------------------------------------------------------------------------------------------------------------------
# Planning


def choose_resident(unit_bytes: Sequence[int], allowance: int) -> frozenset[int]:
    """Which units to keep on the GPU within `allowance` bytes. Residents are spread evenly through the execution
    order (by bytes), so that between two streamed units there is resident compute to hide the next copy behind;
    what the even spread leaves of the allowance is then filled with any units that still fit."""
    total = sum(unit_bytes)
    if allowance <= 0 or not unit_bytes:
        return frozenset()
    if allowance >= total:
        return frozenset(range(len(unit_bytes)))
    share = allowance / total
    chosen: set[int] = set()
    resident = seen = 0
    for index, nbytes in enumerate(unit_bytes):
        seen += nbytes
        if resident + nbytes / 2 <= share * seen and resident + nbytes <= allowance:
            chosen.add(index)
            resident += nbytes
    for index in sorted(set(range(len(unit_bytes))) - chosen, key=lambda i: -unit_bytes[i]):
        if resident + unit_bytes[index] <= allowance:
            chosen.add(index)
            resident += unit_bytes[index]
    return frozenset(chosen)


class DevicePeak:
    """Samples device-wide used memory (total - free, as nvidia-smi counts it) from a thread every `interval` s while
    in the `with` block; `peak` is the largest value seen."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-peak", daemon=True)

    def sample(self) -> None:
        free, total = torch.cuda.mem_get_info(self.device)
        self.peak = max(self.peak, total - free)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "DevicePeak":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@dataclass(frozen=True)
class MemoryReport:
    """What calibration measured and what the plan decided (bytes unless named otherwise)."""

    budget: int
    device_peak: int
    """Device-wide used memory at its peak with nothing resident, for the decode mode chosen: what the plan subtracts
    from the budget."""
    main_peak: int
    """Device-wide peak of the calibration generation (tiled decode)."""
    untiled_decode_peak: int
    """Device-wide peak of an untiled VAE decode alone."""
    decode_tiled: bool
    context: int
    """Device memory used outside PyTorch's allocator after calibration (CUDA context, kernels)."""
    persistent: int
    """Allocated by weights that never move (globals, CLIP, VAE decoder) and the slot buffers."""
    working: int
    """Peak allocated above `persistent` during the calibration generation."""
    margin: int
    allowance: int
    dit_resident: int
    dit_streamed: int
    t5_resident: int
    t5_streamed: int
    slots: int
    slot_bytes: int

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline's models


def _t5_units(t5: torch.nn.Module) -> list[torch.nn.Module]:
    return [t5.encoder.embed_tokens, *t5.encoder.block]


def _dit_units(dit: torch.nn.Module) -> list[torch.nn.Module]:
    return [*dit.blocks, *dit.single_blocks]


class PipelineStreaming:
    """Streaming for a DiffSynth FluxImagePipeline: DiT and T5 streamed, CLIP and the VAE decoder resident."""

    def __init__(self, pipe, device: str | torch.device, *, slots: int = DEFAULT_SLOTS,
                 compute_dtype: torch.dtype = torch.bfloat16):
        self.pipe = pipe
        self.device = torch.device(device)
        self.dit = ModelStreamer("dit", pipe.dit, _dit_units(pipe.dit), self.device, compute_dtype=compute_dtype)
        self.t5 = ModelStreamer("t5", pipe.text_encoder_2, _t5_units(pipe.text_encoder_2), self.device,
                                compute_dtype=compute_dtype)
        self.others = [ModelStreamer(name, getattr(pipe, name), [], self.device, compute_dtype=compute_dtype)
                       for name in ("text_encoder_1", "vae_decoder") if getattr(pipe, name, None) is not None]
        slot_bytes = max([*self.dit.unit_bytes, *self.t5.unit_bytes, 0])
        self.pool = SlotPool(self.device, slot_bytes, slots)
        self.dit.attach(self.pool)
        self.t5.attach(self.pool)
        self.float8 = Float8Linears()
        self._compiled = False
        self.report: MemoryReport | None = None
        self.decode_tiles: tuple[int, int] | None = None
        """Set by the plan when the budget needs a tiled VAE decode: (tile, stride) in latent pixels."""
        self._tile_vae_decoder(pipe.vae_decoder)

    def _tile_vae_decoder(self, decoder: torch.nn.Module) -> None:
        """The pipeline decodes untiled (engine.pipeline passes tiled=False in stream mode); when the plan says so,
        decode in tiles instead: about a quarter of the activation memory at 1024², ≈0.1 s more."""
        original = decoder.forward
        tiling = threading.local()  # DiffSynth's tiled_forward calls forward() again per tile: pass those through

        def forward(sample, tiled=False, tile_size=64, tile_stride=32, **kwargs):
            outer = not getattr(tiling, "active", False)
            if self.decode_tiles is not None and outer:
                tiled, (tile_size, tile_stride) = True, self.decode_tiles
            tiling.active = True
            try:
                return original(sample, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride, **kwargs)
            finally:
                tiling.active = not outer

        decoder.forward = forward

    @property
    def streamers(self) -> list[ModelStreamer]:
        return [self.dit, self.t5, *self.others]

    @property
    def synchronous(self) -> bool:
        return self.dit.synchronous

    @synchronous.setter
    def synchronous(self, value: bool) -> None:
        for streamer in (self.dit, self.t5):
            streamer.reset()
            streamer.synchronous = value

    def reset(self) -> None:
        for streamer in (self.dit, self.t5):
            streamer.reset()

    @property
    def fp8_compute(self) -> bool:
        """Whether the DiT's block linears multiply in float8 now (see `set_fp8_compute`)."""
        return self.float8.installed > 0

    def set_fp8_compute(self, enabled: bool) -> bool:
        """Opt-in: the DiT blocks' linears multiply in float8 (`Float8Linears`: activations rounded to float8 per
        token, weights used as stored) instead of upcasting their weights to bf16. Changes the pictures slightly.
        Where the device cannot (CUDA compute capability below 8.9, or a failed self-check) this logs a warning and
        stays in bf16. Returns whether float8 compute is on."""
        self.float8.uninstall()
        if not enabled:
            return False
        problem = fp8_unsupported_reason(self.device) or self.float8.check(self.device)
        if problem is not None:
            log.warning("engine.fp8_compute: %s; computing in bf16", problem)
            return False
        count = self.float8.install(m for unit in self.dit.units for m in unit.module.modules())
        log.info("float8 compute on for %d DiT linears", count)
        return count > 0

    @property
    def torch_compiled(self) -> bool:
        """Whether the DiT blocks run under torch.compile now (see `set_torch_compile`)."""
        return self._compiled

    def set_torch_compile(self, enabled: bool, *, backend="inductor") -> bool:
        """The DiT blocks' forwards run under torch.compile: one graph per block class, shared by all 57 blocks (the
        streaming hooks stay outside it, so residency and streaming work unchanged). Inductor fuses the norms, RoPE,
        modulation, GELU and the float8 quantization between the matrix products, which DiffSynth runs as dozens of
        separate kernels per block. Measured on an H200 at 12 GB, 1024²: 0.203 -> 0.144 s/step in bf16, 0.166 ->
        0.109 with float8 compute (bench/README.md). Compilation happens at the first generation, not here (≈10 s on
        16 cores; `enable_streaming` does it at start-up and falls back to eager blocks when it fails). The first
        size gets graphs for its exact shapes; the first *other* size compiles once more, with the token count
        symbolic, and every later size reuses that (torch.compile's automatic dynamic shapes), so a bot whose users
        pick any aspect ratio compiles twice, not once per size. Returns whether the blocks are compiled."""
        blocks = [*self.pipe.dit.blocks, *self.pipe.dit.single_blocks]
        for block in blocks:
            block.__dict__.pop("forward", None)
        self._compiled = False
        self.float8.triton = self.dit.upcaster.triton = True
        if not enabled:
            return False
        # dynamic=None: exact shapes first, then one shape-generic graph at the first size change (see above).
        compiled = {cls: torch.compile(cls.forward, backend=backend, dynamic=None)
                    for cls in {type(block) for block in blocks}}
        for block in blocks:
            block.forward = functools.partial(compiled[type(block)], block)
        # Inside compiled code, torch ops that Inductor fuses into its kernels beat our standalone Triton passes.
        self.float8.triton = self.dit.upcaster.triton = False
        self._compiled = True
        return True

    def stop_compiling(self, exc: BaseException, where: str) -> None:
        """After torch.compile (or a compiled kernel) failed `where`: say so, forget the failed forward's slots and run
        the blocks eagerly from now on; the caller then redoes its generation."""
        log.warning("torch.compile of the DiT blocks failed %s (%s: %s); running them eagerly from now on", where,
                    type(exc).__name__, str(exc)[:300])
        self.reset()
        self.set_torch_compile(False)

    @property
    def host_bytes(self) -> int:
        """Host memory holding weights now (resident units' host copies are handed back)."""
        return sum(s.host_memory.held_bytes for s in self.streamers)

    @property
    def pinned_bytes(self) -> int:
        return sum(s.host_memory.pinned_bytes for s in self.streamers)

    def plan(self, budget_gb: float, calibrate: Callable[[], None], *, width: int, height: int,
             margin_gb: float = DEFAULT_MARGIN_GB) -> MemoryReport:
        """Measure one generation with nothing resident, then keep as many units resident as the budget allows:
        DiT units first (used every step), T5 units with what is left. Resident weights add to every phase's peak
        one for one, so allowance = budget - device-wide peak of the calibration run - margin. The calibration
        decodes tiled; an untiled decode is measured on its own and kept when it costs no residency (or everything
        fits anyway)."""
        if self.device.type != "cuda":
            raise RuntimeError("planning needs a CUDA device")
        self.dit.set_resident(())
        self.t5.set_resident(())
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        persistent = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.decode_tiles = DECODE_TILES
        with DevicePeak(self.device) as main:
            calibrate()
            torch.cuda.synchronize(self.device)
        working = torch.cuda.max_memory_allocated(self.device) - persistent
        self.decode_tiles = None
        latents = torch.randn(1, 16, height // 8, width // 8, device=self.device, dtype=self.dit.compute_dtype)
        torch.cuda.empty_cache()
        with DevicePeak(self.device) as untiled, torch.no_grad():
            self.pipe.vae_decoder(latents)
            torch.cuda.synchronize(self.device)
        del latents
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        context = total - free - torch.cuda.memory_reserved(self.device)
        budget = int(budget_gb * GIB)
        margin = int(margin_gb * GIB)
        everything = sum(self.dit.unit_bytes)
        if untiled.peak <= main.peak or max(main.peak, untiled.peak) + everything + margin <= budget:
            peak = max(main.peak, untiled.peak)
        else:
            self.decode_tiles = DECODE_TILES
            peak = main.peak
        allowance = budget - peak - margin
        dit = choose_resident(self.dit.unit_bytes, allowance)
        self.dit.set_resident(dit)
        left = allowance - self.dit.resident_bytes
        self.t5.set_resident(choose_resident(self.t5.unit_bytes, left) if len(dit) == len(self.dit.units) else ())
        self.report = MemoryReport(
            budget=budget, device_peak=peak, main_peak=main.peak, untiled_decode_peak=untiled.peak,
            decode_tiled=self.decode_tiles is not None, context=context,
            persistent=persistent, working=working, margin=margin,
            allowance=allowance, dit_resident=self.dit.resident_bytes, dit_streamed=self.dit.streamed_bytes,
            t5_resident=self.t5.resident_bytes, t5_streamed=self.t5.streamed_bytes, slots=self.pool.count,
            slot_bytes=self.pool.slot_bytes)
        log.info("stream plan: %s", {k: (round(v / GIB, 2) if isinstance(v, int) and v > 4096 else v)
                                     for k, v in self.report.as_dict().items()})
        return self.report


def enable_streaming(pipe, *, device: str, budget_gb: float, width: int, height: int,
                     slots: int = DEFAULT_SLOTS, margin_gb: float = DEFAULT_MARGIN_GB,
                     fp8_compute: bool = False, torch_compile: bool | Literal["auto"] = False,
                     compile_backend="inductor") -> PipelineStreaming:
    """Take over weight movement for a pipeline built with every model in host memory (see engine.pipeline's
    `stream` memory plan). On a GPU the residency plan is calibrated with one 1-step generation at width x height,
    in the compute mode asked for (`fp8_compute`, `torch_compile`: see `PipelineStreaming.set_fp8_compute` and
    `set_torch_compile`; "auto" compiles where `compile_unsupported_reason` finds nothing against it); on a CPU
    everything is streamed (the tests exercise the full streaming path that way). That first generation also
    compiles: when compilation fails, the blocks run eagerly (with a warning) and it is redone."""
    streaming = PipelineStreaming(pipe, device, slots=slots)
    if fp8_compute:
        streaming.set_fp8_compute(True)
    if torch_compile == "auto":
        reason = compile_unsupported_reason(torch.device(device))
        if reason is not None:
            log.info("engine.torch_compile = \"auto\": blocks stay eager (%s)", reason)
        torch_compile = reason is None
    if torch_compile:
        streaming.set_torch_compile(True, backend=compile_backend)

    def calibrate() -> None:
        pipe(prompt="calibration", seed=0, num_inference_steps=1, width=width, height=height,
             progress_bar_cmd=lambda steps: steps)

    def first_generation() -> None:
        if torch.device(device).type == "cuda":
            streaming.plan(budget_gb, calibrate, width=width, height=height, margin_gb=margin_gb)
        elif streaming.torch_compiled:
            calibrate()  # compile now, where a failure can still fall back

    started = time.monotonic()
    try:
        first_generation()
    except Exception as exc:
        if not streaming.torch_compiled:  # any error with compiled blocks: retry eagerly, it raises again if not theirs
            raise
        streaming.stop_compiling(exc, "at start-up")
        first_generation()
    if streaming.torch_compiled:
        log.info("DiT blocks compiled (torch.compile) in the first generation: %.1f s", time.monotonic() - started)
    install_prompt_cache(pipe)
    return streaming


# ---------------------------------------------------------------------------------------------------------------------
# Prompt-embedding cache


class PromptCache:
    """The prompt unit's outputs for the last `size` distinct (prompt, T5 length, positive) keys, kept in host memory
    (≈4 MB each at 512 tokens). A hit returns copies on the pipeline's device: T5 and CLIP are not run at all."""

    def __init__(self, size: int = 32):
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[tuple, dict] = collections.OrderedDict()

    def lookup(self, key: tuple, device: torch.device | str) -> dict | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return {k: v.to(device, non_blocking=False) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}

    def clear(self) -> None:
        self._entries.clear()

    def store(self, key: tuple, outputs: dict) -> None:
        self._entries[key] = {k: v.detach().to("cpu") if isinstance(v, torch.Tensor) else v
                              for k, v in outputs.items()}
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


def install_prompt_cache(pipe, size: int = 32) -> PromptCache | None:
    """Wrap the pipeline's prompt-embedding unit (FluxImageUnit_PromptEmbedder) with a PromptCache."""
    from diffsynth.pipelines.flux_image import FluxImageUnit_PromptEmbedder

    for unit in pipe.units:
        if isinstance(unit, FluxImageUnit_PromptEmbedder):
            cache = PromptCache(size)
            original = unit.process

            def process(pipe_, prompt, t5_sequence_length, positive, _original=original, _cache=cache):
                key = (prompt, t5_sequence_length, positive)
                hit = _cache.lookup(key, pipe_.device)
                if hit is not None:
                    return hit
                outputs = _original(pipe_, prompt=prompt, t5_sequence_length=t5_sequence_length, positive=positive)
                _cache.store(key, outputs)
                return outputs

            unit.process = process
            pipe.prompt_cache = cache
            return cache
    return None
