"""`drawbot doctor`: every broken condition gets a FAIL with its fix and exit code 1; a sound set-up exits 0; tokens
are never printed. Machine facts (CUDA, VRAM, RAM, disk) are injected; files are real files under tmp_path."""

from __future__ import annotations

import io
import os
import logging
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from bot.cli import main
from bot.config import Config, ConsoleSettings, StorageSettings, TelegramSettings
from bot.doctor import GIB, Facts, Gpu, Verdict, doctor, run_checks
from engine import tiny, weights
from engine.settings import EngineSettings

TOKEN = "123456789:AAFakeTokenForTestsOnly-abcdefghijklmnop"

RTX_3060 = Gpu(index=0, name="NVIDIA GeForce RTX 3060", total_bytes=12 * GIB, free_bytes=int(11.6 * GIB),
               capability=(8, 6))
HEALTHY = Facts(python=(3, 11, 7), torch_version="2.13.0+cu128", torch_cuda="12.8", cuda_available=True,
                gpus=(RTX_3060,), ram_total=32 * GIB, ram_available=28 * GIB, swap_total=0,
                free_bytes=lambda path: 400 * GIB)
NO_CUDA_CPU_TORCH = replace(HEALTHY, torch_version="2.13.0+cpu", torch_cuda=None, cuda_available=False, gpus=())


@pytest.fixture(autouse=True)
def no_tokens(monkeypatch):
    monkeypatch.delenv("DRAWBOT_TELEGRAM_TOKEN", raising=False)
    monkeypatch.delenv("DRAWBOT_DISCORD_TOKEN", raising=False)


@pytest.fixture(scope="module")
def tiny_files(models_dir) -> weights.ModelFiles:
    """The generated tiny model with its own hashes: a complete, correct model layout to check."""
    root = models_dir / tiny.TINY_ROOT_NAME
    tiny.write_tiny_model(root)
    return weights.layout(root.resolve(), dict(tiny.tiny_hashes_by_part()))


def real_config(tmp_path: Path, **engine) -> Config:
    settings = dict(model="majicflus", models_dir=tmp_path / "models", vram_budget_gb=11.0)
    settings.update(engine)
    return Config(engine=EngineSettings(**settings), storage=StorageSettings(state_dir=tmp_path / "state"))


def checks_by_name(config: Config, facts: Facts, **kw) -> dict:
    return {c.name: c for c in run_checks(config, facts, **kw)}


def run_doctor(config: Config, facts: Facts, **kw) -> tuple[int, str]:
    out = io.StringIO()
    code = doctor(config, facts=facts, out=out, **kw)
    return code, out.getvalue()


def test_a_sound_setup_is_ready_and_never_prints_the_token(tmp_path, tiny_files, monkeypatch):
    monkeypatch.setenv("DRAWBOT_TELEGRAM_TOKEN", TOKEN)
    code, text = run_doctor(real_config(tmp_path), HEALTHY, model_files=tiny_files)
    assert code == 0, text
    assert "verdict: ready" in text and "FAIL" not in text
    assert "set (from env DRAWBOT_TELEGRAM_TOKEN)" in text
    assert TOKEN not in text and TOKEN.split(":")[1] not in text
    assert "NVIDIA GeForce RTX 3060" in text and "hashes match" in text


def test_missing_model_files_fail_with_the_download_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAWBOT_TELEGRAM_TOKEN", TOKEN)
    code, text = run_doctor(real_config(tmp_path), HEALTHY, config_path=Path("/etc/drawbot/config.toml"))
    assert code == 1
    check = checks_by_name(real_config(tmp_path), HEALTHY)["model files"]
    assert check.verdict is Verdict.FAIL
    assert "MAILAND/majicflus_v1/majicflus_v134.safetensors: missing" in check.detail
    assert "drawbot download" in check.fix
    assert "drawbot --config /etc/drawbot/config.toml download" in text  # the exact command for this install
    assert "verdict: NOT READY" in text


def test_wrong_hashes_fail_naming_each_file_and_saying_delete_first(tmp_path, tiny_files):
    # The tiny files in the real layout: every safetensors file is there but is not MajicFLUX/FLUX.1-dev.
    shutil.copytree(tiny_files.root, tmp_path / "models")
    check = checks_by_name(real_config(tmp_path), HEALTHY)["model files"]
    assert check.verdict is Verdict.FAIL
    assert "majicflus_v134.safetensors: not the expected dit weights" in check.detail
    assert "ae.safetensors: not the expected vae weights" in check.detail
    assert "delete each file reported as wrong" in check.fix


def test_missing_files_mention_disk_space_when_the_download_would_not_fit(tmp_path):
    tight = replace(HEALTHY, free_bytes=lambda path: 10 * GIB)
    check = checks_by_name(real_config(tmp_path), tight)["model files"]
    assert "needs ~35 GB and only 10.0 GiB is free" in check.fix


def test_no_token_fails_with_where_to_put_it(tmp_path, tiny_files):
    code, text = run_doctor(real_config(tmp_path), HEALTHY, model_files=tiny_files)
    assert code == 1
    chat = checks_by_name(real_config(tmp_path), HEALTHY, model_files=tiny_files)["chat"]
    assert chat.verdict is Verdict.FAIL and "no chat token" in chat.detail
    assert "DRAWBOT_TELEGRAM_TOKEN" in chat.fix and "/etc/drawbot/drawbot.env" in chat.fix


def test_platform_enabled_without_token_fails(tmp_path):
    config = real_config(tmp_path).model_copy(update={"telegram": TelegramSettings(enabled=True)})
    check = checks_by_name(config, HEALTHY)["telegram token"]
    assert check.verdict is Verdict.FAIL and "enabled = true" in check.detail
    assert "DRAWBOT_TELEGRAM_TOKEN" in check.fix


def test_token_file_says_from_file_warns_when_others_can_read_it(tmp_path):
    token_file = tmp_path / "telegram.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o644)
    config = real_config(tmp_path).model_copy(update={"telegram": TelegramSettings(token_file=token_file)})
    check = checks_by_name(config, HEALTHY)["telegram token"]
    assert check.verdict is Verdict.WARN and f"set (from file {token_file})" in check.detail
    assert check.fix == f"chmod 600 {token_file}"
    token_file.chmod(0o600)
    assert checks_by_name(config, HEALTHY)["telegram token"].verdict is Verdict.OK
    _, text = run_doctor(config, HEALTHY)
    assert TOKEN not in text


def test_unreadable_token_file_fails(tmp_path):
    config = real_config(tmp_path).model_copy(
        update={"telegram": TelegramSettings(token_file=tmp_path / "missing.token")})
    check = checks_by_name(config, HEALTHY)["telegram token"]
    assert check.verdict is Verdict.FAIL and "cannot read" in check.detail and "chmod 600" in check.fix


def test_malformed_token_is_a_warning_that_does_not_echo_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DRAWBOT_TELEGRAM_TOKEN", "\"pasted-with-quotes\"")
    check = checks_by_name(real_config(tmp_path), HEALTHY)["telegram token"]
    assert check.verdict is Verdict.WARN and "pasted" not in check.detail + check.fix


def test_no_cuda_with_a_cpu_torch_fails_and_says_which_torch_to_install(tmp_path, tiny_files, monkeypatch):
    monkeypatch.setenv("DRAWBOT_TELEGRAM_TOKEN", TOKEN)
    code, text = run_doctor(real_config(tmp_path), NO_CUDA_CPU_TORCH, model_files=tiny_files)
    assert code == 1
    found = checks_by_name(real_config(tmp_path), NO_CUDA_CPU_TORCH)
    assert found["cuda"].verdict is Verdict.FAIL and "CPU-only build" in found["cuda"].fix
    assert "torch==2.13.0" in found["cuda"].fix
    assert found["vram"].verdict is Verdict.SKIP  # one FAIL for one cause


def test_no_cuda_with_a_cuda_torch_points_at_the_driver_and_the_unit(tmp_path):
    broken = replace(HEALTHY, cuda_available=False, gpus=(),
                     cuda_error="CUDA initialization: The NVIDIA driver on your system is too old")
    check = checks_by_name(real_config(tmp_path), broken)["cuda"]
    assert check.verdict is Verdict.FAIL and "driver on your system is too old" in check.detail
    assert "nvidia-smi" in check.fix and "DeviceAllow" in check.fix


def test_vram_budget_larger_than_the_card_fails_with_the_value_to_use(tmp_path):
    card_8gb = replace(HEALTHY, gpus=(replace(RTX_3060, total_bytes=8 * GIB, free_bytes=int(7.7 * GIB)),))
    check = checks_by_name(real_config(tmp_path, vram_budget_gb=12), card_8gb)["vram"]
    assert check.verdict is Verdict.FAIL and "at most 7.5" in check.fix
    assert checks_by_name(real_config(tmp_path, vram_budget_gb=7.5), card_8gb)["vram"].verdict is Verdict.OK


def test_resident_mode_needs_a_24gb_card(tmp_path):
    check = checks_by_name(real_config(tmp_path, mode="resident"), HEALTHY)["vram"]
    assert check.verdict is Verdict.FAIL and "mode = \"offload\"" in check.fix


def test_missing_gpu_index_fails(tmp_path):
    check = checks_by_name(real_config(tmp_path, device="cuda:1"), HEALTHY)["cuda"]
    assert check.verdict is Verdict.FAIL and "cuda:0" in check.fix


def test_torch_compile_check_says_whether_the_blocks_will_compile_and_what_is_missing(tmp_path):
    assert checks_by_name(real_config(tmp_path), HEALTHY)["torch.compile"].verdict is Verdict.OK  # "auto", ready
    assert "on:" in checks_by_name(real_config(tmp_path), HEALTHY)["torch.compile"].detail
    no_gcc = replace(HEALTHY, gpus=(replace(RTX_3060, compile_blocker="no C compiler on PATH (injected)"),))
    check = checks_by_name(real_config(tmp_path), no_gcc)["torch.compile"]
    assert check.verdict is Verdict.WARN and "injected" in check.detail and "apt install gcc" in check.fix
    forced = checks_by_name(real_config(tmp_path, torch_compile=True), no_gcc)["torch.compile"]
    assert forced.verdict is Verdict.WARN and "fail and run eagerly" in forced.fix
    old_card = replace(HEALTHY, gpus=(replace(RTX_3060, capability=(7, 5), compile_blocker="capability 7.5"),))
    assert checks_by_name(real_config(tmp_path), old_card)["torch.compile"].verdict is Verdict.OK  # nothing to fix
    off = checks_by_name(real_config(tmp_path, torch_compile=False), no_gcc)["torch.compile"]
    assert off.verdict is Verdict.OK and "off" in off.detail


def test_host_ram_against_the_mode(tmp_path):
    small = replace(HEALTHY, ram_total=16 * GIB, ram_available=14 * GIB)
    check = checks_by_name(real_config(tmp_path, mode="offload"), small)["ram"]
    assert check.verdict is Verdict.FAIL and "~24 GiB" in check.detail and "stream" in check.fix
    swapping = replace(small, swap_total=16 * GIB)
    assert checks_by_name(real_config(tmp_path, mode="offload"), swapping)["ram"].verdict is Verdict.WARN
    sixteen = checks_by_name(real_config(tmp_path), small)["ram"]  # stream, the default: file-backed weights
    assert sixteen.verdict is Verdict.OK and "file-backed weights needs ~10 GiB" in sixteen.detail
    eight = checks_by_name(real_config(tmp_path), replace(small, ram_total=8 * GIB, ram_available=6 * GIB))["ram"]
    assert eight.verdict is Verdict.FAIL and "~10 GiB" in eight.detail
    forced = checks_by_name(real_config(tmp_path, host_ram_budget_gb=64), small)["ram"]  # pinned on a 16 GB PC
    assert forced.verdict is Verdict.FAIL and "pinned weights needs ~17.7 GiB" in forced.detail
    assert 'host_ram_budget_gb = "auto"' in forced.fix
    assert checks_by_name(real_config(tmp_path, mode="stream"), replace(small, ram_total=24 * GIB,
                                                                       ram_available=23 * GIB))["ram"].verdict \
        is Verdict.OK


def test_ram_check_says_which_weight_path_stream_mode_takes(tmp_path):
    sixteen = replace(HEALTHY, ram_total=16 * GIB, ram_available=10 * GIB)
    detail = checks_by_name(real_config(tmp_path), sixteen)["ram"].detail
    assert "file-backed" in detail and "10.0 GiB < 17.7 GiB" in detail and "weight-cache" in detail
    plenty = replace(HEALTHY, ram_total=64 * GIB, ram_available=60 * GIB)
    assert "weights pinned in RAM (host RAM budget 60.0 GiB" in checks_by_name(real_config(tmp_path), plenty)["ram"].detail
    capped = checks_by_name(real_config(tmp_path, host_ram_budget_gb=8), plenty)["ram"].detail
    assert "file-backed: host RAM budget 8.0 GiB" in capped


def test_tiny_model_needs_no_gpu_and_console_only_can_start(tmp_path):
    config = Config(engine=EngineSettings(model="tiny", models_dir=tmp_path / "models"),
                    storage=StorageSettings(state_dir=tmp_path / "state"), console=ConsoleSettings(enabled=True))
    code, text = run_doctor(config, NO_CUDA_CPU_TORCH)
    assert code == 0, text
    found = checks_by_name(config, NO_CUDA_CPU_TORCH)
    assert found["cuda"].verdict is Verdict.OK and "not needed" in found["cuda"].detail
    assert found["chat"].verdict is Verdict.OK


def test_database_from_a_newer_drawbot_fails(tmp_path):
    config = real_config(tmp_path)
    config.storage.state_dir.mkdir()
    with sqlite3.connect(config.storage.database_path) as connection:
        connection.execute("PRAGMA user_version = 999")
    check = checks_by_name(config, HEALTHY)["database"]
    assert check.verdict is Verdict.FAIL and "newer drawbot" in check.detail and "upgrade" in check.fix


def test_database_path_under_a_file_fails(tmp_path):
    (tmp_path / "state").write_text("not a folder")
    check = checks_by_name(real_config(tmp_path), HEALTHY)["database"]
    assert check.verdict is Verdict.FAIL and "not a folder" in check.detail


def test_database_that_is_not_sqlite_fails(tmp_path):
    config = real_config(tmp_path)
    config.storage.state_dir.mkdir()
    config.storage.database_path.write_bytes(b"this is not a database, just some text" * 100)
    check = checks_by_name(config, HEALTHY)["database"]
    assert check.verdict is Verdict.FAIL and "not a drawbot database" in check.detail


def test_low_disk_fails_and_tight_disk_warns(tmp_path):
    check = checks_by_name(real_config(tmp_path), replace(HEALTHY, free_bytes=lambda p: GIB // 2))["disk"]
    assert check.verdict is Verdict.FAIL and "keep_images_count" in check.fix
    tight = checks_by_name(real_config(tmp_path), replace(HEALTHY, free_bytes=lambda p: 2 * GIB))["disk"]
    assert tight.verdict is Verdict.WARN and "2000 pictures" in tight.detail


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_cli_doctor_probes_this_machine(tmp_path, capsys, monkeypatch, restore_logging):
    config = tmp_path / "config.toml"
    config.write_text(f'[engine]\nmodel = "tiny"\nmodels_dir = "{tmp_path}/models"\n'
                      f'[storage]\nstate_dir = "{tmp_path}/state"\n[console]\nenabled = true\n')
    monkeypatch.setenv("DRAWBOT_DISCORD_TOKEN", "MTk4NjIyNDgzNDcxOTI1MjQ4.Gx1aBc.fake-discord-token-for-tests-only")
    assert main(["--config", str(config), "doctor"]) == 0
    text = capsys.readouterr().out
    assert f"{config} (valid)" in text and "verdict: ready" in text
    assert "fake-discord-token" not in text
    # The tiny model and a live chat token: users would get noise, which is worth a warning.
    assert "users get noise" in text


def test_state_dir_held_by_a_running_bot_is_reported_with_its_pid(tmp_path):
    from bot.statelock import StateLock

    config = real_config(tmp_path)
    assert checks_by_name(config, HEALTHY)["state dir"].verdict is Verdict.OK
    lock = StateLock(config.storage.state_dir).acquire()
    try:
        check = checks_by_name(config, HEALTHY)["state dir"]
        assert check.verdict is Verdict.WARN and f"process {os.getpid()}" in check.detail
        assert "stop the running one" in check.fix
    finally:
        lock.release()
    assert checks_by_name(config, HEALTHY)["state dir"].verdict is Verdict.OK
