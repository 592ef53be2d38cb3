"""Loading the streamed models (DiT, T5) in bounded host RAM: their modules are built without weights (parameters on
torch's `meta` device, DiffSynth's own `skip_model_initialization`), and their values are read later, tensor by
tensor, straight from the downloaded safetensors files into where they live for good: the packed (pinned) host
allocation or the file-backed weight cache (engine.streaming.streamer). DiffSynth's `from_pretrained` instead reads
every model's whole state dict first (the bench process peaked at 19.2 GiB there), so this exists to keep host RAM
at one model's packed copy (pinned) or at one tensor (file-backed) while loading.

DiffSynth still decides everything about the model: which class a file is (its hash in `MODEL_CONFIGS`), the key
names (its state-dict converter, applied to the names only, as its own `DiskMap` does) and the layer wrappers
(`enable_vram_management` with the model's module map). Values are converted to the storage dtype exactly as
DiffSynth's loader converts them (`tensor.to(offload_dtype)`), so the pictures do not change."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from engine import compat

compat.apply()  # before the first diffsynth import

from safetensors import safe_open  # noqa: E402

log = logging.getLogger(__name__)

REOPEN_BYTES = 1 << 30
"""Re-open (and so unmap) the source files after reading this many bytes: pages of a mapped file count in the
process's RSS until unmapped (they stay reclaimable page cache either way)."""


class SourceWeights:
    """One model's tensors in its downloaded safetensors files, read one at a time under the model's own key names.
    `bind(model)` records which parameter is which key; `read(param)` then returns its value in the parameter's
    (storage) dtype, on the CPU, a fresh tensor the caller copies from and drops."""

    def __init__(self, paths: Sequence[Path | str], converter=None):
        self.paths = [str(p) for p in paths]
        self._files: list[Any] = []
        self._open()
        self._where = {key: index for index, f in enumerate(self._files) for key in f.keys()}
        names = {key: key for key in self._where}
        self.rename: dict[str, str] = converter(names) if converter is not None else names
        """model key -> source key (the converter renames; T5's embed_tokens and shared read the same key)."""
        self._names: dict[int, str] = {}
        self._read_since_open = 0
        self.bytes_read = 0

    def _open(self) -> None:
        self._files = [safe_open(path, framework="pt", device="cpu") for path in self.paths]

    def shape(self, key: str) -> list[int]:
        source = self.rename[key]
        return list(self._files[self._where[source]].get_slice(source).get_shape())

    def meta_state_dict(self, dtype: torch.dtype, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with every parameter as an empty `meta` tensor of `dtype` (nothing allocated);
        buffers stored in the file (none in Flux's DiT and T5) are read for real."""
        parameters = {name for name, _ in model.named_parameters()}
        return {key: torch.empty(self.shape(key), dtype=dtype, device="meta") if key in parameters
                else self.read_key(key, dtype) for key in self.rename}

    def bind(self, names: dict[int, str]) -> None:
        """id(parameter) -> model key, taken before DiffSynth wraps the layers (its wrappers keep the parameters)."""
        self._names = dict(names)

    def read_key(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        source = self.rename[key]
        tensor = self._files[self._where[source]].get_tensor(source).to(dtype)
        self.bytes_read += tensor.numel() * tensor.element_size()
        self._read_since_open += tensor.numel() * tensor.element_size()
        if self._read_since_open > REOPEN_BYTES:
            self._read_since_open = 0
            self._open()
        return tensor

    def key(self, param: torch.Tensor) -> str:
        """The model key of a bound parameter (its name in the unwrapped model)."""
        return self._names[id(param)]

    def read(self, param: torch.Tensor) -> torch.Tensor:
        return self.read_key(self.key(param), param.dtype)

    def close(self) -> None:
        """Unmap the files and tell the kernel their pages are not needed again (the weight cache or the packed copy
        holds the values now): on a short-RAM PC the page cache keeps the weight cache instead."""
        self._files = []
        for path in self.paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _config_for(paths: Sequence[Path], model_name: str) -> dict:
    from diffsynth.configs import MODEL_CONFIGS
    from diffsynth.core.loader.file import hash_model_file

    target = str(paths[0]) if len(paths) == 1 else [str(p) for p in paths]
    model_hash = hash_model_file(target)
    for config in MODEL_CONFIGS:
        if config["model_hash"] == model_hash and config["model_name"] == model_name:
            return config
    raise ValueError(f"Cannot detect the model type {model_name}. File: {target}. Model hash: {model_hash}")


def empty_model(paths: Sequence[Path], model_name: str, vram_config: dict) -> tuple[torch.nn.Module, SourceWeights]:
    """DiffSynth's model `model_name` ("flux_dit", "flux_text_encoder_t5") for these files, its layers wrapped for
    VRAM management as DiffSynth's loader wraps them, with every parameter on `meta` in the storage dtype
    (`vram_config["offload_dtype"]`), and the source its values are read from."""
    from diffsynth.core.vram.initialization import skip_model_initialization
    from diffsynth.core.vram.layers import enable_vram_management
    from diffsynth.models.model_loader import ModelPool

    config = _config_for(paths, model_name)
    pool = ModelPool()
    model_class = pool.import_model_class(config["model_class"])
    converter = (pool.import_model_class(config["state_dict_converter"]) if "state_dict_converter" in config
                 else None)
    source = SourceWeights(paths, converter)
    with skip_model_initialization():
        model = model_class(**config.get("extra_kwargs", {}))
    model.load_state_dict(source.meta_state_dict(vram_config["offload_dtype"], model), assign=True)
    source.bind({id(param): name for name, param in model.named_parameters()})
    module_map = pool.fetch_module_map(config["model_class"], vram_config)
    if module_map is not None:
        model = enable_vram_management(model, module_map, vram_config=vram_config, vram_limit=None)
    return model.eval(), source
