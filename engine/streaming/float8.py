"""Opt-in float8 compute: the DiT blocks' linears multiply their float8 weights as stored (`torch._scaled_mm`),
activations quantized per token on the GPU (engine.streaming.kernels)."""

from __future__ import annotations

import logging

import torch

from engine import compat
from engine.streaming.kernels import FP8_MIN_ROWS, _build_triton_quantize, dequantize_rows, quantize_rows
from engine.streaming.patches import Patches

compat.apply()  # before the first diffsynth import

from diffsynth.core.vram.layers import AutoWrappedLinear  # noqa: E402

log = logging.getLogger(__name__)


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

    Installed as an instance `forward` on each layer (through `patches`, group "float8") and removed again by
    `uninstall`; a call it cannot take (few rows, a weight not in float8, another input dtype) goes to DiffSynth's own
    forward."""

    GROUP = "float8"

    def __init__(self, *, fast_accumulation: bool = True, triton: bool = True, patches: Patches | None = None):
        self.fast_accumulation = fast_accumulation
        self.triton = triton
        """Quantize with the Triton pass on a GPU; False: with torch ops (which torch.compile fuses into the kernel
        that produced the activations)."""
        self._kernel = None
        self._kernel_checked = False
        self._unit_scales: dict[tuple[torch.device, int], torch.Tensor] = {}
        self.patches = patches if patches is not None else Patches()
        self.calls = 0
        """float8 products computed (for tests and the benchmark)."""

    @staticmethod
    def eligible(module: torch.nn.Module) -> bool:
        """A layer the float8 product can take: float8 weight, both widths multiples of 16 (cuBLASLt/CUTLASS)."""
        return (isinstance(module, AutoWrappedLinear) and module.weight.dtype == torch.float8_e4m3fn
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    @property
    def installed(self) -> int:
        return self.patches.count(self.GROUP)

    def install(self, modules) -> int:
        for module in modules:
            if self.eligible(module) and "forward" not in module.__dict__:
                self.patches.set(module, "forward", self._make_forward(module), group=self.GROUP)
        return self.installed

    def uninstall(self) -> None:
        self.patches.undo(self.GROUP)  # DiffSynth's class forward shows through again

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
