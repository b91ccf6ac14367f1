"""Your own images as a data source (the formats in full: docs/data.md): a folder of image files
(`data=folder`; sub-folders are classes as in torchvision's ImageFolder, `train`/`val`/`test`
sub-folders splits) or a NumPy array (`data=array`: a .npy, or a .npz read without pickle), read
into splits of uint8 images and labels. Their colour follows `channels` (`pixelcnn.ops.images`:
alpha on white, luma for grey); `pixelcnn.data` quantizes and caches them like Fashion-MNIST's,
in a file named by `content_key`, so an edited folder or array is read again.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pixelcnn.ops.errors import UserError
from pixelcnn.ops.images import load_image, to_channels

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
SPLITS = ("train", "val", "test")
# Bytes of data an IDX or array file may hold (by its header): 20x Fashion-MNIST's largest (47 MB), so a
# header (or a gzip or zip bomb behind one) cannot make a read take all memory; it becomes ~4x that as float.
MAX_DATA_BYTES = 2**30
# A .npz member that inflates more than this many times (past a few MB) is a zip bomb: image arrays deflate
# 2-10x (Fashion-MNIST 6x), all zeros ~1000x. Under MAX_DATA_BYTES alone, 1 MB inflating to 1 GB took 5 GB.
MAX_INFLATION, INFLATION_FLOOR = 100, 2**24
# Classes labels may name: more than any data set has (ImageNet-21k: 21,841), so one wild label cannot make
# the model's class table, or the list of class names, take all memory and time.
MAX_CLASSES = 2**16

Raw = tuple[list[np.ndarray], list[int]]  # one split: images (H, W) or (H, W, C) uint8, and their labels


def image_files(directory: Path) -> list[Path]:
    """Every image file under `directory`, recursively, in sorted order (hidden files skipped)."""
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def content_key(path: Path) -> str:
    """A hash of what is under `path` (a file or a folder): names, sizes and modification times."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    for file in [path] if path.is_file() else image_files(path):
        stat, name = file.stat(), file.relative_to(path) if file != path else ""
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def read_folder(root: Path, channels: int) -> tuple[dict[str, Raw], list[str]]:
    """Each split's images and labels, and the class names (empty: unlabelled)."""
    if not root.is_dir():
        raise UserError(f"data.path={root} is not a folder: pass a folder of image files (data=folder)")
    directories = {split: root / split for split in SPLITS if (root / split).is_dir()} or {"train": root}
    if "train" not in directories:  # split folders, but not train/
        raise UserError(f"data.path={root} has {'/'.join(directories)} folders but no train/ folder: add one "
                        "(or move all images out of split folders)")
    files = {split: image_files(directory) for split, directory in directories.items()}
    classes = {split: [f.relative_to(directories[split]).parts[0] if len(f.relative_to(directories[split]).parts) > 1
                       else None for f in split_files] for split, split_files in files.items()}
    names = sorted({c for split in classes.values() for c in split if c is not None})
    for split, split_classes in classes.items():
        if not split_classes:  # an empty val/ or test/ is no more "missing" than a class folder
            raise UserError(f"data.path={root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                            f"under {directories[split]}")
        if names and None in split_classes:  # a labelled set cannot have images without a class
            loose = files[split][split_classes.index(None)]
            raise UserError(f"{loose} is not in a class folder, but {root} has class folders "
                            f"({', '.join(names[:5])}...): move it into one, or remove it")
        # As torchvision's ImageFolder: a class folder without images is an error, not a class dropped.
        empty = sorted(d for d in directories[split].iterdir() if d.is_dir() and not d.name.startswith(".")
                       and d.name not in split_classes) if names else []
        if empty:
            raise UserError(f"class folder {empty[0]} holds no image files: add images to it, or remove it")
        if unknown := sorted(set(split_classes) - set(classes["train"])):  # a class no model could learn
            raise UserError(f"data.path={root}: {split}/ has classes that train/ has not ({', '.join(unknown)}): "
                            f"give them training images in train/, or remove them from {split}/")
    index = {name: k for k, name in enumerate(names)}
    splits = {split: ([load_image(f, channels) for f in split_files],
                      [index[c] if c is not None else 0 for c in classes[split]])
              for split, split_files in files.items()}
    return splits, names


def read_npy(file: BinaryIO, size: int) -> np.ndarray:
    """The array in the .npy stream `file` of `size` bytes, read without pickle once the shape its header
    claims fits in `size` and MAX_DATA_BYTES (np.load allocates what a header claims: 1 kB can claim a petabyte)."""
    version = np.lib.format.read_magic(file)
    if version not in ((1, 0), (2, 0)):  # 3.0 only holds dtypes with non-Latin-1 field names: never images
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    shape, _, dtype = getattr(np.lib.format, f"read_array_header_{version[0]}_0")(file)
    claimed, held = math.prod(shape) * max(dtype.itemsize, 1), size - file.tell()
    if claimed > min(held, MAX_DATA_BYTES):
        raise ValueError(f"its header claims {dtype} {shape} = {claimed} bytes of data, " + (
            f"more than the {MAX_DATA_BYTES} a data file may hold (pixelcnn.ops.sources.MAX_DATA_BYTES)"
            if claimed > MAX_DATA_BYTES else f"but only {held} follow (truncated)"))
    file.seek(0)
    return np.lib.format.read_array(file, allow_pickle=False)


def read_arrays(path: Path, problem: str) -> dict[str, np.ndarray]:
    """The arrays of a .npy ({"images": it}) or .npz file ({member name: array}), told apart by their content as
    np.load does, each read by `read_npy`; a .npz's members first by their declared sizes, which zipfile holds
    them to (a zip bomb is refused uninflated). Unreadable: a UserError `problem (why)`."""
    try:
        with path.open("rb") as file:
            zipped = file.read(4) in (b"PK\x03\x04", b"PK\x05\x06")  # np.load's test for a zip file
            file.seek(0)
            if not zipped:
                return {"images": read_npy(file, path.stat().st_size)}
            with zipfile.ZipFile(file) as archive:
                if (total := sum(member.file_size for member in archive.infolist())) > MAX_DATA_BYTES:
                    raise ValueError(f"its members inflate to {total} bytes, more than the {MAX_DATA_BYTES} "
                                     "a data file may hold (pixelcnn.ops.sources.MAX_DATA_BYTES)")
                arrays = {}
                for member in archive.infolist():  # each refused uninflated if it is a bomb
                    if member.file_size > max(INFLATION_FLOOR, MAX_INFLATION * member.compress_size):
                        raise ValueError(f"{member.filename} inflates {member.compress_size} bytes to "
                                         f"{member.file_size}, more than {MAX_INFLATION}x: a zip bomb, not image data")
                    with archive.open(member) as stream:
                        try:
                            arrays[member.filename.removesuffix(".npy")] = read_npy(stream, member.file_size)
                        except ValueError as err:
                            raise ValueError(f"{member.filename}: {err}") from None
                return arrays
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as err:
        raise UserError(f"{problem} ({err})") from None  # NotImplementedError, RuntimeError: zip method, password


def read_array(path: Path, channels: int) -> tuple[dict[str, Raw], list[str]]:
    """Each split's images and labels from a .npy / .npz, and the class names (empty: unlabelled)."""
    if not path.is_file() or path.suffix.lower() not in (".npy", ".npz"):
        raise UserError(f"data.path={path} is not a .npy or .npz file (data=array)")
    arrays = read_arrays(path, f"data.path={path} is not a readable NumPy file")
    prefixes = [f"{s}_" for s in SPLITS if f"{s}_images" in arrays] or [""]
    known = {"class_names", *(f"{prefix}{kind}" for prefix in prefixes for kind in ("images", "labels"))}
    if prefixes[0] not in ("", "train_") or f"{prefixes[0]}images" not in arrays or not set(arrays) <= known:
        raise UserError(f"{path} holds {sorted(arrays)}: expected images (or train_images, with val_images / "
                        "test_images), optional labels for them all (labels, or <split>_labels) and class_names")
    labelled = [f"{prefix}labels" for prefix in prefixes if f"{prefix}labels" in arrays]
    missing = [f"{prefix}labels" for prefix in prefixes if f"{prefix}labels" not in arrays]
    if (labelled and missing) or ("class_names" in arrays and not labelled):  # else a split's images are all class 0
        raise UserError(f"{path} has {', '.join(labelled) or 'class_names'} but no {', '.join(missing)}: "
                        "give labels to every split's images, or to none (then no class_names either)")
    splits = {}
    for prefix in prefixes:
        images, labels = arrays[f"{prefix}images"], arrays.get(f"{prefix}labels")
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[3:] not in ((), (1,), (3,), (4,)):
            raise UserError(f"{path}: {prefix}images is {images.dtype} {images.shape}: expected uint8 (N, H, W) or "
                            "(N, H, W, C) with C = 1, 3 or 4")
        if images.size == 0:
            raise UserError(f"{path}: {prefix}images has shape {images.shape}: "
                            + ("it holds no images" if not len(images) else "its images have no pixels"))
        integers = labels is not None and np.issubdtype(labels.dtype, np.integer) and labels.shape == images.shape[:1]
        if labels is not None and (not integers or labels.min() < 0 or labels.max() >= MAX_CLASSES):
            raise UserError(f"{path}: {prefix}labels is {labels.dtype} {labels.shape}"
                            f"{f' of {labels.min()}..{labels.max()}' if integers else ''}: expected integers "
                            f"0..{MAX_CLASSES - 1} (pixelcnn.ops.sources.MAX_CLASSES), one per image ({len(images)})")
        splits[prefix.rstrip("_") or "train"] = (list(to_channels(images, channels)),
                                                 labels.tolist() if labels is not None else [0] * len(images))
    count = max(max(labels) for _, labels in splits.values()) + 1 if labelled else 0
    names = [str(k) for k in range(count)]
    if "class_names" in arrays:
        given = arrays["class_names"]
        strings = given.dtype.kind == "U" and given.ndim == 1 and len(given) <= MAX_CLASSES
        names = [str(name) for name in given] if strings else []
        twice = [name for name, times in Counter(names).items() if times > 1]
        if len(names) < count or twice:
            raise UserError(f"{path}: class_names is {given.dtype} {given.shape}"
                            f"{f' with {twice[0]!r} twice' if twice else ''}: expected one distinct string per "
                            f"class: {count}..{MAX_CLASSES} of them (the labels go up to {count - 1})")
    return splits, names


def has_classes(source: str, path: str | None) -> bool:
    """False where data=folder or data=array at `path` surely has no classes, told from names alone (no image or
    array is read: a sweep's pre-check); True where it has them or this cannot tell (the job reads the data)."""
    path = Path(path or "")
    with suppress(OSError, ValueError, zipfile.BadZipFile):  # unreadable: the job says why
        if source == "folder" and path.is_dir():  # classes are sub-folders (of the split folders, if any)
            roots = [path / split for split in SPLITS if (path / split).is_dir()] or [path]
            return any(len(file.relative_to(root).parts) > 1 for root in roots for file in image_files(root))
        if source == "array" and path.suffix.lower() == ".npy":  # images only
            return False
        if source == "array" and path.suffix.lower() == ".npz":  # its member names, from the zip's directory
            with zipfile.ZipFile(path) as archive:  # (np.load would take a .npy so named, and return its array)
                return any(name == "class_names.npy" or name.endswith("labels.npy") for name in archive.namelist())
    return True
