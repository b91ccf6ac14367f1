"""Image completion (`python sample.py ckpt=... mode=complete rows=8`): keep the top `rows` rows
of test images and let the model draw the rest, several times per image.

An autoregressive model in raster order conditions each pixel on everything above it, so
completing the bottom of an image is exact sampling from p(bottom | top): the known pixels are
fed in instead of drawn. It uses the fast incremental sampler and its draw rule, so the
completed pixels follow softmax(logits / temperature) like `sample.py`'s images.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor, nn

from pixelcnn.config import UserError
from pixelcnn.data import NUM_CLASSES, setup_datamodule
from pixelcnn.generate import class_tag, parse_labels
from pixelcnn.images import levels_to_grid, save_grid_and_levels, side_by_side
from pixelcnn.sampling import draw_levels, draw_uniforms, eval_mode

MAX_IMAGES = 16  # test images per figure: one figure row each, so n is capped to keep it readable


@torch.no_grad()
def complete_fast(net: nn.Module, known_levels: Tensor, rows: int, uniforms: Tensor, temperature: float = 1.0,
                  labels: Tensor | None = None) -> Tensor:
    """Keep rows [0, rows) of `known_levels` (B, H, W) and draw the others. -> (B, H, W) long

    Works for any network with `start_incremental`; `uniforms` (B, H*W) as from `draw_uniforms`
    (the entries of kept pixels are unused). The incremental protocol needs logits() and
    set_pixel() at every pixel in raster order, kept ones included, to fill its caches.
    """
    out = known_levels.long().clone()  # (B, H, W)
    batch, height, width = out.shape
    state = net.start_incremental(batch, height, width, labels)
    for i in range(height):
        for j in range(width):
            logits = state.logits(i, j)  # (B, L)
            if i >= rows:
                out[:, i, j] = draw_levels(logits, temperature, uniforms[:, i * width + j])
            state.set_pixel(i, j, out[:, i, j])
    return out


def pick_test_images(test_set: tuple[Tensor, Tensor], n: int, label: int | None) -> tuple[Tensor, Tensor]:
    """The first n test images, or the first n of class `label`. -> (N, H, W) long, (N,)"""
    images, labels = test_set[0].cpu(), test_set[1].cpu()
    if label is not None:
        images, labels = images[labels == label], labels[labels == label]
        if len(images) == 0:
            raise UserError(f"label={label}: the test split has no image of that class")
    return images[:n, 0].long(), labels[:n]


def run_completion(module, cfg: DictConfig, out_dir: Path) -> list[Path]:
    """Complete the first min(n, 16) test images `completions` times each; write a PNG figure (one
    row per image: original | kept rows, hidden ones mid-grey | completions) and the completions
    as .npy (N, completions, H, W) uint8 levels. Conditional models use the images' true labels.
    `cfg` has passed `config.validate` (rows >= 0, completions >= 1): only what depends on the
    model is checked here."""
    height = width = module.image_size
    rows, completions = cfg.rows, cfg.completions
    if rows > height:
        raise UserError(f"rows={rows} is invalid: it must be an integer in [0, {height}] "
                        f"(rows kept of this {height}px model's images)")
    if isinstance(cfg.temperature, ListConfig):
        raise UserError("mode=complete takes one temperature, not a list")
    if cfg.method != "fast":
        raise UserError(f"mode=complete uses the fast (incremental) sampler only: drop method={cfg.method}")
    if cfg.label == "all":
        raise UserError("mode=complete takes label=<one class> (test images of that class) or no label, not label=all")
    label = int(parse_labels(cfg.label, NUM_CLASSES, 1)[0][0]) if cfg.label is not None else None
    datamodule = setup_datamodule(cfg.data_root, module.image_size, module.levels)
    if cfg.n > MAX_IMAGES:
        print(f"mode=complete shows at most {MAX_IMAGES} test images (one figure row each): using {MAX_IMAGES}")
    originals, labels = pick_test_images(datamodule.test_set, min(cfg.n, MAX_IMAGES), label)  # (N, H, W)
    n = len(originals)

    device = module.device
    known = originals.repeat_interleave(completions, dim=0).to(device)  # (N*C, H, W): image k's copies together
    uniforms = draw_uniforms(len(known), height, width, cfg.seed, device)
    cond = labels.repeat_interleave(completions).to(device) if module.conditional else None
    started = time.perf_counter()
    with eval_mode(module):
        completed = complete_fast(module.net, known, rows, uniforms, cfg.temperature, cond).cpu()
    seconds = time.perf_counter() - started
    completed = completed.view(n, completions, height, width)

    kept = originals.float()
    kept[:, rows:] = (module.levels - 1) / 2  # hidden rows mid-grey: levels_to_grid divides by levels - 1
    pairs = torch.stack([originals.float(), kept], dim=1).flatten(0, 1)  # (N*2, H, W): original, kept per row
    grid = side_by_side([levels_to_grid(pairs, module.levels, nrow=2, scale=cfg.scale),
                         levels_to_grid(completed.flatten(0, 1), module.levels, nrow=completions, scale=cfg.scale)])
    stem = f"completions_rows{rows}_n{n}_c{completions}_T{cfg.temperature:g}_seed{cfg.seed}"
    png, npy = save_grid_and_levels(grid, completed, out_dir, stem,
                                    class_tag(label) if label is not None else None)
    print(f"{n} test images x {completions} completions below row {rows} ({seconds:.2f} s on {device.type})\n"
          f"  figure: {png}  (per row: original | kept rows | completions)\n"
          f"  levels: {npy}  shape {tuple(completed.shape)}, values 0..{module.levels - 1}")
    return [png, npy]
