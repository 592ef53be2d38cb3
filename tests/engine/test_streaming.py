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


def test_opt_in_float8_compute_changes_little_and_switches_back(stream_pipeline, streaming):
    pipe = stream_pipeline.pipe
    bf16 = draw(pipe, "a fox, compute dtype check")
    streaming.set_fp8_compute(True)
    try:
        fp8 = draw(pipe, "a fox, compute dtype check")
        assert np.array_equal(fp8, draw(pipe, "a fox, compute dtype check"))  # deterministic
    finally:
        streaming.set_fp8_compute(False)
    assert not np.array_equal(fp8, bf16)  # activations rounded to float8: really a different computation
    assert np.abs(fp8.astype(int) - bf16.astype(int)).mean() < 8  # ...but close (of 255)
    assert np.array_equal(draw(pipe, "a fox, compute dtype check"), bf16)


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
