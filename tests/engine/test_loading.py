"""Loading in bounded host RAM (engine.streaming.loading), on the tiny model through the real DiffSynth pipeline:
the DiT and T5 are built with no weights at all, then read from their files one tensor at a time into where they
live (the pinned packing or the file-backed weight cache), each read once and dropped before the next is read."""

from __future__ import annotations

import weakref
from collections import Counter

import pytest
import torch


@pytest.mark.parametrize("host_ram", [64, 0.5], ids=["pinned", "file-backed"])
def test_streamed_models_are_read_tensor_by_tensor_never_whole(tiny_settings, tmp_path, monkeypatch, host_ram):
    from engine import pipeline as pipeline_module
    from engine.streaming import loading

    reads: list[str] = []
    alive: list[tuple[str, weakref.ref]] = []
    held_at_read: list[list[str]] = []  # keys of earlier reads still alive when the next read starts
    read_key = loading.SourceWeights.read_key

    def counting(self, key, dtype):
        held_at_read.append([k for k, ref in alive if ref() is not None])
        tensor = read_key(self, key, dtype)
        reads.append(key)
        alive.append((key, weakref.ref(tensor)))
        return tensor

    monkeypatch.setattr(loading.SourceWeights, "read_key", counting)
    seen: dict = {}
    load_for_streaming = pipeline_module._load_for_streaming

    def spy(files, plan, device):
        pipe, sources = load_for_streaming(files, plan, device)
        seen["params"] = {name: list(model.parameters()) for name, model in (("dit", pipe.dit),
                                                                              ("t5", pipe.text_encoder_2))}
        seen["meta"] = all(p.is_meta for params in seen["params"].values() for p in params)
        seen["read_before_packing"] = len(reads)
        seen["sources"] = sources
        return pipe, sources

    monkeypatch.setattr(pipeline_module, "_load_for_streaming", spy)
    settings = tiny_settings.model_copy(update={"mode": "stream", "host_ram_budget_gb": host_ram,
                                                "weight_cache_dir": tmp_path / "cache"})
    loaded = pipeline_module.FluxPipeline.load(settings)

    assert seen["meta"], "DiffSynth materialised the DiT or T5 before packing"
    assert seen["read_before_packing"] == 0
    assert all(not p.is_meta for params in seen["params"].values() for p in params)
    assert loaded.streaming.dit.file_backed is (host_ram < 1)
    unit_keys = {source.key(entry.param)
                 for name, streamer in (("dit", loaded.streaming.dit), ("t5", loaded.streaming.t5))
                 for source in [seen["sources"][name]] for unit in streamer.units for entry in unit.entries}
    assert unit_keys and unit_keys <= set(reads)
    counts = Counter(reads)
    assert all(counts[key] == 1 for key in unit_keys)  # each unit weight read once
    # When a unit weight is read, no earlier unit weight read is still held: one tensor in RAM at a time.
    assert max(len(set(held) & unit_keys) for held in held_at_read) == 0


def test_source_weights_use_diffsynths_key_names_and_convert_like_its_loader(tiny_settings):
    """The DiT's BFL names map onto DiffSynth's through its own converter, and a value read is the file's tensor
    cast to the storage dtype, as DiffSynth's DiskMap casts it."""
    from safetensors.torch import load_file

    from engine.pipeline import locate_model, plan_memory
    from engine.streaming.loading import empty_model

    files, _ = locate_model(tiny_settings.model_copy(update={"mode": "stream"}))
    plan = plan_memory(tiny_settings.model_copy(update={"mode": "stream"}), "cpu")
    model, source = empty_model([files.dit], "flux_dit", plan.dit)
    raw = load_file(str(files.dit))
    params = list(model.parameters())  # wrapped by DiffSynth for VRAM management
    assert {source.key(param) for param in params} == set(source.rename)  # every key a parameter, none left out
    for param in params:
        key = source.key(param)
        assert param.is_meta and param.dtype == torch.float8_e4m3fn
        value = source.read(param)
        assert value.shape == param.shape
        assert torch.equal(value.view(torch.uint8), raw[source.rename[key]].to(torch.float8_e4m3fn).view(torch.uint8))
    source.close()
