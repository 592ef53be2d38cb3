"""engine.streaming on the tiny model (CPU): the streamed path computes exactly what DiffSynth's own path and a
synchronous-copy path compute, DiT weights stay float8 in host memory, residency plans, the prompt cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.jobs import GenerationRequest


@pytest.fixture(scope="module")
def stream_settings(tiny_settings):
    return tiny_settings.model_copy(update={"mode": "stream"})


@pytest.fixture(scope="module")
def stream_pipeline(stream_settings):
    from engine.pipeline import FluxPipeline

    return FluxPipeline.load(stream_settings)


@pytest.fixture(scope="module")
def diffsynth_reference(stream_settings):
    """The same files with the same storage dtypes (DiT and T5 float8), moved by DiffSynth itself, no streaming."""
    from engine.pipeline import _from_pretrained, locate_model, plan_memory

    files, _ = locate_model(stream_settings)
    return _from_pretrained(files, plan_memory(stream_settings, "cpu"), "cpu")


def draw(pipe, prompt: str, seed: int = 7, steps: int = 3) -> np.ndarray:
    image = pipe(prompt=prompt, seed=seed, num_inference_steps=steps, height=64, width=64,
                 progress_bar_cmd=lambda timesteps: timesteps)
    return np.asarray(image)


@pytest.fixture
def streaming(stream_pipeline):
    """The pipeline's streaming state, restored after each test (all streamed, asynchronous). Each test draws its
    own prompts, so the prompt cache never hides a text-encoder run."""
    state = stream_pipeline.streaming
    yield state
    state.set_torch_compile(False)
    state.set_fp8_compute(False)
    state.synchronous = False
    state.dit.set_resident(())
    state.t5.set_resident(())


def test_streamed_image_is_bit_identical_to_synchronous_copies_and_to_diffsynth(stream_pipeline, streaming,
                                                                                diffsynth_reference):
    pipe = stream_pipeline.pipe
    assert streaming.dit.resident == frozenset() and streaming.dit.streamed_bytes > 0  # really streamed
    assert len(streaming.dit.units) > streaming.pool.count  # the ring wraps around within each step
    streamed = draw(pipe, "a red fox in the snow")
    streaming.synchronous = True
    synchronous = draw(pipe, "a red fox in the snow, sync")  # new prompt: T5 runs (and streams) again
    reference_a = draw(diffsynth_reference, "a red fox in the snow")
    reference_b = draw(diffsynth_reference, "a red fox in the snow, sync")
    assert np.array_equal(streamed, reference_a)
    assert np.array_equal(synchronous, reference_b)
    assert not np.array_equal(reference_a, reference_b)  # the prompt matters, so T5 output was really used
    streaming.synchronous = False
    again = draw(pipe, "a red fox in the snow, sync", seed=7)
    assert np.array_equal(again, synchronous)


def test_partly_resident_plans_give_the_same_image(stream_pipeline, streaming, diffsynth_reference):
    pipe = stream_pipeline.pipe
    streaming.dit.set_resident({0, 2})
    streaming.t5.set_resident({1})
    assert streaming.dit.streamed_bytes == sum(streaming.dit.unit_bytes) - streaming.dit.resident_bytes
    resident_unit = streaming.dit.units[0]
    weight = next(resident_unit.module.parameters())
    start = resident_unit.device.data_ptr()
    assert start <= weight.data_ptr() < start + resident_unit.nbytes  # points into its resident buffer
    assert np.array_equal(draw(pipe, "a cat, partly resident"), draw(diffsynth_reference, "a cat, partly resident"))


def test_resident_units_hand_their_host_copy_back_and_get_it_again_when_streamed(stream_pipeline, streaming,
                                                                                 diffsynth_reference):
    dit, memory = streaming.dit, streaming.dit.host_memory
    before = {i: dit.units[i].host.clone() for i in (0, 2)}
    assert all(bool(b.any()) for b in before.values())  # real weight bytes
    held = memory.held_bytes
    dit.set_resident({0, 2})
    assert memory.held_bytes == held - dit.units[0].nbytes - dit.units[2].nbytes
    assert streaming.host_bytes < sum(s.host_memory.nbytes for s in streaming.streamers)
    # The OS took the pages back: an anonymous page handed back reads as zeros (nobody wrote zeros there).
    assert not dit.units[0].host.any() and not dit.units[2].host.any()
    assert all(torch.equal(dit.units[i].device, before[i]) for i in (0, 2))  # the GPU copy is the only one now
    prompt = "a heron, host copies handed back"
    assert np.array_equal(draw(stream_pipeline.pipe, prompt), draw(diffsynth_reference, prompt))
    dit.set_resident(())  # streamed again: the bytes come back from the GPU copy, exactly
    assert memory.held_bytes == held
    assert all(torch.equal(dit.units[i].host, before[i]) for i in (0, 2))
    assert np.array_equal(draw(stream_pipeline.pipe, prompt + ", streamed"),
                          draw(diffsynth_reference, prompt + ", streamed"))


def test_dit_weights_stay_float8_in_host_memory_and_run_from_the_slots(stream_pipeline, streaming):
    dit = stream_pipeline.pipe.dit
    host = streaming.dit.host_memory.tensor
    host_range = (host.data_ptr(), host.data_ptr() + host.numel())
    slot_ranges = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in streaming.pool.buffers]
    linears = [m for m in dit.modules() if type(m).__name__ == "AutoWrappedLinear"]
    block_linears = [m for block in [*dit.blocks, *dit.single_blocks] for m in block.modules() if m in linears]
    seen_in_forward: list[bool] = []

    def inside(tensor, ranges) -> bool:
        return any(lo <= tensor.data_ptr() < hi for lo, hi in ranges)

    def check_during_forward(module, args):
        # Registered after the streamer's pre-hook: weights now point into a slot, still float8.
        seen_in_forward.append(all(inside(m.weight, slot_ranges) and m.weight.dtype == torch.float8_e4m3fn
                                   for m in module.modules() if m in linears))

    handles = [block.register_forward_pre_hook(check_during_forward) for block in [*dit.blocks, *dit.single_blocks]]
    try:
        result = stream_pipeline.generate(GenerationRequest("a red fox, dtype check", 3, 2, 64, 64), lambda d, t: None)
    finally:
        for handle in handles:
            handle.remove()
    assert result.png
    assert seen_in_forward and all(seen_in_forward)
    assert len(seen_in_forward) == 2 * len(streaming.dit.units)  # every block ran from a slot, in both steps
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert all(m.bias.dtype == torch.bfloat16 for m in block_linears if m.bias is not None)  # exact fp8 values
    assert all(inside(m.weight, [host_range]) for m in block_linears)  # back in host memory between forwards
    assert all(m.weight.device.type == "cpu" for m in block_linears)


def test_an_error_mid_forward_leaves_nothing_broken(stream_pipeline, streaming, diffsynth_reference):
    pipe = stream_pipeline.pipe
    block = pipe.dit.single_blocks[0]

    def fail(module, args):
        raise RuntimeError("CUDA out of memory (injected)")

    handle = block.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            draw(pipe, "a dog, before the error")
    finally:
        handle.remove()
    stream_pipeline.recover_from_oom()
    assert np.array_equal(draw(pipe, "a dog, after the error"), draw(diffsynth_reference, "a dog, after the error"))


def test_prompt_cache_skips_the_text_encoders_on_a_repeated_prompt(stream_pipeline, streaming):
    pipe = stream_pipeline.pipe
    t5_calls: list[int] = []
    handle = pipe.text_encoder_2.encoder.block[0].register_forward_hook(lambda *a: t5_calls.append(1))
    try:
        first = draw(pipe, "a unique prompt for the cache test")
        calls_after_first = len(t5_calls)
        second = draw(pipe, "a unique prompt for the cache test")
        calls_after_second = len(t5_calls)
        draw(pipe, "another prompt for the cache test")
    finally:
        handle.remove()
    assert calls_after_first == 1 and calls_after_second == 1 and len(t5_calls) == 2
    assert np.array_equal(first, second)


def test_resync_when_units_run_out_of_the_expected_order():
    """A toy model: five Linear units streamed through two slots, called in shuffled orders."""
    from engine.streaming import ModelStreamer, SlotPool

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(5)])
    x = torch.randn(3, 16)
    expected = [layer(x) for layer in model]  # before streaming takes the weights over
    streamer = ModelStreamer("toy", model, list(model), "cpu", compute_dtype=torch.float32)
    streamer.attach(SlotPool("cpu", max(streamer.unit_bytes), 2))
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 2, 0, 4, 1, 3], [1, 3, 0, 2, 4, 0, 1]):
        for index in order:
            assert torch.equal(model[index](x), expected[index]), (order, index)


@pytest.mark.parametrize(
    "sizes, allowance",
    [([10] * 8, 40), ([30, 10, 30, 10, 30, 10], 45), ([5, 7, 11, 13], 0), ([5, 7, 11, 13], 100), ([8] * 57, 200)],
)
def test_choose_resident_fills_the_allowance_and_spreads_residents(sizes, allowance):
    from engine.streaming import choose_resident

    chosen = choose_resident(sizes, allowance)
    used = sum(sizes[i] for i in chosen)
    assert used <= max(allowance, 0)
    leftover = [sizes[i] for i in range(len(sizes)) if i not in chosen]
    assert not leftover or min(leftover) > allowance - used  # nothing else would fit
    if len(set(sizes)) == 1 and 0 < len(chosen) < len(sizes):
        # Equal units: residents are spread, never two streamed units more than one resident run apart.
        streamed = [i for i in range(len(sizes)) if i not in chosen]
        gaps = [b - a for a, b in zip(streamed, streamed[1:])]
        assert max(gaps) - min(gaps) <= 1


def test_fp8_to_bf16_bit_formula_is_exact_for_every_code():
    """The formula the GPU upcast kernel uses, against torch's own conversion, all 256 codes (NaN bits included)."""
    from engine.streaming import fp8_codes_to_bf16_bits

    codes = torch.arange(256, dtype=torch.int32)
    expected = codes.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.bfloat16).view(torch.int16)
    assert torch.equal(fp8_codes_to_bf16_bits(codes).to(torch.int16), expected)


def test_upcaster_passes_compute_dtype_through_and_casts_float8_exactly():
    from engine.streaming import Upcaster

    upcast = Upcaster()
    bias = torch.randn(8, dtype=torch.bfloat16)
    assert upcast(bias, torch.bfloat16, "cpu") is bias  # biases are stored in bf16: no copy per call
    weight = (torch.randn(16, 8) * 0.1).to(torch.float8_e4m3fn)
    assert torch.equal(upcast(weight, torch.bfloat16, "cpu"), weight.to(torch.bfloat16))


def _fp8_matmul_skip_reason() -> str | None:
    from engine.streaming import fp8_unsupported_reason

    return fp8_unsupported_reason(torch.device("cpu"))


def test_opt_in_float8_compute_changes_little_and_switches_back(stream_pipeline, streaming):
    if _fp8_matmul_skip_reason():
        pytest.skip(_fp8_matmul_skip_reason())
    pipe = stream_pipeline.pipe
    bf16 = draw(pipe, "a fox, compute dtype check")
    assert streaming.set_fp8_compute(True) is True
    try:
        assert streaming.fp8_compute
        calls = streaming.float8.calls
        fp8 = draw(pipe, "a fox, compute dtype check")
        assert streaming.float8.calls > calls  # the float8 products really ran
        assert np.array_equal(fp8, draw(pipe, "a fox, compute dtype check"))  # deterministic
    finally:
        assert streaming.set_fp8_compute(False) is False
    assert not streaming.fp8_compute
    assert not np.array_equal(fp8, bf16)  # activations rounded to float8: really a different computation
    assert np.abs(fp8.astype(int) - bf16.astype(int)).mean() < 8  # ...but close (of 255)
    assert np.array_equal(draw(pipe, "a fox, compute dtype check"), bf16)


def test_quantize_rows_maps_each_row_onto_float8_within_half_a_step():
    from engine.streaming import FP8_MAX, dequantize_rows, quantize_rows

    torch.manual_seed(1)
    x = torch.randn(6, 96) * torch.tensor([1e-3, 1.0, 30.0, 5e3, 0.0, 1.0])[:, None]
    x[5, 7] = -700.0  # one outlier sets its row's scale
    codes, scale = quantize_rows(x.to(torch.bfloat16))
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (6, 1)
    x = x.to(torch.bfloat16).float()
    magnitudes = codes.float().abs().amax(dim=1)
    assert torch.equal(magnitudes[[0, 1, 2, 3, 5]], torch.full((5,), FP8_MAX))  # each row's largest value -> 448
    assert torch.equal(codes[4].float(), torch.zeros(96))  # an all-zero row stays zero (no division by zero)
    error = (dequantize_rows(codes, scale) - x).abs()
    # e4m3: 3 mantissa bits, so normal values are off by at most 1/16 of themselves; subnormals by 2^-10 * scale
    assert bool((error <= x.abs() / 16 + scale / 1024 + 1e-30).all())


def test_float8_linear_matches_its_dequantized_reference_and_falls_back_for_few_rows(stream_pipeline, streaming):
    if _fp8_matmul_skip_reason():
        pytest.skip(_fp8_matmul_skip_reason())
    from engine.streaming import Float8Linears, dequantize_rows, quantize_rows

    torch.manual_seed(2)
    float8 = Float8Linears()
    x = torch.randn(2, 24, 64, dtype=torch.bfloat16)
    weight = (torch.randn(48, 64) / 8).to(torch.float8_e4m3fn)
    bias = torch.randn(48, dtype=torch.bfloat16)
    out = float8.linear(x, weight, bias)
    assert out.shape == (2, 24, 48) and out.dtype == torch.bfloat16
    codes, scale = quantize_rows(x.reshape(-1, 64))
    expected = (dequantize_rows(codes, scale) @ weight.float().t() + bias.float()).reshape(2, 24, 48)
    assert torch.allclose(out.float(), expected, rtol=1e-2, atol=1e-2)  # the same math, bf16 output rounding
    exact = x.float() @ weight.float().t() + bias.float()
    assert float((out.float() - exact).norm() / exact.norm()) < 0.05  # activations rounded: a few % at most
    assert float8.check(torch.device("cpu")) is None

    # Installed on the tiny DiT: a block's modulation layer sees one row per image and keeps DiffSynth's bf16 path.
    assert streaming.set_fp8_compute(True)
    try:
        modulation = stream_pipeline.pipe.dit.blocks[0].norm1_a.linear
        assert "forward" in modulation.__dict__  # eligible, installed
        before = streaming.float8.calls
        with torch.no_grad():
            modulation(torch.randn(1, modulation.in_features, dtype=torch.bfloat16))
            assert streaming.float8.calls == before
            modulation(torch.randn(1, 32, modulation.in_features, dtype=torch.bfloat16))
        assert streaming.float8.calls == before + 1
    finally:
        streaming.set_fp8_compute(False)
    assert "forward" not in modulation.__dict__


def test_float8_compute_stays_bf16_with_a_warning_where_unsupported(stream_pipeline, streaming, monkeypatch, caplog):
    from engine import streaming as module

    assert "8.9" in module.fp8_unsupported_reason(torch.device("cuda"), capability=(8, 6))  # RTX 30xx
    assert module.fp8_unsupported_reason(torch.device("cuda"), capability=(8, 9)) is None  # RTX 40xx
    assert module.fp8_unsupported_reason(torch.device("cuda"), capability=(9, 0)) is None  # H100
    monkeypatch.setattr(module.pipeline, "fp8_unsupported_reason", lambda device: "compute capability 8.6 (injected)")
    before = draw(stream_pipeline.pipe, "a fox, unsupported fp8")
    with caplog.at_level("WARNING", logger="engine.streaming"):
        assert streaming.set_fp8_compute(True) is False
    assert "8.6 (injected)" in caplog.text and "bf16" in caplog.text
    assert not streaming.fp8_compute and streaming.float8.installed == 0
    assert np.array_equal(draw(stream_pipeline.pipe, "a fox, unsupported fp8"), before)


def test_compute_config_keys_reach_the_streaming_pipeline(stream_settings, monkeypatch):
    from engine import streaming as module
    from engine.pipeline import FluxPipeline
    from engine.settings import EngineSettings

    assert EngineSettings().fp8_compute is False  # opt-in: it changes the pictures
    assert EngineSettings().torch_compile == "auto"  # on where it can run (never on a CPU)
    if _fp8_matmul_skip_reason():
        pytest.skip(_fp8_matmul_skip_reason())
    real, seen = module.enable_streaming, {}

    def spy(pipe, **kwargs):  # Inductor on a CPU takes minutes: trace with the "eager" backend instead
        seen.update(kwargs)
        return real(pipe, **{**kwargs, "compile_backend": "eager"})

    monkeypatch.setattr(module, "enable_streaming", spy)
    pipeline = FluxPipeline.load(stream_settings.model_copy(update={"fp8_compute": True, "torch_compile": True}))
    try:
        assert seen["fp8_compute"] is True and seen["torch_compile"] is True
        assert pipeline.streaming.fp8_compute and pipeline.streaming.float8.installed > 0
        assert pipeline.streaming.torch_compiled
        result = pipeline.generate(GenerationRequest("a fox, fp8 from config", 3, 2, 64, 64), lambda d, t: None)
        assert result.png
    finally:
        pipeline.streaming.set_torch_compile(False)
        pipeline.streaming.set_fp8_compute(False)


@pytest.mark.parametrize("fp8", [False, True])
def test_compiled_blocks_compute_what_the_eager_blocks_compute(stream_pipeline, streaming, fp8):
    """torch.compile with the "eager" backend runs the captured graphs op for op: the same picture, bit for bit,
    from one graph per block class (no graph breaks, no recompilation per block)."""
    if fp8 and _fp8_matmul_skip_reason():
        pytest.skip(_fp8_matmul_skip_reason())
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs are cached per code object, across pipelines: count this test's own
    pipe = stream_pipeline.pipe
    streaming.set_fp8_compute(fp8)
    plain = draw(pipe, f"a fox, compile check {fp8}")
    assert streaming.set_torch_compile(True, backend="eager")
    try:
        assert not streaming.float8.triton and not streaming.dit.upcaster.triton  # torch ops, for the compiler
        counters.clear()
        compiled = draw(pipe, f"a fox, compile check {fp8}")
        assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    finally:
        assert streaming.set_torch_compile(False) is False
    assert np.array_equal(compiled, plain)
    blocks = [*pipe.dit.blocks, *pipe.dit.single_blocks]
    assert all("forward" not in block.__dict__ for block in blocks) and streaming.float8.triton


def test_a_failed_compilation_falls_back_to_eager_blocks(stream_settings, diffsynth_reference, caplog):
    from engine.pipeline import _from_pretrained, locate_model, plan_memory
    from engine.streaming import enable_streaming

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C compiler here (injected)")

    files, _ = locate_model(stream_settings)
    pipe = _from_pretrained(files, plan_memory(stream_settings, "cpu"), "cpu")
    with caplog.at_level("WARNING", logger="engine.streaming"):
        streaming = enable_streaming(pipe, device="cpu", budget_gb=8, width=64, height=64, torch_compile=True,
                                     compile_backend=broken_backend)
    assert "injected" in caplog.text and "eagerly" in caplog.text
    assert not streaming.torch_compiled
    prompt = "a cat after a failed compile"
    assert np.array_equal(draw(pipe, prompt), draw(diffsynth_reference, prompt))


def test_the_start_up_generations_run_t5_once(stream_settings, diffsynth_reference):
    """The shape-generic warm-up reuses the calibration's prompt embedding: T5 (streamed, on the file-backed path
    read from the disk) runs once per start, not twice; users' prompts still run it."""
    from engine.pipeline import _from_pretrained, locate_model, plan_memory
    from engine.streaming import enable_streaming

    files, _ = locate_model(stream_settings)
    pipe = _from_pretrained(files, plan_memory(stream_settings, "cpu"), "cpu")
    t5_calls: list[int] = []
    handle = pipe.text_encoder_2.encoder.block[0].register_forward_hook(lambda *a: t5_calls.append(1))
    try:
        streaming = enable_streaming(pipe, device="cpu", budget_gb=8, width=64, height=64, torch_compile=True,
                                     compile_backend="eager")
        try:
            assert streaming.torch_compiled and streaming.startup_seconds.warmup > 0  # both generations ran
            assert len(t5_calls) == 1
            prompt = "a cat after a frugal start"
            picture = draw(pipe, prompt)
            assert len(t5_calls) == 2
        finally:
            streaming.set_torch_compile(False)
    finally:
        handle.remove()
    assert np.array_equal(picture, draw(diffsynth_reference, prompt))


def test_tiled_decode_switch_reaches_the_vae(stream_pipeline, streaming):
    pipe = stream_pipeline.pipe
    untiled = draw(pipe, "a fox, decode check")
    streaming.decode_tiles = (4, 2)  # latent pixels: the 64² test picture is 8x8 latent, so 9 overlapping tiles
    try:
        tiled = draw(pipe, "a fox, decode check")
    finally:
        streaming.decode_tiles = None
    assert tiled.shape == untiled.shape and not np.array_equal(tiled, untiled)
    assert np.array_equal(draw(pipe, "a fox, decode check"), untiled)


def test_a_picture_smaller_than_a_decode_tile_decodes_whole(stream_pipeline, streaming):
    """With the plan's tiled decode on (a 12 GB card at 1024²), a picture whose latent is no larger than one tile
    (up to 512² with 64-latent-pixel tiles; chat allows 256²) decodes untiled instead of failing in DiffSynth's
    tiling."""
    from engine.streaming import DECODE_TILES

    pipe = stream_pipeline.pipe
    untiled = draw(pipe, "a fox, small decode")
    streaming.decode_tiles = DECODE_TILES  # 64 latent pixels: the 64² test picture's latent is 8x8
    try:
        tiled = draw(pipe, "a fox, small decode")
    finally:
        streaming.decode_tiles = None
    assert np.array_equal(tiled, untiled)


@pytest.mark.parametrize("shape", [(8, 8), (13, 8), (10, 23), (4, 31), (104 // 8, 152 // 8)])
def test_tiles_cover_every_latent_position_and_blend_back_to_the_whole(shape):
    """Tiles every `stride` with the last flush with the edge cover every position, for sides DiffSynth's own
    tiling leaves partly uncovered (NaN there); a decoder that only upscales gives back exactly its untiled output."""
    from engine.streaming.tiled_decode import decode_in_tiles, tile_starts

    for length in range(1, 40):
        starts = tile_starts(length, 4, 3)
        covered = {i for start in starts for i in range(start, min(start + 4, length))}
        assert covered == set(range(length)) and max(starts) + min(4, length) == length
    sample = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(5))

    def upscale(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(8, -2).repeat_interleave(8, -1)

    tiled = decode_in_tiles(upscale, sample, 4, 3)
    assert tiled.shape == (1, 3, shape[0] * 8, shape[1] * 8)
    assert torch.allclose(tiled, upscale(sample), atol=1e-6) and not tiled.isnan().any()


def test_a_tiled_decode_of_an_uneven_size_has_no_gaps(stream_pipeline, streaming):
    """The plan's tiled decode at a size whose latent is not tile + k * stride, where DiffSynth's own tiling leaves
    the last rows and columns NaN (black bands in the picture): every pixel is decoded."""
    pipe = stream_pipeline.pipe
    latents = torch.randn(1, 16, 14, 11, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        whole = pipe.vae_decoder(latents)
        theirs = type(pipe.vae_decoder).forward(pipe.vae_decoder, latents, tiled=True, tile_size=4, tile_stride=3)
        streaming.decode_tiles = (4, 3)
        try:
            tiled = pipe.vae_decoder(latents)
        finally:
            streaming.decode_tiles = None
    assert theirs.isnan().any()  # what the plan's tiled decode gave before
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()


def test_frugal_loading_keeps_little_of_each_file_mapped_and_restores_the_environment(stream_settings, monkeypatch):
    """DiffSynth's DiskMap reads its re-open interval from the environment when it is made: inside the context it
    gets drawbot's (smaller) one, outside DiffSynth's default again."""
    import os

    from diffsynth.core.vram.disk_map import DiskMap

    from engine.pipeline import locate_model
    from engine.streaming import LOAD_MAPPED_PARAMS, frugal_loading

    monkeypatch.delenv("DIFFSYNTH_DISK_MAP_BUFFER_SIZE", raising=False)
    files, _ = locate_model(stream_settings)
    with frugal_loading():
        inside = DiskMap(str(files.dit), "cpu")
    outside = DiskMap(str(files.dit), "cpu")
    assert inside.buffer_size == LOAD_MAPPED_PARAMS < outside.buffer_size
    assert "DIFFSYNTH_DISK_MAP_BUFFER_SIZE" not in os.environ


def test_auto_compile_stays_eager_on_a_cpu(stream_pipeline):
    assert stream_pipeline.settings.torch_compile == "auto"
    assert not stream_pipeline.streaming.torch_compiled


def test_a_compile_failure_at_a_new_size_draws_that_picture_eagerly(stream_settings, monkeypatch, caplog):
    """When a compile during a picture fails (here: the compiled graphs are dropped, so the next picture compiles
    again, and Triton breaks on it), the picture is still drawn, eagerly, and the blocks stay eager from then on."""
    import torch._dynamo

    from engine import streaming as module
    from engine.pipeline import FluxPipeline

    torch._dynamo.reset()
    broken = {"now": False}

    def backend(graph, example_inputs):
        if broken["now"]:
            raise RuntimeError("Triton failed on this shape (injected)")
        return graph.forward

    real = module.enable_streaming
    monkeypatch.setattr(module, "enable_streaming", lambda pipe, **kw: real(pipe, **{**kw, "compile_backend": backend}))
    pipeline = FluxPipeline.load(stream_settings.model_copy(update={"torch_compile": True}))
    try:
        assert pipeline.streaming.torch_compiled  # compiled at start-up (64x64), without trouble
        pipeline.generate(GenerationRequest("a fox, compiled size", 3, 2, 64, 64), lambda d, t: None)
        broken["now"] = True
        torch._dynamo.reset()
        steps: list[tuple[int, int]] = []
        with caplog.at_level("WARNING", logger="engine.streaming"):
            result = pipeline.generate(GenerationRequest("a fox, new size", 3, 2, 96, 64),
                                       lambda d, t: steps.append((d, t)))
        assert "injected" in caplog.text and "eagerly" in caplog.text and "96x64" in caplog.text
        assert not pipeline.streaming.torch_compiled
        assert steps[-1] == (2, 2) and result.seconds_per_step > 0
        again = pipeline.generate(GenerationRequest("a fox, new size", 3, 2, 96, 64), lambda d, t: None)
        assert again.png == result.png  # what the eager blocks draw
    finally:
        pipeline.streaming.set_torch_compile(False)
        torch._dynamo.reset()


SIZES_AFTER_READY = ((64, 64), (256, 256), (64, 256), (256, 64), (2048, 64), (64, 2048), (512, 512), (208, 144))
"""The default size, the smallest sides (`drawbot draw`: 64; chat: 256), 1:4 and 4:1 (chat's ratio limits), the
longest side 2048 at 1:32 (`--size` takes any sides from 64 or 256 to 2048), a larger square and an odd one."""


async def test_no_picture_waits_for_a_compile_once_the_engine_is_ready(stream_settings, monkeypatch, caplog):
    """The engine as the bot starts it (engine.worker.Engine loads FluxPipeline in its GPU thread) with the DiT blocks
    compiled, through the "aot_eager" backend: Dynamo's guards and AOTAutograd's tracing as Inductor gets them,
    without Inductor's minutes of C++ on a CPU. Start-up compiles the exact graphs (default size) and the
    shape-generic ones (a second size); afterwards no picture of any allowed size compiles (Dynamo's own graph
    counter), and each block class holds a few graphs, far under Dynamo's recompile limit. The start-up time is
    reported with its parts."""
    import torch._dynamo
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from engine import streaming as module
    from engine.pipeline import FluxPipeline
    from engine.streaming import compiled_graphs
    from engine.streaming.pipeline import second_size
    from engine.worker import Engine

    assert second_size(1024, 1024) == (512, 512) and second_size(64, 64) == (80, 64)
    torch._dynamo.reset()
    real = module.enable_streaming
    monkeypatch.setattr(module, "enable_streaming",
                        lambda pipe, **kw: real(pipe, **{**kw, "compile_backend": "aot_eager"}))
    pipelines: list[FluxPipeline] = []

    def load() -> FluxPipeline:
        pipelines.append(FluxPipeline.load(stream_settings.model_copy(update={"torch_compile": True})))
        return pipelines[0]

    engine = Engine(load)
    try:
        with caplog.at_level("INFO", logger="engine"):
            await engine.start()
        streaming = pipelines[0].streaming
        assert streaming.torch_compiled
        ready = compiled_graphs()
        assert ready >= 4  # 2 block classes x (exact, shape-generic)
        for width, height in SIZES_AFTER_READY:
            assert engine.check(GenerationRequest("a fox", 3, 1, width, height)) is None  # an allowed size
            with caplog.at_level("WARNING", logger="engine"):
                await engine.submit(GenerationRequest(f"a fox at {width}x{height}", 3, 1, width, height)).wait()
            assert compiled_graphs() == ready, f"{width}x{height} compiled again"
        assert "waited for torch.compile" not in caplog.text
        limit = torch._dynamo.config.recompile_limit
        dit = pipelines[0].pipe.dit
        for block in (type(dit.blocks[0]), type(dit.single_blocks[0])):
            graphs = len(_debug_get_cache_entry_list(block.forward.__code__))
            assert 2 <= graphs <= limit // 2, (block.__name__, graphs, limit)
        line = engine.startup_line()
        assert line is not None and line.startswith("ready in ") and "calibration + compile" in line
        assert f"engine {line}" in caplog.text
        seconds = streaming.startup_seconds
        assert seconds.calibration > 0 and seconds.warmup > 0 and seconds.packing > 0
    finally:
        await engine.close(timeout=30)
        if pipelines:
            pipelines[0].streaming.set_torch_compile(False)
        torch._dynamo.reset()


def test_a_picture_that_compiles_after_start_up_is_reported(stream_settings, monkeypatch, caplog):
    """Without the start-up warm-up at a second size the first picture of another size compiles (this is what
    start-up prevents); when that happens anyway the owner's log says so, with the size."""
    import torch._dynamo

    from engine import streaming as module
    from engine.pipeline import FluxPipeline
    from engine.streaming import compiled_graphs

    torch._dynamo.reset()
    real = module.enable_streaming
    monkeypatch.setattr(module, "enable_streaming", lambda pipe, **kw: real(
        pipe, **{**kw, "compile_backend": "eager", "compile_other_size": False}))
    pipeline = FluxPipeline.load(stream_settings.model_copy(update={"torch_compile": True}))
    try:
        ready = compiled_graphs()
        caplog.clear()
        with caplog.at_level("WARNING", logger="engine"):
            pipeline.generate(GenerationRequest("a fox, default size", 3, 1, 64, 64), lambda d, t: None)
            assert compiled_graphs() == ready and "waited for torch.compile" not in caplog.text
            pipeline.generate(GenerationRequest("a fox, another size", 3, 1, 96, 64), lambda d, t: None)
        assert compiled_graphs() > ready
        assert "the 96x64 picture waited for torch.compile" in caplog.text
    finally:
        pipeline.streaming.set_torch_compile(False)
        torch._dynamo.reset()


def test_hitting_the_recompile_limit_is_said_and_runs_the_blocks_eagerly(stream_settings, monkeypatch, caplog):
    """Dynamo, at its recompile limit, would run a block eagerly from then on without a word: here the limit is
    lowered under what start-up needs, and the engine says so and runs every block eagerly instead."""
    import torch._dynamo

    from engine import streaming as module
    from engine.pipeline import FluxPipeline

    torch._dynamo.reset()
    real = module.enable_streaming
    monkeypatch.setattr(module, "enable_streaming",
                        lambda pipe, **kw: real(pipe, **{**kw, "compile_backend": "eager"}))
    # Dynamo's own patch: monkeypatch's undo would delete the setting from Dynamo's config for every later test.
    with caplog.at_level("WARNING", logger="engine.streaming"), torch._dynamo.config.patch(recompile_limit=1):
        pipeline = FluxPipeline.load(stream_settings.model_copy(update={"torch_compile": True}))
    try:
        assert "FailOnRecompileLimitHit" in caplog.text and "eagerly" in caplog.text
        assert not pipeline.streaming.torch_compiled
        result = pipeline.generate(GenerationRequest("a fox after the limit", 3, 1, 96, 64), lambda d, t: None)
        assert result.png
    finally:
        pipeline.streaming.set_torch_compile(False)
        torch._dynamo.reset()


def test_only_compile_failures_count_as_compile_failures():
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    from engine.streaming import is_compile_failure

    assert not is_compile_failure(torch.OutOfMemoryError("CUDA out of memory (injected)"))
    assert not is_compile_failure(RuntimeError("cancelled"))
    assert is_compile_failure(TorchDynamoException("no C compiler"))  # Dynamo's and Inductor's errors derive from it
    assert is_compile_failure(FailOnRecompileLimitHit("recompile limit (injected)"))  # not a TorchDynamoException
