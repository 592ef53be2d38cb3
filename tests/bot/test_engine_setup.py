"""bot/engine_setup.py: the one builder of the engine for `drawbot run` and `drawbot draw` (real tiny model)."""

from __future__ import annotations

import pytest

from bot.cluster.settings import ClusterSettings
from bot.config import Config
from bot.engine_setup import EngineSetupError, choose_model, start_engine
from engine.settings import EngineSettings


def test_without_weights_the_tiny_model_is_chosen_at_a_small_size(tmp_path):
    choice = choose_model(EngineSettings(models_dir=tmp_path, device="cpu"), explicit=False)
    assert choice.fell_back and choice.missing  # what is missing, one line each, for the caller to show
    assert (choice.settings.model, choice.settings.mode) == ("tiny", "resident")
    assert (choice.settings.width, choice.settings.height) == (256, 256)


def test_an_explicit_model_is_never_replaced(tmp_path):
    settings = EngineSettings(models_dir=tmp_path, device="cpu")
    choice = choose_model(settings, explicit=True)
    assert not choice.fell_back and choice.settings == settings


async def test_start_engine_loads_the_local_engine_even_with_a_cluster_when_told_not_to(tiny_settings):
    config = Config(engine=tiny_settings, cluster=ClusterSettings(enabled=True))
    said: list[str] = []
    engine = await start_engine(config, tiny_settings, say=said.append, cluster=False)
    try:
        assert engine.info.is_test_model
        assert said[-1].startswith("model ready in ") and ": load " in said[-1]  # the owner sees the start-up time
    finally:
        await engine.close()


async def test_a_cluster_without_a_redis_url_is_a_config_error(tiny_settings, monkeypatch):
    monkeypatch.delenv("DRAWBOT_REDIS_URL", raising=False)
    config = Config(engine=tiny_settings, cluster=ClusterSettings(enabled=True))
    with pytest.raises(EngineSetupError) as caught:
        await start_engine(config, tiny_settings, say=lambda _: None)
    assert caught.value.exit_code == 2 and "Redis URL" in str(caught.value)


async def test_a_model_that_cannot_load_is_one_line_pointing_at_the_doctor(tmp_path):
    settings = EngineSettings(models_dir=tmp_path, device="cpu")  # majicflus, but no files
    with pytest.raises(EngineSetupError) as caught:
        await start_engine(Config(engine=settings), settings, say=lambda _: None)
    assert caught.value.exit_code == 1 and "drawbot download" in str(caught.value)
