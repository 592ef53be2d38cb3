"""Engine settings: the `[engine]` table of config.toml.

Pure pydantic, no torch: the chat side validates the whole config file at start-up without loading the GPU stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Literal["majicflus", "tiny"] = "majicflus"
    """`majicflus`: the real MajicFLUX + FLUX.1-dev files under `models_dir`. `tiny`: a few-MB random model the
    project generates itself (pictures are noise) for tests and for trying the bot without weights."""

    models_dir: Path = Path("models")
    mode: Literal["offload", "stream", "resident"] = "stream"
    """`stream`: drawbot's own weight streaming (engine/streaming/): DiT and T5 in float8 in page-locked host RAM,
    as many blocks resident on the GPU as `vram_budget_gb` allows (planned at start-up), the rest copied ahead on a
    side stream; ≈20x faster than `offload` at 8 GB (bench/README.md).
    `offload`: DiffSynth's own per-layer offload, DiT kept in float8 in host RAM.
    `resident`: every weight stays on the GPU (24 GB+ cards)."""

    vram_budget_gb: float = Field(default=8.0, gt=0, le=1024)
    fp8_compute: bool = False
    """`stream` mode only, opt-in: the DiT blocks' matrix products run in float8 (torch._scaled_mm) instead of bf16:
    faster on GPUs of compute capability 8.9+ (RTX 40xx, H100), with slightly different pictures. Elsewhere drawbot
    logs a warning and computes in bf16."""
    torch_compile: bool | Literal["auto"] = "auto"
    """`stream` mode: run the DiT blocks under torch.compile, which fuses the many small kernels between the matrix
    products: 22-28% faster steps (H200, bench/README.md). `"auto"` compiles on CUDA GPUs of compute capability 8.0+
    (RTX 30xx and newer) when Triton and a C compiler (gcc) are there, and stays eager elsewhere; `true` always tries,
    `false` never. Compiling happens at start-up (≈10 s on a 16-core machine, longer on fewer cores) and once more at
    the first picture of another size; the systemd unit keeps the compiled kernels across restarts. If compiling
    fails, drawbot says so in the log and runs the blocks as they are."""
    host_ram_budget_gb: float | Literal["auto"] = "auto"
    """`stream` mode: GiB of host RAM drawbot may hold. With room for the pinned path (about 18 GiB with MajicFLUX),
    the weights the GPU does not hold stay in page-locked RAM; below it they live in a converted weight cache file
    (`weight_cache_dir`) read through the page cache. `"auto"`: what the machine has available at start-up."""
    weight_cache_dir: Path | None = None
    """Where the file-backed path keeps its converted weights (about 16 GB with MajicFLUX); default
    `models_dir/weight-cache`."""
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    default_steps: int = Field(default=20, ge=1, le=200)
    min_steps: int = Field(default=1, ge=1, le=200)
    max_steps: int = Field(default=50, ge=1, le=200)
    width: int = Field(default=1024, ge=64, le=2048, multiple_of=16)
    height: int = Field(default=1024, ge=64, le=2048, multiple_of=16)
    guidance: float = Field(default=3.5, ge=0, le=20)
    max_queue: int = Field(default=100, ge=1, le=100_000)
    """Jobs waiting in the engine at most (the chat side refuses politely before this is reached)."""

    @model_validator(mode="after")
    def _host_ram_budget_positive(self) -> "EngineSettings":
        if self.host_ram_budget_gb != "auto" and not 0 < self.host_ram_budget_gb <= 4096:
            raise ValueError(f"host_ram_budget_gb must be \"auto\" or a number of GiB above 0 "
                             f"(got {self.host_ram_budget_gb})")
        return self

    @model_validator(mode="after")
    def _steps_in_order(self) -> "EngineSettings":
        if not self.min_steps <= self.default_steps <= self.max_steps:
            raise ValueError(
                f"steps must satisfy min_steps <= default_steps <= max_steps "
                f"(got {self.min_steps} <= {self.default_steps} <= {self.max_steps})"
            )
        return self
