"""Turning level indices into viewable images: level 0 is black, level L-1 is white."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from pixelcnn.files import atomic_write


def levels_to_grid(images: Tensor, levels: int, nrow: int = 8, scale: int = 1, padding: int = 1) -> Tensor:
    """(N, H, W) or (N, 1, H, W) integer level images, of `levels` grey levels -> (3, H', W') float grid in [0, 1].

    `scale` enlarges each pixel to a scale x scale block (nearest) so a 16x16 image is visible.
    """
    images = images.reshape(images.shape[0], 1, *images.shape[-2:]).float() / (levels - 1)  # (N, 1, H, W)
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    # pad_value 0.5 (mid grey) keeps the grid lines visible against both black and white pixels.
    return make_grid(images.cpu(), nrow=nrow, padding=padding * max(scale // 2, 1), pad_value=0.5)


def save_grid(grid: Tensor, path: str | Path) -> Path:
    with atomic_write(path) as file:
        save_image(grid, file, format="png")
    return Path(path)


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
    with atomic_write(npy) as file:
        np.save(file, images.cpu().numpy().astype(np.uint8))
    return png, npy
