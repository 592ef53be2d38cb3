"""The VAE decode in overlapping tiles, when the residency plan needs it (an untiled 1024² decode would cost
resident units): about a quarter of the activation memory.

DiffSynth's own tiling (`TileWorker`) cuts tiles with `torch.nn.Unfold` at a fixed stride, so the last rows and
columns of a latent whose side is not tile + k * stride are in no tile at all, and come out NaN (832x1216: the
bottom 64 and right 192 pixels). Here the last tile of each row and column ends at the latent's edge instead, so
every position is covered; tiles are blended with DiffSynth's own border ramp."""

from __future__ import annotations

from typing import Callable

import torch


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Where the tiles along one side start: every `stride`, and a last one ending at the side's end."""
    if length <= tile:
        return [0]
    last = length - tile
    return sorted({*range(0, last, stride), last})


def border_ramp(height: int, width: int, border: int) -> torch.Tensor:
    """Per-pixel blending weight of one tile: 1 inside, rising linearly over `border` pixels from each edge (never
    0, so a pixel only one tile covers keeps that tile's value exactly)."""
    rows = torch.arange(height).unsqueeze(1)
    cols = torch.arange(width).unsqueeze(0)
    distance = torch.minimum(torch.minimum(rows + 1, height - rows), torch.minimum(cols + 1, width - cols))
    return (distance / max(border, 1)).clip(0, 1)


def decode_in_tiles(decode: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor, tile: int,
                    stride: int) -> torch.Tensor:
    """`decode(sample)`, computed tile by tile: tiles of `tile` latent pixels (the whole side where it is shorter)
    every `stride`, the last one flush with the edge, blended where they overlap. A latent within one tile is
    decoded whole."""
    height, width = sample.shape[-2:]
    if height <= tile and width <= tile:
        return decode(sample)
    tile_h, tile_w = min(tile, height), min(tile, width)
    total = weights = ramp = None
    scale = 1
    for top in tile_starts(height, tile, stride):
        for left in tile_starts(width, tile, stride):
            piece = decode(sample[..., top:top + tile_h, left:left + tile_w]).float()
            if total is None:
                scale = piece.shape[-2] // tile_h  # the decoder's upscaling (8 for Flux's VAE)
                total = piece.new_zeros((*piece.shape[:-2], height * scale, width * scale))
                weights = piece.new_zeros((height * scale, width * scale))
                ramp = border_ramp(piece.shape[-2], piece.shape[-1], stride // 2 * scale).to(piece.device)
            assert weights is not None and ramp is not None
            rows = slice(top * scale, (top + tile_h) * scale)
            cols = slice(left * scale, (left + tile_w) * scale)
            total[..., rows, cols] += piece * ramp
            weights[rows, cols] += ramp
            del piece
    assert total is not None and weights is not None
    return (total / weights).to(sample.dtype)
