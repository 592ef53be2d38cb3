"""The tiny Flux model: real file layout and key naming, determinism, hashes, and the real DiffSynth loading path
(float8 DiT storage) producing a picture on the CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine import tiny  # applies engine.compat, then imports diffsynth: a few seconds, once per session

from diffsynth.core.loader.file import hash_model_file  # noqa: E402  (only after engine.compat has run)

FLUX = "black-forest-labs/FLUX.1-dev"
# The real layout (shared/notes/weights-layout.md), written out independently of engine/tiny.py.
EXPECTED_FILES = [
    "MAILAND/majicflus_v1/majicflus_v134.safetensors",
    f"{FLUX}/ae.safetensors",
    f"{FLUX}/text_encoder/model.safetensors",
    f"{FLUX}/text_encoder_2/model-00001-of-00002.safetensors",
    f"{FLUX}/text_encoder_2/model-00002-of-00002.safetensors",
    f"{FLUX}/text_encoder_2/model.safetensors.index.json",
    f"{FLUX}/text_encoder_2/config.json",
    f"{FLUX}/tokenizer/vocab.json",
    f"{FLUX}/tokenizer/merges.txt",
    f"{FLUX}/tokenizer/special_tokens_map.json",
    f"{FLUX}/tokenizer/tokenizer_config.json",
    f"{FLUX}/tokenizer_2/tokenizer.json",
    f"{FLUX}/tokenizer_2/spiece.model",
    f"{FLUX}/tokenizer_2/special_tokens_map.json",
    f"{FLUX}/tokenizer_2/tokenizer_config.json",
]
T5_SHARDS = EXPECTED_FILES[3:5]

# Every key pattern of the real flux1-dev / MajicFLUX DiT (BFL names; N = block index), from weights-layout.md §3.
_DOUBLE = ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "attn.norm.query_norm.scale",
           "attn.norm.key_norm.scale", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mod.lin.weight",
           "mod.lin.bias"]
REAL_DIT_PATTERNS = (
    {f"{m}.{p}" for m in ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
                          "guidance_in.out_layer", "vector_in.in_layer", "vector_in.out_layer", "final_layer.linear",
                          "final_layer.adaLN_modulation.1") for p in ("weight", "bias")}
    | {f"double_blocks.N.{side}_{s}" for side in ("img", "txt") for s in _DOUBLE}
    | {f"single_blocks.N.{s}" for s in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
                                        "modulation.lin.weight", "modulation.lin.bias", "norm.query_norm.scale",
                                        "norm.key_norm.scale")}
)
# The real CLIP-L file's key patterns (HF CLIPTextModel with the `text_model.` prefix), weights-layout.md §4.
REAL_CLIP_PATTERNS = (
    {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
     "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}
    | {f"text_model.encoder.layers.N.{m}.{p}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                        "self_attn.out_proj", "layer_norm1", "layer_norm2",
                                                        "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
)


def _keys_and_dtypes(path: Path) -> dict[str, torch.dtype]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _pattern(key: str) -> str:
    return re.sub(r"^((?:double|single)_blocks|text_model\.encoder\.layers)\.\d+\.", r"\1.N.", key)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / tiny.TINY_ROOT_NAME
    tiny.write_tiny_model(path)
    return path


def test_all_files_written_in_the_real_layout(root):
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert written == sorted(EXPECTED_FILES)  # and no temp files left behind
    assert sum((root / f).stat().st_size for f in EXPECTED_FILES) < 5 * 1024 * 1024


def test_dit_is_stored_as_float8_on_disk_and_the_rest_as_bf16(root):
    assert set(_keys_and_dtypes(root / EXPECTED_FILES[0]).values()) == {"F8_E4M3"}
    for rel in EXPECTED_FILES[1:5]:
        assert set(_keys_and_dtypes(root / rel).values()) == {"BF16"}, rel


def test_dit_keys_are_prefixed_bfl_names_covering_every_real_pattern(root):
    keys = _keys_and_dtypes(root / EXPECTED_FILES[0])
    prefix = "model.diffusion_model."
    assert all(k.startswith(prefix) for k in keys)
    patterns = {_pattern(k[len(prefix):]) for k in keys}
    assert patterns == REAL_DIT_PATTERNS
    assert len(keys) == 20 + 24 * tiny.DIT_DOUBLE_BLOCKS + 8 * tiny.DIT_SINGLE_BLOCKS


def test_clip_keys_are_hf_names_with_text_model_prefix(root):
    keys = _keys_and_dtypes(root / f"{FLUX}/text_encoder/model.safetensors")
    assert {_pattern(k) for k in keys} == REAL_CLIP_PATTERNS
    assert not any("position_ids" in k or "text_projection" in k for k in keys)


def test_t5_shards_have_shared_weight_but_no_embed_tokens_and_a_matching_index(root):
    shard_keys = [set(_keys_and_dtypes(root / rel)) for rel in T5_SHARDS]
    assert shard_keys[0] and shard_keys[1] and not shard_keys[0] & shard_keys[1]
    keys = shard_keys[0] | shard_keys[1]
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys
    assert "encoder.final_layer_norm.weight" in keys
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in keys
    assert all(k == "shared.weight" or k.startswith("encoder.block.") or k == "encoder.final_layer_norm.weight"
               for k in keys)
    index = json.loads((root / f"{FLUX}/text_encoder_2/model.safetensors.index.json").read_text())
    expected_map = {k: Path(rel).name for rel, ks in zip(T5_SHARDS, shard_keys) for k in ks}
    assert index["weight_map"] == expected_map
    assert index["metadata"]["total_size"] == sum(
        t.numel() * 2 for rel in T5_SHARDS for t in _tensors(root / rel).values())
    config = json.loads((root / f"{FLUX}/text_encoder_2/config.json").read_text())
    assert config["architectures"] == ["T5EncoderModel"] and config["model_type"] == "t5"
    assert _tensors(root / T5_SHARDS[0])["shared.weight"].shape[0] == config["vocab_size"]


def test_vae_keys_are_bfl_autoencoder_names(root):
    keys = _keys_and_dtypes(root / f"{FLUX}/ae.safetensors")
    encoder = [k for k in keys if k.startswith("encoder.")]
    decoder = [k for k in keys if k.startswith("decoder.")]
    assert len(encoder) + len(decoder) == len(keys)
    assert (len(encoder), len(decoder)) == (106, 138)  # same structure as the real ae.safetensors
    assert "encoder.mid.attn_1.q.weight" in keys and "decoder.up.0.block.0.nin_shortcut.weight" in keys
    assert not any("quant_conv" in k for k in keys)


def test_weights_are_not_in_the_float8_subnormal_range(root):
    dit = _tensors(root / EXPECTED_FILES[0])
    matrices = [t.to(torch.float32) for k, t in dit.items() if t.dim() == 2]
    assert all(t.std() >= 0.015 for t in matrices)


def test_hashes_of_written_files_match_tiny_hashes(root):
    by_path = dict(tiny.TINY_HASHES)
    assert by_path == dict(tiny.tiny_hashes())
    assert set(by_path) == {EXPECTED_FILES[0], f"{FLUX}/text_encoder/model.safetensors", f"{FLUX}/text_encoder_2",
                            f"{FLUX}/ae.safetensors"}
    for rel, expected in by_path.items():
        target = [str(root / s) for s in T5_SHARDS] if rel.endswith("text_encoder_2") else str(root / rel)
        assert hash_model_file(target) == expected, rel
    assert len(set(by_path.values())) == 4
    by_part = dict(tiny.tiny_hashes_by_part())
    assert by_part == {"dit": by_path[EXPECTED_FILES[0]], "clip": by_path[f"{FLUX}/text_encoder/model.safetensors"],
                       "t5": by_path[f"{FLUX}/text_encoder_2"], "vae": by_path[f"{FLUX}/ae.safetensors"]}


def test_writing_again_elsewhere_gives_identical_bytes(root, tmp_path):
    tiny.write_tiny_model(tmp_path)
    for rel in EXPECTED_FILES:
        assert (tmp_path / rel).read_bytes() == (root / rel).read_bytes(), rel


def test_complete_files_are_left_alone_and_damaged_ones_are_rewritten(root, tmp_path):
    tiny.write_tiny_model(tmp_path)
    mtimes = {rel: (tmp_path / rel).stat().st_mtime_ns for rel in EXPECTED_FILES}
    tiny.write_tiny_model(tmp_path)
    assert {rel: (tmp_path / rel).stat().st_mtime_ns for rel in EXPECTED_FILES} == mtimes

    (tmp_path / EXPECTED_FILES[0]).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # a valid, empty file
    (tmp_path / f"{FLUX}/tokenizer_2/tokenizer.json").unlink()
    tiny.write_tiny_model(tmp_path)
    for rel in EXPECTED_FILES:
        assert (tmp_path / rel).read_bytes() == (root / rel).read_bytes(), rel


def test_converter_inversion_rejects_names_that_do_not_cover_the_model():
    from diffsynth.utils.state_dict_converters.flux_dit import FluxDiTStateDictConverter

    from engine import keynames

    names = keynames.bfl_dit_names(tiny.DIT_DOUBLE_BLOCKS, tiny.DIT_SINGLE_BLOCKS)
    shapes = keynames.meta_shapes(tiny.TinyFluxDiT)
    assert len(keynames.invert_rename(FluxDiTStateDictConverter, names, shapes)) == len(shapes)
    with pytest.raises(tiny.TinyModelError):
        keynames.invert_rename(FluxDiTStateDictConverter, names[:-1], shapes)


def test_tokenizer_vocabularies_have_unique_entries():
    pieces = [p for p, _, _ in tiny.t5_pieces()]
    assert len(set(pieces)) == len(pieces)
    assert len(set(tiny.clip_vocab())) == len(tiny.clip_vocab())


def test_registration_is_idempotent():
    from diffsynth.configs import MODEL_CONFIGS, VRAM_MANAGEMENT_MODULE_MAPS

    tiny.register_tiny_models()
    tiny.register_tiny_models()
    hashes = set(tiny.tiny_hashes().values())
    entries = [c for c in MODEL_CONFIGS if c["model_hash"] in hashes]
    assert sorted(c["model_name"] for c in entries) == sorted(
        ["flux_dit", "flux_text_encoder_clip", "flux_text_encoder_t5", "flux_vae_encoder", "flux_vae_decoder"])
    assert all(c["model_class"].startswith("engine.tiny.Tiny") for c in entries)
    assert (VRAM_MANAGEMENT_MODULE_MAPS["engine.tiny.TinyFluxDiT"]
            is VRAM_MANAGEMENT_MODULE_MAPS["diffsynth.models.flux_dit.FluxDiT"])


@pytest.fixture(scope="module")
def pipe(root):
    from diffsynth.pipelines.flux_image import FluxImagePipeline, ModelConfig

    tiny.register_tiny_models()
    fp8 = dict(offload_dtype=torch.float8_e4m3fn, offload_device="cpu", onload_dtype=torch.float8_e4m3fn,
               onload_device="cpu", preparing_dtype=torch.float8_e4m3fn, preparing_device="cpu",
               computation_dtype=torch.bfloat16, computation_device="cpu")
    return FluxImagePipeline.from_pretrained(
        torch_dtype=torch.bfloat16, device="cpu",
        model_configs=[
            ModelConfig(path=str(root / EXPECTED_FILES[0]), **fp8),
            ModelConfig(path=str(root / f"{FLUX}/text_encoder/model.safetensors"), **fp8),
            ModelConfig(path=[str(root / s) for s in T5_SHARDS], **fp8),
            ModelConfig(path=str(root / f"{FLUX}/ae.safetensors"), **fp8),
        ],
        tokenizer_1_config=ModelConfig(path=str(root / f"{FLUX}/tokenizer")),
        tokenizer_2_config=ModelConfig(path=str(root / f"{FLUX}/tokenizer_2")),
        vram_limit=None,
    )


def test_real_pipeline_loads_the_tiny_classes_with_float8_dit(pipe):
    assert type(pipe.dit) is tiny.TinyFluxDiT
    assert type(pipe.text_encoder_1) is tiny.TinyFluxTextEncoderClip
    assert type(pipe.text_encoder_2) is tiny.TinyFluxTextEncoderT5
    assert type(pipe.vae_encoder) is tiny.TinyFluxVAEEncoder and type(pipe.vae_decoder) is tiny.TinyFluxVAEDecoder
    assert {p.dtype for p in pipe.dit.parameters()} == {torch.float8_e4m3fn}
    # Layer-by-layer VRAM management, as for the real FluxDiT (not one wrapper around the whole model).
    assert type(pipe.dit.blocks[0].attn.a_to_qkv).__name__ == "AutoWrappedLinear"


def test_tokenizers_fit_the_tiny_encoders(pipe):
    clip_ids = pipe.tokenizer_1("a red fox")["input_ids"]
    assert clip_ids[-1] == max(clip_ids) == tiny.clip_vocab_size() - 1  # pooled at argmax: EOS must be largest
    t5_ids = pipe.tokenizer_2("A red fox, 42 cats!")["input_ids"]
    assert len(pipe.tokenizer_2) == pipe.text_encoder_2.config.vocab_size
    assert pipe.tokenizer_2.unk_token_id not in t5_ids and t5_ids[-1] == pipe.tokenizer_2.eos_token_id


def test_generates_a_deterministic_picture_per_seed(pipe):
    first = pipe(prompt="a red fox", seed=7, num_inference_steps=2, height=64, width=64)
    again = pipe(prompt="a red fox", seed=7, num_inference_steps=2, height=64, width=64)
    other = pipe(prompt="a red fox", seed=8, num_inference_steps=2, height=64, width=64)
    assert first.size == (64, 64) and first.mode == "RGB"
    a, b, c = (np.asarray(img, dtype=np.int16) for img in (first, again, other))
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 5
    assert a.std() > 5  # not a flat image
