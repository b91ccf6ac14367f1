"""The data module's files: the IDX datasets (Fashion-MNIST, MNIST) found and read, own images read
(`pixelcnn.ops.sources`), and their preprocessed tensors cached in the data dir (`data.root`, by default
`default_data_dir()`), where the sample-quality classifier is cached too (`pixelcnn.quality`).

`load_data` is what the data module calls; the preprocessing itself (`pixelcnn.data.preprocess`) is the
lab's and comes as an argument, so that this module imports nothing of the lab.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

import torch
from filelock import FileLock, Timeout
from torch import Tensor

from pixelcnn.ops import sources
from pixelcnn.ops.errors import UserError
from pixelcnn.ops.files import missing_dirs, remove_if_empty, torch_save

log = logging.getLogger(__name__)
T = TypeVar("T")

# data.source -> (name in messages, torchvision's dataset class and folder under root/); both have 10 classes.
IDX_DATASETS = {"fashion_mnist": ("Fashion-MNIST", "FashionMNIST"), "mnist": ("MNIST", "MNIST")}
IDX_CLASSES = 10
# The Debian package, which holds Fashion-MNIST only (MNIST has the same file names).
APT_COMMAND = "sudo apt-get install dataset-fashion-mnist"
APT_REINSTALL = "sudo apt-get install --reinstall dataset-fashion-mnist"
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes: magic 0x0803 (images, 3-D), 0x0801 (labels, 1-D)
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
Preprocess = Callable[[list, int, int, int], Tensor]  # `pixelcnn.data.preprocess`(images, image_size, levels, channels)


class CorruptDatasetError(UserError):
    """An IDX file exists but is truncated, too long, or not a valid IDX/gzip file."""


class DatasetNotFoundError(UserError):
    """The IDX files are in none of the places searched and could not be downloaded."""


def default_data_dir() -> Path:
    """The data dir when `data.root` is null: $PIXELCNN_DATA_DIR, else $XDG_CACHE_HOME/pixelcnn
    (~/.cache/pixelcnn). One place for every command, wherever it is launched from."""
    if configured := os.environ.get("PIXELCNN_DATA_DIR"):
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "pixelcnn"


def load_data(source: str, path: Path | None, root: Path, system_dir: str | os.PathLike | None, download: bool,
              image_size: int, levels: int, channels: int, preprocess: Preprocess) -> dict:
    """{<split>_images (N, C, S, S) uint8 levels, <split>_labels (N,) int64} of `source` for the splits it has
    (and an own source's class_names), preprocessed by `preprocess`, from the cache in `root` if possible."""
    if source in IDX_DATASETS:
        data = load_idx_dataset(root, system_dir, download, image_size, levels, preprocess, source)
        # Grey as RGB: the same levels in every channel.
        return {k: v.repeat(1, channels, 1, 1) if k.endswith("_images") else v for k, v in data.items()}
    # A folder or array source (`pixelcnn.ops.sources`), with its class_names (a list).
    cache = root / (f"{source}-{path.name or 'root'}-{sources.content_key(path)}"  # named by its content
                    f"_{image_size}px_{levels}lv_{channels}ch.pt")

    def build() -> dict:
        splits, names = (sources.read_folder if source == "folder" else sources.read_array)(path, channels)
        data = {"class_names": names}
        for split, (images, labels) in splits.items():
            data[f"{split}_images"] = preprocess(images, image_size, levels, channels)
            data[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
        return save_cache(cache, data)

    return cached(cache, lambda: load_cache(cache, image_size, levels, channels, ("train",)), build)


# ---------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike, ndim: int) -> Tensor:
    """Read an unsigned-byte IDX file (raw or .gz) of `ndim` dimensions, checking it fully first.

    torchvision's `read_sn3_pascalvincent_tensor` only reads uncompressed files and tolerates
    short ones (`strict=False`), so the header and the payload size are checked here before
    the bytes become a tensor. A .gz file is inflated as a stream, never beyond what its header
    promises (at most sources.MAX_DATA_BYTES) plus one byte: a gzip bomb costs no more than an honest file.
    """
    path = Path(path)
    header_size = 4 + 4 * ndim
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as file:
            header = file.read(header_size)
            if len(header) < header_size:
                raise CorruptDatasetError(f"{path}: only {len(header)} bytes, shorter than the {header_size}-byte "
                                          "IDX header")
            if header[:4] != (magic := bytes([0, 0, IDX_UBYTE, ndim])):
                raise CorruptDatasetError(f"{path}: bad magic number 0x{header[:4].hex()}, expected 0x{magic.hex()} "
                                          f"(ubyte, {ndim}-D)")
            dims = struct.unpack(f">{ndim}I", header[4:])
            expected_size = math.prod(dims)
            if expected_size > sources.MAX_DATA_BYTES:
                raise CorruptDatasetError(f"{path}: its header says {dims} = {expected_size} bytes of data, more than "
                                          f"the {sources.MAX_DATA_BYTES} a data file may hold (sources.MAX_DATA_BYTES)")
            data = file.read(expected_size + 1)  # one more: a longer file is reported, not read on
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # bad gzip header / truncated / corrupt stream
        raise CorruptDatasetError(f"{path}: broken gzip stream ({err})") from err
    if len(data) != expected_size:
        state, found = ("truncated", len(data)) if len(data) < expected_size else ("too long", "more")
        raise CorruptDatasetError(f"{path}: {state}: header says {dims} = {expected_size} bytes of data, found {found}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*dims)


def find_idx_files(directory: Path) -> dict[str, tuple[Path, Path]] | None:
    """Each split's (images, labels) IDX files in `directory` (each raw or .gz: the raw one if both, as
    torchvision keeps both), or None if any of the four is missing."""
    found = {split: tuple(next((p for p in (directory / name, directory / f"{name}.gz") if p.is_file()), None)
                          for name in pair) for split, pair in SPLIT_FILES.items()}
    return found if all(all(pair) for pair in found.values()) else None


def locate_dataset(root: Path, system_dir: Path | None, download: bool, dataset: str) -> dict[str, tuple[Path, Path]]:
    """The four IDX files of `dataset` (IDX_DATASETS), by split (`find_idx_files`): from root, then the Debian dir
    (Fashion-MNIST only: MNIST shares its file names), then torchvision's download."""
    name, folder = IDX_DATASETS[dataset]
    download_dir = root / folder / "raw"  # where torchvision downloads to
    root_dirs = (root, download_dir) if dataset == "fashion_mnist" else (download_dir,)
    for directory in (*root_dirs, *([system_dir] if system_dir is not None else [])):
        if files := find_idx_files(directory):
            return files
    download_outcome = "download disabled (data.download=false)"
    if download:
        try:
            import torchvision  # late: only the download uses it, and importing it takes seconds

            getattr(torchvision.datasets, folder)(str(root), download=True)
            if files := find_idx_files(download_dir):
                return files
            download_outcome = f"downloaded into {download_dir} but the files are not there"
        except Exception as err:  # noqa: BLE001 - any failure (offline, disk full, ...) is reported below
            download_outcome = f"download into {root} failed: {type(err).__name__}: {str(err).strip()}"
    places = " and ".join(str(d.resolve()) for d in root_dirs)
    system = (f"Debian package dir {system_dir}: not there (install it with `{APT_COMMAND}`)"
              if system_dir is not None else "no system dir (data.system_dir: null)")
    raise DatasetNotFoundError(
        f"{name} not found. Looked for {', '.join(sum(SPLIT_FILES.values(), ()))} (each raw or .gz) in:\n"
        f"  1. root dir {places}: not there\n"
        f"  2. {system}\n"
        f"  3. {download_outcome}\n"
        f"Fix: put the files into {download_dir if dataset != 'fashion_mnist' else 'a directory'} and set "
        f"data.root=<its data dir>, or set data.download=true on a machine with internet access."
    )


def load_idx_dataset(root: str | os.PathLike, system_dir: str | os.PathLike | None, download: bool, image_size: int,
                     levels: int, preprocess: Preprocess, dataset: str = "fashion_mnist") -> dict[str, Tensor]:
    """{train,test}_{images,labels} of an IDX dataset (IDX_DATASETS): quantized uint8 (N, 1, S, S) and
    int64 (N,), from the cache if possible."""
    root, name = Path(root), IDX_DATASETS[dataset][0]
    cache = cache_path(root, image_size, levels, dataset)

    def build() -> dict[str, Tensor]:
        files = locate_dataset(root, Path(system_dir) if system_dir else None, download, dataset)
        data = {}
        try:
            for split, (images_path, labels_path) in files.items():
                images, labels = read_idx(images_path, 3), read_idx(labels_path, 1).long()
                if len(images) != len(labels):  # the two files of a split belong together
                    raise CorruptDatasetError(f"{images_path} has {len(images)} images but {labels_path} has "
                                              f"{len(labels)} labels")
                if len(labels) and labels.max() >= IDX_CLASSES:
                    raise CorruptDatasetError(f"{labels_path}: label {labels.max().item()} is not a {name} class "
                                              f"(0..{IDX_CLASSES - 1})")
                data[f"{split}_images"] = preprocess(images.numpy(), image_size, levels, 1)
                data[f"{split}_labels"] = labels
        except CorruptDatasetError as err:  # named with its dataset, and how to get it again
            fix = "Delete it so that it is fetched again (data.download=true)"
            if dataset == "fashion_mnist":
                fix += f", or if it comes from the Debian package, reinstall it: {APT_REINSTALL}"
            raise CorruptDatasetError(f"Corrupt {name} file {err}. {fix}") from None
        return save_cache(cache, data)

    return cached(cache, lambda: load_cache(cache, image_size, levels), build)


# ---------------------------------------------------------------------------- cache


def cache_path(root: Path, image_size: int, levels: int, dataset: str = "fashion_mnist") -> Path:
    return root / f"{dataset}_{image_size}px_{levels}lv.pt"


def load_cache(path: Path, image_size: int, levels: int, channels: int = 1,
               splits: tuple[str, ...] = tuple(SPLIT_FILES)) -> dict[str, Tensor] | None:
    """The cached preprocessed data (the tensors of `splits`), or None if unusable (then it is rebuilt)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        for split in {*splits, *(key.removesuffix("_images") for key in data if key.endswith("_images"))}:
            images, labels = data[f"{split}_images"], data[f"{split}_labels"]
            found = (images.dtype, images.shape[1:], labels.dtype, labels.shape)
            expected = (torch.uint8, (channels, image_size, image_size), torch.int64, (len(images),))
            if found != expected or (len(images) and images.max() >= levels):
                raise ValueError(f"unexpected {split} tensors")
        return data
    except Exception as err:  # noqa: BLE001 - any unreadable or inconsistent cache is rebuilt
        log.warning("Rebuilding the unusable cache file %s (%s: %s)", path, type(err).__name__, err)
        return None


def save_cache(path: Path, data: dict) -> dict:
    """Write `data` whole or not at all (`files.torch_save`) and return it; a folder that cannot
    take it (read-only, full) only costs the cache: a warning, and the next run builds it again."""
    try:
        torch_save(data, path)
    except OSError as err:
        log.warning("Not caching at %s (%s)", path, err.strerror or err)
    return data


def cached(path: Path, load: Callable[[], T | None], build: Callable[[], T]) -> T:
    """What `load` reads from the cache file `path` if it is there (None: unusable), else what `build`
    makes (and saves there). Jobs that start together build it once: under an exclusive lock on `path` (a
    lock file beside it, removed after; the OS releases it if its holder dies), the others wait, then
    read it. An unwritable folder gets no lock (nothing can be cached there anyway, see `save_cache`)."""
    if path.is_file() and (found := load()) is not None:
        return found
    lock_file, new_dirs = path.with_name(f".{path.name}.lock"), missing_dirs(path.parent)
    lock = FileLock(lock_file)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"[pixelcnn] waiting for another job to build {path}", flush=True)
            lock.acquire()
    except OSError as err:
        log.warning("Building %s without a lock (%s)", path, err)
        return build()
    try:
        found = load() if path.is_file() else None  # another job built it while this one waited
        return build() if found is None else found
    finally:
        # The lock file goes while still held: a job that was waiting on it then finds the cache
        # (or, if it could not be written, builds its own, as every job must then).
        with suppress(OSError):
            lock_file.unlink()
        lock.release()
        remove_if_empty(new_dirs)  # those left empty (no dataset anywhere, or the cache not written)
