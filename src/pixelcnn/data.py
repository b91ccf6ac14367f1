"""Images as quantized levels: preprocessing, the splits, batching, and the data module.

The images are resized (bilinear, half-pixel centres, like TF's `tf.image.resize`) and
quantized to `levels` levels per channel exactly as in the reference notebook (Foster,
"Generative Deep Learning", 2nd ed., chapter 5). The whole dataset is ~20 MB of uint8, so it is
kept in memory (on the GPU when training there) and batches are cut with one indexing op each.

`data.source` picks the images: Fashion-MNIST (the default) or MNIST as IDX files (found in the data
dir `data.root`, the Debian package, or torchvision's download), or your own (`pixelcnn.ops.sources`).
Finding and reading the files, and the cache of the preprocessed tensors in the data dir, are
`pixelcnn.ops.datafiles`'s (`load_data`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pixelcnn.ops import default_data_dir, IDX_DATASETS, load_data, UserError

CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


# ---------------------------------------------------------------------------- preprocessing


def resize_images(images: Tensor, image_size: int) -> Tensor:
    """(N, H, W) grey or (N, H, W, C) channels-last uint8 -> (N, C, S, S) float32 in 0..255, bilinear
    with half-pixel centres, each channel on its own."""
    pixels = images[:, None].float() if images.dim() == 3 else images.permute(0, 3, 1, 2).float()
    return F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False)


def quantize(images: Tensor, image_size: int, levels: int) -> Tensor:
    """(N, H, W) grey or (N, H, W, C) uint8 -> (N, C, S, S) uint8 levels in 0..levels-1 (the notebook's
    preprocessing, for every source and channel)."""
    level = torch.floor(resize_images(images, image_size) / (256 / levels))
    return level.clamp_(0, levels - 1).to(torch.uint8)


def preprocess(images: list[np.ndarray], image_size: int, levels: int, channels: int) -> Tensor:
    """Images of any sizes, (H, W) or (H, W, C) uint8 -> (N, C, S, S) uint8 levels by `quantize`,
    batched by size, 2**24 values at most (the float copies of a 1 GB array would take ~7 GB), in order."""
    out = torch.empty(len(images), channels, image_size, image_size, dtype=torch.uint8)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(k)
    for shape, indices in by_shape.items():
        for batch in torch.tensor(indices).split(max(1, 2**24 // math.prod(shape))):
            out[batch] = quantize(torch.from_numpy(np.stack([images[k] for k in batch.tolist()])), image_size, levels)
    return out


# ---------------------------------------------------------------------------- splits

Split = tuple[Tensor, Tensor]  # (images uint8 (N, C, S, S), labels int64 (N,))


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


# ---------------------------------------------------------------------------- batching


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
        if not 0 <= rank < world_size <= max(len(images), 1):
            raise ValueError(f"rank {rank} of {world_size} processes does not fit {len(images)} images")
        self.rank, self.world_size = rank, world_size
        self.shortest_share = len(images) // world_size  # >= 1 with several ranks (checked above)
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
        return math.ceil(self.shortest_share / self.batch_size)

    def item_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) in the epoch's order of each batch this rank yields, from its share (first, stop) of
        the order; every rank gets a disjoint share.

        A shuffled (training) epoch drops the `count % world_size` items past the last full share
        (a different few of each epoch's permutation), so no item is seen twice in an epoch and all
        ranks take the same number of batches, as DDP's collectives require. Unshuffled (evaluation)
        keeps every item exactly once, so the split's mean is exact: shares differ by at most one, and
        a share one item longer than the shortest puts that item into its last batch (which may then
        hold `batch_size` + 1 items), so that every rank has the same number of batches.
        """
        count = self.shortest_share * self.world_size if self.shuffle else len(self.images)
        first, stop = self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size
        starts = list(range(first, first + self.shortest_share, self.batch_size))
        return list(zip(starts, [*starts[1:], stop]))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        count, device = len(self.images), self.images.device
        resume, self._resume = self._resume, None
        if resume is not None and resume["items"] >= self.epoch_items():
            resume = None  # that epoch was over: this one draws a new order from the generator
        if resume is not None:  # replay the interrupted epoch's order, then continue its draws
            self.generator.set_state(resume["epoch_generator"])
        self._epoch_state = self.generator.get_state()
        order = torch.randperm(count, generator=self.generator, device=device) if self.shuffle else None
        # Batches handed out in this epoch: on a resume, those before the interruption.
        self._items = 0 if resume is None else resume["items"]
        if resume is not None:
            self.generator.set_state(resume["generator"])
        # Every rank draws the same permutation (same seed; equal shares keep the generators in
        # step, hflip draws included) and keeps its own share.
        for start, stop in self.item_bounds()[self._items:]:
            self._items += 1
            # A slice (a view, no copy) in order, else one gather per tensor.
            index = slice(start, stop) if order is None else order[start:stop]
            images, labels = self.images[index], self.labels[index]
            if self.hflip:
                flip = torch.rand(len(images), generator=self.generator, device=device) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            yield images, labels


# ---------------------------------------------------------------------------- data module


class ImageDataModule(L.LightningDataModule):
    """Images of `source` quantized to `levels` levels per channel (2..256: uint8) at `image_size` x
    `image_size`, with `channels` 1 (grey) or 3 (RGB).

    Sources (data.source, checked by `pixelcnn.ops.rules`): fashion_mnist, mnist (IDX files,
    `pixelcnn.ops.datafiles`), folder and array
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
        if (path is None) != (source in IDX_DATASETS):  # IDX files (`pixelcnn.ops.datafiles`) need no data.path
            needs = "folder" if source == "folder" else ".npy or .npz file"
            raise UserError(f"data.path is for data=folder / data=array only (data.source={source})" if path
                            else f"data={source} needs data.path=<{needs}>")
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
        self.class_names: list[str] = []  # known once set up
        self.train_set: Split | None = None
        self.val_set: Split | None = None
        self.test_set: Split | None = None

    @property
    def num_classes(self) -> int:
        """Classes of the source (0: unlabelled), known once set up."""
        return len(self.class_names)

    def source_settings(self) -> dict:
        """What picks this data and its test split, for a checkpoint (`ImageModule`'s `data`), so
        that sample.py and evaluate.py read the same test images: `setup_datamodule(root, ..., **this)`."""
        return {"source": self.source, "path": str(self.path) if self.path else None, "channels": self.channels,
                "val_size": self.val_size, "test_size": self.test_size, "split_seed": self.split_seed}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        # Read on every process (not in Lightning's rank-0 prepare_data): the data dir's cache is built by one
        # process under its lock while the others wait, then read.
        data = self.data = load_data(self.source, self.path, self.root, self.system_dir, self.download,
                                     self.image_size, self.levels, self.channels, preprocess)
        idx_names = CLASS_NAMES if self.source == "fashion_mnist" else [str(k) for k in range(10)]  # MNIST's digits
        self.class_names = list(data.pop("class_names", idx_names))  # an own source's, from its folders
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
        return BatchLoader(*split, batch_size, shuffle=train and not overfit,
                           hflip=train and self.hflip and not overfit, seed=seed, rank=rank, world_size=world_size)

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
        return {"train_generator": self._train_loader.generator.get_state()} if self._train_loader is not None else {}

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
