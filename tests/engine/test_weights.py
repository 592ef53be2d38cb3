"""Weight files: missing or wrong files fail with their path and fix; `drawbot download` calls ModelScope right."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine import weights
from engine.pipeline import FluxPipeline
from engine.settings import EngineSettings


def real_settings(models_dir: Path) -> EngineSettings:
    return EngineSettings(model="majicflus", models_dir=models_dir, device="cpu")


def copy_tiny_as_real(tiny_root: Path, target: Path) -> None:
    shutil.copytree(tiny_root, target, dirs_exist_ok=True)


def test_missing_files_name_each_path_and_the_fix(tmp_path, tiny_pipeline):
    with pytest.raises(weights.WeightsError) as info:
        FluxPipeline.load(real_settings(tmp_path))
    problems = info.value.problems
    text = str(info.value)
    assert any("majicflus_v134.safetensors: missing" in p for p in problems)
    assert any("model-00002-of-00002.safetensors: missing" in p for p in problems)
    assert any("tokenizer_2/tokenizer.json: missing" in p for p in problems)
    assert all("drawbot download" in p for p in problems)
    assert str(tmp_path) in text


def test_wrong_file_is_named_with_its_hash(tmp_path, models_dir, tiny_pipeline):
    # The tiny files sit in the real layout but are not the real weights: each is reported by path and hash.
    copy_tiny_as_real(models_dir / "tiny", tmp_path)
    problems = weights.check(weights.real_model_files(tmp_path), fix="drawbot download")
    assert len(problems) == 4
    assert any("majicflus_v134.safetensors: not the expected dit weights" in p for p in problems)
    assert all("expected" in p and "drawbot download" in p for p in problems)


def test_truncated_file_is_reported_not_crashed(tmp_path, models_dir, tiny_pipeline):
    copy_tiny_as_real(models_dir / "tiny", tmp_path)
    files = weights.real_model_files(tmp_path)
    files.vae.write_bytes(b"\x00garbage")
    problems = weights.check(files, fix="drawbot download")
    assert any(str(files.vae) in p and "unreadable" in p for p in problems)


def test_download_fetches_exactly_the_needed_files_then_verifies(tmp_path, models_dir, tiny_pipeline, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, *, allow_patterns, local_dir):
        calls.append((repo_id, tuple(allow_patterns), local_dir))
        # Pretend the hub delivered: copy the matching part of the tiny model into place.
        shutil.copytree(models_dir / "tiny" / repo_id, local_dir, dirs_exist_ok=True)
        return local_dir

    # The tiny files stand in for the real ones, so expect their hashes.
    from engine import tiny

    monkeypatch.setattr(weights, "REAL_HASHES", dict(tiny.tiny_hashes_by_part()))
    files = weights.download(tmp_path, snapshot_download=fake_snapshot_download)
    assert [c[0] for c in calls] == ["MAILAND/majicflus_v1", "black-forest-labs/FLUX.1-dev"]
    assert calls[0][1] == ("majicflus_v134.safetensors",)
    assert "text_encoder_2/*.safetensors" in calls[1][1] and "tokenizer_2/*" in calls[1][1]
    assert calls[1][2] == str(tmp_path.resolve() / "black-forest-labs/FLUX.1-dev")
    assert files.dit.is_file()


def test_download_reports_what_is_still_missing(tmp_path):
    with pytest.raises(weights.WeightsError, match="ae.safetensors: missing"):
        weights.download(tmp_path, snapshot_download=lambda repo_id, **kw: kw["local_dir"])


def test_download_uses_modelscope_by_default(tmp_path, monkeypatch):
    import modelscope

    seen = []
    monkeypatch.setattr(modelscope, "snapshot_download", lambda repo_id, **kw: seen.append((repo_id, kw)))
    with pytest.raises(weights.WeightsError):
        weights.download(tmp_path)
    assert [s[0] for s in seen] == ["MAILAND/majicflus_v1", "black-forest-labs/FLUX.1-dev"]


def test_download_onto_a_full_disk_says_the_disk_is_full_not_the_network(tmp_path):
    """33 GB on a small disk: ModelScope's client fails writing (ENOSPC, wrapped in its own error). The line used to
    blame the network ("check the network (or HTTPS_PROXY)")."""
    import errno

    def fills_the_disk(repo_id, **kw):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("download failed") from exc

    with pytest.raises(weights.WeightsError) as error:
        weights.download(tmp_path, snapshot_download=fills_the_disk)
    line = str(error.value)
    assert "network" not in line
    assert f"the disk holding {tmp_path.resolve()} is full" in line and "drawbot download" in line
