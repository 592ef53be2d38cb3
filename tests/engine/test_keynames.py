"""The real files' key maps, rebuilt from DiffSynth's classes at full size on the meta device, hash exactly to the
hashes DiffSynth registers for MajicFLUX and FLUX.1-dev: the benchmark's random files are recognised as the real ones."""

from __future__ import annotations

import math

import engine.tiny  # noqa: F401  (applies the compat shim before diffsynth is imported)
from bench import weights as bench_weights
from engine import keynames, weights


def test_full_size_key_maps_hash_to_the_registered_hashes():
    maps = bench_weights.all_shapes()  # raises if any map hashes differently
    assert set(maps) == set(weights.REAL_HASHES)
    assert all(key.startswith(keynames.DIT_PREFIX) for key in maps["dit"])
    assert len(maps["dit"]) == 780 and len(maps["clip"]) == 196 and len(maps["t5"]) == 219 and len(maps["vae"]) == 244
    assert sum(math.prod(shape) for shape in maps["dit"].values()) == 11_901_408_320
