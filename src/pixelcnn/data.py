"""Images as quantized levels: IDX reading (Fashion-MNIST, MNIST), preprocessing, caching, batching.

The images are resized (bilinear, half-pixel centres, like TF's `tf.image.resize`) and
quantized to `levels` levels per channel exactly as in the reference notebook (Foster,
"Generative Deep Learning", 2nd ed., chapter 5). The whole dataset is ~20 MB of uint8, so it is
kept in memory (on the GPU when training there) and batches are cut with one indexing op each.

`data.source` picks the images: Fashion-MNIST (the default) or MNIST as IDX files (`locate_dataset`:
in the data dir `data.root`, by default `default_data_dir()`, the Debian package, or torchvision's
download), or your own (`pixelcnn.ops.sources`). The preprocessed tensors are cached in the data dir,
and so is the sample-quality classifier (`pixelcnn.quality`).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Literal, TypeVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from torch import Tensor

from pixelcnn.ops import missing_dirs, remove_if_empty, sources, torch_save, UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
NUM_CLASSES = len(CLASS_NAMES)
# The IDX datasets: data.source -> (name in messages, torchvision's dataset class and folder under root/).
IDX_DATASETS = {"fashion_mnist": ("Fashion-MNIST", "FashionMNIST"), "mnist": ("MNIST", "MNIST")}
SOURCES = (*IDX_DATASETS, "folder", "array")
APT_COMMAND = "sudo apt-get install dataset-fashion-mnist"
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes: magic 0x0803 (images, 3-D), 0x0801 (labels, 1-D)
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FIX_CORRUPT = (
    "Delete it so that it is fetched again (data.download=true), or if it comes from the Debian "
    "package, reinstall it: sudo apt-get install --reinstall dataset-fashion-mnist"
)


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


# ---------------------------------------------------------------------------- preprocessing


def resize_images(images: Tensor, image_size: int) -> Tensor:
    """(N, H, W) grey or (N, H, W, C) channels-last uint8 -> (N, C, S, S) float32 in 0..255, bilinear
    with half-pixel centres, each channel on its own."""
    pixels = images[:, None].float() if images.dim() == 3 else images.permute(0, 3, 1, 2).float()
    if pixels.shape[-1] == image_size and pixels.shape[-2] == image_size:
        return pixels
    return F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False)


def quantize(images: Tensor, image_size: int, levels: int) -> Tensor:
    """(N, H, W) grey or (N, H, W, C) uint8 -> (N, C, S, S) uint8 levels in 0..levels-1 (the notebook's
    preprocessing, for every source and channel)."""
    level = torch.floor(resize_images(images, image_size) / (256 / levels))
    return level.clamp_(0, levels - 1).to(torch.uint8)


# ---------------------------------------------------------------------------- IDX files


def corrupt(path: Path, problem: str) -> CorruptDatasetError:
    return CorruptDatasetError(f"Corrupt Fashion-MNIST file {path}: {problem}. {FIX_CORRUPT}")


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
                raise corrupt(path, f"only {len(header)} bytes, shorter than the {header_size}-byte IDX header")
            if header[:4] != (magic := bytes([0, 0, IDX_UBYTE, ndim])):
                raise corrupt(path, f"bad magic number 0x{header[:4].hex()}, expected 0x{magic.hex()} "
                                    f"(ubyte, {ndim}-D)")
            dims = struct.unpack(f">{ndim}I", header[4:])
            expected_size = math.prod(dims)
            if expected_size > sources.MAX_DATA_BYTES:
                raise corrupt(path, f"its header says {dims} = {expected_size} bytes of data, more than the "
                                    f"{sources.MAX_DATA_BYTES} a data file may hold (pixelcnn.ops.sources.MAX_DATA_BYTES)")
            data = file.read(expected_size + 1)  # one more: a longer file is reported, not read on
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # bad gzip header / truncated / corrupt stream
        raise corrupt(path, f"broken gzip stream ({err})") from err
    if len(data) != expected_size:
        state, found = ("truncated", len(data)) if len(data) < expected_size else ("too long", "more")
        raise corrupt(path, f"{state}: header says {dims} = {expected_size} bytes of data, found {found}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*dims)


def read_split(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    """One split's images (N, H, W) uint8 and labels (N,) int64, checked to belong together."""
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1).long()
    if len(images) != len(labels):
        raise CorruptDatasetError(
            f"Corrupt Fashion-MNIST files: {images_path} has {len(images)} images but {labels_path} has "
            f"{len(labels)} labels. {FIX_CORRUPT}"
        )
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise corrupt(labels_path, f"label {labels.max().item()} is not a Fashion-MNIST class (0..{NUM_CLASSES - 1})")
    return images, labels


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in `directory` (each raw or .gz: the raw one if both, as torchvision keeps both),
    or None if any is missing."""
    found = {name: next((p for p in (directory / name, directory / f"{name}.gz") if p.is_file()), None)
             for pair in SPLIT_FILES.values() for name in pair}
    return found if all(found.values()) else None


def locate_dataset(root: Path, system_dir: Path | None, download: bool, dataset: str = "fashion_mnist") -> dict[str, Path]:
    """Paths of the four IDX files of `dataset` (IDX_DATASETS): from root, then the Debian dir
    (Fashion-MNIST only: MNIST shares its file names), then torchvision's download."""
    name, folder = IDX_DATASETS[dataset]
    download_dir = root / folder / "raw"  # where torchvision downloads to
    root_dirs = (root, download_dir) if dataset == "fashion_mnist" else (download_dir,)
    for directory in (*root_dirs, *([system_dir] if system_dir is not None else [])):
        if files := find_idx_files(directory):
            return files
    if not download:
        download_outcome = "download disabled (data.download=false)"
    else:
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
        f"{name} not found. Looked for train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each raw or .gz) in:\n"
        f"  1. root dir {places}: not there\n"
        f"  2. {system}\n"
        f"  3. {download_outcome}\n"
        f"Fix: put the files into {download_dir if dataset != 'fashion_mnist' else 'a directory'} and set "
        f"data.root=<its data dir>, or set data.download=true on a machine with internet access."
    )


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
            if not (
                images.dtype == torch.uint8
                and images.shape[1:] == (channels, image_size, image_size)
                and labels.dtype == torch.int64
                and labels.shape == (len(images),)
                and (len(images) == 0 or images.max() < levels)
            ):
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


def load_idx_dataset(
    root: str | os.PathLike, system_dir: str | os.PathLike | None, download: bool, image_size: int, levels: int,
    dataset: str = "fashion_mnist",
) -> dict[str, Tensor]:
    """{train,test}_{images,labels} of an IDX dataset (IDX_DATASETS): quantized uint8 (N, 1, S, S) and
    int64 (N,), from the cache if possible."""
    root = Path(root)
    cache = cache_path(root, image_size, levels, dataset)

    def build() -> dict[str, Tensor]:
        files = locate_dataset(root, Path(system_dir) if system_dir else None, download, dataset)
        data = {}
        for split, (images_name, labels_name) in SPLIT_FILES.items():
            images, labels = read_split(files[images_name], files[labels_name])
            data[f"{split}_images"], data[f"{split}_labels"] = quantize(images, image_size, levels), labels
        return save_cache(cache, data)

    return cached(cache, lambda: load_cache(cache, image_size, levels), build)


# ---------------------------------------------------------------------------- batching


def limited(batches: int, limit: int | float | None) -> int:
    """`batches` cut by a limit as Lightning's limit_train_batches means it: a float is a fraction
    (rounded down), an int a number of batches, None none."""
    return batches if limit is None else int(batches * limit) if isinstance(limit, float) else min(batches, limit)


class BatchLoader:
    """Batches of in-memory (images, labels) tensors, each cut with one indexing op (Lightning takes
    any iterable with `__len__` as a dataloader).

    Shuffling draws a new permutation every epoch, on the tensors' device, with the loader's own
    generator seeded from `seed`, else from torch's global RNG (so `seed_everything` makes it
    reproducible); `hflip` mirrors a random half of every batch.

    With `world_size` > 1 it yields only rank `rank`'s `shard`: Lightning's `use_distributed_sampler`
    shards torch DataLoaders with a sampler only, not an iterable like this one. Lightning saves
    `state_dict` in checkpoints and gives it back on a resume in the middle of an epoch, which then
    continues with the same order and flips, bit for bit as an uninterrupted run.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool = False, hflip: bool = False,
        seed: int | None = None, rank: int = 0, world_size: int = 1,
    ):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if not 0 <= rank < world_size <= max(len(images), 1):
            raise ValueError(f"rank {rank} of {world_size} processes does not fit {len(images)} images")
        self.rank, self.world_size = rank, world_size
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.hflip = batch_size, shuffle, hflip
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        self.generator = torch.Generator(device=images.device).manual_seed(seed)
        self._epoch_state = self.generator.get_state()  # the generator as the current epoch began
        self._items = 0  # batches handed out in the current epoch
        self._resume: dict | None = None  # a mid-epoch state to continue from at the next __iter__
        # Batches the training loop takes per epoch (Lightning's limit_train_batches can stop it early).
        self.epoch_items: Callable[[], int | float] = self.__len__

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch_generator": self._epoch_state, "items": self._items}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._epoch_state, self._items = state["epoch_generator"], state["items"]
        self._resume = state if state["items"] > 0 else None

    def __len__(self) -> int:
        """Batches per epoch (this rank's; the same on every rank)."""
        return math.ceil(self.shortest_share() / self.batch_size)

    def shard(self) -> tuple[int, int]:
        """(first, stop) of this rank's part of the epoch's order; every rank gets a disjoint part.

        A shuffled (training) epoch drops the `count % world_size` items past the last full share
        (a different few of each epoch's permutation), so no item is seen twice in an epoch and all
        ranks take the same number of batches, as DDP's collectives require. Unshuffled (evaluation)
        keeps every item exactly once, so the split's mean is exact: shares differ by at most one.
        """
        count = self.shortest_share() * self.world_size if self.shuffle else len(self.images)
        return self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size

    def item_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) in the epoch's order of each batch this rank yields. In evaluation, a share
        one item longer than the shortest puts that item into its last batch (which may then hold
        `batch_size` + 1 items), so that every rank has the same number of batches."""
        (first, stop), shortest = self.shard(), self.shortest_share()
        starts = list(range(first, first + shortest, self.batch_size))
        return list(zip(starts, [*starts[1:], stop]))

    def shortest_share(self) -> int:
        return len(self.images) // self.world_size  # >= 1 with several ranks (checked in __init__)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        count, device = len(self.images), self.images.device
        resume, self._resume = self._resume, None
        if resume is not None and resume["items"] >= self.epoch_items():
            resume = None  # that epoch was over: this one draws a new order from the generator
        if resume is not None:  # replay the interrupted epoch's order, then continue its draws
            self.generator.set_state(resume["epoch_generator"])
        self._epoch_state, self._items = self.generator.get_state(), 0
        order = torch.randperm(count, generator=self.generator, device=device) if self.shuffle else None
        if resume is not None:
            self.generator.set_state(resume["generator"])
        # Every rank draws the same permutation (same seed; equal shares keep the generators in
        # step, hflip draws included) and keeps its own share.
        for item, (start, stop) in enumerate(self.item_bounds()):
            if resume is not None and item < resume["items"]:
                continue  # handed out before the interruption
            self._items = item + 1
            # A slice (a view, no copy) in order, else one gather per tensor.
            index = slice(start, stop) if order is None else order[start:stop]
            images, labels = self.images[index], self.labels[index]
            if self.hflip:
                flip = torch.rand(len(images), generator=self.generator, device=device) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            yield images, labels


# ---------------------------------------------------------------------------- data module

Split = tuple[Tensor, Tensor]  # (images uint8 (N, C, S, S), labels int64 (N,))


def preprocess(images: list[np.ndarray], image_size: int, levels: int, channels: int) -> Tensor:
    """Images of any sizes, (H, W) or (H, W, C) uint8 -> (N, C, S, S) uint8 levels by `quantize`,
    batched by size, 2**24 values at most (the float copies of a 1 GB array would take ~7 GB), in order."""
    out = torch.empty(len(images), channels, image_size, image_size, dtype=torch.uint8)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(k)
    for shape, indices in by_shape.items():
        step = max(1, 2**24 // math.prod(shape))
        for start in range(0, len(indices), step):
            batch = indices[start:start + step]
            out[batch] = quantize(torch.from_numpy(np.stack([images[k] for k in batch])), image_size, levels)
    return out


def load_own_images(root: Path, source: str, path: Path, image_size: int, levels: int, channels: int) -> dict:
    """A folder or array source (`pixelcnn.ops.sources`) preprocessed: {<split>_images (N, C, S, S) uint8,
    <split>_labels (N,) int64} for the splits it has, and class_names (a list), from the cache if possible."""
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


def fingerprint(split: Split) -> str:
    """A split's image count and a short sha256 of its content (levels and labels), as a checkpoint records it."""
    digest = hashlib.sha256(split[0].contiguous().numpy())
    digest.update(split[1].contiguous().numpy())
    return f"{len(split[0])} images, sha256 {digest.hexdigest()[:16]}"


def changed_splits(saved: object, now: dict[str, str]) -> str | None:
    """Which splits differ between the fingerprints a checkpoint holds (`saved`; None: saved before they were)
    and `now`, with their image counts before -> now; None if none does."""
    if not isinstance(saved, dict):
        return None
    counts = {split: (str(saved.get(split, "?")).partition(" ")[0], now[split].partition(" ")[0]) for split in now}
    changed = [f"{split} {before} -> {count} images" if before != count else f"{split} {count} other images"
               for split, (before, count) in counts.items() if saved.get(split) != now[split]]
    return ", ".join(changed) or None


def split_off(split: Split, size: int | float, seed: int, what: str) -> tuple[Split, Split]:
    """(rest, part): `size` images (a count, or a fraction of them) cut from `split` by a fixed
    permutation from `seed`."""
    images, labels = split
    count = size if isinstance(size, int) else max(1, round(size * len(images)))
    if not 0 <= count < len(images):
        raise UserError(f"data.{what}={size} is invalid: the training file has {len(images)} images, so it must be "
                        f"in 0..{len(images) - 1} (or a fraction in (0, 1))")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    part, rest = order[:count], order[count:]
    return (images[rest], labels[rest]), (images[part], labels[part])


class ImageDataModule(L.LightningDataModule):
    """Images of `source` quantized to `levels` levels per channel (2..256: uint8) at `image_size` x
    `image_size`, with `channels` 1 (grey) or 3 (RGB).

    Sources (`SOURCES`): fashion_mnist, mnist (IDX files, see `locate_dataset`), folder and array
    (`path`, see `pixelcnn.ops.sources`). Test is the source's test split (Fashion-MNIST: the 10k t10k
    set), else `test_size` (a count or a fraction) cut from the training images first; val likewise
    (`val_size`); each cut by a fixed permutation from `split_seed`. `class_names` are the source's
    classes ([]: unlabelled).
    Batches are (images uint8 (B, C, S, S) of levels 0..levels-1, labels int64 (B,)) (`BatchLoader`);
    under the trainer's overfit_batches, training takes the same first batches every epoch, in order and unflipped.
    `on_device` "auto" moves the data once to the trainer's CUDA device, True to any non-CPU one.
    """

    def __init__(
        self,
        source: str = "fashion_mnist",
        path: str | os.PathLike | None = None,
        channels: int = 1,
        test_size: int | float = 0.1,
        root: str | os.PathLike | None = None,
        system_dir: str | os.PathLike | None = "/usr/share/datasets/fashion-mnist",
        download: bool = True,
        image_size: int = 16,
        levels: int = 4,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int | float = 5000,
        split_seed: int = 0,
        on_device: bool | Literal["auto"] = "auto",
        hflip: bool = False,
        shuffle_seed: int | None = None,
    ):
        super().__init__()
        if source not in SOURCES:
            raise UserError(f"data.source={source!r} is unknown: choose one of {', '.join(SOURCES)}")
        if (path is None) != (source in IDX_DATASETS):
            raise UserError(f"data.path is for data=folder / data=array only (data.source={source})" if path
                            else f"data={source} needs data.path=<{'folder' if source == 'folder' else '.npy or .npz file'}>")
        self.source, self.channels, self.test_size = source, channels, test_size
        self.path = Path(path).expanduser().absolute() if path is not None else None
        self.root = Path(root).expanduser() if root else default_data_dir()  # a config's ~ is not expanded by the shell
        self.system_dir, self.download = system_dir, download
        self.image_size, self.levels = image_size, levels
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.split_seed = val_size, split_seed
        self.on_device, self.hflip, self.shuffle_seed = on_device, hflip, shuffle_seed
        self._train_loader: BatchLoader | None = None
        self._train_generator_state: Tensor | None = None  # from a checkpoint, for the next train loader
        self.data: dict[str, Tensor] | None = None
        self.class_names: list[str] = []  # known once loaded
        self.train_set: Split | None = None
        self.val_set: Split | None = None
        self.test_set: Split | None = None

    def prepare_data(self) -> None:
        # Lightning calls this on one process only: the download and the cache file belong here.
        self.load()

    def load(self) -> dict[str, Tensor]:
        if self.data is not None:
            return self.data
        if self.source in IDX_DATASETS:
            data = load_idx_dataset(self.root, self.system_dir, self.download, self.image_size, self.levels, self.source)
            self.class_names = list(CLASS_NAMES) if self.source == "fashion_mnist" else [str(k) for k in range(10)]
            if self.channels > 1:  # grey as RGB: the same levels in every channel
                data = {k: v.repeat(1, self.channels, 1, 1) if k.endswith("_images") else v for k, v in data.items()}
        else:
            data = load_own_images(self.root, self.source, self.path, self.image_size, self.levels, self.channels)
            self.class_names = list(data.pop("class_names"))
        self.data = data
        return self.data

    @property
    def num_classes(self) -> int:
        """Classes of the source (0: unlabelled), known once loaded."""
        return len(self.class_names)

    def source_settings(self) -> dict:
        """What picks this data and its test split, for a checkpoint (`ImageModule`'s `data`), so
        that sample.py and evaluate.py read the same test images: `setup_datamodule(root, ..., **this)`."""
        return {"source": self.source, "path": str(self.path) if self.path else None, "channels": self.channels,
                "val_size": self.val_size, "test_size": self.test_size, "split_seed": self.split_seed}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = self.load()
        train = data["train_images"], data["train_labels"]
        # Cut in this order, each with its own fixed permutation: Fashion-MNIST has a test split, so
        # its val split is cut exactly as it always was.
        test = (data["test_images"], data["test_labels"]) if "test_images" in data else None
        if test is None:
            train, test = split_off(train, self.test_size, self.split_seed + 1, "test_size")
        val = (data["val_images"], data["val_labels"]) if "val_images" in data else None
        if val is None:
            train, val = split_off(train, self.val_size, self.split_seed, "val_size")
        self.train_set, self.val_set, self.test_set = train, val, test
        # What a run trained on, in its checkpoints and metrics.json: a resume on other data is refused.
        self.fingerprints = {"train": fingerprint(train), "val": fingerprint(val), "test": fingerprint(test)}

    def loader(self, name: Literal["train_set", "val_set", "test_set"], batch_size: int, train: bool) -> BatchLoader:
        # Batches live on the trainer's device if moving there is enabled (on_device), else on the CPU.
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if not (device.type == "cuda" if self.on_device == "auto" else self.on_device):
            device = torch.device("cpu")
        split = getattr(self, name)[0].to(device), getattr(self, name)[1].to(device)  # a no-op once moved
        setattr(self, name, split)  # keep the moved copy so the copy happens once
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        if world_size > len(split[0]):
            raise UserError(f"the {name.removesuffix('_set')} split has {len(split[0])} images, fewer than the "
                            f"{world_size} processes (trainer.devices x trainer.num_nodes): use fewer devices")
        seed = self.shuffle_seed
        if train and seed is None and world_size > 1:
            # The ranks must cut one permutation: seed_everything seeds their global RNGs alike, but
            # rank-0-only work (sample grids) may have drawn from rank 0's since, so take rank 0's seed.
            seed = self.trainer.strategy.broadcast(int(torch.randint(2**62, ()).item()), src=0)
        # Lightning cuts overfit_batches; the same batches every epoch: no shuffle, no random flips (its own
        # unshuffling replaces a DataLoader's sampler, which this loader has not).
        overfit = train and self.trainer is not None and bool(self.trainer.overfit_batches)
        return BatchLoader(*split, batch_size, shuffle=train and not overfit, hflip=train and self.hflip and not overfit,
                           seed=seed, rank=rank, world_size=world_size)

    def train_dataloader(self) -> BatchLoader:
        loader = self.loader("train_set", self.batch_size, train=True)
        if self.trainer is not None:  # what Lightning takes of it per epoch (known once the loop is set up)
            loader.epoch_items = lambda: self.trainer.num_training_batches
        if self._train_generator_state is not None:  # resuming: continue the shuffle and flip draws
            loader.generator.set_state(self._train_generator_state)
            self._train_generator_state = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict:
        """The training loader's generator, saved in every checkpoint. Lightning gives a loader its
        own state back only on a resume in the middle of an epoch; a run resumed at an epoch's end
        must continue the generator too, or it replays the first epoch's order."""
        loader = self._train_loader
        return {"train_generator": loader.generator.get_state()} if loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._train_generator_state = state_dict.get("train_generator")

    def val_dataloader(self) -> BatchLoader:
        return self.loader("val_set", self.eval_batch_size, train=False)

    def test_dataloader(self) -> BatchLoader:
        return self.loader("test_set", self.eval_batch_size, train=False)


def setup_datamodule(root: str | os.PathLike | None, image_size: int, levels: int, **kwargs) -> ImageDataModule:
    """The data module, set up: same files, cache and splits as training (other arguments as
    `ImageDataModule`'s, e.g. `val_size`, `system_dir`, or a checkpoint's `source_settings`)."""
    datamodule = ImageDataModule(root=root, image_size=image_size, levels=levels, **kwargs)
    datamodule.setup()
    return datamodule
