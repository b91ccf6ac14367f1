"""What `sample.py` does: load a checkpoint, draw images, write a PNG grid and the raw levels."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig

from pixelcnn.checkpoints import load_module, resolve_checkpoint
from pixelcnn.config import UserError, check_out_dir, validate
from pixelcnn.data import FashionMNISTDataModule
from pixelcnn.images import levels_to_grid, save_grid_and_levels, side_by_side

CLASS_NAMES = FashionMNISTDataModule.CLASS_NAMES
MAX_GRID_PIXELS = 2**28  # a PNG grid beyond this (~270 megapixels) is more than memory and viewers take


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available: use device=cpu or device=auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"device={name!r} is invalid: it must be auto, cpu or cuda")
    return torch.device(name)


def parse_labels(label: object, num_classes: int, n: int) -> tuple[torch.Tensor | None, int]:
    """`label` (None, a class name, an index or 'all') -> (labels (N,) or None, images per grid row)."""
    if num_classes == 0:
        if label is not None:
            raise UserError(f"label={label!r} needs a class-conditional checkpoint (model.num_classes=10); "
                            "this one is unconditional: drop label=")
        return None, 8
    if label is None:
        raise UserError(f"this checkpoint is class-conditional: pass label=<name or 0..{num_classes - 1}> or label=all "
                        f"(names: {', '.join(CLASS_NAMES)})")
    if label == "all":
        return torch.arange(num_classes).repeat_interleave(n), n
    names = {name: i for i, name in enumerate(CLASS_NAMES)} | {name.split("/")[0]: i for i, name in enumerate(CLASS_NAMES)}
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < num_classes:
        return torch.full((n,), label), 8
    if isinstance(label, str) and label.lower().replace("_", " ") in names:
        return torch.full((n,), names[label.lower().replace("_", " ")]), 8
    raise UserError(f"label={label!r} is invalid: it must be a class index 0..{num_classes - 1}, all, or one of "
                    f"{', '.join(CLASS_NAMES)}")


def class_tag(index: int) -> str:
    """File-name tag of a class: the same however the class was typed (5, Sandal, sandal)."""
    return CLASS_NAMES[index].split("/")[0].replace(" ", "-")  # "t-shirt/top" -> t-shirt, "ankle boot" -> ankle-boot


def default_out_dir(ckpt: Path) -> Path:
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir / "samples"


def run(cfg: DictConfig) -> list[Path]:
    validate(cfg)
    device = pick_device(cfg.device)
    ckpt = resolve_checkpoint(cfg.ckpt)
    module = load_module(ckpt, device)
    out_dir = check_out_dir(cfg.out if cfg.out else default_out_dir(ckpt))
    if cfg.mode == "complete":
        from pixelcnn.completion import run_completion

        return run_completion(module, cfg, out_dir)
    if cfg.mode != "sample":
        raise UserError(f"mode={cfg.mode!r} is invalid: it must be sample or complete")

    temperatures = list(cfg.temperature) if isinstance(cfg.temperature, ListConfig) else [cfg.temperature]
    labels, nrow = parse_labels(cfg.label, module.hparams.num_classes, cfg.n)
    n = len(labels) if labels is not None else cfg.n
    side = module.image_size * cfg.scale + 2  # one image in the grid, with its padding
    if (pixels := n * len(temperatures) * side * side) > MAX_GRID_PIXELS:
        raise UserError(f"n={cfg.n} with scale={cfg.scale} makes a {pixels / 1e6:.0f}-megapixel grid, more than "
                        f"{MAX_GRID_PIXELS / 1e6:.0f}: lower n or scale")
    started = time.perf_counter()
    samples = [module.sample(n, t, cfg.seed, labels, cfg.method).cpu() for t in temperatures]  # each (N, H, W)
    seconds = time.perf_counter() - started

    stem = f"samples_n{n}_T{'-'.join(f'{t:g}' for t in temperatures)}_seed{cfg.seed}"
    grids = [levels_to_grid(s, module.levels, nrow=nrow, scale=cfg.scale) for s in samples]
    levels = torch.stack(samples) if len(samples) > 1 else samples[0]  # (T, N, H, W) or (N, H, W)
    tag = "all" if cfg.label == "all" else class_tag(int(labels[0])) if labels is not None else None
    png, npy = save_grid_and_levels(side_by_side(grids), levels, out_dir, stem, tag)
    print(f"{n * len(temperatures)} samples ({cfg.method}, {seconds:.2f} s on {device.type}) from {ckpt}\n"
          f"  grid:   {png}\n  levels: {npy}  shape {tuple(levels.shape)}, values 0..{module.levels - 1}")
    return [png, npy]
