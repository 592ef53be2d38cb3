"""Full-size random weights in the real MajicFLUX + FLUX.1-dev layout, for the benchmark (no real weights needed).

Every file carries exactly the real key names and shapes, so DiffSynth's hash detection recognises it as the real
file (checked against engine.weights.REAL_HASHES before anything is written; recipe: shared notes weights-layout.md
§7): DiT float8_e4m3fn (12 GB), T5 bf16 in two shards (9.5 GB), CLIP and VAE bf16. Values are drawn on the GPU when
there is one (matrices N(0, max(1/fan_in, 0.02²)), norm scales 1, biases small) and written tensor by tensor straight
from device memory, so the host never holds a whole file. Tokenizers: the tiny model's folders (engine.tiny); prompts
tokenize to different ids than the real tokenizers would give, but the pipeline pads to the same 77 / 512 tokens, so
timing and memory are the same.

    python -m bench.weights --models-dir /tmp/fullsize        # write (skips files whose hash already matches)
    python -m bench.weights --check-maps                      # only prove the key maps hash to the real hashes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from engine import compat

compat.apply()

from diffsynth.core.loader.file import convert_keys_dict_to_single_str, hash_model_file  # noqa: E402

from engine import keynames, weights  # noqa: E402

Shapes = keynames.Shapes

_DTYPE_NAMES = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def dit_shapes() -> Shapes:
    from diffsynth.models.flux_dit import FluxDiT

    return keynames.dit_file_shapes(FluxDiT, 19, 38)


def vae_shapes() -> Shapes:
    from diffsynth.models.flux_vae import FluxVAEDecoder, FluxVAEEncoder

    return keynames.vae_file_shapes(FluxVAEEncoder, FluxVAEDecoder)


def clip_shapes() -> Shapes:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    return keynames.clip_file_shapes(lambda: CLIPTextModel(config))


def t5_shapes() -> Shapes:
    from diffsynth.models.flux_text_encoder_t5 import FluxTextEncoderT5

    return keynames.t5_file_shapes(FluxTextEncoderT5)


def _hash(shapes: Shapes) -> str:
    return hashlib.md5(convert_keys_dict_to_single_str({k: list(v) for k, v in shapes.items()}).encode()).hexdigest()


def all_shapes() -> dict[str, Shapes]:
    maps = {"dit": dit_shapes(), "clip": clip_shapes(), "t5": t5_shapes(), "vae": vae_shapes()}
    for part, shapes in maps.items():
        got = _hash(shapes)
        if got != weights.REAL_HASHES[part]:
            raise RuntimeError(f"{part}: key map hashes to {got}, DiffSynth expects {weights.REAL_HASHES[part]}")
    return maps


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _is_norm_scale(name: str) -> bool:
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return ("norm" in module or name.endswith(".scale")) and len(name) > 0


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str,
                   generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        if _is_norm_scale(name):
            return torch.ones(shape, device=device, dtype=dtype)
        return (torch.randn(shape, device=device, generator=generator) * 0.02).to(dtype)
    std = max(math.prod(shape[1:]) ** -0.5, 0.02)  # fp8 e4m3 loses most precision below ≈0.016
    out = torch.empty(shape, device=device, dtype=torch.bfloat16)
    out.normal_(0.0, std, generator=generator)
    return out.to(dtype)


def write_safetensors(path: Path, shapes: Shapes, dtype: torch.dtype, *, device: str, seed: int) -> None:
    """Stream a safetensors file tensor by tensor (header first: offsets are known from the shapes). Written to a
    temporary name and renamed, so an interrupted run never leaves a file with a valid name."""
    names = sorted(shapes)
    itemsize = dtype.itemsize
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        nbytes = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator(device=device).manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in names:
            tensor = _random_tensor(name, shapes[name], dtype, device, generator)
            handle.write(tensor.contiguous().view(torch.uint8).cpu().numpy().data)
            del tensor
    temporary.replace(path)


def _copy_tiny_tokenizers(files: weights.ModelFiles) -> None:
    from engine import tiny

    with tempfile.TemporaryDirectory() as folder:
        tiny.write_tiny_model(Path(folder))
        source = weights.layout(Path(folder), {})
        for src, dst in ((source.tokenizer_1, files.tokenizer_1), (source.tokenizer_2, files.tokenizer_2)):
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)


def _file_dtype(path: Path) -> str:
    """The dtype of the largest tensor in a safetensors file, as the header names it."""
    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
    entries = [v for k, v in header.items() if k != "__metadata__"]
    largest = max(entries, key=lambda v: v["data_offsets"][1] - v["data_offsets"][0])
    return str(largest["dtype"])


def write_full_size(models_dir: Path, *, device: str | None = None, parts: tuple[str, ...] = ("dit", "clip", "t5", "vae"),
                    log: Callable[[str], None] = print, dit_dtype: torch.dtype = torch.float8_e4m3fn
                    ) -> weights.ModelFiles:
    """Write every missing or wrong file (a DiT of another dtype than `dit_dtype` counts as wrong); returns the
    checked layout. Idempotent."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    files = weights.real_model_files(models_dir)
    maps = all_shapes()
    t5_first = {k: v for k, v in maps["t5"].items()
                if k == "shared.weight" or any(k.startswith(f"encoder.block.{i}.") for i in range(12))}
    t5_second = {k: v for k, v in maps["t5"].items() if k not in t5_first}
    jobs = {
        "dit": [(files.dit, maps["dit"], dit_dtype)],
        "clip": [(files.clip, maps["clip"], torch.bfloat16)],
        "t5": [(files.t5[0], t5_first, torch.bfloat16), (files.t5[1], t5_second, torch.bfloat16)],
        "vae": [(files.vae, maps["vae"], torch.bfloat16)],
    }
    for seed, part in enumerate(parts):
        paths = [p for p, _, _ in jobs[part]]
        try:
            ok = all(p.is_file() for p in paths) and hash_model_file(
                [str(p) for p in paths] if len(paths) > 1 else str(paths[0])) == weights.REAL_HASHES[part] \
                and all(_file_dtype(p) == _DTYPE_NAMES[dtype] for p, _, dtype in jobs[part])
        except Exception:
            ok = False
        if ok:
            log(f"{part}: present, hash matches")
            continue
        started = time.perf_counter()
        nbytes = 0
        for path, shapes, dtype in jobs[part]:
            write_safetensors(path, shapes, dtype, device=device, seed=1000 + seed)
            nbytes += path.stat().st_size
        log(f"{part}: wrote {nbytes / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s")
    if not (files.tokenizer_1 / "vocab.json").is_file() or not (files.tokenizer_2 / "tokenizer.json").is_file():
        _copy_tiny_tokenizers(files)
    if "t5" in parts:
        index = {"metadata": {"total_size": sum(math.prod(s) * 2 for s in maps["t5"].values())},
                 "weight_map": {k: (files.t5[0] if k in t5_first else files.t5[1]).name for k in maps["t5"]}}
        (files.t5[0].parent / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("bench-models"))
    parser.add_argument("--check-maps", action="store_true", help="only check the key maps against the real hashes")
    parser.add_argument("--parts", default="dit,clip,t5,vae")
    parser.add_argument("--dit-dtype", choices=("float8", "bf16"), default="float8",
                        help="the DiT file's dtype (the real MajicFLUX file's is not known: the bench loads both)")
    args = parser.parse_args(argv)
    maps = all_shapes()
    for part, shapes in maps.items():
        params = sum(math.prod(s) for s in shapes.values())
        print(f"{part}: {len(shapes)} keys, {params:,} params, hash {_hash(shapes)} = DiffSynth's")
    if args.check_maps:
        return 0
    dit_dtype = torch.float8_e4m3fn if args.dit_dtype == "float8" else torch.bfloat16
    files = write_full_size(args.models_dir, parts=tuple(args.parts.split(",")), dit_dtype=dit_dtype)
    problems = weights.check(files, fix="python -m bench.weights") if args.parts == "dit,clip,t5,vae" else []
    print("\n".join(problems) or "all files match DiffSynth's hashes")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
