"""Image files in, viewable grids out: reading one image file as uint8 grey or RGB
(`load_image`), and turning level indices into images (level 0 is black, level L-1 is white,
per channel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid, save_image

from pixelcnn.config import UserError


# MERGE NOTE (helper "data"): a minimal reader; helper "files" writes the full one (16-bit, palette,
# decompression bombs, ...) with this name and signature: keep theirs, and its white alpha background.
def load_image(path: str | Path, channels: int) -> np.ndarray:
    """One image file (its first frame) as uint8 (H, W) grey (channels=1) or (H, W, 3) RGB (channels=3);
    transparent pixels are composited on white."""
    try:
        with Image.open(path) as image:
            image.seek(0)
            if image.mode == "L" and channels == 1:
                return np.asarray(image).copy()
            rgba = np.asarray(image.convert("RGBA"))  # (H, W, 4)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        kind = Path(path).suffix.lstrip(".").upper() or "image"
        raise UserError(f"{path} is not a readable {kind} image ({err})") from None
    return to_channels(rgba[None], channels)[0]


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 1|3|4) -> (N, H, W) grey (channels=1) or (N, H, W, 3) RGB: alpha
    composited on white, grey repeated as RGB, RGB to grey by ITU-R 601-2 luma (PIL's "L")."""
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 4 and images.shape[-1] == 4:  # composite on white: rgb * a + 255 * (1 - a)
        rgb, alpha = images[..., :3].astype(np.uint32), images[..., 3:].astype(np.uint32)
        images = ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if images.ndim == 3:
        return images if channels == 1 else np.repeat(images[..., None], 3, axis=-1)
    if channels == 3:
        return images
    # ITU-R 601-2 luma in PIL's fixed point, so that an RGB array and the same image as a PNG agree.
    r, g, b = (images[..., k].astype(np.uint32) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def levels_to_grid(images: Tensor, levels: int, nrow: int = 8, scale: int = 1, padding: int = 1) -> Tensor:
    """(N, H, W) or (N, 1, H, W) grey, or (N, 3, H, W) RGB integer level images, of `levels` levels
    -> (3, H', W') float grid in [0, 1].

    `scale` enlarges each pixel to a scale x scale block (nearest) so a 16x16 image is visible.
    """
    images = images.reshape(images.shape[0], -1, *images.shape[-2:]).float() / (levels - 1)  # (N, C, H, W)
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    # pad_value 0.5 (mid grey) keeps the grid lines visible against both black and white pixels.
    return make_grid(images.cpu(), nrow=nrow, padding=padding * max(scale // 2, 1), pad_value=0.5)


def save_grid(grid: Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path


def side_by_side(grids: list[Tensor], gap: int = 8) -> Tensor:
    """Join (3, H, W) grids left to right with a white gap; grids of unequal height are top-aligned."""
    height = max(g.shape[1] for g in grids)
    padded = [torch.nn.functional.pad(g, (0, gap, 0, height - g.shape[1]), value=1.0) for g in grids]
    return torch.cat(padded, dim=2)[:, :, :-gap]


def save_grid_and_levels(grid: Tensor, images: Tensor, out_dir: Path, stem: str,
                         label: str | None = None) -> tuple[Path, Path]:
    """Write the figure `<stem>[_label-<label>].png` and the level images as uint8 `.npy` beside it
    ((N, H, W) grey, (N, C, H, W) colour)."""
    if label is not None:
        stem += f"_label-{label}"
    png = save_grid(grid, out_dir / f"{stem}.png")
    npy = out_dir / f"{stem}.npy"
    np.save(npy, images.cpu().numpy().astype(np.uint8))
    return png, npy
