"""The real weight files' key names and shapes, derived from DiffSynth's own classes and converters.

One recipe (shared notes weights-layout.md §7) serves both the tiny test model (engine/tiny.py, small classes) and
the full-size benchmark files (bench/weights.py, the real classes): candidate file names are pushed through the
converter DiffSynth loads that file with, and must cover the model's keys one to one. So the names follow DiffSynth:
if an upgrade changes a converter, this fails loudly instead of writing files DiffSynth would not recognise.
"""

from __future__ import annotations

from typing import Callable

import torch

Shapes = dict[str, tuple[int, ...]]

DIT_PREFIX = "model.diffusion_model."
"""MajicFLUX's file prefixes every BFL DiT key with this."""


class KeyNameError(RuntimeError):
    """The file naming no longer matches DiffSynth's converters (a DiffSynth upgrade changed them)."""


def meta_shapes(module_factory: Callable[[], torch.nn.Module]) -> Shapes:
    """Parameter name -> shape of a module built on the meta device (allocates nothing, even at full size)."""
    with torch.device("meta"):
        module = module_factory()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def invert_rename(converter: Callable[[dict], dict], candidates: list[str], model_shapes: Shapes) -> Shapes:
    """Push candidate file names through a renaming converter (each name as its own value), keep those it maps, and
    require a one-to-one cover of the model's keys. Returns file name -> shape."""
    renamed = converter({name: name for name in candidates})
    if set(renamed) != set(model_shapes) or len(set(renamed.values())) != len(renamed):
        missing = sorted(set(model_shapes) - set(renamed))
        extra = sorted(set(renamed) - set(model_shapes))
        raise KeyNameError(f"{converter.__name__}: not one-to-one (missing {missing[:5]}, extra {extra[:5]})")
    return {file_name: model_shapes[model_name] for model_name, file_name in renamed.items()}


def bfl_dit_names(double_blocks: int, single_blocks: int) -> list[str]:
    """BFL ("civitai") names of a Flux DiT with that many blocks, without MajicFLUX's prefix."""
    names = [f"{m}.{p}" for m in ("img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1",
                                  "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
                                  "guidance_in.out_layer", "vector_in.in_layer", "vector_in.out_layer")
             for p in ("weight", "bias")]
    double = ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
              "attn.norm.query_norm.scale", "attn.norm.key_norm.scale", "mlp.0.weight", "mlp.0.bias",
              "mlp.2.weight", "mlp.2.bias", "mod.lin.weight", "mod.lin.bias"]
    single = ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "modulation.lin.weight",
              "modulation.lin.bias", "norm.query_norm.scale", "norm.key_norm.scale"]
    names += [f"double_blocks.{i}.{side}_{s}" for i in range(double_blocks) for side in ("img", "txt")
              for s in double]
    names += [f"single_blocks.{i}.{s}" for i in range(single_blocks) for s in single]
    return names


def bfl_vae_candidates(side: str) -> list[str]:
    """Every plausible BFL autoencoder name for `side` ("encoder"/"decoder"); the converter keeps the real ones."""
    level, sampler = ("down", "downsample") if side == "encoder" else ("up", "upsample")
    resnet = ("norm1", "conv1", "norm2", "conv2", "nin_shortcut")
    modules = ["conv_in", "conv_out", "norm_out", "mid.attn_1.norm", "mid.attn_1.q", "mid.attn_1.k",
               "mid.attn_1.v", "mid.attn_1.proj_out"]
    modules += [f"mid.block_{b}.{r}" for b in (1, 2) for r in resnet]
    modules += [f"{level}.{i}.block.{j}.{r}" for i in range(4) for j in range(3) for r in resnet]
    modules += [f"{level}.{i}.{sampler}.conv" for i in range(4)]
    return [f"{side}.{m}.{p}" for m in modules for p in ("weight", "bias")]


def dit_file_shapes(dit_factory: Callable[[], torch.nn.Module], double_blocks: int, single_blocks: int) -> Shapes:
    """The MajicFLUX file's keys: BFL names with the prefix, shaped like `dit_factory()`'s parameters."""
    from diffsynth.utils.state_dict_converters.flux_dit import FluxDiTStateDictConverter

    shapes = invert_rename(FluxDiTStateDictConverter, bfl_dit_names(double_blocks, single_blocks),
                           meta_shapes(dit_factory))
    return {DIT_PREFIX + k: v for k, v in shapes.items()}


def vae_file_shapes(encoder_factory: Callable[[], torch.nn.Module],
                    decoder_factory: Callable[[], torch.nn.Module]) -> Shapes:
    """`ae.safetensors`: BFL `encoder.*` + `decoder.*` names (one file feeds both DiffSynth models)."""
    from diffsynth.utils.state_dict_converters.flux_vae import (
        FluxVAEDecoderStateDictConverter,
        FluxVAEEncoderStateDictConverter,
    )

    encoder = invert_rename(FluxVAEEncoderStateDictConverter, bfl_vae_candidates("encoder"),
                            meta_shapes(encoder_factory))
    decoder = invert_rename(FluxVAEDecoderStateDictConverter, bfl_vae_candidates("decoder"),
                            meta_shapes(decoder_factory))
    return {**encoder, **decoder}


def clip_file_shapes(clip_factory: Callable[[], torch.nn.Module]) -> Shapes:
    """HF CLIPTextModel names with the `text_model.` prefix that the real file has (transformers 5 drops it), and
    no position_ids (a non-persistent buffer, absent from the real file)."""
    shapes = meta_shapes(clip_factory)
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in shapes.items() if not k.endswith("position_ids")}


def t5_file_shapes(t5_factory: Callable[[], torch.nn.Module]) -> Shapes:
    """HF T5EncoderModel names: `shared.weight` kept, the tied `encoder.embed_tokens.weight` left out (as in the
    real shards; DiffSynth's converter copies it back)."""
    shapes = meta_shapes(t5_factory)
    return {k: v for k, v in shapes.items() if k != "encoder.embed_tokens.weight"}
