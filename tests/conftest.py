"""Shared fixtures. The tiny Flux model is written and loaded once per test session (import + load ≈ 5 s)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models folder holding only the generated tiny model (no real weights exist on test machines)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_settings(models_dir):
    from engine.settings import EngineSettings

    return EngineSettings(model="tiny", models_dir=models_dir, device="cpu", width=64, height=64,
                          default_steps=4, max_steps=50)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_settings):
    """The real FluxPipeline (DiffSynth, fp8 DiT) on the tiny model, loaded once."""
    from engine.pipeline import FluxPipeline

    return FluxPipeline.load(tiny_settings)


@pytest.fixture(scope="session")
def tiny_offload_pipeline(tiny_settings):
    """The same tiny model in DiffSynth's own per-layer offload mode (the fallback to `stream`)."""
    from engine.pipeline import FluxPipeline

    return FluxPipeline.load(tiny_settings.model_copy(update={"mode": "offload"}))
