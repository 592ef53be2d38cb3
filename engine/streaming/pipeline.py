"""The glue between streaming and DiffSynth's FluxImagePipeline: which models stream (DiT, T5) and which stay on the
GPU (CLIP, VAE decoder), the residency plan from a calibration generation, and the compute-mode switches
(torch.compile of the DiT blocks, float8 compute) with their eager fallback."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Literal

import torch

from engine.compat import compile_unsupported_reason
from engine.streaming.float8 import Float8Linears, fp8_unsupported_reason
from engine.streaming.patches import Patches
from engine.streaming.planning import (DECODE_TILES, DEFAULT_MARGIN_GB, DevicePeak, MemoryReport,
                                       choose_resident)
from engine.streaming.prompt_cache import install_prompt_cache
from engine.streaming.loading import SourceWeights
from engine.streaming.weight_cache import WeightCache
from engine.streaming.streamer import DEFAULT_SLOTS, ModelStreamer, SlotPool
from engine.streaming.tiled_decode import decode_in_tiles

log = logging.getLogger(__name__)

GIB = 1024**3


def is_compile_failure(exc: BaseException) -> bool:
    """Whether an exception from a generation came from torch.compile failing (Dynamo or Inductor, e.g. no C
    compiler, a Triton bug, the recompile limit: see `set_torch_compile`) rather than from running the model (out of
    memory, a cancelled job)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    try:
        from torch._dynamo import exc as dynamo_errors
    except ImportError:  # a torch without Dynamo cannot have compiled anything
        return False
    limit_hit = getattr(dynamo_errors, "FailOnRecompileLimitHit", None)  # not a TorchDynamoException
    return isinstance(exc, dynamo_errors.TorchDynamoException) or (limit_hit is not None and isinstance(exc, limit_hit))


def compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process so far (Dynamo's own counter): a picture that
    raises it waited for a compile."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


@dataclass
class StartupSeconds:
    """Where `enable_streaming`'s start-up time went."""

    packing: float = 0.0
    """Weights read and packed into host memory (or the weight cache) per unit."""
    calibration: float = 0.0
    """The first 1-step generation at the default size: residency plan on a GPU, exact-shape graphs when compiled."""
    warmup: float = 0.0
    """The 1-step generation at a second size that compiles the shape-generic graphs (0 when not compiled)."""
    reading: float = 0.0
    """Waiting, after those generations, for the resident units' bytes and the page cache's warm-up (both read
    while the generations ran: see `enable_streaming`)."""


def _t5_units(t5: Any) -> list[torch.nn.Module]:
    return [t5.encoder.embed_tokens, *t5.encoder.block]


def _dit_units(dit: Any) -> list[torch.nn.Module]:
    return [*dit.blocks, *dit.single_blocks]


def _reader(sources: dict[str, SourceWeights], name: str):
    source = sources.get(name)
    return source.read if source is not None else None


def _close(sources: dict[str, SourceWeights], name: str) -> None:
    source = sources.get(name)
    if source is not None:
        log.info("%s packed from its files: %.2f GiB read", name, source.bytes_read / GIB)
        source.close()


def _fail_at_recompile_limit() -> None:
    from torch._dynamo import config

    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True


class PipelineStreaming:
    """Streaming for a DiffSynth FluxImagePipeline: DiT and T5 streamed, CLIP and the VAE decoder resident."""

    def __init__(self, pipe, device: str | torch.device, *, slots: int = DEFAULT_SLOTS,
                 compute_dtype: torch.dtype = torch.bfloat16, weight_cache: WeightCache | None = None,
                 sources: dict[str, SourceWeights] | None = None):
        """`sources`: for a DiT / T5 built without weights (engine.streaming.loading), where their values are read
        from ("dit", "t5"); each is closed once its model is packed."""
        sources = sources or {}
        self.pipe = pipe
        self.device = torch.device(device)
        self.patches = Patches()
        """Every attribute set on DiffSynth's objects, by group: `patches.undo_all()` gives DiffSynth its own back."""
        self.dit = ModelStreamer("dit", pipe.dit, _dit_units(pipe.dit), self.device, compute_dtype=compute_dtype,
                                 patches=self.patches, weight_cache=weight_cache, source=_reader(sources, "dit"))
        _close(sources, "dit")
        self.t5 = ModelStreamer("t5", pipe.text_encoder_2, _t5_units(pipe.text_encoder_2), self.device,
                                compute_dtype=compute_dtype, patches=self.patches, weight_cache=weight_cache,
                                source=_reader(sources, "t5"))
        _close(sources, "t5")
        self.others = [ModelStreamer(name, getattr(pipe, name), [], self.device, compute_dtype=compute_dtype,
                                     patches=self.patches)
                       for name in ("text_encoder_1", "vae_decoder") if getattr(pipe, name, None) is not None]
        slot_bytes = max([*self.dit.unit_bytes, *self.t5.unit_bytes, 0])
        self.pool = SlotPool(self.device, slot_bytes, slots)
        self.dit.attach(self.pool)
        self.t5.attach(self.pool)
        self.weight_cache_built = list(weight_cache.built or []) if weight_cache is not None else []
        """Weight cache files this start-up built (not reused): [] when every one was reused, or pinned."""
        self.float8 = Float8Linears(patches=self.patches)
        self._compiled = False
        self.startup_seconds = StartupSeconds()
        self.report: MemoryReport | None = None
        self.decode_tiles: tuple[int, int] | None = None
        """Set by the plan when the budget needs a tiled VAE decode: (tile, stride) in latent pixels."""
        self._tile_vae_decoder(pipe.vae_decoder)

    def _tile_vae_decoder(self, decoder: torch.nn.Module) -> None:
        """The pipeline decodes untiled (engine.pipeline passes tiled=False in stream mode); when the plan says so,
        decode in tiles instead (engine.streaming.tiled_decode): about a quarter of the activation memory at 1024²,
        ≈0.1 s more."""
        original = decoder.forward

        def forward(sample, tiled=False, tile_size=64, tile_stride=32, **kwargs):
            if self.decode_tiles is None:
                return original(sample, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride, **kwargs)
            tile, stride = self.decode_tiles
            return decode_in_tiles(lambda part: original(part, **kwargs), sample, tile, stride)

        self.patches.set(decoder, "forward", forward, group="decode-tiles")

    def keep_in_page_cache(self, room: int) -> int:
        """File-backed weights: the page cache's `room` bytes go to the DiT's streamed units first (read at every
        step), then to T5's (read once per new prompt); the rest is read from the disk each time. Returns the bytes
        kept."""
        kept = self.dit.keep_in_page_cache(room)
        return kept + self.t5.keep_in_page_cache(room - kept)

    @contextlib.contextmanager
    def weightless(self) -> Iterator[None]:
        """Inside: the streamed units of the DiT and T5 compute on zeroed slots and nothing is read or copied. What a
        generation allocates, and what torch.compile traces, depends on shapes, dtypes and devices only, never on
        the weights' values, so the start-up generations (residency plan, compiling) run this way: they read no
        weights (on the file-backed path, 20 GiB from the disk) and the weights are read meanwhile (see
        `enable_streaming`; resident units whose bytes are still arriving meanwhile compute on what has arrived). The
        pictures they make are meaningless; the next real pass copies every unit again."""
        streamers = (self.dit, self.t5)
        for streamer in streamers:
            streamer.reset()
            streamer.weightless = True
        self.pool.blank()
        try:
            yield
        finally:
            for streamer in streamers:
                streamer.reset()
                streamer.weightless = False
            self.pool.blank()

    def fill_resident(self, *, warm_page_cache: bool) -> int:
        """Read what `plan(fill=False)` left empty: the resident units' bytes onto the GPU (on a side stream of its
        own when called from another thread than the one computing) and, with `warm_page_cache`, the streamed units
        the page cache keeps into it. Returns the bytes read."""
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            read = self.dit.fill_resident() + self.t5.fill_resident()
        if side is not None:
            side.synchronize()
        if warm_page_cache:
            read += self.dit.warm_page_cache() + self.t5.warm_page_cache()
        return read

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
        pick any aspect ratio compiles twice, not once per size; `enable_streaming` does both before the bot is
        ready. Returns whether the blocks are compiled."""
        blocks = [*self.pipe.dit.blocks, *self.pipe.dit.single_blocks]
        self.patches.undo("compile")
        self._compiled = False
        self.float8.triton = self.dit.upcaster.triton = True
        if not enabled:
            return False
        # dynamic=None: exact shapes first, then one shape-generic graph at the first size change (see above).
        compiled = {cls: torch.compile(cls.forward, backend=backend, dynamic=None)
                    for cls in {type(block) for block in blocks}}
        for block in blocks:
            self.patches.set(block, "forward", functools.partial(compiled[type(block)], block), group="compile")
        # The allowed sizes need a few graphs per block class (tests/engine/test_streaming.py counts them), far under
        # Dynamo's recompile limit. Should a guard still make it recompile per size until that limit, it would run
        # those blocks eagerly without a word; this makes it raise instead, and the caller's compile-failure path
        # says so and runs every block eagerly.
        _fail_at_recompile_limit()
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
             margin_gb: float = DEFAULT_MARGIN_GB, fill: bool = True) -> MemoryReport:
        """Measure one generation with nothing resident, then keep as many units resident as the budget allows:
        DiT units first (used every step), T5 units with what is left. Resident weights add to every phase's peak
        one for one, so allowance = budget - device-wide peak of the calibration run - margin. The calibration
        decodes tiled; an untiled decode is measured on its own and kept when it costs no residency (or everything
        fits anyway). `fill=False`: the resident units' bytes are read later, by `fill_resident`."""
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
        self.dit.set_resident(dit, fill=fill)
        left = allowance - self.dit.resident_bytes
        self.t5.set_resident(choose_resident(self.t5.unit_bytes, left) if len(dit) == len(self.dit.units) else (),
                             fill=fill)
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


def second_size(width: int, height: int) -> tuple[int, int]:
    """A picture size with another token count than width x height, for compiling the shape-generic graph at
    start-up: half the size (cheap), at least 64 pixels a side, multiples of 16."""
    half = (max(64, width // 2 // 16 * 16), max(64, height // 2 // 16 * 16))
    return half if half != (width, height) else (width + 16, height)


def enable_streaming(pipe, *, device: str, budget_gb: float, width: int, height: int,
                     slots: int = DEFAULT_SLOTS, margin_gb: float = DEFAULT_MARGIN_GB,
                     fp8_compute: bool = False, torch_compile: bool | Literal["auto"] = False,
                     compile_backend="inductor", weight_cache: WeightCache | None = None,
                     compile_other_size: bool = True,
                     sources: dict[str, SourceWeights] | None = None,
                     page_cache_room: Callable[[], int] | None = None) -> PipelineStreaming:
    """Take over weight movement for a pipeline built with every model in host memory (see engine.pipeline's
    `stream` memory plan). On a GPU the residency plan is calibrated with one 1-step generation at width x height,
    in the compute mode asked for (`fp8_compute`, `torch_compile`: see `PipelineStreaming.set_fp8_compute` and
    `set_torch_compile`; "auto" compiles where `compile_unsupported_reason` finds nothing against it); on a CPU
    everything is streamed (the tests exercise the full streaming path that way). That first generation also
    compiles, and a second one at another size compiles the shape-generic graphs: when compilation fails, the
    blocks run eagerly (with a warning) and both are redone. Both run weightless (`PipelineStreaming.weightless`):
    what they measure and compile does not depend on the weights' values, so they read none, and the resident
    units' bytes are read in a thread of their own while the second one compiles. `page_cache_room`
    (file-backed weights): the page cache's room for them now; the streamed units it keeps are read into it in
    that thread too, so the first picture finds them there."""
    started = time.monotonic()
    streaming = PipelineStreaming(pipe, device, slots=slots, weight_cache=weight_cache, sources=sources)
    seconds = streaming.startup_seconds
    seconds.packing = time.monotonic() - started
    if fp8_compute:
        streaming.set_fp8_compute(True)
    if torch_compile == "auto":
        reason = compile_unsupported_reason(torch.device(device))
        if reason is not None:
            log.info("engine.torch_compile = \"auto\": blocks stay eager (%s)", reason)
        torch_compile = reason is None
    if torch_compile:
        streaming.set_torch_compile(True, backend=compile_backend)
    # Installed before the start-up generations so that the shape-generic one reuses the calibration's prompt
    # embedding instead of running T5 again.
    prompt_cache = install_prompt_cache(pipe, patches=streaming.patches)
    file_backed = page_cache_room is not None and streaming.dit.file_backed

    def calibrate() -> None:
        pipe(prompt="calibration", seed=0, num_inference_steps=1, width=width, height=height,
             progress_bar_cmd=lambda steps: steps)

    def other_size() -> None:
        """One step at another token count: torch.compile's automatic dynamic shapes compile the shape-generic
        graph now, which every later size reuses, so no user's first picture of a new size waits for a compile."""
        other_width, other_height = second_size(width, height)
        pipe(prompt="calibration", seed=0, num_inference_steps=1, width=other_width, height=other_height,
             progress_bar_cmd=lambda steps: steps)

    def fill() -> int:
        if file_backed:  # which streamed units the page cache keeps, now that the resident ones are known
            assert page_cache_room is not None
            streaming.keep_in_page_cache(page_cache_room())
        return streaming.fill_resident(warm_page_cache=file_backed)

    def first_generation() -> None:
        if prompt_cache is not None:
            prompt_cache.clear()  # the calibration runs the text encoders: their memory is in the plan's peak
        with streaming.weightless(), ThreadPoolExecutor(1, thread_name_prefix="weight-fill") as reader:
            started = time.monotonic()
            if torch.device(device).type == "cuda":
                streaming.plan(budget_gb, calibrate, width=width, height=height, margin_gb=margin_gb, fill=False)
                seconds.calibration += time.monotonic() - started
            elif streaming.torch_compiled:
                calibrate()  # compile now, where a failure can still fall back
                seconds.calibration += time.monotonic() - started
            filled = reader.submit(fill)
            try:
                if streaming.torch_compiled and compile_other_size:
                    started = time.monotonic()
                    other_size()
                    seconds.warmup += time.monotonic() - started
            finally:
                started = time.monotonic()
                read = filled.result()
                seconds.reading += time.monotonic() - started
        log.info("start-up read %.2f GiB of weights (resident units, page cache) while compiling, then waited %.1f s "
                 "for the rest", read / GIB, seconds.reading)

    try:
        first_generation()
    except Exception as exc:
        if not streaming.torch_compiled:  # any error with compiled blocks: retry eagerly, it raises again if not theirs
            raise
        streaming.stop_compiling(exc, "at start-up")
        first_generation()
    if streaming.torch_compiled:
        log.info("DiT blocks compiled (torch.compile) at start-up, exact and shape-generic graphs: %.1f s "
                 "(%d graphs)", seconds.calibration + seconds.warmup, compiled_graphs())
    if prompt_cache is not None:
        prompt_cache.clear()
    return streaming
