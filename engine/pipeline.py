"""The whole generation path, top to bottom: weight files -> DiffSynth FluxImagePipeline -> one picture as PNG.

Memory layout (the reason drawbot exists): the 12B DiT is stored in float8_e4m3fn (half of bf16) and computed in
bf16 on the GPU. In `offload` mode its layers live in host RAM and DiffSynth moves them to the GPU under the VRAM
budget; T5, CLIP and the VAE are kept in bf16 and loaded to the GPU only for their own stage. In `resident` mode
everything stays on the GPU. The tiny test model goes through exactly the same code with `device="cpu"`.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine import compat, weights
from engine.jobs import GenerationRequest, GenerationResult
from engine.png import a1111_parameters, encode_png
from engine.settings import EngineSettings
from engine.size_cost import SizeCost, cpu_size_cost, gpu_size_cost
from engine.worker import StepCallback

if TYPE_CHECKING:  # imported only in `stream` mode: it loads the Triton kernels
    from engine.streaming import PipelineStreaming

log = logging.getLogger(__name__)

# GiB of the budget left for what DiffSynth's vram_limit does not count ahead: activations, the CUDA context, VAE decode.
VRAM_HEADROOM_GB = 1.5


def _drawbot_version() -> str:
    try:
        return "drawbot " + version("drawbot")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "drawbot (source)"


class DeviceUnavailable(RuntimeError):
    """The configured device is not on this machine: a set-up problem, `str(exc)` says the fix."""


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"engine.device = {setting!r} but this torch sees no CUDA GPU (torch {torch.__version__}): set "
            f"engine.device = \"auto\" (or \"cpu\"), or check the GPU driver with nvidia-smi")
    if setting.startswith("cuda:") and setting[5:].isdigit() and int(setting[5:]) >= torch.cuda.device_count():
        raise DeviceUnavailable(
            f"engine.device = {setting!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered "
            f"from 0: set engine.device = \"cuda:0\" or \"auto\"")
    return setting


@dataclass(frozen=True)
class MemoryPlan:
    """How each model's weights are stored and moved (DiffSynth ModelConfig VRAM fields) and the VRAM limit."""

    dit: dict
    others: dict
    vram_limit: float | None
    tiled_vae: bool
    t5: dict | None = None
    """T5's fields when they differ from `others` (stream mode keeps T5 in float8)."""


def plan_memory(settings: EngineSettings, device: str) -> MemoryPlan:
    fp8, bf16 = torch.float8_e4m3fn, torch.bfloat16
    if settings.mode == "stream":
        # Every model is loaded into host RAM (DiT and T5 in fp8, read once); engine.streaming then takes over where
        # the weights live: CLIP/VAE decoder on the GPU, DiT/T5 units resident or streamed (see that module).
        dit = dict(offload_dtype=fp8, offload_device="cpu", onload_dtype=fp8, onload_device="cpu",
                   preparing_dtype=fp8, preparing_device="cpu", computation_dtype=bf16, computation_device=device)
        others = {**dit, "offload_dtype": bf16, "onload_dtype": bf16, "preparing_dtype": bf16}
        return MemoryPlan(dit, others, vram_limit=None, tiled_vae=False, t5=dit)
    if settings.mode == "resident" or device == "cpu":
        # Weights stay where they compute: fp8 DiT on the device, upcast per layer at compute time.
        dit = dict(offload_dtype=fp8, offload_device=device, onload_dtype=fp8, onload_device=device,
                   preparing_dtype=fp8, preparing_device=device, computation_dtype=bf16, computation_device=device)
        others = {**dit, "offload_dtype": bf16, "onload_dtype": bf16, "preparing_dtype": bf16}
        return MemoryPlan(dit, others, vram_limit=None, tiled_vae=False)
    # offload: fp8 DiT in host RAM; layers become GPU-resident fp8 while the device is under vram_limit, the rest
    # is copied in for every forward. Encoders and VAE: bf16 in host RAM, onloaded for their own stage only.
    dit = dict(offload_dtype=fp8, offload_device="cpu", onload_dtype=fp8, onload_device="cpu",
               preparing_dtype=fp8, preparing_device=device, computation_dtype=bf16, computation_device=device)
    others = {**dit, "offload_dtype": bf16, "onload_dtype": bf16, "preparing_dtype": bf16}
    limit = max(0.0, settings.vram_budget_gb - VRAM_HEADROOM_GB)
    return MemoryPlan(dit, others, vram_limit=limit, tiled_vae=settings.vram_budget_gb < 16)


@dataclass(frozen=True)
class StartupTimes:
    """Where the engine's start-up went, in seconds; `describe()` is the line the owner sees."""

    total: float
    load: float
    """Model files read (DiffSynth's loading; in stream mode only CLIP and the VAE, the rest is `packing`)."""
    packing: float = 0.0
    """Stream mode: DiT and T5 read into host memory or the weight cache, unit by unit."""
    calibration: float = 0.0
    """Stream mode: the 1-step generation at the default size (residency plan; the exact-shape compile)."""
    warmup: float = 0.0
    """The 1-step generation at a second size that compiles the shape-generic graph (torch.compile only)."""
    reading: float = 0.0
    """Stream mode: waiting for the weights read while those generations ran (resident units, page cache)."""
    compiled: bool = False

    def describe(self) -> str:
        parts = [f"load {self.load:.1f} s"]
        if self.packing:
            parts.append(f"weights packed {self.packing:.1f} s")
        if self.calibration or self.warmup:
            parts.append(f"calibration + compile {self.calibration + self.warmup:.1f} s" if self.compiled
                         else f"calibration {self.calibration + self.warmup:.1f} s")
        if self.reading >= 0.05:
            parts.append(f"then weights read {self.reading:.1f} s")
        return f"ready in {self.total:.1f} s: " + ", ".join(parts)


class FluxPipeline:
    """A loaded Flux pipeline. Models stay loaded between jobs; only the engine's GPU thread calls `generate`."""

    def __init__(self, pipe, settings: EngineSettings, *, model_name: str, device: str, is_test_model: bool,
                 plan: MemoryPlan):
        self.pipe = pipe
        self.settings = settings
        self.model_name = model_name
        self.device = device
        self.is_test_model = is_test_model
        self.plan = plan
        self.streaming: PipelineStreaming | None = None  # in `stream` mode
        self.size_cost: SizeCost | None = None
        """What a picture size costs on this device and the budget for it (engine.size_cost); None = no limit known."""
        self.startup: StartupTimes | None = None
        """Set by `load`."""
        self._version = _drawbot_version()

    @classmethod
    def load(cls, settings: EngineSettings) -> "FluxPipeline":
        device = resolve_device(settings.device)
        files, model_name = locate_model(settings)
        plan = plan_memory(settings, device)
        from engine import host_ram

        host_budget = host_ram.budget_gib(settings)  # before loading: "auto" is what is free now
        started = time.monotonic()
        chatter = io.StringIO()  # DiffSynth prints a banner per model; keep the console and journal clean
        loading: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if settings.mode == "stream":  # host RAM is what stream mode is short of: map little of each file at a time
            from engine.streaming import frugal_loading

            loading = frugal_loading()
        sources = None
        with contextlib.redirect_stdout(chatter), loading:
            if settings.mode == "stream":
                pipe, sources = _load_for_streaming(files, plan, device)
            else:
                pipe = _from_pretrained(files, plan, device)
        log.debug("diffsynth said:\n%s", chatter.getvalue())
        loaded = time.monotonic() - started
        log.info("loaded %s on %s in %.1f s (mode=%s, vram_limit=%s GiB)", model_name, device, loaded,
                 settings.mode, plan.vram_limit)
        pipeline = cls(pipe, settings, model_name=model_name, device=device,
                       is_test_model=settings.model == "tiny", plan=plan)
        if settings.mode == "stream":
            from engine.streaming import enable_streaming

            pipeline.streaming = enable_streaming(pipe, device=device, budget_gb=settings.vram_budget_gb,
                                                  width=settings.width, height=settings.height,
                                                  fp8_compute=settings.fp8_compute,
                                                  torch_compile=settings.torch_compile,
                                                  weight_cache=_weight_cache(settings, files, host_budget),
                                                  sources=sources,
                                                  page_cache_room=lambda: _page_cache_room(host_budget))
            if pipeline.streaming.dit.file_backed:
                _keep_in_page_cache(pipeline.streaming, host_budget)
        elif settings.fp8_compute or settings.torch_compile is True:
            log.warning("engine.fp8_compute and engine.torch_compile apply to mode = \"stream\" only; ignored")
        pipeline.size_cost = measure_size_cost(pipeline, settings)
        if pipeline.size_cost is not None:
            largest = pipeline.size_cost.largest_pixels
            side = int(largest**0.5) // 16 * 16
            log.info("largest picture this %s can afford: %d pixels (%dx%d)", device, largest, side, side)
            if not pipeline.size_cost.affordable(settings.width, settings.height):
                log.warning("the default size %dx%d does not fit this %s's memory (largest about %dx%d): /draw "
                            "without a size will be refused; lower [engine] width and height", settings.width,
                            settings.height, device, side, side)
        streaming = pipeline.streaming
        seconds = streaming.startup_seconds if streaming is not None else None
        pipeline.startup = StartupTimes(
            total=time.monotonic() - started, load=loaded,
            packing=seconds.packing if seconds else 0.0, calibration=seconds.calibration if seconds else 0.0,
            warmup=seconds.warmup if seconds else 0.0, reading=seconds.reading if seconds else 0.0,
            compiled=bool(streaming and streaming.torch_compiled))
        log.info("engine %s", pipeline.startup.describe())
        return pipeline

    def generate(self, request: GenerationRequest, on_step: StepCallback) -> GenerationResult:
        """Blocking. `on_step(done, total)` is called before the first step (done=0) and after each step; it may
        raise to stop the run at a step boundary."""
        total = request.steps
        step_times: list[float] = []

        def progress(timesteps):
            # DiffSynth hands its timestep iterable to `progress_bar_cmd`: the hook for per-step progress and cancel.
            on_step(0, total)
            last = time.monotonic()
            for done, timestep in enumerate(timesteps, start=1):
                yield timestep
                now = time.monotonic()
                step_times.append(now - last)
                last = now
                on_step(done, total)

        def draw():
            return self.pipe(
                prompt=request.prompt,
                seed=request.seed,
                num_inference_steps=request.steps,
                height=request.height,
                width=request.width,
                embedded_guidance=self.settings.guidance,
                tiled=self.plan.tiled_vae,
                progress_bar_cmd=progress,
            )

        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        graphs = self._compiled_graphs()
        started = time.monotonic()
        try:
            image = draw()
        except Exception as exc:
            # A new picture size compiles the DiT blocks again; if that fails, this picture (and every later one)
            # is drawn with eager blocks instead of failing.
            from engine.streaming import is_compile_failure

            if self.streaming is None or not self.streaming.torch_compiled or not is_compile_failure(exc):
                raise
            self.streaming.stop_compiling(exc, f"at {request.width}x{request.height}")
            step_times.clear()
            image = draw()
        seconds = time.monotonic() - started
        compiled = self._compiled_graphs() - graphs
        if compiled > 0:  # start-up compiles the graphs every allowed size uses (engine.streaming.enable_streaming)
            log.warning("the %dx%d picture waited for torch.compile (%d new graphs, %.1f s in all); start-up was "
                        "meant to compile every size's graph: please report this", request.width, request.height,
                        compiled, seconds)
        parameters = a1111_parameters(request, model_name=self.model_name, guidance=self.settings.guidance,
                                      version=self._version)
        return GenerationResult(
            request=request,
            png=encode_png(image, parameters),
            seconds=seconds,
            seconds_per_step=sum(step_times) / len(step_times) if step_times else 0.0,
            peak_vram_bytes=torch.cuda.max_memory_reserved(self.device) if cuda else None,
            model_name=self.model_name,
            test_model=self.is_test_model,
        )

    def _compiled_graphs(self) -> int:
        if self.streaming is None or not self.streaming.torch_compiled:
            return 0
        from engine.streaming import compiled_graphs

        return compiled_graphs()

    def recover_from_oom(self) -> None:
        """After an out-of-memory error: drop whatever the failed run left on the GPU so the next job starts clean."""
        if self.streaming is not None:
            self.streaming.reset()
        try:
            self.pipe.load_models_to_device([])
        except Exception:  # the OOM may have left a model half-moved; freeing memory still helps
            log.exception("could not offload models after OOM")
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def measure_size_cost(pipeline: "FluxPipeline", settings: EngineSettings) -> SizeCost | None:
    """The cost model for the device the pipeline draws on (see engine.size_cost)."""
    if pipeline.device == "cpu":
        return cpu_size_cost()
    report = getattr(pipeline.streaming, "report", None)
    if report is not None:
        return gpu_size_cost(report, calibrated_pixels=settings.width * settings.height)
    return None


def _weight_cache(settings: EngineSettings, files: weights.ModelFiles, budget: float):
    """The converted weight cache when the host-RAM budget is below the pinned path's need (engine.host_ram), else
    None (pinned)."""
    from engine import host_ram
    from engine.streaming.weight_cache import WeightCache

    path = host_ram.weight_path(settings, budget)
    need = host_ram.PINNED_PATH_GIB[settings.model]
    if path == "pinned":
        log.info("host RAM budget %.1f GiB >= %.1f GiB: weights pinned in host RAM", budget, need)
        return None
    folder = host_ram.weight_cache_dir(settings)
    log.info("host RAM budget %.1f GiB < %.1f GiB: weights file-backed (weight cache in %s)", budget, need, folder)
    _limit_compile_workers(host_ram.FILE_PATH_COMPILE_THREADS)
    return WeightCache(folder, {"dit": [files.dit], "t5": list(files.t5)})


def _page_cache_room(budget: float) -> int:
    from engine import host_ram

    return host_ram.page_cache_room(budget)


def _keep_in_page_cache(streaming: "PipelineStreaming", budget: float) -> None:
    """File-backed: what of the streamed weights the page cache keeps within the host-RAM budget (the rest is read
    from the disk at every step), now that the process's own memory is known (loaded, calibrated, compiled)."""
    from engine import host_ram

    room = host_ram.page_cache_room(budget)
    kept = streaming.keep_in_page_cache(room)
    direct = getattr(streaming.dit.host_memory, "direct_reads", False)
    log.info("page cache: %.2f GiB of the streamed weights kept in RAM, %.2f GiB read from the disk per step (%s; "
             "host RAM budget %.1f GiB, %.2f GiB held by the process)", kept / host_ram.GIB,
             streaming.dit.dropped_bytes / host_ram.GIB, "O_DIRECT" if direct else "through the page cache", budget,
             host_ram.held_bytes() / host_ram.GIB)


def _limit_compile_workers(threads: int) -> None:
    """Where host RAM is short: torch.compile's worker processes (one per core by default, each importing torch and
    Triton) would take more anonymous memory than the whole file-backed engine; fewer workers only compile slower."""
    try:
        from torch._inductor import config as inductor
    except ImportError:  # no Inductor: nothing compiles
        return
    current = inductor.compile_threads
    if current is None or current > threads:
        log.info("torch.compile workers: %d instead of %s (host RAM is short)", threads, current)
        inductor.compile_threads = threads


def _load_for_streaming(files: weights.ModelFiles, plan: MemoryPlan, device: str):
    """Stream mode, in bounded host RAM: CLIP and the VAE (small) through DiffSynth's `from_pretrained`; the DiT and
    T5 built without weights, read tensor by tensor from their files when engine.streaming packs them (see
    engine.streaming.loading). Returns the pipeline and those two models' sources."""
    from engine.streaming.loading import empty_model

    pipe = _from_pretrained(files, plan, device, streamed=False)
    pipe.dit, dit = empty_model([files.dit], "flux_dit", plan.dit)
    pipe.text_encoder_2, t5 = empty_model(list(files.t5), "flux_text_encoder_t5", plan.t5 or plan.others)
    pipe.vram_management_enabled = pipe.check_vram_management_state()
    return pipe, {"dit": dit, "t5": t5}


def _from_pretrained(files: weights.ModelFiles, plan: MemoryPlan, device: str, *, streamed: bool = True):
    """DiffSynth's own loading (every model's state dict read at once); `streamed=False` leaves out the DiT and T5."""
    compat.apply()
    from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

    big = [ModelConfig(path=str(files.dit), **plan.dit),
           ModelConfig(path=[str(p) for p in files.t5], **(plan.t5 or plan.others))] if streamed else []
    return FluxImagePipeline.from_pretrained(
        torch_dtype=torch.bfloat16,
        device=device,  # always explicit: DiffSynth's default is picked at import time
        model_configs=[
            *big,
            ModelConfig(path=str(files.clip), **plan.others),
            ModelConfig(path=str(files.vae), **plan.others),  # one file -> vae_encoder + vae_decoder
        ],
        # Local folders: the defaults would download from a hub.
        tokenizer_1_config=ModelConfig(path=str(files.tokenizer_1)),
        tokenizer_2_config=ModelConfig(path=str(files.tokenizer_2)),
        vram_limit=plan.vram_limit,
    )


def locate_model(settings: EngineSettings) -> tuple[weights.ModelFiles, str]:
    """The files of the configured model, checked; the tiny model is generated on first use."""
    if settings.model == "tiny":
        from engine import tiny

        root = Path(settings.models_dir) / tiny.TINY_ROOT_NAME
        tiny.write_tiny_model(root)
        tiny.register_tiny_models()
        files = weights.layout(root.resolve(), dict(tiny.tiny_hashes_by_part()))
        problems = weights.check(files, fix=f"delete {root} and start again (it is regenerated)")
        name = "drawbot-tiny (noise)"
    else:
        files = weights.real_model_files(Path(settings.models_dir))
        problems = weights.check(files, fix="drawbot download")
        name = "majicflus_v134"
    if problems:
        raise weights.WeightsError(problems)
    return files, name
