"""The real generation path on the tiny model: determinism, float8 storage, PNG parameters, the `drawbot draw` command."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from bot.cli import main
from engine.jobs import GenerationRequest
from engine.png import fit_for_upload, read_parameters


def generate(pipeline, **kw):
    request = GenerationRequest(**{"prompt": "a red fox", "seed": 7, "steps": 3, "width": 64, "height": 64, **kw})
    return pipeline.generate(request, lambda done, total: None)


@pytest.fixture(params=["stream", "offload"])
def each_mode(request, tiny_pipeline, tiny_offload_pipeline):
    """Both memory modes go through the tests that matter for every mode."""
    pipeline = tiny_pipeline if request.param == "stream" else tiny_offload_pipeline
    assert pipeline.settings.mode == request.param
    return pipeline


def test_dit_weights_are_float8_while_the_pipeline_runs(each_mode):
    tiny_pipeline = each_mode
    seen: list[set] = []

    def on_step(done, total):
        # Look at the stored DiT parameters mid-run (computation casts a temporary bf16 copy per layer).
        seen.append({p.dtype for p in tiny_pipeline.pipe.dit.parameters()})

    tiny_pipeline.generate(GenerationRequest("a red fox", 7, 3, 64, 64), on_step)
    assert len(seen) == 4  # before the first step + after each of 3
    linear_dtypes = set().union(*seen)
    assert torch.float8_e4m3fn in linear_dtypes
    # Every Linear weight of the DiT (the bulk of its parameters) is stored in float8.
    linears = [m for m in tiny_pipeline.pipe.dit.modules() if type(m).__name__ == "AutoWrappedLinear"]
    assert linears, "DiffSynth VRAM management did not wrap the DiT's linears"
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in linears)


def test_same_seed_same_bytes_other_seed_other_image(each_mode):
    tiny_pipeline = each_mode
    a = generate(tiny_pipeline, seed=7)
    b = generate(tiny_pipeline, seed=7)
    c = generate(tiny_pipeline, seed=8)
    assert a.png == b.png
    pixels = lambda r: Image.open(io.BytesIO(r.png)).tobytes()  # noqa: E731
    assert pixels(a) != pixels(c)


def test_png_carries_a1111_parameters(tiny_pipeline):
    prompt = 'ünïcødé 🦊 <b>bold</b> "quoted"\nsecond line'
    result = generate(tiny_pipeline, prompt=prompt, seed=4294967295, steps=2)
    text = read_parameters(result.png)
    assert text.startswith(prompt + "\n")
    assert "Steps: 2," in text and "Seed: 4294967295," in text and "Size: 64x64," in text
    assert Image.open(io.BytesIO(result.png)).size == (64, 64)


def test_fit_for_upload_shrinks_only_when_needed(tiny_pipeline):
    png = generate(tiny_pipeline, width=128, height=128).png
    same, mime = fit_for_upload(png, len(png))
    assert (same, mime) == (png, "image/png")
    small, mime = fit_for_upload(png, 2000)
    assert mime == "image/jpeg" and len(small) <= 2000


@pytest.fixture
def config_file(tmp_path, models_dir):
    path = tmp_path / "config.toml"
    path.write_text(f'[engine]\nmodels_dir = "{models_dir}"\ndevice = "cpu"\nwidth = 128\nheight = 128\n')
    return path


def test_draw_command_writes_reproducible_pngs(config_file, tmp_path, capsys):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main(["--config", str(config_file), "draw", "a red fox", "--seed", "7", "--steps", "4", "-o", str(a)]) == 0
    out = capsys.readouterr()
    assert "tiny test model" in out.err  # no real weights: it says so plainly
    assert "seed 7" in out.out and "noise" in out.out
    assert main(["--config", str(config_file), "draw", "a red fox", "--seed", "7", "--steps", "4", "-o", str(b)]) == 0
    assert main(["--config", str(config_file), "draw", "a red fox", "--seed", "8", "--steps", "4", "-o", str(c)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    text = read_parameters(a.read_bytes())
    assert text.startswith("a red fox\n") and "Seed: 7," in text and "Steps: 4," in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps must be"),
        (["--steps", "1000000000"], "--steps must be"),
        (["--seed", "-5"], "--seed must be"),
        (["--seed", str(2**32)], "--seed must be"),
        (["--width", "100"], "multiple of 16"),
    ],
)
def test_draw_command_refuses_bad_numbers(config_file, tmp_path, capsys, args, message):
    assert main(["--config", str(config_file), "draw", "x", *args, "-o", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_draw_command_refuses_a_size_this_machine_cannot_afford_before_drawing(config_file, tmp_path, capsys):
    from engine.size_cost import cpu_size_cost

    if cpu_size_cost().affordable(2048, 2048):
        pytest.skip("this machine has the memory for a 2048x2048 picture on the CPU (≈37 GiB)")
    out = tmp_path / "x.png"
    assert main(["--config", str(config_file), "draw", "a fox", "--width", "2048", "--height", "2048", "--steps", "1",
                 "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "2048x2048 needs more memory than this CPU has" in err and "largest of that shape that fits is" in err
    assert not out.exists()


def test_the_start_up_line_names_each_part_and_the_wait_for_weights_only_when_there_was_one():
    from engine.pipeline import StartupTimes

    assert StartupTimes(total=19.6, load=4.0, packing=0.6, calibration=5.9, warmup=8.1, reading=0.7,
                        compiled=True).describe() == ("ready in 19.6 s: load 4.0 s, weights packed 0.6 s, "
                                                      "calibration + compile 14.0 s, then weights read 0.7 s")
    assert StartupTimes(total=6.0, load=4.0, packing=0.6, calibration=1.4, reading=0.01).describe() == (
        "ready in 6.0 s: load 4.0 s, weights packed 0.6 s, calibration 1.4 s")
