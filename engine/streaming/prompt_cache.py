"""The prompt-embedding cache: a repeated prompt skips the text encoders (T5 is streamed, so without it every request
would stream T5 again)."""

from __future__ import annotations

import collections

import torch

from engine.streaming.patches import Patches


class PromptCache:
    """The prompt unit's outputs for the last `size` distinct (prompt, T5 length, positive) keys, kept in host memory
    (≈4 MB each at 512 tokens). A hit returns copies on the pipeline's device: T5 and CLIP are not run at all."""

    def __init__(self, size: int = 32):
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[tuple, dict] = collections.OrderedDict()

    def lookup(self, key: tuple, device: torch.device | str) -> dict | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return {k: v.to(device, non_blocking=False) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}

    def clear(self) -> None:
        self._entries.clear()

    def store(self, key: tuple, outputs: dict) -> None:
        self._entries[key] = {k: v.detach().to("cpu") if isinstance(v, torch.Tensor) else v
                              for k, v in outputs.items()}
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


def install_prompt_cache(pipe, size: int = 32, *, patches: Patches | None = None) -> PromptCache | None:
    """Wrap the pipeline's prompt-embedding unit (FluxImageUnit_PromptEmbedder) with a PromptCache (patches group
    "prompt-cache": undoing it restores DiffSynth's unit)."""
    patches = patches if patches is not None else Patches()
    from diffsynth.pipelines.flux_image import FluxImageUnit_PromptEmbedder

    for unit in pipe.units:
        if isinstance(unit, FluxImageUnit_PromptEmbedder):
            cache = PromptCache(size)
            original = unit.process

            def process(pipe_, prompt, t5_sequence_length, positive, _original=original, _cache=cache):
                key = (prompt, t5_sequence_length, positive)
                hit = _cache.lookup(key, pipe_.device)
                if hit is not None:
                    return hit
                outputs = _original(pipe_, prompt=prompt, t5_sequence_length=t5_sequence_length, positive=positive)
                _cache.store(key, outputs)
                return outputs

            patches.set(unit, "process", process, group="prompt-cache")
            patches.set(pipe, "prompt_cache", cache, group="prompt-cache")
            return cache
    return None
