"""GPU kernels (Triton) for the streamed weights and the float8 product, each with the exact torch formula it is
checked against: fp8 -> bf16 upcast of a weight that just arrived in a slot, and per-row float8 quantization of
activations. Written here because torch's own casts take several passes (the upcast kernel is 2.3-2.6x torch's copy
on an H200, bench/README.md); where Triton is missing, torch's ops give the same result."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


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
                and (kernel := self._fast_kernel()) is not None):
            out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
            kernel(weight, out)
            return out
        out = torch.empty_like(weight, dtype=dtype, device=device)
        out.copy_(weight)
        return out


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
