"""Images in and out: any image file read as the 0..255 grey or RGB values it shows (`load_image`),
and level indices as viewable grids (level 0 is black, level L-1 is white, per channel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from pixelcnn.ops.errors import UserError
from pixelcnn.ops.files import atomic_write

# Pixels an image file may have: its size is read from the header and checked before any decoding,
# since a small compressed file can decode to gigabytes (a 20000x20000 PNG of 400 KB). 2**25 (33.5
# megapixels, an 8000x4000 photo) is far more than any image this project models needs, and its
# decoded RGBA copy takes 128 MB.
MAX_IMAGE_PIXELS = 2**25


def load_image(path: str | Path, channels: int = 1) -> np.ndarray:
    """The image file at `path` (any format Pillow reads; the first frame; EXIF rotation applied)
    as the uint8 values 0..255 it shows: (H, W) grey with `channels`=1, (H, W, 3) RGB with 3. Each
    Pillow mode by what its values mean: 1 is 0 or 255, P goes through its palette, 16-bit grey
    (I;16*, or I within 0..65535) is scaled to 0..255 (v / 257, rounded), other colour modes (CMYK,
    YCbCr, ...) through Pillow's RGB; grey from RGB is ITU-R 601-2 luma (Pillow's "L"). Alpha (LA,
    RGBA, PA, La, RGBa, or a transparent colour) is composited on WHITE, the background icons and
    drawings are made for (`to_channels`, as for arrays). A file that is not an image, is damaged,
    is over MAX_IMAGE_PIXELS (by its header), or has pixels of no defined range (F, I outside 16
    bits) is a UserError naming it.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                raise UserError(f"{path} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS / 1e6:.1f}-"
                                "megapixel limit (pixelcnn.ops.images.MAX_IMAGE_PIXELS): scale it down first")
            shown = _grey_or_rgb(ImageOps.exif_transpose(image), path)
            return np.array(shown.convert("L" if channels == 1 else "RGB"))  # a copy: writable
    except UserError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own limit, checked as it opens a far larger one
        raise UserError(f"{path} has too many pixels to decode ({err})") from None
    except Exception as err:  # noqa: BLE001 - not an image, truncated, a mode Pillow cannot convert: one line
        kind = f"{Path(path).suffix.lstrip('.').upper()} " if Path(path).suffix else ""  # "a readable PNG image"
        unknown = isinstance(err, UnidentifiedImageError)
        reason = "not an image format Pillow knows" if unknown else f"{type(err).__name__}: {err}"
        raise UserError(f"{path} is not a readable {kind}image ({reason})") from None


def _grey_or_rgb(image: Image.Image, path: str | Path) -> Image.Image:
    """`image` as a mode L or RGB image of the 0..255 values it shows (see `load_image`)."""
    if image.mode == "F":
        raise UserError(f"{path} has 32-bit float pixels, whose range is not defined: save it with 8- or 16-bit pixels")
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # "I": how older Pillows open 16-bit PNGs
        values = np.asarray(image).astype(np.int64)  # (H, W)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UserError(f"{path} has 32-bit pixels {values.min()}..{values.max()}, outside 16 bits (0..65535): "
                            "save it with 8- or 16-bit pixels")
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))  # round(v / 257)
    if image.mode in ("La", "RGBa"):  # premultiplied alpha (v * a / 255): on white, add 255 - a
        values = np.asarray(image).astype(np.int64)  # (H, W, 2 or 4)
        on_white = (values[..., :-1] + 255 - values[..., -1:]).clip(0, 255).astype(np.uint8)
        return Image.fromarray(on_white.squeeze(-1) if image.mode == "La" else on_white)
    if image.mode in ("LA", "RGBA", "PA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"))  # (H, W, 4); palette and tRNS applied
        return Image.fromarray(to_channels(rgba[None], 3)[0])  # on white
    return image.convert("L" if image.mode in ("1", "L") else "RGB")

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
    images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    # torchvision's make_grid, written out (the same pixels): importing torchvision takes longer
    # than sampling (it loads its models and ops). Mid grey (0.5) lines show against black and white.
    count, channels, height, width = images.shape
    pad = padding * max(scale // 2, 1) if count > 1 else 0  # one image: no frame (as make_grid)
    columns = min(nrow, count)
    rows = -(-count // columns)
    # (rows * columns, C, H+pad, W+pad): each image with its gap above and left, then the empty cells.
    tiles = F.pad(images.cpu(), (pad, 0, pad, 0, 0, 0, 0, rows * columns - count), value=0.5)
    grid = tiles.view(rows, columns, channels, height + pad, width + pad).permute(2, 0, 3, 1, 4)
    grid = grid.reshape(channels, rows * (height + pad), columns * (width + pad))
    return F.pad(grid, (0, pad, 0, pad), value=0.5).expand(3, -1, -1)  # (3, H', W'), as make_grid gives


def save_grid(grid: Tensor, path: str | Path) -> Path:
    # torchvision's save_image, written out (see levels_to_grid): [0, 1] floats to bytes, rounded.
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    with atomic_write(path) as file:
        Image.fromarray(pixels).save(file, format="png")
    return Path(path)


def side_by_side(grids: list[Tensor], gap: int = 8) -> Tensor:
    """Join (3, H, W) grids left to right with a white gap; grids of unequal height are top-aligned."""
    height = max(g.shape[1] for g in grids)
    padded = [F.pad(g, (0, gap, 0, height - g.shape[1]), value=1.0) for g in grids]
    return torch.cat(padded, dim=2)[:, :, :-gap]


def save_grid_and_levels(grid: Tensor, images: Tensor, out_dir: Path, stem: str,
                         label: str | None = None) -> tuple[Path, Path]:
    """Write the figure `<stem>[_label-<label>].png` and the level images as uint8 `.npy` beside it
    ((N, H, W) grey, (N, C, H, W) colour)."""
    if label is not None:
        stem += f"_label-{label}"
    png = save_grid(grid, out_dir / f"{stem}.png")
    npy = out_dir / f"{stem}.npy"
    with atomic_write(npy) as file:
        np.save(file, images.cpu().numpy().astype(np.uint8))
    return png, npy
