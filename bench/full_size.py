"""Full-size benchmark: the real MajicFLUX/FLUX.1-dev architecture with random weights (bench.weights writes the
files in the real layout; DiffSynth recognises them by hash), built through the same code the bot runs.

Cases (any subset, in this order, in one process; `--parts`):
  weights    write the full-size files if missing (≈22 GB, generated on the GPU)
  ceilings   pinned / pageable host->GPU bandwidth, bf16 and fp8 GEMM rates
  resident   (a) DiffSynth, every model resident in bf16, no VRAM management
  offload    drawbot engine, mode "offload" (DiffSynth's per-layer offload, fp8 DiT) - issue 2's GPU check
  stream     (d) drawbot engine, mode "stream" (engine/streaming/), every budget re-planned in one load, plus
             a repeated-prompt run (prompt cache) and a bit-identity check against the synchronous copy path
  diffsynth  (b) DiffSynth 2.1.12's own low-VRAM mode, configured as its Flux low-VRAM example does
  diffusers  (c) diffusers FluxTransformer2DModel, group offloading (block level, stream) + fp8 layerwise casting,
             DiT step only

An 8 GB card is emulated on a bigger GPU the way the shared notes (performance.md §11) do: the PyTorch allocator is
capped at card - (non-allocator context measured just before), and a thread polls NVML for the device-wide peak.

    python -m bench.full_size --models-dir /tmp/fullsize --parts weights,offload --budgets 8 --sizes 1024
    python -m bench.full_size --tiny            # the same code on the tiny model, on the CPU (seconds)
    python -m bench.full_size --report bench/results/*.json    # one table from earlier runs
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

from bench import measure
from bench.measure import GIB
from engine import compat

compat.apply()

PROMPT = "a red fox sitting in fresh snow, golden hour, photograph"
STREAM_CASES = {"bf16": "(d) stream, eager blocks", "fp8": "(d) stream + fp8, eager", "compile": "(d) drawbot stream (default)",
                "fp8+compile": "(d) stream + fp8 compute (opt-in)"}
"""Engine compute modes (engine.fp8_compute, engine.torch_compile) -> table row names. The default config compiles
on these GPUs (`torch_compile = "auto"`): "compile" is what a user gets out of the box."""
SEED = 7


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tiny = args.tiny
        self.device = "cpu" if self.tiny else "cuda"
        self.rows: list[dict] = []
        self.info: dict = {"environment": measure.environment(), "args": vars(args) | {"models_dir": str(args.models_dir)}}
        self.poller = measure.PeakPoller()
        self._prompts = 0
        self.images: dict[tuple, tuple[str, bytes]] = {}  # (case, size) -> (prompt, png): fp8 storage drift
        self._bf16_step: dict[tuple, float] = {}  # (budget, size) -> (d) bf16-compute s/step

    # -- helpers -------------------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def new_prompt(self) -> str:
        self._prompts += 1
        return f"{PROMPT}, variation {self._prompts}"

    def files(self):
        from engine import weights

        if self.tiny:
            from engine import tiny

            root = Path(self.args.models_dir) / tiny.TINY_ROOT_NAME
            tiny.write_tiny_model(root)
            tiny.register_tiny_models()
            return weights.layout(root.resolve(), dict(tiny.tiny_hashes_by_part()))
        return weights.real_model_files(Path(self.args.models_dir))

    def free(self) -> None:
        gc.collect()
        if measure.cuda():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def row(self, **fields) -> dict:
        self.rows.append(fields)
        self.say("row: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in fields.items()
                                       if not isinstance(v, (dict, list))}))
        return fields

    def timed_generation(self, label: str, run) -> dict:
        """run(clock) performs one generation calling clock.on_step / clock.progress; returns the timing + peaks."""
        self._runs = getattr(self, "_runs", 0) + 1
        label = f"{label}#{self._runs}"  # phases of one generation only
        clock = measure.PhaseClock(self.poller, prefix=label + ":")
        measure.reset_peaks()
        clock.start()
        run(clock)
        clock.stop()
        peaks = {phase: self.poller.peaks(f"{label}:{phase}") for phase in ("text", "denoise", "decode")}
        summary = clock.summary()
        phases = summary["alloc_phase_gib"].values()
        return {**summary, "alloc_gib": max((p["alloc"] for p in phases), default=0.0),
                "reserved_gib": max((p["reserved"] for p in phases), default=0.0),
                "nvml_gib": max(p["gpu"] for p in peaks.values()),
                "nvml_text_gib": peaks["text"]["gpu"], "nvml_denoise_gib": peaks["denoise"]["gpu"],
                "nvml_decode_gib": peaks["decode"]["gpu"],
                "outside_allocator_gib": max(p["outside"] for p in peaks.values()),
                "rss_gib": max(p["rss"] for p in peaks.values())}

    # -- parts ---------------------------------------------------------------------------------------------------------
    def part_weights(self) -> None:
        if self.tiny:
            from bench import weights as full

            full.all_shapes()  # the key maps still hash to the real files' hashes
            self.files()
            return
        from bench.weights import write_full_size

        started = time.perf_counter()
        write_full_size(Path(self.args.models_dir), log=self.say)
        self.info["weights_s"] = time.perf_counter() - started

    def part_ceilings(self) -> None:
        self.info["ceilings"] = measure.ceilings()
        self.say(f"ceilings: {self.info['ceilings']}")

    def part_resident(self) -> None:
        from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

        files = self.files()
        measure.emulate_card(None)
        self.poller.phase("resident:load")
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # DiffSynth's per-model banners
            pipe = FluxImagePipeline.from_pretrained(
            torch_dtype=torch.bfloat16, device=self.device,
            model_configs=[ModelConfig(path=str(files.dit)), ModelConfig(path=str(files.clip)),
                           ModelConfig(path=[str(p) for p in files.t5]), ModelConfig(path=str(files.vae))],
            tokenizer_1_config=ModelConfig(path=str(files.tokenizer_1)),
            tokenizer_2_config=ModelConfig(path=str(files.tokenizer_2)))
        load_s = time.perf_counter() - started
        pipe(prompt="warm-up", seed=0, num_inference_steps=2, height=self.args.sizes[0], width=self.args.sizes[0],
             progress_bar_cmd=lambda t: t)
        for size in self.args.sizes:
            prompt = self.new_prompt()
            result = self.timed_generation("resident", lambda clock: pipe(
                prompt=prompt, seed=SEED, num_inference_steps=self.args.steps, height=size, width=size,
                progress_bar_cmd=clock.progress))
            self.row(case="(a) resident bf16", budget=None, size=size, steps=self.args.steps, load_s=load_s, **result)
            for case, what in (("stream-bf16", "fp8_storage_drift"), ("stream-fp8", "fp8_storage_and_compute_drift"),
                               ("stream-fp8+compile", "fp8_storage_compute_and_compile_drift")):
                if (case, size) not in self.images:
                    continue
                # same prompt and seed as the stream run: what fp8 storage (and fp8 compute) change
                stream_prompt, stream_png = self.images[(case, size)]
                image = pipe(prompt=stream_prompt, seed=SEED, num_inference_steps=self.args.steps, height=size,
                             width=size, progress_bar_cmd=lambda t: t)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                self.info.setdefault(what, {})[size] = _image_drift(buffer.getvalue(), stream_png)
        del pipe
        self.free()

    def _engine(self, mode: str, budget: float, size: int, *, torch_compile: bool | str = "auto"):
        from engine.pipeline import FluxPipeline
        from engine.settings import EngineSettings

        settings = EngineSettings(model="tiny" if self.tiny else "majicflus", models_dir=self.args.models_dir,
                                  mode=mode, vram_budget_gb=budget, device=self.device, width=size, height=size,
                                  max_steps=200, torch_compile=torch_compile)
        return FluxPipeline.load(settings)

    def _engine_generation(self, label: str, pipeline, prompt: str, size: int, steps: int | None = None) -> tuple[dict, bytes]:
        from engine.jobs import GenerationRequest

        from PIL import Image

        from engine.png import encode_png, read_parameters

        request = GenerationRequest(prompt, SEED, steps or self.args.steps, size, size)
        out: dict = {}
        result = self.timed_generation(label, lambda clock: out.setdefault(
            "result", pipeline.generate(request, clock.on_step)))
        png = out["result"].png
        started = time.perf_counter()  # the engine's decode phase includes PNG encoding: time it apart
        encode_png(Image.open(io.BytesIO(png)).convert("RGB"), read_parameters(png) or "")
        result["png_s"] = time.perf_counter() - started
        return result, png

    def part_offload(self) -> None:
        for budget in self.args.budgets[: None if self.args.offload_all_budgets else 1]:
            card = measure.emulate_card(None if self.tiny else budget)
            self.poller.phase("offload:load")
            started = time.perf_counter()
            pipeline = self._engine("offload", budget, self.args.sizes[0])
            load_s = time.perf_counter() - started
            for size in self.args.sizes[: 1 if not self.args.offload_all_sizes else None]:
                result, _ = self._engine_generation("offload", pipeline, self.new_prompt(), size)
                self.row(case="drawbot offload (DiffSynth layers)", budget=budget, size=size, steps=self.args.steps,
                         load_s=load_s, cap=card, vram_limit_gib=pipeline.plan.vram_limit, **result)
            del pipeline
            self.free()

    def part_stream(self) -> None:
        budgets = self.args.budgets
        card = measure.emulate_card(None if self.tiny else budgets[0])
        self.poller.phase("stream:load")
        started = time.perf_counter()
        with self._load_phases("stream:load"):  # loaded in the first compute mode, bf16 eager
            pipeline = self._engine("stream", budgets[0], self.args.sizes[0], torch_compile=False)
        load_s = time.perf_counter() - started
        streaming = pipeline.streaming
        load_phases = sorted(p for p in self.poller.phases() if p.startswith("stream:load"))
        self.info["stream_host"] = {"host_gib": streaming.host_bytes / GIB, "pinned_gib": streaming.pinned_bytes / GIB,
                                    "load_peak_rss_gib": self.poller.peaks(*load_phases)["rss"],
                                    "load_rss_by_phase_gib": {p: self.poller.peaks(p)["rss"] for p in load_phases},
                                    "rss_after_load_gib": measure.rss_gib(), "load_s": load_s}
        size0 = self.args.sizes[0]
        bf16_images: dict[tuple, tuple[str, bytes]] = {}
        modes = self.args.modes
        for mode, (number, budget) in [(m, nb) for m in modes for nb in enumerate(budgets)]:
            # A compile mode starts from nothing compiled, as a bot process does: exact shapes at the first
            # size, one shape-generic graph at the next (automatic dynamic shapes), reused by later budgets.
            if not self._set_mode(streaming, mode, fresh=number == 0):
                self.info.setdefault("mode_errors", {})[mode] = "unavailable on this device (see the log)"
                continue
            if (number or mode != modes[0]) and not self.tiny:
                # Same load, new budget or compute mode: cap the allocator again, re-plan (the engine's planner,
                # calibrated in the compute mode that runs next; torch.compile compiles in it).
                card = measure.emulate_card(budget)
                started = time.perf_counter()
                streaming.plan(budget, lambda: pipeline.pipe(prompt="calibration", seed=0, num_inference_steps=1,
                                                             width=size0, height=size0,
                                                             progress_bar_cmd=lambda t: t),
                               width=size0, height=size0)
                self.info.setdefault("plan_s", {})[f"{budget}:{mode}"] = time.perf_counter() - started
            plan = streaming.report.as_dict() if streaming.report else {}
            self.info.setdefault("host_after_plan_gib", {})[f"{budget}:{mode}"] = {
                "rss": measure.rss_gib(), "weights": streaming.host_bytes / GIB, "pinned": streaming.pinned_bytes / GIB}
            for size in self.args.sizes:
                if mode != "bf16" and (budget, size) in bf16_images:
                    # the bf16 row's request, T5 run again (cache cleared): drift and honest text time
                    prompt, bf16_png = bf16_images[(budget, size)]
                    pipeline.pipe.prompt_cache.clear()
                else:
                    prompt, bf16_png = self.new_prompt(), None
                warm_up_s = None
                if "compile" in mode and not self.tiny:  # a new size compiles at its first picture: not timed
                    started = time.perf_counter()
                    pipeline.pipe(prompt="warm-up", seed=0, num_inference_steps=1, width=size, height=size,
                                  progress_bar_cmd=lambda t: t)
                    warm_up_s = time.perf_counter() - started
                result, png = self._engine_generation("stream", pipeline, prompt, size)
                self.images.setdefault((f"stream-{mode}", size), (prompt, png))
                extra = {}
                if mode == "bf16":
                    bf16_images[(budget, size)] = (prompt, png)
                    self._bf16_step[(budget, size)] = result["step_median_s"]
                elif bf16_png is not None:
                    extra = {"drift": _image_drift(bf16_png, png),
                             "bf16_step_median_s": self._bf16_step[(budget, size)]}
                cached, _ = self._engine_generation("stream", pipeline, prompt, size, steps=2)
                self.row(case=STREAM_CASES[mode], budget=budget, size=size, steps=self.args.steps, load_s=load_s,
                         cap=card, mode=mode, text_cached_s=cached["text_s"],
                         streamed_gib=streaming.dit.streamed_bytes / GIB,
                         resident_gib=streaming.dit.resident_bytes / GIB,
                         resident_units=len(streaming.dit.resident), units=len(streaming.dit.units),
                         t5_streamed_gib=streaming.t5.streamed_bytes / GIB, plan=plan,
                         fp8_linears=streaming.float8.installed, compile_warm_up_s=warm_up_s,
                         pinned_gib=streaming.pinned_bytes / GIB, host_gib=streaming.host_bytes / GIB,
                         **extra, **result)
        # Race check: the streamed path against the synchronous copy path, same request, byte for byte (the prompt
        # cache is cleared so that T5 runs, and streams, on both paths); in every compute mode.
        size = self.args.sizes[-1]
        for mode in modes:
            if not self._set_mode(streaming, mode):
                continue
            pipeline.pipe.prompt_cache.clear()
            _, streamed = self._engine_generation("race", pipeline, "race check", size, steps=3)
            pipeline.pipe.prompt_cache.clear()
            streaming.synchronous = True
            sync_result, synchronous_same = self._engine_generation("race", pipeline, "race check", size, steps=3)
            streaming.synchronous = False
            self.info.setdefault("race_checks", {})[mode] = {
                "size": size, "bit_identical": streamed == synchronous_same,
                "sync_step_median_s": sync_result["step_median_s"]}
            self.say(f"race check ({mode}): streamed == synchronous: {streamed == synchronous_same}")
        self._set_mode(streaming, "bf16")
        if self.args.profile and measure.cuda():
            self._profile(pipeline, modes)
        self.info["host_dtypes"] = sorted({str(p.dtype) for u in streaming.dit.units for e in u.entries
                                           for p in [e.param]})
        del pipeline, streaming
        if "compile" in "".join(self.args.modes):
            import torch._dynamo

            torch._dynamo.reset()  # compiled graphs may hold the pipeline's modules: let the next cases start clean
        self.free()

    @staticmethod
    def _set_mode(streaming, mode: str, *, fresh: bool = False) -> bool:
        """Switch the engine's compute mode: "bf16", "fp8", "compile" or "fp8+compile". False where unavailable.
        `fresh`: forget every compiled graph first (and torch.compile's memory of which shapes changed)."""
        if fresh and "compile" in mode:
            import torch._dynamo

            torch._dynamo.reset()
        fp8 = streaming.set_fp8_compute("fp8" in mode)
        compiled = streaming.set_torch_compile("compile" in mode)
        return fp8 == ("fp8" in mode) and compiled == ("compile" in mode)

    def _profile(self, pipeline, modes, steps: int = 4) -> None:
        """GPU time per kind of kernel over a few steps at the first size, last budget's plan, per compute mode (prompt
        cached: no text encoders; one VAE decode, shown apart): where a step's time goes."""
        from torch.profiler import ProfilerActivity, profile

        from engine.streaming import DECODE_TILES

        size = self.args.sizes[0]
        streaming = pipeline.streaming
        # VAE decode alone, tiled (the plan's tiles) and untiled: what an untiled decode would save per image.
        latents = torch.randn(1, 16, size // 8, size // 8, device="cuda", dtype=torch.bfloat16)
        decoder = pipeline.pipe.vae_decoder
        saved_tiles, timings = streaming.decode_tiles, {}
        measure.emulate_card(None)  # timing only: the untiled decode may not fit this plan's cap
        with torch.no_grad():
            for label, tiles in (("tiled", DECODE_TILES), ("untiled", None)):
                streaming.decode_tiles = tiles
                times = []
                for _ in range(4):
                    measure.sync()
                    started = time.perf_counter()
                    decoder(latents)
                    measure.sync()
                    times.append(time.perf_counter() - started)
                timings[f"decode_{label}_s"] = sorted(times[1:])[1]
        streaming.decode_tiles = saved_tiles
        del latents
        measure.emulate_card(self.args.budgets[-1])
        self.info["decode_alone"] = {"size": size, **timings,
                                     "untiled_peak_gib": (streaming.report.untiled_decode_peak / GIB
                                                          if streaming.report else None)}
        self.say(f"decode alone: {self.info['decode_alone']}")
        for mode in modes:
            if not self._set_mode(streaming, mode):
                continue
            run = lambda: pipeline.pipe(prompt="profile", seed=0, num_inference_steps=steps, width=size, height=size,
                                        progress_bar_cmd=lambda t: t)
            run()  # warm: prompt cached, kernels compiled
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
            kinds = measure.kernel_time_by_kind(prof)
            per_step = {k: v / steps for k, v in kinds.items() if k != "vae conv"}
            self.info.setdefault("profile_ms_per_step", {})[mode] = {
                "size": size, "steps": steps, "vae_conv_ms_total": kinds.get("vae conv", 0.0),
                **{k: round(v, 2) for k, v in sorted(per_step.items())}, "sum": round(sum(per_step.values()), 2)}
            self.say(f"profile ({mode}): {self.info['profile_ms_per_step'][mode]}")
        self._set_mode(streaming, "bf16")

    @contextlib.contextmanager
    def _load_phases(self, prefix: str):
        """Name the poller's phases while the engine loads (DiffSynth's from_pretrained, then each model's packing
        into host memory), so the load's RSS peak can be placed."""
        from engine import pipeline as engine_pipeline
        from engine import streaming as engine_streaming

        from_pretrained = engine_pipeline._from_pretrained
        streamer_init = engine_streaming.ModelStreamer.__init__
        poller = self.poller

        def traced_from_pretrained(*args, **kwargs):
            poller.phase(f"{prefix}:1-diffsynth")
            try:
                return from_pretrained(*args, **kwargs)
            finally:
                poller.phase(f"{prefix}:2-after-diffsynth")

        def traced_init(streamer, name, *args, **kwargs):
            poller.phase(f"{prefix}:3-pack-{name}")
            try:
                streamer_init(streamer, name, *args, **kwargs)
            finally:
                poller.phase(f"{prefix}:4-after-{name}")

        engine_pipeline._from_pretrained = traced_from_pretrained
        engine_streaming.ModelStreamer.__init__ = traced_init
        try:
            yield
        finally:
            engine_pipeline._from_pretrained = from_pretrained
            engine_streaming.ModelStreamer.__init__ = streamer_init
            poller.phase(f"{prefix}:5-plan-done")

    def part_diffsynth(self) -> None:
        """(b) exactly upstream examples/flux/model_inference_low_vram/FLUX.1-dev.py's VRAM config."""
        from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

        files = self.files()
        fp8 = torch.float8_e4m3fn
        vram_config = dict(offload_dtype=fp8, offload_device="cpu", onload_dtype=fp8, onload_device="cpu",
                           preparing_dtype=fp8, preparing_device=self.device, computation_dtype=torch.bfloat16,
                           computation_device=self.device)
        sizes = self.args.diffsynth_sizes or self.args.sizes
        for size, budget in [(s, b) for s in sizes for b in self.args.budgets]:  # 1024² first
            card = measure.emulate_card(None if self.tiny else budget)
            self.poller.phase("diffsynth:load")
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # DiffSynth's per-model banners
                pipe = FluxImagePipeline.from_pretrained(
                torch_dtype=torch.bfloat16, device=self.device,
                model_configs=[ModelConfig(path=str(files.dit), **vram_config),
                               ModelConfig(path=str(files.clip), **vram_config),
                               ModelConfig(path=[str(p) for p in files.t5], **vram_config),
                               ModelConfig(path=str(files.vae), **vram_config)],
                tokenizer_1_config=ModelConfig(path=str(files.tokenizer_1)),
                tokenizer_2_config=ModelConfig(path=str(files.tokenizer_2)),
                vram_limit=budget - 0.5)  # the example: mem_get_info()[1] / 2**30 - 0.5 on the emulated card
            load_s = time.perf_counter() - started
            prompt = self.new_prompt()
            result = self.timed_generation("diffsynth", lambda clock: pipe(
                prompt=prompt, seed=SEED, num_inference_steps=self.args.steps, height=size, width=size,
                progress_bar_cmd=clock.progress))
            self.row(case="(b) DiffSynth low-VRAM example", budget=budget, size=size, steps=self.args.steps,
                     load_s=load_s, cap=card, **result)
            del pipe
            self.free()

    def part_diffusers(self) -> None:
        from bench.diffusers_case import build_flux_transformer, dit_step_inputs

        measure.emulate_card(None)
        started = time.perf_counter()
        model, pinned_gib = build_flux_transformer(self.device, tiny=self.tiny)
        build_s = time.perf_counter() - started
        for budget in self.args.budgets:
            card = measure.emulate_card(None if self.tiny else budget)
            for size in self.args.sizes:
                inputs = dit_step_inputs(size, self.device, tiny=self.tiny)
                times = []
                measure.reset_peaks()
                self.poller.phase(f"diffusers:{budget}:{size}")
                with torch.no_grad():
                    for step in range(2 + self.args.dit_repeats):
                        measure.sync()
                        t0 = time.perf_counter()
                        model(**inputs, return_dict=False)
                        measure.sync()
                        times.append(time.perf_counter() - t0)
                self.poller.phase("idle")
                timed = sorted(times[2:])
                self.row(case="(c) diffusers group offload + fp8", budget=budget, size=size, steps=None,
                         load_s=build_s, cap=card, step_median_s=timed[len(timed) // 2], steps_s=times,
                         pinned_gib=pinned_gib, nvml_gib=self.poller.peaks(f"diffusers:{budget}:{size}")["gpu"],
                         **{f"{k}_gib": v for k, v in measure.allocator_peaks().items()})
                del inputs
        del model
        self.free()

    # -- driver --------------------------------------------------------------------------------------------------------
    def run(self) -> int:
        failures = 0
        with self.poller:
            measure.warm_up_kernels()
            self.info["context_gib_after_warmup"] = measure.context_bytes() / GIB
            for part in self.args.parts:
                self.say(f"--- {part}")
                try:
                    getattr(self, f"part_{part}")()
                except Exception as exc:  # one broken case must not lose the others' numbers
                    failures += 1
                    self.info.setdefault("errors", {})[part] = f"{type(exc).__name__}: {exc}"[:2000]
                    traceback.print_exc()
                    self.free()
                    measure.emulate_card(None)
                self.save()
        print(format_table(self.rows, self.info))
        return 1 if failures else 0

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"info": self.info, "rows": self.rows}, indent=1, default=str))


def _image_drift(reference_png: bytes, other_png: bytes) -> dict:
    """Pixel difference of two PNGs: mean absolute (0-255), max, PSNR in dB."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(reference_png)).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(io.BytesIO(other_png)).convert("RGB"), dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return {"mean_abs": float(np.abs(a - b).mean()), "max_abs": float(np.abs(a - b).max()),
            "psnr_db": float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)}


# ---------------------------------------------------------------------------------------------------------------------
# The table


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: list[dict], info: dict) -> str:
    ceilings = info.get("ceilings", {})
    bandwidth = ceilings.get("h2d_pinned_GBps")
    resident_step = {r["size"]: r["step_median_s"] for r in rows if r["case"].startswith("(a)")}
    diffusers_step = {(r["budget"], r["size"]): r["step_median_s"] for r in rows if r["case"].startswith("(c)")}
    diffsynth_total = {(r["budget"], r["size"]): r["total_s"] for r in rows if r["case"].startswith("(b)")}
    header = ("case", "GB", "res", "total s", "text s", "s/step", "1st step", "decode(+png) s", "alloc", "reserved",
              "NVML peak", "RSS", "pinned", "floor s", "vs floor", "vs (c)", "vs (b)")
    lines = []
    for r in rows:
        floor = vs_floor = vs_c = vs_b = None
        step = r.get("step_median_s")
        if r["case"].startswith("(d)") and bandwidth and r["size"] in resident_step:
            floor = max(resident_step[r["size"]], r["streamed_gib"] * GIB / (bandwidth * 1e9))
            vs_floor = step / floor if step else None
        if r["case"].startswith("(d)") and (r["budget"], r["size"]) in diffusers_step and step:
            vs_c = step / diffusers_step[(r["budget"], r["size"])]
        if r.get("total_s") and (r["budget"], r["size"]) in diffsynth_total and not r["case"].startswith("(b)"):
            vs_b = diffsynth_total[(r["budget"], r["size"])] / r["total_s"]
        lines.append((r["case"], _fmt(r.get("budget")), _fmt(r["size"]), _fmt(r.get("total_s")), _fmt(r.get("text_s"), 3),
                      _fmt(step, 3), _fmt(r.get("first_step_s"), 3),
                      _fmt(r.get("decode_s"), 3) + (f" ({_fmt(r['png_s'], 2)})" if r.get("png_s") else ""),
                      _fmt(r.get("alloc_gib")), _fmt(r.get("reserved_gib")), _fmt(r.get("nvml_gib")),
                      _fmt(r.get("rss_gib"), 1), _fmt(r.get("pinned_gib"), 1), _fmt(floor, 3),
                      _fmt(vs_floor), _fmt(vs_c), ("%.1fx" % vs_b) if vs_b else "-"))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    notes = []
    env = info.get("environment", {})
    notes.append(f"device: {env.get('gpu', 'cpu')} ({env.get('driver_pcie', '')}), torch {env.get('torch')}, "
                 f"{env.get('cpus')} CPUs, host RAM {_fmt(env.get('host_ram_gib'), 0)} GiB")
    if ceilings:
        notes.append("ceilings: " + ", ".join(f"{k} {_fmt(v, 3 if isinstance(v, float) and abs(v) < 1 else 1)}"
                                              for k, v in ceilings.items() if not k.endswith("error")))
    for r in rows:
        if r["case"].startswith("(d)") and "resident_units" in r:
            plan = r.get("plan") or {}
            notes.append(f"{r.get('mode', 'bf16')} {r['budget']} GB {r['size']}²: decode tiled "
                         f"{plan.get('decode_tiled')}, DiT resident {r['resident_units']}/{r['units']} units "
                         f"({_fmt(r['resident_gib'])} GiB), streamed {_fmt(r['streamed_gib'])} GiB/step, T5 streamed "
                         f"{_fmt(r['t5_streamed_gib'])} GiB, text on a repeated prompt {_fmt(r['text_cached_s'], 4)} s, "
                         f"NVML text/denoise/decode {_fmt(r['nvml_text_gib'])}/{_fmt(r['nvml_denoise_gib'])}/"
                         f"{_fmt(r['nvml_decode_gib'])} GiB, cap {_fmt((r.get('cap') or {}).get('cap_gib'))} GiB + "
                         f"context {_fmt((r.get('cap') or {}).get('context_gib'))} GiB")
    for r in rows:
        if r["case"].startswith("(d)") and r.get("drift"):
            ratio = r["step_median_s"] / resident_step[r["size"]] if r["size"] in resident_step else None
            notes.append(f"{r.get('mode', r['case'])} {r['budget']} GB {r['size']}²: "
                         f"{_fmt(r['step_median_s'], 3)} s/step "
                         f"vs bf16 compute {_fmt(r['bf16_step_median_s'], 3)}; x{_fmt(ratio)} of resident bf16 "
                         f"(fp8 target 0.75); drift vs bf16 compute: "
                         + ", ".join(f"{k} {_fmt(v)}" for k, v in r["drift"].items()))
    for key, label in (("fp8_storage_drift", "fp8 storage (DiT+T5 float8, bf16 compute)"),
                       ("fp8_storage_and_compute_drift", "fp8 storage + fp8 compute"),
                       ("fp8_storage_compute_and_compile_drift", "fp8 storage + fp8 compute + compile")):
        for size, drift in (info.get(key) or {}).items():
            notes.append(f"{label} vs resident bf16, {size}², random weights: "
                         + ", ".join(f"{k} {_fmt(v)}" for k, v in drift.items()))
    checks = dict(info.get("race_checks") or {})
    for key, mode in (("race_check", "bf16"), ("race_check_fp8", "fp8")):  # older result files
        if key in info:
            checks.setdefault(mode, info[key])
    for mode, check in checks.items():
        notes.append(f"race check ({mode}): streamed vs synchronous copies bit-identical: {check['bit_identical']}")
    for mode, kinds in (info.get("profile_ms_per_step") or {}).items():
        notes.append(f"GPU ms per step by kernel kind ({mode} compute, {kinds.get('size')}²): "
                     + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in kinds.items() if k not in ("size", "steps")))
    if "stream_host" in info:
        notes.append(f"stream host memory: {info['stream_host']}")
    for key, host in (info.get("host_after_plan_gib") or {}).items():
        notes.append(f"host after plan {key}: RSS {_fmt(host['rss'])} GiB, weights {_fmt(host['weights'])} GiB, "
                     f"pinned {_fmt(host['pinned'])} GiB")
    for part, error in info.get("errors", {}).items():
        notes.append(f"ERROR in {part}: {error.splitlines()[0][:300]}")
    return "\n".join(out + [""] + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("bench-models"))
    parser.add_argument("--parts", default="weights,ceilings,resident,offload,stream")
    parser.add_argument("--budgets", default="8,12", help="emulated card sizes, GiB")
    parser.add_argument("--sizes", default="1024,512")
    parser.add_argument("--diffsynth-sizes", default=None, help="sizes for (b) (default: --sizes); it is slow")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dit-repeats", type=int, default=5, help="timed DiT steps for (c)")
    parser.add_argument("--offload-all-sizes", action="store_true", help="offload: every size (default: the first)")
    parser.add_argument("--offload-all-budgets", action="store_true", help="offload: every budget (default: the first)")
    parser.add_argument("--modes", default="bf16,fp8,fp8+compile",
                        help="stream: engine compute modes, bf16 first: bf16, fp8, compile, fp8+compile")
    parser.add_argument("--profile", action="store_true",
                        help="stream: GPU time per kind of kernel (torch.profiler), bf16 and fp8 compute")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the script, not speed")
    parser.add_argument("--out", default=None)
    parser.add_argument("--report", nargs="*", help="print one table from these result files and exit")
    args = parser.parse_args(argv)
    if args.report:
        rows, info = [], {}
        for path in args.report:
            data = json.loads(Path(path).read_text())
            rows += data["rows"]
            for key, value in data["info"].items():
                info.setdefault(key, value)
        print(format_table(rows, info))
        return 0
    args.parts = args.parts.split(",")
    args.modes = args.modes.split(",")
    if args.modes[0] != "bf16" or not set(args.modes) <= set(STREAM_CASES):
        parser.error(f"--modes: bf16 first, then any of {', '.join(STREAM_CASES)}")
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.diffsynth_sizes = [int(s) for s in args.diffsynth_sizes.split(",")] if args.diffsynth_sizes else None
    if args.tiny:
        args.sizes, args.diffsynth_sizes = [64], None
        args.steps = min(args.steps, 2)
        args.dit_repeats = 1
        if args.models_dir == Path("bench-models"):
            args.models_dir = Path("/tmp/drawbot-bench-tiny")
    default_out = (f"{args.models_dir}/bench-tiny.json" if args.tiny  # a script check: keep it out of bench/results
                   else f"bench/results/full-{time.strftime('%Y%m%d-%H%M%S')}.json")
    args.out = args.out or default_out
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA GPU: run with --tiny to check the script on the CPU", file=sys.stderr)
        return 2
    return Bench(args).run()


if __name__ == "__main__":
    raise SystemExit(main())
