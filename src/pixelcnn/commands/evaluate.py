"""What `python evaluate.py ckpt=...` does, with the model's likelihoods (`ImageModel.nll_maps`).

Without `images=`: exact test bits/dim over the whole test split, a per-pixel NLL heatmap figure
(where the model is surprised), grids of the most and least likely test images and sample quality
(`pixelcnn.quality`; skipped with a note for data other than grey Fashion-MNIST), into `out`
(default `<run dir>/eval`) with a `metrics.json`. With `images=<file.npy | an image file | a folder
of image files>` (every image file under it, class folders too, as `data=folder` reads them): outlier
scores, the bits/dim of each image, as a table and a CSV. A conditional model scores them by the
marginal likelihood p(x) = mean_c p(x | c) (uniform class prior), as their class is unknown.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from pixelcnn.commands.cli import checkpoint_data, load_checkpoint_model
from pixelcnn.ops.errors import UserError
from pixelcnn.ops.files import atomic_write, write_json
from pixelcnn.ops.images import levels_to_grid, load_image, save_grid
from pixelcnn.ops.sources import IMAGE_SUFFIXES, image_files, read_arrays

TABLE_ROWS = 40  # longer score tables print only the highest-scoring (most surprising) images


# ---------------------------------------------------------------------------- reading user images


def load_images(path: str | Path, image_size: int, levels: int, channels: int = 1) -> tuple[Tensor, list[str]]:
    """(level images (N, C, S, S) uint8, a name per image) from a .npy of integer levels (N, S, S) or
    (N, C, S, S) in [0, levels), or an image file or a folder of them (any size up to
    images.MAX_IMAGE_PIXELS, any mode: `load_image`), preprocessed as in training."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"images={path} does not exist: pass a .npy of levels, an image file, or a folder of them")
    if path.suffix.lower() == ".npy" and path.is_file():
        arrays = read_arrays(path, f"images={path} is not a readable .npy file")
        if list(arrays) != ["images"]:
            raise UserError(f"images={path} is a .npz archive ({', '.join(arrays)}): pass a .npy of levels")
        array = arrays["images"]
        if array.ndim == 3 and channels == 1:
            array = array[:, None]
        if array.ndim != 4 or array.shape[1:] != (channels, image_size, image_size) or len(array) == 0:
            raise UserError(f"images={path} has shape {array.shape}: expected "
                            + (f"(N, {image_size}, {image_size}) or " if channels == 1 else "")
                            + f"(N, {channels}, {image_size}, {image_size}) levels, N >= 1, "
                            f"for this {image_size}px model")
        if not np.issubdtype(array.dtype, np.integer):
            raise UserError(f"images={path} holds {array.dtype} values: expected integer levels 0..{levels - 1} "
                            "(for 0..255 pictures, pass PNG files)")
        if array.min() < 0 or array.max() >= levels:
            raise UserError(f"images={path} holds values {array.min()}..{array.max()}: expected levels 0..{levels - 1} "
                            f"(this model has {levels} grey levels; for 0..255 pictures, pass PNG files)")
        return torch.from_numpy(array.astype(np.uint8)), [f"{path.name}[{i}]" for i in range(len(array))]
    pictures = image_files(path) if path.is_dir() else [path]  # a folder as data=folder reads it: class folders too
    if not pictures or pictures[0].suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"images={path} is not a .npy file, an image file, or a folder with image files "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    from pixelcnn.data import preprocess  # late: each mode imports only what it uses (tests/test_speed.py)

    names = [str(p.relative_to(path if path.is_dir() else path.parent)) for p in pictures]
    return preprocess([load_image(p, channels) for p in pictures], image_size, levels, channels), names


# ---------------------------------------------------------------------------- figures


def heatmap_figure(images: Tensor, maps: Tensor, levels: int, path: Path) -> Path:
    """Top row: the images (titled with their bits/dim); bottom row: bits per pixel, one colour scale."""
    from matplotlib.figure import Figure

    count = len(images)
    figure = Figure(figsize=(1.5 * count + 1.2, 3.4))
    axes = figure.subplots(2, count, squeeze=False, subplot_kw={"frame_on": False, "xticks": [], "yticks": []})
    for k in range(count):  # levels as intensities 0..1: grey (H, W) through the grey map, RGB (H, W, 3) as colours
        axes[0, k].imshow(images[k].permute(1, 2, 0).squeeze(-1) / (levels - 1), cmap="gray", vmin=0, vmax=1)
        axes[0, k].set_title(f"{maps[k].mean():.2f} bits/dim", fontsize=8)
        heat = axes[1, k].imshow(maps[k], cmap="magma", vmin=0, vmax=maps.max().item())
    figure.colorbar(heat, ax=axes[1, :].tolist(), label="bits per pixel", shrink=0.9)
    figure.suptitle("Per-pixel negative log-likelihood: where the model is surprised", fontsize=9)
    with atomic_write(path) as file:
        figure.savefig(file, dpi=120, bbox_inches="tight", format="png")
    return path


# ---------------------------------------------------------------------------- the two modes


def evaluate_test_split(module, cfg: DictConfig, out_dir: Path, ckpt: Path) -> dict:
    """Test bits/dim, heatmaps, extremes and (quality=true, quality_n > 0) sample quality; writes metrics.json."""
    datamodule = checkpoint_data(module, cfg.data_root)
    images, labels = datamodule.test_set
    started = time.perf_counter()
    maps = module.nll_maps(images, labels if module.conditional else None, cfg.batch_size)  # (N, H, W)
    per_image = maps.double().mean((1, 2))  # (N,) bits/dim of each test image
    seconds = time.perf_counter() - started
    order = per_image.argsort()
    files = {name: save_grid(levels_to_grid(images[ranked[:cfg.extremes]], module.levels, scale=cfg.scale),
                             out_dir / f"{name}.png")
             for name, ranked in (("most_likely", order), ("least_likely", order.flip(0)))}
    metrics = {
        "checkpoint": str(ckpt), "test_bpd": per_image.mean().item(), "test_images": len(images),
        "bpd_most_likely": per_image[order[0]].item(), "bpd_least_likely": per_image[order[-1]].item(),
    }
    print(f"test bits/dim: {metrics['test_bpd']:.4f} over {len(images)} images ({seconds:.1f} s on "
          f"{module.device.type}); per image {metrics['bpd_most_likely']:.3f} .. {metrics['bpd_least_likely']:.3f}\n"
          f"  most likely:  {files['most_likely']}\n  least likely: {files['least_likely']}")
    if cfg.heatmaps > 0:
        shown = min(cfg.heatmaps, len(images))
        files["heatmaps"] = heatmap_figure(images[:shown], maps[:shown], module.levels, out_dir / "nll_heatmaps.png")
        print(f"  heatmaps:     {files['heatmaps']}")
    from pixelcnn.quality import load_or_train_classifier, quality_metrics, unscorable

    if cfg.quality and cfg.quality_n > 0 and (skipped := unscorable(datamodule)):
        print(f"  {skipped}")
    elif cfg.quality and cfg.quality_n > 0:  # quality_n=0 skips it, as in training
        classifier = load_or_train_classifier(datamodule, module.device)
        quality = quality_metrics(module, datamodule, cfg.quality_n, cfg.temperature, cfg.seed, classifier, cfg.method)
        metrics |= quality | {"quality_temperature": cfg.temperature,
                              "classifier_test_accuracy": classifier.test_accuracy}
        accuracy = f", class accuracy {quality['class_accuracy']:.1%}" if "class_accuracy" in quality else ""
        print(f"sample quality ({quality['quality_n']} samples at T={cfg.temperature:g} vs test images): Fréchet "
              f"distance {quality['frechet_distance']:.3f} (floor, train vs test: "
              f"{quality['frechet_distance_floor']:.3f}){accuracy}")
    metrics["files"] = {name: str(path) for name, path in files.items()}
    write_json(out_dir / "metrics.json", metrics)  # NaN (a diverged model) as null: JSON has no NaN
    print(f"  metrics:      {out_dir / 'metrics.json'}")
    return metrics


def score_images(module, cfg: DictConfig, out_dir: Path) -> dict:
    """Bits/dim of each image in `cfg.images`: printed table and `scores_<name>.csv`."""
    images, names = load_images(cfg.images, module.image_size, module.levels, module.image_channels)
    scores = module.image_bits_per_dim(images, None, cfg.batch_size)  # (N,)
    csv_path = out_dir / f"scores_{Path(cfg.images).stem}.csv"
    with atomic_write(csv_path, "w") as file:
        csv.writer(file).writerows([("image", "bits_per_dim"), *zip(names, (f"{s:.6f}" for s in scores.tolist()))])
    everything = len(names) <= TABLE_ROWS
    shown = range(len(names)) if everything else scores.argsort(descending=True)[: TABLE_ROWS // 2].tolist()
    width = max(len(names[i]) for i in shown)
    heading = "" if everything else f" ({TABLE_ROWS // 2} most surprising of {len(names)})"
    print(f"{'image':<{width}}  bits/dim{heading}")
    for i in shown:
        print(f"{names[i]:<{width}}  {scores[i].item():.4f}")
    print(f"mean {scores.mean().item():.4f} bits/dim over {len(names)} images (higher = more surprising)\n"
          f"  scores: {csv_path}")
    return {"images": names, "bits_per_dim": scores.tolist(), "csv": str(csv_path)}


def main(cfg: DictConfig) -> dict:
    """The test-split evaluation, or with `images=` the outlier scores."""
    with load_checkpoint_model(cfg, "evaluate", "eval") as (ckpt, module, out_dir):
        if cfg.images is not None:
            return score_images(module, cfg, out_dir)
        return evaluate_test_split(module, cfg, out_dir, ckpt)
