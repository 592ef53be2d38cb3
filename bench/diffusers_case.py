"""Case (c): diffusers' FluxTransformer2DModel with its best low-VRAM setup for an 8-12 GB card, as a user would
pick it: fp8 layerwise casting (storage float8_e4m3fn, compute bf16; diffusers keeps norm/modulation layers bf16 by
default) plus group offloading at block level on a CUDA stream with pinned memory. Random weights (timing does
not depend on their values), FLUX.1-dev's config."""

from __future__ import annotations

import math

import torch

FLUX_DEV_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY_CONFIG = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(8, 12, 12))


def build_flux_transformer(device: str, *, tiny: bool = False) -> tuple[torch.nn.Module, float]:
    """The model with random weights, fp8 layerwise casting and group offloading enabled; returns it and the GiB of
    host memory it pinned."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**(TINY_CONFIG if tiny else FLUX_DEV_CONFIG))
    model = model.to(dtype=torch.bfloat16).to_empty(device=device)  # values drawn on the GPU: seconds, not minutes
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
            else:
                param.normal_(0.0, max(math.prod(param.shape[1:]) ** -0.5, 0.02), generator=generator)
    model.eval()
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    model.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()
        model.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=True,
                                   record_stream=True)
        pinned = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_pinned())
    else:  # the CPU check of this script: no streams, nothing to offload to
        pinned = 0
    return model, pinned / 1024**3


def dit_step_inputs(size: int, device: str, *, tiny: bool = False) -> dict:
    """One denoising step's inputs at size x size, batch 1, 512 text tokens (what DiffSynth feeds its DiT)."""
    config = TINY_CONFIG if tiny else FLUX_DEV_CONFIG
    tokens = (size // 16) ** 2
    text = 32 if tiny else 512
    bf16 = torch.bfloat16
    return dict(
        hidden_states=torch.randn(1, tokens, config["in_channels"], device=device, dtype=bf16),
        encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], device=device, dtype=bf16),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], device=device, dtype=bf16),
        timestep=torch.tensor([0.5], device=device, dtype=bf16),
        img_ids=torch.zeros(tokens, 3, device=device, dtype=bf16),
        txt_ids=torch.zeros(text, 3, device=device, dtype=bf16),
        guidance=torch.tensor([3.5], device=device, dtype=bf16),
    )
