"""Makes `import diffsynth` work on a CPU-only torch. Call `apply()` before the first diffsynth import.

On a machine without a GPU, pip pairs torch 2.13.0+cpu with torchvision 0.28.0, whose only wheel is CUDA-linked: its
`_C` extension fails to load and `torchvision/_meta_registrations.py` then registers fakes for operators that do not
exist (RuntimeError: operator torchvision::nms does not exist). diffsynth imports torchvision at module level, but
the Flux inference path never calls a torchvision operator. So, only when that exact failure happens, we define the
two operator schemas, drop the half-imported torchvision and import it again. DiffSynth's VRAM management also calls
`torch.<device>.empty_cache()` and `torch.<device>.mem_get_info()`, which torch.cpu lacks; CPU versions are added.

On a CUDA torch the import simply succeeds and nothing here changes anything.

Also here, because `drawbot doctor` asks it without loading DiffSynth: whether this machine can run torch.compile.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch

_library = None  # keeps the operator definitions alive for the life of the process
_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    _patch_torchvision()
    _patch_cpu_memory_api()
    _applied = True


def _patch_torchvision() -> None:
    global _library
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
    except ImportError:
        return  # diffsynth will report it; nothing to repair here
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


def _patch_cpu_memory_api() -> None:
    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None  # type: ignore[attr-defined]
    if not hasattr(torch.cpu, "mem_get_info"):

        def mem_get_info(device=None) -> tuple[int, int]:
            import psutil

            vm = psutil.virtual_memory()
            return vm.available, vm.total

        torch.cpu.mem_get_info = mem_get_info  # type: ignore[attr-defined]


MIN_COMPILE_CAPABILITY = (8, 0)
"""torch.compile's kernels (Triton) in bfloat16 need Ampere or newer: RTX 30xx, 40xx, A100, H100."""


def c_compiler() -> str | None:
    """The C compiler Triton builds its launchers with ($CC, else gcc / clang / cc on PATH), or None."""
    wanted = os.environ.get("CC")
    candidates = [wanted] if wanted else ["gcc", "clang", "cc"]
    return next((found for name in candidates if (found := shutil.which(name))), None)


def compile_unsupported_reason(device: torch.device, capability: tuple[int, int] | None = None) -> str | None:
    """Why `torch_compile = "auto"` leaves the DiT blocks eager on `device`, or None when it compiles them: only on a
    CUDA GPU of compute capability 8.0+, with Triton importable and a C compiler on PATH (Triton needs one)."""
    if device.type != "cuda":
        return f"torch.compile is used on CUDA GPUs only (the engine runs on {device.type})"
    capability = capability or torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_COMPILE_CAPABILITY:
        return (f"torch.compile needs a GPU of compute capability 8.0 or newer (RTX 30xx+); this one is "
                f"{capability[0]}.{capability[1]}")
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (it comes with torch's Linux CUDA wheels)"
    if c_compiler() is None:
        return "no C compiler on PATH (Triton builds its kernels' launchers with one): install gcc"
    return None
