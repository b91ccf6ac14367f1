"""What `sample.py` does: load a checkpoint and draw new images (mode=sample) or complete the
bottom of test images (mode=complete); write a PNG grid and the raw levels as .npy."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig

from pixelcnn.commands.cli import checkpoint_data, load_checkpoint_model
from pixelcnn.ops.errors import UserError
from pixelcnn.ops.images import levels_to_grid, save_grid_and_levels, side_by_side
from pixelcnn.sampling import complete_fast, draw_uniforms, eval_mode

MAX_GRID_PIXELS = 2**28  # a PNG grid beyond this (~270 megapixels) is more than memory and viewers take
MAX_COMPLETED = 16  # test images per completion figure: one figure row each, so n is capped to keep it readable


def class_names(module) -> list[str]:
    """The checkpoint's class names (saved from its data); older conditional checkpoints were Fashion-MNIST's."""
    if module.class_names or not module.num_classes:
        return list(module.class_names or [])
    from pixelcnn.data import CLASS_NAMES  # late: pixelcnn.data imports Lightning (for its data module)

    return list(CLASS_NAMES)


def parse_labels(label: object, names: list[str], n: int) -> tuple[torch.Tensor | None, int]:
    """`label` (None, a class name, an index or 'all') -> (labels (N,) or None, images per grid row)."""
    if not names:
        if label is not None:
            raise UserError(f"label={label!r} needs a class-conditional checkpoint (model.num_classes > 0); "
                            "this one is unconditional: drop label=")
        return None, 8
    if label is None:
        raise UserError(f"this checkpoint is class-conditional: pass label=<name or 0..{len(names) - 1}> or label=all "
                        f"(names: {', '.join(names)})")
    if label == "all":
        return torch.arange(len(names)).repeat_interleave(n), n
    # A name as typed: any case, _ for a space, and the part before a / ("t-shirt" for "t-shirt/top").
    lookup = {key.lower(): i for i, name in enumerate(names) for key in (name, name.split("/")[0])}
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
        return torch.full((n,), label), 8
    typed = str(label).lower()
    if (index := lookup.get(typed, lookup.get(typed.replace("_", " ")))) is not None:
        return torch.full((n,), index), 8
    raise UserError(f"label={label!r} is invalid: it must be a class index 0..{len(names) - 1}, all, or one of "
                    f"{', '.join(names)}")


def class_tag(names: list[str], index: int) -> str:
    """File-name tag of a class: the same however the class was typed (5, Sandal, sandal)."""
    return names[index].split("/")[0].replace(" ", "-")  # "t-shirt/top" -> t-shirt, "ankle boot" -> ankle-boot


def main(cfg: DictConfig) -> list[Path]:
    with load_checkpoint_model(cfg, "sample", "samples") as (ckpt, module, out_dir):
        return complete(module, cfg, out_dir) if cfg.mode == "complete" else draw(module, cfg, out_dir, ckpt)


def draw(module, cfg: DictConfig, out_dir: Path, ckpt: Path) -> list[Path]:
    """n samples at each temperature, drawn from `ckpt`'s model: their grids side by side (PNG) and levels (.npy)."""
    temperatures = list(cfg.temperature) if isinstance(cfg.temperature, ListConfig) else [cfg.temperature]
    names = class_names(module)
    labels, nrow = parse_labels(cfg.label, names, cfg.n)
    n = len(labels) if labels is not None else cfg.n
    side = module.image_size * cfg.scale + 2  # one image in the grid, with its padding
    if (pixels := n * len(temperatures) * side * side) > MAX_GRID_PIXELS:
        raise UserError(f"n={cfg.n} with scale={cfg.scale} makes a {pixels / 1e6:.0f}-megapixel grid, more than "
                        f"{MAX_GRID_PIXELS / 1e6:.0f}: lower n or scale")
    started = time.perf_counter()
    samples = [module.sample(n, t, cfg.seed, labels, cfg.method).cpu() for t in temperatures]  # each (N, [C,] H, W)
    seconds = time.perf_counter() - started

    stem = f"samples_n{n}_T{'-'.join(f'{t:g}' for t in temperatures)}_seed{cfg.seed}"
    grids = [levels_to_grid(s, module.levels, nrow=nrow, scale=cfg.scale) for s in samples]
    images = torch.stack(samples) if len(samples) > 1 else samples[0]  # (T, N, [C,] H, W) or (N, [C,] H, W)
    tag = "all" if cfg.label == "all" else class_tag(names, int(labels[0])) if labels is not None else None
    png, npy = save_grid_and_levels(side_by_side(grids), images, out_dir, stem, tag)
    print(f"{n * len(temperatures)} samples ({cfg.method}, {seconds:.2f} s on {module.device.type}) from {ckpt}\n"
          f"  grid:   {png}\n  levels: {npy}  shape {tuple(images.shape)}, values 0..{module.levels - 1}")
    return [png, npy]


def complete(module, cfg: DictConfig, out_dir: Path) -> list[Path]:
    """mode=complete: complete the first min(n, 16) test images `completions` times each below
    row `rows`; write a PNG figure (one row per image: original | kept rows, hidden ones mid-grey |
    completions) and the completions as .npy (N, completions, H, W) uint8 levels. Conditional
    models use the images' true labels. Only what depends on the model is checked here (the
    rest by `rules.validate`)."""
    height = width = module.image_size
    rows, completions = cfg.rows, cfg.completions
    if rows > height:
        raise UserError(f"rows={rows} is invalid: it must be an integer in [0, {height}] "
                        f"(rows kept of this {height}px model's images)")
    datamodule = checkpoint_data(module, cfg.data_root)
    names = class_names(module) or datamodule.class_names  # an unconditional model: the data's classes
    label = int(parse_labels(cfg.label, names, 1)[0][0]) if cfg.label is not None else None
    if cfg.n > MAX_COMPLETED:
        print(f"mode=complete shows at most {MAX_COMPLETED} test images (one figure row each): using {MAX_COMPLETED}")
    images, labels = datamodule.test_set[0].cpu(), datamodule.test_set[1].cpu()
    if label is not None:  # the first n of that class
        images, labels = images[labels == label], labels[labels == label]
        if len(images) == 0:
            raise UserError(f"label={label}: the test split has no image of that class")
    n = min(cfg.n, MAX_COMPLETED, len(images))
    originals, labels = (images[:n, 0] if images.shape[1] == 1 else images[:n]).long(), labels[:n]  # (N, [C,] H, W)

    device = module.device
    known = originals.repeat_interleave(completions, dim=0).to(device)  # (N*K, [C,] H, W): image k's copies together
    uniforms = draw_uniforms(len(known), height, width, cfg.seed, device, module.image_channels)
    cond = labels.repeat_interleave(completions).to(device) if module.conditional else None
    started = time.perf_counter()
    with eval_mode(module):
        completed = complete_fast(module.net, known, rows, uniforms, cfg.temperature, cond).cpu()
    seconds = time.perf_counter() - started
    completed = completed.view(n, completions, *originals.shape[1:])  # (N, K, [C,] H, W)

    pairs = originals.float().repeat_interleave(2, dim=0)  # (N*2, [C,] H, W): each original, then its kept rows
    pairs[1::2, ..., rows:, :] = (module.levels - 1) / 2  # hidden rows mid-grey: levels_to_grid divides by levels - 1
    grid = side_by_side([levels_to_grid(pairs, module.levels, nrow=2, scale=cfg.scale),
                         levels_to_grid(completed.flatten(0, 1), module.levels, nrow=completions, scale=cfg.scale)])
    stem = f"completions_rows{rows}_n{n}_c{completions}_T{cfg.temperature:g}_seed{cfg.seed}"
    tag = class_tag(names, label) if label is not None else None
    png, npy = save_grid_and_levels(grid, completed, out_dir, stem, tag)
    print(f"{n} test images x {completions} completions below row {rows} ({seconds:.2f} s on {device.type})\n"
          f"  figure: {png}  (per row: original | kept rows | completions)\n"
          f"  levels: {npy}  shape {tuple(completed.shape)}, values 0..{module.levels - 1}")
    return [png, npy]
