"""Your own images as a data source (the formats in full: docs/data.md): a folder of image files
(`data=folder`; sub-folders are classes as in torchvision's ImageFolder, `train`/`val`/`test`
sub-folders splits) or a NumPy array (`data=array`: a .npy, or a .npz read without pickle), read
into splits of uint8 images and labels. Their colour follows `channels` (`pixelcnn.images`:
alpha on white, luma for grey); `pixelcnn.data` quantizes and caches them like Fashion-MNIST's,
in a file named by `content_key`, so an edited folder or array is read again.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from pixelcnn.config import UserError
from pixelcnn.images import load_image, to_channels

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
SPLITS = ("train", "val", "test")

Raw = tuple[list[np.ndarray], list[int]]  # one split: images (H, W) or (H, W, C) uint8, and their labels


def image_files(directory: Path) -> list[Path]:
    """Every image file under `directory`, recursively, in sorted order (hidden files skipped)."""
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def content_key(path: Path) -> str:
    """A hash of what is under `path` (a file or a folder): names, sizes and modification times."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    for file in [path] if path.is_file() else image_files(path):
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else ''}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def read_folder(root: Path, channels: int) -> tuple[dict[str, Raw], list[str]]:
    """Each split's images and labels, and the class names (empty: unlabelled)."""
    if not root.is_dir():
        raise UserError(f"data.path={root} is not a folder: pass a folder of image files (data=folder)")
    named = {split: root / split for split in SPLITS if (root / split).is_dir()}  # else root is train
    if named and "train" not in named:
        raise UserError(f"data.path={root} has {'/'.join(named)} folders but no train/ folder: add one "
                        "(or move all images out of split folders)")
    directories = named or {"train": root}
    files = {split: image_files(directory) for split, directory in directories.items()}
    if not files["train"]:
        raise UserError(f"data.path={root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                        f"under {directories['train']}")
    classes = {split: [f.relative_to(directories[split]).parts[0] if len(f.relative_to(directories[split]).parts) > 1
                       else None for f in split_files] for split, split_files in files.items()}
    names = sorted({c for split in classes.values() for c in split if c is not None})
    for split, split_classes in classes.items():
        if names and None in split_classes:  # a labelled set cannot have images without a class
            loose = files[split][split_classes.index(None)]
            raise UserError(f"{loose} is not in a class folder, but {root} has class folders "
                            f"({', '.join(names[:5])}...): move it into one, or remove it")
    index = {name: k for k, name in enumerate(names)}
    splits = {split: ([load_image(f, channels) for f in split_files],
                      [index[c] if c is not None else 0 for c in classes[split]])
              for split, split_files in files.items() if split_files}
    return splits, names


def read_array(path: Path, channels: int) -> tuple[dict[str, Raw], list[str]]:
    """Each split's images and labels from a .npy / .npz, and the class names (empty: unlabelled)."""
    if not path.is_file() or path.suffix.lower() not in (".npy", ".npz"):
        raise UserError(f"data.path={path} is not a .npy or .npz file (data=array)")
    try:
        loaded = np.load(path, allow_pickle=False)
        arrays = {"images": loaded} if isinstance(loaded, np.ndarray) else {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"data.path={path} is not a readable NumPy file ({err})") from None
    prefixes = [f"{s}_" for s in SPLITS if f"{s}_images" in arrays] or ([""] if "images" in arrays else [])
    if not prefixes or (prefixes[0] != "" and "train_images" not in arrays):
        raise UserError(f"{path} holds {sorted(arrays)}: expected images (or train_images, with val_images / "
                        "test_images) and optional labels")
    splits = {}
    for prefix in prefixes:
        images, labels = arrays[f"{prefix}images"], arrays.get(f"{prefix}labels")
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
            raise UserError(f"{path}: {prefix}images is {images.dtype} {images.shape}: expected uint8 (N, H, W) or "
                            "(N, H, W, C) with C = 1, 3 or 4")
        if labels is not None and (not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]
                                   or (len(labels) and labels.min() < 0)):
            raise UserError(f"{path}: {prefix}labels is {labels.dtype} {labels.shape}: expected integers >= 0, "
                            f"one per image ({len(images)})")
        splits[prefix.rstrip("_") or "train"] = (list(to_channels(images, channels)),
                                                 labels.tolist() if labels is not None else [0] * len(images))
    labelled = any(f"{prefix}labels" in arrays for prefix in prefixes)
    count = max((max(labels, default=0) for _, labels in splits.values()), default=0) + 1 if labelled else 0
    names = [str(name) for name in arrays["class_names"]] if "class_names" in arrays else [str(k) for k in range(count)]
    if len(names) < count:
        raise UserError(f"{path}: labels go up to {count - 1} but class_names has {len(names)} names")
    return splits, names



def has_classes(source: str, path: str | None) -> bool:
    """False where data=folder or data=array at `path` surely has no classes, told from names alone (no image or
    array is read: a sweep's pre-check); True where it has them or this cannot tell (the job reads the data)."""
    path = Path(path or "")
    try:
        if source == "folder" and path.is_dir():  # classes are sub-folders (of the split folders, if any)
            roots = [path / split for split in SPLITS if (path / split).is_dir()] or [path]
            return any(len(file.relative_to(root).parts) > 1 for root in roots for file in image_files(root))
        if source == "array" and path.suffix.lower() == ".npy":  # images only
            return False
        if source == "array" and path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as arrays:  # its member names, from the zip's directory
                return any(key == "class_names" or key.endswith("labels") for key in arrays.files)
    except (OSError, ValueError, zipfile.BadZipFile):  # unreadable: the job says why
        pass
    return True
