"""A tiny random-weight Flux model (≈1.4 MB) in the exact file layout and key naming of the real MajicFLUX + FLUX.1-dev
files, so the real DiffSynth 2.1.12 loading path runs on it on a CPU: hash detection, `MODEL_CONFIGS`, the real
state-dict converters, `FluxImagePipeline.from_pretrained`, VRAM management with float8 storage, denoising, VAE decode.

ITS PICTURES ARE NOISE. The weights are random numbers: whatever the prompt, the output is colourful static, not a
drawing. It exists for tests and for trying the bot without downloading ≈33 GB of real weights.

Files written under `root` (normally `<models_dir>/tiny/`), same paths as the real ones:

    MAILAND/majicflus_v1/majicflus_v134.safetensors                 DiT, BFL names prefixed `model.diffusion_model.`, float8_e4m3fn
    black-forest-labs/FLUX.1-dev/ae.safetensors                     autoencoder, BFL names `encoder.*` / `decoder.*`, bf16
    black-forest-labs/FLUX.1-dev/text_encoder/model.safetensors     CLIP-L as HF CLIPTextModel, `text_model.` prefix, bf16
    black-forest-labs/FLUX.1-dev/text_encoder_2/                    T5 encoder, two shards + index + config.json, bf16
    black-forest-labs/FLUX.1-dev/tokenizer/, tokenizer_2/           a 520-token byte-level BPE and a small Unigram vocabulary

How the names are kept real: each part's file key names are derived from DiffSynth's own state-dict converter (for
the DiT and VAE: the BFL names are pushed through the converter and must land one-to-one on the model's keys) or from
the transformers reference model (CLIP, T5), and before writing, every file's tensors are run through the converter
DiffSynth will use and must give exactly the tiny model's keys and shapes (a round-trip check).

The tiny model classes below are subclasses of DiffSynth's own classes, built from DiffSynth's own blocks; only the
constructors change (DiffSynth hard-codes the real sizes). DiffSynth finds them through `register_tiny_models()`,
which adds the tiny files' hashes to `diffsynth.configs.MODEL_CONFIGS`.

Public API:
    TINY_ROOT_NAME                      "tiny": the files go under <models_dir>/tiny/
    write_tiny_model(root)              write the files (idempotent, deterministic, atomic per file)
    register_tiny_models()              make DiffSynth recognise them (idempotent)
    TINY_HASHES, tiny_hashes()          {relative path (the text_encoder_2 folder for T5): DiffSynth hash}
    tiny_hashes_by_part()               the same keyed "dit"|"clip"|"t5"|"vae" (engine.weights.ModelFiles.hashes)
    DIT_FILE, CLIP_FILE, T5_SHARDS, VAE_FILE, TOKENIZER_1_DIR, TOKENIZER_2_DIR: relative paths

Importing this module imports diffsynth (after `engine.compat.apply()`), but writes and registers nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import zlib
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from types import MappingProxyType

import torch

from engine import compat

compat.apply()  # must run before the first diffsynth import (CPU-only torch: torchvision shim, torch.cpu memory API)

from diffsynth.core.loader.file import convert_keys_dict_to_single_str  # noqa: E402
from diffsynth.models.flux_dit import (  # noqa: E402
    AdaLayerNormContinuous,
    FluxDiT,
    FluxJointTransformerBlock,
    FluxSingleTransformerBlock,
    RoPEEmbedding,
)
from diffsynth.models.flux_text_encoder_clip import CLIPEncoderLayer, FluxTextEncoderClip  # noqa: E402
from diffsynth.models.flux_text_encoder_t5 import FluxTextEncoderT5  # noqa: E402
from diffsynth.models.flux_vae import (  # noqa: E402
    DownSampler,
    FluxVAEDecoder,
    FluxVAEEncoder,
    ResnetBlock,
    UpSampler,
    VAEAttentionBlock,
)
from diffsynth.models.general_modules import TimestepEmbeddings  # noqa: E402
from diffsynth.utils.state_dict_converters.flux_dit import FluxDiTStateDictConverter  # noqa: E402
from diffsynth.utils.state_dict_converters.flux_text_encoder_clip import (  # noqa: E402
    FluxTextEncoderClipStateDictConverter,
)
from diffsynth.utils.state_dict_converters.flux_text_encoder_t5 import (  # noqa: E402
    FluxTextEncoderT5StateDictConverter,
)
from diffsynth.utils.state_dict_converters.flux_vae import (  # noqa: E402
    FluxVAEDecoderStateDictConverter,
    FluxVAEEncoderStateDictConverter,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config  # noqa: E402
from engine.keynames import (  # noqa: E402
    KeyNameError,
    clip_file_shapes,
    dit_file_shapes,
    meta_shapes,
    t5_file_shapes,
    vae_file_shapes,
)

TINY_ROOT_NAME = "tiny"
"""Tiny files go under `<models_dir>/tiny/`."""

# Relative paths, identical to the real layout.
DIT_FILE = "MAILAND/majicflus_v1/majicflus_v134.safetensors"
FLUX_DIR = "black-forest-labs/FLUX.1-dev"
VAE_FILE = f"{FLUX_DIR}/ae.safetensors"
CLIP_FILE = f"{FLUX_DIR}/text_encoder/model.safetensors"
T5_DIR = f"{FLUX_DIR}/text_encoder_2"
T5_SHARDS = (f"{T5_DIR}/model-00001-of-00002.safetensors", f"{T5_DIR}/model-00002-of-00002.safetensors")
T5_INDEX = f"{T5_DIR}/model.safetensors.index.json"
T5_CONFIG = f"{T5_DIR}/config.json"
TOKENIZER_1_DIR = f"{FLUX_DIR}/tokenizer"
TOKENIZER_2_DIR = f"{FLUX_DIR}/tokenizer_2"

# ---------------------------------------------------------------------------------------------------------------------
# Sizes. Real values in comments.
DIT_DIM = 64  # 3072
DIT_HEADS = 2  # 24 (head dim 32 here, 128 real)
DIT_ROPE_AXES = (8, 12, 12)  # (16, 56, 56); must sum to the head dim
DIT_DOUBLE_BLOCKS = 2  # 19
DIT_SINGLE_BLOCKS = 2  # 38
DIT_TIMESTEP_DIM = 256  # 256
CLIP_DIM = 32  # 768; also the DiT's pooled input width (768 real)
CLIP_HEADS = 2  # 12
CLIP_LAYERS = 2  # 12; at least 2, or FluxTextEncoderClip's clip_skip=2 never sets hidden_states
CLIP_FFN = 64  # 3072
CLIP_POSITIONS = 77  # 77: the pipeline pads CLIP input to 77 tokens
T5_DIM = 32  # 4096; also the DiT's context input width (4096 real)
T5_HEADS = 2  # 64
T5_HEAD_DIM = 16  # 64
T5_LAYERS = 2  # 24
T5_FFN = 64  # 10240
VAE_CHANNELS = (8, 16, 32, 32)  # (128, 256, 512, 512); last two equal, as in the real one (same shortcut positions)
VAE_GROUPS = 8  # 32
VAE_LATENT_CHANNELS = 16  # 16: the pipeline draws 16-channel noise at 1/8 of the picture size

WEIGHT_STD_FLOOR = 0.02  # smaller weights fall into float8_e4m3fn subnormals and lose most of their precision
BIAS_STD = 0.02
_SEED = 20240801  # fixed: the same bytes on every run


# ---------------------------------------------------------------------------------------------------------------------
# Tiny model classes: DiffSynth's classes with tiny constructors.


class TinyFluxDiT(FluxDiT):
    """FluxDiT at 64 wide, 2 heads, 2 double + 2 single blocks; forward and helpers are DiffSynth's."""

    def __init__(self, disable_guidance_embedder: bool = False, input_dim: int = 64, num_blocks: int = DIT_DOUBLE_BLOCKS):
        torch.nn.Module.__init__(self)  # FluxDiT.__init__ hard-codes the real sizes
        dim = DIT_DIM
        self.pos_embedder = RoPEEmbedding(dim, 10000, list(DIT_ROPE_AXES))
        self.time_embedder = TimestepEmbeddings(DIT_TIMESTEP_DIM, dim)
        self.guidance_embedder = None if disable_guidance_embedder else TimestepEmbeddings(DIT_TIMESTEP_DIM, dim)
        self.pooled_text_embedder = torch.nn.Sequential(
            torch.nn.Linear(CLIP_DIM, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim)
        )
        self.context_embedder = torch.nn.Linear(T5_DIM, dim)
        self.x_embedder = torch.nn.Linear(input_dim, dim)
        self.blocks = torch.nn.ModuleList([FluxJointTransformerBlock(dim, DIT_HEADS) for _ in range(num_blocks)])
        self.single_blocks = torch.nn.ModuleList(
            [FluxSingleTransformerBlock(dim, DIT_HEADS) for _ in range(DIT_SINGLE_BLOCKS)]
        )
        self.final_norm_out = AdaLayerNormContinuous(dim)
        self.final_proj_out = torch.nn.Linear(dim, 64)  # 64 = 16 latent channels x 2x2 patch
        self.input_dim = input_dim


class TinyFluxTextEncoderClip(FluxTextEncoderClip):
    """FluxTextEncoderClip at 32 wide, 2 heads, 2 layers, a 520-token vocabulary."""

    def __init__(self, vocab_size: int | None = None):
        vocab_size = clip_vocab_size() if vocab_size is None else vocab_size
        super().__init__(embed_dim=CLIP_DIM, vocab_size=vocab_size, max_position_embeddings=CLIP_POSITIONS,
                         num_encoder_layers=CLIP_LAYERS, encoder_intermediate_size=CLIP_FFN)
        # DiffSynth's CLIPEncoderLayer defaults to 12 heads of 64: rebuild the layers with tiny attention.
        self.encoders = torch.nn.ModuleList([
            CLIPEncoderLayer(CLIP_DIM, CLIP_FFN, num_heads=CLIP_HEADS, head_dim=CLIP_DIM // CLIP_HEADS)
            for _ in range(CLIP_LAYERS)
        ])


def t5_config_dict() -> dict:
    """The tiny T5's config (also written as text_encoder_2/config.json); the real one with tiny sizes."""
    return {
        "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0,
        "d_ff": T5_FFN,
        "d_kv": T5_HEAD_DIM,
        "d_model": T5_DIM,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "dtype": "bfloat16",
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": T5_LAYERS,
        "num_heads": T5_HEADS,
        "num_layers": T5_LAYERS,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": len(t5_pieces()),
    }


class TinyFluxTextEncoderT5(FluxTextEncoderT5):
    """FluxTextEncoderT5 (a transformers T5EncoderModel) at d_model 32, 2 heads, 2 layers."""

    def __init__(self):
        # FluxTextEncoderT5.__init__ takes no config: call the T5EncoderModel constructor it wraps.
        super(FluxTextEncoderT5, self).__init__(T5Config(**t5_config_dict()))


def _vae_encoder_blocks(channels: tuple[int, ...], groups: int, use_conv_attention: bool) -> list[torch.nn.Module]:
    c0, c1, c2, c3 = channels
    res = lambda i, o: ResnetBlock(i, o, groups=groups, eps=1e-6)  # noqa: E731
    return [
        res(c0, c0), res(c0, c0), DownSampler(c0, padding=0, extra_padding=True),
        res(c0, c1), res(c1, c1), DownSampler(c1, padding=0, extra_padding=True),
        res(c1, c2), res(c2, c2), DownSampler(c2, padding=0, extra_padding=True),
        res(c2, c3), res(c3, c3),
        res(c3, c3),
        VAEAttentionBlock(1, c3, c3, 1, norm_num_groups=groups, eps=1e-6, use_conv_attention=use_conv_attention),
        res(c3, c3),
    ]


def _vae_decoder_blocks(channels: tuple[int, ...], groups: int, use_conv_attention: bool) -> list[torch.nn.Module]:
    c0, c1, c2, c3 = channels
    res = lambda i, o: ResnetBlock(i, o, groups=groups, eps=1e-6)  # noqa: E731
    return [
        res(c3, c3),
        VAEAttentionBlock(1, c3, c3, 1, norm_num_groups=groups, eps=1e-6, use_conv_attention=use_conv_attention),
        res(c3, c3),
        res(c3, c3), res(c3, c3), res(c3, c3), UpSampler(c3),
        res(c3, c2), res(c2, c2), res(c2, c2), UpSampler(c2),
        res(c2, c1), res(c1, c1), res(c1, c1), UpSampler(c1),
        res(c1, c0), res(c0, c0), res(c0, c0),
    ]


class TinyFluxVAEEncoder(FluxVAEEncoder):
    """FluxVAEEncoder with channels 8/16/32/32 and GroupNorm(8); same block list and order as the real one."""

    def __init__(self, use_conv_attention: bool = True):
        torch.nn.Module.__init__(self)  # FluxVAEEncoder.__init__ hard-codes 128/256/512 channels and GroupNorm(32)
        self.scaling_factor = 0.3611
        self.shift_factor = 0.1159
        self.conv_in = torch.nn.Conv2d(3, VAE_CHANNELS[0], kernel_size=3, padding=1)
        self.blocks = torch.nn.ModuleList(_vae_encoder_blocks(VAE_CHANNELS, VAE_GROUPS, use_conv_attention))
        self.conv_norm_out = torch.nn.GroupNorm(num_channels=VAE_CHANNELS[-1], num_groups=VAE_GROUPS, eps=1e-6)
        self.conv_act = torch.nn.SiLU()
        self.conv_out = torch.nn.Conv2d(VAE_CHANNELS[-1], 2 * VAE_LATENT_CHANNELS, kernel_size=3, padding=1)


class TinyFluxVAEDecoder(FluxVAEDecoder):
    """FluxVAEDecoder with channels 32/32/16/8 and GroupNorm(8); same block list and order as the real one."""

    def __init__(self, use_conv_attention: bool = True):
        torch.nn.Module.__init__(self)  # FluxVAEDecoder.__init__ hard-codes the real channels
        self.scaling_factor = 0.3611
        self.shift_factor = 0.1159
        self.conv_in = torch.nn.Conv2d(VAE_LATENT_CHANNELS, VAE_CHANNELS[-1], kernel_size=3, padding=1)
        self.blocks = torch.nn.ModuleList(_vae_decoder_blocks(VAE_CHANNELS, VAE_GROUPS, use_conv_attention))
        self.conv_norm_out = torch.nn.GroupNorm(num_channels=VAE_CHANNELS[0], num_groups=VAE_GROUPS, eps=1e-6)
        self.conv_act = torch.nn.SiLU()
        self.conv_out = torch.nn.Conv2d(VAE_CHANNELS[0], 3, kernel_size=3, padding=1)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer vocabularies.

_CLIP_MERGES = (("t", "h"), ("th", "e</w>"), ("r", "e"), ("re", "d</w>"), ("f", "o"), ("fo", "x</w>"))
_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


@cache
def clip_vocab() -> tuple[str, ...]:
    """CLIP's vocabulary structure, shrunk: the 256 byte symbols, the same with `</w>`, a few merges, then
    <|startoftext|> and <|endoftext|> last (the pipeline pools CLIP at argmax(input_ids): EOS must be the largest id)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merged = [a + b for a, b in _CLIP_MERGES]
    return tuple(symbols + [s + "</w>" for s in symbols] + merged + [_CLIP_BOS, _CLIP_EOS])


def clip_vocab_size() -> int:
    return len(clip_vocab())


_T5_SPECIALS = (("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2))  # (piece, score, sentencepiece type)
_T5_WORDS = ("the", "of", "and", "in", "red", "fox", "cat", "dog", "with")


@cache
def t5_pieces() -> tuple[tuple[str, float, int], ...]:
    """A small SentencePiece Unigram vocabulary in T5's order (<pad>=0, </s>=1, <unk>=2): whole words, word-initial
    letters and bare characters, so any ASCII prompt tokenizes without <unk>. Type 1 = normal piece."""
    lower = "abcdefghijklmnopqrstuvwxyz"
    pieces = list(_T5_SPECIALS) + [("▁", -2.0, 1)]
    pieces += [(f"▁{w}", -4.0 - i / 10, 1) for i, w in enumerate(_T5_WORDS)]
    pieces += [(f"▁{c}", -7.0, 1) for c in lower]
    pieces += [(c, -8.0, 1) for c in lower + lower.upper() + "0123456789"]
    pieces += [(c, -9.0, 1) for c in ".,!?'-:;()\"/"]
    return tuple(pieces)


# ---------------------------------------------------------------------------------------------------------------------
# File key names, derived from DiffSynth's converters.


TinyModelError = KeyNameError  # the tiny model's naming no longer matches DiffSynth's converters


def _dit_file_shapes() -> dict[str, tuple[int, ...]]:
    return dit_file_shapes(TinyFluxDiT, DIT_DOUBLE_BLOCKS, DIT_SINGLE_BLOCKS)


def _vae_file_shapes() -> dict[str, tuple[int, ...]]:
    return vae_file_shapes(TinyFluxVAEEncoder, TinyFluxVAEDecoder)


def _clip_file_shapes() -> dict[str, tuple[int, ...]]:
    vocab = clip_vocab_size()
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=CLIP_DIM, intermediate_size=CLIP_FFN,
                            num_hidden_layers=CLIP_LAYERS, num_attention_heads=CLIP_HEADS,
                            max_position_embeddings=CLIP_POSITIONS, projection_dim=CLIP_DIM,
                            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return clip_file_shapes(lambda: CLIPTextModel(config))


def _t5_file_shapes() -> dict[str, tuple[int, ...]]:
    return t5_file_shapes(TinyFluxTextEncoderT5)


_Shapes = dict[str, tuple[int, ...]]
_Converter = Callable[[dict], dict]

# part -> (its file's key -> shape, and each (converter, model class) DiffSynth loads that file with)
_PARTS: dict[str, tuple[Callable[[], _Shapes], tuple[tuple[_Converter, type[torch.nn.Module]], ...]]] = {
    "dit": (_dit_file_shapes, ((FluxDiTStateDictConverter, TinyFluxDiT),)),
    "clip": (_clip_file_shapes, ((FluxTextEncoderClipStateDictConverter, TinyFluxTextEncoderClip),)),
    "t5": (_t5_file_shapes, ((FluxTextEncoderT5StateDictConverter, TinyFluxTextEncoderT5),)),
    "vae": (_vae_file_shapes, ((FluxVAEEncoderStateDictConverter, TinyFluxVAEEncoder),
                               (FluxVAEDecoderStateDictConverter, TinyFluxVAEDecoder))),
}
_PART_PATHS = {"dit": DIT_FILE, "clip": CLIP_FILE, "t5": T5_DIR, "vae": VAE_FILE}


@cache
def _file_shapes(part: str) -> Mapping[str, tuple[int, ...]]:
    return MappingProxyType(_PARTS[part][0]())


@cache
def tiny_hashes() -> Mapping[str, str]:
    """Relative path (the text_encoder_2 folder for the T5 shards) -> the hash DiffSynth computes for it
    (`hash_model_file`: md5 over key names and shapes; computed here without files)."""
    result = {}
    for part, rel in _PART_PATHS.items():
        keys = {k: list(v) for k, v in _file_shapes(part).items()}
        result[rel] = hashlib.md5(convert_keys_dict_to_single_str(keys).encode("UTF-8")).hexdigest()
    return MappingProxyType(result)


def tiny_hashes_by_part() -> Mapping[str, str]:
    """The same hashes keyed "dit", "clip", "t5", "vae" (the keys of `engine.weights.ModelFiles.hashes`)."""
    by_path = tiny_hashes()
    return MappingProxyType({part: by_path[rel] for part, rel in _PART_PATHS.items()})


def __getattr__(name: str):
    # TINY_HASHES (= tiny_hashes()) is computed on first use (it builds meta models), not at import.
    if name == "TINY_HASHES":
        return tiny_hashes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Weights.


def _is_norm_scale(name: str) -> bool:
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return "norm" in module and name.endswith((".weight", ".scale"))


def _random_weights(part: str) -> dict[str, torch.Tensor]:
    """Deterministic float32 tensors for a part's file keys: norm scales ≈1, biases small, matrices scaled by fan-in
    (at least WEIGHT_STD_FLOOR, so float8 storage keeps them out of the subnormal range)."""
    generator = torch.Generator().manual_seed(_SEED + zlib.crc32(part.encode()))
    tensors = {}
    for name in sorted(_file_shapes(part)):
        shape = _file_shapes(part)[name]
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if len(shape) == 1:
            tensors[name] = 1.0 + BIAS_STD * noise if _is_norm_scale(name) else BIAS_STD * noise
        else:
            fan_in = math.prod(shape[1:])
            tensors[name] = max(WEIGHT_STD_FLOOR, fan_in ** -0.5) * noise
    return tensors


def _check_round_trip(part: str, tensors: dict[str, torch.Tensor]) -> None:
    """What DiffSynth will do with this file: each converter must give exactly its model's keys and shapes."""
    for converter, model_class in _PARTS[part][1]:
        converted = {k: tuple(v.shape) for k, v in converter(dict(tensors)).items()}
        expected = meta_shapes(model_class)
        if converted != expected:
            diff = sorted(set(converted.items()) ^ set(expected.items()))
            raise TinyModelError(f"{part}: {converter.__name__} does not give {model_class.__name__}: {diff[:5]}")


def _safetensors_bytes(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> bytes:
    from safetensors.torch import save

    return save({k: v.to(dtype).contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def _json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _weight_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    weights = {part: _random_weights(part) for part in _PARTS}
    for part, tensors in weights.items():
        _check_round_trip(part, tensors)
    files[DIT_FILE] = _safetensors_bytes(weights["dit"], torch.float8_e4m3fn)
    files[CLIP_FILE] = _safetensors_bytes(weights["clip"], torch.bfloat16)
    files[VAE_FILE] = _safetensors_bytes(weights["vae"], torch.bfloat16)
    # T5 shards like the real repository's: embeddings and the first half of the blocks, then the rest.
    first_half = [f"encoder.block.{i}." for i in range(T5_LAYERS // 2)]
    t5 = weights["t5"]
    shard_1 = {k: v for k, v in t5.items() if k == "shared.weight" or k.startswith(tuple(first_half))}
    shard_2 = {k: v for k, v in t5.items() if k not in shard_1}
    files[T5_SHARDS[0]] = _safetensors_bytes(shard_1, torch.bfloat16)
    files[T5_SHARDS[1]] = _safetensors_bytes(shard_2, torch.bfloat16)
    weight_map = {k: Path(T5_SHARDS[0]).name for k in shard_1} | {k: Path(T5_SHARDS[1]).name for k in shard_2}
    total_size = sum(v.numel() * torch.finfo(torch.bfloat16).bits // 8 for v in t5.values())
    files[T5_INDEX] = _json_bytes({"metadata": {"total_size": total_size}, "weight_map": weight_map})
    files[T5_CONFIG] = _json_bytes(t5_config_dict())
    return files


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer files.


def _clip_tokenizer_files() -> dict[str, bytes]:
    vocab = clip_vocab()
    special = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(len(vocab) - 2): {"content": _CLIP_BOS, **special, "special": True},
            str(len(vocab) - 1): {"content": _CLIP_EOS, **special, "special": True},
        },
        "bos_token": _CLIP_BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": _CLIP_EOS,
        "errors": "replace",
        "model_max_length": CLIP_POSITIONS,
        "pad_token": _CLIP_EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _CLIP_EOS,
    }
    special_map = {"bos_token": {"content": _CLIP_BOS, **special}, "eos_token": {"content": _CLIP_EOS, **special},
                   "pad_token": _CLIP_EOS, "unk_token": {"content": _CLIP_EOS, **special}}
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _CLIP_MERGES)
    return {
        f"{TOKENIZER_1_DIR}/vocab.json": (json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False)
                                          + "\n").encode("utf-8"),
        f"{TOKENIZER_1_DIR}/merges.txt": merges.encode("utf-8"),
        f"{TOKENIZER_1_DIR}/tokenizer_config.json": _json_bytes(config),
        f"{TOKENIZER_1_DIR}/special_tokens_map.json": _json_bytes(special_map),
    }


def _t5_tokenizer_json() -> bytes:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    pieces = t5_pieces()
    tokenizer = Tokenizer(Unigram([(p, s) for p, s, _ in pieces], unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, _ in _T5_SPECIALS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    return (json.dumps(json.loads(tokenizer.to_str()), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _protobuf_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are encoded as 64-bit two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _protobuf_field(number: int, value) -> bytes:
    import struct

    if isinstance(value, float):
        return _protobuf_varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bool, int)):
        return _protobuf_varint(number << 3) + _protobuf_varint(int(value))
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _protobuf_varint(number << 3 | 2) + _protobuf_varint(len(data)) + data


def _spiece_model() -> bytes:
    """The same vocabulary as a SentencePiece ModelProto (sentencepiece_model.proto: pieces=1 {piece=1, score=2,
    type=3}, trainer_spec=2 {model_type=3 (1 = Unigram), vocab_size=4, unk_id=40, bos_id=41, eos_id=42, pad_id=43},
    normalizer_spec=3 {name=1, add_dummy_prefix=3, remove_extra_whitespaces=4, escape_whitespaces=5}). Encoded by
    hand because neither sentencepiece nor protobuf is a dependency; transformers reads tokenizer.json first."""
    pieces = b"".join(
        _protobuf_field(1, _protobuf_field(1, p) + _protobuf_field(2, float(s)) + _protobuf_field(3, t))
        for p, s, t in t5_pieces())
    trainer = (_protobuf_field(3, 1) + _protobuf_field(4, len(t5_pieces())) + _protobuf_field(40, 2)
               + _protobuf_field(41, -1) + _protobuf_field(42, 1) + _protobuf_field(43, 0))
    normalizer = (_protobuf_field(1, "identity") + _protobuf_field(3, True) + _protobuf_field(4, True)
                  + _protobuf_field(5, True))
    return pieces + _protobuf_field(2, trainer) + _protobuf_field(3, normalizer)


def _t5_tokenizer_files() -> dict[str, bytes]:
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "add_prefix_space": True,
        "added_tokens_decoder": {str(i): {"content": p, **special} for i, (p, _, _) in enumerate(_T5_SPECIALS)},
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": 0,  # transformers 5 would otherwise add 100 <extra_id_*> tokens the tiny embedding lacks
        "legacy": True,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    no_special = {k: v for k, v in special.items() if k != "special"}
    special_map = {"eos_token": {"content": "</s>", **no_special}, "pad_token": {"content": "<pad>", **no_special},
                   "unk_token": {"content": "<unk>", **no_special}}
    return {
        f"{TOKENIZER_2_DIR}/tokenizer.json": _t5_tokenizer_json(),
        f"{TOKENIZER_2_DIR}/spiece.model": _spiece_model(),
        f"{TOKENIZER_2_DIR}/tokenizer_config.json": _json_bytes(config),
        f"{TOKENIZER_2_DIR}/special_tokens_map.json": _json_bytes(special_map),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Writing.


def tiny_file_contents() -> dict[str, bytes]:
    """Every tiny file: relative path -> exact bytes (deterministic)."""
    return {**_weight_files(), **_clip_tokenizer_files(), **_t5_tokenizer_files()}


def tiny_file_names() -> tuple[str, ...]:
    """Relative paths of every file `write_tiny_model` writes."""
    tokenizer_files = [*_clip_tokenizer_files(), *_t5_tokenizer_files()]
    return (DIT_FILE, CLIP_FILE, *T5_SHARDS, T5_INDEX, T5_CONFIG, VAE_FILE, *tokenizer_files)


def _is_complete(root: Path) -> bool:
    """All files present and the weights are the expected ones (safetensors headers only: fast)."""
    from diffsynth.core.loader.file import hash_model_file

    if not all((root / rel).is_file() for rel in tiny_file_names()):
        return False
    expected = tiny_hashes()
    try:
        found = {
            DIT_FILE: hash_model_file(str(root / DIT_FILE)),
            CLIP_FILE: hash_model_file(str(root / CLIP_FILE)),
            T5_DIR: hash_model_file([str(root / rel) for rel in T5_SHARDS]),
            VAE_FILE: hash_model_file(str(root / VAE_FILE)),
        }
    except Exception:  # unreadable header: regenerate
        return False
    return found == dict(expected)


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder + rename: a crash never leaves a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; these are ordinary shareable model files
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_tiny_model(root: Path) -> None:
    """Write the tiny model under `root` in the real layout. Idempotent and deterministic (same bytes every time);
    does nothing when the files are already there and complete; files with other contents are replaced."""
    root = Path(root)
    if _is_complete(root):
        return
    for rel, data in tiny_file_contents().items():
        path = root / rel
        if path.is_file() and path.read_bytes() == data:
            continue
        _write_atomically(path, data)


# ---------------------------------------------------------------------------------------------------------------------
# Registration with DiffSynth.

_CONVERTERS = "diffsynth.utils.state_dict_converters"
_REAL_CLASSES = {
    TinyFluxDiT: "diffsynth.models.flux_dit.FluxDiT",
    TinyFluxTextEncoderClip: "diffsynth.models.flux_text_encoder_clip.FluxTextEncoderClip",
    TinyFluxTextEncoderT5: "diffsynth.models.flux_text_encoder_t5.FluxTextEncoderT5",
    TinyFluxVAEEncoder: "diffsynth.models.flux_vae.FluxVAEEncoder",
    TinyFluxVAEDecoder: "diffsynth.models.flux_vae.FluxVAEDecoder",
}


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_tiny_models() -> None:
    """Make DiffSynth recognise the tiny files: add their hashes to `MODEL_CONFIGS` under the real model names and
    converters, and give the tiny classes the real classes' VRAM-management layer maps (otherwise each tiny model
    would be wrapped as one block, not layer by layer as the real ones are). Idempotent."""
    from diffsynth.configs import MODEL_CONFIGS, VRAM_MANAGEMENT_MODULE_MAPS

    hashes = tiny_hashes_by_part()
    entries = [
        (hashes["dit"], "flux_dit", TinyFluxDiT, f"{_CONVERTERS}.flux_dit.FluxDiTStateDictConverter"),
        (hashes["clip"], "flux_text_encoder_clip", TinyFluxTextEncoderClip,
         f"{_CONVERTERS}.flux_text_encoder_clip.FluxTextEncoderClipStateDictConverter"),
        (hashes["t5"], "flux_text_encoder_t5", TinyFluxTextEncoderT5,
         f"{_CONVERTERS}.flux_text_encoder_t5.FluxTextEncoderT5StateDictConverter"),
        (hashes["vae"], "flux_vae_encoder", TinyFluxVAEEncoder,
         f"{_CONVERTERS}.flux_vae.FluxVAEEncoderStateDictConverter"),
        (hashes["vae"], "flux_vae_decoder", TinyFluxVAEDecoder,
         f"{_CONVERTERS}.flux_vae.FluxVAEDecoderStateDictConverter"),
    ]
    for model_hash, model_name, cls, converter in entries:
        config = {"model_hash": model_hash, "model_name": model_name, "model_class": _class_path(cls),
                  "state_dict_converter": converter}
        if config not in MODEL_CONFIGS:
            MODEL_CONFIGS.append(config)
    for cls, real in _REAL_CLASSES.items():
        VRAM_MANAGEMENT_MODULE_MAPS[_class_path(cls)] = VRAM_MANAGEMENT_MODULE_MAPS[real]
