"""Turning level indices into viewable images: level 0 is black, level L-1 is white."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def levels_to_grid(images: Tensor, levels: int, nrow: int = 8, scale: int = 1, padding: int = 1) -> Tensor:
    """(N, H, W) or (N, 1, H, W) integer level images, of `levels` grey levels -> (3, H', W') float grid in [0, 1].

    `scale` enlarges each pixel to a scale x scale block (nearest) so a 16x16 image is visible.
    """
    images = images.reshape(images.shape[0], 1, *images.shape[-2:]).float() / (levels - 1)  # (N, 1, H, W)
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    # torchvision's make_grid, written out (the same pixels): importing torchvision takes longer
    # than sampling (it loads its models and ops). Mid grey (0.5) lines show against black and white.
    count, _, height, width = images.shape
    if count == 1:  # one image: no frame (as make_grid)
        return images[0].cpu().expand(3, -1, -1)
    pad, columns = padding * max(scale // 2, 1), min(nrow, count)
    rows = -(-count // columns)
    tiles = F.pad(images[:, 0].cpu(), (pad, 0, pad, 0), value=0.5)  # (N, H+pad, W+pad): each with its gap above and left
    tiles = torch.cat([tiles, tiles.new_full((rows * columns - count, *tiles.shape[1:]), 0.5)])  # empty cells
    grid = tiles.view(rows, columns, height + pad, width + pad).permute(0, 2, 1, 3).reshape(rows * (height + pad), -1)
    return F.pad(grid, (0, pad, 0, pad), value=0.5).expand(3, -1, -1)  # (3, H', W'), as make_grid gives


def save_grid(grid: Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # torchvision's save_image, written out (see levels_to_grid): [0, 1] floats to bytes, rounded.
    Image.fromarray(grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()).save(path)
    return path


def side_by_side(grids: list[Tensor], gap: int = 8) -> Tensor:
    """Join (3, H, W) grids left to right with a white gap; grids of unequal height are top-aligned."""
    height = max(g.shape[1] for g in grids)
    padded = [torch.nn.functional.pad(g, (0, gap, 0, height - g.shape[1]), value=1.0) for g in grids]
    return torch.cat(padded, dim=2)[:, :, :-gap]


def save_grid_and_levels(grid: Tensor, images: Tensor, out_dir: Path, stem: str,
                         label: str | None = None) -> tuple[Path, Path]:
    """Write the figure `<stem>[_label-<label>].png` and the level images as uint8 `.npy` beside it."""
    if label is not None:
        stem += f"_label-{label}"
    png = save_grid(grid, out_dir / f"{stem}.png")
    npy = out_dir / f"{stem}.npy"
    np.save(npy, images.cpu().numpy().astype(np.uint8))
    return png, npy
